// Recurrent layers over a whole sequence on the CPU, one direction per call: the per-step loops
// of service/engine/onnx/ops/lstm_sequence.py, forward and backward through time, in C++.
//
// Why C++: the Python loop pays interpreter and dispatcher cost for each of its ~7 torch calls
// per forward step and ~5 per backward step; at training-sized hidden states that is a quarter
// of the time, at small ones half. Here each step is one matrix product and the transcendental
// activations through torch's vectorised kernels; the cell update and the whole backward step
// are plain loops over the batch rows. The products are addmm with both operands row-major
// (h·Rᵀ as h·[Rᵀ copied once per call]): MKL was 1.5-3x slower on a transposed view, and as fast
// as a packed oneDNN weight on the plain layout. The steps still run one at a time, so the
// gradient reaching every step's hidden state is returned.
//
// Gate blocks: `gate_blocks` gives, for i, o, f, c (ONNX's names), which H-wide block of the
// 4H gate axis holds that gate: {0, 1, 2, 3} for ONNX's order i, o, f, c, {0, 3, 1, 2} for
// torch's i, f, g, o.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <array>
#include <vector>

namespace {

using GateBlocks = std::array<int64_t, 4>;  // block of i, o, f, c

GateBlocks check_blocks(const std::vector<int64_t>& blocks) {
  TORCH_CHECK(blocks.size() == 4, "gate_blocks: expected 4 entries, got ", blocks.size());
  GateBlocks out{};
  std::array<bool, 4> seen{};
  for (size_t k = 0; k < 4; ++k) {
    TORCH_CHECK(blocks[k] >= 0 && blocks[k] < 4 && !seen[blocks[k]],
                "gate_blocks must be a permutation of 0..3");
    seen[blocks[k]] = true;
    out[k] = blocks[k];
  }
  return out;
}

// Rows of a [B, ...] step processed per task: enough elements that threads pay off.
int64_t grain_rows(int64_t hidden) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, hidden)); }

// Sigmoid on the i, o, f blocks and tanh on the c block of one step's pre-activations [B, 4H].
void activate(at::Tensor& pre, const GateBlocks& blocks, int64_t H) {
  const int64_t c_block = blocks[3];
  int64_t start = 0;
  for (int64_t k = 0; k <= 4; ++k) {  // runs of sigmoid blocks around the tanh block
    if (k == c_block || k == 4) {
      if (k > start) pre.narrow(1, start * H, (k - start) * H).sigmoid_();
      start = k + 1;
    }
  }
  pre.narrow(1, c_block * H, H).tanh_();
}

template <typename scalar_t>
void cell_update(const scalar_t* gates, const scalar_t* c_prev, scalar_t* cell, int64_t B, int64_t H,
                 const GateBlocks& blocks) {
  at::parallel_for(0, B, grain_rows(H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* row = gates + b * 4 * H;
      const scalar_t* i = row + blocks[0] * H;
      const scalar_t* f = row + blocks[2] * H;
      const scalar_t* g = row + blocks[3] * H;
      const scalar_t* cp = c_prev + b * H;
      scalar_t* c = cell + b * H;
      for (int64_t j = 0; j < H; ++j) c[j] = f[j] * cp[j] + i[j] * g[j];
    }
  });
}

template <typename scalar_t>
void hidden_update(const scalar_t* gates, const scalar_t* tanh_cell, scalar_t* y, int64_t B, int64_t H,
                   const GateBlocks& blocks) {
  at::parallel_for(0, B, grain_rows(H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* o = gates + b * 4 * H + blocks[1] * H;
      const scalar_t* tc = tanh_cell + b * H;
      scalar_t* yb = y + b * H;
      for (int64_t j = 0; j < H; ++j) yb[j] = o[j] * tc[j];
    }
  });
}

// One backward step: dc ← dc·f_{t+1} + dh·o·(1 − tanh²c) and the gate gradients of step t.
template <typename scalar_t>
void backward_step(const scalar_t* gates, const scalar_t* next_gates, const scalar_t* tanh_cell,
                   const scalar_t* c_prev, const scalar_t* dh, scalar_t* dc, scalar_t* dgates, int64_t B,
                   int64_t H, const GateBlocks& blocks) {
  at::parallel_for(0, B, grain_rows(H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* row = gates + b * 4 * H;
      const scalar_t* i = row + blocks[0] * H;
      const scalar_t* o = row + blocks[1] * H;
      const scalar_t* f = row + blocks[2] * H;
      const scalar_t* g = row + blocks[3] * H;
      const scalar_t* f_next = next_gates == nullptr ? nullptr : next_gates + b * 4 * H + blocks[2] * H;
      const scalar_t* tc = tanh_cell + b * H;
      const scalar_t* cp = c_prev + b * H;
      const scalar_t* dhb = dh + b * H;
      scalar_t* dcb = dc + b * H;
      scalar_t* drow = dgates + b * 4 * H;
      scalar_t* di = drow + blocks[0] * H;
      scalar_t* d_o = drow + blocks[1] * H;
      scalar_t* df = drow + blocks[2] * H;
      scalar_t* dg = drow + blocks[3] * H;
      for (int64_t j = 0; j < H; ++j) {
        const scalar_t carried = f_next == nullptr ? dcb[j] : dcb[j] * f_next[j];
        const scalar_t d = carried + dhb[j] * o[j] * (scalar_t(1) - tc[j] * tc[j]);
        dcb[j] = d;
        di[j] = d * g[j] * i[j] * (scalar_t(1) - i[j]);
        df[j] = d * cp[j] * f[j] * (scalar_t(1) - f[j]);
        dg[j] = d * i[j] * (scalar_t(1) - g[j] * g[j]);
        d_o[j] = dhb[j] * tc[j] * o[j] * (scalar_t(1) - o[j]);
      }
    }
  });
}

void check_inputs(const at::Tensor& gates, const at::Tensor& R, const at::Tensor& h0, const at::Tensor& c0) {
  TORCH_CHECK(gates.device().is_cpu(), "recurrent_cpu runs on CPU tensors");
  TORCH_CHECK(gates.dim() == 3 && gates.is_contiguous(), "gates/projected: a contiguous [T, B, 4H] tensor");
  const int64_t H = R.size(1);
  TORCH_CHECK(R.dim() == 2 && R.size(0) == 4 * H && gates.size(2) == 4 * H, "R: [4H, H] for gates [T, B, 4H]");
  TORCH_CHECK(h0.sizes() == c0.sizes() && h0.dim() == 2 && h0.size(0) == gates.size(1) && h0.size(1) == H,
              "h0, c0: [B, H]");
  for (const at::Tensor* t : {&R, &h0, &c0})
    TORCH_CHECK(t->scalar_type() == gates.scalar_type(), "every tensor must have the gates' dtype");
}

}  // namespace

// projected [T, B, 4H]: x_t·Wᵀ + b for every step (contiguous; overwritten with the activated
// gates). R [4H, H], h0 and c0 [B, H]. Returns (gates, cells, tanh(cells), Y), each [T, B, ·].
std::vector<at::Tensor> lstm_forward(at::Tensor projected, const at::Tensor& R, const at::Tensor& h0,
                                     const at::Tensor& c0, const std::vector<int64_t>& gate_blocks) {
  const GateBlocks blocks = check_blocks(gate_blocks);
  check_inputs(projected, R, h0, c0);
  const int64_t T = projected.size(0), B = projected.size(1), H = R.size(1);
  at::Tensor cells = at::empty({T, B, H}, projected.options());
  at::Tensor tanh_cells = at::empty({T, B, H}, projected.options());
  at::Tensor Y = at::empty({T, B, H}, projected.options());
  const at::Tensor Rt = R.t().contiguous();
  const at::Tensor c0c = c0.contiguous();
  // per-step views made once (each select is a dispatcher call)
  std::vector<at::Tensor> pre_t = projected.unbind(0), cell_t = cells.unbind(0);
  std::vector<at::Tensor> tanh_t = tanh_cells.unbind(0), y_t = Y.unbind(0);
  AT_DISPATCH_FLOATING_TYPES(projected.scalar_type(), "lstm_forward", [&] {
    const int64_t gate_step = B * 4 * H, step = B * H;
    scalar_t* gates = projected.mutable_data_ptr<scalar_t>();
    scalar_t* cell = cells.mutable_data_ptr<scalar_t>();
    scalar_t* tanh_cell = tanh_cells.mutable_data_ptr<scalar_t>();
    scalar_t* y = Y.mutable_data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t) {
      pre_t[t].addmm_(t == 0 ? h0 : y_t[t - 1], Rt);
      activate(pre_t[t], blocks, H);
      const scalar_t* c_prev = t == 0 ? c0c.const_data_ptr<scalar_t>() : cell + (t - 1) * step;
      cell_update<scalar_t>(gates + t * gate_step, c_prev, cell + t * step, B, H, blocks);
      at::tanh_out(tanh_t[t], cell_t[t]);
      hidden_update<scalar_t>(gates + t * gate_step, tanh_cell + t * step, y + t * step, B, H, blocks);
    }
  });
  return {projected, cells, tanh_cells, Y};
}

// Backward through time from dY [T, B, H] and the last states' gradients dh_last, dc_last
// [B, H]. Returns (dgates [T, B, 4H]: ∂L/∂ of the gates' pre-activations; dhidden [T, B, H]:
// ∂L/∂h_t through Y and through the recurrence; dc0 [B, H]).
std::vector<at::Tensor> lstm_backward(const at::Tensor& dY, const at::Tensor& dh_last, const at::Tensor& dc_last,
                                      const at::Tensor& gates, const at::Tensor& cells,
                                      const at::Tensor& tanh_cells, const at::Tensor& c0, const at::Tensor& R,
                                      const std::vector<int64_t>& gate_blocks) {
  const GateBlocks blocks = check_blocks(gate_blocks);
  check_inputs(gates, R, dh_last, dc_last);
  TORCH_CHECK(cells.is_contiguous() && tanh_cells.is_contiguous(), "cells: contiguous [T, B, H]");
  const int64_t T = gates.size(0), B = gates.size(1), H = R.size(1);
  const at::Tensor dYc = dY.contiguous();
  at::Tensor dgates = at::empty_like(gates);
  at::Tensor dhidden = at::empty({T, B, H}, gates.options());
  at::Tensor dc = dc_last.contiguous().clone();
  const at::Tensor c0c = c0.contiguous();
  const at::Tensor Rc = R.contiguous();
  std::vector<at::Tensor> dh_t = dhidden.unbind(0), dy_t = dYc.unbind(0), dgates_t = dgates.unbind(0);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_backward", [&] {
    const int64_t gate_step = B * 4 * H, step = B * H;
    const scalar_t* gate = gates.const_data_ptr<scalar_t>();
    const scalar_t* cell = cells.const_data_ptr<scalar_t>();
    const scalar_t* tanh_cell = tanh_cells.const_data_ptr<scalar_t>();
    scalar_t* dgate = dgates.mutable_data_ptr<scalar_t>();
    const scalar_t* dh = dhidden.const_data_ptr<scalar_t>();
    for (int64_t t = T - 1; t >= 0; --t) {
      if (t == T - 1) {
        at::add_out(dh_t[t], dy_t[t], dh_last);
      } else {
        at::addmm_out(dh_t[t], dy_t[t], dgates_t[t + 1], Rc);
      }
      const scalar_t* next = t == T - 1 ? nullptr : gate + (t + 1) * gate_step;
      const scalar_t* c_prev = t == 0 ? c0c.const_data_ptr<scalar_t>() : cell + (t - 1) * step;
      backward_step<scalar_t>(gate + t * gate_step, next, tanh_cell + t * step, c_prev, dh + t * step,
                              dc.mutable_data_ptr<scalar_t>(), dgate + t * gate_step, B, H, blocks);
    }
  });
  const at::Tensor f0 = gates.select(0, 0).narrow(1, blocks[2] * H, H);
  return {dgates, dhidden, dc * f0};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gradhealth's recurrent loops on the CPU (see recurrent_cpu.cpp)";
  m.def("lstm_forward", &lstm_forward, "LSTM forward over a whole sequence, step by step");
  m.def("lstm_backward", &lstm_backward, "LSTM backward through time, step by step");
}

// Recurrent layers over a whole sequence on the CPU, one direction per call: the per-step loops
// of service/engine/onnx/ops/lstm_sequence.py, forward and backward through time, in C++.
//
// Why C++: the Python loop pays interpreter and dispatcher cost for each of its ~7 torch calls
// per forward step and ~5 per backward step; at training-sized hidden states that is a quarter
// of the time, at small ones half. Here an LSTM step is one matrix product and one vectorised
// pass over the batch rows each way (activations, cell update; the gate gradients), GRU and RNN
// steps a product, torch's activation kernels and plain loops. The products are addmm with both
// operands row-major (h·Rᵀ as h·[Rᵀ transposed once per call]: MKL was 1.5-3x slower on a
// transposed view), or oneDNN with the weight packed once where the caller passes a packed
// weight (onnx/ops/_cpu_products.py: on machines where oneDNN runs these products faster than
// MKL, e.g. 3.5x per step on an AMD EPYC). The steps still run one at a time, so the gradient
// reaching every step's hidden state is returned.
//
// Gate blocks: `gate_blocks` gives, for i, o, f, c (ONNX's names), which H-wide block of the
// 4H gate axis holds that gate: {0, 1, 2, 3} for ONNX's order i, o, f, c, {0, 3, 1, 2} for
// torch's i, f, g, o.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "activations.h"
#include "spin_barrier.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

// small_gemm.h compiled for AVX-512 (x86-64-v4) and for AVX2 (x86-64-v3), each inside its own
// target pragma (their vector types need it), and called on CPUs that have the set (see
// small_gemm_run). Other architectures use addmm.
#if defined(__x86_64__)
// (each wrapper is defined inside its pragma: the kernel's templates are instantiated there,
// with that set's vectors; instantiated outside it they compiled to scalar code, 5x slower
// than addmm)
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define SMALL_GEMM_ISA avx512
#define SMALL_GEMM_VECTOR_BYTES 64
#define SMALL_GEMM_MAX_ROWS 8
#include "small_gemm.h"
#undef SMALL_GEMM_ISA
#undef SMALL_GEMM_VECTOR_BYTES
#undef SMALL_GEMM_MAX_ROWS
namespace {
void small_gemm_avx512(const gradhealth::small_gemm::Operands& p, int64_t rows) {
  gradhealth::small_gemm::avx512::multiply_add(p, rows);
}
}  // namespace
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define SMALL_GEMM_ISA avx2
#define SMALL_GEMM_VECTOR_BYTES 32
#define SMALL_GEMM_MAX_ROWS 4
#include "small_gemm.h"
#undef SMALL_GEMM_ISA
#undef SMALL_GEMM_VECTOR_BYTES
#undef SMALL_GEMM_MAX_ROWS
namespace {
void small_gemm_avx2(const gradhealth::small_gemm::Operands& p, int64_t rows) {
  gradhealth::small_gemm::avx2::multiply_add(p, rows);
}
}  // namespace
#pragma GCC pop_options
namespace {
constexpr bool kSmallGemmBuilt = true;
// What this CPU runs: 2 AVX-512, 1 AVX2, 0 neither (addmm). GRADHEALTH_SMALL_GEMM=0 turns the
// kernel off (the benchmarks' switch for comparing with addmm) and =avx2 runs the AVX2 build
// on an AVX-512 CPU too (so the tests check both builds where the CPU can run both).
int small_gemm_level() {
  static const int cpu = __builtin_cpu_supports("x86-64-v4") ? 2 : __builtin_cpu_supports("x86-64-v3") ? 1 : 0;
  const char* flag = std::getenv("GRADHEALTH_SMALL_GEMM");
  if (flag == nullptr) return cpu;
  if (std::strcmp(flag, "0") == 0) return 0;
  if (std::strcmp(flag, "avx2") == 0) return std::min(cpu, 1);
  return cpu;
}
}  // namespace
#else
#define SMALL_GEMM_ISA generic  // compiled, never called
#define SMALL_GEMM_VECTOR_BYTES 16
#define SMALL_GEMM_MAX_ROWS 4
#include "small_gemm.h"
namespace {
constexpr bool kSmallGemmBuilt = false;
void small_gemm_avx512(const gradhealth::small_gemm::Operands&, int64_t) {}
void small_gemm_avx2(const gradhealth::small_gemm::Operands&, int64_t) {}
int small_gemm_level() { return 0; }
}  // namespace
#endif

namespace {

// small_gemm.h's product for the set this CPU has (small_gemm_usable() says one runs)
void small_gemm_run(const gradhealth::small_gemm::Operands& p, int64_t rows) {
  if (small_gemm_level() == 2) {
    small_gemm_avx512(p, rows);
  } else {
    small_gemm_avx2(p, rows);
  }
}

}  // namespace

namespace {

using GateBlocks = std::array<int64_t, 4>;  // block of i, o, f, c

// x·Wᵀ + other through oneDNN, W packed by mkldnn::_reorder_linear_weight for x's batch size:
// the operator torch's own compiler emits for CPU linear layers. Returns a new tensor.
at::Tensor onednn_linear_add(const at::Tensor& x, const at::Tensor& other, const at::Tensor& packed) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "binary")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, c10::string_view)>();
  return op.call(x, other, packed, std::nullopt, "add");
}

// Below this many multiply-adds a step's product goes to small_gemm.h on AVX2/AVX-512 CPUs: the
// size under which _cpu_products.PACKED_STEP_MIN_MACS keeps oneDNN out too (2^21).
constexpr int64_t kSmallStepMacs = int64_t{1} << 21;

// Whether small_gemm.h runs here: an x86-64-v4 (AVX-512) or x86-64-v3 (AVX2) CPU, and
// GRADHEALTH_SMALL_GEMM not 0.
bool small_gemm_usable() { return kSmallGemmBuilt && small_gemm_level() > 0; }

// out = other + x·Wt with small_gemm.h, for float rows with unit column stride and Wt [K, N]
// row-major; false (nothing done) where the operands do not fit that
bool small_step_product(const at::Tensor& out, const at::Tensor& other, const at::Tensor& x, const at::Tensor& Wt) {
  const int64_t B = x.size(0), K = x.size(1), N = Wt.size(1);
  // (a GRU's recurrent bias comes as one [3H] row: addmm broadcasts it, small_gemm.h does not)
  if (x.scalar_type() != at::kFloat || B * K * N >= kSmallStepMacs || other.sizes() != out.sizes() ||
      !Wt.is_contiguous() || x.stride(1) != 1 || other.stride(1) != 1 || out.stride(1) != 1 ||
      !small_gemm_usable()) {
    return false;
  }
  const gradhealth::small_gemm::Operands p{x.const_data_ptr<float>(), x.stride(0), Wt.const_data_ptr<float>(),
                                           K, N, N, other.const_data_ptr<float>(), other.stride(0),
                                           out.data_ptr<float>(), out.stride(0)};
  small_gemm_run(p, B);
  return true;
}

// out = x·Wᵀ + other: oneDNN where a packed W is given, small_gemm.h for a small float step on
// an AVX-512 CPU, else MKL's addmm on Wt = Wᵀ (row-major). `out` may be `other` itself.
void step_product(at::Tensor out, const at::Tensor& other, const at::Tensor& x, const at::Tensor& Wt,
                  const std::optional<at::Tensor>& packed) {
  if (packed.has_value()) {
    out.copy_(onednn_linear_add(x, other, *packed));
  } else if (small_step_product(out, other, x, Wt)) {
    return;
  } else if (out.is_same(other)) {
    out.addmm_(x, Wt);
  } else {
    at::addmm_out(out, other, x, Wt);
  }
}

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

// Rows of a [B, ...] step processed per task: 4096 elements and more a task. (The numbers that
// chose it, session 3, were taken while the extension was built without OpenMP, when no
// parallel_for here ran on more than one thread; with it, session 5: the large bench LSTM,
// hidden 512, batch 32, two threads, 0.99 -> 0.94-0.96x torch.)
int64_t grain_rows(int64_t hidden) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, hidden)); }

// Rᵀ as a new row-major tensor, copied in 32×32 tiles, each read column by column so that the
// writes run along rows: 27 µs for a [512, 128] float matrix where torch's strided copy
// (`R.t().contiguous()`) takes 50 µs and the same tiles written column-wise 175 µs (the
// power-of-two stride of the writes keeps hitting the same cache sets).
template <typename scalar_t>
void transpose_into(const scalar_t* src, scalar_t* dst, int64_t rows, int64_t cols) {
  constexpr int64_t tile = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += tile) {
    const int64_t r1 = std::min(rows, r0 + tile);
    for (int64_t c0 = 0; c0 < cols; c0 += tile) {
      const int64_t c1 = std::min(cols, c0 + tile);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * rows + r] = src[r * cols + c];
    }
  }
}

at::Tensor transposed(const at::Tensor& matrix) {
  const at::Tensor source = matrix.contiguous();
  at::Tensor out = at::empty({source.size(1), source.size(0)}, source.options());
  AT_DISPATCH_FLOATING_TYPES(source.scalar_type(), "transposed", [&] {
    transpose_into<scalar_t>(source.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                             source.size(0), source.size(1));
  });
  return out;
}

// One forward step's elementwise part, over rows [begin, end) of the batch: the gates'
// activations (written back over their pre-activations, which the backward does not need),
// c = f·c_prev + i·g, tanh(c) and y = o·tanh(c), in one pass (activations.h says why).
template <typename scalar_t>
__attribute__((always_inline)) inline void forward_rows(scalar_t* __restrict__ gates,
                                                        const scalar_t* __restrict__ c_prev,
                                                        scalar_t* __restrict__ cell,
                                                        scalar_t* __restrict__ tanh_cell,
                                                        scalar_t* __restrict__ y, int64_t begin,
                                                        int64_t end, int64_t H, const GateBlocks& blocks,
                                                        int64_t j0, int64_t j1) {
  for (int64_t b = begin; b < end; ++b) {
    scalar_t* row = gates + b * 4 * H;
    scalar_t* __restrict__ i = row + blocks[0] * H;
    scalar_t* __restrict__ o = row + blocks[1] * H;
    scalar_t* __restrict__ f = row + blocks[2] * H;
    scalar_t* __restrict__ g = row + blocks[3] * H;
    const scalar_t* __restrict__ cp = c_prev + b * H;
    scalar_t* __restrict__ c = cell + b * H;
    scalar_t* __restrict__ tc = tanh_cell + b * H;
    scalar_t* __restrict__ yb = y + b * H;
    for (int64_t j = j0; j < j1; ++j) {
      const scalar_t ij = gradhealth::sigmoid(i[j]), oj = gradhealth::sigmoid(o[j]);
      const scalar_t fj = gradhealth::sigmoid(f[j]), gj = gradhealth::tanh(g[j]);
      const scalar_t cj = fj * cp[j] + ij * gj;
      const scalar_t tcj = gradhealth::tanh(cj);
      i[j] = ij;
      o[j] = oj;
      f[j] = fj;
      g[j] = gj;
      c[j] = cj;
      tc[j] = tcj;
      yb[j] = oj * tcj;
    }
  }
}

// float: also compiled for x86-64-v3 (AVX2, FMA) and v4 (AVX-512), the best one picked at load
// time by the CPU (8 or 16 lanes instead of SSE2's 4 for the activations' polynomials)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void forward_rows_float(
    float* gates, const float* c_prev, float* cell, float* tanh_cell, float* y, int64_t begin,
    int64_t end, int64_t H, const GateBlocks& blocks, int64_t j0, int64_t j1) {
  forward_rows<float>(gates, c_prev, cell, tanh_cell, y, begin, end, H, blocks, j0, j1);
}

template <typename scalar_t>
void forward_step(scalar_t* gates, const scalar_t* c_prev, scalar_t* cell, scalar_t* tanh_cell, scalar_t* y,
                  int64_t B, int64_t H, const GateBlocks& blocks) {
  at::parallel_for(0, B, grain_rows(H), [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      forward_rows_float(gates, c_prev, cell, tanh_cell, y, begin, end, H, blocks, 0, H);
    } else {
      forward_rows<scalar_t>(gates, c_prev, cell, tanh_cell, y, begin, end, H, blocks, 0, H);
    }
  });
}

// One backward step over rows [begin, end): dc ← dc·f_{t+1} + dh·o·(1 − tanh²c) and the gate
// gradients of step t (f_next: the next step's gates, null at the last step).
template <typename scalar_t>
__attribute__((always_inline)) inline void backward_rows(
    const scalar_t* __restrict__ gates, const scalar_t* __restrict__ next_gates,
    const scalar_t* __restrict__ tanh_cell, const scalar_t* __restrict__ c_prev,
    const scalar_t* __restrict__ dh, scalar_t* __restrict__ dc, scalar_t* __restrict__ dgates, int64_t begin,
    int64_t end, int64_t H, const GateBlocks& blocks, int64_t j0, int64_t j1) {
  for (int64_t b = begin; b < end; ++b) {
    const scalar_t* row = gates + b * 4 * H;
    const scalar_t* __restrict__ i = row + blocks[0] * H;
    const scalar_t* __restrict__ o = row + blocks[1] * H;
    const scalar_t* __restrict__ f = row + blocks[2] * H;
    const scalar_t* __restrict__ g = row + blocks[3] * H;
    const scalar_t* __restrict__ tc = tanh_cell + b * H;
    const scalar_t* __restrict__ cp = c_prev + b * H;
    const scalar_t* __restrict__ dhb = dh + b * H;
    scalar_t* __restrict__ dcb = dc + b * H;
    scalar_t* drow = dgates + b * 4 * H;
    scalar_t* __restrict__ di = drow + blocks[0] * H;
    scalar_t* __restrict__ d_o = drow + blocks[1] * H;
    scalar_t* __restrict__ df = drow + blocks[2] * H;
    scalar_t* __restrict__ dg = drow + blocks[3] * H;
    if (next_gates != nullptr) {  // the cell state's gradient through step t+1's forget gate
      const scalar_t* __restrict__ f_next = next_gates + b * 4 * H + blocks[2] * H;
      for (int64_t j = j0; j < j1; ++j) dcb[j] *= f_next[j];
    }
    for (int64_t j = j0; j < j1; ++j) {
      const scalar_t d = dcb[j] + dhb[j] * o[j] * (scalar_t(1) - tc[j] * tc[j]);
      dcb[j] = d;
      di[j] = d * g[j] * i[j] * (scalar_t(1) - i[j]);
      df[j] = d * cp[j] * f[j] * (scalar_t(1) - f[j]);
      dg[j] = d * i[j] * (scalar_t(1) - g[j] * g[j]);
      d_o[j] = dhb[j] * tc[j] * o[j] * (scalar_t(1) - o[j]);
    }
  }
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void backward_rows_float(
    const float* gates, const float* next_gates, const float* tanh_cell, const float* c_prev, const float* dh,
    float* dc, float* dgates, int64_t begin, int64_t end, int64_t H, const GateBlocks& blocks, int64_t j0,
    int64_t j1) {
  backward_rows<float>(gates, next_gates, tanh_cell, c_prev, dh, dc, dgates, begin, end, H, blocks, j0, j1);
}

template <typename scalar_t>
void backward_step(const scalar_t* gates, const scalar_t* next_gates, const scalar_t* tanh_cell,
                   const scalar_t* c_prev, const scalar_t* dh, scalar_t* dc, scalar_t* dgates, int64_t B,
                   int64_t H, const GateBlocks& blocks) {
  at::parallel_for(0, B, grain_rows(H), [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      backward_rows_float(gates, next_gates, tanh_cell, c_prev, dh, dc, dgates, begin, end, H, blocks, 0, H);
    } else {
      backward_rows<scalar_t>(gates, next_gates, tanh_cell, c_prev, dh, dc, dgates, begin, end, H, blocks, 0, H);
    }
  });
}

// ---- A small float LSTM's steps on raw pointers, on two threads where there are two
//
// A small LSTM's step (batch 8, hidden 128: an [8, 128]·[128, 512] product and the activations
// of 4,096 gates, ~7 µs on one core) is too small for a parallel_for per op: forking and joining
// the pool each call cost what the split saved (session 4). Here the two threads are forked once
// per call and each owns half of the hidden units for every step: those units' columns of each
// gate block in the product, their gates, cell and output elements (backward: their columns of
// dh, their dc and gate gradients). They meet at a spin barrier once per step, when the step's h
// (backward: dgates) is whole, because the next step's product reads all of it. Per element the
// arithmetic is the ATen-based loops' below, so the results are the same bit for bit. torch's
// own nn.LSTM (oneDNN's RNN) also splits each step across the threads it has. With one thread
// the same loop runs alone over all the hidden units: no per-step tensor views or dispatcher
// calls (~0.5 µs each, ~120 of them a layer's forward and backward).

// Whether the pointer loops run: float, small_gemm.h usable and a small step (below
// kSmallStepMacs, no packed weight), whole 16-float vectors in each half of the hidden units,
// at least one step, torch's pool OpenMP, and GRADHEALTH_SPLIT_STEPS not 0 (the benchmarks' and
// tests' switch to the ATen-based loops).
bool pointer_steps_usable(const at::Tensor& gates, int64_t H, bool packed) {
#if AT_PARALLEL_OPENMP
  const char* flag = std::getenv("GRADHEALTH_SPLIT_STEPS");
  if (flag != nullptr && std::strcmp(flag, "0") == 0) return false;
  const int64_t T = gates.size(0), B = gates.size(1);
  return !packed && T > 0 && gates.scalar_type() == at::kFloat && H % 32 == 0 && B * H * 4 * H < kSmallStepMacs &&
         small_gemm_usable();
#else
  // other pools may run both halves' tasks on one thread, one after the other: the barrier
  // would wait forever
  return false;
#endif
}

// Whether they split each step across two threads now (parallel_for's own condition).
bool steps_split(const at::Tensor& gates, int64_t H, bool packed) {
  return pointer_steps_usable(gates, H, packed) && at::get_num_threads() >= 2 && !at::in_parallel_region();
}

// body(j0, j1, barrier) on two threads of the pool, one with hidden units [0, H/2), the other
// [H/2, H), both given the barrier; where the pool gives a single thread, on it alone with all
// of [0, H) and no barrier (nullptr).
template <typename Body>
void on_two_threads(int64_t H, const Body& body) {
  gradhealth::SpinBarrier barrier(2);
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    const int64_t half = H / 2;
    if (end - begin == 2) {
      body(int64_t{0}, H, static_cast<gradhealth::SpinBarrier*>(nullptr));
    } else {
      body(begin * half, (begin + 1) * half, &barrier);
    }
  });
}

// lstm_forward's loop (gates: the projection, overwritten with the activated gates), h0 and c0
// contiguous [B, H], Rt = Rᵀ [H, 4H] row-major.
void lstm_forward_small(float* gates, const float* Rt, const float* h0, const float* c0, float* cell,
                        float* tanh_cell, float* y, int64_t T, int64_t B, int64_t H, const GateBlocks& blocks) {
  const int64_t G = 4 * H, step = B * H;
  on_two_threads(H, [&](int64_t j0, int64_t j1, gradhealth::SpinBarrier* barrier) {
    for (int64_t t = 0; t < T; ++t) {
      float* g = gates + t * B * G;
      const float* h = t == 0 ? h0 : y + (t - 1) * step;
      for (int64_t k = 0; k < 4; ++k) {  // this thread's columns of each gate block
        const int64_t col = k * H + j0;
        const gradhealth::small_gemm::Operands p{h, H, Rt + col, H, j1 - j0, G, g + col, G, g + col, G};
        small_gemm_run(p, B);
      }
      const float* c_prev = t == 0 ? c0 : cell + (t - 1) * step;
      forward_rows_float(g, c_prev, cell + t * step, tanh_cell + t * step, y + t * step, 0, B, H, blocks, j0, j1);
      if (barrier != nullptr) barrier->wait();
    }
  });
}

// lstm_backward's loop: dY contiguous [T, B, H]; dhidden [T, B, H] with its last step already
// dY[T-1] + dh_last; dc [B, H] holding dc_last (updated in place to dc_0); R [4H, H] row-major.
void lstm_backward_small(const float* gates, const float* cells, const float* tanh_cells, const float* c0,
                         const float* R, const float* dY, float* dhidden, float* dc, float* dgates, int64_t T,
                         int64_t B, int64_t H, const GateBlocks& blocks) {
  const int64_t G = 4 * H, step = B * H;
  on_two_threads(H, [&](int64_t j0, int64_t j1, gradhealth::SpinBarrier* barrier) {
    for (int64_t t = T - 1; t >= 0; --t) {
      float* dh = dhidden + t * step;
      if (t < T - 1) {  // this thread's columns of dh_t = dy_t + dgates_{t+1}·R
        const gradhealth::small_gemm::Operands p{dgates + (t + 1) * B * G, G, R + j0, G, j1 - j0, H,
                                                 dY + t * step + j0,       H, dh + j0, H};
        small_gemm_run(p, B);
      }
      const float* next = t == T - 1 ? nullptr : gates + (t + 1) * B * G;
      const float* c_prev = t == 0 ? c0 : cells + (t - 1) * step;
      backward_rows_float(gates + t * B * G, next, tanh_cells + t * step, c_prev, dh, dc, dgates + t * B * G, 0, B,
                          H, blocks, j0, j1);
      if (barrier != nullptr) barrier->wait();
    }
  });
}

// h's values after DynamicQuantizeLinear (uint8, one scale for the tensor) and back: what a
// dynamically quantised LSTM's recurrent product reads (onnx/ops/integer.py's
// dynamic_quantization, then (q - zero point)·scale). The same float32 operations in the same
// order, rounding half to even, so the values equal the Python loop's bit for bit. A NaN
// anywhere makes every value NaN, as there (h = o·tanh(c) is never infinite).
template <typename scalar_t>
void dynamically_dequantized(const scalar_t* h, scalar_t* out, int64_t n) {
  float low = 0.f, high = 0.f;  // the range widened to include 0
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(h[i]);
    nan |= std::isnan(v);
    low = std::min(low, v);
    high = std::max(high, v);
  }
  if (nan) {
    std::fill(out, out + n, std::numeric_limits<scalar_t>::quiet_NaN());
    return;
  }
  const float span = high - low;
  const float scale = span == 0.f ? 1.f : span / 255.f;
  const float zero_point = std::nearbyint(std::clamp(0.f - low / scale, 0.f, 255.f));
  for (int64_t i = 0; i < n; ++i) {
    const float q = std::clamp(std::nearbyint(static_cast<float>(h[i]) / scale) + zero_point, 0.f, 255.f);
    out[i] = static_cast<scalar_t>((q - zero_point) * scale);
  }
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
// packed_R: R packed for oneDNN (h·Rᵀ per step through oneDNN), or None for addmm.
// quantized_read [T + 1, B, H] (a dynamically quantised LSTM, onnx/ops/recurrent.py
// QUANTIZED_STATE): each step's product reads h_{t-1} quantised to uint8 and back, written to
// row t (the last row is left as it is), from which the backward takes R's gradient.
std::vector<at::Tensor> lstm_forward(at::Tensor projected, const at::Tensor& R, const at::Tensor& h0,
                                     const at::Tensor& c0, const std::vector<int64_t>& gate_blocks,
                                     const std::optional<at::Tensor>& packed_R,
                                     const std::optional<at::Tensor>& quantized_read) {
  const GateBlocks blocks = check_blocks(gate_blocks);
  check_inputs(projected, R, h0, c0);
  const int64_t T = projected.size(0), B = projected.size(1), H = R.size(1);
  if (quantized_read.has_value()) {
    TORCH_CHECK(quantized_read->sizes() == at::IntArrayRef({T + 1, B, H}) && quantized_read->is_contiguous() &&
                    quantized_read->scalar_type() == projected.scalar_type(),
                "quantized_read: a contiguous [T + 1, B, H] tensor of the gates' dtype");
  }
  at::Tensor cells = at::empty({T, B, H}, projected.options());
  at::Tensor tanh_cells = at::empty({T, B, H}, projected.options());
  at::Tensor Y = at::empty({T, B, H}, projected.options());
  const at::Tensor Rt = packed_R.has_value() ? R : transposed(R);
  const at::Tensor c0c = c0.contiguous();
  // the two-thread loops split h's units between the threads; quantising h needs all of it
  // (its range) before either thread's product: those steps run on the ATen-based loop below
  if (!quantized_read.has_value() && pointer_steps_usable(projected, H, packed_R.has_value())) {
    const at::Tensor h0c = h0.contiguous();
    lstm_forward_small(projected.mutable_data_ptr<float>(), Rt.const_data_ptr<float>(), h0c.const_data_ptr<float>(),
                       c0c.const_data_ptr<float>(), cells.mutable_data_ptr<float>(),
                       tanh_cells.mutable_data_ptr<float>(), Y.mutable_data_ptr<float>(), T, B, H, blocks);
    return {projected, cells, tanh_cells, Y};
  }
  // per-step views made once (each select is a dispatcher call)
  std::vector<at::Tensor> pre_t = projected.unbind(0), y_t = Y.unbind(0);
  std::vector<at::Tensor> read_t = quantized_read.has_value() ? quantized_read->unbind(0) : std::vector<at::Tensor>{};
  const at::Tensor h0c = h0.contiguous();
  AT_DISPATCH_FLOATING_TYPES(projected.scalar_type(), "lstm_forward", [&] {
    const int64_t gate_step = B * 4 * H, step = B * H;
    scalar_t* gates = projected.mutable_data_ptr<scalar_t>();
    scalar_t* cell = cells.mutable_data_ptr<scalar_t>();
    scalar_t* tanh_cell = tanh_cells.mutable_data_ptr<scalar_t>();
    scalar_t* y = Y.mutable_data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t) {
      const at::Tensor& h = t == 0 ? h0c : y_t[t - 1];
      if (read_t.empty()) {
        step_product(pre_t[t], pre_t[t], h, Rt, packed_R);
      } else {  // the product reads h rounded; the rounded values are kept for R's gradient
        dynamically_dequantized(h.const_data_ptr<scalar_t>(), read_t[t].mutable_data_ptr<scalar_t>(), step);
        step_product(pre_t[t], pre_t[t], read_t[t], Rt, packed_R);
      }
      const scalar_t* c_prev = t == 0 ? c0c.const_data_ptr<scalar_t>() : cell + (t - 1) * step;
      forward_step<scalar_t>(gates + t * gate_step, c_prev, cell + t * step, tanh_cell + t * step,
                             y + t * step, B, H, blocks);
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
                                      const std::vector<int64_t>& gate_blocks,
                                      const std::optional<at::Tensor>& packed_Rt) {
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
  if (pointer_steps_usable(gates, H, packed_Rt.has_value())) {
    at::Tensor dh_last_step = dhidden[T - 1];
    at::add_out(dh_last_step, dYc[T - 1], dh_last);
    lstm_backward_small(gates.const_data_ptr<float>(), cells.const_data_ptr<float>(),
                        tanh_cells.const_data_ptr<float>(), c0c.const_data_ptr<float>(), Rc.const_data_ptr<float>(),
                        dYc.const_data_ptr<float>(), dhidden.mutable_data_ptr<float>(), dc.mutable_data_ptr<float>(),
                        dgates.mutable_data_ptr<float>(), T, B, H, blocks);
  } else {
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
        step_product(dh_t[t], dy_t[t], dgates_t[t + 1], Rc, packed_Rt);
      }
      const scalar_t* next = t == T - 1 ? nullptr : gate + (t + 1) * gate_step;
      const scalar_t* c_prev = t == 0 ? c0c.const_data_ptr<scalar_t>() : cell + (t - 1) * step;
      backward_step<scalar_t>(gate + t * gate_step, next, tanh_cell + t * step, c_prev, dh + t * step,
                              dc.mutable_data_ptr<scalar_t>(), dgate + t * gate_step, B, H, blocks);
    }
  });
  }
  const at::Tensor f0 = gates.select(0, 0).narrow(1, blocks[2] * H, H);
  return {dgates, dhidden, dc * f0};
}

// ---- GRU (linear_before_reset=1) and tanh RNN: the loops of gru_sequence.py and rnn_sequence.py,
// the same way as the LSTM's above (one row-major product per step, activations through torch,
// the rest as loops over the batch rows), so these too return the gradient reaching every step's
// hidden state.
//
// GRU gates are in ONNX order z, r, n. Per step, with fh = h·Rᵀ + [0, 0, Rb_n] (one product for
// all three gates; its n block is kept because the backward needs it):
//     z, r = σ(projected_zr + fh_zr);  n = tanh(projected_n + r ⊙ fh_n);  h' = n + z ⊙ (h − n)

namespace {

void check_recurrent(const at::Tensor& projected, const at::Tensor& R, const at::Tensor& h0, int64_t gates,
                     const char* what) {
  TORCH_CHECK(projected.device().is_cpu(), what, ": recurrent_cpu runs on CPU tensors");
  const int64_t H = R.size(1);
  TORCH_CHECK(projected.dim() == 3 && projected.is_contiguous() && projected.size(2) == gates * H, what,
              ": a contiguous [T, B, ", gates, "H] tensor expected");
  TORCH_CHECK(R.dim() == 2 && R.size(0) == gates * H, what, ": R must be [", gates, "H, H]");
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == projected.size(1) && h0.size(1) == H, what, ": h0 must be [B, H]");
  TORCH_CHECK(R.scalar_type() == projected.scalar_type() && h0.scalar_type() == projected.scalar_type(), what,
              ": every tensor must have the same dtype");
}

// z, r pre-activations of one step: projected_zr + fh_zr, in place over projected's z, r blocks.
template <typename scalar_t>
void gru_add_zr(scalar_t* gates, const scalar_t* fh, int64_t B, int64_t H) {
  at::parallel_for(0, B, grain_rows(H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      scalar_t* g = gates + b * 3 * H;
      const scalar_t* f = fh + b * 3 * H;
      for (int64_t j = 0; j < 2 * H; ++j) g[j] += f[j];
    }
  });
}

// n's pre-activation: projected_n + r ⊙ fh_n, in place over projected's n block.
template <typename scalar_t>
void gru_add_n(scalar_t* gates, const scalar_t* fh, int64_t B, int64_t H) {
  at::parallel_for(0, B, grain_rows(H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      scalar_t* g = gates + b * 3 * H;
      const scalar_t* r = g + H;
      scalar_t* n = g + 2 * H;
      const scalar_t* fn = fh + b * 3 * H + 2 * H;
      for (int64_t j = 0; j < H; ++j) n[j] += r[j] * fn[j];
    }
  });
}

template <typename scalar_t>
void gru_hidden(const scalar_t* gates, const scalar_t* h_prev, scalar_t* y, int64_t B, int64_t H) {
  at::parallel_for(0, B, grain_rows(H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* z = gates + b * 3 * H;
      const scalar_t* n = z + 2 * H;
      const scalar_t* hp = h_prev + b * H;
      scalar_t* yb = y + b * H;
      for (int64_t j = 0; j < H; ++j) yb[j] = n[j] + z[j] * (hp[j] - n[j]);
    }
  });
}

// One GRU backward step. dh holds dy_t + (step t+1's gradient through R) on entry; the z ⊙ h
// term of step t+1 is added here (dh ← dh + dh_{t+1} ⊙ z_{t+1}) and kept, then the four gradient
// slots of step t, each dh times a factor of the forward's values: z, r, r ⊙ ∂n (the gradient
// of fh_n) and n. The first three are the gradient of fh (R's side), slots z, r, n of W's side.
template <typename scalar_t>
void gru_backward_step(const scalar_t* gates, const scalar_t* fh, const scalar_t* h_prev,
                       const scalar_t* next_gates, const scalar_t* dh_next, scalar_t* dh, scalar_t* dgates,
                       int64_t B, int64_t H) {
  at::parallel_for(0, B, grain_rows(H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* z = gates + b * 3 * H;
      const scalar_t* r = z + H;
      const scalar_t* n = z + 2 * H;
      const scalar_t* fn = fh + b * 3 * H + 2 * H;
      const scalar_t* hp = h_prev + b * H;
      const scalar_t* z_next = next_gates == nullptr ? nullptr : next_gates + b * 3 * H;
      const scalar_t* dhn = dh_next == nullptr ? nullptr : dh_next + b * H;
      scalar_t* dhb = dh + b * H;
      scalar_t* dz = dgates + b * 4 * H;
      scalar_t* dr = dz + H;
      scalar_t* dfn = dz + 2 * H;
      scalar_t* dn = dz + 3 * H;
      for (int64_t j = 0; j < H; ++j) {
        const scalar_t d = z_next == nullptr ? dhb[j] : dhb[j] + dhn[j] * z_next[j];
        dhb[j] = d;
        const scalar_t d_n = d * (scalar_t(1) - z[j]) * (scalar_t(1) - n[j] * n[j]);
        dz[j] = d * (hp[j] - n[j]) * z[j] * (scalar_t(1) - z[j]);
        dn[j] = d_n;
        dfn[j] = d_n * r[j];
        dr[j] = d_n * fn[j] * r[j] * (scalar_t(1) - r[j]);
      }
    }
  });
}

template <typename scalar_t>
void tanh_backward_step(const scalar_t* y, const scalar_t* dh, scalar_t* dpre, int64_t n) {
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) dpre[j] = dh[j] * (scalar_t(1) - y[j] * y[j]);
  });
}

}  // namespace

// projected [T, B, 3H]: x_t·Wᵀ + Wb + [Rb_z, Rb_r, 0] for every step (contiguous; overwritten
// with the activated gates z, r, n). R [3H, H], recurrent_bias [3H] ([0, 0, Rb_n]), h0 [B, H].
// Returns (gates, fh = h_{t-1}·Rᵀ + recurrent_bias [T, B, 3H], Y [T, B, H]).
std::vector<at::Tensor> gru_forward(at::Tensor projected, const at::Tensor& R, const at::Tensor& recurrent_bias,
                                    const at::Tensor& h0, const std::optional<at::Tensor>& packed_R) {
  check_recurrent(projected, R, h0, 3, "gru_forward");
  const int64_t T = projected.size(0), B = projected.size(1), H = R.size(1);
  TORCH_CHECK(recurrent_bias.dim() == 1 && recurrent_bias.size(0) == 3 * H, "gru_forward: recurrent_bias [3H]");
  at::Tensor from_hidden = at::empty_like(projected);
  at::Tensor Y = at::empty({T, B, H}, projected.options());
  const at::Tensor Rt = packed_R.has_value() ? R : transposed(R);
  const at::Tensor h0c = h0.contiguous();
  // oneDNN adds a [B, 3H] operand, not a broadcast row
  const at::Tensor bias_rows =
      packed_R.has_value() ? recurrent_bias.expand({B, 3 * H}).contiguous() : recurrent_bias;
  std::vector<at::Tensor> pre_t = projected.unbind(0), fh_t = from_hidden.unbind(0), y_t = Y.unbind(0);
  AT_DISPATCH_FLOATING_TYPES(projected.scalar_type(), "gru_forward", [&] {
    const int64_t gate_step = B * 3 * H, step = B * H;
    scalar_t* gates = projected.mutable_data_ptr<scalar_t>();
    const scalar_t* fh = from_hidden.const_data_ptr<scalar_t>();
    scalar_t* y = Y.mutable_data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t) {
      const at::Tensor& h_prev = t == 0 ? h0c : y_t[t - 1];
      step_product(fh_t[t], bias_rows, h_prev, Rt, packed_R);
      gru_add_zr<scalar_t>(gates + t * gate_step, fh + t * gate_step, B, H);
      pre_t[t].narrow(1, 0, 2 * H).sigmoid_();
      gru_add_n<scalar_t>(gates + t * gate_step, fh + t * gate_step, B, H);
      pre_t[t].narrow(1, 2 * H, H).tanh_();
      gru_hidden<scalar_t>(gates + t * gate_step, h_prev.const_data_ptr<scalar_t>(), y + t * step, B, H);
    }
  });
  return {projected, from_hidden, Y};
}

// Backward through time from dY [T, B, H] and dh_last [B, H]. Returns (dgates [T, B, 4H], slots
// z, r, fh_n, n: its first 3H are ∂L/∂fh, its z, r, n slots ∂L/∂projected; dhidden [T, B, H]:
// ∂L/∂h_t through Y and through the recurrence). ∂L/∂h0 is left to the caller (one product).
std::vector<at::Tensor> gru_backward(const at::Tensor& dY, const at::Tensor& dh_last, const at::Tensor& gates,
                                     const at::Tensor& from_hidden, const at::Tensor& h0, const at::Tensor& Y,
                                     const at::Tensor& R, const std::optional<at::Tensor>& packed_Rt) {
  check_recurrent(gates, R, h0, 3, "gru_backward");
  TORCH_CHECK(from_hidden.sizes() == gates.sizes() && from_hidden.is_contiguous() && Y.is_contiguous(),
              "gru_backward: from_hidden [T, B, 3H] and Y [T, B, H], contiguous");
  const int64_t T = gates.size(0), B = gates.size(1), H = R.size(1);
  const at::Tensor dYc = dY.contiguous();
  at::Tensor dgates = at::empty({T, B, 4 * H}, gates.options());
  at::Tensor dhidden = at::empty({T, B, H}, gates.options());
  const at::Tensor h0c = h0.contiguous();
  const at::Tensor Rc = R.contiguous();
  // the gradient of fh: a [B, 3H] view with rows 4H apart, which MKL reads in place (row-major)
  const at::Tensor d_from_hidden = dgates.narrow(2, 0, 3 * H);
  std::vector<at::Tensor> dh_t = dhidden.unbind(0), dy_t = dYc.unbind(0), dfh_t = d_from_hidden.unbind(0);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "gru_backward", [&] {
    const int64_t gate_step = B * 3 * H, step = B * H;
    const scalar_t* gate = gates.const_data_ptr<scalar_t>();
    const scalar_t* fh = from_hidden.const_data_ptr<scalar_t>();
    const scalar_t* y = Y.const_data_ptr<scalar_t>();
    scalar_t* dgate = dgates.mutable_data_ptr<scalar_t>();
    scalar_t* dh = dhidden.mutable_data_ptr<scalar_t>();
    for (int64_t t = T - 1; t >= 0; --t) {
      const bool last = t == T - 1;
      if (last) {
        at::add_out(dh_t[t], dy_t[t], dh_last);
      } else {
        step_product(dh_t[t], dy_t[t], dfh_t[t + 1], Rc, packed_Rt);
      }
      const scalar_t* h_prev = t == 0 ? h0c.const_data_ptr<scalar_t>() : y + (t - 1) * step;
      gru_backward_step<scalar_t>(gate + t * gate_step, fh + t * gate_step, h_prev,
                                  last ? nullptr : gate + (t + 1) * gate_step, last ? nullptr : dh + (t + 1) * step,
                                  dh + t * step, dgate + t * 4 * step, B, H);
    }
  });
  return {dgates, dhidden};
}

// projected [T, B, H]: x_t·Wᵀ + b for every step (contiguous; overwritten with Y, each step
// h_t = tanh(projected_t + h_{t-1}·Rᵀ)). R [H, H], h0 [B, H]. Returns Y [T, B, H].
at::Tensor rnn_forward(at::Tensor projected, const at::Tensor& R, const at::Tensor& h0,
                       const std::optional<at::Tensor>& packed_R) {
  check_recurrent(projected, R, h0, 1, "rnn_forward");
  const at::Tensor Rt = packed_R.has_value() ? R : transposed(R);
  std::vector<at::Tensor> y_t = projected.unbind(0);
  for (size_t t = 0; t < y_t.size(); ++t) {
    step_product(y_t[t], y_t[t], t == 0 ? h0 : y_t[t - 1], Rt, packed_R);
    y_t[t].tanh_();
  }
  return projected;
}

// Backward through time from dY [T, B, H] and dh_last [B, H]. Returns (dpre [T, B, H]: ∂L/∂ of
// each step's pre-activation, dhidden [T, B, H]: ∂L/∂h_t through Y and through the recurrence).
std::vector<at::Tensor> rnn_backward(const at::Tensor& dY, const at::Tensor& dh_last, const at::Tensor& Y,
                                     const at::Tensor& R, const std::optional<at::Tensor>& packed_Rt) {
  check_recurrent(Y, R, dh_last, 1, "rnn_backward");
  const int64_t T = Y.size(0), B = Y.size(1), H = R.size(1);
  const at::Tensor dYc = dY.contiguous();
  at::Tensor dpre = at::empty_like(Y);
  at::Tensor dhidden = at::empty_like(Y);
  const at::Tensor Rc = R.contiguous();
  std::vector<at::Tensor> dh_t = dhidden.unbind(0), dy_t = dYc.unbind(0), dpre_t = dpre.unbind(0);
  AT_DISPATCH_FLOATING_TYPES(Y.scalar_type(), "rnn_backward", [&] {
    const int64_t step = B * H;
    const scalar_t* y = Y.const_data_ptr<scalar_t>();
    const scalar_t* dh = dhidden.const_data_ptr<scalar_t>();
    scalar_t* dp = dpre.mutable_data_ptr<scalar_t>();
    for (int64_t t = T - 1; t >= 0; --t) {
      if (t == T - 1) {
        at::add_out(dh_t[t], dy_t[t], dh_last);
      } else {
        step_product(dh_t[t], dy_t[t], dpre_t[t + 1], Rc, packed_Rt);
      }
      tanh_backward_step<scalar_t>(y + t * step, dh + t * step, dp + t * step, step);
    }
  });
  return {dpre, dhidden};
}

// other + x·w through small_gemm.h where it applies (see small_step_product), else addmm: the
// tests compare it with torch's product over shapes, strides and tails
at::Tensor small_gemm_product(const at::Tensor& x, const at::Tensor& w, const at::Tensor& other) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && other.dim() == 2, "small_gemm_product: 2-D operands");
  at::Tensor out = at::empty_like(other);
  step_product(out, other, x, w, std::nullopt);
  return out;
}

// activations.h's sigmoid and tanh over a float tensor (what the loops use; tests measure
// their error against torch's over the whole float range).
std::vector<at::Tensor> activations(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "activations: a CPU float tensor");
  const at::Tensor source = x.contiguous();
  at::Tensor sig = at::empty_like(source), tanh = at::empty_like(source);
  const float* in = source.const_data_ptr<float>();
  float* s = sig.mutable_data_ptr<float>();
  float* t = tanh.mutable_data_ptr<float>();
  for (int64_t k = 0; k < source.numel(); ++k) {
    s[k] = gradhealth::sigmoid(in[k]);
    t[k] = gradhealth::tanh(in[k]);
  }
  return {sig, tanh};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  // the packed weights are optional, last and keyword-able: None means addmm (MKL)
  m.doc() = "gradhealth's recurrent loops on the CPU (see recurrent_cpu.cpp)";
  m.def("activations", &activations, "activations.h's (sigmoid, tanh) of a float tensor");
  m.def("small_gemm_product", &small_gemm_product, "other + x·w as the loops compute a step's product");
  m.def("small_gemm_usable", &small_gemm_usable, "whether small_gemm.h runs on this CPU");
  m.def("small_gemm_level", &small_gemm_level, "small_gemm.h's build that runs: 2 AVX-512, 1 AVX2, 0 none");
  m.def(
      "parallel_tasks",
      [] {
        std::atomic<int> tasks{0};
        at::parallel_for(0, 2, 1, [&](int64_t, int64_t) { tasks.fetch_add(1); });
        return tasks.load();
      },
      "how many tasks at::parallel_for(0, 2, 1) runs in this extension: 2 with two threads (1 if it "
      "was compiled without OpenMP, whose pragma is in that header template)");
  m.def(
      "split_steps_usable",
      [](int64_t batch, int64_t hidden) {
        return steps_split(at::empty({1, batch, 4 * hidden}, at::kFloat), hidden, false);
      },
      "whether a float LSTM of this batch and hidden size runs its steps on two threads now",
      py::arg("batch"), py::arg("hidden"));
  m.def("lstm_forward", &lstm_forward, "LSTM forward over a whole sequence, step by step", py::arg("projected"),
        py::arg("R"), py::arg("h0"), py::arg("c0"), py::arg("gate_blocks"), py::arg("packed_R") = py::none(),
        py::arg("quantized_read") = py::none());
  m.def("lstm_backward", &lstm_backward, "LSTM backward through time, step by step", py::arg("dY"),
        py::arg("dh_last"), py::arg("dc_last"), py::arg("gates"), py::arg("cells"), py::arg("tanh_cells"),
        py::arg("c0"), py::arg("R"), py::arg("gate_blocks"), py::arg("packed_Rt") = py::none());
  m.def("gru_forward", &gru_forward, "GRU (linear_before_reset=1) forward over a whole sequence, step by step",
        py::arg("projected"), py::arg("R"), py::arg("recurrent_bias"), py::arg("h0"),
        py::arg("packed_R") = py::none());
  m.def("gru_backward", &gru_backward, "GRU (linear_before_reset=1) backward through time, step by step",
        py::arg("dY"), py::arg("dh_last"), py::arg("gates"), py::arg("from_hidden"), py::arg("h0"), py::arg("Y"),
        py::arg("R"), py::arg("packed_Rt") = py::none());
  m.def("rnn_forward", &rnn_forward, "tanh RNN forward over a whole sequence, step by step", py::arg("projected"),
        py::arg("R"), py::arg("h0"), py::arg("packed_R") = py::none());
  m.def("rnn_backward", &rnn_backward, "tanh RNN backward through time, step by step", py::arg("dY"),
        py::arg("dh_last"), py::arg("Y"), py::arg("R"), py::arg("packed_Rt") = py::none());
}

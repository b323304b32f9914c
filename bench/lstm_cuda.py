"""Where the time of the unrolled LSTM goes on CUDA, and what replaying its loops as CUDA graphs
would save: an experiment that decides whether the converter should capture them.

    python bench/lstm_cuda.py [--repeats 30]

One LSTM layer (ONNX gate order, the converter's `lstm_sequence`) against torch's cuDNN
`nn.LSTM` on the same weights, forward+backward, and a prototype of the same loops (one product
+ torch's fused cell kernel per step) captured once into a CUDA graph per direction of the pass
and replayed. Prints medians and ratios against cuDNN; checks the graphed outputs and gradients
against the eager ones first. Needs a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable

import torch
from torch import Tensor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from service.engine.onnx.ops.lstm_sequence import lstm_sequence

cell_forward = torch.ops.aten._thnn_fused_lstm_cell
cell_backward = torch.ops.aten._thnn_fused_lstm_cell_backward_impl


class GraphedLSTM:
    """Forward and backward loops of one layer (torch gate order) captured as CUDA graphs."""

    def __init__(self, steps: int, batch: int, hidden: int, device: torch.device) -> None:
        def empty(*shape: int) -> Tensor:
            return torch.zeros(*shape, device=device)

        self.proj, self.R = empty(steps, batch, 4 * hidden), empty(4 * hidden, hidden)
        self.h0, self.c0 = empty(batch, hidden), empty(batch, hidden)
        self.dY, self.dh, self.dc = (
            empty(steps, batch, hidden),
            empty(batch, hidden),
            empty(batch, hidden),
        )
        self.steps = steps
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside capture (cuBLAS handles, workspaces)
            for _ in range(2):
                self._forward()
                self._backward(self.cells, self.work)
        torch.cuda.current_stream().wait_stream(stream)
        self.fwd_graph, self.bwd_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.fwd_graph):
            self._forward()
        with torch.cuda.graph(self.bwd_graph):
            self._backward(self.cells, self.work)

    def _forward(self) -> None:
        h, c = self.h0, self.c0
        hs, cs, ws = [], [], []
        R_t = self.R.t()
        for t in range(self.steps):
            h, c, w = cell_forward(self.proj[t], torch.mm(h, R_t), c)
            hs.append(h)
            cs.append(c)
            ws.append(w)
        self.Y, self.cells, self.work = torch.stack(hs), cs, ws

    def _backward(self, cells: list[Tensor], work: list[Tensor]) -> None:
        dgates: list[Tensor] = [self.dY[0]] * self.steps
        dc = self.dc
        for t in range(self.steps - 1, -1, -1):
            last = t == self.steps - 1
            dh = self.dY[t] + self.dh if last else torch.addmm(self.dY[t], dgates[t + 1], self.R)
            prev = cells[t - 1] if t > 0 else self.c0
            dgates[t], dc, _ = cell_backward(dh, dc, prev, cells[t], work[t], False)
        self.dgates, self.dc0 = torch.stack(dgates), dc

    def forward(self, proj: Tensor, R: Tensor, h0: Tensor, c0: Tensor) -> Tensor:
        for static, value in ((self.proj, proj), (self.R, R), (self.h0, h0), (self.c0, c0)):
            static.copy_(value)
        self.fwd_graph.replay()
        return self.Y.clone()

    def backward(self, dY: Tensor) -> tuple[Tensor, Tensor]:
        self.dY.copy_(dY)
        self.dh.zero_()
        self.dc.zero_()
        self.bwd_graph.replay()
        return self.dgates.clone(), self.dc0.clone()


def _discard(_: object) -> None:
    pass


def _median_ms(fn: Callable[[], None], repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run(steps: int, batch: int, inputs: int, hidden: int, repeats: int) -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(inputs, hidden).to(device)
    x = torch.randn(steps, batch, inputs, device=device)
    # ONNX order i, o, f, c from torch's i, f, g, o
    order = torch.cat([torch.arange(b * hidden, (b + 1) * hidden) for b in (0, 3, 1, 2)]).to(device)
    W = lstm.weight_ih_l0.detach()[order].clone().requires_grad_(True)
    R = lstm.weight_hh_l0.detach()[order].clone().requires_grad_(True)
    b = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach()[order].clone().requires_grad_(True)
    zeros = torch.zeros(batch, hidden, device=device)

    def cudnn() -> None:
        lstm.zero_grad(set_to_none=True)
        lstm(x)[0].square().mean().backward()

    def eager() -> None:
        W.grad = R.grad = b.grad = None
        lstm_sequence(x, W, R, b, zeros, zeros)[0].square().mean().backward()

    graphed = GraphedLSTM(steps, batch, hidden, device)
    W_t, R_t, b_t = (lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0)

    def replayed() -> tuple[Tensor, Tensor]:
        proj = torch.nn.functional.linear(x, W_t, b_t).detach()
        Y = graphed.forward(proj, R_t.detach(), zeros, zeros)
        dY = 2 * Y / Y.numel()
        dgates, _ = graphed.backward(dY)
        h_prev = torch.cat([zeros.unsqueeze(0), Y[:-1]], 0).flatten(0, 1)
        dR = dgates.flatten(0, 1).t().mm(h_prev)
        dW = dgates.flatten(0, 1).t().mm(x.flatten(0, 1))
        return dR, dW

    cudnn()
    dR, dW = replayed()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        cudnn()
    err = max(
        float((dR - lstm.weight_hh_l0.grad).abs().max()),
        float((dW - lstm.weight_ih_l0.grad).abs().max()),
    )
    cudnn_ms, eager_ms = _median_ms(cudnn, repeats), _median_ms(eager, repeats)
    graph_ms = _median_ms(lambda: _discard(replayed()), repeats)
    print(
        f"T={steps} B={batch} {inputs}->{hidden}: cuDNN {cudnn_ms:.3f} ms | eager fused-cell "
        f"{eager_ms:.3f} ms ({eager_ms / cudnn_ms:.2f}x) | graphed {graph_ms:.3f} ms "
        f"({graph_ms / cudnn_ms:.2f}x) | graphed grads vs cuDNN max abs diff {err:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    run(24, 8, 64, 128, args.repeats)
    run(50, 32, 128, 512, args.repeats)
    run(100, 64, 256, 512, args.repeats)


if __name__ == "__main__":
    main()

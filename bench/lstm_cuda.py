"""The converter's CUDA LSTM against cuDNN: per-step loops eager, replayed as CUDA graphs, and
as persistent Triton kernels.

    python bench/lstm_cuda.py [--repeats 30]

One LSTM layer in ONNX gate order through the converter's `lstm_sequence` against torch's
cuDNN `nn.LSTM` on the same weights, forward+backward, median of CUDA-event timings, three
ways: the per-step loops (one product and torch's fused cell kernel per step each way,
lstm_fused_cell.py) run eagerly, the same loops replayed as CUDA graphs (lstm_cuda_graphs.py;
captured on the second sight of a shape, so the warm-up captures them), and every step in one
Triton kernel each way (lstm_persistent.py; "n/a" above its MAX_HIDDEN). Checks each way's
weight gradients against cuDNN's (TF32 off) first. Needs a GPU.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from service.engine.onnx.ops import lstm_cuda_graphs, lstm_persistent
from service.engine.onnx.ops.lstm_sequence import lstm_sequence


def _median_ms(fn: Callable[[], None], repeats: int) -> float:
    for _ in range(5):  # warm-up: allocator, cuBLAS, and the graph capture
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

    def converter() -> None:
        W.grad = R.grad = b.grad = None
        lstm_sequence(x, W, R, b, zeros, zeros)[0].square().mean().backward()

    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        cudnn()
    assert lstm.weight_hh_l0.grad is not None
    cudnn_dR = lstm.weight_hh_l0.grad.clone()

    def timed(way: str) -> str:
        """'<ms> ms (<ratio>x, dR err <e>)' for one way of running the loops."""
        graphs, persistent = lstm_cuda_graphs.loops_for, lstm_persistent.loops_for
        if way != "graphs":
            lstm_cuda_graphs.loops_for = lambda *args: None  # type: ignore[assignment]
        if way != "persistent":
            lstm_persistent.loops_for = lambda *args: None  # type: ignore[assignment]
        try:
            torch.cuda.synchronize()
            started = time.perf_counter()
            converter()  # the persistent kernels compile here (cached on disk afterwards)
            torch.cuda.synchronize()
            first_s = time.perf_counter() - started
            converter()  # second sight of the shape: the graphs are captured
            assert R.grad is not None
            err = float((R.grad[order.argsort()] - cudnn_dR).abs().max())
            ms = _median_ms(converter, repeats)
        finally:
            lstm_cuda_graphs.loops_for, lstm_persistent.loops_for = graphs, persistent
        return f"{way} {ms:.3f} ms ({ms / cudnn_ms:.2f}x, dR err {err:.0e}, first {first_s:.2f} s)"

    cudnn_ms = _median_ms(cudnn, repeats)
    ways = ["eager", "graphs"]
    if lstm_persistent.loops_for(x.new_empty(1, 1, 4 * hidden)) is not None:
        ways.append("persistent")
    results = " | ".join(timed(way) for way in ways)
    if "persistent" not in ways:
        why = "above MAX_HIDDEN" if hidden > lstm_persistent.MAX_HIDDEN else "see the warning"
        results += f" | persistent n/a ({why})"
    print(f"T={steps} B={batch} {inputs}->{hidden}: cuDNN {cudnn_ms:.3f} ms | {results}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--tf32x3", action="store_true", help="persistent kernels' products as tf32x3, not ieee"
    )
    args = parser.parse_args()
    if args.tf32x3:
        lstm_persistent.PRODUCT_PRECISION = "tf32x3"
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    triton = lstm_persistent.kernels()
    version = getattr(getattr(triton, "triton", None), "__version__", None)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, triton {version}")
    run(24, 8, 64, 128, args.repeats)
    run(24, 64, 64, 128, args.repeats)
    run(50, 32, 128, 256, args.repeats)
    run(50, 32, 128, 512, args.repeats)
    run(100, 64, 256, 512, args.repeats)


if __name__ == "__main__":
    main()

"""The converter's CUDA LSTM against cuDNN: per-step loops eager, replayed as CUDA graphs, and
as persistent Triton kernels.

    python bench/lstm_cuda.py [--repeats 30]

One LSTM layer in ONNX gate order through the converter's `lstm_sequence` against torch's
cuDNN `nn.LSTM` on the same weights, forward+backward, median of CUDA-event timings, three
ways: the per-step loops (one product and torch's fused cell kernel per step each way,
lstm_fused_cell.py) run eagerly, the same loops replayed as CUDA graphs (cuda_graph_loops.py;
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

from service.engine.onnx.ops import lstm_persistent, recurrent_persistent
from service.engine.onnx.ops.lstm_sequence import lstm_sequence

WAYS = ["eager", "graphs", "persistent"]


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
    weights = dict(lstm.named_parameters())
    W = weights["weight_ih_l0"].detach()[order].clone().requires_grad_(True)
    R = weights["weight_hh_l0"].detach()[order].clone().requires_grad_(True)
    bias = weights["bias_ih_l0"] + weights["bias_hh_l0"]
    b = bias.detach()[order].clone().requires_grad_(True)
    zeros = torch.zeros(batch, hidden, device=device)

    def cudnn() -> None:
        lstm.zero_grad(set_to_none=True)
        lstm(x)[0].square().mean().backward()

    def converter() -> None:
        W.grad = R.grad = b.grad = None
        lstm_sequence(x, W, R, b, zeros, zeros)[0].square().mean().backward()

    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        cudnn()
    dR = weights["weight_hh_l0"].grad
    assert dR is not None
    cudnn_dR = dR.clone()

    def timed(way: str) -> str:
        """'<ms> ms (<ratio>x, dR err <e>)' for one way of running the loops."""
        persistent = lstm_persistent.loops_for
        if way != "graphs":
            os.environ["GRADHEALTH_CUDA_GRAPHS"] = "0"
        if way != "persistent":
            lstm_persistent.loops_for = lambda *args: None
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
            lstm_persistent.loops_for = persistent
            os.environ.pop("GRADHEALTH_CUDA_GRAPHS", None)
        return f"{way} {ms:.3f} ms ({ms / cudnn_ms:.2f}x, dR err {err:.0e}, first {first_s:.2f} s)"

    cudnn_ms = _median_ms(cudnn, repeats)
    ways = [way for way in WAYS if way != "persistent"]
    persistent = lstm_persistent.loops_for(x.new_empty(1, batch, 4 * hidden)) is not None
    if persistent and "persistent" in WAYS:
        ways.append("persistent")
    results = " | ".join(timed(way) for way in ways)
    if persistent and "persistent" in WAYS:
        results += f" | {_kernels_alone(steps, batch, hidden, repeats)}"
    if not persistent and "persistent" in WAYS:
        why = "above MAX_HIDDEN" if hidden > lstm_persistent.MAX_HIDDEN else "see the warning"
        results += f" | persistent n/a ({why}, or more programs than multiprocessors)"
    print(f"T={steps} B={batch} {inputs}->{hidden}: cuDNN {cudnn_ms:.3f} ms | {results}")


def _kernels_alone(steps: int, batch: int, hidden: int, repeats: int) -> str:
    """The two persistent kernels' own time (no autograd, no products around them)."""
    device = torch.device("cuda")
    projected = torch.randn(steps, batch, 4 * hidden, device=device)
    R = torch.randn(4 * hidden, hidden, device=device) * hidden**-0.5
    h0 = c0 = torch.zeros(batch, hidden, device=device)
    dY = torch.randn(steps, batch, hidden, device=device)

    def forward() -> None:
        lstm_persistent.forward_steps(projected, R, h0, c0)

    _, cells, gates = lstm_persistent.forward_steps(projected, R, h0, c0)

    def backward() -> None:
        lstm_persistent.backward_steps(dY, h0, c0, cells, gates, c0, R)

    forward_ms, backward_ms = _median_ms(forward, repeats), _median_ms(backward, repeats)
    return f"kernels alone fwd {forward_ms:.3f} / bwd {backward_ms:.3f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--tf32x3", action="store_true", help="persistent kernels' products as tf32x3, not ieee"
    )
    parser.add_argument("--units", type=int, help="persistent kernels' hidden units per program")
    parser.add_argument("--warps", type=int, help="persistent kernels' warps per program")
    parser.add_argument(
        "--ways", default="eager,graphs,persistent", help="which ways to time besides cuDNN"
    )
    args = parser.parse_args()
    if args.tf32x3:  # the knobs are recurrent_persistent's, shared by the three cells
        recurrent_persistent.PRODUCT_PRECISION = "tf32x3"
    if args.units:
        recurrent_persistent.BLOCK_U = args.units
    recurrent_persistent.NUM_WARPS = args.warps
    global WAYS
    WAYS = args.ways.split(",")
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

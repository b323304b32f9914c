"""Host time per call on CUDA, in µs: what a host-bound step (the small LSTM's) is made of.

    python3 bench/cuda_host_cost.py

A small torch op, a device allocation, lstm_persistent's forward for one step (allocations,
the Rᵀ copy, barrier counters, the launch), the Triton launch alone, and a CUDA graph replay.
Each is called 400 times with one synchronisation at the end: the time is the host's, what a
GPU that waits for the host pays. Needs CUDA and triton (bench/gpu_check.sh runs it).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from service.engine.onnx.ops import lstm_fused_cell, lstm_persistent

CALLS = 400


def host_us(fn: Callable[[], object]) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host / CALLS * 1e6


def main() -> None:
    device = torch.device("cuda")
    batch, hidden = 8, 128
    projected = torch.randn(1, batch, 4 * hidden, device=device)
    R = torch.randn(4 * hidden, hidden, device=device) * 0.05
    h0 = torch.zeros(batch, hidden, device=device)
    c0 = torch.zeros(batch, hidden, device=device)
    assert lstm_fused_cell.available(projected)
    assert lstm_persistent.loops_for(projected) is not None, "persistent kernels unavailable"
    small = torch.zeros(16, device=device)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}; host µs per call")
    print(f"  small torch op (add_)          {host_us(lambda: small.add_(1)):7.1f}")
    zeros = host_us(lambda: torch.zeros(1, dtype=torch.int32, device=device))
    print(f"  torch.zeros(1)                 {zeros:7.1f}")
    forward = host_us(lambda: lstm_persistent.forward_steps(projected, R, h0, c0))
    print(f"  persistent forward, one step   {forward:7.1f}")
    kernels = lstm_persistent.kernels()
    assert kernels is not None
    hiddens = torch.empty(2, batch, hidden, device=device)
    cells = torch.empty(1, batch, hidden, device=device)
    gates = torch.empty_like(projected)
    R_t = R.t().contiguous()
    arrivals = torch.zeros(1, dtype=torch.int32, device=device)
    failures = torch.zeros(1, dtype=torch.int32, device=device)
    grid, tiles = lstm_persistent._grid(batch, hidden), lstm_persistent._tiles(hidden)

    def launch() -> None:
        arrivals.zero_()
        kernels.lstm_forward_kernel[grid](
            projected, R_t, h0, hiddens, c0, cells, gates, arrivals, failures,
            1, batch, hidden, lstm_persistent.SPIN_LIMIT, **tiles,
        )  # fmt: skip

    print(f"  Triton launch + a zero_        {host_us(launch):7.1f}")
    print(f"  zero_ alone                    {host_us(arrivals.zero_):7.1f}")
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        small.add_(1)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        small.add_(1)
    print(f"  CUDA graph replay              {host_us(graph.replay):7.1f}")
    print(f"  barrier failures               {lstm_persistent.barrier_failures(device):7d}")


if __name__ == "__main__":
    main()

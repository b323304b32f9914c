"""Pure tensor functions replayed as CUDA graphs: inputs read where they are, outputs pooled.

What a small LSTM node costs on a GPU is host time: ~30 aten ops each way at ~7 µs, a Triton
launch at ~25 µs and the Python between them, while the GPU idles (bench/README.md, session 10).
A CUDA graph replays a node's whole forward or backward in one launch (2.6-5 µs). The per-step
loops' captures (cuda_graph_loops.py) copy every input into the graph's buffers and clone every
output out of them, ~7 µs of host time per tensor, about what such a replay saves. Here neither:

- An input whose address repeats from one call to the next (a parameter; a saved tensor from a
  pooled forward; what the caching allocator hands out again in a steady loop) is read where
  it is. Its address is part of the capture's key, so a replay reads exactly the tensors this
  call was given. Only the other inputs are copied, into the capture's own buffers.
- Outputs are views of the capture's static outputs. A capture replays only when nothing
  outside holds any of its previous outputs: each output storage's use count is back to what
  the pool alone holds (views, autograd's saved tensors and a stolen `.grad` all count).
  Otherwise another capture of the same function takes the call (up to SLOTS of them), or it
  runs eagerly. A replay never overwrites a tensor somebody still reads.

The functions (`body(config, *inputs)`) must be pure: no in-place writes to their inputs, every
output freshly computed (an output sharing an input's memory refuses the capture), no host
synchronisation. `config` is hashable and part of the key. A function is captured the second
time its key is seen (a shape used once never pays for a capture); where capture fails, that
key runs eagerly from then on. GRADHEALTH_CUDA_GRAPHS=0 turns replay off.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

SLOTS = 2  # captures per key: a step's outputs may still be alive when the next call comes
MAX_CAPTURES = 32  # keys kept (each capture holds its outputs and a private memory pool)

Body = Callable[..., tuple[Tensor | None, ...]]
Inputs = tuple[Tensor | None, ...]
Outputs = tuple[Tensor | None, ...]
_Signature = tuple[Any, ...]

_last_addresses: OrderedDict[_Signature, tuple[int, ...]] = OrderedDict()
_pools: OrderedDict[Hashable, list[_Capture]] = OrderedDict()
_failed: set[Hashable] = set()


def run(body: Body, config: Hashable, *inputs: Tensor | None) -> Outputs:
    """`body(config, *inputs)`, replayed from a captured CUDA graph where it can be."""
    if not _replayable(inputs):
        return body(config, *inputs)
    signature = (body, config, *(_layout(t) for t in inputs))
    addresses = tuple(0 if t is None else t.data_ptr() for t in inputs)
    last = _last_addresses.pop(signature, None)
    _last_addresses[signature] = addresses
    while len(_last_addresses) > 4 * MAX_CAPTURES:
        _last_addresses.popitem(last=False)
    if last is None:  # first sight
        return body(config, *inputs)
    # read in place where the address repeats; None: copied into the capture's buffer
    in_place = tuple(a if a == b else None for a, b in zip(addresses, last, strict=True))
    key = (signature, in_place)
    if key in _failed:
        return body(config, *inputs)
    pool = _pools.pop(key, [])
    _pools[key] = pool
    for capture in pool:
        if capture.free():
            return capture.replay(inputs)
    if len(pool) >= SLOTS:
        return body(config, *inputs)
    try:
        capture = _Capture(body, config, inputs, in_place)
    except RuntimeError:  # capture unsupported here (an old driver, a capture in progress)
        _failed.add(key)
        return body(config, *inputs)
    pool.append(capture)
    while len(_pools) > MAX_CAPTURES:
        _pools.popitem(last=False)
    return capture.replay(inputs)


def captures() -> int:
    """How many captures are held."""
    return sum(len(pool) for pool in _pools.values())


def _replayable(inputs: Inputs) -> bool:
    first = next((t for t in inputs if t is not None), None)
    return (
        first is not None
        and first.is_cuda
        and os.environ.get("GRADHEALTH_CUDA_GRAPHS", "1") != "0"
        and not torch.cuda.is_current_stream_capturing()
        and not torch.is_autocast_enabled("cuda")
    )


def _layout(t: Tensor | None) -> tuple[Any, ...] | None:
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def _use_count(storage: torch.UntypedStorage) -> int:
    return int(torch._C._storage_Use_Count(storage._cdata))


def _new_graph() -> Any:
    return torch.cuda.CUDAGraph()


def _capture_graph(graph: torch.cuda.CUDAGraph, run: Callable[[], Any], device: Any) -> Any:
    """`run()` once on a side stream (cuBLAS handles, workspaces, Triton's compiles happen
    outside capture), then captured into `graph`; returns what the captured call returned."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream(device).wait_stream(side)
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        return run()


class _Capture:
    """One function, one key, one CUDA graph and its static outputs."""

    def __init__(self, body: Body, config: Hashable, inputs: Inputs, in_place: tuple) -> None:
        device = next(t for t in inputs if t is not None).device
        self._copies: list[tuple[int, Tensor]] = [
            (i, torch.empty_like(t, memory_format=torch.contiguous_format))
            for i, (t, address) in enumerate(zip(inputs, in_place, strict=True))
            if t is not None and address is None
        ]
        args: list[Tensor | None] = list(inputs)
        for i, buffer in self._copies:
            buffer.copy_(inputs[i])  # type: ignore[arg-type]
            args[i] = buffer
        self._graph = _new_graph()
        with torch.no_grad():
            outputs = _capture_graph(self._graph, lambda: body(config, *args), device)
        self._outputs: Outputs = tuple(outputs)
        read = {t.untyped_storage().data_ptr() for t in args if t is not None}
        self._storages = [o.untyped_storage() for o in self._outputs if o is not None]
        if any(s.data_ptr() in read for s in self._storages):
            raise RuntimeError("an output shares an input's memory: not a pure function")
        # what the pool alone holds of each storage: the outputs and the storage objects
        self._held = [_use_count(s) for s in self._storages]

    def free(self) -> bool:
        """Whether nothing outside the pool holds any output of the last replay."""
        return all(_use_count(s) == n for s, n in zip(self._storages, self._held, strict=True))

    def replay(self, inputs: Inputs) -> Outputs:
        for i, buffer in self._copies:
            buffer.copy_(inputs[i])  # type: ignore[arg-type]
        self._graph.replay()
        return tuple(None if o is None else o.view(o.shape) for o in self._outputs)

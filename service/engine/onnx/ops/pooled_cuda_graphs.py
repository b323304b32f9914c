"""Pure tensor functions replayed as CUDA graphs: inputs read where they are, outputs pooled.

What a small LSTM node costs on a GPU is host time: ~30 aten ops each way at ~7 µs, a Triton
launch at ~25 µs and the Python between them, while the GPU idles (bench/README.md, session 10).
A CUDA graph replays a node's whole forward or backward in one launch (2.6-5 µs). The per-step
loops' captures (cuda_graph_loops.py) copy every input into the graph's buffers and clone every
output out of them, ~7 µs of host time per tensor, about what such a replay saves. Here neither:

- An input that keeps its address from call to call, a parameter or an output of a held
  capture (the forward's saved tensors reaching the backward, one layer's output reaching
  the next), is read where it is. Its address is part of the capture's key, so a replay
  reads exactly the tensors this call was given. Other inputs (a batch, an incoming
  gradient: allocated anew for each call) are copied into the capture's own buffers.
- Outputs are views of the capture's static outputs. A capture replays only when nothing
  outside holds any of its previous outputs: each output storage's use count is back to what
  the pool alone holds (views, autograd's saved tensors and a stolen `.grad` all count).
  Otherwise another capture of the same function takes the call (up to SLOTS of them), or it
  runs eagerly. A replay never overwrites a tensor somebody still reads.

The functions (`body(config, *inputs)`) must be pure: no in-place writes to their inputs, every
output freshly computed (an output sharing an input's memory refuses the capture), no host
synchronisation. `config` is hashable and part of the key. A function is captured the second
time its key is seen (a shape used once never pays for a capture); where capture fails, that
key runs eagerly from then on. Captures that read a tensor in place which has since been
freed (a model the worker let go) are dropped when a new key comes, with the device memory
they hold. GRADHEALTH_CUDA_GRAPHS=0 turns replay off.

Each capture's first CHECKED_REPLAYS replays are also run eagerly and compared: the one at
capture time (what the graph recorded: an op that cannot be captured faithfully, a host value
baked in) and the first with new inputs (which tensors it reads: in place or copied). A
replay that differs is not used: the eager result is returned, the key runs eagerly from then
on and a warning names the function. A diagnosis must not rest on a replay mechanism that was
wrong once, and the cost is two eager runs per capture (a handful per model).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

SLOTS = 2  # captures per key: a step's outputs may still be alive when the next call comes
MAX_CAPTURES = 32  # keys kept (each capture holds its outputs and a private memory pool)
CHECKED_REPLAYS = 2  # per capture: at capture time, and the first with new inputs

Body = Callable[..., tuple[Tensor | None, ...]]
Inputs = tuple[Tensor | None, ...]
Outputs = tuple[Tensor | None, ...]

_pools: OrderedDict[Hashable, list[_Capture]] = OrderedDict()
_seen: OrderedDict[Hashable, None] = OrderedDict()  # keys seen once, not captured yet
_failed: set[Hashable] = set()
_static_storages: set[int] = set()  # where the held captures' outputs live
captured_total = 0  # captures made since the process started (bench/converter.py prints it)
mismatches_total = 0  # checked replays that differed from the eager run (tests assert none)

_log = logging.getLogger(__name__)


def run(body: Body, config: Hashable, *inputs: Tensor | None) -> Outputs:
    """`body(config, *inputs)`, replayed from a captured CUDA graph where it can be."""
    if not _replayable(inputs):
        return body(config, *inputs)
    # read in place: parameters and the held captures' outputs, at their addresses; the
    # rest is copied into the capture's buffers (None)
    in_place = tuple(t.data_ptr() if t is not None and _stays(t) else None for t in inputs)
    key = (body, config, in_place, *(_layout(t) for t in inputs))
    if key in _failed:
        return body(config, *inputs)
    pool = _pools.pop(key, None)
    if pool is None:
        _drop_stale()  # a new key: maybe a new model, whose predecessor's captures are dead
        if key not in _seen:  # first sight: a key used once never pays for a capture
            _seen[key] = None
            while len(_seen) > 4 * MAX_CAPTURES:
                _seen.popitem(last=False)
            return body(config, *inputs)
        del _seen[key]
        pool = []
    _pools[key] = pool
    for capture in pool:
        if capture.free():
            return _checked_replay(key, capture, inputs)
    if len(pool) >= SLOTS:
        return body(config, *inputs)
    try:
        capture = _Capture(body, config, inputs, in_place)
    except RuntimeError:  # capture unsupported here (an old driver, a capture in progress)
        _failed.add(key)
        return body(config, *inputs)
    _count_capture()
    pool.append(capture)
    _static_storages.update(s.data_ptr() for s in capture.storages)
    if len(_pools) > MAX_CAPTURES:
        while len(_pools) > MAX_CAPTURES:
            _pools.popitem(last=False)
        _index_static_storages()
    return _checked_replay(key, capture, inputs)


def _checked_replay(key: Hashable, capture: _Capture, inputs: Inputs) -> Outputs:
    """`capture`'s replay; while it has checks left, compared with an eager run of the same
    call, and the eager result used (and the key given up) where they differ."""
    if capture.checks_left == 0:
        return capture.replay(inputs)
    capture.checks_left -= 1
    with torch.no_grad():
        eager = tuple(capture.body(capture.config, *inputs))
    replayed = capture.replay(inputs)
    difference = _difference(replayed, eager)
    if difference is None:
        return replayed
    global mismatches_total
    mismatches_total += 1
    _failed.add(key)
    del _pools[key]
    _index_static_storages()
    body = getattr(capture.body, "__qualname__", repr(capture.body))
    _log.warning(
        "a CUDA graph replay of %s.%s differed from its eager run (%s); it runs eagerly "
        "for these inputs from now on (GRADHEALTH_CUDA_GRAPHS=0 turns replay off)",
        capture.body.__module__,
        body,
        difference,
    )
    return eager


def _difference(replayed: Outputs, eager: Outputs) -> str | None:
    """How the replay's outputs differ from the eager ones, or None where they agree: the
    same kernels on the same values (bit for bit but for a library's choice of algorithm
    between streams, hence the tolerance)."""
    if len(replayed) != len(eager):
        return f"{len(replayed)} outputs against {len(eager)}"
    for index, (got, expected) in enumerate(zip(replayed, eager, strict=True)):
        if got is None or expected is None:
            if got is not expected:
                return f"output {index}: None on one side only"
            continue
        tol = 1e-2 if expected.element_size() < 4 else 1e-4
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        if got.shape != expected.shape or not torch.allclose(
            got, expected, rtol=tol, atol=tol * scale, equal_nan=True
        ):
            error = float((got - expected).abs().max()) if got.shape == expected.shape else -1
            return f"output {index}: max |difference| {error:.3g} at scale {scale:.3g}"
    return None


def _drop_stale() -> None:
    """Drop the captures that read a tensor in place which no longer exists (the parameters
    of a model the worker has let go): they can never replay again (their key holds its
    address), yet they hold their outputs and their graph's memory on the device; a worker
    diagnosing model after model would keep up to MAX_CAPTURES·SLOTS of them."""
    stale = [key for key, pool in _pools.items() if any(c.stale() for c in pool)]
    for key in stale:
        del _pools[key]
    if stale:
        _index_static_storages()


def _index_static_storages() -> None:
    _static_storages.clear()
    _static_storages.update(
        s.data_ptr() for pool in _pools.values() for c in pool for s in c.storages
    )


def _count_capture() -> None:
    global captured_total
    captured_total += 1


def _stays(t: Tensor) -> bool:
    """Whether `t` keeps its address from one call to the next: a parameter (or a view of
    one), or an output of a held capture (its static memory). A tensor allocated anew each
    call (an incoming gradient, a batch) may come back at the same address or not; keying
    captures on those addresses made one capture after another (H200: ten a row)."""
    base = t._base if t._base is not None else t
    if base.is_leaf and base.requires_grad:
        return True
    return t.untyped_storage().data_ptr() in _static_storages


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


def _replay_graph(capture: _Capture, args: list[Tensor | None]) -> None:
    """Replay `capture`'s graph, which reads `args` (the call's tensors, or the capture's
    copies of them) where they are; a stand-in on the CPU computes from them instead."""
    capture.graph.replay()


def _capture_graph(graph: torch.cuda.CUDAGraph, run: Callable[[], Any], device: Any) -> Any:
    """`run()` once on a side stream (cuBLAS handles, workspaces, Triton's compiles happen
    outside capture), then captured into `graph` on that stream; returns what the captured
    call returned. Not through `torch.cuda.graph`: it empties the caching allocator before
    each capture, after which fresh tensors (an incoming gradient) come back at new
    addresses and ask for yet another capture (H200: ten captures a row, inside its timed
    steps, and the large LSTM row at 1.15x against 0.5x)."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        run()
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            outputs = run()
        finally:
            graph.capture_end()
    current.wait_stream(side)
    return outputs


class _Capture:
    """One function, one key, one CUDA graph and its static outputs."""

    def __init__(self, body: Body, config: Hashable, inputs: Inputs, in_place: tuple) -> None:
        device = next(t for t in inputs if t is not None).device
        self.body, self.config = body, config
        # the tensors read in place that live outside the pool (parameters: the bases of the
        # views given), weakly: when one is gone the key can never come again
        self._sources = [
            weakref.ref(t._base if t._base is not None else t)
            for t, address in zip(inputs, in_place, strict=True)
            if t is not None
            and address is not None
            and t.untyped_storage().data_ptr() not in _static_storages
        ]
        self._copies: list[tuple[int, Tensor]] = [
            (i, torch.empty_like(t, memory_format=torch.contiguous_format))
            for i, (t, address) in enumerate(zip(inputs, in_place, strict=True))
            if t is not None and address is None
        ]
        args: list[Tensor | None] = list(inputs)
        for i, buffer in self._copies:
            buffer.copy_(inputs[i])  # type: ignore[arg-type]
            args[i] = buffer
        self.graph = _new_graph()
        with torch.no_grad():
            outputs = _capture_graph(self.graph, lambda: body(config, *args), device)
        self.outputs: Outputs = tuple(outputs)
        read = {t.untyped_storage().data_ptr() for t in args if t is not None}
        self.storages = [o.untyped_storage() for o in self.outputs if o is not None]
        if any(s.data_ptr() in read for s in self.storages):
            raise RuntimeError("an output shares an input's memory: not a pure function")
        # what the pool alone holds of each storage: the outputs and the storage objects
        self._held = [_use_count(s) for s in self.storages]
        self.checks_left = CHECKED_REPLAYS

    def stale(self) -> bool:
        """Whether a tensor it reads in place has been freed."""
        return any(source() is None for source in self._sources)

    def free(self) -> bool:
        """Whether nothing outside the pool holds any output of the last replay."""
        return all(_use_count(s) == n for s, n in zip(self.storages, self._held, strict=True))

    def replay(self, inputs: Inputs) -> Outputs:
        args = list(inputs)
        for i, buffer in self._copies:
            buffer.copy_(inputs[i])  # type: ignore[arg-type]
            args[i] = buffer
        _replay_graph(self, args)
        return tuple(None if o is None else o.view(o.shape) for o in self.outputs)

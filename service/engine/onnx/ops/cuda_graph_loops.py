"""The recurrent layers' step loops on CUDA, replayed as CUDA graphs.

A step loop in torch ops is bound by the host on a GPU: every step's few small kernels cost
~10 µs each of Python and launch while the GPU waits. Captured once as a CUDA graph, a whole
loop is one launch. The LSTM's loops (lstm_fused_cell.py; a product and a fused cell kernel per
step) measured on an H100 (bench/lstm_cuda.py, one layer fwd+bwd): T=50, B=32, 128→512: cuDNN
3.16 ms, eager loop 5.80 ms, replayed graphs 1.65 ms; T=100, B=64, 256→512: 4.92 / 13.14 /
3.79 ms; T=24, B=8, 64→128: 1.23 / 3.96 / 2.24 ms. The GRU's and tanh RNN's loops
(gru_sequence.py, rnn_sequence.py: three to five kernels a step) ran eagerly on CUDA until
session 9, at 4.9× and 3.2× torch's cuDNN for bench/converter.py's 2-layer rows. The graphs run
the very same loop functions (same kernels, same order), so their results equal the eager
loops'; every step is still computed and ∂L/∂h_t is still produced for every step.

A graph is captured for a (loop, input shapes, dtypes, device) the second time it is seen:
capturing costs a few eager runs, which a shape used once would never win back. Inputs are
copied into the graph's static buffers and outputs cloned out of them, so any number of layers
and calls can share one capture (a few extra memory passes per call, ~µs on a GPU). Where
capture fails (an old driver, another capture in progress), that key stays eager.
GRADHEALTH_CUDA_GRAPHS=0 turns replay off (bench/lstm_cuda.py times both).

Since session 11 every recurrent node (the LSTM's, GRU's and tanh RNN's: projection, loops,
products) is replayed whole by pooled_cuda_graphs.py, without the copies and clones; inside
its capture these loops run eagerly (a capture in progress), so their kernels become part of
the node's graph. They still come here when the node runs eagerly: its first sight, or while
every capture of it has outputs held (a probe keeping ∂L/∂h_t, another pass's saved tensors).
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

MAX_CAPTURED = 16  # each holds its static buffers and a private memory pool

Loop = Callable[..., Tensor | tuple[Tensor, ...]]
_Signature = tuple[tuple[tuple[int, ...], torch.dtype, torch.device], ...]
_Key = tuple[Loop, _Signature]

_seen: Counter[_Key] = Counter()
_captured: OrderedDict[_Key, _CapturedLoop] = OrderedDict()
_failed: set[_Key] = set()


def run(loop: Loop, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
    """`loop(*inputs)`; on CUDA, from the second call with the same loop and input shapes on,
    replayed from one captured graph. Inputs the loop writes over (a forward loop activating
    its projected gates in place) are only written over when it runs eagerly: callers use
    what it returns."""
    if not _replayable(inputs):
        return loop(*inputs)
    key = (loop, tuple((tuple(t.shape), t.dtype, t.device) for t in inputs))
    captured = _captured.get(key)
    if captured is None:
        _seen[key] += 1
        if _seen[key] < 2 or key in _failed:
            return loop(*inputs)
        try:
            captured = _CapturedLoop(loop, inputs)
        except RuntimeError:  # capture unsupported here: stay eager for this key
            _failed.add(key)
            return loop(*inputs)
        _captured[key] = captured
        while len(_captured) > MAX_CAPTURED:
            _captured.popitem(last=False)
    _captured.move_to_end(key)
    return captured.replay(inputs)


def captured_loops() -> list[tuple[Loop, _Signature]]:
    """The (loop, input signature) pairs captured so far, oldest first."""
    return list(_captured)


def _replayable(inputs: tuple[Tensor, ...]) -> bool:
    return (
        bool(inputs)
        and inputs[0].is_cuda
        and os.environ.get("GRADHEALTH_CUDA_GRAPHS", "1") != "0"
        and not torch.cuda.is_current_stream_capturing()
    )


class _CapturedLoop:
    """One loop for one input signature, captured as one CUDA graph."""

    def __init__(self, loop: Loop, inputs: tuple[Tensor, ...]) -> None:
        device = inputs[0].device
        self._inputs = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in inputs]
        for buffer, value in zip(self._inputs, inputs, strict=True):
            buffer.copy_(value)  # real values for the warm-up: no NaN from uninitialised memory
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside capture: cuBLAS handles, workspaces
            loop(*self._inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph, capture_error_mode="thread_local"):
            outputs = loop(*self._inputs)
        self._single = isinstance(outputs, Tensor)
        self._outputs: tuple[Tensor, ...] = (outputs,) if isinstance(outputs, Tensor) else outputs

    def replay(self, inputs: tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
        for buffer, value in zip(self._inputs, inputs, strict=True):
            buffer.copy_(value)
        self._graph.replay()
        # the next replay (another layer, another call) overwrites the static outputs
        outputs = tuple(out.clone() for out in self._outputs)
        return outputs[0] if self._single else outputs

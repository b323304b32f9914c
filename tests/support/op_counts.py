"""Counting the ops torch dispatches: what a fused kernel replaced, how many ops a step runs."""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Counts the ops dispatched while active, by name without overload (`mm`, `bmm`,
    `_softmax`, `_linear_pointwise`); a backward run inside it counts too."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

"""A worker child's cache of LOADED models (DESIGN.md: "models cached by sha256").

Loading is the per-job cost a long-lived child can skip: parsing and converting an ONNX graph,
`torch.export.load` + FX → ObservableGraph, TorchScript → FX (TS2EP, the slowest). An entry is
the engine's `LoadedModel` for one (sha256, mode, dropout, conversion check, device): mode and
dropout change the graph that is built, and the module lives on the device its first job moved
it to, so a CPU job and a CUDA job of the same file are separate entries.

LRU within a budget counted in parameter + buffer bytes, buffers twice (a copy is kept to restore
them; see below), plus the ONNX conformance reference once built: what the entry holds in host
or device memory (the serialized bytes live in `ModelCache`). A model larger than the whole
budget is used for its job and not kept.

ONNX: every job still runs the conformance check on its own batch (the report's
`model.conversion`), but the onnxruntime session it compares against (and the eval-mode twin,
where one is compared) is built once per entry, on the first job that needs it
(`conformance_reference`, an `onnx.conformance.ConformanceReference`). It holds another copy of
the weights: counted in the entry's size once built (re-counted after each job), and closed
when the entry goes (evicted, discarded, replaced), which frees it.

A job may not corrupt an entry (the next job must see the model the file describes):
- `measure()` leaves `.grad` on every trainable tensor: `release()` sets them to None after
  the job (also frees that memory);
- fix verification transforms a copy of the subject, never the module itself;
- a buffer written in place (train-mode batch norm counts `num_batches_tracked`) is put back
  from a copy by `release()`, which finds it by the tensor's version counter;
- a parameter written in place (nothing in the engine does; a future transform might) evicts
  the entry, so the next job loads the file again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

DEFAULT_LOADED_CACHE_BYTES = 2 * 1024**3  # per child (host memory, or the child's GPU)


class LoadedKey(NamedTuple):
    sha256: str
    mode: str
    dropout: bool
    check_conversion: bool
    device: str  # resolved: "cpu", "cuda:0"


@dataclass
class _Entry:
    loaded: Any  # service.engine.formats.loaded.LoadedModel
    size_bytes: int
    params: list[tuple[int, int]] = field(default_factory=list)  # (identity, version)
    buffers: list[tuple[int, int]] = field(default_factory=list)
    saved_buffers: dict[int, Any] = field(default_factory=dict)  # identity → copy
    model_bytes: int = 0  # parameters, buffers and the saved buffer copies
    reference: Any = None  # ONNX: conformance.ConformanceReference, once a job asked for it


def _modules(loaded: Any) -> Iterator[Any]:
    """The module that runs and, when it is another module (TorchScript: the ScriptModule kept
    as a fallback next to its FX graph), the source too."""
    from torch import nn

    seen: set[int] = set()
    for module in (loaded.module, loaded.graph, loaded.source):
        if isinstance(module, nn.Module) and id(module) not in seen:
            seen.add(id(module))
            yield module


def _parameters(loaded: Any) -> list[Any]:
    return [p for module in _modules(loaded) for p in module.parameters()]


def _buffers(loaded: Any) -> list[Any]:
    return [b for module in _modules(loaded) for b in module.buffers()]


def _versions(tensors: list[Any]) -> list[tuple[int, int]]:
    """(identity, version counter) per tensor: the counter moves on every in-place write."""
    return [(id(t), int(t._version)) for t in tensors]


def loaded_size_bytes(loaded: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _parameters(loaded) + _buffers(loaded))


def _snapshot(entry: _Entry) -> None:
    """Remember the tensors as they are now; buffers by value, to put them back after a job
    (a normalization layer in train mode counts its batches in `num_batches_tracked`)."""
    buffers = _buffers(entry.loaded)
    entry.params = _versions(_parameters(entry.loaded))
    entry.buffers = _versions(buffers)
    entry.saved_buffers = {id(b): b.detach().clone() for b in buffers}
    entry.model_bytes = loaded_size_bytes(entry.loaded) + sum(
        b.numel() * b.element_size() for b in buffers
    )
    entry.size_bytes = entry.model_bytes + _reference_bytes(entry)


def _reference_bytes(entry: _Entry) -> int:
    return 0 if entry.reference is None else int(entry.reference.size_bytes)


def _same_tensors(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> bool:
    return [i for i, _ in before] == [i for i, _ in after]


class LoadedModelCache:
    def __init__(self, budget_bytes: int = DEFAULT_LOADED_CACHE_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[LoadedKey, _Entry] = OrderedDict()
        self._size = 0
        self.hits = 0
        self.misses = 0
        self.evicted_changed = 0  # entries dropped because a job changed them
        self.references_built = 0  # ONNX conformance references created (one per entry)

    @property
    def size_bytes(self) -> int:
        return self._size

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: LoadedKey) -> bool:
        return key in self._entries

    def acquire(self, key: LoadedKey) -> Any | None:
        """The cached LoadedModel for `key` (counts a hit or a miss), or None."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry.loaded

    def conformance_reference(self, key: LoadedKey) -> Any | None:
        """The ONNX conformance reference kept with `key`'s entry (created empty on first ask;
        the check builds its session on first use), or None: no entry, not ONNX, or no
        conformance check asked for (then jobs build nothing to keep)."""
        entry = self._entries.get(key)
        if entry is None or not key.check_conversion or entry.loaded.format != "onnx":
            return None
        if entry.reference is None:
            from service.engine.onnx.conformance import ConformanceReference

            entry.reference = ConformanceReference()
            self.references_built += 1
        return entry.reference

    def put(self, key: LoadedKey, loaded: Any) -> bool:
        """Keep a freshly loaded model (call before its first job); False if it is too big."""
        self.discard(key)
        if self.budget_bytes <= 0:
            return False
        entry = _Entry(loaded, 0)
        _snapshot(entry)
        if entry.size_bytes > self.budget_bytes:
            return False
        self._entries[key] = entry
        self._size += entry.size_bytes
        self._evict_over_budget()
        return True

    def release(self, key: LoadedKey, loaded: Any) -> None:
        """After a job on `loaded`: drop its gradients, put changed buffers back, and evict the
        entry if a parameter was written in place (nothing in the engine does that; if
        something ever does, the next job loads the file again rather than see it).

        When the tensors themselves were replaced (the model's first job moved it to its
        device, or built its graph: TorchScript → FX) there is nothing to compare: the
        snapshot is taken again, and sizes re-counted."""
        import torch

        for tensor in _parameters(loaded) + _buffers(loaded):
            tensor.grad = None
        entry = self._entries.get(key)
        if entry is None or entry.loaded is not loaded:
            return
        params, buffers = _parameters(loaded), _buffers(loaded)
        now_params, now_buffers = _versions(params), _versions(buffers)
        if not (
            _same_tensors(entry.params, now_params) and _same_tensors(entry.buffers, now_buffers)
        ):
            old = entry.size_bytes
            _snapshot(entry)
            self._size += entry.size_bytes - old
        elif now_params != entry.params:
            log.info("cached model %s: a job changed its parameters; evicted", key.sha256[:12])
            self.evicted_changed += 1
            self._pop(key)
            return
        elif now_buffers != entry.buffers:
            with torch.no_grad():
                for (ident, _), (_, before), buffer in zip(
                    now_buffers, entry.buffers, buffers, strict=True
                ):
                    if int(buffer._version) != before:
                        buffer.copy_(entry.saved_buffers[ident])
            entry.buffers = _versions(buffers)
        # the job may have built the conformance reference (its first check): count it now
        grown = entry.model_bytes + _reference_bytes(entry) - entry.size_bytes
        entry.size_bytes += grown
        self._size += grown
        if entry.size_bytes > self.budget_bytes:
            self._pop(key)
        self._evict_over_budget()

    def discard(self, key: LoadedKey) -> None:
        if key in self._entries:
            self._pop(key)

    def clear_except(self, key: LoadedKey | None) -> None:
        """Free every other entry (device memory for a job that ran out of it)."""
        for other in [k for k in self._entries if k != key]:
            self._pop(other)

    def _evict_over_budget(self) -> None:
        while self._size > self.budget_bytes and self._entries:
            self._pop(next(iter(self._entries)))

    def _pop(self, key: LoadedKey) -> None:
        entry = self._entries.pop(key)
        self._size -= entry.size_bytes
        if entry.reference is not None:
            entry.reference.close()  # frees the session even if a caller still holds it

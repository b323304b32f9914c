"""A worker child's in-memory cache of model bytes, keyed by sha256, LRU within a byte budget.

Pipelines diagnose the same model again and again (a new batch, a schedule): keeping its
bytes saves the database read (Postgres chunks) or the disk read per job. The loaded
(parsed, converted) models are cached separately, in `loaded_cache.LoadedModelCache`; the bytes
are still needed on a miss there, and for the model's sha256 in the report.
"""

from __future__ import annotations

from collections import OrderedDict

DEFAULT_MODEL_CACHE_BYTES = 1024**3  # per child; a model larger than this is simply not kept


class ModelCache:
    def __init__(self, budget_bytes: int = DEFAULT_MODEL_CACHE_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self.hits = 0
        self.misses = 0

    @property
    def size_bytes(self) -> int:
        return self._size

    def get(self, sha256: str) -> bytes | None:
        data = self._entries.get(sha256)
        if data is None:
            self.misses += 1
            return None
        self._entries.move_to_end(sha256)
        self.hits += 1
        return data

    def put(self, sha256: str, data: bytes) -> None:
        if len(data) > self.budget_bytes or sha256 in self._entries:
            return
        self._entries[sha256] = data
        self._size += len(data)
        while self._size > self.budget_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._size -= len(evicted)

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._entries

    def __len__(self) -> int:
        return len(self._entries)

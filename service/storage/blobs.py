"""Content-addressed blob store: the same bytes are stored once, under their sha256.

Where the bytes live (`Settings.effective_blob_storage`):
- `db`: 1 MiB rows in `blob_chunks` (Postgres by default). A worker on another machine needs
  nothing but the database URL; it reads a blob chunk by chunk and caches it on its own disk.
- `file`: `<data_dir>/blobs/ab/cdef…` (the embedded SQLite default: one machine).
A `blobs` row records which, so a store configured differently later still finds old blobs.

For workers (and anyone holding a sha256 from a `models`/`batches` row):

    store = BlobStore(settings, database)
    store.read_blob(sha256) -> bytes                 # whole blob in memory
    with store.open_blob(sha256) as f: f.read(n)     # streaming, binary file object
    store.blob_path(sha256) -> Path                  # a local file: the stored file itself
                                                     # (`file`), or a sha256-verified copy under
                                                     # <data_dir>/blob-cache (`db`; least
                                                     # recently used copies are deleted past
                                                     # GRADHEALTH_BLOB_CACHE_BYTES)
Each raises `BlobNotFoundError` for an unknown (or not yet complete) sha256.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.config import Settings
from service.db.models import Blob, BlobChunk
from service.db.repositories import blobs as blobs_repo
from service.db.session import Database
from service.errors import GradhealthError
from service.storage.spool import SpooledUpload

COPY_BUFFER_BYTES = 1024 * 1024


class BlobNotFoundError(GradhealthError):
    code = "blob_not_found"
    status = 500  # a row points at bytes that are gone: a defect, not the client's doing


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    size_bytes: int
    created: bool  # False: these bytes were already stored


def file_path(settings: Settings, sha256: str) -> Path:
    return settings.blob_dir / sha256[:2] / sha256[2:]


class _ChunkStream(io.RawIOBase):
    """A read-only binary stream over a blob's chunks, fetched one at a time."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buffer:
            nxt = next(self._chunks, None)
            if nxt is None:
                return 0
            self._buffer = nxt
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


class BlobStore:
    def __init__(self, settings: Settings, database: Database) -> None:
        self.settings = settings
        self.database = database

    # -- writing (the API) -------------------------------------------------------------------

    def save(self, upload: SpooledUpload) -> StoredBlob:
        """Store a finished spooled upload (in its own committed transaction: a blob row is
        harmless without a model or batch pointing at it) and remove the temporary file."""
        try:
            with self.database.session(read_only=True) as session:
                existing = blobs_repo.get_complete(session, upload.sha256)
                if existing is not None:
                    return StoredBlob(upload.sha256, existing.size_bytes, created=False)
            storage = self.settings.effective_blob_storage
            try:
                with self.database.session() as session:
                    if storage == "file":
                        self._save_file(upload)
                    session.add(
                        Blob(
                            sha256=upload.sha256,
                            size_bytes=upload.size_bytes,
                            storage=storage,
                            complete=True,
                        )
                    )
                    session.flush()
                    if storage == "db":
                        self._save_chunks(session, upload)
                    session.commit()
                return StoredBlob(upload.sha256, upload.size_bytes, created=True)
            except IntegrityError:
                # The same bytes arrived concurrently and the other upload committed first.
                return StoredBlob(upload.sha256, upload.size_bytes, created=False)
        finally:
            upload.discard()

    def _save_file(self, upload: SpooledUpload) -> None:
        target = file_path(self.settings, upload.sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.replace(upload.path, target)  # same device: data_dir/tmp → data_dir/blobs

    def _save_chunks(self, session: Session, upload: SpooledUpload) -> None:
        size = self.settings.blob_chunk_bytes
        with upload.path.open("rb") as f:
            seq = 0
            while chunk := f.read(size):
                # Core insert: no ORM object keeps the chunk alive after it is sent.
                session.execute(insert(BlobChunk).values(sha256=upload.sha256, seq=seq, data=chunk))
                seq += 1

    # -- reading (the workers) ---------------------------------------------------------------

    def _blob(self, session: Session, sha256: str) -> Blob:
        blob = blobs_repo.get_complete(session, sha256)
        if blob is None:
            raise BlobNotFoundError(f"no stored blob with sha256 {sha256}")
        return blob

    def open_blob(self, sha256: str) -> BinaryIO:
        """A binary file object; close it when done (a `db` blob holds a session until then)."""
        with self.database.session(read_only=True) as session:
            blob = self._blob(session, sha256)
            if blob.storage == "file":
                return file_path(self.settings, sha256).open("rb")
        session = self.database.sessionmaker(
            bind=self.database.engine.execution_options(gradhealth_read_only=True)
        )

        def chunks() -> Iterator[bytes]:
            try:
                yield from blobs_repo.iter_chunks(session, sha256)
            finally:
                session.close()

        return io.BufferedReader(_ChunkStream(chunks()), buffer_size=COPY_BUFFER_BYTES)

    def read_blob(self, sha256: str) -> bytes:
        with self.open_blob(sha256) as f:
            return f.read()

    def blob_path(self, sha256: str) -> Path:
        """A local file with the blob's bytes (see the module doc)."""
        with self.database.session(read_only=True) as session:
            storage = self._blob(session, sha256).storage
        if storage == "file":
            return file_path(self.settings, sha256)
        cached = self.settings.data_dir.resolve() / "blob-cache" / sha256
        if cached.exists():
            os.utime(cached)  # mtime = last use, for the eviction below
            return cached
        cached.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=".partial-")
        try:
            with os.fdopen(fd, "wb") as out, self.open_blob(sha256) as src:
                while block := src.read(COPY_BUFFER_BYTES):
                    digest.update(block)
                    out.write(block)
            if digest.hexdigest() != sha256:
                raise BlobNotFoundError(f"blob {sha256} is corrupt in the database")
            os.replace(tmp, cached)  # atomic: concurrent workers never see a partial file
        finally:
            Path(tmp).unlink(missing_ok=True)
        evict_least_recently_used(cached.parent, self.settings.blob_cache_bytes, keep=cached)
        return cached


def evict_least_recently_used(directory: Path, budget_bytes: int, *, keep: Path) -> None:
    """Delete the least recently used cached blobs until the cache fits `budget_bytes`
    (`keep`, just fetched, stays even if it alone is larger)."""
    entries = []
    for path in directory.iterdir():
        if path.name.startswith(".partial-"):
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:  # another worker evicted it
            continue
        entries.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= budget_bytes:
            break
        if path != keep:
            path.unlink(missing_ok=True)
            total -= size

"""Content-addressed blobs: one `blobs` row per sha256, bytes in `blob_chunks` or in a file
(see `service.storage`, which is the API to use; these are its queries)."""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service.db.models import Blob, BlobChunk


def get(session: Session, sha256: str) -> Blob | None:
    return session.get(Blob, sha256)


def get_complete(session: Session, sha256: str) -> Blob | None:
    return session.scalar(select(Blob).where(Blob.sha256 == sha256, Blob.complete.is_(True)))


def chunk_count(session: Session, sha256: str) -> int:
    return len(session.scalars(select(BlobChunk.seq).where(BlobChunk.sha256 == sha256)).all())


def iter_chunks(session: Session, sha256: str) -> Iterator[bytes]:
    """Chunks in order, one row at a time (never the whole blob in memory)."""
    seqs = session.scalars(
        select(BlobChunk.seq).where(BlobChunk.sha256 == sha256).order_by(BlobChunk.seq)
    ).all()
    for seq in seqs:
        data = session.scalar(
            select(BlobChunk.data).where(BlobChunk.sha256 == sha256, BlobChunk.seq == seq)
        )
        if data is None:
            raise LookupError(f"blob {sha256} lost chunk {seq}")
        yield bytes(data)


def delete_chunks(session: Session, sha256: str) -> None:
    session.execute(delete(BlobChunk).where(BlobChunk.sha256 == sha256))

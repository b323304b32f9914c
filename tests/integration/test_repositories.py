"""Repositories and the blob store on real databases (Postgres and SQLite)."""

from __future__ import annotations

import hashlib
import os
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from service.api.operations import create_model
from service.db.models import Blob, BlobChunk, Diagnosis, ModelRecord, utcnow
from service.db.repositories import diagnoses as diagnoses_repo
from service.db.repositories import models as models_repo
from service.db.repositories import tenants as tenants_repo
from service.db.session import Database
from service.errors import PayloadTooLargeError
from service.queue import enqueue
from service.storage import BlobNotFoundError, BlobStore, SpooledUpload, StoredBlob
from tests.conftest import Backend


def spool(tmp: Path, data: bytes, max_bytes: int = 1 << 30) -> SpooledUpload:
    upload = SpooledUpload(tmp, max_bytes=max_bytes, field="file", filename="f.bin")
    for i in range(0, len(data), 1000):
        upload.write(data[i : i + 1000])
    upload.finish()
    return upload


def test_blobs_round_trip_in_chunks_and_are_stored_once(backend: Backend, tmp_path: Path) -> None:
    settings = backend.settings.model_copy(update={"blob_storage": "db", "blob_chunk_bytes": 1024})
    store = BlobStore(settings, backend.database)
    data = os.urandom(5000)
    first = store.save(spool(tmp_path, data))
    again = store.save(spool(tmp_path, data))
    assert first == StoredBlob(hashlib.sha256(data).hexdigest(), 5000, created=True)
    assert again.created is False
    with backend.database.session() as session:
        assert session.scalar(select(func.count()).select_from(BlobChunk)) == 5  # 4 full + 1
    assert store.read_blob(first.sha256) == data
    with store.open_blob(first.sha256) as f:
        assert f.read(10) == data[:10]
        assert f.read() == data[10:]
    cached = store.blob_path(first.sha256)
    assert cached.read_bytes() == data
    assert store.blob_path(first.sha256) == cached  # second call: the cache
    assert not list(tmp_path.glob("upload-*"))  # temporary files removed


def test_the_worker_cache_evicts_least_recently_used_copies(
    backend: Backend, tmp_path: Path
) -> None:
    settings = backend.settings.model_copy(update={"blob_storage": "db", "blob_cache_bytes": 2500})
    store = BlobStore(settings, backend.database)
    blobs = [store.save(spool(tmp_path, bytes([i]) * 1000)).sha256 for i in range(3)]
    a = store.blob_path(blobs[0])
    b = store.blob_path(blobs[1])
    os.utime(a, (1, 1))  # a: used long ago
    os.utime(b, (2, 2))
    store.blob_path(blobs[0])  # a used again: now the most recent
    c = store.blob_path(blobs[2])  # 3000 bytes > 2500: the least recently used (b) goes
    assert a.exists() and c.exists() and not b.exists()
    assert store.blob_path(blobs[1]).read_bytes() == bytes([1]) * 1000  # fetched again


def test_a_corrupt_chunk_is_detected_when_materialised(backend: Backend, tmp_path: Path) -> None:
    settings = backend.settings.model_copy(update={"blob_storage": "db"})
    store = BlobStore(settings, backend.database)
    blob = store.save(spool(tmp_path, b"x" * 3000))
    with backend.database.session() as session:
        session.execute(update(BlobChunk).values(data=b"y" * 3000))
        session.commit()
    with pytest.raises(BlobNotFoundError, match="corrupt"):
        store.blob_path(blob.sha256)


def test_file_storage_keeps_blobs_under_the_data_dir(backend: Backend, tmp_path: Path) -> None:
    settings = backend.settings.model_copy(update={"blob_storage": "file"})
    store = BlobStore(settings, backend.database)
    blob = store.save(spool(settings.upload_tmp_dir, b"hello" * 100))
    path = store.blob_path(blob.sha256)
    assert path.is_relative_to(settings.blob_dir)
    assert path.read_bytes() == b"hello" * 100
    assert store.save(spool(settings.upload_tmp_dir, b"hello" * 100)).created is False


def test_unknown_blob_raises(backend: Backend) -> None:
    store = BlobStore(backend.settings, backend.database)
    with pytest.raises(BlobNotFoundError):
        store.read_blob("0" * 64)


def test_concurrent_uploads_of_the_same_bytes_store_one_blob(
    backend: Backend, tmp_path: Path
) -> None:
    store = BlobStore(backend.settings, backend.database)
    data = os.urandom(4096)
    uploads = [spool(tmp_path, data) for _ in range(4)]
    results: list[StoredBlob] = []
    threads = [threading.Thread(target=lambda u=u: results.append(store.save(u))) for u in uploads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and {r.sha256 for r in results} == {hashlib.sha256(data).hexdigest()}
    assert sum(r.created for r in results) >= 1
    with backend.database.session() as session:
        assert session.scalar(select(func.count()).select_from(Blob)) == 1
    assert store.read_blob(results[0].sha256) == data


def test_spool_refuses_past_the_limit_while_writing(tmp_path: Path) -> None:
    upload = SpooledUpload(tmp_path, max_bytes=10, field="file", filename=None)
    upload.write(b"x" * 10)
    with pytest.raises(PayloadTooLargeError):
        upload.write(b"x")
    assert not upload.path.exists()


def _tenant_model(backend: Backend, tmp_path: Path, name: str) -> tuple[str, str, StoredBlob]:
    store = BlobStore(backend.settings, backend.database)
    blob = store.save(spool(tmp_path, name.encode()))
    with backend.database.session() as session:
        tenant, _ = tenants_repo.get_or_create(session, name)
        model = create_model(
            session, tenant.id, name="net", blob=blob, format="onnx", max_attempts=3
        )
        session.commit()
        return tenant.id, model.id, blob


def test_concurrent_versions_of_one_name_are_all_distinct(backend: Backend, tmp_path: Path) -> None:
    tenant_id, _, blob = _tenant_model(backend, tmp_path, "acme")
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            with backend.database.session() as session:
                create_model(
                    session, tenant_id, name="net", blob=blob, format="onnx", max_attempts=3
                )
                session.commit()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=upload) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with backend.database.session() as session:
        versions = session.scalars(
            select(ModelRecord.version).where(ModelRecord.tenant_id == tenant_id)
        ).all()
    assert sorted(versions) == [1, 2, 3, 4, 5]


def test_reads_are_filtered_by_tenant(backend: Backend, tmp_path: Path) -> None:
    a_tenant, a_model, _ = _tenant_model(backend, tmp_path, "a")
    b_tenant, _, _ = _tenant_model(backend, tmp_path, "b")
    with backend.database.session() as session:
        assert models_repo.get(session, a_tenant, a_model) is not None
        assert models_repo.get(session, b_tenant, a_model) is None
        job = enqueue(
            session,
            a_tenant,
            kind="diagnose",
            model_id=a_model,
            batch_id=None,
            options={},
            max_attempts=3,
            idempotency_key="k",
        )
        session.commit()
        assert diagnoses_repo.get(session, a_tenant, job.id) is not None
        assert diagnoses_repo.get(session, b_tenant, job.id) is None
        assert diagnoses_repo.get_by_idempotency_key(session, b_tenant, "k") is None
        assert diagnoses_repo.list_page(session, b_tenant) == ([], None)


def test_list_pages_are_stable_when_timestamps_tie(backend: Backend, tmp_path: Path) -> None:
    tenant_id, model_id, _ = _tenant_model(backend, tmp_path, "acme")
    same_time = utcnow() - timedelta(minutes=1)
    with backend.database.session() as session:
        ids = [
            enqueue(
                session,
                tenant_id,
                kind="diagnose",
                model_id=model_id,
                batch_id=None,
                options={},
                max_attempts=3,
            ).id
            for _ in range(7)
        ]
        session.execute(update(Diagnosis).values(created_at=same_time))
        session.commit()
        seen: list[str] = []
        cursor = None
        while True:
            page, cursor = diagnoses_repo.list_page(session, tenant_id, after=cursor, limit=3)
            seen += [d.id for d in page]
            if cursor is None:
                break
            cursor = diagnoses_repo.Cursor.decode(cursor.encode())
    assert seen == sorted(ids, reverse=True)


def test_cursor_decoding_refuses_garbage() -> None:
    for bad in ("", "!!!", "bm90IGpzb24", "WzFd"):
        with pytest.raises(ValueError):
            diagnoses_repo.Cursor.decode(bad)


def test_a_worker_elsewhere_reads_uploads_with_only_the_database_url(
    postgres_backend: Backend, tmp_path: Path
) -> None:
    from service.config import Settings

    api_store = BlobStore(postgres_backend.settings, postgres_backend.database)
    data = os.urandom(3 * 1024 * 1024 + 17)  # several chunks
    sha = api_store.save(spool(tmp_path / "api-spool", data)).sha256
    # Another machine: its own (empty) data dir, its own engine, the same database URL.
    remote_settings = Settings(
        database_url=postgres_backend.settings.database_url, data_dir=tmp_path / "remote"
    )
    remote_db = Database.from_settings(remote_settings)
    try:
        remote = BlobStore(remote_settings, remote_db)
        path = remote.blob_path(sha)
        assert path.is_relative_to((tmp_path / "remote").resolve())
        assert path.read_bytes() == data
    finally:
        remote_db.dispose()

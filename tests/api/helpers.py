"""Small request helpers shared by the API tests."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient


def upload_model(client: TestClient, data: bytes, name: str | None = "net", **kw: Any) -> Any:
    form = {"name": name} if name is not None else {}
    return client.post("/v1/models", files={"file": ("net.onnx", data)}, data=form, **kw)


def upload_batch(client: TestClient, data: bytes, filename: str = "batch.npz") -> Any:
    return client.post("/v1/batches", files={"file": (filename, data)})


def model_and_batch(client: TestClient, model: bytes, batch: bytes) -> tuple[str, str]:
    m = upload_model(client, model)
    b = upload_batch(client, batch)
    assert m.status_code == 201, m.text
    assert b.status_code == 201, b.text
    return m.json()["id"], b.json()["id"]

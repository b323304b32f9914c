from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service.db.models import Blob, BlobChunk, Diagnosis
from tests.api.conftest import Samples
from tests.api.helpers import upload_model
from tests.conftest import Backend, TenantKey, make_client


def test_upload_creates_versions_per_name_and_stores_the_bytes_once(
    client: TestClient, backend: Backend, samples: Samples
) -> None:
    first = upload_model(client, samples.onnx)
    second = upload_model(client, samples.onnx)
    other = upload_model(client, samples.onnx, name="other")
    assert first.status_code == second.status_code == other.status_code == 201, first.text
    a, b, c = first.json(), second.json(), other.json()
    assert (a["name"], a["version"], b["version"], c["version"]) == ("net", 1, 2, 1)
    assert a["sha256"] == b["sha256"] == c["sha256"]
    assert a["id"] != b["id"]
    assert a["format"] == "onnx"
    assert a["size_bytes"] == len(samples.onnx)
    assert a["inspection"] == {"status": "pending", "error": None}
    with backend.database.session() as session:
        assert session.scalar(select(func.count()).select_from(Blob)) == 1
        chunks = session.scalar(select(func.count()).select_from(BlobChunk))
        inspections = session.scalars(select(Diagnosis.model_id).where(Diagnosis.kind == "inspect"))
        assert set(inspections) == {a["id"], b["id"], c["id"]}
    # Postgres keeps the bytes in the database (remote workers), SQLite in data_dir.
    assert chunks == (1 if backend.name == "postgres" else 0)


def test_the_stored_bytes_read_back_identical(
    client: TestClient, backend: Backend, samples: Samples
) -> None:
    sha = upload_model(client, samples.torchscript).json()["sha256"]
    store = client.app.state.blob_store  # type: ignore[attr-defined]
    assert store.read_blob(sha) == samples.torchscript
    assert store.blob_path(sha).read_bytes() == samples.torchscript


def test_format_is_detected_from_content_not_name(client: TestClient, samples: Samples) -> None:
    for data, expected in (
        (samples.torchscript, "torchscript"),
        (samples.torch_export, "torch_export"),
        (samples.onnx, "onnx"),
    ):
        response = upload_model(client, data)  # always named net.onnx
        assert response.status_code == 201, response.text
        assert response.json()["format"] == expected


def test_name_defaults_to_the_file_stem(client: TestClient, samples: Samples) -> None:
    response = client.post("/v1/models", files={"file": ("resnet-tiny.pt2", samples.torch_export)})
    assert response.json()["name"] == "resnet-tiny"
    long_file = client.post("/v1/models", files={"file": ("n" * 600 + ".onnx", samples.onnx)})
    assert long_file.status_code == 201
    assert long_file.json()["name"] == "n" * 200
    long_name = upload_model(client, samples.onnx, name="n" * 201)
    assert long_name.status_code == 422
    assert "200 characters" in long_name.json()["error"]["message"]


def test_unknown_format_is_422_naming_the_formats(client: TestClient, samples: Samples) -> None:
    garbage = upload_model(client, b"this is not a model at all")
    assert garbage.status_code == 422
    assert garbage.json()["error"]["code"] == "bad_model"
    assert "ONNX, TorchScript" in garbage.json()["error"]["message"]
    pickled = upload_model(client, samples.state_dict_pt)
    assert pickled.status_code == 422
    assert "torch.export.save" in pickled.json()["error"]["message"]
    empty = upload_model(client, b"")
    assert empty.status_code == 422


def test_upload_past_the_limit_is_413_and_stores_nothing(
    backend: Backend, tenant: TenantKey, samples: Samples
) -> None:
    limit = len(samples.onnx) - 1
    with make_client(backend, max_upload_bytes=limit) as client:
        response = upload_model(client, samples.onnx, headers=tenant.headers)
        at_limit = upload_model(client, samples.onnx[:limit], headers=tenant.headers)
    assert response.status_code == 413
    assert "GRADHEALTH_MAX_UPLOAD_BYTES" in response.json()["error"]["message"]
    assert at_limit.status_code == 422  # within the limit: read, then refused as truncated
    with backend.database.session() as session:
        assert session.scalar(select(func.count()).select_from(Blob)) == 0
    assert not list((backend.settings.data_dir / "tmp").glob("upload-*"))


def test_missing_file_field_and_wrong_content_type(client: TestClient, samples: Samples) -> None:
    no_file = client.post("/v1/models", data={"name": "x"}, files={"other": ("a", b"b")})
    assert no_file.status_code == 422
    assert "'file'" in no_file.json()["error"]["message"]
    json_body = client.post("/v1/models", json={"file": "x"})
    assert json_body.status_code == 415
    assert json_body.json()["error"]["code"] == "unsupported_media_type"


def test_get_model_and_cross_tenant_404(
    client: TestClient, backend: Backend, other_tenant: TenantKey, samples: Samples
) -> None:
    model_id = upload_model(client, samples.onnx).json()["id"]
    assert client.get(f"/v1/models/{model_id}").json()["id"] == model_id
    with make_client(backend) as other:
        response = other.get(f"/v1/models/{model_id}", headers=other_tenant.headers)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_upload_needs_a_key(backend: Backend, samples: Samples) -> None:
    with make_client(backend) as client:
        assert upload_model(client, samples.onnx).status_code == 401


def test_a_declared_length_past_the_limit_is_refused_before_reading(
    backend: Backend, tenant: TenantKey
) -> None:
    body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="m"\r\n\r\nx\r\n--b--\r\n'
    headers = {
        **tenant.headers,
        "Content-Type": "multipart/form-data; boundary=b",
        "Content-Length": str(10**12),
    }
    with make_client(backend) as client:
        response = client.post("/v1/models", content=body, headers=headers)
    assert response.status_code == 413
    assert "declares" in response.json()["error"]["message"]

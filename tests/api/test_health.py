from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from tests.api.conftest import Samples
from tests.conftest import Backend, TenantKey, make_client


def test_healthz_needs_no_key(backend: Backend) -> None:
    with make_client(backend) as client:
        assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_is_ready_on_a_migrated_database(backend: Backend) -> None:
    with make_client(backend) as client:
        response = client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert body["revision"] == body["head"] is not None


def test_readyz_is_503_before_migrations(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, environment="test"))
    with TestClient(app) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["revision"] is None
    assert "gradhealth migrate" in response.json()["database"]


def test_metrics_count_requests_by_route_and_jobs_by_status(
    backend: Backend, tenant: TenantKey
) -> None:
    with make_client(backend) as client:
        client.get("/v1/diagnoses/abc", headers=tenant.headers)
        text = client.get("/metrics").text
    assert (
        'gradhealth_http_requests_total{method="GET",route="/v1/diagnoses/{diagnosis_id}",'
        'status="404"} 1.0' in text
    )
    assert "# TYPE gradhealth_jobs gauge" in text
    assert 'gradhealth_jobs{kind="diagnose",status="queued"} 0.0' in text


def test_metrics_show_the_queue_depth(client: TestClient, samples: Samples) -> None:
    model = client.post("/v1/models", files={"file": ("m.onnx", samples.onnx)}).json()
    batch = client.post("/v1/batches", files={"file": ("b.npz", samples.npz)}).json()
    for _ in range(2):
        client.post("/v1/diagnoses", json={"model_id": model["id"], "batch_id": batch["id"]})
    text = client.get("/metrics").text
    assert 'gradhealth_jobs{kind="diagnose",status="queued"} 2.0' in text
    assert 'gradhealth_jobs{kind="inspect",status="queued"} 1.0' in text


def test_unknown_route_answers_in_the_error_shape(backend: Backend) -> None:
    with make_client(backend) as client:
        response = client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_openapi_has_an_example_for_every_response_body(backend: Backend) -> None:
    with make_client(backend) as client:
        spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            ok = operation["responses"][next(iter(operation["responses"]))]
            content = ok.get("content", {})
            if "application/json" not in content:
                continue
            ref = content["application/json"]["schema"].get("$ref", "")
            name = ref.rsplit("/", 1)[-1]
            assert name and "examples" in schemas[name], (method, path, name)
    assert "HTTPBearer" in spec["components"]["securitySchemes"]

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from service.queue import claim, complete
from tests.api.conftest import Samples
from tests.api.helpers import model_and_batch, upload_model
from tests.conftest import Backend, TenantKey, make_client


@pytest.fixture
def ids(client: TestClient, samples: Samples) -> tuple[str, str]:
    return model_and_batch(client, samples.onnx, samples.npz)


def queue(client: TestClient, ids: tuple[str, str], **body: object) -> httpx.Response:
    return client.post("/v1/diagnoses", json={"model_id": ids[0], "batch_id": ids[1], **body})


def test_queue_answers_202_with_location_and_full_options(
    client: TestClient, ids: tuple[str, str]
) -> None:
    response = queue(client, ids, loss="cross_entropy", options={"verify_fixes": False})
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == f"/v1/diagnoses/{body['id']}"
    assert body["status"] == "queued"
    assert body["attempts"] == 0
    assert body["report"] is None and body["error"] is None
    assert body["options"]["loss"] == "cross_entropy"
    assert body["options"]["verify_fixes"] is False
    assert body["options"]["mode"] == "train"  # defaults stored: the row says what ran
    fetched = client.get(f"/v1/diagnoses/{body['id']}").json()
    assert fetched == body


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"loss": "hinge"}, "loss"),
        ({"mode": "inference"}, "mode"),
        ({"options": {"micro_batches": 0}}, "micro_batches"),
        ({"options": {"no_such_option": 1}}, "no_such_option"),
    ],
)
def test_bad_options_are_422_naming_the_field(
    client: TestClient, ids: tuple[str, str], body: dict[str, object], field: str
) -> None:
    response = queue(client, ids, **body)
    assert response.status_code == 422
    assert field in response.json()["error"]["message"]


def test_missing_ids_and_unknown_fields_are_422(client: TestClient) -> None:
    response = client.post("/v1/diagnoses", json={"model_id": "x", "colour": "red"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert "batch_id" in error["message"] and "colour" in error["message"]


def test_unknown_or_foreign_model_and_batch_are_404(
    client: TestClient, backend: Backend, other_tenant: TenantKey, ids: tuple[str, str]
) -> None:
    assert queue(client, ("nope", ids[1])).status_code == 404
    assert queue(client, (ids[0], "nope")).status_code == 404
    with make_client(backend) as other:
        other.headers.update(other_tenant.headers)
        assert queue(other, ids).status_code == 404


def test_idempotency_key_returns_the_first_answer(client: TestClient, ids: tuple[str, str]) -> None:
    headers = {"Idempotency-Key": "build-1234"}
    first = client.post(
        "/v1/diagnoses", json={"model_id": ids[0], "batch_id": ids[1]}, headers=headers
    )
    again = client.post(
        "/v1/diagnoses", json={"model_id": ids[0], "batch_id": ids[1]}, headers=headers
    )
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    different = client.post(
        "/v1/diagnoses",
        json={"model_id": ids[0], "batch_id": ids[1], "mode": "eval"},
        headers=headers,
    )
    assert different.status_code == 409
    listed = client.get("/v1/diagnoses").json()["items"]
    assert [d["id"] for d in listed] == [first.json()["id"]]


def test_idempotency_keys_are_per_tenant(
    client: TestClient, backend: Backend, other_tenant: TenantKey, samples: Samples
) -> None:
    with make_client(backend) as other:
        other.headers.update(other_tenant.headers)
        theirs = model_and_batch(other, samples.onnx, samples.npz)
        a = queue(other, theirs, options={})
    mine = model_and_batch(client, samples.onnx, samples.npz)
    headers = {"Idempotency-Key": "same"}
    r1 = client.post(
        "/v1/diagnoses", json={"model_id": mine[0], "batch_id": mine[1]}, headers=headers
    )
    with make_client(backend) as other:
        other.headers.update(other_tenant.headers)
        r2 = other.post(
            "/v1/diagnoses", json={"model_id": theirs[0], "batch_id": theirs[1]}, headers=headers
        )
    assert r1.status_code == r2.status_code == 202
    assert r1.json()["id"] != r2.json()["id"] != a.json()["id"]


def test_get_unknown_and_foreign_diagnosis_is_404(
    client: TestClient, backend: Backend, other_tenant: TenantKey, ids: tuple[str, str]
) -> None:
    diagnosis_id = queue(client, ids).json()["id"]
    assert client.get("/v1/diagnoses/0123").status_code == 404
    with make_client(backend) as other:
        other.headers.update(other_tenant.headers)
        assert other.get(f"/v1/diagnoses/{diagnosis_id}").status_code == 404
        assert other.post(f"/v1/diagnoses/{diagnosis_id}:cancel").status_code == 404
        assert other.get("/v1/diagnoses").json()["items"] == []


def test_inspection_jobs_are_not_client_diagnoses(
    client: TestClient, backend: Backend, ids: tuple[str, str]
) -> None:
    # The model upload queued an inspection job; it is not listed nor readable as a diagnosis.
    assert client.get("/v1/diagnoses").json()["items"] == []


def test_list_filters_and_pages_newest_first(
    client: TestClient, samples: Samples, ids: tuple[str, str]
) -> None:
    other_model = upload_model(client, samples.torchscript, name="ts").json()["id"]
    made = [queue(client, ids).json()["id"] for _ in range(5)]
    made.append(queue(client, (other_model, ids[1])).json()["id"])
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, str | int] = {"model_id": ids[0], "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/diagnoses", params=params).json()
        assert len(page["items"]) <= 2
        assert all("report" not in item for item in page["items"])
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(made[:5]))
    cancelled = client.post(f"/v1/diagnoses/{made[0]}:cancel").json()["id"]
    only = client.get("/v1/diagnoses", params={"status": "cancelled"}).json()["items"]
    assert [d["id"] for d in only] == [cancelled]


def test_bad_cursor_and_status_are_422(client: TestClient) -> None:
    assert client.get("/v1/diagnoses", params={"cursor": "!!"}).status_code == 422
    assert client.get("/v1/diagnoses", params={"status": "sleeping"}).status_code == 422
    assert client.get("/v1/diagnoses", params={"limit": 0}).status_code == 422


def test_cancel_queued_running_and_finished(
    client: TestClient, backend: Backend, ids: tuple[str, str]
) -> None:
    queued = queue(client, ids).json()["id"]
    response = client.post(f"/v1/diagnoses/{queued}:cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert response.json()["error"]["code"] == "cancelled"
    assert client.post(f"/v1/diagnoses/{queued}:cancel").status_code == 200  # idempotent

    running = queue(client, ids).json()["id"]
    with backend.database.session() as session:
        # Claim the inspection first, then the diagnosis: oldest first.
        claimed = [claim(session, "w1", lease_s=60), claim(session, "w1", lease_s=60)]
        session.commit()
    assert claimed[1] is not None and claimed[1].id == running
    body = client.post(f"/v1/diagnoses/{running}:cancel").json()
    assert body["cancel_requested"] is True

    done = queue(client, ids).json()["id"]
    with backend.database.session() as session:
        job = claim(session, "w1", lease_s=60)
        assert job is not None and job.id == done
        complete(session, done, report={"report_version": "1"}, verdict="healthy")
        session.commit()
    finished = client.post(f"/v1/diagnoses/{done}:cancel")
    assert finished.status_code == 409
    got = client.get(f"/v1/diagnoses/{done}").json()
    assert (got["status"], got["verdict"], got["report"]) == (
        "succeeded",
        "healthy",
        {"report_version": "1"},
    )
    assert got["started_at"] is not None and got["finished_at"] is not None


def _run(client: TestClient, samples: Samples, **fields: str) -> httpx.Response:
    return client.post(
        "/v1/diagnoses:run",
        files={"model": ("net.pt2", samples.torch_export), "batch": ("b.npz", samples.npz)},
        data=fields,
        headers={k: v for k, v in fields.items() if k == "Idempotency-Key"},
    )


def test_run_uploads_both_and_queues(client: TestClient, samples: Samples) -> None:
    response = _run(client, samples, loss="mse", options=json.dumps({"verify_fixes": False}))
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["options"]["loss"] == "mse" and body["options"]["verify_fixes"] is False
    model = client.get(f"/v1/models/{body['model_id']}").json()
    assert (model["name"], model["format"], model["version"]) == ("net", "torch_export", 1)
    batch = client.get(f"/v1/batches/{body['batch_id']}").json()
    assert [a["name"] for a in batch["arrays"]] == ["x", "target"]
    # Same bytes again: the model's latest version is reused, not a new version per run.
    again = _run(client, samples).json()
    assert again["model_id"] == body["model_id"] and again["id"] != body["id"]


def test_run_errors(backend: Backend, client: TestClient, samples: Samples) -> None:
    bad_json = _run(client, samples, options="{not json")
    assert bad_json.status_code == 422
    assert bad_json.json()["error"]["code"] == "bad_options"
    bad_loss = _run(client, samples, loss="hinge")
    assert bad_loss.status_code == 422
    only_model = client.post("/v1/diagnoses:run", files={"model": ("m", samples.onnx)})
    assert only_model.status_code == 422
    assert "'batch'" in only_model.json()["error"]["message"]
    swapped = client.post(
        "/v1/diagnoses:run", files={"model": ("b.npz", samples.npz), "batch": ("m", samples.npz)}
    )
    assert swapped.status_code == 422
    assert swapped.json()["error"]["code"] == "bad_model"
    assert client.get("/v1/diagnoses").json()["items"] == []


def test_run_is_idempotent_and_413_past_the_limit(
    backend: Backend, tenant: TenantKey, client: TestClient, samples: Samples
) -> None:
    first = _run(client, samples, **{"Idempotency-Key": "ci-7"}).json()
    second = _run(client, samples, **{"Idempotency-Key": "ci-7"}).json()
    assert first["id"] == second["id"]
    with make_client(backend, max_upload_bytes=len(samples.npz) + 1) as small:
        small.headers.update(tenant.headers)
        assert _run(small, samples).status_code == 413

"""/v1/schedules: create, list, read, change and delete recurring health checks, on Postgres
and SQLite; validation errors name the field; another tenant's schedule answers 404."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi.testclient import TestClient

from tests.api.conftest import Samples
from tests.api.helpers import upload_batch, upload_model
from tests.conftest import Backend, TenantKey, make_client


def _uploads(client: TestClient, samples: Samples) -> tuple[str, str]:
    model = upload_model(client, samples.onnx, name="nightly-net")
    batch = upload_batch(client, samples.npz)
    assert model.status_code == 201 and batch.status_code == 201
    return "nightly-net", batch.json()["id"]


def _create(client: TestClient, samples: Samples, **fields: Any) -> Any:
    name, batch_id = _uploads(client, samples)
    body = {"model_name": name, "batch_id": batch_id, "cron": "0 3 * * *", **fields}
    return client.post("/v1/schedules", json=body)


def test_create_returns_the_schedule_with_its_next_run(
    client: TestClient, samples: Samples
) -> None:
    response = _create(
        client,
        samples,
        timezone="Europe/Berlin",
        loss="cross_entropy",
        webhook_url="http://127.0.0.1:9/hook",
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert response.headers["Location"] == f"/v1/schedules/{body['id']}"
    assert (body["cron"], body["timezone"], body["enabled"]) == ("0 3 * * *", "Europe/Berlin", True)
    assert body["options"]["loss"] == "cross_entropy" and body["options"]["mode"] == "train"
    # 03:00 in Berlin is 02:00 UTC in November (CET, UTC+1).
    next_run = datetime.fromisoformat(body["next_run_at"].replace("Z", "+00:00"))
    assert (next_run.hour, next_run.minute) == (2, 0)
    assert body["last_run_at"] is None and body["last_diagnosis_id"] is None
    assert client.get(f"/v1/schedules/{body['id']}").json() == body


def test_bad_cron_timezone_and_webhook_answer_422_naming_the_field(
    client: TestClient, samples: Samples
) -> None:
    name, batch_id = _uploads(client, samples)
    base = {"model_name": name, "batch_id": batch_id, "cron": "0 3 * * *"}
    cases = [
        ({"cron": "61 * * * *"}, "cron:"),
        ({"cron": "0 0 * * * *"}, "cron:"),
        ({"timezone": "Mars/Olympus"}, "timezone:"),
        ({"webhook_url": "ftp://example.com/x"}, "webhook_url:"),
        ({"mode": "sideways"}, "mode"),
    ]
    for change, named in cases:
        response = client.post("/v1/schedules", json={**base, **change})
        assert response.status_code == 422, (change, response.text)
        assert named in response.json()["error"]["message"], (change, response.text)
    assert client.get("/v1/schedules").json()["items"] == []


def test_unknown_model_name_or_batch_answers_404(client: TestClient, samples: Samples) -> None:
    name, batch_id = _uploads(client, samples)
    response = client.post(
        "/v1/schedules", json={"model_name": "nope", "batch_id": batch_id, "cron": "* * * * *"}
    )
    assert response.status_code == 404 and "nope" in response.json()["error"]["message"]
    response = client.post(
        "/v1/schedules", json={"model_name": name, "batch_id": "0" * 32, "cron": "* * * * *"}
    )
    assert response.status_code == 404 and "batch" in response.json()["error"]["message"]


def test_patch_changes_only_what_is_sent_and_retimes_on_cron_or_timezone(
    client: TestClient, samples: Samples
) -> None:
    created = _create(client, samples, webhook_url="http://127.0.0.1:9/hook").json()
    path = f"/v1/schedules/{created['id']}"
    changed = client.patch(path, json={"timezone": "America/New_York"})
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert body["cron"] == "0 3 * * *" and body["webhook_url"] == created["webhook_url"]
    # 03:00 in New York is 08:00 UTC in November (EST, UTC-5).
    assert datetime.fromisoformat(body["next_run_at"].replace("Z", "+00:00")).hour == 8
    body = client.patch(path, json={"cron": "30 6 * * 1-5", "webhook_url": None}).json()
    assert body["cron"] == "30 6 * * 1-5" and body["webhook_url"] is None
    assert datetime.fromisoformat(body["next_run_at"].replace("Z", "+00:00")).minute == 30
    body = client.patch(path, json={"enabled": False, "precision": "bf16"}).json()
    assert body["enabled"] is False and body["options"]["precision"] == "bf16"
    assert body["options"]["mode"] == "train"  # the stored options stay
    bad = client.patch(path, json={"cron": "every day"})
    assert bad.status_code == 422 and "cron:" in bad.json()["error"]["message"]
    null = client.patch(path, json={"cron": None})
    assert null.status_code == 422 and "cron:" in null.json()["error"]["message"]
    assert client.get(path).json()["cron"] == "30 6 * * 1-5"


def test_delete_then_404(client: TestClient, samples: Samples) -> None:
    created = _create(client, samples).json()
    path = f"/v1/schedules/{created['id']}"
    assert client.delete(path).status_code == 204
    assert client.get(path).status_code == 404
    assert client.delete(path).status_code == 404


def test_list_pages_newest_first(client: TestClient, samples: Samples) -> None:
    name, batch_id = _uploads(client, samples)
    made = []
    for minute in range(5):
        body = {"model_name": name, "batch_id": batch_id, "cron": f"{minute} * * * *"}
        made.append(client.post("/v1/schedules", json=body).json()["id"])
    seen, cursor = [], None
    while True:
        page = client.get(
            "/v1/schedules", params={"limit": 2, **({"cursor": cursor} if cursor else {})}
        ).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(made))
    assert client.get("/v1/schedules", params={"cursor": "junk"}).status_code == 422


def test_another_tenant_sees_404(
    backend: Backend, client: TestClient, samples: Samples, other_tenant: TenantKey
) -> None:
    created = _create(client, samples).json()
    path = f"/v1/schedules/{created['id']}"
    with make_client(backend) as other:
        other.headers.update(other_tenant.headers)
        assert other.get(path).status_code == 404
        assert other.patch(path, json={"enabled": False}).status_code == 404
        assert other.delete(path).status_code == 404
        assert other.get("/v1/schedules").json()["items"] == []
        # Nor can another tenant schedule this tenant's model name or batch.
        body = {
            "model_name": created["model_name"],
            "batch_id": created["batch_id"],
            "cron": "* * * * *",
        }
        assert other.post("/v1/schedules", json=body).status_code == 404
    assert client.get(path).json()["enabled"] is True


def test_openapi_documents_the_schedule_endpoints(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"post", "get"} <= set(spec["paths"]["/v1/schedules"])
    assert {"get", "patch", "delete"} <= set(spec["paths"]["/v1/schedules/{schedule_id}"])
    assert spec["components"]["schemas"]["ScheduleOut"]["examples"]

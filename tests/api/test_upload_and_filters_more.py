"""More API edges: crons that never fire, unusable ONNX zip bundles refused at upload, repeated
list filters, and an OpenAPI UI that loads nothing from the network."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import Samples
from tests.api.helpers import upload_batch, upload_model
from tests.conftest import Backend

NEVER_FIRES = ["0 0 30 2 *", "0 0 31 2 *", "0 0 31 4,6 *"]


def _schedule_body(client: TestClient, samples: Samples, **fields: Any) -> dict[str, Any]:
    model = upload_model(client, samples.onnx, name="nightly-net")
    batch = upload_batch(client, samples.npz)
    assert model.status_code == 201 and batch.status_code == 201
    return {
        "model_name": "nightly-net",
        "batch_id": batch.json()["id"],
        "cron": "0 3 * * *",
        **fields,
    }


@pytest.mark.parametrize("cron", NEVER_FIRES)
def test_a_cron_that_never_fires_answers_422_on_create(
    client: TestClient, samples: Samples, cron: str
) -> None:
    response = client.post("/v1/schedules", json=_schedule_body(client, samples, cron=cron))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "bad_schedule"
    assert "cron:" in error["message"] and "never matches a date" in error["message"]
    assert client.get("/v1/schedules").json()["items"] == []


def test_a_cron_that_never_fires_answers_422_on_patch(client: TestClient, samples: Samples) -> None:
    created = client.post("/v1/schedules", json=_schedule_body(client, samples))
    assert created.status_code == 201, created.text
    schedule_id = created.json()["id"]
    response = client.patch(f"/v1/schedules/{schedule_id}", json={"cron": "0 0 30 2 *"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "bad_schedule"
    assert "never matches a date" in response.json()["error"]["message"]
    assert client.get(f"/v1/schedules/{schedule_id}").json()["cron"] == "0 3 * * *"
    # a leap day is fine: it fires every four years
    leap = client.patch(f"/v1/schedules/{schedule_id}", json={"cron": "0 0 29 2 *"})
    assert leap.status_code == 200, leap.text


# -- ONNX zip bundles are checked at upload ----------------------------------------------------


def _external_bundle_files(samples: Samples, tmp_path: Path) -> tuple[bytes, bytes]:
    """(model.onnx naming model.onnx.data, model.onnx.data), as torch.onnx.export writes."""
    import onnx

    folder = tmp_path / "external"
    folder.mkdir()
    onnx.save_model(
        onnx.load_from_string(samples.onnx),
        str(folder / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    return (folder / "model.onnx").read_bytes(), (folder / "model.onnx.data").read_bytes()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_a_complete_bundle_is_accepted(
    client: TestClient, samples: Samples, tmp_path: Path
) -> None:
    model, data = _external_bundle_files(samples, tmp_path)
    bundle = _zip({"model.onnx": model, "model.onnx.data": data})
    response = client.post("/v1/models", files={"file": ("model.zip", bundle)})
    assert response.status_code == 201, response.text
    assert response.json()["format"] == "onnx"


@pytest.mark.parametrize(
    ("case", "named"),
    [
        ("without_data", "does not hold"),
        ("slip", "goes outside the bundle"),
        ("absolute", "absolute path"),
        ("short_data", "lies outside the file"),
        ("data_in_other_folder", "does not hold"),
    ],
)
def test_an_unusable_bundle_answers_422_at_upload(
    client: TestClient, samples: Samples, tmp_path: Path, case: str, named: str
) -> None:
    model, data = _external_bundle_files(samples, tmp_path)
    members = {
        "without_data": {"model.onnx": model},
        "slip": {"model.onnx": model, "model.onnx.data": data, "../../evil.onnx.data": b"x"},
        "absolute": {"model.onnx": model, "model.onnx.data": data, "/etc/evil.data": b"x"},
        "short_data": {"model.onnx": model, "model.onnx.data": data[: len(data) // 2]},
        "data_in_other_folder": {"sub/model.onnx": model, "model.onnx.data": data},
    }[case]
    bundle = _zip(members)
    response = client.post("/v1/models", files={"file": ("model.zip", bundle)})
    assert response.status_code == 422, response.text
    assert named in response.json()["error"]["message"], response.text
    assert client.get("/v1/models").json()["items"] == []
    one_shot = client.post(
        "/v1/diagnoses:run",
        files={"model": ("model.zip", bundle), "batch": ("batch.npz", samples.npz)},
    )
    assert one_shot.status_code == 422, one_shot.text
    assert named in one_shot.json()["error"]["message"], one_shot.text


# -- the OpenAPI UIs load nothing from the network -----------------------------------------------


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_openapi_ui_loads_only_local_assets(client: TestClient, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200, response.text
    html = response.text
    hosts = re.findall(r"https?://[^\s\"'<>)]+", html)
    assert hosts == [], hosts  # no CDN, no Google Fonts: an air-gapped machine gets the page
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert any(a.endswith(".js") for a in assets), assets
    for asset in assets:
        assert asset.startswith("/"), asset
        fetched = client.get(asset)
        assert fetched.status_code == 200, (asset, fetched.status_code)
        assert fetched.content
    assert client.get("/openapi.json").status_code == 200


# -- repeated list filters -------------------------------------------------------------------


def _diagnoses_with_statuses(
    client: TestClient, backend: Backend, samples: Samples, statuses: list[str]
) -> dict[str, str]:
    """Diagnoses (oldest first) put in `statuses`: id → status."""
    from sqlalchemy import update

    from service.db.models import Diagnosis

    model = upload_model(client, samples.onnx).json()["id"]
    batch = upload_batch(client, samples.npz).json()["id"]
    made: dict[str, str] = {}
    for status in statuses:
        response = client.post("/v1/diagnoses", json={"model_id": model, "batch_id": batch})
        assert response.status_code == 202, response.text
        made[response.json()["id"]] = status
    with backend.database.session() as session:
        for diagnosis_id, status in made.items():
            session.execute(
                update(Diagnosis).where(Diagnosis.id == diagnosis_id).values(status=status)
            )
        session.commit()
    return made


def _listed(client: TestClient, query: str) -> list[str]:
    """Every id `GET /v1/diagnoses?{query}` hands out, following next_cursor."""
    seen: list[str] = []
    cursor = ""
    while True:
        response = client.get(f"/v1/diagnoses?{query}{cursor}")
        assert response.status_code == 200, response.text
        body = response.json()
        seen += [item["id"] for item in body["items"]]
        if body["next_cursor"] is None:
            return seen
        cursor = f"&cursor={body['next_cursor']}"


def test_repeated_status_filters_match_any_of_them(
    client: TestClient, backend: Backend, samples: Samples
) -> None:
    statuses = ["failed", "succeeded", "cancelled", "failed", "queued", "cancelled", "failed"]
    made = _diagnoses_with_statuses(client, backend, samples, statuses)
    everything = _listed(client, "limit=50")
    wanted = [i for i in everything if made[i] in ("failed", "cancelled")]
    assert len(wanted) == 5
    assert _listed(client, "status=failed&status=cancelled") == wanted
    # pages of two follow the same order, nothing lost or repeated
    assert _listed(client, "status=cancelled&status=failed&limit=2") == wanted
    assert _listed(client, "status=failed&status=failed") == [
        i for i in everything if made[i] == "failed"
    ]
    other_model = upload_model(client, samples.onnx, name="other").json()["id"]
    model_id = client.get(f"/v1/diagnoses/{wanted[0]}").json()["model_id"]
    assert _listed(client, f"model_id={model_id}&model_id={other_model}&status=failed") == [
        i for i in everything if made[i] == "failed"
    ]
    bad = client.get("/v1/diagnoses?status=failed&status=sideways")
    assert bad.status_code == 422, bad.text


def test_a_single_valued_query_parameter_given_twice_answers_422(client: TestClient) -> None:
    for path in ("/v1/diagnoses?limit=1&limit=2", "/v1/models?name=a&name=b"):
        response = client.get(path)
        assert response.status_code == 422, (path, response.text)
        message = response.json()["error"]["message"]
        assert "given 2 times" in message, message

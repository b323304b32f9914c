"""GET /v1/models/{id}/history on Postgres and SQLite: a model name's succeeded diagnoses over
time with per-layer changes, from real engine reports of two versions of an MLP (a healthy
He-initialised one, 10 layers deep, and an exploding one at twice He's scale, 12 deep)."""

from __future__ import annotations

import copy
import itertools
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from service.api.history import LAYER_CHANGE_FACTOR, is_large_change, norm_ratio
from service.db.models import Diagnosis
from service.queue import KIND_DIAGNOSE, KIND_INSPECT, claim, complete, complete_inspection, fail
from tests.conftest import Backend, TenantKey, make_client

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


@pytest.fixture(scope="session")
def cases() -> dict[str, Any]:
    """'calm' and 'boom': (model bytes, the engine's report on 'batch') each; 'batch' and
    'other_batch': two batches' bytes."""
    from torch import nn

    from service.engine.options import DiagnoseOptions
    from service.engine.pipeline import diagnose
    from tests.support.pathologies import BATCH, MLP, WIDTH, Case, _normal_init, he_std

    builds = {
        "calm": lambda _s: MLP(10, nn.ReLU, init=_normal_init(he_std)),
        "boom": lambda _s: MLP(12, nn.ReLU, init=_normal_init(lambda n: 2.0 * he_std(n))),
    }
    batch = Case("calm", builds["calm"], (BATCH, WIDTH)).batch_bytes()
    other_batch = Case("calm", builds["calm"], (BATCH, WIDTH)).batch_bytes(seed=1)
    out: dict[str, Any] = {"batch": batch, "other_batch": other_batch}
    options = DiagnoseOptions.model_validate({"verify_fixes": False})
    for name, build in builds.items():
        model = Case(name, build, (BATCH, WIDTH)).model_bytes("torch_export")
        out[name] = (model, diagnose(model, batch, options).to_jsonable())
    return out


def upload(client: TestClient, model: bytes, name: str = "mlp") -> dict[str, Any]:
    response = client.post("/v1/models", files={"file": ("m.pt2", model)}, data={"name": name})
    assert response.status_code == 201, response.text
    return dict(response.json())


def upload_batch(client: TestClient, batch: bytes) -> str:
    response = client.post("/v1/batches", files={"file": ("b.npz", batch)})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def queue(client: TestClient, model_id: str, batch_id: str) -> str:
    response = client.post("/v1/diagnoses", json={"model_id": model_id, "batch_id": batch_id})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def claim_it(backend: Backend, diagnosis_id: str) -> None:
    with backend.database.session() as session:
        job = claim(session, "test-worker", lease_s=60, kinds=(KIND_DIAGNOSE,))
        session.commit()
    assert job is not None and job.id == diagnosis_id


def succeed(
    backend: Backend,
    client: TestClient,
    model_id: str,
    batch_id: str,
    report: dict[str, Any],
    finished_at: datetime,
) -> str:
    """A diagnosis that a worker completed with `report` at `finished_at`."""
    diagnosis_id = queue(client, model_id, batch_id)
    claim_it(backend, diagnosis_id)
    with backend.database.session() as session:
        assert complete(session, diagnosis_id, report=report, verdict=report["verdict"])
        session.execute(
            update(Diagnosis).where(Diagnosis.id == diagnosis_id).values(finished_at=finished_at)
        )
        session.commit()
    return diagnosis_id


def history(client: TestClient, model_id: str, **params: Any) -> dict[str, Any]:
    response = client.get(f"/v1/models/{model_id}/history", params=params)
    assert response.status_code == 200, response.text
    return dict(response.json())


def all_pages(client: TestClient, model_id: str, **params: Any) -> list[list[dict[str, Any]]]:
    pages, cursor = [], None
    while True:
        body = history(client, model_id, **({"cursor": cursor} if cursor else {}), **params)
        pages.append(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages


def layer(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(entry for entry in report["layers"] if entry["name"] == name)


def kinds(report: dict[str, Any]) -> set[str]:
    return {finding["kind"] for finding in report["findings"]}


def test_versions_compared_per_layer_from_real_reports(
    client: TestClient, backend: Backend, cases: dict[str, Any]
) -> None:
    (calm_model, calm), (boom_model, boom) = cases["calm"], cases["boom"]
    assert "exploding_gradients" in kinds(boom) and "exploding_gradients" not in kinds(calm)
    batch_id = upload_batch(client, cases["batch"])
    v1, v2 = upload(client, calm_model), upload(client, boom_model)
    v3 = upload(client, calm_model)  # the fix shipped: the first version's bytes again
    assert [v1["version"], v2["version"], v3["version"]] == [1, 2, 3]
    ids = [
        succeed(backend, client, v["id"], batch_id, report, T0 + timedelta(hours=i))
        for i, (v, report) in enumerate([(v1, calm), (v2, boom), (v3, calm)])
    ]

    body = history(client, v1["id"])  # any version's id gives the name's history
    assert body["name"] == "mlp" and body["model_id"] == v1["id"]
    assert body["change_factor"] == LAYER_CHANGE_FACTOR and body["next_cursor"] is None
    newest, middle, oldest = body["items"]
    assert [e["diagnosis_id"] for e in body["items"]] == ids[::-1]
    assert [e["model_version"] for e in body["items"]] == [3, 2, 1]
    assert [e["model_id"] for e in body["items"]] == [v3["id"], v2["id"], v1["id"]]
    assert oldest["changes"] is None

    # Each entry: verdict, counts, findings and the compact layer view of its report.
    assert middle["verdict"] == boom["verdict"] == "unhealthy"
    assert middle["batch_id"] == batch_id
    assert middle["finished_at"].startswith("2026-11-01T10:00:00")
    assert middle["counts"] == {
        "errors": sum(f["severity"] == "error" for f in boom["findings"]),
        "warnings": sum(f["severity"] == "warning" for f in boom["findings"]),
        "info": sum(f["severity"] == "info" for f in boom["findings"]),
    }
    assert [(f["kind"], f["severity"], f["layers"]) for f in middle["findings"]] == [
        (f["kind"], f["severity"], f["layers"]) for f in boom["findings"]
    ]
    assert [entry["name"] for entry in middle["layers"]] == [x["name"] for x in boom["layers"]]
    fc3 = middle["layers"][3]
    assert fc3["grad_norm"] == layer(boom, "fc3")["grad_norm"]
    assert fc3["activation_grad_norm"] == layer(boom, "fc3")["activation_grad_norm"]
    assert fc3["dead_fraction"] == layer(boom, "fc3")["activation_stats"]["dead_fraction"]
    assert "parameters" not in middle and "recommendations" not in middle

    # v1 → v2: the explosion appeared, two layers were added, the early layers' norms grew.
    change = middle["changes"]
    assert change["compared_with"] == ids[0] and change["compared_with_version"] == 1
    assert "exploding_gradients" in change["findings_appeared"]
    assert set(change["findings_appeared"]) == kinds(boom) - kinds(calm)
    assert set(change["findings_resolved"]) == kinds(calm) - kinds(boom)
    assert change["layers_added"] == ["fc10", "fc11"] and change["layers_removed"] == []
    shared = [x["name"] for x in calm["layers"]]
    assert [entry["name"] for entry in change["layers"]] == shared
    for entry in change["layers"]:
        expected = layer(boom, entry["name"])["grad_norm"] / layer(calm, entry["name"])["grad_norm"]
        assert entry["grad_norm_ratio"] == pytest.approx(expected, rel=1e-12)
        grew = is_large_change(expected) or is_large_change(entry["activation_grad_norm_ratio"])
        assert entry["flagged"] is grew
    fc0 = change["layers"][0]
    assert fc0["name"] == "fc0" and fc0["grad_norm_ratio"] >= LAYER_CHANGE_FACTOR
    assert fc0["flagged"] and "fc0" in change["flagged_layers"]
    assert change["flagged_layers"] == [x["name"] for x in change["layers"] if x["flagged"]]

    # v2 → v3: the explosion resolved, the two layers removed, the norms back down.
    back = newest["changes"]
    assert back["compared_with"] == ids[1] and back["compared_with_version"] == 2
    assert "exploding_gradients" in back["findings_resolved"]
    assert back["layers_removed"] == ["fc10", "fc11"] and back["layers_added"] == []
    assert back["layers"][0]["grad_norm_ratio"] == pytest.approx(1 / fc0["grad_norm_ratio"])
    assert back["flagged_layers"] == change["flagged_layers"]


def test_layer_views_keep_what_moved_or_nothing(
    client: TestClient, backend: Backend, cases: dict[str, Any]
) -> None:
    """`layers=flagged`: each entry's layers and layer changes cut to the flagged and added
    layers; `layers=none`: no per-layer figures; everything else as with `layers=all`."""
    calm_model, calm = cases["calm"]
    jumped = copy.deepcopy(calm)  # the same model again, one layer's gradient 20× larger
    layer(jumped, "fc3")["grad_norm"] *= 20
    batch_id = upload_batch(client, cases["batch"])
    v1, v2 = upload(client, calm_model), upload(client, calm_model)
    for i, (version, report) in enumerate([(v1, calm), (v2, jumped)]):
        succeed(backend, client, version["id"], batch_id, report, T0 + timedelta(hours=i))
    full = history(client, v1["id"])
    flagged = history(client, v1["id"], layers="flagged")
    bare = history(client, v1["id"], layers="none")
    assert full["items"][0]["changes"]["flagged_layers"] == ["fc3"]
    assert len(full["items"][0]["layers"]) == len(calm["layers"]) > 1
    newest = flagged["items"][0]
    assert [x["name"] for x in newest["layers"]] == ["fc3"]
    assert newest["layers"][0] == full["items"][0]["layers"][3]
    assert [x["name"] for x in newest["changes"]["layers"]] == ["fc3"]
    assert flagged["items"][1]["layers"] == []  # the oldest: nothing to compare with
    assert all(entry["layers"] == [] for entry in bare["items"])
    assert bare["items"][0]["changes"]["layers"] == []
    for view in (flagged, bare):  # the rest of each entry is the full view's
        for entry, whole in zip(view["items"], full["items"], strict=True):
            assert {k: v for k, v in entry.items() if k not in ("layers", "changes")} == {
                k: v for k, v in whole.items() if k not in ("layers", "changes")
            }
            if whole["changes"] is not None:
                assert {k: v for k, v in entry["changes"].items() if k != "layers"} == {
                    k: v for k, v in whole["changes"].items() if k != "layers"
                }


def test_severity_change_and_non_finite_norms(
    client: TestClient, backend: Backend, cases: dict[str, Any]
) -> None:
    model, calm = cases["calm"]
    broken = copy.deepcopy(calm)
    layer(broken, "fc1")["grad_norm"] = "inf"  # as the engine writes a non-finite norm
    layer(broken, "fc2")["grad_norm"] = 0.0
    dead = next(f for f in broken["findings"] if f["kind"] == "dead_units")
    dead["severity"] = "error" if dead["severity"] != "error" else "warning"
    before = next(f for f in calm["findings"] if f["kind"] == "dead_units")["severity"]
    batch_id = upload_batch(client, cases["batch"])
    v1, v2 = upload(client, model), upload(client, model)
    succeed(backend, client, v1["id"], batch_id, calm, T0)
    succeed(backend, client, v2["id"], batch_id, broken, T0 + timedelta(minutes=5))

    newest = history(client, v2["id"])["items"][0]
    assert newest["layers"][1]["grad_norm"] == "inf"
    change = newest["changes"]
    assert change["severity_changed"] == [
        {"kind": "dead_units", "before": before, "after": dead["severity"]}
    ]
    assert change["findings_appeared"] == [] and change["findings_resolved"] == []
    by_name = {entry["name"]: entry for entry in change["layers"]}
    assert by_name["fc1"]["grad_norm_ratio"] == "inf" and by_name["fc1"]["flagged"]
    assert by_name["fc2"]["grad_norm_ratio"] == 0.0 and by_name["fc2"]["flagged"]
    assert by_name["fc3"]["grad_norm_ratio"] == 1.0 and not by_name["fc3"]["flagged"]
    assert change["flagged_layers"] == ["fc1", "fc2"]


def seven_runs(
    backend: Backend, client: TestClient, cases: dict[str, Any]
) -> tuple[str, list[str]]:
    """Seven diagnoses of one name, alternating calm and boom reports, an hour apart from T0
    (returned newest first), plus the model id of the first version."""
    batch_id = upload_batch(client, cases["batch"])
    first = upload(client, cases["calm"][0])["id"]
    ids = []
    for i in range(7):
        model, report = cases["boom" if i % 2 else "calm"]
        model_id = first if i == 0 else upload(client, model)["id"]
        ids.append(succeed(backend, client, model_id, batch_id, report, T0 + timedelta(hours=i)))
    return first, ids[::-1]


def test_pages_follow_each_other_and_compare_across_page_boundaries(
    client: TestClient, backend: Backend, cases: dict[str, Any]
) -> None:
    model_id, newest_first = seven_runs(backend, client, cases)
    pages = all_pages(client, model_id, limit=3)
    assert [len(page) for page in pages] == [3, 3, 1]
    flat = [entry for page in pages for entry in page]
    assert [entry["diagnosis_id"] for entry in flat] == newest_first
    finished = [entry["finished_at"] for entry in flat]
    assert finished == sorted(finished, reverse=True)
    # Every entry is compared with the next older one, across page boundaries too.
    for newer, older in itertools.pairwise(flat):
        assert newer["changes"]["compared_with"] == older["diagnosis_id"]
    assert flat[-1]["changes"] is None
    whole = history(client, model_id)["items"]
    assert whole == flat  # the same entries, the same changes, whatever the page size


def test_since_until_and_batch_id_filter_the_list(
    client: TestClient, backend: Backend, cases: dict[str, Any]
) -> None:
    model_id, newest_first = seven_runs(backend, client, cases)  # T0 + 6h … T0 + 0h
    window = history(
        client,
        model_id,
        since=(T0 + timedelta(hours=2)).isoformat(),
        until=(T0 + timedelta(hours=5)).isoformat(),
    )["items"]
    assert [entry["diagnosis_id"] for entry in window] == newest_first[2:5]  # 4h, 3h, 2h
    # The window does not cut off the baseline: the 2h entry is compared with the 1h one.
    assert window[-1]["changes"]["compared_with"] == newest_first[5]
    naive = history(client, model_id, since="2026-11-01T14:00:00")["items"]  # no offset: UTC
    assert [entry["diagnosis_id"] for entry in naive] == newest_first[:2]
    paged = all_pages(client, model_id, since=(T0 + timedelta(hours=1)).isoformat(), limit=2)
    assert [len(page) for page in paged] == [2, 2, 2]
    assert history(client, model_id, since="2026-12-01T00:00:00Z")["items"] == []

    # Another batch: its own list, compared only within it.
    other_batch = upload_batch(client, cases["other_batch"])
    later = [
        succeed(backend, client, model_id, other_batch, cases["calm"][1], T0 + timedelta(days=i))
        for i in (1, 2)
    ]
    only = history(client, model_id, batch_id=other_batch)["items"]
    assert [entry["diagnosis_id"] for entry in only] == later[::-1]
    assert only[0]["changes"]["compared_with"] == later[0] and only[1]["changes"] is None
    assert history(client, model_id)["items"][2]["diagnosis_id"] == newest_first[0]


def test_only_this_tenants_succeeded_diagnoses_of_this_name(
    client: TestClient,
    backend: Backend,
    cases: dict[str, Any],
    other_tenant: TenantKey,
) -> None:
    model, report = cases["calm"]
    batch_id = upload_batch(client, cases["batch"])
    mine = upload(client, model)["id"]
    with backend.database.session() as session:  # the upload's inspection job: not a diagnosis
        inspection = claim(session, "test-worker", lease_s=60, kinds=(KIND_INSPECT,))
        session.commit()
    assert inspection is not None and inspection.model_id == mine
    with backend.database.session() as session:
        assert complete_inspection(session, inspection.id, report["model"])
        session.commit()
    done = succeed(backend, client, mine, batch_id, report, T0)
    failed = queue(client, mine, batch_id)
    claim_it(backend, failed)
    with backend.database.session() as session:
        assert fail(session, failed, code="bad_batch", message="no", retry=False) == "failed"
        session.commit()
    other_name = upload(client, model, name="another")["id"]
    succeed(backend, client, other_name, batch_id, report, T0 + timedelta(hours=1))
    with make_client(backend) as other:
        other.headers.update(other_tenant.headers)
        foreign = upload(other, model)["id"]  # the same name in another tenant
        theirs = succeed(backend, other, foreign, upload_batch(other, cases["batch"]), report, T0)
        response = other.get(f"/v1/models/{mine}/history")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
        assert [e["diagnosis_id"] for e in history(other, foreign)["items"]] == [theirs]
    queue(client, mine, batch_id)  # still queued
    assert [entry["diagnosis_id"] for entry in history(client, mine)["items"]] == [done]


def test_unknown_model_is_404_in_the_error_shape(client: TestClient) -> None:
    response = client.get("/v1/models/nope/history")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "not_found" and "nope" in error["message"]


def test_a_model_without_diagnoses_has_an_empty_history(
    client: TestClient, cases: dict[str, Any]
) -> None:
    model_id = upload(client, cases["calm"][0])["id"]
    assert history(client, model_id) == {
        "model_id": model_id,
        "name": "mlp",
        "change_factor": LAYER_CHANGE_FACTOR,
        "items": [],
        "next_cursor": None,
    }


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"limit": 0}, "limit"),
        ({"limit": 201}, "limit"),
        ({"since": "yesterday"}, "since"),
        ({"until": "2026-13-01"}, "until"),
        ({"since": "2026-11-01T09:00:00 00:00"}, "%2B"),  # an unencoded '+' became a space
        ({"since": "2026-11-02T00:00:00Z", "until": "2026-11-01T00:00:00Z"}, "until"),
        ({"layers": "some"}, "layers"),
    ],
)
def test_bad_parameters_are_422_naming_them(
    client: TestClient, cases: dict[str, Any], params: dict[str, Any], named: str
) -> None:
    model_id = upload(client, cases["calm"][0])["id"]
    response = client.get(f"/v1/models/{model_id}/history", params=params)
    assert response.status_code == 422, response.text
    assert named in response.json()["error"]["message"]


def test_openapi_documents_the_history_with_an_example(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/v1/models/{model_id}/history"]["get"]
    assert {"since", "until", "batch_id", "cursor", "limit"} <= {
        p["name"] for p in operation["parameters"]
    }
    assert set(operation["responses"]) >= {"200", "401", "404", "422"}
    schema = spec["components"]["schemas"]["ModelHistory"]
    example = schema["examples"][0]
    assert example["items"][0]["changes"]["flagged_layers"] == ["fc0", "fc1"]


@pytest.mark.parametrize(
    ("before", "after", "ratio", "flagged"),
    [
        (2.0, 20.0, 10.0, True),  # exactly the factor counts
        (2.0, 19.0, 9.5, False),
        (1.0, 0.1, 0.1, True),
        (1.0, 0.5, 0.5, False),
        (0.0, 0.0, None, False),  # nothing to compare
        (0.0, 1e-3, math.inf, True),  # a gradient where there was none
        (1.0, "inf", math.inf, True),
        ("nan", 1.0, math.nan, True),
        ("inf", "nan", None, False),  # broken on both sides: no ratio
        (None, 1.0, None, False),  # a layer without parameters on one side
    ],
)
def test_norm_ratio_and_the_flag(before: Any, after: Any, ratio: Any, flagged: bool) -> None:
    got = norm_ratio(before, after)
    if ratio is None or got is None:
        assert got is ratio
    elif math.isnan(ratio):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(ratio)
    assert is_large_change(got) is flagged

"""GET /v1/diagnoses/{id}/report.html on Postgres and SQLite: the report page of a real
diagnosis (a deep sigmoid MLP from the pathology zoo, diagnosed by the engine once per
session), every status page, tenant isolation, and escaping of user-controlled names."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.pages.report_charts import CHART_THRESHOLDS
from service.queue import KIND_DIAGNOSE, claim, complete, fail
from tests.conftest import Backend, TenantKey, make_client

HOSTILE = '<script>alert("x")</script>'


@pytest.fixture(scope="session")
def sigmoid_case() -> tuple[bytes, bytes, dict[str, Any]]:
    """(model bytes, batch bytes, the engine's report of them as stored by a worker)."""
    from service.engine.options import DiagnoseOptions
    from service.engine.pipeline import diagnose
    from tests.support.pathologies import ZOO

    case = ZOO["deep_sigmoid_mlp"]
    model, batch = case.model_bytes("torch_export"), case.batch_bytes()
    report = diagnose(model, batch, DiagnoseOptions.model_validate({}))
    return model, batch, report.to_jsonable()


def queue_diagnosis(client: TestClient, model: bytes, batch: bytes, name: str = "sigmoid") -> str:
    m = client.post("/v1/models", files={"file": ("m.pt2", model)}, data={"name": name})
    b = client.post("/v1/batches", files={"file": ("b.npz", batch)})
    assert m.status_code == 201 and b.status_code == 201, (m.text, b.text)
    queued = client.post(
        "/v1/diagnoses", json={"model_id": m.json()["id"], "batch_id": b.json()["id"]}
    )
    assert queued.status_code == 202, queued.text
    return str(queued.json()["id"])


def claim_it(backend: Backend, diagnosis_id: str) -> None:
    with backend.database.session() as session:
        job = claim(session, "test-worker", lease_s=60, kinds=(KIND_DIAGNOSE,))
        session.commit()
    assert job is not None and job.id == diagnosis_id


def finish(backend: Backend, diagnosis_id: str, report: dict[str, Any]) -> None:
    claim_it(backend, diagnosis_id)
    with backend.database.session() as session:
        assert complete(session, diagnosis_id, report=report, verdict=report.get("verdict"))
        session.commit()


def page_of(client: TestClient, diagnosis_id: str) -> str:
    response = client.get(f"/v1/diagnoses/{diagnosis_id}/report.html")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src" not in response.headers["content-security-policy"]  # none allowed
    assert "default-src 'none'" in response.headers["content-security-policy"]
    return response.text


def markers(html: str, chart_class: str) -> list[str]:
    svg = re.search(rf'<svg class="chart {chart_class}".*?</svg>', html, re.S)
    assert svg is not None, f"no {chart_class} chart"
    return re.findall(r'<g class="pt[^"]*" data-label="([^"]*)"', svg.group(0))


def test_succeeded_page_shows_verdict_findings_fixes_and_charts(
    client: TestClient, backend: Backend, sigmoid_case: tuple[bytes, bytes, dict[str, Any]]
) -> None:
    model, batch, report = sigmoid_case
    diagnosis_id = queue_diagnosis(client, model, batch)
    finish(backend, diagnosis_id, report)
    html = page_of(client, diagnosis_id)
    assert 'class="verdict unhealthy">Unhealthy<' in html
    assert "sigmoid v1" in html
    vanishing = report["findings"][0]
    assert vanishing["kind"] == "vanishing_gradients"
    assert html.index("Vanishing gradients") < html.index("fp16 underflow<")  # error first
    assert "1.83e-08" in html  # the depth ratio from the evidence
    # Charts: one marker per layer of the depth profile, the threshold lines, fractions.
    assert markers(html, "depth-profile") == report["profiles"]["depth"]["layers"]
    assert 'class="threshold error"' in html and "vanishing (error)" in html
    saturated = [
        layer["name"]
        for layer in report["layers"]
        if layer["activation_stats"]["saturated_fraction"] is not None
    ]
    assert markers(html, "saturated-fraction") == saturated
    # Recommendations with their snippets (escaped) and verified before/after figures.
    assert "Replace activation" in html
    assert "nn.init.kaiming_normal_(params[name], nonlinearity=&quot;relu&quot;)" in html
    assert "verified: resolved" in html and "depth_ratio" in html
    # every figure is shown to 3 significant digits, lists of them too
    figures = [
        value
        for rec in report["recommendations"]
        if rec.get("verified")
        for side in ("before", "after")
        for value in rec["verified"][side].get("figures", {}).values()
    ]
    raw = [repr(v) for v in figures if isinstance(v, float) and len(repr(v)) > 8]
    raw += [repr(x) for v in figures if isinstance(v, list) for x in v if isinstance(x, float)]
    assert raw and not [r for r in raw if len(r) > 8 and r in html]
    # Tables and facts.
    assert all(p["name"] in html for p in report["parameters"])
    assert report["model"]["sha256"] in html
    assert "<script" not in html.lower()


def test_time_profile_chart_has_one_point_per_step(
    client: TestClient, backend: Backend, sigmoid_case: tuple[bytes, bytes, dict[str, Any]]
) -> None:
    model, batch, report = sigmoid_case
    recurrent = copy.deepcopy(report)
    steps = [0.0, 1e-9, 1e-6, 1e-3, 0.1]
    recurrent["profiles"]["time"] = [
        {"input": "x", "axis": 1, "tensor": "∂L/∂x (the input)", "grad_norms": steps}
    ]
    diagnosis_id = queue_diagnosis(client, model, batch)
    finish(backend, diagnosis_id, recurrent)
    html = page_of(client, diagnosis_id)
    assert markers(html, "time-profile") == ["0", "1", "2", "3", "4"]
    assert '<g class="pt zero' in html  # the underflowed step is drawn, not dropped


def test_hostile_names_are_rendered_inert(
    client: TestClient, backend: Backend, sigmoid_case: tuple[bytes, bytes, dict[str, Any]]
) -> None:
    model, batch, report = sigmoid_case
    hostile = copy.deepcopy(report)
    first = hostile["layers"][0]["name"]
    hostile["layers"][0]["name"] = HOSTILE
    hostile["profiles"]["depth"]["layers"][0] = HOSTILE
    hostile["findings"][0]["layers"][0] = HOSTILE
    hostile["findings"][0]["message"] += " <img src=x onerror=alert(1)>"
    hostile["parameters"][0]["name"] = f"{HOSTILE}.weight"
    hostile["notes"] = [f"{first} \" onmouseover='alert(1)'"]
    diagnosis_id = queue_diagnosis(client, model, batch, name=HOSTILE)
    finish(backend, diagnosis_id, hostile)
    html = page_of(client, diagnosis_id)
    assert "<script" not in html.lower()
    assert "<img" not in html.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html  # shown as text
    assert "onmouseover='" not in html
    assert markers(html, "depth-profile")[0] == "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;"


def test_status_pages(client: TestClient, backend: Backend, samples: Any) -> None:
    model, batch = samples.torch_export, samples.npz
    queued = queue_diagnosis(client, model, batch)
    response = client.get(f"/v1/diagnoses/{queued}/report.html")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["cache-control"] == "no-store"
    assert '<meta http-equiv="refresh"' in response.text and "Queued" in response.text

    claim_it(backend, queued)
    running = page_of(client, queued)
    assert "Running" in running and '<meta http-equiv="refresh"' in running

    with backend.database.session() as session:
        fail(session, queued, code="bad_batch", message=f"array 'x' has 3 dims {HOSTILE}")
        session.commit()
    failed = page_of(client, queued)
    assert "Failed" in failed and "bad_batch" in failed
    assert "array &#x27;x&#x27; has 3 dims &lt;script&gt;" in failed
    assert "http-equiv" not in failed

    cancelled_id = queue_diagnosis(client, model, batch)
    assert client.post(f"/v1/diagnoses/{cancelled_id}:cancel").status_code == 200
    cancelled = page_of(client, cancelled_id)
    assert "Cancelled" in cancelled and "http-equiv" not in cancelled


def test_a_report_of_another_schema_gets_a_page_saying_so(
    client: TestClient, backend: Backend, samples: Any
) -> None:
    diagnosis_id = queue_diagnosis(client, samples.torch_export, samples.npz)
    finish(backend, diagnosis_id, {"report_version": "1"})
    assert "Unreadable report" in page_of(client, diagnosis_id)


def test_unknown_foreign_and_unauthenticated_are_refused(
    client: TestClient, backend: Backend, other_tenant: TenantKey, samples: Any
) -> None:
    diagnosis_id = queue_diagnosis(client, samples.torch_export, samples.npz)
    assert client.get("/v1/diagnoses/nope/report.html").status_code == 404
    with make_client(backend) as anonymous:
        assert anonymous.get(f"/v1/diagnoses/{diagnosis_id}/report.html").status_code == 401
        anonymous.headers.update(other_tenant.headers)
        foreign = anonymous.get(f"/v1/diagnoses/{diagnosis_id}/report.html")
    assert foreign.status_code == 404
    assert foreign.json()["error"]["code"] == "not_found"


def test_openapi_documents_the_page(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"][
        "/v1/diagnoses/{diagnosis_id}/report.html"
    ]["get"]
    assert "text/html" in operation["responses"]["200"]["content"]
    assert "page" in operation["description"]
    assert {"401", "404"} <= set(operation["responses"])


def test_chart_thresholds_mirror_the_detectors() -> None:
    from service.engine.detectors.thresholds import DEFAULTS

    assert {name: DEFAULTS[name] for name in CHART_THRESHOLDS} == CHART_THRESHOLDS


def test_a_nan_origin_shows_what_its_op_read_and_wrote(
    client: TestClient, backend: Backend
) -> None:
    from service.engine.options import DiagnoseOptions
    from service.engine.pipeline import diagnose
    from tests.support.pathologies import ZOO

    case = ZOO["log_of_negatives"]
    model, batch = case.model_bytes("torch_export"), case.batch_bytes()
    report = diagnose(model, batch, DiagnoseOptions(verify_fixes=False)).to_jsonable()
    origin = next(f for f in report["findings"] if f["kind"] == "non_finite")["evidence"]["origin"]
    diagnosis_id = queue_diagnosis(client, model, batch, name="log")
    finish(backend, diagnosis_id, report)
    html = page_of(client, diagnosis_id)
    table = re.search(r'<table class="origin">.*?</table>', html, re.S)
    assert table is not None
    rows = re.findall(r"<tr><th>(.*?)</th>(.*?)</tr>", table.group(0))[1:]  # header row
    assert [name.split(" ")[0] for name, _ in rows] == ["input", "output"]
    output_cells = re.findall(r"<td>(.*?)</td>", rows[-1][1])
    assert output_cells[3] == str(int(origin["values"]["output"]["nan"]))  # the NaN column
    assert int(output_cells[3]) > 0


def test_a_verified_figure_that_is_a_range_is_shown_rounded() -> None:
    from service.api.pages.report_findings import verification_block
    from service.engine.report import Verification

    html = verification_block(
        Verification(
            applied=True,
            resolved=True,
            before={"figures": {"init_std_ratio_range": [0.0561657912145043, 0.184518331726]}},
            after={"figures": {"init_std_ratio_range": [0.0561657912145043, 1.02374042806]}},
        )
    )
    assert "0.0562" in html and "0.185" in html and "1.02" in html
    assert "0.0561657912145043" not in html


def test_a_qat_models_page_lists_its_quantisers_and_marks_the_clipping_ones(
    client: TestClient, backend: Backend
) -> None:
    from service.engine.options import DiagnoseOptions
    from service.engine.pipeline import diagnose
    from tests.support.export import to_torch_export
    from tests.unit.engine.measure_support import npz_bytes
    from tests.unit.engine.test_quantizer_clipping import QuantizedMlp, X, Y

    model, batch = to_torch_export(QuantizedMlp(act_scale=0.0005), X), npz_bytes(x=X, target=Y)
    report = diagnose(model, batch, DiagnoseOptions.model_validate({})).to_jsonable()
    diagnosis_id = queue_diagnosis(client, model, batch, name="qat")
    finish(backend, diagnosis_id, report)
    html = page_of(client, diagnosis_id)
    assert "Quantiser clipping" in html and "Recalibrate quantisers" in html
    table = re.search(r'<table class="quantizers">.*?</table>', html, re.S)
    assert table is not None
    rows = re.findall(r"<tr( class=\"bad\")?><td class=\"code\">(.*?)</td>", table.group(0))
    assert [name for _, name in rows] == [q["name"] for q in report["quantizers"]]
    flagged = set(
        next(f for f in report["findings"] if f["kind"] == "quantizer_clipping")["evidence"][
            "clipped_fraction"
        ]
    )
    assert {name for bad, name in rows if bad} == flagged
    assert "[0, 0.128]" in table.group(0)  # the activation range, in its own units
    # one bar per quantiser, labelled with what it quantises
    assert markers(html, "clipped-fraction") == ["layers.0", "layers.1", "layers.2", "head.weight"]


def test_the_conversion_checks_reason_is_on_the_page(
    client: TestClient, backend: Backend, sigmoid_case: tuple[bytes, bytes, dict[str, Any]]
) -> None:
    """What the comparison did and why its errors are what they are (a quantised model's
    rounding steps): the page says it, as the CLI does, escaped."""
    model, batch, stored = sigmoid_case
    report = copy.deepcopy(stored)
    report["model"]["conversion"] = {
        "checked": True,
        "max_abs_error": 1.6e-4,
        "max_rel_error": 0.74,
        "reference": "onnxruntime 1.32.0 (CPUExecutionProvider)",
        "reason": "the model quantises 5 activation(s) at run time <one step>",
    }
    diagnosis_id = queue_diagnosis(client, model, batch, name="quantised")
    finish(backend, diagnosis_id, report)
    html = page_of(client, diagnosis_id)
    assert "max rel error 0.74 against onnxruntime 1.32.0" in html
    assert "quantises 5 activation(s) at run time &lt;one step&gt;" in html

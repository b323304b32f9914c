"""The report page in a real browser: `gradhealth serve` (embedded SQLite, one worker) runs a
real diagnosis of a deep sigmoid MLP; headless Chromium (Debian's /usr/bin/chromium, driven
by Playwright) opens /v1/diagnoses/{id}/report.html with the API key as a header and we check
what a person would see: the charts drawn with one point per layer, the findings visible, no
console errors, and no request leaving the server. The screenshot is kept for a look
(its path is printed; `pytest -s` shows it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.processes import Service, start_serve, wait_until
from tests.support.pathologies import ZOO

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"  # `make install` puts it there (Debian package `chromium`)
JOB_WAIT_S = 180.0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, str]]:
    root = tmp_path_factory.mktemp("report-page")
    service, key = start_serve(root / "data", root)
    try:
        yield service, key
    finally:
        service.stop()


def diagnose_sigmoid_mlp(url: str, key: str) -> tuple[str, dict[str, Any]]:
    case = ZOO["deep_sigmoid_mlp"]
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        queued = client.post(
            "/v1/diagnoses:run",
            files={
                "model": ("deep-sigmoid.pt2", case.model_bytes("torch_export")),
                "batch": ("batch.npz", case.batch_bytes()),
            },
            data={"name": "deep-sigmoid-mlp"},
        )
        assert queued.status_code == 202, queued.text
        diagnosis_id = queued.json()["id"]

        def done() -> dict[str, Any] | None:
            body: dict[str, Any] = client.get(f"/v1/diagnoses/{diagnosis_id}").json()
            return body if body["status"] in ("succeeded", "failed", "cancelled") else None

        body = wait_until(done, f"diagnosis {diagnosis_id} to finish", JOB_WAIT_S)
    assert body["status"] == "succeeded", body
    return diagnosis_id, body["report"]


def test_report_page_renders_in_chromium(served: tuple[Service, str], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    service, key = served
    assert service.url is not None
    diagnosis_id, report = diagnose_sigmoid_mlp(service.url, key)
    console_errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        context = browser.new_context(
            extra_http_headers={"Authorization": f"Bearer {key}"},
            viewport={"width": 1280, "height": 900},
        )
        page = context.new_page()
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: console_errors.append(str(exc)))
        page.on("request", lambda request: requests.append(request.url))
        response = page.goto(f"{service.url}/v1/diagnoses/{diagnosis_id}/report.html")
        assert response is not None and response.status == 200
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        page.wait_for_load_state("networkidle")

        depth = page.locator("svg.depth-profile")
        box = depth.bounding_box()
        assert box is not None and box["width"] > 300 and box["height"] > 150
        layers = report["profiles"]["depth"]["layers"]
        points = depth.locator("g.pt circle")
        assert points.count() == len(layers) == 11
        for i in (0, len(layers) - 1):
            point = points.nth(i).bounding_box()
            assert point is not None and point["width"] > 0 and point["height"] > 0
        # The first layer's norm sits far below the last's on the log axis (vanishing).
        first, last = points.nth(0).bounding_box(), points.nth(len(layers) - 1).bounding_box()
        assert first is not None and last is not None and first["y"] > last["y"] + 100
        assert depth.locator("line.threshold").count() == 4

        saturated = page.locator("svg.saturated-fraction g.pt rect")
        assert saturated.count() == sum(
            1
            for layer in report["layers"]
            if layer["activation_stats"]["saturated_fraction"] is not None
        )

        assert page.locator(".verdict").inner_text() == "Unhealthy"
        message = report["findings"][0]["message"]
        assert page.locator("#findings").get_by_text(message).is_visible()
        assert page.get_by_text("verified: resolved").first.is_visible()

        screenshot = tmp_path / "report.png"
        page.screenshot(path=str(screenshot), full_page=True)
        print(f"\nreport page screenshot: {screenshot}")
        browser.close()
    assert screenshot.stat().st_size > 10_000
    assert console_errors == []
    assert requests and all(url.startswith(service.url) for url in requests), requests

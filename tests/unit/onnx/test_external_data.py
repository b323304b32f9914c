"""Models whose weights `torch.onnx.export(dynamo=True)` writes to a separate `model.onnx.data`
file (its default): read from the model's folder by the CLI, uploaded as a zip bundle, and a
bare `.onnx` refused at upload with a message saying to send the bundle."""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn
from typer.testing import CliRunner

import service.cli.diagnose  # noqa: F401  (registers `diagnose` on app)
from service.cli import app
from service.engine.formats.detect import detect_format
from service.engine.formats.onnx import load_onnx_model
from service.errors import ModelFormatError
from service.storage.sniff import sniff_model_format
from tests.conftest import Backend, make_client, make_tenant_key


class SmallTanhNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 24)  # 3 KB of weights: past the exporter's inline threshold
        self.fc2 = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """model.onnx + model.onnx.data as written by a default dynamo export, a batch, the
    zip bundle of both, and the module."""
    torch.manual_seed(0)
    module = SmallTanhNet()
    x = torch.randn(8, 32)
    folder = tmp_path_factory.mktemp("dynamo_export")
    model = folder / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(model), dynamo=True, input_names=["x"])
    data = folder / "model.onnx.data"
    batch = folder / "batch.npz"
    np.savez(batch, x=x.numpy(), target=np.arange(8) % 5)
    bundle = folder / "model.zip"
    with zipfile.ZipFile(bundle, "w") as archive:
        archive.write(model, "model.onnx")
        archive.write(data, "model.onnx.data")
    return {"module": module, "model": model, "data": data, "batch": batch, "bundle": bundle}


def test_the_default_dynamo_export_keeps_weights_in_a_separate_file(
    exported: dict[str, object],
) -> None:
    data = exported["data"]
    assert isinstance(data, Path)
    assert data.stat().st_size >= 32 * 24 * 4  # the premise of this file's other tests


def _diagnose(model: Path, batch: Path) -> tuple[int, str]:
    result = CliRunner().invoke(
        app,
        ["diagnose", str(model), "--batch", str(batch), "--format", "json", "--no-verify"],
    )
    return result.exit_code, result.stdout + (result.stderr if result.stderr_bytes else "")


def test_cli_reads_external_data_next_to_the_model(exported: dict[str, object]) -> None:
    model, batch = exported["model"], exported["batch"]
    assert isinstance(model, Path) and isinstance(batch, Path)
    code, out = _diagnose(model, batch)
    assert code in (0, 1), out
    report = json.loads(out)
    assert report["model"]["format"] == "onnx"
    assert {p["name"] for p in report["parameters"]} >= {"fc1.weight", "fc2.weight"}
    assert report["model"]["conversion"]["checked"] is True


def test_cli_refuses_external_data_linked_from_outside_the_folder(
    exported: dict[str, object], tmp_path: Path
) -> None:
    model, data, batch = exported["model"], exported["data"], exported["batch"]
    assert isinstance(model, Path) and isinstance(data, Path) and isinstance(batch, Path)
    inside = tmp_path / "inside"
    inside.mkdir()
    (inside / "model.onnx").write_bytes(model.read_bytes())
    os.symlink(data, inside / "model.onnx.data")  # a link to a file in another folder
    code, out = _diagnose(inside / "model.onnx", batch)
    assert code == 2, out
    assert "outside the bundle" in out


def test_a_zip_bundle_is_detected_as_onnx_by_the_engine_and_the_upload_check(
    exported: dict[str, object],
) -> None:
    bundle = exported["bundle"]
    assert isinstance(bundle, Path)
    assert detect_format(bundle.read_bytes()) == "onnx"
    assert sniff_model_format(bundle) == "onnx"


def test_a_zip_bundle_loads_with_the_weights_of_its_data_file(
    exported: dict[str, object],
) -> None:
    bundle, module = exported["bundle"], exported["module"]
    assert isinstance(bundle, Path) and isinstance(module, nn.Module)
    loaded = load_onnx_model(bundle.read_bytes(), check_conversion=False)
    assert loaded.format == "onnx"
    params = dict(loaded.graph.named_graph_parameters())  # type: ignore[union-attr]
    for name, expected in module.named_parameters():
        torch.testing.assert_close(params[name].detach(), expected.detach(), rtol=0, atol=0)


def test_cli_diagnoses_a_zip_bundle(exported: dict[str, object]) -> None:
    bundle, batch = exported["bundle"], exported["batch"]
    assert isinstance(bundle, Path) and isinstance(batch, Path)
    code, out = _diagnose(bundle, batch)
    assert code in (0, 1), out
    assert json.loads(out)["model"]["format"] == "onnx"


def test_a_zip_with_two_onnx_files_is_refused(tmp_path: Path) -> None:
    archive_path = tmp_path / "two.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("a.onnx", b"x")
        archive.writestr("b.onnx", b"x")
    with pytest.raises(ModelFormatError, match=r"exactly one \.onnx"):
        sniff_model_format(archive_path)
    with pytest.raises(ModelFormatError, match=r"exactly one \.onnx"):
        detect_format(archive_path.read_bytes())


def test_upload_check_refuses_a_bare_onnx_with_external_data(
    exported: dict[str, object],
) -> None:
    model = exported["model"]
    assert isinstance(model, Path)
    with pytest.raises(ModelFormatError, match="upload a zip bundle") as caught:
        sniff_model_format(model)
    assert caught.value.status == 422
    assert "fc1.weight" in caught.value.message or "fc2.weight" in caught.value.message


def test_upload_check_accepts_the_same_model_with_weights_inside(
    exported: dict[str, object], tmp_path: Path
) -> None:
    import onnx

    model = exported["model"]
    assert isinstance(model, Path)
    proto = onnx.load(str(model))  # reads model.onnx.data from its folder
    inline = tmp_path / "inline.onnx"
    onnx.save(proto, str(inline))
    assert sniff_model_format(inline) == "onnx"


@pytest.fixture
def api_client(sqlite_backend: Backend) -> Iterator[TestClient]:
    """The real API on SQLite (the upload check is the same on Postgres)."""
    tenant = make_tenant_key(sqlite_backend, "acme")
    with make_client(sqlite_backend) as client:
        client.headers.update(tenant.headers)
        yield client


def test_api_accepts_the_bundle_and_refuses_the_bare_model_at_upload(
    exported: dict[str, object], api_client: TestClient
) -> None:
    model, bundle = exported["model"], exported["bundle"]
    assert isinstance(model, Path) and isinstance(bundle, Path)
    bare = api_client.post("/v1/models", files={"file": ("model.onnx", model.read_bytes())})
    assert bare.status_code == 422, bare.text
    assert "zip bundle" in bare.json()["error"]["message"]
    zipped = api_client.post("/v1/models", files={"file": ("model.zip", bundle.read_bytes())})
    assert zipped.status_code == 201, zipped.text
    assert zipped.json()["format"] == "onnx"

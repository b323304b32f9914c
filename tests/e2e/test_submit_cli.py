"""`gradhealth submit` failures that need no server: usage and connection errors map to the
exit codes of CONTRACT.md §2 with a message naming the problem (the happy path and the
server-side rejections run against a real server in test_service.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.cli import commands as _commands  # noqa: F401  (registers the commands)
from tests.e2e.processes import free_port


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    model, batch = tmp_path / "m.onnx", tmp_path / "b.npz"
    model.write_bytes(b"model bytes")
    batch.write_bytes(b"batch bytes")
    return model, batch


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["submit", *args], env=env or {"GRADHEALTH_API_KEY": ""})
    return result.exit_code, result.output


def test_submit_without_an_api_key_is_a_usage_error(files: tuple[Path, Path]) -> None:
    code, output = invoke(str(files[0]), "--batch", str(files[1]))
    assert code == 2 and "GRADHEALTH_API_KEY" in output


def test_submit_of_a_missing_file_names_it(files: tuple[Path, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    code, output = invoke(str(missing), "--batch", str(files[1]), "--api-key", "k")
    assert code == 2 and "nope.onnx" in output


def test_submit_to_a_server_that_is_not_there_is_an_internal_failure(
    files: tuple[Path, Path],
) -> None:
    server = f"http://127.0.0.1:{free_port()}"
    code, output = invoke(
        str(files[0]), "--batch", str(files[1]), "--api-key", "k", "--server", server
    )
    assert code == 3 and "cannot reach" in output


def _external_data_model(directory: Path) -> Path:
    """A tiny ONNX model whose weights are in `weights/w.data` beside it, as
    `torch.onnx.export` writes large models (model.onnx + model.onnx.data)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = directory / "ext.onnx"
    (directory / "weights").mkdir()
    onnx.save_model(
        model, str(path), save_as_external_data=True, location="weights/w.data", size_threshold=0
    )
    return path


def test_an_onnx_model_with_external_data_is_uploaded_as_a_bundle(tmp_path: Path) -> None:
    from onnx import numpy_helper

    from service.cli.submit import bundled, external_data_files
    from service.engine.onnx.loading import load_onnx_bundle

    model = _external_data_model(tmp_path)
    assert external_data_files(model) == ["weights/w.data"]
    with bundled(model, external_data_files(model)) as bundle:
        loaded = load_onnx_bundle(bundle.read_bytes())
    (weight,) = loaded.graph.initializer
    assert weight.name == "w"
    assert numpy_helper.to_array(weight).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert not bundle.exists()  # a temporary file


def test_an_onnx_model_missing_its_external_data_names_the_file(
    tmp_path: Path, files: tuple[Path, Path]
) -> None:
    model = _external_data_model(tmp_path)
    (tmp_path / "weights" / "w.data").unlink()
    code, output = invoke(str(model), "--batch", str(files[1]), "--api-key", "k")
    assert code == 2 and "weights/w.data" in output and "beside the .onnx" in output

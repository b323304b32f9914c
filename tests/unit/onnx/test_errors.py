"""Error paths: unsupported ops/attributes, malformed graphs, external-data traversal, inputs."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from service.engine.onnx.convert import check_inputs, convert, load_onnx, load_onnx_bundle
from service.errors import BatchError, ModelFormatError, UnsupportedModelError

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers=(), opset=17, check=True) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    if check:
        onnx.checker.check_model(model)
    return model


def _vi(name: str, shape: list, elem: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def test_every_unsupported_op_and_attribute_is_listed_in_one_error() -> None:
    model = _model(
        [
            helper.make_node("Relu", ["x"], ["a"], name="ok_relu"),
            helper.make_node("StringNormalizer", ["s"], ["s2"], name="strings"),
            helper.make_node("RegexFullMatch", ["a"], ["b"], name="regex"),
            helper.make_node("RegexFullMatch", ["b"], ["c"], name="regex_again"),
            helper.make_node(
                "MaxPool",
                ["c"],
                ["y", "where"],
                name="colmajor",
                kernel_shape=[1, 1],
                storage_order=2,
            ),
        ],
        [_vi("x", [1, 1, 4, 4]), _vi("s", [2], TensorProto.STRING)],
        [_vi("y", [1, 1, 8, 8]), _vi("s2", [2], TensorProto.STRING)],
        [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "unused_weight")],
        opset=20,  # RegexFullMatch's
        check=False,
    )
    with pytest.raises(UnsupportedModelError) as info:
        convert(model)
    assert model.graph.initializer[0].raw_data  # a refused model keeps its weights
    message = info.value.message
    for expected in (
        "ai.onnx::StringNormalizer (opset 20)",
        "strings",
        "ai.onnx::RegexFullMatch (opset 20)",
        "regex, regex_again",
        "storage_order=2",
        "[nodes: colmajor]",
        "'s' has type string",
    ):
        assert expected in message
    assert "ok_relu" not in message


def test_unsupported_op_inside_a_subgraph_is_found_before_running() -> None:
    then_branch = helper.make_graph(
        [helper.make_node("RegexFullMatch", ["x"], ["t"], name="deep_regex")],
        "then",
        [],
        [_vi("t", [2])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"], name="neg")], "else", [], [_vi("e", [2])]
    )
    model = _model(
        [
            helper.make_node(
                "If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch, name="if"
            )
        ],
        [_vi("c", [], TensorProto.BOOL), _vi("x", [2])],
        [_vi("y", [2])],
        opset=20,
        check=False,
    )
    with pytest.raises(UnsupportedModelError, match="deep_regex"):
        convert(model)


def test_dangling_input_is_a_format_error_naming_value_and_node() -> None:
    model = _model(
        [helper.make_node("Add", ["x", "ghost"], ["y"], name="adder")],
        [_vi("x", [2])],
        [_vi("y", [2])],
        check=False,
    )
    with pytest.raises(ModelFormatError, match="'ghost' of node 'adder'"):
        convert(model)


def test_cycle_is_a_format_error() -> None:
    model = _model(
        [
            helper.make_node("Add", ["x", "b"], ["a"], name="first"),
            helper.make_node("Relu", ["a"], ["b"], name="second"),
        ],
        [_vi("x", [2])],
        [_vi("b", [2])],
        check=False,
    )
    with pytest.raises(ModelFormatError, match="cycle"):
        convert(model)


def test_checker_failure_is_a_format_error() -> None:
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"], name="r", bogus=3)],
        [_vi("x", [2])],
        [_vi("y", [2])],
        check=False,
    )
    with pytest.raises(ModelFormatError, match="malformed ONNX model"):
        convert(model)


def test_ops_onnxruntime_defines_in_the_default_domain_pass_the_checker() -> None:
    """onnxruntime-genai's LLM exports use SimplifiedLayerNormalization in the default domain
    (onnxruntime's own op), and older optimised exports LayerNormalization below opset 17:
    onnx's checker said "No Op registered" and the model was "malformed". They convert; an op
    nobody defines is named in the unsupported-op error instead."""
    x, scale = _vi("x", [2, 4]), helper.make_tensor("scale", F, [4], [1.0, 2.0, 3.0, 4.0])
    for op, opset in (("SimplifiedLayerNormalization", 22), ("LayerNormalization", 14)):
        model = _model(
            [helper.make_node(op, ["x", "scale"], ["y"], name="norm")],
            [x],
            [_vi("y", [2, 4])],
            [scale],
            opset=opset,
            check=False,
        )
        graph = convert(model)
        assert graph(torch.ones(2, 4)).shape == (2, 4)
    unknown = _model(
        [helper.make_node("NoSuchOp", ["x"], ["y"], name="nowhere")],
        [x],
        [_vi("y", [2, 4])],
        check=False,
    )
    with pytest.raises(UnsupportedModelError, match=r"ai.onnx::NoSuchOp \(opset 17\)"):
        convert(unknown)


def test_garbage_bytes_are_a_format_error() -> None:
    with pytest.raises(ModelFormatError):
        load_onnx(b"\x00\xffnot a protobuf at all\xff" * 10)


def _external_model(location: str) -> bytes:
    weight = numpy_helper.from_array(np.ones((2,), np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "8")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    model = _model(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        [_vi("x", [2])],
        [_vi("y", [2])],
        [weight],
        check=False,
    )
    return model.SerializeToString()


@pytest.mark.parametrize(
    ("location", "match"),
    [
        ("/etc/passwd", "absolute path"),
        ("../secret.bin", r"outside the bundle \('..'\)"),
        ("data/../../secret.bin", r"outside the bundle \('..'\)"),
        ("C:/windows/secret.bin", "absolute path"),
    ],
)
def test_external_data_path_traversal_is_refused(tmp_path: Path, location: str, match: str) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\x00" * 8)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    with pytest.raises(ModelFormatError, match=match):
        load_onnx(_external_model(location), bundle_dir=bundle)


def test_external_data_symlink_escaping_the_bundle_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\x00" * 8)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    os.symlink(tmp_path / "secret.bin", bundle / "weights.bin")
    with pytest.raises(ModelFormatError, match="resolves outside the bundle"):
        load_onnx(_external_model("weights.bin"), bundle_dir=bundle)


def test_external_data_without_a_bundle_asks_for_one() -> None:
    with pytest.raises(ModelFormatError, match="upload a zip bundle"):
        load_onnx(_external_model("weights.bin"))


def test_external_data_inside_the_bundle_is_loaded(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(np.array([1.5, -2.0], np.float32).tobytes())
    model = load_onnx(_external_model("weights.bin"), bundle_dir=tmp_path)
    graph = convert(model)
    out = graph(torch.zeros(2))
    assert out.tolist() == [1.5, -2.0]
    assert graph.named_graph_parameters()[0][0] == "w"


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_bundle_zip_loads_model_and_data() -> None:
    data = np.array([0.25, 4.0], np.float32).tobytes()
    model = load_onnx_bundle(
        _zip({"model.onnx": _external_model("weights.bin"), "weights.bin": data})
    )
    assert convert(model)(torch.ones(2)).tolist() == [1.25, 5.0]


def test_bundle_zip_with_traversing_member_is_refused() -> None:
    with pytest.raises(ModelFormatError, match="outside the bundle"):
        load_onnx_bundle(_zip({"model.onnx": b"", "../evil.bin": b"x"}))


def test_bundle_needs_exactly_one_model() -> None:
    with pytest.raises(ModelFormatError, match=r"exactly one \.onnx"):
        load_onnx_bundle(_zip({"a.bin": b"x"}))


def _mlp_graph():
    w = numpy_helper.from_array(np.ones((3, 4), np.float32), "fc.weight")
    model = _model(
        [helper.make_node("MatMul", ["x", "fc.weight"], ["y"])],
        [_vi("x", ["batch", 3])],
        [_vi("y", ["batch", 4])],
        [w],
    )
    return convert(model)


def test_wrong_input_count_is_a_batch_error() -> None:
    graph = _mlp_graph()
    with pytest.raises(BatchError, match=r"takes 1 input\(s\) \(x\), the batch gives 2"):
        check_inputs(graph, [torch.zeros(2, 3), torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="takes 1 inputs"):
        graph.run([torch.zeros(2, 3), torch.zeros(2, 3)])


def test_wrong_input_shape_is_a_batch_error() -> None:
    graph = _mlp_graph()
    check_inputs(graph, [torch.zeros(5, 3)])  # symbolic batch: any size
    with pytest.raises(BatchError, match="size 3 on axis 1"):
        check_inputs(graph, [torch.zeros(5, 4)])
    with pytest.raises(BatchError, match="must have 2 dimensions"):
        check_inputs(graph, [torch.zeros(3)])


def test_bundle_symlink_member_is_refused() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model.onnx", _external_model("weights.bin"))
        link = zipfile.ZipInfo("weights.bin")
        link.external_attr = (0o120777 << 16) | 0  # a symbolic link to /etc/passwd
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(ModelFormatError, match="symbolic link"):
        load_onnx_bundle(buffer.getvalue())


def test_bundle_larger_than_the_cap_is_refused() -> None:
    data = _zip({"model.onnx": _external_model("weights.bin"), "weights.bin": b"\0" * 4096})
    with pytest.raises(ModelFormatError, match="unpacks to more than"):
        load_onnx_bundle(data, max_bytes=1024)


def test_tensor_scatter_with_an_unknown_mode_is_refused_at_conversion() -> None:
    model = _model(
        [helper.make_node("TensorScatter", ["past", "new"], ["y"], name="kv", mode="ring")],
        [_vi("past", [1, 2, 4, 3]), _vi("new", [1, 2, 1, 3])],
        [_vi("y", [1, 2, 4, 3])],
        opset=24,
        check=False,
    )
    with pytest.raises(UnsupportedModelError, match=r"mode 'ring' is not linear or circular"):
        convert(model)


def test_max_unpool_to_a_smaller_output_shape_names_both_shapes() -> None:
    model = _model(
        [
            helper.make_node(
                "MaxUnpool", ["x", "i", "shape"], ["y"], kernel_shape=[2, 2], strides=[2, 2]
            )
        ],
        [_vi("x", [1, 1, 2, 2]), _vi("i", [1, 1, 2, 2], TensorProto.INT64)],
        [_vi("y", [1, 1, 3, 3])],
        [numpy_helper.from_array(np.array([1, 1, 3, 3], np.int64), "shape")],
        opset=22,
    )
    graph = convert(model)
    with pytest.raises(
        ValueError, match=r"output_shape \[1, 1, 3, 3\] does not hold .*\[1, 1, 4, 4\]"
    ):
        graph(torch.ones(1, 1, 2, 2), torch.tensor([[[[0, 3], [8, 15]]]]))


@pytest.mark.parametrize(
    ("elem", "values"),
    [(TensorProto.FLOAT8E4M3FN, [0.5, 1.0, -2.0, 3.0]), (TensorProto.INT4, [1, -2, 3, 7])],
)
def test_arithmetic_on_a_float8_or_int4_value_is_refused_at_conversion(
    elem: int, values: list[float]
) -> None:
    """torch holds float8 (and int4, in int8) but computes nothing with them: an op other than
    a cast, a (de)quantiser or a reshape reading one is refused before running, by name."""
    stored = helper.make_tensor("stored", elem, [4], values)
    model = _model(
        [
            helper.make_node("Cast", ["stored"], ["wide"], to=TensorProto.FLOAT, name="ok_cast"),
            helper.make_node("Add", ["x", "wide"], ["y0"], name="ok_add"),
            helper.make_node("Mul", ["y0", "stored"], ["y"], name="raw_mul"),
        ],
        [_vi("x", [4])],
        [_vi("y", [4])],
        [stored],
        opset=21,
        check=False,
    )
    with pytest.raises(UnsupportedModelError) as info:
        convert(model)
    message = info.value.message
    kind = TensorProto.DataType.Name(elem)
    assert f"input 'stored' is {kind}" in message and "[nodes: raw_mul]" in message
    assert "ok_cast" not in message and "ok_add" not in message

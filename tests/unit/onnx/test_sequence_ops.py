"""ONNX sequence ops (ops/sequence.py): each op against onnxruntime on small graphs, gradcheck
in float64 through them, Loop/If carrying sequences, refusals of what stays unsupported, a
dynamo export of torch.chunk/torch.split (SplitToSequence + SequenceAt) against onnxruntime and
torch's own gradients, and that model through the engine's `diagnose` end to end."""

from __future__ import annotations

import io
from typing import Any, cast

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from service.engine.onnx.convert import check_inputs, convert
from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from service.errors import BatchError, UnsupportedModelError
from tests.support.export import to_onnx

D = TensorProto.DOUBLE
F32 = TensorProto.FLOAT
I64 = TensorProto.INT64
OPSET = 18


def _seq(name: str, elem: int = D) -> onnx.ValueInfoProto:
    return helper.make_tensor_sequence_value_info(name, elem, None)


def _tensor(name: str, elem: int = D, shape: list[int] | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    consts: dict[str, np.ndarray] | None = None,
    opset: int = OPSET,
    ir_version: int = 8,  # the converter runs onnx's checker (outputs may omit their shape)
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        outputs,
        [numpy_helper.from_array(v, k) for k, v in (consts or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def _ort(model: onnx.ModelProto, feeds: list[np.ndarray]) -> list[Any]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, feeds, strict=True)))


def _assert_same(ours: Any, theirs: Any) -> None:
    if isinstance(theirs, list):
        assert isinstance(ours, list), f"expected a sequence, got {type(ours).__name__}"
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            _assert_same(a, b)
        return
    assert isinstance(ours, torch.Tensor)
    got = ours.detach().numpy()
    assert got.dtype == theirs.dtype
    assert got.shape == theirs.shape
    np.testing.assert_allclose(got, theirs, rtol=1e-12, atol=1e-12)


def _check_against_ort(model: onnx.ModelProto, feeds: list[np.ndarray]) -> list[Any]:
    expected = _ort(model, feeds)
    graph = convert(model, mode="eval", release_weights=False)
    outputs = graph.run([torch.from_numpy(f.copy()) for f in feeds])
    assert len(outputs) == len(expected)
    for ours, theirs in zip(outputs, expected, strict=True):
        _assert_same(ours, theirs)
    return outputs


def _rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _scalar_i64(value: int) -> np.ndarray:
    return np.array(value, dtype=np.int64)


X = _rand(4, 6)
Y = _rand(4, 6, seed=1)
Z = _rand(4, 2, seed=2)


# -- each op vs onnxruntime ----------------------------------------------------------------


def test_sequence_construct_and_concat_from_sequence() -> None:
    nodes = [
        helper.make_node("SequenceConstruct", ["x", "y", "z"], ["s"]),
        helper.make_node("ConcatFromSequence", ["s"], ["cat"], axis=1),
        helper.make_node("ConcatFromSequence", ["s"], ["cat_neg"], axis=-1),
    ]
    model = _model(
        nodes,
        [_tensor("x"), _tensor("y"), _tensor("z")],
        [_tensor("cat"), _tensor("cat_neg"), _seq("s")],
    )
    cat, _, seq = _check_against_ort(model, [X, Y, Z])
    assert cat.shape == (4, 14) and len(seq) == 3


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
def test_concat_from_sequence_new_axis_stacks(axis: int) -> None:
    nodes = [
        helper.make_node("SequenceConstruct", ["x", "y"], ["s"]),
        helper.make_node("ConcatFromSequence", ["s"], ["out"], axis=axis, new_axis=1),
    ]
    model = _model(nodes, [_tensor("x"), _tensor("y")], [_tensor("out")])
    (out,) = _check_against_ort(model, [X, Y])
    assert out.dim() == 3


def test_sequence_empty_insert_and_length() -> None:
    nodes = [
        helper.make_node("SequenceEmpty", [], ["s0"], dtype=D),
        helper.make_node("SequenceInsert", ["s0", "x"], ["s1"]),  # at the back
        helper.make_node("SequenceInsert", ["s1", "y"], ["s2"]),
        helper.make_node("SequenceInsert", ["s2", "x", "front"], ["s3"]),
        helper.make_node("SequenceInsert", ["s3", "y", "minus_one"], ["s4"]),  # before the last
        helper.make_node("SequenceInsert", ["s4", "x", "four"], ["s5"]),  # position n = back
        helper.make_node("SequenceLength", ["s5"], ["n"]),
        helper.make_node("ConcatFromSequence", ["s5"], ["out"], axis=0),
    ]
    consts = {"front": _scalar_i64(0), "minus_one": _scalar_i64(-1), "four": _scalar_i64(4)}
    model = _model(
        nodes, [_tensor("x"), _tensor("y")], [_tensor("out"), _tensor("n", I64), _seq("s5")], consts
    )
    out, n, seq = _check_against_ort(model, [X, Y])
    assert int(n) == 5 and n.dtype == torch.int64 and out.shape == (20, 6)
    assert [bool(torch.equal(t, torch.from_numpy(X))) for t in seq] == [
        True,
        True,
        False,
        False,
        True,
    ]


@pytest.mark.parametrize("position", [0, 1, 2, -1, -3])
def test_sequence_at(position: int) -> None:
    nodes = [
        helper.make_node("SequenceConstruct", ["x", "y", "z"], ["s"]),
        helper.make_node("SequenceAt", ["s", "p"], ["out"]),
    ]
    model = _model(
        nodes,
        [_tensor("x"), _tensor("y"), _tensor("z")],
        [_tensor("out")],
        {"p": _scalar_i64(position)},
    )
    (out,) = _check_against_ort(model, [X, Y, Z])
    assert torch.equal(out, torch.from_numpy([X, Y, Z][position]))


@pytest.mark.parametrize("position", [None, 0, 1, -3])
def test_sequence_erase(position: int | None) -> None:
    erase_inputs = ["s"] if position is None else ["s", "p"]
    nodes = [
        helper.make_node("SequenceConstruct", ["x", "y", "z"], ["s"]),
        helper.make_node("SequenceErase", erase_inputs, ["out"]),
        helper.make_node("SequenceLength", ["out"], ["n"]),
    ]
    consts = {} if position is None else {"p": _scalar_i64(position)}
    model = _model(
        nodes, [_tensor("x"), _tensor("y"), _tensor("z")], [_seq("out"), _tensor("n", I64)], consts
    )
    seq, n = _check_against_ort(model, [X, Y, Z])
    assert int(n) == 2 and len(seq) == 2


def test_a_position_out_of_range_is_an_error_naming_the_op() -> None:
    nodes = [
        helper.make_node("SequenceConstruct", ["x", "y"], ["s"]),
        helper.make_node("SequenceAt", ["s", "p"], ["out"]),
    ]
    model = _model(nodes, [_tensor("x"), _tensor("y")], [_tensor("out")], {"p": _scalar_i64(2)})
    graph = convert(model, mode="eval")
    with pytest.raises(IndexError, match=r"SequenceAt position 2 is outside \[-2, 1\]"):
        graph.run([torch.from_numpy(X), torch.from_numpy(Y)])


SPLITS: list[tuple[str, dict[str, Any], np.ndarray | None, int]] = [
    # (id, attributes, split, expected sequence length) over X of shape (4, 6)
    ("default_axis0", {}, None, 4),
    ("default_axis1_nokeepdims", {"axis": 1, "keepdims": 0}, None, 6),
    ("default_negative_axis", {"axis": -1}, None, 6),
    ("scalar_even", {"axis": 1}, _scalar_i64(2), 3),
    ("scalar_uneven", {"axis": 1}, _scalar_i64(4), 2),  # 4 + 2: the last chunk is smaller
    ("one_d", {"axis": 1}, _i64(1, 3, 2), 3),
    ("one_d_keepdims_ignored", {"axis": 0, "keepdims": 0}, _i64(1, 3), 2),
    ("one_d_single", {"axis": 0}, _i64(4), 1),
]


@pytest.mark.parametrize(
    ("attrs", "split", "length"), [s[1:] for s in SPLITS], ids=[s[0] for s in SPLITS]
)
def test_split_to_sequence(attrs: dict[str, Any], split: np.ndarray | None, length: int) -> None:
    node_inputs = ["x"] if split is None else ["x", "split"]
    nodes = [
        helper.make_node("SplitToSequence", node_inputs, ["s"], **attrs),
        helper.make_node("SequenceLength", ["s"], ["n"]),
    ]
    consts = {} if split is None else {"split": split}
    model = _model(nodes, [_tensor("x")], [_seq("s"), _tensor("n", I64)], consts)
    seq, n = _check_against_ort(model, [X])
    assert len(seq) == int(n) == length


def test_split_to_sequence_of_int64_and_float32() -> None:
    for elem, value in (
        (I64, np.arange(12, dtype=np.int64).reshape(3, 4)),
        (F32, X.astype(np.float32)),
    ):
        nodes = [
            helper.make_node("SplitToSequence", ["x"], ["s"], axis=0, keepdims=0),
            helper.make_node("ConcatFromSequence", ["s"], ["out"], axis=0, new_axis=1),
        ]
        model = _model(nodes, [_tensor("x", elem)], [_tensor("out", elem), _seq("s", elem)])
        _check_against_ort(model, [value])


def test_opset_11_models_convert() -> None:
    nodes = [
        helper.make_node("SplitToSequence", ["x", "split"], ["s"], axis=1),
        helper.make_node("SequenceErase", ["s"], ["s1"]),
        helper.make_node("ConcatFromSequence", ["s1"], ["out"], axis=1),
    ]
    model = _model(nodes, [_tensor("x")], [_tensor("out")], {"split": _i64(2, 3, 1)}, opset=11)
    (out,) = _check_against_ort(model, [X])
    assert out.shape == (4, 5)


def _add_body(first: str = "a", second: str = "b") -> onnx.GraphProto:
    return helper.make_graph(
        [
            helper.make_node("Add", [first, second], ["c"]),
            helper.make_node("Shape", ["c"], ["shape"]),
        ],
        "body",
        [_tensor(first), _tensor(second)],
        [_tensor("c"), _tensor("shape", I64)],
    )


def test_sequence_map_over_a_sequence_and_a_tensor() -> None:
    nodes = [
        helper.make_node("SplitToSequence", ["x"], ["s"], axis=0),
        helper.make_node("SequenceMap", ["s", "row"], ["sums", "shapes"], body=_add_body()),
    ]
    model = _model(nodes, [_tensor("x"), _tensor("row")], [_seq("sums"), _seq("shapes", I64)])
    sums, shapes = _check_against_ort(model, [X, _rand(1, 6, seed=3)])
    assert len(sums) == len(shapes) == 4


def test_sequence_map_over_two_sequences_reads_outer_values() -> None:
    body = helper.make_graph(
        [
            helper.make_node("Mul", ["a", "b"], ["ab"]),
            helper.make_node("Add", ["ab", "outer_bias"], ["c"]),  # an outer-scope value
        ],
        "body",
        [_tensor("a"), _tensor("b")],
        [_tensor("c")],
    )
    nodes = [
        helper.make_node("SplitToSequence", ["x"], ["s"], axis=1, keepdims=0),
        helper.make_node("SplitToSequence", ["y"], ["t"], axis=1, keepdims=0),
        helper.make_node("Neg", ["y"], ["outer_bias_full"]),
        helper.make_node("ReduceMean", ["outer_bias_full"], ["outer_bias"], keepdims=0),
        helper.make_node("SequenceMap", ["s", "t"], ["out"], body=body),
        helper.make_node("ConcatFromSequence", ["out"], ["stacked"], axis=1, new_axis=1),
    ]
    model = _model(nodes, [_tensor("x"), _tensor("y")], [_tensor("stacked")])
    (stacked,) = _check_against_ort(model, [X, Y])
    assert stacked.shape == (4, 6)


def _loop_model() -> onnx.ModelProto:
    """Loop that inserts `x * i` into a carried sequence on each of `trip` iterations."""
    body = helper.make_graph(
        [
            helper.make_node("Cast", ["i"], ["i_f"], to=D),
            helper.make_node("Mul", ["x", "i_f"], ["xi"]),  # x from the outer scope
            helper.make_node("SequenceInsert", ["seq_in", "xi"], ["seq_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [_tensor("i", I64, []), _tensor("cond_in", TensorProto.BOOL, []), _seq("seq_in")],
        [_tensor("cond_out", TensorProto.BOOL, []), _seq("seq_out")],
    )
    nodes = [
        helper.make_node("SequenceEmpty", [], ["empty"], dtype=D),
        helper.make_node("Loop", ["trip", "", "empty"], ["built"], body=body),
        helper.make_node("ConcatFromSequence", ["built"], ["out"], axis=0),
        helper.make_node("SequenceLength", ["built"], ["n"]),
    ]
    return _model(
        nodes, [_tensor("x")], [_tensor("out"), _tensor("n", I64)], {"trip": _scalar_i64(3)}
    )


def test_loop_carries_a_sequence() -> None:
    out, n = _check_against_ort(_loop_model(), [X])
    assert int(n) == 3 and out.shape == (12, 6)


def _if_model() -> onnx.ModelProto:
    then_branch = helper.make_graph(
        [helper.make_node("SequenceConstruct", ["x", "y"], ["s_then"])],
        "then",
        [],
        [_seq("s_then")],
    )
    else_branch = helper.make_graph(
        [helper.make_node("SplitToSequence", ["x"], ["s_else"], axis=1)],
        "else",
        [],
        [_seq("s_else")],
    )
    nodes = [
        helper.make_node("If", ["cond"], ["s"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("ConcatFromSequence", ["s"], ["out"], axis=1),
        helper.make_node("SequenceLength", ["s"], ["n"]),
    ]
    return _model(
        nodes,
        [_tensor("cond", TensorProto.BOOL, []), _tensor("x"), _tensor("y")],
        [_tensor("out"), _tensor("n", I64)],
    )


@pytest.mark.parametrize("cond", [True, False])
def test_if_returns_a_sequence(cond: bool) -> None:
    out, n = _check_against_ort(_if_model(), [np.array(cond), X, Y])
    assert int(n) == (2 if cond else 6) and out.shape == (4, 12 if cond else 6)


# -- gradients ----------------------------------------------------------------------------


def _gradcheck(model: onnx.ModelProto, inputs: list[np.ndarray], grad_inputs: int) -> None:
    """gradcheck w.r.t. the first `grad_inputs` inputs (float64); the rest are fixed."""
    graph = convert(model, mode="eval")
    leaves = [torch.from_numpy(v.copy()).requires_grad_(True) for v in inputs[:grad_inputs]]
    fixed = [torch.from_numpy(v.copy()) for v in inputs[grad_inputs:]]

    def fn(*xs: torch.Tensor) -> Any:
        outputs = graph.run([*xs, *fixed])
        return tuple(o for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point())

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


def test_gradcheck_split_to_sequence_and_sequence_at() -> None:
    nodes = [
        helper.make_node("SplitToSequence", ["x", "split"], ["s"], axis=1),
        helper.make_node("SequenceAt", ["s", "zero"], ["a"]),
        helper.make_node("SequenceAt", ["s", "minus_one"], ["b"]),
        helper.make_node("Tanh", ["a"], ["ta"]),
        helper.make_node("Mul", ["ta", "b"], ["out"]),
    ]
    consts = {"split": _i64(2, 2, 2), "zero": _scalar_i64(0), "minus_one": _scalar_i64(-1)}
    _gradcheck(_model(nodes, [_tensor("x")], [_tensor("out")], consts), [X], 1)


def test_gradcheck_construct_insert_erase_concat() -> None:
    nodes = [
        helper.make_node("SequenceConstruct", ["x", "y"], ["s"]),
        helper.make_node("Sin", ["z"], ["sz"]),
        helper.make_node("SequenceInsert", ["s", "sz", "one"], ["s2"]),
        helper.make_node("SequenceInsert", ["s2", "y"], ["s3"]),
        helper.make_node("SequenceErase", ["s3", "zero"], ["s4"]),  # drops x: its gradient is 0
        helper.make_node("ConcatFromSequence", ["s4"], ["out"], axis=1),
        helper.make_node("ConcatFromSequence", ["s3"], ["stacked"], axis=1),
    ]
    consts = {"zero": _scalar_i64(0), "one": _scalar_i64(1)}
    model = _model(
        nodes,
        [_tensor("x"), _tensor("y"), _tensor("z")],
        [_tensor("out"), _tensor("stacked")],
        consts,
    )
    _gradcheck(model, [X, Y, Z], 3)


def test_gradcheck_split_without_split_and_stack() -> None:
    nodes = [
        helper.make_node("SplitToSequence", ["x"], ["s"], axis=1, keepdims=0),
        helper.make_node("SequenceErase", ["s", "one"], ["s1"]),
        helper.make_node("ConcatFromSequence", ["s1"], ["out"], axis=-1, new_axis=1),
        helper.make_node("Mul", ["out", "out"], ["sq"]),
    ]
    model = _model(nodes, [_tensor("x")], [_tensor("sq")], {"one": _scalar_i64(1)})
    _gradcheck(model, [X], 1)


def test_gradcheck_sequence_map_loop_and_if() -> None:
    nodes = [
        helper.make_node("SplitToSequence", ["x"], ["s"], axis=0),
        helper.make_node("SequenceMap", ["s", "row"], ["sums", "shapes"], body=_add_body()),
        helper.make_node("ConcatFromSequence", ["sums"], ["out"], axis=0),
    ]
    model = _model(nodes, [_tensor("x"), _tensor("row")], [_tensor("out")])
    _gradcheck(model, [X, _rand(1, 6, seed=3)], 2)
    _gradcheck(_loop_model(), [X], 1)
    graph = convert(_if_model(), mode="eval")
    for cond in (True, False):  # `cond` comes first: not a gradcheck input
        leaves = [torch.from_numpy(v.copy()).requires_grad_(True) for v in (X, Y)]

        def fn(x: torch.Tensor, y: torch.Tensor, cond: bool = cond) -> torch.Tensor:
            return graph.run([torch.tensor(cond), x, y])[0]

        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


# -- what stays refused --------------------------------------------------------------------


def _refusal(model: onnx.ModelProto) -> str:
    with pytest.raises(UnsupportedModelError) as info:
        convert(model)
    return info.value.message


def test_sequences_of_sequences_optionals_and_string_sequences_are_refused() -> None:
    nested = helper.make_value_info(
        "nested",
        helper.make_sequence_type_proto(
            helper.make_sequence_type_proto(helper.make_tensor_type_proto(D, None))
        ),
    )
    optional = helper.make_value_info(
        "maybe",
        helper.make_optional_type_proto(
            helper.make_map_type_proto(I64, helper.make_tensor_type_proto(D, None))
        ),
    )
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["nested"], ["nested_out"]),
            helper.make_node("Identity", ["maybe"], ["maybe_out"]),
        ],
        "g",
        [nested, optional, _seq("words", TensorProto.STRING)],
        [
            helper.make_value_info("nested_out", nested.type),
            helper.make_value_info("maybe_out", optional.type),
            _seq("words", TensorProto.STRING),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    message = _refusal(model)
    assert "'nested' is a sequence of sequences: only sequences of tensors are supported" in message
    assert "'maybe' is an optional map: only optional tensors and sequences" in message
    assert "'words' is a sequence of string tensors" in message


def test_sequence_map_over_sequences_of_sequences_is_refused() -> None:
    body = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["c"])], "body", [_seq("a")], [_seq("c")]
    )
    nodes = [helper.make_node("SequenceMap", ["s"], ["out"], body=body)]
    nested_type = helper.make_sequence_type_proto(
        helper.make_sequence_type_proto(helper.make_tensor_type_proto(D, None))
    )
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_value_info("s", nested_type)],
        [helper.make_value_info("out", nested_type)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    message = _refusal(model)
    assert "SequenceMap body values ['a', 'c'] are sequences: sequences of sequences" in message


def test_string_ops_stay_refused_by_name() -> None:
    nodes = [helper.make_node("StringNormalizer", ["x"], ["y"])]
    model = _model(nodes, [_tensor("x")], [_tensor("y")])
    message = _refusal(model)
    assert "ai.onnx::StringNormalizer (opset 18): op not supported" in message


def test_a_sequence_graph_input_is_refused_by_the_batch_check() -> None:
    nodes = [helper.make_node("ConcatFromSequence", ["s"], ["out"], axis=0)]
    graph = convert(_model(nodes, [_seq("s", F32)], [_tensor("out", F32)]))
    assert graph.metadata["inputs"] == [{"name": "s", "shape": None, "dtype": "seq(float32)"}]
    with pytest.raises(BatchError, match=r"input 's' is a sequence of tensors \(seq\(float32\)\)"):
        check_inputs(graph, [torch.zeros(2, 3)])


# -- a dynamo export of torch.chunk / torch.split ------------------------------------------


class ChunkSplit(nn.Module):
    """torch.chunk and torch.split: the dynamo exporter (optimize=False) emits SplitToSequence
    and SequenceAt for both."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 12)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        gate, value, skip = torch.chunk(h, 3, dim=1)
        left, right = torch.split(h, [8, 4], dim=1)
        mixed = torch.sigmoid(gate) * torch.tanh(value) + skip * right + left[:, 4:]
        return self.head(mixed)


@pytest.fixture(scope="module")
def chunk_split() -> tuple[ChunkSplit, bytes, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    module = ChunkSplit()
    x = torch.randn(5, 6)
    target = torch.randn(5, 3)
    return module, to_onnx(module, x, dynamo=True, optimize=False), x, target


def test_dynamo_chunk_split_export_matches_onnxruntime_and_torch_gradients(
    chunk_split: tuple[ChunkSplit, bytes, torch.Tensor, torch.Tensor],
) -> None:
    module, data, x, target = chunk_split
    model = onnx.load_from_string(data)
    op_types = [n.op_type for n in model.graph.node]
    assert op_types.count("SplitToSequence") == 2 and op_types.count("SequenceAt") >= 5, op_types

    (expected,) = _ort(model, [x.numpy()])
    graph = convert(model, mode="train", release_weights=False)
    out = graph(x)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-5, atol=1e-6)

    F.mse_loss(out, target).backward()
    F.mse_loss(module(x), target).backward()
    ours = dict(graph.named_graph_parameters())
    torch_params = dict(module.named_parameters())
    assert set(ours) == set(torch_params)
    for name, param in torch_params.items():
        assert param.grad is not None and ours[name].grad is not None
        torch.testing.assert_close(ours[name].grad, param.grad, rtol=1e-5, atol=1e-6)
    proj_grad = ours["proj.weight"].grad
    assert proj_grad is not None
    assert float(proj_grad.abs().sum()) > 0


def _npz(**arrays: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    # cast: numpy's stub types **kwds as its own keyword `allow_pickle: bool`
    np.savez(buffer, **cast(dict[str, Any], {k: v.numpy() for k, v in arrays.items()}))
    return buffer.getvalue()


def test_dynamo_chunk_split_export_through_diagnose(
    chunk_split: tuple[ChunkSplit, bytes, torch.Tensor, torch.Tensor],
) -> None:
    module, data, x, target = chunk_split
    report = diagnose(data, _npz(x=x, target=target), DiagnoseOptions(verify_fixes=False))

    conversion = report.model.conversion
    assert conversion is not None and conversion.checked
    assert conversion.max_abs_error is not None and conversion.max_abs_error < 1e-5
    assert report.loss.kind == "mse"
    module.zero_grad()
    F.mse_loss(module(x), target).backward()
    by_name = {p.name: p for p in report.parameters}
    for name, param in module.named_parameters():
        assert param.grad is not None
        reported = by_name[name].grad_norm
        assert reported is not None
        assert reported == pytest.approx(float(param.grad.norm()), rel=1e-4)
    layers = {layer.name: layer for layer in report.layers}
    assert {"proj", "head"} <= set(layers)
    for name in ("proj", "head"):  # the layer before the sequence ops is observed too
        activation_grad_norm = layers[name].activation_grad_norm
        assert activation_grad_norm is not None
        assert activation_grad_norm > 0
    assert not any(f.kind == "non_finite" for f in report.findings)


def _masked_attention_with_a_sequence_output() -> bytes:
    """Scores + a row of a -inf mask picked through SplitToSequence/SequenceAt, Softmax; the
    graph's first output is a sequence (the split scores), the second a tensor."""
    rng = np.random.default_rng(0)
    mask = np.zeros((2, 4), dtype=np.float32)
    mask[0, 1] = mask[1, 3] = -np.inf
    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["scores"]),
        helper.make_node("SplitToSequence", ["mask"], ["mask_rows"], axis=0, keepdims=0),
        helper.make_node("SequenceAt", ["mask_rows", "zero"], ["mask_row"]),
        helper.make_node("Add", ["scores", "mask_row"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "w_out"], ["y"]),
        helper.make_node("SplitToSequence", ["scores"], ["score_columns"], axis=1),
    ]
    consts = {
        "w_in": rng.standard_normal((4, 4)).astype(np.float32),
        "w_out": rng.standard_normal((4, 3)).astype(np.float32),
        "mask": mask,
        "zero": _scalar_i64(0),
    }
    model = _model(
        nodes, [_tensor("x", F32, [5, 4])], [_seq("score_columns", F32), _tensor("y", F32)], consts
    )
    return model.SerializeToString()


def test_sequence_output_and_a_mask_through_sequence_ops_diagnose_cleanly() -> None:
    data = _masked_attention_with_a_sequence_output()
    x, target = torch.randn(5, 4), torch.randn(5, 3)
    report = diagnose(data, _npz(x=x, target=target), DiagnoseOptions(verify_fixes=False))

    # the loss reads the first *tensor* output; the mask's -inf reaching the Softmax through
    # SplitToSequence/SequenceAt/Add is no NaN/Inf origin
    assert report.loss.kind == "mse" and report.loss.value is not None
    assert not any(f.kind == "non_finite" for f in report.findings), report.findings
    assert report.model.outputs[0].dtype == "seq(float32)"
    graph = convert(onnx.load_from_string(data), release_weights=False)
    w_in, w_out = (graph.parameter(n).detach().requires_grad_(True) for n in ("w_in", "w_out"))
    mask_row = torch.tensor([0.0, -float("inf"), 0.0, 0.0])
    y = torch.softmax(x @ w_in + mask_row, dim=-1) @ w_out
    F.mse_loss(y, target).backward()
    by_name = {p.name: p for p in report.parameters}
    assert set(by_name) == {"w_in", "w_out"}
    for name, weight in (("w_in", w_in), ("w_out", w_out)):
        assert weight.grad is not None
        assert by_name[name].grad_norm == pytest.approx(float(weight.grad.norm()), rel=1e-4)

    # class indices: the loss kind is chosen from the first tensor output's shape at run time
    labels = torch.tensor([0, 2, 1, 1, 0])
    report = diagnose(data, _npz(x=x, target=labels), DiagnoseOptions(verify_fixes=False))
    expected = F.cross_entropy(torch.softmax(x @ w_in + mask_row, dim=-1) @ w_out, labels)
    assert report.loss.kind == "cross_entropy"
    assert report.loss.value == pytest.approx(float(expected.detach()), rel=1e-5)

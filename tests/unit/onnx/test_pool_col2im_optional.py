"""AveragePool/LpPool with dilations and the pools' ceil-mode output counts (ops/conv.py),
Col2Im (ops/col2im.py) and optional values (ops/sequence.py, convert.py): against onnxruntime
and onnx's ReferenceEvaluator over attribute combinations, float64 gradcheck, If and Loop
carrying optional values, and what stays refused."""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from service.engine.onnx.convert import check_inputs, convert
from service.errors import BatchError, UnsupportedModelError
from tests.support.recurrent_zoo import run_onnxruntime
from tests.unit.onnx.test_sequence_ops import _model as sequence_model

F32 = TensorProto.FLOAT
D = TensorProto.DOUBLE
I64 = TensorProto.INT64
BOOL = TensorProto.BOOL


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    consts: dict[str, np.ndarray] | None = None,
    opset: int = 22,
) -> onnx.ModelProto:
    # IR 10: what the installed onnxruntime reads
    return sequence_model(nodes, inputs, outputs, consts, opset=opset, ir_version=10)


def _tensor(
    name: str, elem: int = F32, shape: Sequence[int | str | None] | None = None
) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _run(model: onnx.ModelProto, feeds: list[Any]) -> list[Any]:
    graph = convert(copy.deepcopy(model), mode="eval")
    with torch.no_grad():
        return graph.run([_torch(v) for v in feeds])


def _torch(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, list):
        return [torch.from_numpy(np.asarray(v)) for v in value]
    return torch.from_numpy(np.asarray(value))


def _numpy(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, list):
        return [v.numpy() for v in value]
    return value.numpy()


def _assert_same(got: Any, want: Any, atol: float = 1e-5) -> None:
    if want is None:
        assert got is None
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _assert_same(g, w, atol)
    else:
        assert got is not None and got.shape == np.asarray(want).shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol, equal_nan=True)


# -- AveragePool / LpPool with dilations ---------------------------------------------------

SPATIAL = {1: [9], 2: [7, 8], 3: [6, 7, 5]}


def _pool_model(
    op: str, rank: int, attrs: dict[str, Any], elem: int = F32, spatial: list[int] | None = None
) -> onnx.ModelProto:
    node = helper.make_node(op, ["x"], ["y"], **attrs)
    shape = [2, 3, *(spatial or SPATIAL[rank])]
    return _model([node], [_tensor("x", elem, shape)], [_tensor("y", elem)])


def _pool_cases() -> list[tuple[str, int, dict[str, Any]]]:
    """Dilated pools onnxruntime runs (pads below the kernel) with at least one window."""
    cases = []
    for op, rank, kernel, stride, dilation, pads, ceil, include, auto_pad in itertools.product(
        ["AveragePool", "LpPool"],
        [1, 2, 3],
        [2, 3],
        [1, 2, 3],
        [2, 3],
        [(0, 0), (1, 0), (1, 2), (0, 1)],
        [0, 1],
        [0, 1],
        ["NOTSET", "VALID"],
    ):
        if (op == "LpPool" and include) or (auto_pad == "VALID" and pads != (0, 0)):
            continue
        if max(pads) >= kernel or (rank == 3 and (stride, pads) not in [(2, (1, 2)), (1, (0, 0))]):
            continue
        span = (kernel - 1) * dilation + 1
        if any(size + sum(pads) < span for size in SPATIAL[rank]):
            continue  # no window fits: onnxruntime still makes one
        attrs: dict[str, Any] = {
            "kernel_shape": [kernel] * rank,
            "strides": [stride] * rank,
            "dilations": [dilation] * rank,
            "ceil_mode": ceil,
            "auto_pad": auto_pad,
        }
        if auto_pad == "NOTSET":
            attrs["pads"] = [pads[0]] * rank + [pads[1]] * rank
        if op == "AveragePool":
            attrs["count_include_pad"] = include
        else:
            attrs["p"] = 3 if stride == 3 else 2
        cases.append((op, rank, attrs))
    return cases


POOL_CASES = _pool_cases()


def _pool_id(case: tuple[str, int, dict[str, Any]]) -> str:
    op, rank, a = case
    pads = "".join(str(p) for p in a.get("pads", [a["auto_pad"]]))
    return (
        f"{op}-{rank}d-k{a['kernel_shape'][0]}s{a['strides'][0]}d{a['dilations'][0]}"
        f"-p{pads}-ceil{a['ceil_mode']}-cip{a.get('count_include_pad', '-')}"
    )


def test_the_pool_combinations_cover_every_attribute() -> None:
    assert len(POOL_CASES) > 300
    assert {a["ceil_mode"] for _, _, a in POOL_CASES} == {0, 1}
    assert {a.get("count_include_pad") for _, _, a in POOL_CASES} == {0, 1, None}
    assert {rank for _, rank, _ in POOL_CASES} == {1, 2, 3}


@pytest.mark.parametrize("case", POOL_CASES, ids=[_pool_id(c) for c in POOL_CASES])
def test_dilated_pools_match_onnxruntime(case: tuple[str, int, dict[str, Any]]) -> None:
    op, rank, attrs = case
    model = _pool_model(op, rank, attrs)
    x = np.random.default_rng(rank).standard_normal([2, 3, *SPATIAL[rank]]).astype(np.float32)
    (want,) = run_onnxruntime(model, {"x": x})
    (got,) = _run(model, [x])
    _assert_same(got.numpy(), want)


@pytest.mark.parametrize(
    "attrs",
    [
        # pads beyond the kernel: onnxruntime refuses; windows of padding alone are NaN (0/0)
        {"pads": [2, 3], "count_include_pad": 0},
        {"pads": [2, 3], "count_include_pad": 1},
        {"pads": [0, 4], "count_include_pad": 1, "ceil_mode": 1, "strides": [3]},
    ],
)
def test_dilated_average_pool_matches_the_reference_where_onnxruntime_refuses(
    attrs: dict[str, Any],
) -> None:
    model = _pool_model("AveragePool", 1, {"kernel_shape": [2], "dilations": [2], **attrs})
    x = np.random.default_rng(0).standard_normal([2, 3, 9]).astype(np.float32)
    with warnings.catch_warnings():  # the reference's mean of a window of padding alone
        warnings.simplefilter("ignore", RuntimeWarning)
        (want,) = ReferenceEvaluator(model).run(None, {"x": x})
    (got,) = _run(model, [x])
    _assert_same(got.numpy(), want)


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool", "LpPool"])
def test_ceil_mode_drops_windows_that_start_in_the_end_padding(op: str) -> None:
    """Floor mode over an end padding as long as a window can have more windows than ceil
    mode (ONNX's rule, the reference's and torch's): 7 + 3 cells, stride 3 → 4 windows in
    floor mode, 3 in ceil mode (the fourth would start in the padding)."""
    x = np.random.default_rng(0).standard_normal([2, 3, 7]).astype(np.float32)
    counts: dict[int, int] = {}
    for ceil in (0, 1):
        attrs = {"kernel_shape": [1], "strides": [3], "pads": [0, 3], "ceil_mode": ceil}
        attrs |= {"dilations": [2]} if op != "MaxPool" else {}
        model = _pool_model(op, 1, attrs, spatial=[7])
        (got,) = _run(model, [x])
        counts[ceil] = got.shape[-1]
        np.testing.assert_allclose(np.abs(got[..., :3].numpy()), np.abs(x[..., ::3]), 1e-6)
        if op == "MaxPool" and ceil:
            (want,) = ReferenceEvaluator(model).run(None, {"x": x})
            _assert_same(got.numpy(), want)
    assert counts == {0: 4, 1: 3}


@pytest.mark.parametrize("ceil", [0, 1])
@pytest.mark.parametrize("pads", [[0, 0, 0, 0], [1, 0, 1, 1]])
def test_max_pool_dilations_and_ceil_mode_match_onnxruntime(ceil: int, pads: list[int]) -> None:
    attrs = {"kernel_shape": [2, 3], "strides": [2, 2], "dilations": [2, 3], "pads": pads}
    model = _pool_model("MaxPool", 2, {**attrs, "ceil_mode": ceil})
    x = np.random.default_rng(0).standard_normal([2, 3, 7, 8]).astype(np.float32)
    (want,) = run_onnxruntime(model, {"x": x})
    (got,) = _run(model, [x])
    _assert_same(got.numpy(), want)


def test_dilated_pools_keep_the_dtype_and_mixed_dilations_work() -> None:
    attrs = {"kernel_shape": [2, 3], "dilations": [1, 2], "pads": [1, 0, 0, 2], "ceil_mode": 1}
    for op in ("AveragePool", "LpPool"):
        model = _pool_model(op, 2, {**attrs, "strides": [2, 1]})
        x = np.random.default_rng(1).standard_normal([2, 3, 7, 8]).astype(np.float32)
        (want,) = run_onnxruntime(model, {"x": x})
        half_model = _pool_model(op, 2, {**attrs, "strides": [2, 1]}, TensorProto.FLOAT16)
        half = _run(half_model, [x.astype(np.float16)])
        (got,) = _run(model, [x])
        _assert_same(got.numpy(), want)
        assert half[0].dtype == torch.float16
        np.testing.assert_allclose(half[0].float().numpy(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("op", ["AveragePool", "LpPool"])
@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_same_padding_with_dilations_is_refused(op: str, auto_pad: str) -> None:
    attrs = {"kernel_shape": [3, 3], "dilations": [2, 2], "auto_pad": auto_pad}
    with pytest.raises(UnsupportedModelError, match=f"auto_pad={auto_pad} and dilations"):
        convert(_pool_model(op, 2, attrs))
    # without dilations SAME padding converts as before
    convert(_pool_model(op, 2, {"kernel_shape": [3, 3], "auto_pad": auto_pad}))


def _gradcheck(model: onnx.ModelProto, inputs: list[torch.Tensor]) -> None:
    graph = convert(model, mode="eval")
    leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    assert torch.autograd.gradcheck(lambda *xs: graph(*xs), leaves, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    ("op", "extra"),
    [
        ("AveragePool", {"count_include_pad": 0, "ceil_mode": 1}),
        ("AveragePool", {"count_include_pad": 1, "ceil_mode": 0}),
        ("LpPool", {"p": 3, "ceil_mode": 1}),
        ("LpPool", {"p": 2, "ceil_mode": 0}),
    ],
)
def test_dilated_pools_gradcheck(op: str, extra: dict[str, Any]) -> None:
    attrs = {"kernel_shape": [2, 3], "strides": [2, 1], "dilations": [2, 2], "pads": [1, 0, 1, 1]}
    model = _pool_model(op, 2, {**attrs, **extra}, D)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 6, 7, generator=g, dtype=torch.float64)
    _gradcheck(model, [x + torch.sign(x) * 0.2])  # |x| away from LpPool's kink at 0


# -- Col2Im --------------------------------------------------------------------------------


def _col2im_inputs(
    image: list[int], block: list[int], attrs: dict[str, Any], channels: int = 2
) -> np.ndarray:
    n = len(image)
    pads = attrs.get("pads", [0] * 2 * n)
    counts = [
        (image[i] + pads[i] + pads[i + n] - attrs.get("dilations", [1] * n)[i] * (block[i] - 1) - 1)
        // attrs.get("strides", [1] * n)[i]
        + 1
        for i in range(n)
    ]
    shape = [2, channels * int(np.prod(block)), int(np.prod(counts))]
    return np.random.default_rng(n).standard_normal(shape).astype(np.float32)


def _col2im_model(
    image: list[int], block: list[int], attrs: dict[str, Any], *, constant: bool, elem: int = F32
) -> tuple[onnx.ModelProto, list[Any]]:
    x = _col2im_inputs(image, block, attrs)
    shapes = {"image": np.array(image, np.int64), "block": np.array(block, np.int64)}
    node = helper.make_node("Col2Im", ["x", "image", "block"], ["y"], **attrs)
    inputs = [_tensor("x", elem, list(x.shape))]
    feeds: list[Any] = [x]
    if not constant:
        inputs += [_tensor(name, I64, [len(image)]) for name in shapes]
        feeds += list(shapes.values())
    model = _model([node], inputs, [_tensor("y", elem)], None if not constant else shapes, opset=18)
    return model, feeds


def _col2im_cases() -> list[tuple[list[int], list[int], dict[str, Any]]]:
    cases = []
    for image, block in (([9], [3]), ([5, 6], [2, 3]), ([4, 5, 3], [2, 2, 2])):
        n = len(image)
        for stride, dilation, pads in itertools.product([1, 2], [1, 2], [(0, 0), (1, 2)]):
            attrs = {"strides": [stride] * n, "dilations": [dilation] * n}
            attrs["pads"] = [pads[0]] * n + [pads[1]] * n
            cases.append((image, block, attrs))
    return cases


@pytest.mark.parametrize(("image", "block", "attrs"), _col2im_cases())
def test_col2im_matches_the_reference(
    image: list[int], block: list[int], attrs: dict[str, Any]
) -> None:
    """N-D against onnx's reference; 2-D also against onnxruntime (whose other ranks mix up
    channels when dilated: a channel's cells land in the next one's image)."""
    for constant in (True, False):
        model, feeds = _col2im_model(image, block, attrs, constant=constant)
        names = ["x", "image", "block"][: len(feeds)]
        (want,) = ReferenceEvaluator(model).run(None, dict(zip(names, feeds, strict=True)))
        (got,) = _run(model, feeds)
        _assert_same(got.numpy(), want)
        if len(image) == 2 or max(attrs["dilations"]) == 1:
            (ours,) = run_onnxruntime(model, dict(zip(names, feeds, strict=True)))
            _assert_same(got.numpy(), ours)


def test_col2im_with_default_attributes_matches_onnxruntime() -> None:
    model, feeds = _col2im_model([5, 5], [1, 5], {}, constant=True)
    (want,) = run_onnxruntime(model, {"x": feeds[0]})
    (got,) = _run(model, feeds)
    assert got.shape == (2, 2, 5, 5)
    _assert_same(got.numpy(), want)


@pytest.mark.parametrize(
    ("image", "block", "attrs"),
    [
        ([5, 6], [2, 3], {"strides": [2, 1], "dilations": [1, 2], "pads": [1, 0, 0, 2]}),
        ([4, 5, 3], [2, 2, 2], {"strides": [1, 2, 1], "dilations": [2, 1, 1], "pads": [1] * 6}),
        ([9], [3], {"strides": [2], "dilations": [2], "pads": [2, 1]}),
    ],
)
def test_col2im_gradcheck(image: list[int], block: list[int], attrs: dict[str, Any]) -> None:
    model, feeds = _col2im_model(image, block, attrs, constant=True, elem=D)
    _gradcheck(model, [torch.from_numpy(feeds[0].astype(np.float64))])


def test_col2im_refuses_mismatched_attributes_and_inputs() -> None:
    node = helper.make_node(
        "Col2Im", ["x", "image", "block"], ["y"], strides=[1, 1], dilations=[1, 1, 1]
    )
    model = _model(
        [node],
        [_tensor("x", F32, [1, 4, 9]), _tensor("image", I64, [2]), _tensor("block", I64, [2])],
        [_tensor("y")],
        opset=18,
    )
    with pytest.raises(UnsupportedModelError, match="disagree on the number of spatial axes"):
        convert(model)
    model, feeds = _col2im_model([5, 6], [2, 3], {}, constant=False)
    with pytest.raises(ValueError, match=r"does not hold blocks \[2, 3\] of a \[5, 7\] image"):
        _run(model, [feeds[0], np.array([5, 7], np.int64), feeds[2]])


# -- optional values -------------------------------------------------------------------------


def _optional_tensor(
    elem: int = F32, shape: Sequence[int | str | None] | None = None
) -> onnx.TypeProto:
    return helper.make_optional_type_proto(helper.make_tensor_type_proto(elem, shape))


def _optional_sequence(elem: int = F32) -> onnx.TypeProto:
    return helper.make_optional_type_proto(
        helper.make_sequence_type_proto(helper.make_tensor_type_proto(elem, None))
    )


def _against_onnxruntime(model: onnx.ModelProto, feeds: dict[str, Any]) -> list[Any]:
    """Ours, checked against onnxruntime (onnx's ReferenceEvaluator wraps a present optional
    in a list and cannot pass an empty one through Identity); returns ours as numpy."""
    got = [_numpy(v) for v in _run(model, list(feeds.values()))]
    want = run_onnxruntime(model, feeds)
    assert len(got) == len(want)
    for ours, theirs in zip(got, want, strict=True):
        _assert_same(ours, theirs)
    return got


def test_optional_ops_on_a_present_and_an_empty_value() -> None:
    nodes = [
        helper.make_node("Optional", ["x"], ["present"]),
        helper.make_node("OptionalHasElement", ["present"], ["has_present"]),
        helper.make_node("OptionalGetElement", ["present"], ["got"]),
        helper.make_node("Optional", [], ["empty"], type=helper.make_tensor_type_proto(F32, [3])),
        helper.make_node("OptionalHasElement", ["empty"], ["has_empty"]),
        helper.make_node("OptionalHasElement", [""], ["has_nothing"]),  # opset 18: omitted
        helper.make_node("OptionalHasElement", ["x"], ["has_tensor"]),  # opset 18: a tensor
        helper.make_node("OptionalGetElement", ["x"], ["got_tensor"]),
    ]
    outputs = [_tensor("has_present", BOOL, []), _tensor("got", F32, [3])]
    outputs += [helper.make_value_info("empty", _optional_tensor(F32, [3]))]
    outputs += [_tensor(n, BOOL, []) for n in ("has_empty", "has_nothing", "has_tensor")]
    outputs += [_tensor("got_tensor", F32, [3])]
    model = _model(nodes, [_tensor("x", F32, [3])], outputs, opset=18)
    x = np.array([1.0, -2.0, 3.0], np.float32)
    has_present, got, empty, has_empty, has_nothing, has_tensor, got_tensor = _against_onnxruntime(
        model, {"x": x}
    )
    assert bool(has_present) and not bool(has_empty) and not bool(has_nothing)
    assert bool(has_tensor) and empty is None
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(got_tensor, x)


def test_optional_graph_inputs_and_outputs() -> None:
    nodes = [
        helper.make_node("OptionalHasElement", ["maybe"], ["has"]),
        helper.make_node("Identity", ["maybe"], ["same"]),
        helper.make_node("OptionalHasElement", ["maybe_seq"], ["has_seq"]),
    ]
    model = _model(
        nodes,
        [
            helper.make_value_info("maybe", _optional_tensor(F32, ["n", 2])),
            helper.make_value_info("maybe_seq", _optional_sequence()),
        ],
        [
            _tensor("has", BOOL, []),
            helper.make_value_info("same", _optional_tensor(F32, ["n", 2])),
            _tensor("has_seq", BOOL, []),
        ],
        opset=18,
    )
    graph = convert(copy.deepcopy(model))
    assert graph.metadata["inputs"] == [
        {"name": "maybe", "shape": ["n", 2], "dtype": "optional(float32)"},
        {"name": "maybe_seq", "shape": None, "dtype": "optional(seq(float32))"},
    ]
    x = np.ones((3, 2), np.float32)
    for maybe, maybe_seq in ((x, None), (None, [x, x]), (None, None)):
        has, same, has_seq = _against_onnxruntime(model, {"maybe": maybe, "maybe_seq": maybe_seq})
        assert bool(has) == (maybe is not None) and bool(has_seq) == (maybe_seq is not None)
        assert (same is None) == (maybe is None)
    # a batch may feed the optional tensor (or None), never the optional sequence
    with pytest.raises(BatchError, match=r"'maybe_seq' is a sequence of tensors"):
        check_inputs(graph, [torch.from_numpy(x), None])


def test_optional_tensor_input_passes_the_batch_check() -> None:
    model = _model(
        [helper.make_node("OptionalHasElement", ["maybe"], ["has"])],
        [helper.make_value_info("maybe", _optional_tensor(F32, ["n", 2]))],
        [_tensor("has", BOOL, [])],
        opset=18,
    )
    graph = convert(model)
    check_inputs(graph, [torch.ones(3, 2)])
    check_inputs(graph, [None])
    with pytest.raises(BatchError, match="must have size 2 on axis 1"):
        check_inputs(graph, [torch.ones(3, 3)])


def test_get_element_of_an_empty_optional_fails_at_run_time() -> None:
    nodes = [
        helper.make_node("OptionalGetElement", ["maybe"], ["y"]),
    ]
    model = _model(
        nodes, [helper.make_value_info("maybe", _optional_tensor())], [_tensor("y")], opset=18
    )
    graph = convert(model)
    with pytest.raises(ValueError, match="OptionalGetElement read an empty optional value"):
        graph.run([None])


def _if_optional_model() -> onnx.ModelProto:
    """If whose then branch returns an empty optional sequence, its else branch x and 2x."""
    seq_type = helper.make_sequence_type_proto(helper.make_tensor_type_proto(D, None))
    then_branch = helper.make_graph(
        [helper.make_node("Optional", [], ["nothing"], type=seq_type)],
        "then",
        [],
        [helper.make_value_info("nothing", _optional_sequence(D))],
    )
    else_branch = helper.make_graph(
        [
            helper.make_node("Add", ["x", "x"], ["twice"]),
            helper.make_node("SequenceConstruct", ["x", "twice"], ["both"]),
            helper.make_node("Optional", ["both"], ["some"]),
        ],
        "else",
        [],
        [helper.make_value_info("some", _optional_sequence(D))],
    )
    nodes = [
        helper.make_node(
            "If", ["cond"], ["maybe"], then_branch=then_branch, else_branch=else_branch
        )
    ]
    return _model(
        nodes,
        [_tensor("cond", BOOL, []), _tensor("x", D, [2, 3])],
        [helper.make_value_info("maybe", _optional_sequence(D))],
        opset=18,
    )


@pytest.mark.parametrize("cond", [True, False])
def test_if_branches_return_an_optional(cond: bool) -> None:
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    (maybe,) = _against_onnxruntime(_if_optional_model(), {"cond": np.array(cond), "x": x})
    assert maybe is None if cond else len(maybe) == 2


def test_gradient_flows_through_an_if_returning_an_optional() -> None:
    graph = convert(_if_optional_model(), mode="eval")
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    (maybe,) = graph.run([torch.tensor(False), x])
    (maybe[0] * maybe[1]).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, 4 * x.detach())


def _loop_optional_model() -> onnx.ModelProto:
    """Loop carrying an optional sequence (onnx's test_loop16_seq_none): an empty one starts
    as [0]; each iteration appends x[:i + 1] * scale (scale from the outer scope)."""
    seq_type = helper.make_sequence_type_proto(helper.make_tensor_type_proto(D, None))
    then_branch = helper.make_graph(
        [
            helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.zeros(1))),
            helper.make_node("SequenceConstruct", ["zero"], ["fresh"]),
        ],
        "then",
        [],
        [helper.make_value_info("fresh", seq_type)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("OptionalGetElement", ["seq_in"], ["carried"])],
        "else",
        [],
        [helper.make_value_info("carried", seq_type)],
    )
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("OptionalHasElement", ["seq_in"], ["has"]),
            helper.make_node("Not", ["has"], ["is_none"]),
            helper.make_node(
                "If", ["is_none"], ["sequence"], then_branch=then_branch, else_branch=else_branch
            ),
            helper.make_node("Add", ["i", "one"], ["end"]),
            helper.make_node("Unsqueeze", ["end", "axes"], ["ends"]),
            helper.make_node("Slice", ["x", "starts", "ends"], ["head"]),
            helper.make_node("Mul", ["head", "scale"], ["scaled"]),
            helper.make_node("SequenceInsert", ["sequence", "scaled"], ["seq_out"]),
        ],
        "body",
        [
            _tensor("i", I64, []),
            _tensor("cond_in", BOOL, []),
            helper.make_value_info("seq_in", _optional_sequence(D)),
        ],
        [_tensor("cond_out", BOOL, []), helper.make_value_info("seq_out", seq_type)],
    )
    nodes = [
        helper.make_node("Loop", ["trip", "cond", "start"], ["built"], body=body),
        helper.make_node("ConcatFromSequence", ["built"], ["flat"], axis=0),
    ]
    consts = {
        "one": np.array(1, np.int64),
        "axes": np.array([0], np.int64),
        "starts": np.array([0], np.int64),
    }
    return _model(
        nodes,
        [
            _tensor("trip", I64, []),
            _tensor("cond", BOOL, []),
            helper.make_value_info("start", _optional_sequence(D)),
            _tensor("x", D, [4]),
            _tensor("scale", D, []),
        ],
        [helper.make_value_info("built", seq_type), _tensor("flat", D, [None])],
        consts,
        opset=18,
    )


@pytest.mark.parametrize("start", [None, [np.array([7.0])]], ids=["empty", "present"])
def test_loop_carries_an_optional_sequence(start: list[np.ndarray] | None) -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0])
    feeds = {
        "trip": np.array(3),
        "cond": np.array(True),
        "start": start,
        "x": x,
        "scale": np.array(2.0),
    }
    built, flat = _against_onnxruntime(_loop_optional_model(), feeds)
    first = 0.0 if start is None else 7.0
    np.testing.assert_allclose(flat, [first, 2.0, 2.0, 4.0, 2.0, 4.0, 6.0])
    assert len(built) == 4


def test_loop_carrying_an_optional_gradcheck() -> None:
    graph = convert(_loop_optional_model(), mode="eval")
    fixed = [torch.tensor(3), torch.tensor(True), None]

    def flat(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return graph.run([*fixed, x, scale])[1]

    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(flat, [x, scale], eps=1e-6, atol=1e-5)


def test_optional_gradcheck_through_optional_and_get_element() -> None:
    nodes = [
        helper.make_node("Optional", ["x"], ["o"]),
        helper.make_node("OptionalGetElement", ["o"], ["got"]),
        helper.make_node("Mul", ["got", "got"], ["y"]),
    ]
    model = _model(nodes, [_tensor("x", D, [2, 3])], [_tensor("y", D, [2, 3])], opset=18)
    _gradcheck(model, [torch.randn(2, 3, dtype=torch.float64)])


def test_an_initializer_read_only_by_optional_has_element_is_no_parameter() -> None:
    nodes = [
        helper.make_node("OptionalHasElement", ["w"], ["has"]),
        helper.make_node("Cast", ["has"], ["has_f"], to=F32),
        helper.make_node("Mul", ["x", "has_f"], ["y"]),
        helper.make_node("Mul", ["x", "v"], ["z"]),
    ]
    model = _model(
        nodes,
        [_tensor("x", F32, [2])],
        [_tensor("y", F32, [2]), _tensor("z", F32, [2])],
        {"w": np.ones(2, np.float32), "v": np.ones(2, np.float32)},
        opset=18,
    )
    graph = convert(model)
    assert [name for name, _ in graph.named_graph_parameters()] == ["v"]


def test_optionals_of_unsupported_types_are_refused() -> None:
    map_type = helper.make_map_type_proto(I64, helper.make_tensor_type_proto(F32, None))
    nodes = [
        helper.make_node("Identity", ["words"], ["words_out"]),
        helper.make_node("Optional", [], ["strings"], type=helper.make_tensor_type_proto(8, None)),
        helper.make_node("OptionalHasElement", ["strings"], ["has"]),
    ]
    model = _model(
        nodes,
        [helper.make_value_info("words", helper.make_optional_type_proto(map_type))],
        [
            helper.make_value_info("words_out", helper.make_optional_type_proto(map_type)),
            _tensor("has", BOOL, []),
        ],
        opset=18,
    )
    with pytest.raises(UnsupportedModelError) as info:
        convert(model)
    message = info.value.message
    assert "'words' is an optional map: only optional tensors and sequences" in message
    assert "ai.onnx::Optional (opset 18): Optional of string tensors is not supported" in message

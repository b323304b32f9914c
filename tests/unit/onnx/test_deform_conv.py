"""DeformConv: one-node models against onnxruntime and the ONNX reference on random inputs
beyond the backend cases (groups, offset groups, strides, pads, dilations, mask and bias,
samples outside the input), and gradcheck w.r.t. X, W, offset, B and mask."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from service.engine.onnx.convert import convert
from service.errors import UnsupportedModelError

_ELEM = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}
_NAMES = ("X", "W", "offset", "B", "mask")


def _model(
    feeds: Mapping[str, np.ndarray | None], opset: int = 19, **attrs: Any
) -> onnx.ModelProto:
    """One DeformConv node; a None feed is an omitted optional input."""
    elem = _ELEM[next(v for v in feeds.values() if v is not None).dtype]
    names = [name if feeds.get(name) is not None else "" for name in _NAMES]
    while not names[-1]:
        names.pop()
    node = helper.make_node("DeformConv", names, ["Y"], **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(name, elem, list(value.shape))
            for name, value in feeds.items()
            if value is not None
        ],
        [helper.make_tensor_value_info("Y", elem, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def _ours(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    graph = convert(model, mode="eval")
    with torch.no_grad():
        out = graph.run([torch.from_numpy(v) for v in feeds.values()])
    out = out[0] if isinstance(out, list | tuple) else out
    return out.numpy()


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    out = ReferenceEvaluator(model).run(None, feeds)
    assert isinstance(out, list)
    return np.asarray(out[0])


def _case(
    *,
    n: int = 1,
    c: int = 2,
    out_c: int = 2,
    size: tuple[int, int] = (5, 5),
    kernel: tuple[int, int] = (2, 2),
    group: int = 1,
    offset_group: int = 1,
    strides: tuple[int, int] = (1, 1),
    pads: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilations: tuple[int, int] = (1, 1),
    bias: bool = False,
    mask: bool = False,
    spread: float = 1.5,
    dtype: type = np.float32,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray | None], dict[str, Any]]:
    """Random feeds and attributes. Offsets are uniform in ±spread: beyond the padding they
    move taps (partly or wholly) outside the input."""
    rng = np.random.default_rng(seed)
    out_hw = [
        (size[i] + pads[i] + pads[i + 2] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1
        for i in range(2)
    ]
    taps = kernel[0] * kernel[1]
    feeds: dict[str, np.ndarray | None] = {
        "X": rng.standard_normal((n, c, *size)).astype(dtype),
        "W": rng.standard_normal((out_c, c // group, *kernel)).astype(dtype),
        "offset": rng.uniform(-spread, spread, (n, offset_group * 2 * taps, *out_hw)).astype(dtype),
        "B": rng.standard_normal(out_c).astype(dtype) if bias else None,
        "mask": rng.uniform(0, 1, (n, offset_group * taps, *out_hw)).astype(dtype)
        if mask
        else None,
    }
    attrs = {
        "kernel_shape": list(kernel),
        "group": group,
        "offset_group": offset_group,
        "strides": list(strides),
        "pads": list(pads),
        "dilations": list(dilations),
    }
    return feeds, attrs


CASES: dict[str, dict[str, Any]] = {
    "plain": {"n": 2, "c": 3, "out_c": 4, "size": (6, 7), "kernel": (3, 3)},
    "groups_mask_bias": {
        "c": 4,
        "out_c": 6,
        "group": 2,
        "offset_group": 2,
        "strides": (2, 2),
        "pads": (1, 2, 0, 1),
        "dilations": (2, 1),
        "kernel": (2, 3),
        "size": (6, 6),
        "bias": True,
        "mask": True,
        "spread": 3.0,
    },
    "offset_groups_mask_only": {
        "c": 4,
        "out_c": 2,
        "offset_group": 4,
        "strides": (1, 2),
        "kernel": (2, 3),
        "mask": True,
    },
    "group3_bias_dilated": {
        "c": 6,
        "out_c": 3,
        "group": 3,
        "offset_group": 3,
        "size": (5, 6),
        "pads": (2, 2, 2, 2),
        "dilations": (2, 2),
        "kernel": (3, 2),
        "bias": True,
        "spread": 4.0,
    },
    "mostly_outside": {"pads": (1, 1, 1, 1), "kernel": (3, 3), "spread": 6.0, "mask": True},
    "one_row": {"size": (1, 6), "kernel": (1, 3), "spread": 1.5},
}


@pytest.mark.parametrize("opset", [19, 22])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_onnxruntime(name: str, dtype: type, opset: int) -> None:
    feeds, attrs = _case(**CASES[name], dtype=dtype, seed=len(name))
    model = _model(feeds, opset, **attrs)
    present = {k: v for k, v in feeds.items() if v is not None}
    got, want = _ours(model, present), _ort(model, present)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


# The reference is a Python loop per output element; a 1-pixel-high input divides by zero in
# its [-1, 1] grid normalisation (NaN), so "one_row" is checked against onnxruntime only.
@pytest.mark.parametrize("name", [n for n in CASES if n != "one_row"])
def test_matches_reference(name: str) -> None:
    case = {**CASES[name], "n": 1}
    feeds, attrs = _case(**case, dtype=np.float64, seed=7)
    model = _model(feeds, **attrs)
    present = {k: v for k, v in feeds.items() if v is not None}
    want = _reference(model, present)
    # the reference denormalises sampling positions in float32 even for double inputs
    np.testing.assert_allclose(_ours(model, present), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("dtype", "elem", "tol"),
    [(torch.float16, TensorProto.FLOAT16, 1e-2), (torch.bfloat16, TensorProto.BFLOAT16, 1e-1)],
)
def test_opset22_half_types(dtype: torch.dtype, elem: int, tol: float) -> None:
    """Opset 22's half types run forward and backward in their own dtype, close to float64."""
    feeds, attrs = _case(**CASES["groups_mask_bias"], dtype=np.float64, seed=1)
    present = {k: v for k, v in feeds.items() if v is not None}
    want = _ours(_model(feeds, 22, **attrs), present)
    model = _model(feeds, 22, **attrs)
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.elem_type = elem
    leaves = [torch.from_numpy(v).to(dtype).requires_grad_(True) for v in present.values()]
    out = convert(model, mode="train")(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    out.float().square().sum().backward()
    assert out.dtype == dtype
    assert all(t.grad is not None and t.grad.dtype == dtype for t in leaves)
    np.testing.assert_allclose(out.detach().double().numpy(), want, atol=tol * np.abs(want).max())


def test_border_sampling_reads_zeros_outside() -> None:
    """Ones sampled by a 1×1 kernel: the value is the share of the bilinear footprint that lies
    inside the input (the reference's GridSample with padding_mode='zeros')."""
    x = np.ones((1, 1, 3, 4), dtype=np.float64)
    w = np.ones((1, 1, 1, 1), dtype=np.float64)
    offset = np.zeros((1, 2, 3, 4), dtype=np.float64)
    offset[0, 0, 0, 0] = -0.25  # y = -0.25: 3/4 on row 0
    offset[0, 0, 0, 1] = -1.0  # y = -1: exactly on the row above, all outside
    offset[0, 0, 2, 2] = 0.5  # y = 2.5 past the last row: half inside
    offset[0, 1, 1, 3] = 0.9  # x = 3.9: 1/10 inside
    offset[0, 0, 1, 0], offset[0, 1, 1, 0] = -1.5, -1.5  # both outside by more than a pixel
    offset[0, 0, 2, 0], offset[0, 1, 2, 0] = 0.5, -0.5  # y = 2.5, x = -0.5: 1/2 · 1/2
    feeds = {"X": x, "W": w, "offset": offset}
    model = _model(feeds, kernel_shape=[1, 1])
    want = np.ones((1, 1, 3, 4))
    want[0, 0, 0, 0], want[0, 0, 0, 1], want[0, 0, 2, 2] = 0.75, 0.0, 0.5
    want[0, 0, 1, 3], want[0, 0, 1, 0], want[0, 0, 2, 0] = 0.1, 0.0, 0.25
    got = _ours(model, feeds)
    np.testing.assert_allclose(got, want, atol=1e-12)
    np.testing.assert_allclose(got, _reference(model, feeds), atol=1e-6)
    np.testing.assert_allclose(got, _ort(model, feeds), atol=1e-12)


def _off_integer(shape: tuple[int, ...], seed: int, spread: int) -> torch.Tensor:
    """Offsets whose fractional parts stay in [0.2, 0.8]: the undeformed positions are integers
    and bilinear sampling has kinks at integer positions, where gradcheck's differences would
    straddle two pieces."""
    g = torch.Generator().manual_seed(seed)
    whole = torch.randint(-spread, spread + 1, shape, generator=g).double()
    return whole + 0.2 + 0.6 * torch.rand(shape, generator=g, dtype=torch.float64)


GRAD_CASES: dict[str, dict[str, Any]] = {
    "offset_groups_mask_bias": {"c": 2, "out_c": 2, "offset_group": 2, "pads": (1, 1, 1, 1)},
    "groups_strided_dilated": {
        "c": 4,
        "out_c": 2,
        "group": 2,
        "strides": (2, 1),
        "dilations": (1, 2),
        "size": (5, 5),
    },
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradcheck(name: str) -> None:
    feeds, attrs = _case(**GRAD_CASES[name], bias=True, mask=True, dtype=np.float64, seed=3)
    model = _model(feeds, **attrs)
    graph = convert(model, mode="eval")
    leaves = [torch.from_numpy(v).clone() for v in feeds.values() if v is not None]
    # offsets up to 2 pixels from the window, some taps partly or wholly outside the input
    leaves[2] = _off_integer(tuple(leaves[2].shape), seed=5, spread=2)
    leaves = [t.requires_grad_(True) for t in leaves]

    def fn(*xs: torch.Tensor) -> torch.Tensor:
        out = graph(*xs)
        return out[0] if isinstance(out, tuple) else out

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5)


def test_refuses_3d() -> None:
    x = np.zeros((1, 1, 3, 3, 3), dtype=np.float32)
    w = np.zeros((1, 1, 2, 2, 2), dtype=np.float32)
    offset = np.zeros((1, 24, 2, 2, 2), dtype=np.float32)
    model = _model({"X": x, "W": w, "offset": offset}, kernel_shape=[2, 2, 2])
    with pytest.raises(UnsupportedModelError, match="2-D only"):
        convert(model)

"""The ONNX backend test data shipped in the `onnx` package, run through the converter.

Node cases come from `onnx.backend.test.case.node` (generated in memory: the wheel does not
ship `data/node`), the model cases from `onnx/backend/test/data/{pytorch-converted,
pytorch-operator,simple,light}`. A case is *supported* when the converter accepts the model and
every input and output is a tensor; a supported case must match the expected outputs (node and
directory cases) or onnxruntime (`light` models, which ship no inputs).

Used by tests/unit/onnx/test_backend_data.py and bench/onnx_backend.py.
"""

from __future__ import annotations

import copy
import functools
import glob
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from service.engine.onnx.convert import convert
from service.engine.onnx.ops._util import SUB_BYTE_TO_TORCH, sub_byte_tensor
from service.errors import UnsupportedModelError

DATA_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
MODEL_SUITES = ("pytorch-converted", "pytorch-operator", "simple", "light")

# Cases whose expected outputs come from a random generator (numpy's): no implementation can
# reproduce them; they are reported apart, never counted as passes.
RANDOM_CASES = ("test_training_dropout", "test_bernoulli", "test_random")


@dataclass
class Case:
    name: str
    suite: str
    model: onnx.ModelProto
    data_sets: list[tuple[list[Any], list[Any]]] = field(default_factory=list)
    rtol: float = 1e-3
    atol: float = 1e-7


def node_cases() -> Iterator[Case]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        collected = collect_testcases(None)
    for tc in collected:
        assert tc.model is not None, tc.name  # node cases always carry their model
        data_sets = cast(list[tuple[list[Any], list[Any]]], list(tc.data_sets or []))
        yield Case(tc.name, "node", tc.model, data_sets, tc.rtol, tc.atol)


@functools.cache
def node_cases_named(prefixes: tuple[str, ...]) -> dict[str, Case]:
    """The node cases whose names start with one of `prefixes`, by name (one collection per
    set of prefixes: an op's own tests run its cases without reading every case each time)."""
    return {case.name: case for case in node_cases() if case.name.startswith(prefixes)}


def _read_pb(path: str, value_type: onnx.TypeProto | None = None) -> Any:
    """A test data file: a TensorProto, or for a sequence or optional value (by the graph's
    declared type) a SequenceProto (a list) or an OptionalProto (None when empty)."""
    kind = value_type.WhichOneof("value") if value_type is not None else None
    proto: Any = {"sequence_type": onnx.SequenceProto, "optional_type": onnx.OptionalProto}.get(
        kind or "", onnx.TensorProto
    )()
    with open(path, "rb") as handle:
        proto.ParseFromString(handle.read())
    if isinstance(proto, onnx.SequenceProto):
        return numpy_helper.to_list(proto)
    if isinstance(proto, onnx.OptionalProto):
        return numpy_helper.to_optional(proto)
    return numpy_helper.to_array(proto)


def _at(types: list[onnx.TypeProto], index: int) -> onnx.TypeProto | None:
    return types[index] if index < len(types) else None


def model_cases(suites: tuple[str, ...] = MODEL_SUITES) -> Iterator[Case]:
    for suite in suites:
        root = os.path.join(DATA_DIR, suite)
        if suite == "light":
            for path in sorted(glob.glob(os.path.join(root, "*.onnx"))):
                name = os.path.splitext(os.path.basename(path))[0]
                yield Case(name, suite, onnx.load(path))
            continue
        for case_dir in sorted(glob.glob(os.path.join(root, "test_*"))):
            model = onnx.load(os.path.join(case_dir, "model.onnx"))
            sets = []
            for data_dir in sorted(glob.glob(os.path.join(case_dir, "test_data_set_*"))):
                ins = sorted(glob.glob(os.path.join(data_dir, "input_*.pb")))
                outs = sorted(glob.glob(os.path.join(data_dir, "output_*.pb")))
                ins.sort(key=lambda p: int(p.rsplit("_", 1)[1].split(".")[0]))
                outs.sort(key=lambda p: int(p.rsplit("_", 1)[1].split(".")[0]))
                inits = {i.name for i in model.graph.initializer}
                in_types = [i.type for i in model.graph.input if i.name not in inits]
                out_types = [o.type for o in model.graph.output]
                sets.append(
                    (
                        [_read_pb(p, _at(in_types, j)) for j, p in enumerate(ins)],
                        [_read_pb(p, _at(out_types, j)) for j, p in enumerate(outs)],
                    )
                )
            yield Case(os.path.basename(case_dir), suite, model, sets)


# onnx's reference data holds bfloat16 and float8 as `ml_dtypes` numpy types, which
# torch.from_numpy refuses: the same bits, read through an unsigned integer of their width.
_ML_DTYPES: dict[str, tuple[type[np.unsignedinteger[Any]], torch.dtype]] = {
    "bfloat16": (np.uint16, torch.bfloat16),
    "float8_e4m3fn": (np.uint8, torch.float8_e4m3fn),
    "float8_e4m3fnuz": (np.uint8, torch.float8_e4m3fnuz),
    "float8_e5m2": (np.uint8, torch.float8_e5m2),
    "float8_e5m2fnuz": (np.uint8, torch.float8_e5m2fnuz),
    "float8_e8m0fnu": (np.uint8, torch.float8_e8m0fnu),
}
# The types narrower than a byte (`ml_dtypes` int4, int2, float4_e2m1fn, ... one per byte) are
# held by value in a wider torch dtype, as the converter holds them (ops/_util.py), by name
_SUB_BYTE_TYPES: dict[str, int] = {
    helper.tensor_dtype_to_np_dtype(onnx_type).name: onnx_type for onnx_type in SUB_BYTE_TO_TORCH
}


def _from_proto(value: Any) -> Any:
    """A node case's value as numpy: cases whose types numpy lacks (float8, bfloat16, int4)
    hold TensorProtos, which `onnx.numpy_helper` reads as `ml_dtypes` arrays."""
    return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else value


def _to_torch(value: Any) -> Any:
    """A tensor, a list of tensors for an ONNX sequence, or None (strings, maps, ...; an
    empty optional is None too: `_unconvertible` tells them apart)."""
    if isinstance(value, list):
        tensors = [_to_torch(v) for v in value]
        ok = all(isinstance(t, torch.Tensor) for t in tensors)
        return tensors if ok else None
    if isinstance(value, np.generic):  # a scalar input (a window's size: np.int32(10))
        value = np.asarray(value)
    if not isinstance(value, np.ndarray) or value.dtype.kind in "OUS":
        return None
    if value.dtype.name in _SUB_BYTE_TYPES:
        return sub_byte_tensor(value, _SUB_BYTE_TYPES[value.dtype.name])
    if value.dtype.name in _ML_DTYPES:
        bits, dtype = _ML_DTYPES[value.dtype.name]
        return torch.from_numpy(np.array(value, copy=True).view(bits)).view(dtype)
    try:
        return torch.from_numpy(np.array(value, copy=True))
    except TypeError:  # float6 and other `ml_dtypes` types torch has no dtype for
        return None


def _unconvertible(value: Any) -> bool:
    """Whether `value` (not None: an empty optional) has no torch form (strings, maps)."""
    return value is not None and _to_torch(value) is None


def _light_data(case: Case) -> list[tuple[list[Any], list[Any]]]:
    import onnxruntime as ort

    inits = {i.name for i in case.model.graph.initializer}
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in case.model.graph.input:
        if inp.name in inits:
            continue
        shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
        feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the light models carry unused initializers: no warnings
    session = ort.InferenceSession(
        case.model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return [(list(feeds.values()), session.run(None, feeds))]


def run_case(case: Case) -> tuple[str, str]:
    """("pass" | "unsupported" | "random" | "fail", detail)."""
    if case.name.startswith(RANDOM_CASES):
        return "random", "expected outputs come from a random generator"
    try:
        graph = convert(copy.deepcopy(case.model), mode="eval")
    except UnsupportedModelError as exc:
        return "unsupported", exc.message
    except Exception as exc:
        return "fail", f"conversion: {type(exc).__name__}: {exc}"
    data_sets = case.data_sets or (_light_data(case) if case.suite == "light" else [])
    for inputs, expected in data_sets:
        inputs, expected = [_from_proto(v) for v in inputs], [_from_proto(v) for v in expected]
        feeds = [_to_torch(v) for v in inputs]
        if any(_unconvertible(v) for v in [*inputs, *expected]):
            return "unsupported", "non-tensor (string, map) inputs or outputs"
        if len(feeds) > len(graph.input_names):  # optional graph inputs left out
            return "unsupported", "more inputs than the graph declares"
        try:
            with torch.no_grad():
                outputs = graph.run(feeds + [None] * (len(graph.input_names) - len(feeds)))
        except Exception as exc:
            return "fail", f"{type(exc).__name__}: {exc}"
        for i, (got, want) in enumerate(zip(outputs, expected, strict=True)):
            mismatch = _mismatch(got, want, case)
            if mismatch:
                return "fail", f"output {i}: {mismatch}"
    return "pass", ""


# (rtol, atol) floors for the 16-bit floats, about 4 and 1 units in the last place: expected
# values were rounded once, ours per op (bfloat16 attention's expected values are further from
# a float32 computation than ours: 1 to 2 units apart).
_ROUNDED_ONCE = {"float16": (4e-3, 1e-3), "bfloat16": (3e-2, 8e-3)}


def _mismatch(got: Any, want: Any, case: Case) -> str:
    """Why `got` differs from the expected `want` ("" if it does not); lists are sequences,
    None an empty optional."""
    if want is None or got is None:
        return "" if got is want else f"{type(got).__name__}, expected {type(want).__name__}"
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            length = len(got) if isinstance(got, list) else type(got).__name__
            return f"sequence of {length}, expected {len(want)} tensor(s)"
        for j, (g, w) in enumerate(zip(got, want, strict=True)):
            mismatch = _mismatch(g, w, case)
            if mismatch:
                return f"element {j}: {mismatch}"
        return ""
    dtype_name = want.dtype.name
    if dtype_name in _SUB_BYTE_TYPES or dtype_name in _ML_DTYPES:
        # numpy has no arithmetic for them: compared by value in float32
        if dtype_name in _SUB_BYTE_TYPES:
            dtype = SUB_BYTE_TO_TORCH[_SUB_BYTE_TYPES[dtype_name]]
        else:
            dtype = _ML_DTYPES[dtype_name][1]
        if not isinstance(got, torch.Tensor) or got.dtype != dtype:
            return f"dtype {getattr(got, 'dtype', type(got).__name__)}, expected {dtype_name}"
        got, want = got.detach().float(), want.astype(np.float32)
    got_np = got.detach().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    if got_np.dtype != want.dtype:
        return f"dtype {got_np.dtype}, expected {want.dtype}"
    rtol, atol = case.rtol, max(case.atol, 1e-6)
    if dtype_name in _ROUNDED_ONCE:
        low_rtol, low_atol = _ROUNDED_ONCE[dtype_name]
        rtol, atol = max(rtol, low_rtol), max(atol, low_atol)
    try:
        np.testing.assert_allclose(got_np, want, rtol=rtol, atol=atol, equal_nan=True)
    except AssertionError as exc:
        return str(str(exc).strip().splitlines()[:6])
    return ""


def all_cases() -> list[Case]:
    return [*node_cases(), *model_cases()]

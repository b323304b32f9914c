"""onnxruntime's dynamically quantised LSTM (com.microsoft DynamicQuantizeLSTM, what
`quantize_dynamic` writes for every LSTM) converts as fake quantisation (quantized_lstm.py).

Its forward equals onnxruntime's on one thread (where the kernel quantises each step's hidden
state over the whole batch) to float32 rounding; W and R are float parameters under the
float model's names, and their gradients (and the bias's, and the input's) equal those of the
same computation written out in the test: dequantized weights, the input and every step's
hidden state rounded as DynamicQuantizeLinear rounds them, the gradient passed straight
through each rounding."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from service.engine.onnx.conformance import check_conversion
from service.engine.onnx.convert import convert
from service.engine.onnx.ops.recurrent import RecurrentFn
from service.errors import UnsupportedModelError
from tests.support.quantized_reference import fake_dynamic_quantized
from tests.support.recurrent_zoo import run_onnxruntime

MS = "com.microsoft"
HIDDEN = 24


class _Recurrent(torch.nn.Module):
    def __init__(self, bidirectional: bool) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(
            10, HIDDEN, num_layers=2, batch_first=True, bidirectional=bidirectional
        )
        self.head = torch.nn.Linear(HIDDEN * (2 if bidirectional else 1), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(x)
        return self.head(y[:, -1])


def _quantized(
    tmp_path: Path, *, bidirectional: bool, per_channel: bool, weight_type: str = "QInt8"
) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    torch.manual_seed(0)
    source, target = tmp_path / "lstm.onnx", tmp_path / "lstm.int8.onnx"
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter's deprecation, nn.LSTM's batch_first
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Recurrent(bidirectional).eval(),
            (torch.randn(6, 5, 10),),
            buffer,  # type: ignore[arg-type]
            dynamo=False,
            input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
        )
    source.write_bytes(buffer.getvalue())
    quantize_dynamic(source, target, weight_type=QuantType[weight_type], per_channel=per_channel)
    model = onnx.load(target)
    assert sum(n.op_type == "DynamicQuantizeLSTM" for n in model.graph.node) == 2
    return model


def _batch(rows: int = 6) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((rows, 5, 10)).astype(np.float32)


# -- the reference: the same computation written out ------------------------------------------


def _dequantized(init: dict[str, np.ndarray], name: str) -> np.ndarray:
    """[D, K, 4H] integers with per-direction or per-column scales → [D, 4H, K] floats."""
    q = init[name].astype(np.float32)
    base = name.removesuffix("_quantized")
    scale = init[f"{base}_scale"].reshape(q.shape[0], 1, -1)
    zero = init[f"{base}_zero_point"].astype(np.float32).reshape(q.shape[0], 1, -1)
    return ((q - zero) * scale).transpose(0, 2, 1)


def _lstm_direction(
    x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, b: torch.Tensor, reverse: bool
) -> torch.Tensor:
    """ONNX's LSTM (gates i, o, f, c) over [T, batch, input], h_{t-1} fake-quantised."""
    steps, batch = x.shape[0], x.shape[1]
    h = c = x.new_zeros(batch, HIDDEN)
    projected = x @ w.t() + b[: 4 * HIDDEN] + b[4 * HIDDEN :]
    ys = [h] * steps
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        gates = projected[t] + fake_dynamic_quantized(h) @ r.t()
        i, o, f, cand = gates.split(HIDDEN, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(cand)
        h = torch.sigmoid(o) * torch.tanh(c)
        ys[t] = h
    return torch.stack(ys, 0)


def _reference(
    model: onnx.ModelProto, x: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Output, gradients of the LSTMs' W, R and B (by the float names), and the input's, of
    the sum of the output."""
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    lstms = [n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM"]
    params: dict[str, torch.Tensor] = {}
    for node in lstms:
        for slot in (1, 2):
            params[node.input[slot].removesuffix("_quantized")] = torch.tensor(
                _dequantized(init, node.input[slot]), requires_grad=True
            )
        params[node.input[3]] = torch.tensor(init[node.input[3]], requires_grad=True)
    inputs = torch.tensor(x, requires_grad=True)
    hidden = inputs.transpose(0, 1)  # [T, batch, input]
    for node in lstms:
        w, r, b = (params[node.input[slot].removesuffix("_quantized")] for slot in (1, 2, 3))
        quantized_x = fake_dynamic_quantized(hidden)
        directions = w.shape[0]
        outputs = [
            _lstm_direction(quantized_x, w[d], r[d], b[d], reverse=d == 1)
            for d in range(directions)
        ]
        hidden = torch.cat(outputs, -1)
    head = next(n for n in model.graph.node if n.op_type == "MatMulInteger")
    base = head.input[1].removesuffix("_quantized")
    q, scale, zero = (init[f"{base}_{part}"] for part in ("quantized", "scale", "zero_point"))
    weight = torch.tensor((q.astype(np.float32) - zero.astype(np.float32)) * scale)
    last = fake_dynamic_quantized(hidden[-1]) @ weight
    add = next(n for n in model.graph.node if n.op_type == "Add" and "head.bias" in n.input)
    out = last + torch.tensor(init[add.input[1]])
    out.sum().backward()
    grads = {name: p.grad.numpy() for name, p in params.items()}  # type: ignore[union-attr]
    return out.detach().numpy(), grads, inputs.grad.numpy()  # type: ignore[union-attr]


# -- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bidirectional", "per_channel", "weight_type"),
    [
        (False, False, "QInt8"),
        (True, False, "QInt8"),
        (False, True, "QInt8"),
        (True, True, "QUInt8"),
    ],
)
def test_a_quantized_lstm_computes_what_onnxruntime_computes_with_float_weights(
    tmp_path: Path, bidirectional: bool, per_channel: bool, weight_type: str
) -> None:
    model = _quantized(
        tmp_path, bidirectional=bidirectional, per_channel=per_channel, weight_type=weight_type
    )
    x = _batch()
    (expected,) = run_onnxruntime(model, {"x": x})  # one thread: the batch quantised at once
    reference, reference_grads, reference_x_grad = _reference(model, x)
    np.testing.assert_allclose(reference, expected, atol=1e-6)  # the test's reading of the op
    graph = convert(model)
    inputs = torch.tensor(x, requires_grad=True)
    y = graph(inputs)
    # the same integers, then float32 products in another order: float32 rounding (without
    # the per-step rounding of h the difference is ~2e-3 of the output)
    np.testing.assert_allclose(y.detach().numpy(), expected, atol=1e-6)
    y.sum().backward()
    parameters = dict(graph.named_graph_parameters())
    for name, grad in reference_grads.items():
        assert name in parameters, f"{name} is not a parameter: {sorted(parameters)}"
        got = parameters[name].grad
        assert got is not None and float(got.abs().max()) > 0, name
        np.testing.assert_allclose(got.numpy(), grad, rtol=1e-4, atol=1e-6, err_msg=name)
    assert inputs.grad is not None
    np.testing.assert_allclose(inputs.grad.numpy(), reference_x_grad, rtol=1e-4, atol=1e-7)
    # nothing that is no weight is reported as one
    assert not any(name.endswith(("_scale", "_zero_point", "_quantized")) for name in parameters)


def test_the_whole_sequence_path_and_the_unrolled_one_agree(tmp_path: Path) -> None:
    """The LSTM's autograd Function (Python forward loop rounding h, the usual backward with
    R's gradient from the rounded values) against the unrolled steps (each rounding written
    with h's gradient): the same forward and gradients to float rounding."""
    model = _quantized(tmp_path, bidirectional=True, per_channel=False)
    x = torch.from_numpy(_batch())
    results = []
    for whole_sequence in (True, False):
        graph = convert(model.__deepcopy__())
        recurrent = [n.fn for n in graph.nodes if isinstance(n.fn, RecurrentFn)]
        assert len(recurrent) == 2 and all(fn.whole_sequence for fn in recurrent)
        for fn in recurrent:
            fn.whole_sequence = whole_sequence
        y = graph(x)
        y.square().sum().backward()
        grads = {n: p.grad for n, p in graph.named_graph_parameters()}
        results.append((y.detach(), grads))
    (y_whole, whole), (y_unrolled, unrolled) = results
    # float rounding (the input projection's bias is summed in another order): 1.5e-8 here,
    # far below a step of the state's rounding (~1/255 of its range)
    torch.testing.assert_close(y_whole, y_unrolled, rtol=0, atol=1e-6)
    assert set(whole) == set(unrolled)
    for name, grad in whole.items():
        torch.testing.assert_close(grad, unrolled[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_conformance_check_runs_onnxruntime_on_one_thread_and_says_why(
    tmp_path: Path,
) -> None:
    model = _quantized(tmp_path, bidirectional=False, per_channel=False)
    x = _batch(rows=8)  # 8 rows: onnxruntime splits them into one block per thread on more
    graph = convert(model)
    check = check_conversion(model, graph, [torch.from_numpy(x)])
    assert check.checked and check.max_abs_error is not None, check
    assert check.max_abs_error < 1e-6, check
    assert "DynamicQuantizeLSTM" in (check.reason or "") and "one thread" in (check.reason or "")
    # X and h of both layers and the head's input: where last bits differ, a rounding step
    assert "quantises 5 activation(s) at run time" in (check.reason or ""), check.reason
    assert any("DynamicQuantizeLSTM" in note for note in graph.metadata["notes"])


def test_a_quantized_lstm_with_sequence_lens_is_refused_by_name(tmp_path: Path) -> None:
    """With sequence_lens the kernel quantises only the steps up to the longest sequence and
    reads zeros for finished rows: not what the rewrite computes, so it is refused."""
    model = _quantized(tmp_path, bidirectional=False, per_channel=False)
    node = next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM")
    node.input[4] = "lens"
    model.graph.initializer.append(numpy_helper.from_array(np.full(6, 5, np.int32), "lens"))
    with pytest.raises(UnsupportedModelError, match=r"DynamicQuantizeLSTM.*no sequence_lens"):
        convert(model)


def test_a_quantized_lstm_whose_weights_are_computed_is_refused(tmp_path: Path) -> None:
    model = _quantized(tmp_path, bidirectional=False, per_channel=False)
    node = next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM")
    weight = node.input[1]
    model.graph.node.insert(0, helper.make_node("Identity", [weight], ["computed_w"]))
    node.input[1] = "computed_w"
    with pytest.raises(UnsupportedModelError, match=r"DynamicQuantizeLSTM.*no sequence_lens"):
        convert(model)


def _loss_and_gradients(
    model: onnx.ModelProto, x: np.ndarray, device: str
) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    graph = convert(model.__deepcopy__()).to(device)
    y = graph(torch.from_numpy(x).to(device))
    y.square().sum().backward()
    grads = {n: p.grad.cpu() for n, p in graph.named_graph_parameters() if p.grad is not None}
    return y.detach().cpu().numpy(), grads


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_quantized_lstm_on_cuda_equals_the_cpu_within_a_rounding_step(tmp_path: Path) -> None:
    """Another summation order can move a hidden value across a rounding boundary of the next
    step's quantiser (one step, ~1/255 of its range): outputs within a few such steps."""
    model = _quantized(tmp_path, bidirectional=True, per_channel=True)
    x = _batch()
    expected, expected_grads = _loss_and_gradients(model, x, "cpu")
    got, got_grads = _loss_and_gradients(model, x, "cuda")
    np.testing.assert_allclose(got, expected, atol=2e-3)
    assert set(got_grads) == set(expected_grads)
    for name, grad in expected_grads.items():
        relative = float((got_grads[name] - grad).norm() / grad.norm().clamp(min=1e-12))
        assert relative < 1e-2, (name, relative)

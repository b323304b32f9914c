"""The recurrent layers' CPU products: MKL or oneDNN, chosen once per process (_cpu_products).

Whichever library this machine prefers, both paths are run here: the C++ loops with packed
oneDNN weights against the same loops on MKL's addmm, for LSTM, GRU and RNN, forward and
backward (fp32 summation order differs, so within fp32 tolerance, not bit-equal).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from service.engine import native
from service.engine.onnx.ops import _cpu_products
from service.engine.onnx.ops.gru_sequence import gru_direction
from service.engine.onnx.ops.lstm_sequence import lstm_direction
from service.engine.onnx.ops.rnn_sequence import rnn_direction

pytestmark = pytest.mark.skipif(
    not _cpu_products._onednn_operators_work(), reason="this torch build has no oneDNN"
)

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    native.build()
    assert native.load_recurrent_cpu() is not None


def _run(op: str, library: str, monkeypatch: pytest.MonkeyPatch) -> tuple[list[Tensor], int]:
    """(outputs, every input's gradient, ∂L/∂h_t; packed weights made) for one library."""
    packed: list[Tensor] = []
    original = _cpu_products.packed_step_weight

    def spy(weight: Tensor, batch: int) -> Tensor | None:
        result = original(weight, batch)
        if result is not None:
            packed.append(result)
        return result

    gates, steps, batch, inputs, hidden = GATES[op], 5, 8, 16, 512
    g = torch.Generator().manual_seed(0)
    X = torch.randn(steps, batch, inputs, generator=g).requires_grad_(True)
    W = (torch.randn(gates * hidden, inputs, generator=g) * inputs**-0.5).requires_grad_(True)
    R = (torch.randn(gates * hidden, hidden, generator=g) * hidden**-0.5).requires_grad_(True)
    B = (torch.randn(2 * gates * hidden, generator=g) * 0.1).requires_grad_(True)
    h0 = torch.randn(batch, hidden, generator=g).requires_grad_(True)
    leaves = [X, W, R, B, h0]
    sink: list[Tensor] = []
    with monkeypatch.context() as m:
        m.setattr(_cpu_products, "onednn_preferred", lambda: library == "onednn")
        m.setattr(_cpu_products, "packed_step_weight", spy)
        outputs: list[Tensor]
        if op == "LSTM":
            c0 = torch.randn(batch, hidden, generator=g).requires_grad_(True)
            leaves.append(c0)
            outputs = list(lstm_direction(X, W, R, B, h0, c0, False, sink))
        else:
            direction = gru_direction if op == "GRU" else rnn_direction
            Y, h, _ = direction(X, W, R, B, h0, None, False, sink)
            outputs = [Y, h]
        weights = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=weights)).sum() for o in outputs)
        grads = torch.autograd.grad(loss, leaves)  # type: ignore[arg-type]
    return [*(o.detach() for o in outputs), *grads, *sink], len(packed)


@pytest.mark.parametrize("op", list(GATES))
def test_onednn_products_give_mkls_results(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    onednn, packed = _run(op, "onednn", monkeypatch)
    mkl, none_packed = _run(op, "mkl", monkeypatch)
    assert packed == 2 and none_packed == 0  # R for the forward steps, Rᵀ for the backward
    for a, b in zip(onednn, mkl, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_small_steps_and_empty_products_stay_off_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cpu_products, "onednn_preferred", lambda: True)
    small = torch.randn(512, 128)  # [8, 128]·[128, 512]: 0.5 M multiply-adds a step
    assert _cpu_products.packed_step_weight(small, 8) is None
    assert _cpu_products.packed_step_weight(torch.randn(2048, 512), 8) is not None
    assert _cpu_products.packed_step_weight(torch.randn(2048, 512).double(), 8) is None
    empty = _cpu_products.mm(torch.randn(6, 0), torch.randn(0, 4))  # a one-step sequence's dR
    assert torch.equal(empty, torch.zeros(6, 4))
    a, b = torch.randn(33, 17), torch.randn(17, 9)
    torch.testing.assert_close(_cpu_products.mm(a, b), a @ b)
    torch.testing.assert_close(_cpu_products.mm(a.t().contiguous().t(), b), a @ b)
    torch.testing.assert_close(_cpu_products.linear(a, b.t(), None), a @ b)


@pytest.fixture
def fresh_choice() -> Iterator[None]:
    _cpu_products.onednn_preferred.cache_clear()
    yield
    _cpu_products.onednn_preferred.cache_clear()


@pytest.mark.usefixtures("fresh_choice")
def test_the_environment_fixes_the_choice_and_otherwise_a_timing_decides(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("GRADHEALTH_CPU_PRODUCTS", "mkl")
    assert _cpu_products.onednn_preferred() is False
    _cpu_products.onednn_preferred.cache_clear()
    monkeypatch.setenv("GRADHEALTH_CPU_PRODUCTS", "onednn")
    assert _cpu_products.onednn_preferred() is True
    _cpu_products.onednn_preferred.cache_clear()
    monkeypatch.delenv("GRADHEALTH_CPU_PRODUCTS")
    with caplog.at_level(logging.INFO, logger=_cpu_products.__name__):
        chosen = _cpu_products.onednn_preferred()
    (record,) = caplog.records
    message = record.getMessage()
    assert message.startswith(f"CPU products: {'oneDNN' if chosen else 'MKL'} (oneDNN/MKL")
    assert message.count(" ms, oneDNN ") == 2 and "[32, 512]·[512, 2048]" in message  # both probes


@pytest.mark.usefixtures("fresh_choice")
@pytest.mark.parametrize(
    ("ratios", "chosen"),
    [
        ((0.85, 0.62), True),  # AVX-512 EPYC: the graph product alone is not a clear win
        ((0.45, 0.3), True),  # AVX2 EPYC
        ((1.34, 6.4), False),  # Xeon: MKL faster
        ((0.95, 0.9), False),  # close: torch's default
    ],
)
def test_onednn_is_chosen_on_the_two_probes_geometric_mean(
    monkeypatch: pytest.MonkeyPatch, ratios: tuple[float, float], chosen: bool
) -> None:
    monkeypatch.delenv("GRADHEALTH_CPU_PRODUCTS", raising=False)
    answers = iter(ratios)
    monkeypatch.setattr(_cpu_products, "_probe", lambda *args: (next(answers), "timings"))
    assert _cpu_products.onednn_preferred() is chosen


def _operands(rows: int = 64, inner: int = 256, cols: int = 384) -> list[Tensor]:
    """a [2, rows/2, inner], weight [cols, inner], bias [cols]: 6.3 M multiply-adds, above
    GRAPH_PRODUCT_MIN_MACS."""
    g = torch.Generator().manual_seed(4)
    return [
        torch.randn(2, rows // 2, inner, generator=g).requires_grad_(True),
        (torch.randn(cols, inner, generator=g) * inner**-0.5).requires_grad_(True),
        torch.randn(cols, generator=g).requires_grad_(True),
    ]


@pytest.mark.parametrize("with_bias", [True, False])
def test_weight_products_through_onednn_equal_torchs(
    monkeypatch: pytest.MonkeyPatch, with_bias: bool
) -> None:
    monkeypatch.setattr(_cpu_products, "onednn_preferred", lambda: True)
    a, weight, bias = _operands()
    used = _cpu_products.weight_product(a, weight, bias if with_bias else None)
    assert used is not None  # the oneDNN Function ran
    expected = torch.nn.functional.linear(a, weight, bias if with_bias else None)
    torch.testing.assert_close(used, expected, rtol=1e-5, atol=1e-5)
    g = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5))
    leaves = [a, weight, bias] if with_bias else [a, weight]
    got = torch.autograd.grad(used, leaves, g)
    want = torch.autograd.grad(expected, leaves, g)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_weight_products_leave_what_onednn_should_not_take(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cpu_products, "onednn_preferred", lambda: True)
    a, weight, bias = _operands()
    small_a, small_w = a[:, :2, :16], weight[:8, :16]  # 512 multiply-adds
    assert _cpu_products.weight_product(small_a, small_w) is None
    assert _cpu_products.weight_product(a.double(), weight.double()) is None
    assert _cpu_products.weight_product(a, weight, bias[:5]) is None  # not a [N] bias
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _cpu_products.weight_product(a, weight) is None  # torch's product casts
    monkeypatch.setattr(_cpu_products, "onednn_preferred", lambda: False)
    assert _cpu_products.weight_product(a, weight) is None


@pytest.mark.parametrize("dynamo", [False, True])
def test_converted_linear_layers_through_onednn_equal_the_torch_module(
    monkeypatch: pytest.MonkeyPatch, dynamo: bool
) -> None:
    """Through the converter: a Linear stack exported as Gemm / MatMul(+Add) by both exporters,
    its outputs and every parameter's gradient against the torch module's."""
    from service.engine.onnx.convert import convert, load_onnx
    from tests.support.export import to_onnx

    monkeypatch.setattr(_cpu_products, "onednn_preferred", lambda: True)
    calls: list[int] = []
    original = _cpu_products.weight_product

    def spy(*args: Tensor | None) -> Tensor | None:
        out = original(*args)  # type: ignore[arg-type]
        calls.append(out is not None)
        return out

    monkeypatch.setattr(_cpu_products, "weight_product", spy)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(128, 512), torch.nn.GELU(), torch.nn.Linear(512, 128)
    )
    x = torch.randn(4, 32, 128)
    graph = convert(load_onnx(to_onnx(model, x, dynamo=dynamo)), mode="train")
    out = graph.run([x])[0]
    out.square().mean().backward()
    model(x).square().mean().backward()
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    named = dict(graph.named_graph_parameters())
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None
        grad = named[name].grad
        assert grad is not None, name
        torch.testing.assert_close(grad, parameter.grad, rtol=1e-4, atol=1e-6)
    assert sum(calls) == 2  # both layers' products went through oneDNN

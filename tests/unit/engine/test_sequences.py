"""Sequence axes read off the recurrent ops (sequences.py): the time profile and the micro-batch
split follow a sequence-first layout even through ops before the LSTM, token inputs are
profiled on their embedding output, and batch-first is a noted fallback only."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from service.engine.measure import measure
from service.engine.options import DiagnoseOptions
from service.engine.subject import build_subject
from tests.support.export import to_onnx, to_torch_export, to_torchscript
from tests.unit.engine.measure_support import (
    CASES,
    Case,
    case_batch,
    export,
    npz_bytes,
    onnx_available,
)

FORMATS = ["torch_export", "torchscript"] + (["onnx"] if onnx_available() else [])


class ProjectedSeqFirstLSTM(nn.Module):
    """[T, B, F] input through a Linear (and a scale) before a sequence-first LSTM: the time
    axis is 0, and the LSTM does not read the graph input directly."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.rnn = nn.LSTM(4, 5)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.proj(x) * 0.5)
        return self.fc(out)  # [T, B, 2]


class TokenSeqFirstLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.rnn = nn.LSTM(4, 5)
        self.fc = nn.Linear(5, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(ids))
        return self.fc(out[-1])


def _case(module: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None) -> Case:
    case = CASES["rnn"]()
    case.module, case.inputs, case.target = module, [x], target
    case.loss = "output_norm" if target is None else "mse"
    return case


def _assert_norms_per_step_of_axis_0(
    norms: list[float], module: nn.Module, x: torch.Tensor
) -> None:
    """`norms` are ‖∂L/∂x[t]‖ for the output-norm loss, t along axis 0, as torch computes them."""
    leaf = x.clone().requires_grad_(True)
    module.zero_grad()
    module(leaf).square().mean().backward()
    assert leaf.grad is not None
    want = leaf.grad.double().square().sum(dim=(1, 2)).sqrt().tolist()
    for got, expected in zip(norms, want, strict=True):
        assert math.isclose(got, expected, rel_tol=2e-4, abs_tol=1e-9)


@pytest.mark.parametrize("fmt", FORMATS)
def test_time_axis_is_traced_through_ops_before_a_sequence_first_lstm(fmt: str) -> None:
    torch.manual_seed(0)
    module, x = ProjectedSeqFirstLSTM(), torch.randn(7, 4, 3)  # T=7, B=4
    case = _case(module, x)
    m = measure(build_subject(export(case, fmt), case_batch(case), DiagnoseOptions()))
    (profile,) = m.profiles.time
    assert profile.axis == 0 and len(profile.grad_norms) == 7
    assert profile.tensor is not None and "input" in profile.tensor
    _assert_norms_per_step_of_axis_0(profile.grad_norms, module, x)
    assert not any("batch-first assumed" in note for note in m.notes)


# (a legacy ONNX export bakes the batch size into the LSTM's initial-state Expand: it cannot be
# micro-batched along any axis)
@pytest.mark.parametrize("fmt", ["torch_export"])
def test_micro_batches_split_the_batch_axis_of_a_sequence_first_model(fmt: str) -> None:
    torch.manual_seed(1)
    module, x = ProjectedSeqFirstLSTM(), torch.randn(6, 4, 3)  # T=6, B=4
    target = torch.randn(6, 4, 2)  # [T, B, 2] like the output
    case = _case(module, x, target)
    data, batch = export(case, fmt), case_batch(case)
    full = measure(build_subject(data, batch, DiagnoseOptions(loss="mse")))
    options = DiagnoseOptions(loss="mse", micro_batches=2)
    split = measure(build_subject(data, batch, options), options)
    assert split.micro_batches == 2
    # splitting the time axis would run the LSTM on half sequences: different gradients
    assert split.loss.value == pytest.approx(full.loss.value, rel=1e-5)
    for a, b in zip(split.parameters, full.parameters, strict=True):
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4, abs=1e-9), a.name
    assert split.profiles.time[0].grad_norms == pytest.approx(
        full.profiles.time[0].grad_norms, rel=1e-4
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_token_input_is_profiled_on_its_embedding_output(fmt: str) -> None:
    torch.manual_seed(2)
    module, ids = TokenSeqFirstLSTM(), torch.randint(0, 11, (8, 3))  # T=8, B=3
    case = _case(module, ids)
    m = measure(build_subject(export(case, fmt), case_batch(case), DiagnoseOptions()))
    (profile,) = m.profiles.time
    assert profile.axis == 0 and len(profile.grad_norms) == 8
    assert profile.tensor is not None and "embedding output" in profile.tensor
    captured: dict[str, torch.Tensor] = {}

    def keep(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
        out.retain_grad()
        captured["e"] = out

    handle = module.emb.register_forward_hook(keep)
    module.zero_grad()
    module(ids).square().mean().backward()
    handle.remove()
    grad = captured["e"].grad
    assert grad is not None
    want = grad.double().square().sum(dim=(1, 2)).sqrt().tolist()
    for got, expected in zip(profile.grad_norms, want, strict=True):
        assert math.isclose(got, expected, rel_tol=2e-4, abs_tol=1e-9)


def test_batch_first_fallback_is_noted_when_no_recurrent_op_reads_the_input() -> None:
    torch.manual_seed(3)
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(2, 5, 3)
    case = _case(module, x)
    m = measure(build_subject(export(case, "torch_export"), case_batch(case), DiagnoseOptions()))
    (profile,) = m.profiles.time
    assert profile.axis == 1 and len(profile.grad_norms) == 5
    assert any("batch-first assumed" in note for note in m.notes)


class SeqFirstRNN(nn.Module):
    """A sequence-first vanilla RNN read at its last step ([T, B, F] input)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(3, 5)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x)[0][-1])


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_a_sequence_first_rnn_is_profiled_along_axis_0_from_both_exporters(dynamo: bool) -> None:
    """torch.onnx's dynamo exporter writes nn.RNN out step by step, which the converter folds
    back into an RNN node (onnx/unrolled_rnn.py): its X is followed back to the graph input as
    the legacy export's is, axis 0 here rather than the batch-first guess, and the batch (4)
    is axis 1 (the report's batch size too)."""
    torch.manual_seed(2)
    module, x = SeqFirstRNN(), torch.randn(7, 4, 3)  # T=7, B=4
    case = _case(module, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = to_onnx(module, x, dynamo=dynamo, input_names=["x"])
    subject = build_subject(data, case_batch(case), DiagnoseOptions())
    m = measure(subject)
    (profile,) = m.profiles.time
    assert profile.axis == 0 and len(profile.grad_norms) == 7
    assert not any("batch-first assumed" in note for note in m.notes)
    assert subject.batch_info.size == 4
    _assert_norms_per_step_of_axis_0(profile.grad_norms, module, x)


class CausalConv1d(nn.Module):
    """Raw audio [B, 1, T] through dilated 1-D convolutions (WaveNet-like): the steps are
    along axis 2; axis 1 is the channels (one here). `left_pad`: the causal padding written
    as F.pad before the convolution (the layout is traced through the Pad)."""

    def __init__(self, left_pad: bool = False) -> None:
        super().__init__()
        self.left_pad = left_pad
        self.conv = nn.Conv1d(1, 6, 3, padding=0 if left_pad else 2, dilation=2)
        self.mix = nn.Conv1d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(x, (4, 0)) if self.left_pad else x
        return self.mix(torch.tanh(self.conv(x * 0.5)))


@pytest.mark.parametrize("left_pad", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_conv1d_input_is_profiled_along_its_time_axis_2(fmt: str, left_pad: bool) -> None:
    torch.manual_seed(4)
    module, x = CausalConv1d(left_pad), torch.randn(3, 1, 9)  # B=3, C=1, T=9
    case = _case(module, x)
    m = measure(build_subject(export(case, fmt), case_batch(case), DiagnoseOptions()))
    (profile,) = m.profiles.time
    assert profile.axis == 2 and len(profile.grad_norms) == 9
    assert not any("batch-first assumed" in note for note in m.notes)
    leaf = x.clone().requires_grad_(True)
    module(leaf).square().mean().backward()
    assert leaf.grad is not None
    want = leaf.grad.double().square().sum(dim=(0, 1)).sqrt().tolist()
    for got, expected in zip(profile.grad_norms, want, strict=True):
        assert math.isclose(got, expected, rel_tol=2e-4, abs_tol=1e-9)


class StatefulLSTM(nn.Module):
    """A sequence-first bidirectional 2-layer LSTM given its initial states as inputs:
    h0/c0 are [layers × directions, batch, hidden], their batch on axis 1, no time axis."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 10, num_layers=2, bidirectional=True)
        self.fc = nn.Linear(20, 4)

    def forward(self, seq: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(seq, (h0, c0))[0][-1])


@pytest.mark.parametrize("fmt", ["torch_export", "onnx", "torchscript"])
def test_initial_states_given_as_inputs_are_split_on_their_batch_axis(fmt: str) -> None:
    """They were taken as batch-first sequences (a time profile along their batch axis) and
    left whole by --micro-batches: the LSTM ran each part of the sequence from the whole
    batch's states, silently (or failed)."""
    torch.manual_seed(0)
    module = StatefulLSTM()
    g = torch.Generator().manual_seed(1)
    seq, h0 = torch.randn(9, 6, 6, generator=g), torch.randn(4, 6, 10, generator=g)
    c0 = torch.randn(4, 6, 10, generator=g)
    target = torch.arange(6) % 4
    inputs = (seq, h0, c0)
    data = {
        "torch_export": lambda: to_torch_export(module, inputs),
        "onnx": lambda: to_onnx(module, inputs, input_names=["seq", "h0", "c0"]),
        "torchscript": lambda: to_torchscript(module, inputs),
    }[fmt]()
    batch = npz_bytes(seq=seq, h0=h0, c0=c0, target=target)
    nn.functional.cross_entropy(module(*inputs), target).backward()
    want = {n: p.grad.norm().item() for n, p in module.named_parameters() if p.grad is not None}
    for parts in (1, 3):
        options = DiagnoseOptions(micro_batches=parts)
        m = measure(build_subject(data, batch, options), options)
        assert [p.input for p in m.profiles.time] == ["seq"]
        for p in m.parameters:
            assert p.grad_norm == pytest.approx(want[p.name], rel=1e-4), (parts, p.name)

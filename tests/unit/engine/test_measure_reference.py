"""BackPACK-style: every statistic measure() reports equals a plain-autograd reference computed
on the original torch module, over models × formats × devices."""

from __future__ import annotations

import math
from typing import cast

import pytest
import torch

from service.engine.layers import reference_std
from service.engine.measure import measure
from service.engine.options import DiagnoseOptions
from service.engine.subject import build_subject
from tests.unit.engine.measure_support import (
    CASES,
    case_batch,
    export,
    fit_growth,
    onnx_available,
    reference,
)

FORMATS = ["torch_export", "torchscript"] + (["onnx"] if onnx_available() else [])
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]
REL = 2e-4


def close(a: float | None, b: float, rel: float = REL, abs_: float = 1e-7) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case_name", sorted(CASES))
def test_statistics_match_plain_autograd(case_name: str, fmt: str, device: str) -> None:
    case = CASES[case_name]()
    data = export(case, fmt)
    subject = build_subject(data, case_batch(case), DiagnoseOptions(device=device, loss=case.loss))
    assert subject.model_info.format == fmt
    assert subject.model_info.probe_coverage == "full", subject.model_info.probe_coverage_reason
    # The reference runs on the CPU in full fp32; cuDNN (the FX graph's conv and RNN ops on
    # CUDA) may use TF32 products by default, which alone moves a recurrent model's statistics
    # past REL. The engine's numbers are checked here, not that default.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        m = measure(subject, DiagnoseOptions(device=device, loss=case.loss))
    ref = reference(case)

    assert close(m.loss.value, ref["loss"])
    # parameters: names as in the source model, every field against the reference
    names = [p.name for p in m.parameters]
    if fmt == "onnx":
        # ONNX keeps BatchNorm running statistics as float initializers: they receive no
        # gradient; the weights must still be exactly the module's
        extra = [n for n in names if n not in ref["params"]]
        assert all(n.endswith(("running_mean", "running_var")) for n in extra), extra
        names = [n for n in names if n in ref["params"]]
    assert names == list(ref["params"])
    for p in m.parameters:
        if p.name not in ref["params"]:
            assert p.grad_norm is None  # no gradient reaches running statistics
            continue
        want = ref["params"][p.name]
        assert close(p.grad_norm, want["grad_norm"]), p.name
        assert close(p.weight_norm, want["weight_norm"]), p.name
        if want["weight_norm"] > 0:
            assert close(p.grad_to_weight, want["grad_norm"] / want["weight_norm"]), p.name
        else:  # e.g. a zero-initialised bias: no ratio
            assert p.grad_to_weight is None
        assert p.non_finite_count == want["non_finite_count"] and not p.non_finite
        assert close(p.fp16_underflow_fraction, want["underflow"], abs_=1e-9), p.name
        assert close(p.fp16_overflow_fraction, want["overflow"], abs_=1e-9), p.name

    # layers: grouping, names, activation gradients and activation statistics
    if case.check_layers:
        assert [layer.name for layer in m.layers] == [r.name for r in case.layers]
    for layer, layer_ref in zip(m.layers if case.check_layers else [], case.layers, strict=True):
        want = ref["layers"][layer.name]
        assert layer.activation_stats.activation == layer_ref.activation
        assert close(layer.activation_grad_norm, want["activation_grad_norm"]), layer.name
        assert close(layer.activation_stats.mean, want["mean"], abs_=1e-6), layer.name
        assert close(layer.activation_stats.std, want["std"], abs_=1e-6), layer.name
        if "saturated" in want:
            assert close(layer.activation_stats.saturated_fraction, want["saturated"])
        else:
            assert layer.activation_stats.saturated_fraction is None
        if "dead" in want:
            assert close(layer.activation_stats.dead_fraction, want["dead"])
        else:
            assert layer.activation_stats.dead_fraction is None
        grads = [ref["params"][n]["grad_norm"] for n in layer.params if n in ref["params"]]
        assert close(layer.grad_norm, math.sqrt(sum(g * g for g in grads))), layer.name

    if case.check_layers:
        norms = [ref["layers"][r.name]["activation_grad_norm"] for r in case.layers]
        depth = m.profiles.depth
        assert depth.layers == [r.name for r in case.layers]
        assert close(depth.growth_factor, fit_growth(norms), rel=1e-3)
        assert close(depth.first_last_ratio, norms[0] / norms[-1], rel=1e-3)
    if case.sequence:
        (profile,) = m.profiles.time
        assert profile.axis == 1
        assert len(profile.grad_norms) == len(ref["time"])
        for got, want_t in zip(profile.grad_norms, ref["time"], strict=True):
            assert close(got, want_t, abs_=1e-9)
        assert close(profile.growth_factor, fit_growth(ref["time"]), rel=1e-3)
    assert m.non_finite_origin is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_init_std_ratio_against_he_and_xavier(fmt: str) -> None:
    case = CASES["mlp"]()  # its last layer is 8 → 3: fan-in and fan-out must not be swapped
    subject = build_subject(export(case, fmt), case_batch(case), DiagnoseOptions())
    m = measure(subject)
    modules = dict(case.module.named_modules())
    for layer in m.layers:
        weight = modules[layer.name].weight.detach().double()
        fan_out, fan_in = weight.shape
        assert layer.fan_in == fan_in
        activation = layer.activation_stats.activation
        ref_std = (
            math.sqrt(2 / fan_in) if activation == "relu" else math.sqrt(2 / (fan_in + fan_out))
        )
        rms = weight.square().mean().sqrt().item()
        assert close(layer.init_std_ratio, rms / ref_std)


def test_conv_before_batchnorm_relu_uses_he() -> None:
    from service.engine.layers import group_layers

    case = CASES["cnn"]()
    subject = build_subject(export(case, "torch_export"), case_batch(case), DiagnoseOptions())
    assert subject.graph is not None
    conv = group_layers(subject.graph)[0]
    assert conv.name == "conv" and conv.fan_in == 2 * 3 * 3
    assert reference_std(conv) == pytest.approx(math.sqrt(2 / 18))


def test_micro_batches_accumulate_to_the_full_batch() -> None:
    case = CASES["mlp"]()  # no BatchNorm: splitting the batch changes nothing mathematically
    data, batch = export(case, "torch_export"), case_batch(case)
    full = measure(build_subject(data, batch, DiagnoseOptions()))
    split_options = DiagnoseOptions(micro_batches=3)
    split = measure(build_subject(data, batch, split_options), split_options)
    assert split.micro_batches == 3
    assert close(split.loss.value, full.loss.value or 0.0)
    for a, b in zip(split.parameters, full.parameters, strict=True):
        assert close(a.grad_norm, b.grad_norm or 0.0)
    for la, lb in zip(split.layers, full.layers, strict=True):
        assert close(la.activation_grad_norm, lb.activation_grad_norm or 0.0)
        assert close(la.activation_stats.mean, lb.activation_stats.mean or 0.0, abs_=1e-6)
        assert close(la.activation_stats.std, lb.activation_stats.std or 0.0, abs_=1e-6)
        if lb.activation_stats.dead_fraction is not None:
            assert la.activation_stats.dead_fraction == lb.activation_stats.dead_fraction


def test_micro_batches_clipped_or_uneven_are_noted() -> None:
    case = CASES["mlp"]()
    data, batch = export(case, "torch_export"), case_batch(case)
    size = case.inputs[0].shape[0]
    assert size % 5  # 5 parts are uneven for this batch
    assert not [n for n in measure(build_subject(data, batch)).notes if "micro-batch" in n]
    many = DiagnoseOptions(micro_batches=size * 2)
    m = measure(build_subject(data, batch, many), many)
    assert m.micro_batches == size
    assert any(f"--micro-batches {size * 2} is more than the batch's {size}" in n for n in m.notes)
    uneven = DiagnoseOptions(micro_batches=5)
    m = measure(build_subject(data, batch, uneven), uneven)
    assert m.micro_batches == 5
    (note,) = [n for n in m.notes if "do not split evenly" in n]
    assert note.startswith(f"{size} examples do not split evenly into 5 micro-batches")


def test_bf16_autocast_matches_autocast_reference() -> None:
    case = CASES["mlp"]()
    options = DiagnoseOptions(precision="bf16")
    m = measure(build_subject(export(case, "torch_export"), case_batch(case), options), options)
    module = case.module.train()
    module.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(case.inputs[0])
    assert case.target is not None
    torch.nn.functional.cross_entropy(out.float(), case.target).backward()
    for p in m.parameters:
        want = dict(module.named_parameters())[p.name].grad.norm().item()  # type: ignore[union-attr]
        assert close(p.grad_norm, want, rel=1e-3)


def test_torchscript_that_cannot_be_converted_keeps_parameter_gradients() -> None:
    import io

    case = CASES["rnn"]()
    scripted = torch.jit.script(case.module)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    subject = build_subject(buffer.getvalue(), case_batch(case), DiagnoseOptions())
    assert subject.model_info.format == "torchscript"
    assert subject.model_info.probe_coverage == "parameters_only"
    assert subject.model_info.probe_coverage_reason
    m = measure(subject)
    ref = reference(case)
    assert [p.name for p in m.parameters] == list(ref["params"])
    for p in m.parameters:
        assert close(p.grad_norm, ref["params"][p.name]["grad_norm"]), p.name
    assert {layer.name for layer in m.layers} == {"rnn", "fc"}
    assert all(layer.activation_grad_norm is None for layer in m.layers)
    assert m.profiles.time and close(m.profiles.time[0].grad_norms[0], ref["time"][0], abs_=1e-9)


@pytest.mark.parametrize("fmt", ["torch_export", "torchscript"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_are_measured_in_float32(fmt: str, dtype: torch.dtype) -> None:
    case = CASES["mlp"]()
    case.module = case.module.to(dtype)
    float_batch = case_batch(case)  # float32 arrays: cast to the model's dtype on loading
    case.inputs = [x.to(dtype) for x in case.inputs]
    m = measure(build_subject(export(case, fmt), float_batch, DiagnoseOptions()))
    module = case.module.train()
    module.zero_grad(set_to_none=True)
    out = module(case.inputs[0])
    assert case.target is not None
    torch.nn.functional.cross_entropy(out.float(), case.target).backward()
    assert close(m.loss.value, torch.nn.functional.cross_entropy(out.float(), case.target).item())
    for p in m.parameters:
        grad = dict(module.named_parameters())[p.name].grad
        assert grad is not None
        assert close(p.grad_norm, grad.float().norm().item(), rel=1e-3), p.name


class _SeqFirstRNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.RNN(3, 5)  # batch_first=False: input [time, batch, features]
        self.fc = torch.nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.fc(out[-1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_time_profile_follows_a_sequence_first_layout(fmt: str) -> None:
    torch.manual_seed(0)
    case = CASES["rnn"]()
    case.module, case.inputs = _SeqFirstRNN(), [torch.randn(9, 4, 3)]
    m = measure(build_subject(export(case, fmt), case_batch(case), DiagnoseOptions()))
    (profile,) = m.profiles.time
    assert profile.axis == 0 and len(profile.grad_norms) == 9
    ref = reference(case)  # sums over axes (0, 2): recompute over (1, 2) for this layout
    x = case.inputs[0].clone().requires_grad_(True)
    case.module.zero_grad()
    case.module(x).square().mean().backward()
    assert x.grad is not None
    want = x.grad.double().square().sum(dim=(1, 2)).sqrt().tolist()
    assert ref["loss"] == pytest.approx(m.loss.value, rel=1e-5)
    for got, expected in zip(profile.grad_norms, want, strict=True):
        assert close(got, expected, abs_=1e-9)


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_activation_std_is_exact_when_the_mean_dwarfs_it(micro_batches: int) -> None:
    """A Linear whose bias (1e4) dwarfs its output's spread (~0.3): the reported std must
    still match float64, also when combined over micro-batches."""
    torch.manual_seed(4)
    module = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    with torch.no_grad():
        cast(torch.nn.Linear, module[0]).bias.fill_(1e4)
        cast(torch.nn.Linear, module[0]).weight.mul_(0.3)
    x, y = torch.randn(12, 4), torch.randn(12, 2)
    case = CASES["mlp"]()
    case.module, case.inputs, case.target, case.loss = module, [x], y, "mse"
    options = DiagnoseOptions(loss="mse", micro_batches=micro_batches)
    m = measure(build_subject(export(case, "torch_export"), case_batch(case), options), options)
    first = next(layer for layer in m.layers if layer.name == "0")
    out = module[0](x).detach().double()
    assert close(first.activation_stats.mean, out.mean().item(), rel=1e-7)
    assert close(first.activation_stats.std, out.std(correction=0).item(), rel=1e-3)

"""Subject building: device choice, mode, loss defaults, model/batch info."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from service.engine.measure import measure
from service.engine.options import DiagnoseOptions
from service.engine.subject import build_subject, pick_device
from service.errors import BadInputError
from tests.support.export import to_torch_export, to_torchscript
from tests.unit.engine.measure_support import npz_bytes


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto") == torch.device(expected)
    with pytest.raises(BadInputError, match="device must be"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BadInputError, match="no CUDA device"):
            pick_device("cuda:1")


class DropNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.bn(self.fc(x)))


@pytest.mark.parametrize("fmt", ["torch_export", "torchscript"])
def test_train_mode_uses_batch_statistics_and_no_dropout_even_for_eval_exports(fmt: str) -> None:
    torch.manual_seed(0)
    module = DropNorm()
    with torch.no_grad():
        assert module.bn.running_mean is not None
        module.bn.running_mean.fill_(5.0)  # eval-mode output would be far off
    x = torch.randn(8, 4)
    exported = module.eval()
    data = (to_torch_export if fmt == "torch_export" else to_torchscript)(exported, x)
    train = build_subject(data, npz_bytes(x=x), DiagnoseOptions(mode="train"))
    evaluated = build_subject(data, npz_bytes(x=x), DiagnoseOptions(mode="eval"))
    with torch.no_grad():
        h = module.fc(x)
        running_stats = module.bn.eval()(h)
        bn = module.bn
        batch_stats = torch.nn.functional.batch_norm(  # no running-stat update; dropout off
            h, None, None, bn.weight, bn.bias, training=True, eps=bn.eps
        )
        got_train = train.module(x)
        got_eval = evaluated.module(x)
    assert torch.allclose(got_train, batch_stats, atol=1e-5)
    assert torch.allclose(got_eval, running_stats, atol=1e-5)
    assert module.bn.running_mean is not None
    assert float(module.bn.running_mean[0]) == 5.0  # diagnosing never mutates the model


def test_model_and_batch_info() -> None:
    module, x = nn.Sequential(nn.Linear(4, 3)), torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 0, 1])
    subject = build_subject(to_torch_export(module, x), npz_bytes(x=x, labels=y), DiagnoseOptions())
    info = subject.model_info
    assert info.format == "torch_export" and info.parameter_count == 15
    assert info.inputs[0].shape == [5, 4] and info.inputs[0].dtype == "float32"
    assert info.probe_coverage == "full" and len(info.sha256) == 64
    assert subject.loss_kind == "auto"  # chosen from the output the model computes
    assert subject.batch_info.size == 5
    assert [a.role for a in subject.batch_info.arrays] == ["input", "target"]
    assert measure(subject).loss.kind == "cross_entropy"


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, image: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.fc(image) * scale


@pytest.mark.parametrize("fmt", ["torch_export", "torchscript"])
def test_arrays_feed_inputs_by_name_end_to_end(fmt: str) -> None:
    torch.manual_seed(0)
    module, image, scale = TwoInputs(), torch.randn(6, 4), torch.rand(6, 2) + 1
    data = (to_torch_export if fmt == "torch_export" else to_torchscript)(module, (image, scale))
    subject = build_subject(data, npz_bytes(scale=scale, image=image), DiagnoseOptions())
    assert [s.name for s in subject.model_info.inputs] == ["image", "scale"]
    assert torch.equal(subject.inputs[0], image) and torch.equal(subject.inputs[1], scale)
    with torch.no_grad():
        assert torch.allclose(subject.module(*subject.inputs), module(image, scale))


class InnerDropout(nn.Module):
    """Dropout inside ops: MultiheadAttention's (scaled_dot_product_attention's dropout_p in
    training) and a stacked LSTM's between its layers."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.5, batch_first=True)
        self.lstm = nn.LSTM(8, 8, num_layers=2, dropout=0.5, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(self.attn(x))[0]


@pytest.mark.parametrize("dropout", [False, True])
def test_train_mode_switches_off_dropout_inside_ops_unless_asked(dropout: bool) -> None:
    torch.manual_seed(0)
    module = InnerDropout().train()  # exported in training: dropout_p = 0.5 in the graph
    x = torch.randn(3, 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.LSTM's flat weights warn during torch.export
        data = to_torch_export(module, x)
    subject = build_subject(data, npz_bytes(x=x), DiagnoseOptions(dropout=dropout))
    with torch.no_grad():
        runs = [subject.module(x) for _ in range(2)]
        expected = module.eval()(x)
    assert torch.equal(runs[0], runs[1]) != dropout  # random only when dropout is asked for
    if not dropout:
        assert torch.allclose(runs[0], expected, atol=1e-5)

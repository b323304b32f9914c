"""Sample uploads for the API tests: tiny real model files in every format and real batches,
built once per session (the API never loads them; the formats must still be genuine)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pytest


@dataclass(frozen=True)
class Samples:
    onnx: bytes
    torchscript: bytes
    torch_export: bytes
    state_dict_pt: bytes  # torch.save of a state dict: refused as a model
    npz: bytes
    safetensors: bytes
    pt_batch: bytes


@pytest.fixture(scope="session")
def samples() -> Samples:
    import torch
    from safetensors.numpy import save as save_safetensors
    from torch import nn

    from tests.support.export import to_onnx, to_torch_export, to_torchscript

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    example = torch.randn(2, 4)
    state = io.BytesIO()
    torch.save(module.state_dict(), state)
    npz = io.BytesIO()
    np.savez(npz, x=np.zeros((2, 4), np.float32), target=np.array([0, 1]))
    pt_batch = io.BytesIO()
    torch.save({"x": torch.zeros(2, 4), "target": torch.tensor([0, 1])}, pt_batch)
    return Samples(
        onnx=to_onnx(module, example),
        torchscript=to_torchscript(module, example),
        torch_export=to_torch_export(module, example),
        state_dict_pt=state.getvalue(),
        npz=npz.getvalue(),
        safetensors=save_safetensors(
            {"x": np.zeros((2, 4), np.float32), "labels": np.array([0, 1], np.int64)}
        ),
        pt_batch=pt_batch.getvalue(),
    )

"""Turn a torch module into the bytes of each supported model format (no downloads).

Used by every test that needs a model file: the converter's zoo, the engine's pathology zoo,
the API and end-to-end tests.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def _as_tuple(example: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (example,) if isinstance(example, torch.Tensor) else tuple(example)


def to_torchscript(module: nn.Module, example: torch.Tensor | Sequence[torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(module, _as_tuple(example))
        torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def to_torch_export(
    module: nn.Module,
    example: torch.Tensor | Sequence[torch.Tensor],
    dynamic_shapes: Any = None,
) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # nn.RNN/nn.LSTM/nn.GRU reassign their `_flat_weights` list while being traced; the
        # weights are parameters all the same and the exported program keeps them as such.
        warnings.filterwarnings(
            "ignore",
            message=r"The tensor attributes self\.(\w+\.)*_flat_weights\[",
            category=UserWarning,
        )
        program = torch.export.export(module, _as_tuple(example), dynamic_shapes=dynamic_shapes)
    torch.export.save(program, buffer)
    return buffer.getvalue()


def to_onnx(
    module: nn.Module,
    example: torch.Tensor | Sequence[torch.Tensor],
    *,
    dynamo: bool = False,
    opset: int | None = None,
    training: bool = True,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    optimize: bool | None = None,
    dynamic_shapes: dict[str, Any] | None = None,
) -> bytes:
    """`dynamo=False` exports in TRAINING mode without constant folding, so that parameters
    stay initializers named as in the module (the converter's gradient tests rely on it).

    `optimize` (dynamo only; None = False): the dynamo exporter's ONNX optimizer folds
    BatchNormalization into the convolution weights even for a module in train mode, and merges
    equal initializers, so by default it is off and exports keep BN and the module's parameter
    names. Pass True to get what a user running `torch.onnx.export(..., dynamo=True)` gets.
    `dynamic_shapes` (dynamo only): as torch.export takes them."""
    if (optimize is not None or dynamic_shapes is not None) and not dynamo:
        raise ValueError("optimize and dynamic_shapes apply to dynamo exports only")
    args = _as_tuple(example)
    buffer = io.BytesIO()
    kwargs: dict[str, object] = {}
    if opset is not None:
        kwargs["opset_version"] = opset
    if input_names is not None:
        kwargs["input_names"] = input_names
    if output_names is not None:
        kwargs["output_names"] = output_names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                verbose=False,
                optimize=bool(optimize),
                dynamic_shapes=dynamic_shapes,
                **kwargs,  # type: ignore[arg-type]
            )
            assert program is not None
            program.save(buffer)  # type: ignore[arg-type]
        else:
            torch.onnx.export(
                module,
                args,
                buffer,  # type: ignore[arg-type]
                dynamo=False,
                training=torch.onnx.TrainingMode.TRAINING
                if training
                else torch.onnx.TrainingMode.EVAL,
                do_constant_folding=False,
                **kwargs,  # type: ignore[arg-type]
            )
    return buffer.getvalue()


def to_format(fmt: str, module: nn.Module, x: torch.Tensor, input_name: str = "x") -> bytes:
    """One export by name: `torch_export`, `onnx_legacy` (TRAINING mode, as `to_onnx`), or
    `onnx_dynamo` (its optimizer on, as `torch.onnx.export(..., dynamo=True)` gives users)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "torch_export":
            return to_torch_export(module, x)
        if fmt == "onnx_legacy":
            return to_onnx(module, x, input_names=[input_name])
        if fmt == "onnx_dynamo":
            return to_onnx(module, x, input_names=[input_name], dynamo=True, optimize=True)
    raise ValueError(f"unknown format {fmt!r}")

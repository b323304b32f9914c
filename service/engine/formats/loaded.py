"""What every format loader returns: a runnable module plus what is known about its interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from service.engine.graph import ObservableGraph
from service.engine.report import ConversionCheck, ModelFormat, TensorSpec


@dataclass
class LoadedModel:
    """A model made runnable.

    `module(*inputs)` runs it; `graph` is the same model as an ObservableGraph when activation
    probes are possible (then `module is graph`), else None and `coverage_reason` says why.
    `inputs`/`outputs` are the declared interface (shapes may hold symbolic names or None).
    """

    format: ModelFormat
    module: nn.Module
    graph: ObservableGraph | None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec] = field(default_factory=list)
    coverage_reason: str | None = None
    conversion: ConversionCheck | None = None
    opset: int | None = None
    # Finishes the model once the batch is known (TorchScript → FX needs example inputs;
    # ONNX conformance needs the batch). Called by the Subject builder with the input tensors.
    finish: Any = None
    # For formats that declare no outputs (TorchScript): the outputs' specs on a batch's inputs,
    # asked again for every batch (a cached model meets batches of other sizes)
    describe_outputs: Any = None
    notes: list[str] = field(default_factory=list)
    source: Any = None  # the loaded source object (ExportedProgram, ScriptModule, ModelProto)
    # other names a batch array may have to feed an input (a .pt2 dict input `d_x`: `x`, `d.x`)
    input_aliases: dict[str, list[str]] = field(default_factory=dict)
    # inputs the model runs without (a TorchScript argument with a default): a batch may leave
    # them out, trailing ones only, since `module(*inputs)` passes inputs by position
    optional_inputs: frozenset[str] = frozenset()


def frozen_parameters_note(module: nn.Module) -> list[str]:
    """A note naming the parameters the model holds frozen (requires_grad=False, kept by
    torch.export and TorchScript files): a fine-tuned model's backbone. They are measured like
    the others, so the report shows the gradient they would get if trained, and the gradient
    flowing through them to what is trained."""
    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    if not frozen:
        return []
    from service.engine.batches import shown_names

    return [
        f"{len(frozen)} parameter(s) are frozen in the model (requires_grad=False: "
        f"{shown_names(frozen, 3)}): "
        "measured like the others, so their gradients are what they would get if trained; "
        "an optimizer built from the trainable parameters leaves them unchanged"
    ]


def frozen_parameter_names(source: Any) -> frozenset[str]:
    """The names of the parameters the loaded source model (`LoadedModel.source`: a
    ScriptModule or an ExportedProgram, both of which keep requires_grad) holds frozen; none for
    ONNX, whose initializers carry no such flag. The observable graph made from the source
    makes every parameter trainable (so all are measured): this is what says which are not,
    for the detectors to leave out what no optimizer updates (layers.untrained_layers)."""
    named = getattr(source, "named_parameters", None)
    if not callable(named):
        return frozenset()
    return frozenset(name for name, p in named() if not p.requires_grad)

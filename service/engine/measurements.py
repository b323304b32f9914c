"""What one instrumented pass measures, handed from the probes to the detectors and advice.

`Subject` is the thing measured (a model made runnable plus its batch and loss); `measure()`
(service/engine/measure.py) turns a Subject into `Measurements`; the detectors turn
Measurements into findings; fix verification transforms a copy of the Subject, measures it
again and compares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from service.engine.graph import ObservableGraph
from service.engine.report import (
    BatchInfo,
    LayerReport,
    LossInfo,
    ModelInfo,
    ParameterReport,
    Profiles,
    QuantizerReport,
)
from service.engine.sequences import ExampleSpan


@dataclass
class NonFiniteOrigin:
    node: str
    op_type: str
    phase: str  # "forward" | "backward"
    value: str | None = None  # the value (tensor) name
    layer: str | None = None  # the layer it belongs to, if any
    # what its inputs and outputs held (origin.OriginRecorder): counts of negative / zero /
    # NaN / ±inf entries, what fed each input; empty when not traced (no node-level view)
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class Subject:
    """A model ready to run: `module(*inputs)` gives the outputs the loss is taken of.

    `graph` is set when the model could be made observable (full probe coverage); otherwise
    only parameter gradients are measured (`model.probe_coverage == "parameters_only"`).
    """

    module: nn.Module
    graph: ObservableGraph | None
    inputs: list[torch.Tensor]
    target: torch.Tensor | None
    loss_kind: str
    model_info: ModelInfo
    batch_info: BatchInfo
    device: torch.device
    loss_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Measurements:
    layers: list[LayerReport]
    parameters: list[ParameterReport]
    profiles: Profiles
    loss: LossInfo
    non_finite_origin: NonFiniteOrigin | None = None
    op_types: list[str] = field(default_factory=list)  # every node's op type, execution order
    recurrent_layers: list[str] = field(default_factory=list)  # layers that are RNN/GRU/LSTM
    timing: dict[str, float] = field(default_factory=dict)  # forward, backward, ... seconds
    micro_batches: int = 1
    notes: list[str] = field(default_factory=list)
    # the precision the pass ran in (options.precision); the fp16_underflow detector is an
    # error only when it is "fp16"
    precision: str = "fp32"
    # fp16 runs only: parameter name → gradient norm of the fp32 reference pass (the fp16 pass's
    # own norms miss what fp16 flushed to zero; the loss-scale suggestion needs the real scale)
    fp32_grad_norms: dict[str, float] = field(default_factory=dict)
    # layers whose output only a normalisation reads (layers.normalized_layers); None when not
    # known (no graph), then the layer just after one in depth order is taken as reading it
    normalized: set[str] | None = None
    # fake quantisers of a QAT model and the share of their input they clamp (quantizers.py)
    quantizers: list[QuantizerReport] = field(default_factory=list)
    # layers with exactly zero ‖∂L/∂a‖ → the rounding downstream that cuts it, {node, op}
    # (gradient_cuts.py)
    gradient_cuts: dict[str, dict[str, str]] = field(default_factory=dict)
    # parameters the source model holds frozen (requires_grad=False; measured as if trained),
    # and the layers made only of them with nothing trainable upstream, whose gradient reaches
    # no parameter an optimizer updates (layers.untrained_layers): measured and reported, left
    # out of the findings and advice (detectors/frozen.py)
    frozen_parameters: frozenset[str] = frozenset()
    untrained_layers: list[str] = field(default_factory=list)
    # entries of each layer's output per example (the probes' count over the batch / the batch
    # size; layers not observed are absent): how many positions share the layer's weights
    # (detectors/positions.py), so that a change of tensor size is not read as a change of
    # gradient
    layer_output_sizes: dict[str, int] = field(default_factory=dict)
    # regression losses (mse, l1) only: the scale of the target beside the output's, from the
    # first (micro-)batch: target_mean, target_std, output_mean, output_std (losses.py,
    # `regression_scale`); None for other losses
    target_scale: dict[str, float] | None = None
    # per entry of `profiles.time`: each example's span of steps with gradient and the gradient
    # at its two ends (sequences.ExampleSpan; empty where not measured): a padded batch's time
    # check is read per example (detectors/gradients.py, `time_findings`)
    time_examples: list[list[ExampleSpan]] = field(default_factory=list)


def output_sizes_per_example(
    names: list[str], counts: list[int], seen: list[bool], batch_size: int
) -> dict[str, int]:
    """Layer name → entries of its output per example, from the probes' counts over the whole
    batch (summed over micro-batches); layers whose gradient hook never fired, or whose count
    is no multiple of the batch size (an output without the batch axis), are left out."""
    if batch_size < 1:
        return {}
    return {
        name: count // batch_size
        for name, count, was_seen in zip(names, counts, seen, strict=False)
        if was_seen and count > 0 and count % batch_size == 0
    }

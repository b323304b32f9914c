"""What a fine-tuning run trains: the part of the measurements the findings judge.

A model exported with part of it frozen (requires_grad=False: a pretrained backbone under a
trainable head) is measured whole, the frozen parameters as if trained (formats/loaded.py
`frozen_parameters_note`): the report keeps their numbers. But a layer made only of frozen
parameters with nothing trainable upstream of it (`Measurements.untrained_layers`) gets a
gradient that reaches no parameter an optimizer updates: a deep sigmoid backbone's vanishing
gradient there is no problem of the run, and swapping its activations or re-initialising it
would throw the pretrained weights away. So the detectors and the advice read `trained_part(m)`:
those layers left out of the layers and the depth profile, and the frozen parameters left out of
the per-parameter counts (an fp16 underflow share is one of the gradients that are applied). A
frozen layer between trainable ones stays: the gradient to the layers before it crosses it.
"""

from __future__ import annotations

import dataclasses

from service.engine.measurements import Measurements
from service.engine.report import DepthProfile, Profiles


def trained_part(m: Measurements) -> Measurements:
    """`m` without its untrained layers and frozen parameters; `m` itself when it has none
    (every parameter frozen counts as none: the model is then measured as if trained)."""
    left_out = set(m.untrained_layers)
    frozen = m.frozen_parameters
    trained = [p for p in m.parameters if p.name not in frozen]
    if not left_out and (not trained or len(trained) == len(m.parameters)):
        return m
    depth = m.profiles.depth
    kept = [
        (name, norm)
        for name, norm in zip(depth.layers, depth.grad_norms, strict=True)
        if name not in left_out
    ]
    recurrent = [x for x in m.recurrent_layers if x not in left_out]
    # the per-step profile is the gradient w.r.t. the input: of nothing trained when every
    # recurrent layer it crosses is left out
    time = m.profiles.time if recurrent or not m.recurrent_layers else []
    return dataclasses.replace(
        m,
        layers=[x for x in m.layers if x.name not in left_out],
        parameters=trained,
        profiles=Profiles(
            depth=DepthProfile(
                layers=[n for n, _ in kept],
                grad_norms=[v for _, v in kept],
                growth_factor=depth.growth_factor,
                first_last_ratio=depth.first_last_ratio,
                layers_left_out=depth.layers_left_out,
                left_out=depth.left_out,
            ),
            time=time,
        ),
        recurrent_layers=recurrent,
        gradient_cuts={k: v for k, v in m.gradient_cuts.items() if k not in left_out},
    )


def untrained_layers_note(names: list[str]) -> list[str]:
    """The report's note on the layers `trained_part` leaves out."""
    if not names:
        return []
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return [
        f"{len(names)} layer(s) have only requires_grad=False parameters and nothing trainable "
        f"upstream of them ({shown}): their gradient reaches no parameter an optimizer updates, "
        "so they are reported but left out of the findings, the verdict and the recommendations"
    ]


def with_trainable_weights(m: Measurements) -> Measurements:
    """`m` keeping only the layers with a trainable parameter: the ones whose initialisation
    scale is worth judging (a frozen layer keeps its pretrained weights whatever they are)."""
    frozen = m.frozen_parameters
    if not frozen or all(p.name in frozen for p in m.parameters):
        return m
    return dataclasses.replace(
        m, layers=[x for x in m.layers if any(p not in frozen for p in x.params)]
    )

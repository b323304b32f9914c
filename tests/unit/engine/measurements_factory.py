"""Hand-built `Measurements` for the detector/advice unit tests (pure data, no torch pass).

The numbers follow what the real pathologies produce (see tests/support/pathologies.py); the
end-to-end behaviour on real models is tested in test_pathologies*.py.
"""

from __future__ import annotations

import math

from service.engine.measurements import Measurements, NonFiniteOrigin
from service.engine.report import (
    ActivationStats,
    DepthProfile,
    LayerReport,
    LossInfo,
    ParameterReport,
    Profiles,
    TimeProfile,
)


def mlp(
    act_grad_norms: list[float],
    *,
    weight_grad_norms: list[float] | None = None,
    weight_norms: list[float] | None = None,
    activation: str = "aten.relu.default",
    op: str = "aten.linear.default",
    saturated: list[float | None] | None = None,
    dead: list[float | None] | None = None,
    init_ratios: list[float | None] | None = None,
    fp16_underflow: float = 0.0,
    width: int = 16,
) -> Measurements:
    """A Linear+activation stack of len(act_grad_norms) layers named fc0, fc1, ..."""
    n = len(act_grad_norms)
    wg = weight_grad_norms or [1e-2] * n
    wn = weight_norms or [4.0] * n
    layers: list[LayerReport] = []
    params: list[ParameterReport] = []
    for i in range(n):
        name = f"fc{i}"
        stats = ActivationStats(
            mean=0.1,
            std=1.0,
            saturated_fraction=(saturated or [None] * n)[i],
            dead_fraction=(dead or [None] * n)[i],
            activation=activation,
        )
        layers.append(
            LayerReport(
                name=name,
                op=op,
                depth=i,
                activation_grad_norm=act_grad_norms[i],
                activation_stats=stats,
                params=[f"{name}.weight"],
                grad_norm=wg[i],
                weight_norm=wn[i],
                grad_to_weight=wg[i] / wn[i],
                fan_in=width,
                init_std_ratio=(init_ratios or [1.0] * n)[i],
            )
        )
        params.append(
            ParameterReport(
                name=f"{name}.weight",
                shape=[width, width],
                layer=name,
                grad_norm=wg[i],
                weight_norm=wn[i],
                grad_to_weight=wg[i] / wn[i],
                fp16_underflow_fraction=fp16_underflow,
            )
        )
    profile = DepthProfile(layers=[x.name for x in layers], grad_norms=list(act_grad_norms))
    return Measurements(
        layers=layers,
        parameters=params,
        profiles=Profiles(depth=profile),
        loss=LossInfo(kind="mse", value=1.0),
        op_types=[op, activation] * n,
    )


def geometric(first: float, factor: float, n: int) -> list[float]:
    """n norms input → output where the norm is multiplied by `factor` per layer forwards."""
    return [first * factor**i for i in range(n)]


def with_time(m: Measurements, norms: list[float], *, rnn_op: str = "aten.rnn_tanh.input") -> None:
    m.profiles.time.append(TimeProfile(input="x", axis=1, grad_norms=norms))
    m.layers.insert(
        0,
        LayerReport(
            name="rnn",
            op=rnn_op,
            depth=-1,
            params=["rnn.weight_hh_l0"],
            grad_norm=1e-2,
            weight_norm=2.0,
            grad_to_weight=5e-3,
        ),
    )
    m.recurrent_layers.append("rnn")
    m.op_types.insert(0, rnn_op)


def with_non_finite(m: Measurements, node: str = "log", op: str = "aten.log.default") -> None:
    m.non_finite_origin = NonFiniteOrigin(
        node=node, op_type=op, phase="forward", value=node, layer="fc1"
    )
    m.loss = LossInfo(kind="mse", value=math.nan)
    m.op_types.append(op)

"""The NaN/Inf origin in words: what the op produced, from which input values, what fed them,
and the guard that fits (the `non_finite` finding's message and the `guard_numerics` advice).

Reads the counts `origin.OriginRecorder` took of the origin node's inputs and outputs (in
`evidence["origin"]["values"]`). The common culprits get their domain spelled out: Log of ≤ 0,
Sqrt of < 0 (and its backward at 0), Div by 0, Pow of a negative base, Exp overflow,
softmax/logsumexp of ±inf; any other op gets the non-finite / negative / zero counts of its
inputs and their range.
"""

from __future__ import annotations

from typing import Any

from service.engine.detectors.optypes import canonical_op
from service.engine.detectors.profile import sig

LOGS = frozenset({"log", "log2", "log10"})
SQRTS = frozenset({"sqrt", "rsqrt"})
DIVS = frozenset({"div", "divide", "truediv", "reciprocal"})
POWS = frozenset({"pow", "power"})
EXPS = frozenset({"exp", "exp2", "expm1"})
SOFTMAXES = frozenset(
    {"softmax", "logsoftmax", "logsumexp", "reducelogsumexp", "safesoftmax", "softmaxint"}
)

# (input count key, word) in the order they are listed
_WORDS = (
    ("nan", "NaN"),
    ("posinf", "+inf"),
    ("neginf", "-inf"),
    ("negative", "negative"),
    ("zero", "zero"),
)


def _n(value: float) -> str:
    return f"{int(value)}"


def _join(parts: list[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _counted(counts: dict[str, float], keys: tuple[str, ...], noun: str) -> str:
    """'12 negative and 3 zero inputs' for the keys with a non-zero count; '' if none."""
    words = dict(_WORDS)
    shown = [k for k in keys if counts.get(k)]
    parts = [f"{_n(counts[k])} {words[k]}" for k in shown]
    plural = noun if len(shown) == 1 and counts[shown[0]] == 1 else noun + "s"
    return f"{_join(parts)} {plural}" if parts else ""


def _produced(output: dict[str, float] | None) -> str:
    if not output:
        return "NaN/Inf"
    parts = [
        f"{_n(output[k])} {w}" for k, w in (("nan", "NaN"), ("posinf", "+Inf"), ("neginf", "-Inf"))
    ]
    shown = [p for p, k in zip(parts, ("nan", "posinf", "neginf"), strict=True) if output.get(k)]
    return _join(shown) or "NaN/Inf"


def _source(entry: dict[str, Any]) -> str:
    kind = entry.get("source_kind")
    if kind == "model input":
        return f"the model input `{entry['source']}`"
    if kind in ("parameter", "constant"):
        return f"the {kind} `{entry['source']}`"
    return f"`{entry['source']}`"


def _range(entry: dict[str, Any]) -> str:
    return f"finite inputs in [{sig(entry['min'])}, {sig(entry['max'])}]"


def describe(origin: dict[str, Any]) -> tuple[str, str]:
    """(what happened, how to guard it): 'Log in `loss/log` produced 12 NaN from 12 negative
    inputs (its input comes from `fc1`)', 'clamp its input to at least 1e-6 ...'. Without
    recorded values, the node and phase alone."""
    op_type, node, phase = origin["op_type"], origin["node"], origin["phase"]
    op = canonical_op(op_type)
    values = origin.get("values") or {}
    if op_type == "input":  # the batch itself: no op of the model to guard
        return _in_the_batch(node, values.get("array") or {})
    inputs: list[dict[str, Any]] = values.get("inputs") or []
    guard = _guard(op, inputs)
    head = f"{op_type} in `{node}`"
    if not inputs:
        return f"first produced by {head} in the {phase} pass", guard
    first = inputs[0]
    what = _culprit(op, inputs, phase)
    fed = f"its input comes from {_source(first)}"
    if op in DIVS and len(inputs) > 1:
        fed = f"its divisor comes from {_source(inputs[1])}"
    if phase == "forward":
        text = f"{head} produced {_produced(values.get('output'))} in the forward pass"
        text += f" from {what}" if what else ""
    else:
        text = f"{head} made the gradient non-finite in the backward pass"
        text += f" at {what}" if what else ""
    return f"{text} ({fed})", guard


def _in_the_batch(name: str, array: dict[str, Any]) -> tuple[str, str]:
    held = _counted(array, ("nan", "posinf", "neginf"), "value") or "NaN/Inf values"
    first = array.get("first")
    where = f", the first at `{name}[{', '.join(str(i) for i in first)}]`" if first else ""
    return (
        f"the batch's array `{name}` holds {held}{where}, before any op of the model",
        "clean the data (or drop or mask those examples) before it reaches the model",
    )


def _culprit(op: str, inputs: list[dict[str, Any]], phase: str) -> str:
    x = inputs[0]
    total = _n(x["numel"])
    if op in LOGS:
        found = _counted(x, ("nan", "neginf", "negative", "zero"), "input")
    elif op in SQRTS:
        keys = ("nan", "neginf", "negative") if phase == "forward" else ("negative", "zero")
        found = _counted(x, keys if op == "sqrt" else ("nan", "negative", "zero"), "input")
    elif op in DIVS:
        divisor = inputs[1] if len(inputs) > 1 and op != "reciprocal" else x
        total = _n(divisor["numel"])
        found = _counted(divisor, ("zero", "nan", "posinf", "neginf"), "divisor")
        if divisor is not x and x.get("zero") and divisor.get("zero"):
            found += " (0/0 is NaN where the numerator is 0 too)"
    elif op in POWS:
        found = _counted(x, ("nan", "posinf", "neginf", "negative", "zero"), "base")
        if len(inputs) > 1:
            e = inputs[1]
            found += f" raised to exponents in [{sig(e['min'])}, {sig(e['max'])}]"
    elif op in EXPS:
        over = int(x.get("above_exp_limit", 0))
        found = (
            f"{over} input{'s' if over > 1 else ''} above exp's overflow limit (largest "
            f"{sig(x['max'])})"
            if over
            else _counted(x, ("nan", "posinf"), "input")
        )
    elif op in SOFTMAXES:
        found = _counted(x, ("nan", "posinf", "neginf"), "input")
        if not found and x.get("above_exp_limit"):
            found = f"inputs up to {sig(x['max'])}"
    else:
        every = ("nan", "posinf", "neginf")  # negatives/zeros mean nothing for an unknown op
        parts = [
            f"{_counted(e, every, 'value')} in input {k}"
            for k, e in enumerate(inputs)
            if any(e.get(key) for key in every)
        ]
        return _join(parts) or _range(x)
    return f"{found} out of {total}" if found else _range(x)


def _guard(op: str, inputs: list[dict[str, Any]]) -> str:
    if op in LOGS and inputs and canonical_op(str(inputs[0].get("source_op", ""))) in SOFTMAXES:
        return (
            "compute log(softmax(z)) as F.log_softmax(z), which stays finite where the "
            "softmax underflows to 0 (a clamp would cut those entries' gradient)"
        )
    if op in LOGS:
        return "clamp its input to at least 1e-6 (torch.log(x.clamp_min(1e-6))) or add an eps"
    if op == "sqrt":
        return "clamp its input to at least 1e-6 (sqrt's gradient at 0 is infinite)"
    if op == "rsqrt":
        return "clamp its input to at least 1e-6"
    if op in DIVS:
        return "keep the divisor away from 0 (add 1e-6 or torch.where(|b| < 1e-6, 1e-6, b))"
    if op in POWS:
        return (
            "clamp the base to at least 1e-6 (fractional powers of negatives are NaN, and the "
            "gradient of x**p with p < 1 is infinite at 0, e.g. a distance between equal points)"
        )
    if op in EXPS:
        return (
            "clamp its input to at most 80 in float32 and bfloat16, 10.5 in float16 "
            "(torch.exp(x.clamp_max(80))) or work in log space"
        )
    if op in SOFTMAXES:
        return (
            "mask with a large finite negative (e.g. -1e9) instead of -inf so no row is all "
            "-inf, and keep +inf out of its input"
        )
    return "guard that op against its invalid inputs"

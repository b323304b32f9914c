"""What the first forward pass of a diagnosis tells about the model.

float16 computed inside a float32 model: autocast baked into an export.

A model exported under `torch.autocast(..., dtype=torch.float16)` keeps float32 parameters but
computes in float16 where autocast cast: ONNX writes those casts as Cast(to=FLOAT16) nodes, a
`.pt2` keeps the autocast region (run under it: formats/fx_regions.py). Its gradients pass
through float16 values and flush to zero there exactly as in an fp16 run, so it is analysed as
one (counted against an fp32 copy, loss scaling verified); analysed as fp32, the zeros would
read as vanishing gradients. The first forward pass tells: some node's output is a float16
tensor that carries gradient.

A BatchNorm in train mode given one value per channel (a micro-batch of one example through
BatchNorm1d): its output is its bias alone and no gradient passes it. torch refuses it in
train mode ("Expected more than 1 value per channel when training"); a `.pt2`'s decomposed
batch norm does not, and the zero gradients would read as vanishing gradients. Only the
BatchNorms that normalise with the batch's statistics in this run are watched
(`uses_batch_statistics`): all of them in train mode, in eval mode only those exported so
(`track_running_stats=False`, an ONNX `training_mode=1`); one normalising with its running
statistics is fine with a batch of one.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch

from service.engine.graph import Node, NodeObserver
from service.engine.layers import _attr, canonical

# Subject.extra key: the model computes in float16 although its parameters are float32 (the
# verification's fp32 reference must then run on an fp32 copy, as for a float16 model)
COMPUTES_IN_FP16 = "computes_in_fp16"


def uses_batch_statistics(node: Node, mode: str) -> bool:
    """Whether the BatchNorm `node` normalises with the batch's statistics in a `mode` run:
    always in train mode (the formats make it so, CONTRACT.md §2); in eval mode as exported:
    an aten batch norm's `training` argument (`_native_batch_norm_legit_no_training` has none:
    running statistics), an ONNX BatchNormalization's `training_mode` (or, before opset 14,
    its statistics outputs being named)."""
    if mode == "train":
        return True
    if node.domain == "aten":
        source = node.source
        schema = getattr(getattr(source, "target", None), "_schema", None)
        names = [a.name for a in getattr(schema, "arguments", ())]
        if "training" in names:
            args = tuple(getattr(source, "args", ()))
            at = names.index("training")
            value = args[at] if at < len(args) else getattr(source, "kwargs", {}).get("training")
            return bool(value) if isinstance(value, bool) else True
        return "notraining" not in canonical(node.op_type)
    if node.op_type == "BatchNormalization":
        mode_attr = _attr(node, "training_mode")
        if mode_attr is not None:
            return bool(mode_attr)
        return any(list(getattr(node.source, "output", node.outputs))[1:])
    return True  # unknown: watched, as before


class FirstPass:
    """A graph observer (wrapping the probe's) for the first forward pass: records the nodes
    whose outputs are float16 or bfloat16 tensors carrying gradient (when `half` is asked
    for), and the `batch_norms` (main node names) that saw one value per channel."""

    def __init__(
        self, inner: NodeObserver | None, *, half: bool, batch_norms: Collection[str]
    ) -> None:
        self.inner = inner
        self.half = half
        self.batch_norms = batch_norms
        self.nodes: dict[torch.dtype, list[str]] = {torch.float16: [], torch.bfloat16: []}
        self.single_value_batch_norms: list[str] = []

    def __call__(self, node: Node, outputs: Sequence[Any]) -> None:
        if self.inner is not None:
            self.inner(node, outputs)
        if node.name in self.batch_norms and outputs:
            out = outputs[0]
            if isinstance(out, torch.Tensor) and out.dim() >= 2 and out.numel() == out.shape[1]:
                self.single_value_batch_norms.append(node.name)
        if not self.half:
            return
        for value in outputs:
            if isinstance(value, torch.Tensor) and value.requires_grad:
                seen = self.nodes.get(value.dtype)
                if seen is not None:
                    seen.append(node.name)
                    return

    def precision(self) -> tuple[str, str] | None:
        """The run's precision and its note, when some op computes in half precision (fp16
        first: its range is the one that loses gradients)."""
        for dtype, precision in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
            nodes = self.nodes[dtype]
            if nodes:
                shown = ", ".join(nodes[:3]) + (", …" if len(nodes) > 3 else "")
                return precision, (
                    f"the model's parameters are float32 but {len(nodes)} of its ops compute "
                    f"in {str(dtype).removeprefix('torch.')} ({shown}: autocast baked into the "
                    f"export): analysed as a {precision} run (precision {precision})"
                    + (
                        ", gradients flushed to zero counted against an fp32 copy"
                        if precision == "fp16"
                        else ""
                    )
                )
        return None

"""What `--mode eval` cannot change, said in a note.

`eval` runs the graph exactly as exported (CONTRACT.md §2). A model exported in training mode
(the legacy ONNX exporter's TrainingMode.TRAINING, or torch.export of a module left in train
mode) has its BatchNorm written to normalise with the batch's own statistics: in `eval` those
layers still do, and their running statistics are not read. A user who asked for eval mode
expects inference behaviour and would otherwise read a report of the train-mode loss without
knowing why.
"""

from __future__ import annotations

from service.engine.batches import shown_names
from service.engine.graph import Node, ObservableGraph
from service.engine.layers import _attr, canonical

# aten's batch norms whose 6th argument is `training` (batch_norm, native_batch_norm,
# _native_batch_norm_legit[_functional])
_FX_BATCH_NORMS = frozenset(
    {"batchnorm", "nativebatchnorm", "nativebatchnormlegit", "nativebatchnormlegitfunctional"}
)


def _normalises_with_batch_statistics(node: Node) -> bool:
    """Whether the node, as exported, is a batch norm computing with the batch's statistics."""
    if node.domain in ("", "ai.onnx") and node.op_type == "BatchNormalization":
        if _attr(node, "training_mode") is not None:  # opset 14+
            return bool(_attr(node, "training_mode"))
        # before opset 14 a training graph is the one that asks for the statistics outputs
        return any(node.outputs[1:])
    if node.domain == "aten" and canonical(node.op_type) in _FX_BATCH_NORMS:
        args = tuple(getattr(node.source, "args", ()))
        return len(args) > 5 and args[5] is True
    return False


def eval_mode_notes(graph: ObservableGraph) -> list[str]:
    """A note where eval mode leaves batch norms computing with batch statistics."""
    training = [node.name for node in graph.nodes if _normalises_with_batch_statistics(node)]
    if not training:
        return []
    return [
        f"mode eval runs the graph as exported: {len(training)} batch norm(s) "
        f"({shown_names(training)}) were "
        "exported in training mode and normalise with the batch's own statistics, not their "
        "running statistics; to measure the model as it infers, export it in eval mode "
        "(model.eval() before torch.export / torch.onnx.export, or "
        "training=TrainingMode.EVAL)"
    ]

"""Which initializers no gradient can reach: state, not trainable weights.

A float initializer is a weight only if some path of differentiable inputs leads from it to a
graph output. Not so for BatchNormalization's running statistics, for what only `Shape` reads,
or for an attention mask that the legacy exporter writes as a float initializer (a registered
buffer `blocks.0.mask`) and that the graph only compares (`Equal(Slice(mask), 0)` feeding a
`Where` condition): reported as parameters they would be layers and "parameters without a
gradient" that the model does not have.

The walk goes backwards from the graph outputs over the top-level nodes (ONNX lists them in
topological order): a node's input carries gradient when one of its outputs does, unless the op
has no gradient at all (comparisons, logic, Shape, index-valued ops; a Cast to an integer or
bool type) or the input is at a slot that only indexes or shapes (`Where`'s condition,
`Gather`'s indices, `Reshape`'s shape, ...). Nodes with subgraphs, and unknown ops, pass
gradient to every input: in doubt, a tensor stays a weight.
"""

from __future__ import annotations

from onnx import GraphProto, NodeProto, TensorProto

# Ops whose outputs carry no gradient back to any input. Not the roundings (Round, Floor,
# Ceil, Sign): a weight rounded on its way to the output is trained with a straight-through
# estimator whose backward the export dropped (a torch.autograd.Function); it stays a weight,
# and its zero gradient is reported with the rounding that cuts it (gradient_cuts.py).
NO_GRADIENT_OPS = frozenset(
    {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor"}
    | {"IsNaN", "IsInf", "Shape", "Size", "ArgMax", "ArgMin", "NonZero"}
    | {"EyeLike", "ConstantOfShape", "RandomNormalLike", "RandomUniformLike"}
    | {"BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot", "OneHot", "Range"}
    | {"NonMaxSuppression", "HannWindow", "HammingWindow", "BlackmanWindow", "MelWeightMatrix"}
    | {"BitCast"}  # a reinterpretation of the bits: torch's view(dtype) has no gradient
    | {"OptionalHasElement"}  # whether a value is there, not what it is
    # integer arithmetic of quantised inference (ops/integer.py): integer outputs, and
    # DynamicQuantizeLinear's scale is computed from its detached input
    | {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv"}
)
# com.microsoft's integer ops of the QOperator format (ops/microsoft_qlinear.py): integer
# outputs. A node left integer (qoperator_as_qdq.py rewrites the others) reads its scales as
# the integer kernel's constants, not as weights.
MS_NO_GRADIENT_OPS = frozenset(
    {"QGemm", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearWhere"}
    | {"QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearSoftmax"}
)
# Input slots that only index, shape or select: no gradient flows into them.
NON_DIFFERENTIABLE_SLOTS: dict[str, tuple[int, ...]] = {
    "BatchNormalization": (3, 4),  # running statistics
    # scale and zero point: a fake quantiser's state (buffers in torch), not weights
    "QuantizeLinear": (1, 2),
    "DequantizeLinear": (1, 2),
    "Where": (0,),
    "Slice": (1, 2, 3, 4),
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Gather": (1,),
    "GatherElements": (1,),
    "GatherND": (1,),
    "ScatterElements": (1,),
    "ScatterND": (1,),
    "Pad": (1, 3),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "TopK": (1,),
    "Split": (1,),
    "CumSum": (1,),
    "Trilu": (1,),
    "Dropout": (1, 2),
    "ReduceMean": (1,),
    "ReduceSum": (1,),
    "ReduceMax": (1,),
    "ReduceMin": (1,),
    "ReduceProd": (1,),
    "ReduceL1": (1,),
    "ReduceL2": (1,),
    "ReduceSumSquare": (1,),
    "ReduceLogSum": (1,),
    "ReduceLogSumExp": (1,),
    "RoiAlign": (1, 2),  # boxes and their batch indices (detached, as torchvision's)
    "MaxUnpool": (1, 2),
    "TensorScatter": (2,),
    "DFT": (1, 2),
    "Col2Im": (1, 2),  # image_shape, block_shape
    "STFT": (1, 3),
    # the cos/sin tables (fixed functions of the position: a model's non-persistent buffers,
    # which onnxruntime-genai stores as initializers) and the positions
    "RotaryEmbedding": (1, 2, 3),
}
# The same for ops of other domains, by (domain, op type).
DOMAIN_NON_DIFFERENTIABLE_SLOTS: dict[tuple[str, str], tuple[int, ...]] = {
    ("com.microsoft", "QuantizeLinear"): (1, 2),
    ("com.microsoft", "DequantizeLinear"): (1, 2),
    # the packed weight, its scales, zero points and g_idx: only A and the bias take gradient
    # (ops/microsoft_quantize.py)
    ("com.microsoft", "MatMulNBits"): (1, 2, 3, 4),
    # ids, masks, sequence lengths, positions (ops/microsoft_transformer.py)
    ("com.microsoft", "EmbedLayerNormalization"): (0, 1, 7, 8),
    ("com.microsoft", "MultiHeadAttention"): (4, 8, 9),
    # and the rotary cos/sin tables, as the default domain's RotaryEmbedding
    ("com.microsoft", "RotaryEmbedding"): (1, 2, 3),
    ("com.microsoft", "GroupQueryAttention"): (5, 6, 7, 8, 9),
    # fused integer ops left as they are (fused_quantization.py unfolds the others): their
    # integers, scales and zero points (ops/microsoft_fused_integer.py)
    ("com.microsoft", "DynamicQuantizeMatMul"): (1, 2, 3),
    ("com.microsoft", "MatMulIntegerToFloat"): (0, 1, 2, 3, 4, 5),
    ("com.microsoft", "QAttention"): (0, 1, 3, 4, 5, 6, 7),
    ("com.microsoft", "QEmbedLayerNormalization"): tuple(range(18)),
}
_DEFAULT_DOMAINS = ("", "ai.onnx")
_FLOAT_TYPES = {
    TensorProto.FLOAT,
    TensorProto.DOUBLE,
    TensorProto.FLOAT16,
    TensorProto.BFLOAT16,
    # a Cast to float8 carries the gradient as one to float16 does (torch's cast)
    TensorProto.FLOAT8E4M3FN,
    TensorProto.FLOAT8E4M3FNUZ,
    TensorProto.FLOAT8E5M2,
    TensorProto.FLOAT8E5M2FNUZ,
}


def _has_gradient(node: NodeProto) -> bool:
    if node.domain == "com.microsoft":
        return node.op_type not in MS_NO_GRADIENT_OPS
    if node.domain not in _DEFAULT_DOMAINS:
        return True
    if node.op_type in NO_GRADIENT_OPS:
        return False
    if node.op_type == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), TensorProto.FLOAT)
        return to in _FLOAT_TYPES
    return True


def consumed_names(graph: GraphProto) -> set[str]:
    """Every value name read by a node (subgraphs included) or returned by a graph."""
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        for sub in subgraphs(node):
            names |= consumed_names(sub)
    return names


def subgraphs(node: NodeProto) -> list[GraphProto]:
    """The bodies a node carries (If's branches, Loop's and Scan's body)."""
    return [
        sub
        for attr in node.attribute
        for sub in ([attr.g] if attr.HasField("g") else list(attr.graphs))
    ]


def gradient_free_initializers(graph: GraphProto) -> set[str]:
    """The initializers of `graph` from which no differentiable path reaches an output."""
    carrying = {o.name for o in graph.output}
    for node in reversed(graph.node):
        bodies = subgraphs(node)
        if bodies:  # a body may read any outer value: all of them may carry gradient
            for sub in bodies:
                carrying |= consumed_names(sub)
            carrying.update(node.input)
            continue
        if not _has_gradient(node) or not any(o in carrying for o in node.output if o):
            continue
        skipped = (
            NON_DIFFERENTIABLE_SLOTS.get(node.op_type, ())
            if node.domain in _DEFAULT_DOMAINS
            else DOMAIN_NON_DIFFERENTIABLE_SLOTS.get((node.domain, node.op_type), ())
        )
        carrying.update(name for i, name in enumerate(node.input) if i not in skipped)
    return {init.name for init in graph.initializer} - carrying


def disconnected_weights(graph: GraphProto) -> tuple[list[str], list[str]]:
    """The top-level nodes no graph output depends on, by any input at all (not only
    differentiable ones), and the float initializers only they read: part of a model that an
    export left unconnected (onnxruntime-genai's builder wiring lm_head to the first layer).
    Such weights are state (gradient_free_initializers), and nothing else would say why."""
    needed = {o.name for o in graph.output}
    dead: list[NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output if o):
            needed.update(node.input)
            for sub in subgraphs(node):
                needed |= consumed_names(sub)
        else:
            dead.append(node)
    floats = {i.name for i in graph.initializer if i.data_type in _FLOAT_TYPES}
    read_by_dead = {name for node in dead for name in node.input}
    weights = sorted((floats & read_by_dead) - needed)
    return [node.name or node.op_type for node in reversed(dead)], weights

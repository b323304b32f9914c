"""Which nodes of a converted ONNX graph compute values fixed by the input shapes alone.

Exporters write shape arithmetic into the graph: `Shape` of an activation, `Slice`/`Concat` of
the result into a `Reshape` target, attention's `1/sqrt(head_dim)` as `Shape → Slice → Cast →
Sqrt → Div`. The converter folds the chains that read only constants (`convert._fold_constants`);
the ones that start at a `Shape` of an activation remain, a dozen per transformer layer, each a
Python call and a few dispatcher calls per step, which a GPU spends idle. Their values depend
only on the shapes (and dtypes, device) of the graph's inputs, so `ObservableGraph.run` computes
them once per input signature and reuses them (`ObservableGraph.input_shape_nodes`); they stay
nodes, observed with their values as before.

A value is *shaped* when its shape is fixed by the input signature: graph inputs, state, and
outputs of the ops below given shaped inputs (`SHAPES_FROM_SHAPES`), or given a shaped first
input and *valued* other inputs (`SHAPES_FROM_VALUES`: a Reshape's target, a Slice's bounds).
A value is *valued* when its value is fixed by the input signature: constants, `Shape`/`Size`
of a shaped value, and outputs of deterministic ops reading only valued inputs. Only the
default ONNX domain is analysed; anything not listed is neither (a NonZero's output shape
depends on data; If/Loop/Scan run bodies; random ops differ per call).
"""

from __future__ import annotations

from collections.abc import Iterable

from service.engine.graph import DEVICE_VALUE, ConstantResult, Node

# Output shapes follow from the input shapes and the attributes.
SHAPES_FROM_SHAPES = frozenset(
    {"Abs", "Acos", "Acosh", "Add", "And", "Asin", "Asinh", "Atan", "Atanh", "BitShift"}
    | {"BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Cast", "CastLike", "Ceil"}
    | {"Celu", "Clip", "Cos", "Cosh", "Div", "Elu", "Equal", "Erf", "Exp", "Floor", "Gelu"}
    | {"Greater", "GreaterOrEqual", "HardSigmoid", "HardSwish", "Identity", "IsInf", "IsNaN"}
    | {"LeakyRelu", "Less", "LessOrEqual", "Log", "Max", "Mean", "Min", "Mish", "Mod", "Mul"}
    | {"Neg", "Not", "Or", "PRelu", "Pow", "Reciprocal", "Relu", "Round", "Selu", "Shrink"}
    | {"Sigmoid", "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Sub", "Sum", "Tan"}
    | {"Tanh", "ThresholdedRelu", "Where", "Xor", "MatMul", "Gemm", "Transpose", "Softmax"}
    | {"LogSoftmax", "Hardmax", "LayerNormalization", "BatchNormalization", "LRN"}
    | {"InstanceNormalization", "GroupNormalization", "LpNormalization", "Dropout", "Flatten"}
    | {"MeanVarianceNormalization", "Concat", "Gather", "GatherElements", "GatherND"}
    | {"ScatterND", "ScatterElements", "Scatter", "Einsum", "ArgMax", "ArgMin", "CumSum"}
    | {"DepthToSpace", "SpaceToDepth", "Trilu", "EyeLike", "Conv", "ConvTranspose", "MaxPool"}
    | {"AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
    # [T, directions, batch, hidden] and [directions, batch, hidden] whatever the lengths in
    # sequence_lens (padding steps hold zeros): the legacy exporter sizes the next layer's
    # initial state from `Shape` of the previous layer's output
    | {"RNN", "GRU", "LSTM"}
)
# Output shapes follow from the first input's shape and the values of the others.
SHAPES_FROM_VALUES = frozenset(
    {"Reshape", "Expand", "Tile", "Slice", "Pad", "Squeeze", "Unsqueeze", "Split", "TopK"}
    | {"Resize", "Upsample", "CenterCropPad", "OneHot", "ReduceSum", "ReduceMean", "ReduceMax"}
    | {"ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp"}
    | {"ReduceSumSquare", "Col2Im"}
)
SHAPE_READERS = frozenset({"Shape", "Size"})
# Never reused: a different value per call, or bodies that may hold such ops.
NOT_REUSABLE = frozenset(
    {"Dropout", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike"}
    | {"Multinomial", "Bernoulli", "If", "Loop", "Scan", "SequenceMap"}
)
# Constant nodes' values registered as buffers (`convert._constant_as_state`).
CONSTANT_STATE_SUFFIX = "::constant"


def input_shape_nodes(
    nodes: Iterable[Node],
    *,
    inputs: Iterable[str],
    state: Iterable[str],
    constants: Iterable[str],
) -> frozenset[str]:
    """Names of the nodes whose outputs are fixed by the input signature (see module doc).
    Folded nodes (already constant) are left out."""
    state = list(state)
    valued = {"", DEVICE_VALUE, *constants} | {
        n for n in state if n.endswith(CONSTANT_STATE_SUFFIX)
    }
    shaped = valued | set(inputs) | set(state)
    found: set[str] = set()
    for node in nodes:
        if node.domain or not node.inputs:
            continue
        outputs = [name for name in node.outputs if name]
        first, rest = node.inputs[0], node.inputs[1:]
        if node.op_type in SHAPE_READERS and first in shaped:
            is_valued = True
        else:
            is_valued = node.op_type not in NOT_REUSABLE and all(
                name in valued for name in node.inputs
            )
        if is_valued:
            valued.update(outputs)
            shaped.update(outputs)
            if not isinstance(node.fn, ConstantResult):
                found.add(node.name)
        elif (node.op_type in SHAPES_FROM_SHAPES and all(n in shaped for n in node.inputs)) or (
            node.op_type in SHAPES_FROM_VALUES
            and first in shaped
            and all(n in valued for n in rest)
        ):
            shaped.update(outputs)
    return frozenset(found)

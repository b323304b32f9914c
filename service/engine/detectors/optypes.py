"""One place that knows what an op type means, whatever format the graph came from.

The same activation is "Sigmoid" in ONNX, "aten.sigmoid.default" in a torch.export FX graph and
"aten::sigmoid" in TorchScript. Detectors, advice and the fix transforms only ever compare
`canonical_op(op_type)` against the families below, so a new format needs a change here only.
"""

from __future__ import annotations

import re

# ONNX op type → canonical (aten-like) name. Anything not listed is lower-cased/snake-cased.
_ONNX_NAMES = {
    "Sigmoid": "sigmoid",
    "HardSigmoid": "hardsigmoid",
    "Tanh": "tanh",
    "Softsign": "softsign",
    "Relu": "relu",
    "LeakyRelu": "leaky_relu",
    "PRelu": "prelu",
    "Elu": "elu",
    "Selu": "selu",
    "Celu": "celu",
    "Gelu": "gelu",
    "FastGelu": "gelu",
    "BiasGelu": "gelu",
    "HardSwish": "hardswish",
    "Softplus": "softplus",
    "Mish": "mish",
    "Gemm": "linear",
    "MatMul": "matmul",
    "Conv": "convolution",
    "ConvTranspose": "convolution",
    "BatchNormalization": "batch_norm",
    "LayerNormalization": "layer_norm",
    "SkipLayerNormalization": "layer_norm",
    "SimplifiedLayerNormalization": "rms_norm",
    "SkipSimplifiedLayerNormalization": "rms_norm",
    "RMSNormalization": "rms_norm",
    "GroupNormalization": "group_norm",
    "InstanceNormalization": "instance_norm",
    "RNN": "rnn_tanh",
    "LSTM": "lstm",
    "GRU": "gru",
    "Log": "log",
    "Sqrt": "sqrt",
    "Rsqrt": "rsqrt",
    "Reciprocal": "reciprocal",
    "Div": "div",
    "Pow": "pow",
    "Exp": "exp",
    "Add": "add",
    "Mul": "mul",
}

# torch.nn class names (TorchScript modules seen with parameters-only coverage keep them)
_MODULE_NAMES = {
    "ReLU": "relu",
    "ReLU6": "relu6",
    "LeakyReLU": "leaky_relu",
    "PReLU": "prelu",
    "GELU": "gelu",
    "SiLU": "silu",
    "ELU": "elu",
    "SELU": "selu",
    "CELU": "celu",
    "Hardtanh": "hardtanh",
    "Hardsigmoid": "hardsigmoid",
    "Hardswish": "hardswish",
    "BatchNorm1d": "batch_norm",
    "BatchNorm2d": "batch_norm",
    "BatchNorm3d": "batch_norm",
    "SyncBatchNorm": "batch_norm",
    "InstanceNorm1d": "instance_norm",
    "InstanceNorm2d": "instance_norm",
    "InstanceNorm3d": "instance_norm",
    "LayerNorm": "layer_norm",
    "GroupNorm": "group_norm",
    "RMSNorm": "rms_norm",
    "Linear": "linear",
    "Conv1d": "conv1d",
    "Conv2d": "conv2d",
    "Conv3d": "conv3d",
}

SATURATING = frozenset({"sigmoid", "hardsigmoid", "tanh", "hardtanh", "softsign"})
RELU_LIKE = frozenset({"relu", "relu6", "threshold"})
LEAKY = frozenset({"leaky_relu", "prelu", "rrelu", "elu", "selu", "celu"})
SMOOTH = frozenset({"gelu", "silu", "mish", "hardswish", "softplus"})
ACTIVATIONS = SATURATING | RELU_LIKE | LEAKY | SMOOTH
NORMALIZATION = frozenset(
    {
        "batch_norm",
        "native_batch_norm",
        "_native_batch_norm_legit",
        "_native_batch_norm_legit_functional",
        "_native_batch_norm_legit_no_training",
        "cudnn_batch_norm",
        "layer_norm",
        "native_layer_norm",
        "group_norm",
        "native_group_norm",
        "instance_norm",
        "rms_norm",
    }
)
VANILLA_RNN = frozenset({"rnn_tanh", "rnn_relu", "rnn_tanh_cell", "rnn_relu_cell"})
GATED_RNN = frozenset({"lstm", "gru", "lstm_cell", "gru_cell"})
RECURRENT = VANILLA_RNN | GATED_RNN
LINEAR_LIKE = frozenset(
    {"linear", "addmm", "mm", "matmul", "bmm", "convolution", "conv1d", "conv2d", "conv3d"}
)
# Ops whose input domain is restricted: where a NaN/Inf is born and what guards it.
GUARDS: dict[str, str] = {
    "log": "clamp the input to a small positive minimum: torch.log(x.clamp_min(eps))",
    "log2": "clamp the input to a small positive minimum: torch.log2(x.clamp_min(eps))",
    "log10": "clamp the input to a small positive minimum: torch.log10(x.clamp_min(eps))",
    "log1p": "clamp the input above -1: torch.log1p(x.clamp_min(-1 + eps))",
    "sqrt": "clamp the input to zero or above: torch.sqrt(x.clamp_min(eps))",
    "rsqrt": "clamp the input to a small positive minimum: torch.rsqrt(x.clamp_min(eps))",
    "reciprocal": "keep the denominator away from zero: 1 / (x + eps * x.sign())",
    "div": "keep the denominator away from zero: a / (b + eps)",
    "pow": "clamp the base to be non-negative before a fractional power",
    "exp": "clamp the exponent: torch.exp(x.clamp_max(80.0))",
    "acos": "clamp the input to [-1 + eps, 1 - eps]",
    "asin": "clamp the input to [-1 + eps, 1 - eps]",
}

_ATEN_PREFIX = re.compile(r"^(aten|prims|torch\.ops\.aten)(::|\.)")
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def canonical_op(op_type: str) -> str:
    """'aten.sigmoid.default' / 'aten::sigmoid' / 'Sigmoid' / 'relu_' / 'nn.ReLU' class name
    'ReLU' → 'sigmoid' / 'relu'."""
    if op_type in _ONNX_NAMES:
        return _ONNX_NAMES[op_type]
    if op_type in _MODULE_NAMES:
        return _MODULE_NAMES[op_type]
    name = op_type.strip()
    if _ATEN_PREFIX.match(name):
        name = _ATEN_PREFIX.sub("", name)
        name = name.split(".")[0]  # drop the overload: .default, .Tensor, .input
    elif "." in name:  # e.g. "torch.nn.functional.relu" or "torch.sigmoid"
        name = name.rsplit(".", 1)[-1]
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]  # in-place variant: relu_ → relu
    if any(c.isupper() for c in name):
        name = _CAMEL.sub("_", name).lower()
    if name in {"conv", "_convolution"}:
        return "convolution"
    return name


def is_saturating(op_type: str) -> bool:
    return canonical_op(op_type) in SATURATING


def is_relu_like(op_type: str) -> bool:
    return canonical_op(op_type) in RELU_LIKE


def is_activation(op_type: str) -> bool:
    return canonical_op(op_type) in ACTIVATIONS


def is_normalization(op_type: str) -> bool:
    return canonical_op(op_type) in NORMALIZATION


def is_embedding(op_type: str) -> bool:
    """A table lookup: `aten.embedding`, ONNX Gather (how both exporters write nn.Embedding)."""
    return canonical_op(op_type) in {"embedding", "gather", "embedding_bag"}


def is_recurrent(op_type: str) -> bool:
    return canonical_op(op_type) in RECURRENT


def is_vanilla_rnn(op_type: str) -> bool:
    return canonical_op(op_type) in VANILLA_RNN


def is_gated_rnn(op_type: str) -> bool:
    return canonical_op(op_type) in GATED_RNN


def is_shortcut_add(op_type: str) -> bool:
    """An elementwise add: residual connections show up as one (not proof of one)."""
    return canonical_op(op_type) in {"add", "add_"}


def aten_style(op_type: str) -> bool:
    return bool(_ATEN_PREFIX.match(op_type))

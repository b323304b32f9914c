"""Parameters as the source module had them, where the dynamo exporter's optimizer changed them.

`torch.onnx.export(..., dynamo=True)` optimises the graph by default, and these rewrites change
what a report would say about parameters:
- initializers with identical values are merged into one. A fresh model has many: LayerNorm
  weights are all ones and biases all zeros, and `nn.TransformerEncoder` deep-copies its layer,
  so every layer starts as the same tensors. The merged initializer's gradient is then the sum
  over every layer that reads it (4× a LayerNorm's own in a 2-layer encoder), reported for each.
  An `nn.RNN` whose biases start as zeros has its `bias_ih_l0` and `bias_hh_l0` merged: its
  written-out steps read the latter as their `linear(h, weight_hh_l0, bias_hh_l0)`'s bias.
- `Transpose(linear.weight)` is constant-folded into a new initializer named like `val_86`, in
  the transposed shape; a weight the source also reads elsewhere (an output projection tied to
  the input embedding) is then two tensors, and the tie is gone. A GroupNorm's weight and bias
  are folded the same way into [C, 1, 1] vectors for their Mul and Add (and merged). A weight
  indexed as `w[idx]` (a Mixture-of-Experts' expert weights) is folded into a copy: torchlib's
  `aten.index` transposes it (by the identity permutation) before its GatherND.
- an all-zero bias of a `Gemm` (a fresh attention out-projection's, GPT-2's Conv1D) or of a
  `Conv` (a ViT's patch embedding) is dropped, a module's or a standalone parameter's
  (`F.linear(x, w, b)`).
- a GroupNorm exports as an InstanceNormalization to constant ones and zeros, which are merged
  with a parameter of equal values when the norm has one group per channel (wav2vec2).
- values computed from parameters are folded ahead (a positional embedding sliced to the
  sequence length), or from input shapes alone (`zeros_like` of a padding mask); two layers'
  equal values computed ahead (Mamba's `-exp(A_log)` of equal `A_log`s) are merged too.
- a constant the exporter adds is merged with a parameter of equal values: the ones scale of an
  affine-free LayerNorm with a fresh norm's weight.
- nodes the optimizer makes record no FX node: its Split of a SplitToSequence and SequenceAt
  (cross-attention's split of the in-projection weight and bias into q and k/v), which its
  common-subexpression elimination then shares between layers whose (merged) biases are equal.

Every node of that exporter records the FX node it came from (`pkg.torch.onnx.fx_node`:
`aten.linear.default](args = (%x, %p_enc_layers_0_linear1_weight, %p_enc_layers_0_linear1_bias)`)
and its module scopes (`pkg.torch.onnx.name_scopes`): the parameter placeholders it read, named
`p_` + the dotted source name with `.` → `_`, lower-cased; the graph's metadata holds the
program's signature, which maps each placeholder to its source name and says which are
parameters (`ExportedSignature`); and each folded value records what it was folded from
(`pkg.onnxscript.optimizer.folded_from`). From them, `restore_source_parameters` splits a
merged initializer into one parameter per source parameter (clones of the one tensor: the values
the source model had), turns a folded weight or vector back into the source's parameter (its
readers run a `Transpose` or `Reshape` of it, as in an unoptimised export; a tied one reads the
parameter it is tied to; a PReLU's slope is such a vector; an indexed weight's copy is read
through its identity `Transpose`), gives a Gemm or Conv its zero bias back (the argument of its
FX op in the bias's place), and a GroupNorm's InstanceNormalization, or a node whose FX op read
no value the initializer could be (`layer_norm(%x, [16], None, None)`), its constants
(`Restored.constants`).
A node the optimizer made reads the parameter of the module its readers run in (one copy per
module where it feeds several); equal values computed ahead are split by the FX value each
reader read (`%neg`, `%neg_1`), each named with its sources (those of the module its readers
run in). `folded_parameter_sources` tells what parameters a folded value came from (convert.py:
the note, or a constant when inputs, buffers and constants alone: a causal mask, rotary tables
from `inv_freq`). Tied weights (one placeholder read by several nodes) stay one parameter.
Where any reader of an initializer cannot be resolved (no metadata, a legacy export, an
ambiguous node), that initializer is left as it is.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from onnx import GraphProto, NodeProto

from service.engine.graph import Node

FX_NODE_KEY = "pkg.torch.onnx.fx_node"
FOLDED_FROM_KEY = "pkg.onnxscript.optimizer.folded_from"
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
# Names the dynamo exporter gives the values it creates (`val_81`), not the module's.
EXPORTER_VALUE_NAME = re.compile(r"val_\d+")
# the FX node name of a transposing op, which names the value the optimizer folds it into
_FOLDED_TRANSPOSE = re.compile(r"(permute|t|transpose|numpy_T)(_\d+)?")
# torch.export's placeholder for a parameter: `p_` + its dotted name with `.` → `_`
_PARAMETER_PLACEHOLDER = re.compile(r"p_[A-Za-z0-9_]+")
# a value an FX node reads: `%linear`, `%p_fc_weight`
_FX_VALUE = re.compile(r"%(\w+)")
_LINEAR_WEIGHT = re.compile(r"aten\.linear\.default\]\(args = \(%\w+, %(p_[A-Za-z0-9_]+)")
_SHOWN = 3
_NOT_ALPHANUMERIC = re.compile(r"[^a-zA-Z0-9]")


GRAPH_SIGNATURE_KEY = "pkg.torch.export.ExportedProgram.graph_signature"
# a line of the printed signature: `p_m_bert_embeddings_layernorm_weight: PARAMETER
# target='m.bert.embeddings.LayerNorm.weight'`
_SIGNATURE_INPUT = re.compile(r"^(\w+): ([A-Z_]+) target='([^']+)'", re.MULTILINE)


@dataclass(frozen=True)
class ExportedSignature:
    """The torch.export graph signature the dynamo exporter writes into the graph's metadata:
    each placeholder's source name (placeholders are lower-cased, so only this gives
    `LayerNorm` back) and which of them are parameters; empty for any other exporter."""

    parameters: Mapping[str, str] = field(default_factory=dict)  # placeholder → name
    state: frozenset[str] = frozenset()  # names of buffers and lifted constants

    @classmethod
    def of(cls, graph: GraphProto) -> ExportedSignature:
        text = next((p.value for p in graph.metadata_props if p.key == GRAPH_SIGNATURE_KEY), "")
        parameters: dict[str, str] = {}
        state: set[str] = set()
        for placeholder, kind, target in _SIGNATURE_INPUT.findall(text):
            if kind == "PARAMETER":
                parameters[placeholder] = target
            else:
                state.add(target)
        return cls(parameters, frozenset(state))


@dataclass
class Restored:
    """What `restore_source_parameters` changed: for the report's notes and for onnxruntime's
    copy of the model (`transposed`: a folded initializer is the transpose of that parameter)."""

    split: dict[str, list[str]] = field(default_factory=dict)  # merged name → names added
    transposed: dict[str, str] = field(default_factory=dict)  # folded name → its weight
    reshaped: dict[str, str] = field(default_factory=dict)  # folded name → its vector
    copied: dict[str, str] = field(default_factory=dict)  # folded name → the weight it equals
    tied: list[str] = field(default_factory=list)  # weights a folded copy had untied
    zero_biases: list[str] = field(default_factory=list)
    # recurrent weights split out of initializers the optimizer folded (recurrent_weights.py)
    unfolded: list[str] = field(default_factory=list)
    # copies of parameters that stand for an exporter's constant of equal values (no weight)
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    # parameters that are constants the optimizer folded out of source parameters → those
    folded_from: dict[str, list[str]] = field(default_factory=dict)
    # of those sources, parameters the graph reads too → the values computed ahead from them
    also_computed_ahead: dict[str, list[str]] = field(default_factory=dict)

    def unread(self, names: set[str]) -> None:
        """Forget merges and values computed ahead among `names`, values that later folds
        left unread and that are no parameters (the folded first step of a written-out nn.RNN,
        `linear_1`, merged with another layer's equal `linear_8`)."""
        for merged in list(self.split):
            added = [name for name in self.split[merged] if name not in names]
            if merged in names or not added:
                del self.split[merged]
            else:
                self.split[merged] = added
        for name in names:
            self.folded_from.pop(name, None)

    def notes(self) -> list[str]:
        """One sentence per kind of change, each listing (some of) what changed."""
        kinds = [
            (
                [f"{name} also stood for {listed(added)}" for name, added in self.split.items()],
                "the ONNX exporter's optimizer had merged parameters with identical values into "
                "one initializer ({}); they are separate parameters again, restored from the "
                "export's metadata, so each layer reports its own gradient (re-export with "
                "optimize=False to keep them apart in the file)",
            ),
            (
                [f"{old} = {new}ᵀ" for old, new in self.transposed.items()],
                "weights the ONNX exporter had stored transposed under generated names are the "
                "source model's parameters again, in their own shapes ({})",
            ),
            (
                [f"{old} = {new} reshaped" for old, new in self.reshaped.items()],
                "vectors the ONNX exporter had stored reshaped under generated names (a "
                "normalisation's weight as [C, 1, 1]) are the source model's parameters again, "
                "in their own shapes ({})",
            ),
            (
                [f"{old} = {new}" for old, new in self.copied.items()],
                "weights the ONNX exporter had stored as copies under generated names (an "
                "indexed weight, `w[idx]`) are the source model's parameters again ({})",
            ),
            (
                self.tied,
                "tied weights the exporter had untied by storing a transposed copy ({}) get the "
                "gradient of every use again",
            ),
            (
                self.zero_biases,
                "zero biases the ONNX exporter's optimizer removed are parameters again ({}): "
                "zeros, as in the source model, and with their own gradients",
            ),
            (
                self.unfolded,
                "recurrent weights the ONNX exporter's optimizer had folded into initializers in "
                "ONNX's gate order are the module's parameters again, named from the export's "
                "metadata ({})",
            ),
            (
                [
                    f"{name} from {', '.join(src) or 'a source the export does not name'}"
                    for name, src in self.folded_from.items()
                ],
                "the ONNX exporter's optimizer computed some parameters ahead from the model's "
                "own ({}: e.g. a positional embedding sliced to the sequence length): they are "
                "reported as the file has them, each gradient that of the part of the source "
                "parameter the model read; export with optimize=False to measure the source "
                "parameters themselves",
            ),
            (
                [
                    f"{name} → {', '.join(values)}"
                    for name, values in self.also_computed_ahead.items()
                ],
                "parameters the graph reads that the optimizer also computed values ahead from "
                "({}: a tied embedding folded into a product) have the gradient of the graph's "
                "own reads alone: the part through each value computed ahead is that value's "
                "gradient, as the file holds no path back to the source; export with "
                "optimize=False for each parameter's whole gradient",
            ),
        ]
        return [sentence.format(listed(items)) for items, sentence in kinds if items]


def _raw_folded_from(graph: GraphProto, wanted: set[str]) -> dict[str, list[Any]]:
    """The optimizer's `folded_from` list of each wanted value, as it wrote it."""
    found: dict[str, list[Any]] = {}
    for info in graph.value_info:
        if info.name not in wanted:
            continue
        text = next((p.value for p in info.metadata_props if p.key == FOLDED_FROM_KEY), None)
        try:
            sources = ast.literal_eval(text) if text else None
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
        if isinstance(sources, list):
            found[info.name] = sources
    return found


def folded_transposes(graph: GraphProto, parameters: Sequence[str]) -> dict[str, str]:
    """Parameters the optimizer folded from one source parameter by one transposing FX op
    (`x @ w.T` → a `permute` or `t` node, Falcon's attention): folded value → the source's
    name. Named after the FX op, not `val_N`, and folded from the source alone (a longer
    `folded_from` list is a computation: `-exp(A_log)` is no transpose of A_log)."""
    signature = ExportedSignature.of(graph)
    source_parameters = set(signature.parameters.values())
    return {
        name: str(sources[0])
        for name, sources in _raw_folded_from(graph, set(parameters)).items()
        if _FOLDED_TRANSPOSE.fullmatch(name)
        and len(sources) == 1
        and str(sources[0]) in source_parameters
    }


def folded_parameter_sources(graph: GraphProto, parameters: Sequence[str]) -> dict[str, list[str]]:
    """Parameters of the graph that the dynamo exporter's optimizer folded ahead (its
    `pkg.onnxscript.optimizer.folded_from` on the value): name → the values it was computed
    from, less graph inputs (only their shapes can be folded) and the exporter's own
    constants. An empty list: computed from constants and input shapes alone (`zeros_like` of
    a padding mask), a constant, no weight. A source may be a parameter of the graph too: a
    weight it also reads directly (an embedding tied to the output projection, folded into
    `W.t() @ W`)."""
    wanted = set(parameters)
    inputs = {i.name for i in graph.input}
    # with a signature, only its parameters count as sources: buffers (a rotary embedding's
    # inv_freq), lifted constants and the folded ops' own values (`arange_3`) do not. Without
    # one, nothing tells the graph's other parameters from values folded before (`permute`)
    signature = ExportedSignature.of(graph)
    source_parameters = set(signature.parameters.values())
    found: dict[str, list[str]] = {}
    for name, sources in _raw_folded_from(graph, wanted).items():
        found[name] = [
            str(s)
            for s in sources
            if isinstance(s, str)
            and s != name
            and not EXPORTER_VALUE_NAME.fullmatch(s)
            and s not in inputs
            and (s in source_parameters if signature.parameters else s not in wanted)
        ]
    return found


def listed(names: Sequence[str], shown: int = _SHOWN) -> str:
    """`a, b, c and 4 more`: the first few names of a list, for a note."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _metadata(proto: NodeProto, key: str) -> str | None:
    return next((p.value for p in proto.metadata_props if p.key == key), None)


def fx_node_text(proto: NodeProto) -> str | None:
    """The FX node a dynamo-exported node came from, as the exporter printed it."""
    return _metadata(proto, FX_NODE_KEY)


def name_scopes(proto: NodeProto) -> list[str]:
    """The module paths enclosing a dynamo-exported node, outermost first (`['', 'blocks.0',
    'blocks.0.attn']`); empty when the exporter recorded none."""
    text = _metadata(proto, NAME_SCOPES_KEY)
    if text is None:
        return []
    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return []
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        return []
    return scopes[:-1]  # the last entry is the FX op's own name


def _placeholder(name: str) -> str:
    """torch.export's placeholder for the parameter `name`: `p_` + the name with every
    character but letters and digits → `_`, lower-cased (`bert.embeddings.LayerNorm.weight` →
    `p_bert_embeddings_layernorm_weight`; torch/_export/utils.py)."""
    return "p_" + _NOT_ALPHANUMERIC.sub("_", name).lower()


def _dotted(
    placeholder: str, like: str, scopes: Sequence[str], known: Mapping[str, str]
) -> str | None:
    """The dotted source name of `placeholder`: a parameter's of the graph (`known`:
    placeholder → name) when it is one; else split as the initializer `like` is when they
    have as many `_`-separated words (`enc.layers.0.self_attn.in_proj_bias` →
    `enc.layers.1.self_attn.in_proj_bias`), else under the innermost module scope that
    prefixes it (`p_enc_layers_0_norm2_weight` in `enc.layers.0.norm2`). The placeholder is
    lower-case: each part takes its case back from the scopes or from `like`."""
    if placeholder in known:
        return known[placeholder]
    words = placeholder[2:].split("_")
    segments = like.split(".")
    if (
        like
        and not EXPORTER_VALUE_NAME.fullmatch(like)
        and len(words) == sum(len(s.split("_")) for s in segments)
    ):
        dotted, start = [], 0
        for segment in segments:
            count = len(segment.split("_"))
            dotted.append("_".join(words[start : start + count]))
            start += count
        return _cased(dotted, like, scopes)
    for scope in sorted(scopes, key=len, reverse=True):
        prefix = _placeholder(scope) + "_" if scope else "p_"
        if placeholder.startswith(prefix) and len(placeholder) > len(prefix):
            attribute = placeholder[len(prefix) :]
            return _cased([*scope.split("."), attribute] if scope else [attribute], like, scopes)
    return None


def _cased(parts: Sequence[str], like: str, scopes: Sequence[str]) -> str:
    """`parts` (lower-case, from a placeholder) with each part's case as a module scope with
    the same path has it, else as the same part of `like` has it where they agree."""
    lowered = [p.lower() for p in parts]
    cased = list(parts)
    for scope in scopes:
        path = scope.split(".") if scope else []
        if [p.lower() for p in path] == lowered[: len(path)]:
            cased[: len(path)] = path
    for k, part in enumerate(like.split(".") if like else []):
        if k < len(cased) and cased[k] == lowered[k] and part.lower() == lowered[k]:
            cased[k] = part
    return ".".join(cased)


def _fx_arguments(proto: NodeProto) -> list[str] | None:
    """The values the node's FX op read (`%linear`, `%p_fc_weight`), in argument order; None
    when the exporter recorded no FX node (a node the optimizer made)."""
    fx_node = _metadata(proto, FX_NODE_KEY)
    if fx_node is None or "args = " not in fx_node:
        return None
    return list(dict.fromkeys(_FX_VALUE.findall(fx_node.split("args = ", 1)[1])))


def _fx_positional_arguments(proto: NodeProto) -> list[str] | None:
    """The positional arguments of the node's FX op as the exporter printed them (`%x`,
    `%p_b`, `None`, `[1, 1]`), split at the commas outside brackets; None when it recorded no
    FX node."""
    fx_node = _metadata(proto, FX_NODE_KEY)
    if fx_node is None or "args = (" not in fx_node:
        return None
    arguments, depth, current = [], 0, ""
    for char in fx_node.split("args = (", 1)[1]:
        if depth == 0 and char in ",)":
            if current.strip():
                arguments.append(current.strip())
            current = ""
            if char == ")":
                return arguments
            continue
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(char, 0)
        current += char
    return None


def _read_placeholders(proto: NodeProto) -> list[str]:
    """The parameter placeholders the node's FX op read, in argument order."""
    return [a for a in _fx_arguments(proto) or [] if _PARAMETER_PLACEHOLDER.fullmatch(a)]


def _unmatched_fx_arguments(initializer: str, proto: NodeProto) -> list[str] | None:
    """The values the node's FX op read that none of the node's other inputs is: what
    `initializer` may stand for in it; None when the FX op read the initializer by its own
    name or placeholder, or when the exporter recorded no FX node."""
    arguments = _fx_arguments(proto)
    if arguments is None or initializer in arguments or _placeholder(initializer) in arguments:
        return None
    others = set(proto.input) - {initializer}
    return [a for a in arguments if a not in others]


def _fx_value_read_as(initializer: str, proto: NodeProto) -> str | None:
    """The FX value a value computed ahead stands for in this node: its own name, or the one
    value the FX op read that no other input is (`%neg_1`, layer 1's `-exp(A_log)`, which the
    optimizer merged into layer 0's equal `neg`)."""
    unmatched = _unmatched_fx_arguments(initializer, proto)
    if unmatched is None:
        return initializer if initializer in (_fx_arguments(proto) or []) else None
    values = [a for a in unmatched if not _PARAMETER_PLACEHOLDER.fullmatch(a)]
    return values[0] if len(values) == 1 else None


def placeholders_read(graph: GraphProto) -> set[str]:
    """Every parameter placeholder a node's FX op read."""
    return {p for proto in graph.node for p in _read_placeholders(proto)}


def modules_run(graph: GraphProto) -> set[str]:
    """Every module some node of the graph runs in, with the modules enclosing it, as the
    exporter recorded their scopes (`blocks.0.attn`, `blocks.0`, `` for the model)."""
    return {scope for proto in graph.node for scope in name_scopes(proto)}


def read_parameter_names(
    proto: NodeProto, signature: ExportedSignature | None = None
) -> list[str] | None:
    """The source names of the parameters the node's FX op read, in argument order (an
    `aten.lstm` node: every layer's and direction's, in torch's flat-weights order); None
    when the exporter recorded no FX node or a name cannot be told."""
    if _metadata(proto, FX_NODE_KEY) is None:
        return None
    scopes = name_scopes(proto)
    known = signature.parameters if signature else {}
    names = [_dotted(p, "", scopes, known) for p in _read_placeholders(proto)]
    return None if any(n is None for n in names) else [n for n in names if n is not None]


def _reads(
    initializer: str, proto: NodeProto, known: Mapping[str, str], folded_from: str | None
) -> str | None:
    """Which source parameter `initializer` stands for in this node, or None if unclear.
    `folded_from`: the one source parameter the optimizer folded it from, when it says so."""
    placeholders = _read_placeholders(proto)
    if _placeholder(initializer) in placeholders:
        return initializer
    if EXPORTER_VALUE_NAME.fullmatch(initializer) and folded_from:
        # the same attribute as its source (`1.n1.weight` → this GroupNorm's `weight`)
        attribute = _placeholder(folded_from.rsplit(".", 1)[-1])[2:]
        matched = [p for p in placeholders if p.endswith("_" + attribute)]
    elif EXPORTER_VALUE_NAME.fullmatch(initializer):
        # a folded weight: aten.linear's (it reads input, weight, bias), else the op's only
        # weight (`weight`, `in_proj_weight`, `weight_hh_l0`)
        linear = _LINEAR_WEIGHT.search(_metadata(proto, FX_NODE_KEY) or "")
        matched = [linear[1]] if linear else [p for p in placeholders if "weight" in p]
    else:
        attribute = _placeholder(initializer.rsplit(".", 1)[-1])[2:]
        matched = [p for p in placeholders if p.endswith("_" + attribute)]
        if not matched and len(placeholders) == 1:
            # another attribute merged with it (ConvNeXt V2's GRN: weight and bias both start
            # as zeros), read by an op of that one parameter alone (`x + bias`)
            matched = placeholders
        elif not matched:
            # read as another attribute's bias: the written-out steps of an nn.RNN read
            # `bias_hh_l0` as `linear(h, weight_hh_l0, bias_hh_l0)`'s, merged with an equal
            # `bias_ih_l0` (both zeros)
            matched = _linear_bias(initializer, proto)
    if len(matched) != 1:
        return None
    return _dotted(matched[0], initializer, name_scopes(proto), known)


def _linear_bias(initializer: str, proto: NodeProto) -> list[str]:
    """[the placeholder of the bias] when the node reads `initializer` as the bias of the
    `aten.linear` or `aten.addmm` it comes from (the Add after its MatMul, or a Gemm's C);
    else empty."""
    fx_node = _metadata(proto, FX_NODE_KEY) or ""
    positions = [k for op, k in _BIASED_PRODUCTS.items() if op in fx_node]
    arguments = _fx_positional_arguments(proto) or []
    if len(positions) != 1 or positions[0] >= len(arguments):
        return []
    inputs = list(proto.input)
    as_bias = proto.op_type == "Add" or (
        proto.op_type == "Gemm" and inputs[2:3] == [initializer] and initializer not in inputs[:2]
    )
    bias = arguments[positions[0]]
    placeholder = bias[1:] if bias.startswith("%") else ""
    if not as_bias or not _PARAMETER_PLACEHOLDER.fullmatch(placeholder):
        return []
    return [placeholder]


Reads = list[tuple[Node, int]]  # (node, input slot) pairs reading one value
_ELEMENTWISE = frozenset({"Mul", "Add", "Sub", "Div", "PRelu"})
# FX ops a Gemm with a bias comes from: linear(x, W, b) and addmm(b, x, W); a Conv: conv*(x, W, b)
# → the position of the bias among the op's arguments
_BIASED_PRODUCTS = {"aten.linear.": 2, "aten.addmm.": 0}
_BIASED_CONVOLUTIONS = {
    op: 2 for op in ("aten.conv1d.", "aten.conv2d.", "aten.conv3d.", "aten.convolution.")
}
_GROUP_NORMS = ("aten.group_norm.", "aten.native_group_norm.")


def _reads_a_decomposition_constant(node: Node, slot: int) -> bool:
    """The scale or bias of the InstanceNormalization that `aten.group_norm` exports as: ones
    and zeros of the group count (the affine weight and bias follow as Mul and Add), which
    the optimizer merges with a parameter of equal values when groups == channels."""
    return (
        node.op_type == "InstanceNormalization"
        and slot in (1, 2)
        and isinstance(node.source, NodeProto)
        and any(op in (fx_node_text(node.source) or "") for op in _GROUP_NORMS)
    )


def _reads_no_fx_value(initializer: str, node: Node) -> bool:
    """Whether the node's FX op read nothing the initializer could be (every value it read is
    another input of the node): the initializer stands for a constant the exporter added, merged
    by the optimizer with an equal parameter (the ones scale of an affine-free LayerNorm,
    `layer_norm(%x, [16], None, None)`, with a fresh norm's weight)."""
    proto = node.source
    return isinstance(proto, NodeProto) and _unmatched_fx_arguments(initializer, proto) == []


def _reads_an_exporter_constant(initializer: str, node: Node, slot: int) -> bool:
    return _reads_a_decomposition_constant(node, slot) or _reads_no_fx_value(initializer, node)


def _scales_elementwise(tensor: torch.Tensor, reads: Reads) -> bool:
    """A vector in a broadcasting shape ([C, 1, 1]: one dimension not 1) read only by
    elementwise ops: a normalisation's weight or bias, or PReLU's slope, folded into that
    shape."""
    return (
        tensor.dim() >= 2
        and sum(d != 1 for d in tensor.shape) <= 1
        and all(node.op_type in _ELEMENTWISE for node, _ in reads)
    )


def restore_source_parameters(
    nodes: Sequence[Node],
    parameters: MutableMapping[str, torch.Tensor],
    taken: Mapping[str, object],
    folded_from: Mapping[str, list[str]],
    signature: ExportedSignature | None = None,
    transposed_from: Mapping[str, str] | None = None,
) -> tuple[list[Node], Restored]:
    """Split merged initializers, turn folded transposes back into the source's weights and
    restore dropped zero biases (module docstring). `parameters`: the graph's trainable
    tensors by value name (entries are added and removed); `taken`: every other value name in
    use, never reused for a restored parameter; `folded_from`: `folded_parameter_sources`;
    `signature`: the export's, which names each placeholder; `transposed_from`:
    `folded_transposes`.
    Returns the nodes, with a `Transpose` or `Reshape` ahead of each reader of a folded
    weight, and what changed."""
    transposed_from = transposed_from or {}
    known = {
        **(signature.parameters if signature else {}),
        **{_placeholder(name): name for name in parameters},
    }
    nodes = _one_per_module(nodes, parameters, _Tracing(known, _consumers(nodes)))
    readers: dict[str, Reads] = {}
    for node in nodes:
        for slot, name in enumerate(node.inputs):
            if name in parameters:
                readers.setdefault(name, []).append((node, slot))
    tracing = _Tracing(known, _consumers(nodes))
    restoring = _Restoring(parameters, set(parameters) | set(taken))
    for initializer, reads in readers.items():
        if initializer in transposed_from:  # every reader reads the one source's transpose
            restoring.untranspose(initializer, {transposed_from[initializer]: reads})
            continue
        sources = folded_from.get(initializer, [])
        constant_reads = [
            (n, s) for n, s in reads if _reads_an_exporter_constant(initializer, n, s)
        ]
        if constant_reads:
            restoring.constant(initializer, constant_reads)
            reads = [read for read in reads if read not in constant_reads]
        groups = tracing.grouped_by_source(initializer, reads, sources)
        if groups is None:
            continue
        if not EXPORTER_VALUE_NAME.fullmatch(initializer):
            restoring.split(initializer, groups)
            if sources:  # equal values computed ahead, each its own again: from what
                restoring.computed_ahead(initializer, groups, sources, tracing)
        elif len(sources) == 1 and _scales_elementwise(parameters[initializer], reads):
            restoring.unreshape(initializer, groups)
        elif (perm := _indexed_permutation(reads, groups, parameters[initializer].dim())) and (
            perm == sorted(perm)
        ):  # an identity Transpose folded: the source parameter's own values
            restoring.uncopy(initializer, groups, perm)
        else:
            restoring.untranspose(initializer, groups)
    for node in nodes:
        restoring.zero_bias(node, known)
    before = restoring.before
    return [t for node in nodes for t in [*before.get(id(node), []), node]], restoring.restored


_INDEXING = ("aten.index.Tensor", "aten._unsafe_index.Tensor")


def _indexed_permutation(reads: Reads, groups: Mapping[str, Reads], rank: int) -> list[int] | None:
    """The permutation an `aten.index` (`w[idx]`, `w[:, idx]`) transposes its weight by before
    the GatherND of its decomposition (torchlib's `_aten_index_onnx`: the indexed dimensions
    first), which the optimizer folds into a new initializer, when `reads` are those of one
    source parameter (`groups`) and each is the GatherND's data of an FX op indexing that
    parameter's placeholder; else None."""
    if len(groups) != 1:
        return None
    placeholder = "%" + _placeholder(next(iter(groups)))
    perms = []
    for node, slot in reads:
        proto = node.source
        if node.op_type != "GatherND" or slot != 0 or not isinstance(proto, NodeProto):
            return None
        fx_node = fx_node_text(proto) or ""
        arguments = _fx_positional_arguments(proto) or []
        if not any(op in fx_node for op in _INDEXING) or len(arguments) != 2:
            return None
        indices = [i.strip() for i in arguments[1].strip("[]").split(",")]
        if arguments[0] != placeholder or not 0 < len(indices) <= rank:
            return None
        order = sorted(range(len(indices)), key=lambda k: (indices[k] == "None", k))
        perms.append([*order, *range(len(indices), rank)])
    return perms[0] if perms and all(p == perms[0] for p in perms) else None


def _made_by_the_optimizer(node: Node) -> bool:
    """An ONNX node that records no FX op: one the optimizer made (its Split of a
    SplitToSequence and the SequenceAt that read it)."""
    return isinstance(node.source, NodeProto) and fx_node_text(node.source) is None


def _recorded_scopes(node: Node) -> list[str] | None:
    """The module scopes the exporter recorded for the node's FX op; None where it recorded
    no FX op."""
    proto = node.source
    if not isinstance(proto, NodeProto) or fx_node_text(proto) is None:
        return None
    return name_scopes(proto)


def _consumers(nodes: Sequence[Node]) -> dict[str, list[Node]]:
    """The nodes that read each value."""
    found: dict[str, list[Node]] = {}
    for node in nodes:
        for name in dict.fromkeys(node.inputs):
            found.setdefault(name, []).append(node)
    return found


def _common_prefix(lists: Sequence[Sequence[str]]) -> list[str]:
    prefix: list[str] = []
    for entries in zip(*lists, strict=False):
        if any(e != entries[0] for e in entries):
            break
        prefix.append(entries[0])
    return prefix


@dataclass
class _Tracing:
    """What tells which source value each read of an initializer stands for: the export's
    parameter names (`known`: placeholder → name) and each value's readers."""

    known: Mapping[str, str]
    consumers: Mapping[str, list[Node]]

    def grouped_by_source(
        self, initializer: str, reads: Reads, sources: Sequence[str]
    ) -> dict[str, Reads] | None:
        """The reads of `initializer` by the source value each stands for: a parameter's name,
        or for a value computed ahead (`sources`: what it was folded from) the FX value; None
        when any read is unclear."""
        single = sources[0] if len(sources) == 1 else None
        computed_ahead = bool(sources) and not EXPORTER_VALUE_NAME.fullmatch(initializer)
        groups: dict[str, Reads] = {}
        for node, slot in reads:
            proto = node.source
            if not isinstance(proto, NodeProto):
                return None
            if computed_ahead:
                source = _fx_value_read_as(initializer, proto)
            elif _made_by_the_optimizer(node):
                source = self._read_downstream(initializer, node)
            else:
                source = _reads(initializer, proto, self.known, single)
            if source is None:
                return None
            groups.setdefault(source, []).append((node, slot))
        return groups

    def _read_downstream(self, initializer: str, node: Node) -> str | None:
        """The parameter a node the optimizer made (no FX op recorded: the Split it makes of
        a SplitToSequence and its SequenceAt, cross-attention's split of its in-projection
        bias into q and k/v) reads as `initializer`: the parameter of the same attribute in
        the innermost module every node downstream of it runs in."""
        if EXPORTER_VALUE_NAME.fullmatch(initializer):
            return None
        scopes = self.scopes_downstream(node)
        if not scopes:
            return None
        attribute = initializer.rsplit(".", 1)[-1]
        name = f"{scopes[-1]}.{attribute}" if scopes[-1] else attribute
        return name if name in set(self.known.values()) else None

    def scopes_downstream(self, node: Node) -> list[str]:
        """The module scopes shared by the first nodes downstream of `node` that recorded
        theirs, outermost first; empty when none did."""
        found: list[list[str]] = []
        pending, seen = list(node.outputs), {id(node)}
        while pending:
            for reader in self.consumers.get(pending.pop(), []):
                if id(reader) in seen:
                    continue
                seen.add(id(reader))
                scopes = _recorded_scopes(reader)
                if scopes is None:
                    pending.extend(reader.outputs)
                else:
                    found.append(scopes)
        return _common_prefix(found) if found else []

    def modules_downstream(self, node: Node) -> dict[str, list[Node]] | None:
        """The nodes reading `node`'s outputs by the innermost module each runs in (or, for
        one the optimizer made, that the nodes downstream of it share); None when one runs in
        none the exporter recorded."""
        found: dict[str, list[Node]] = {}
        readers = {id(r): r for out in node.outputs for r in self.consumers.get(out, [])}
        for reader in readers.values():
            scopes = _recorded_scopes(reader)
            scopes = self.scopes_downstream(reader) if scopes is None else scopes
            if not scopes:
                return None
            found.setdefault(scopes[-1], []).append(reader)
        return found

    def scopes_of(self, reads: Reads) -> list[str]:
        """The module scopes every node of `reads` runs in, outermost first."""
        return _common_prefix([_recorded_scopes(node) or [] for node, _ in reads])


def _one_per_module(
    nodes: Sequence[Node], parameters: Mapping[str, torch.Tensor], tracing: _Tracing
) -> list[Node]:
    """Each node the optimizer made (no FX op recorded) that reads a parameter and feeds
    several modules, once per module: its common-subexpression elimination leaves one Split of
    a bias that two decoder layers' cross-attentions each split (their biases equal, so
    merged), and each copy can then read its own layer's parameter again."""
    copies: dict[int, list[Node]] = {}
    used = {out for node in nodes for out in node.outputs}
    for node in nodes:
        if not _made_by_the_optimizer(node) or not any(n in parameters for n in node.inputs):
            continue
        modules = tracing.modules_downstream(node)
        for module, readers in list((modules or {}).items())[1:]:
            outputs = [_unused(f"{out}::{module}", used) if out else out for out in node.outputs]
            used.update(outputs)
            copy = Node(
                name=f"{node.name}::{module}",
                op_type=node.op_type,
                inputs=list(node.inputs),
                outputs=outputs,
                fn=node.fn,
                domain=node.domain,
                attrs=dict(node.attrs),
                source=node.source,
                scope=node.scope,
            )
            copies.setdefault(id(node), []).append(copy)
            renamed = dict(zip(node.outputs, outputs, strict=True))
            for reader in readers:
                reader.inputs = [renamed.get(name, name) for name in reader.inputs]
    return [n for node in nodes for n in [*copies.get(id(node), []), node]]


def _sources_by_analogy(
    sources: Sequence[str], own: Sequence[str], other: Sequence[str], names: set[str]
) -> list[str]:
    """The source parameters of a value merged into one computed ahead from `sources` in
    module scopes `own`, read in module scopes `other` (`layers.0.A_log`, read in
    `layers.0`, → `layers.1.A_log` for a reader in `layers.1`): each source under the other's
    module at the same depth; empty unless every one is a parameter of the export (`names`)."""
    found = []
    for source in sources:
        pairs = [
            (mine, theirs)
            for mine, theirs in zip(own, other, strict=False)
            if mine and mine != theirs and source.startswith(mine + ".")
        ]
        if not pairs:
            return []
        mine, theirs = pairs[-1]
        found.append(theirs + source[len(mine) :])
    return found if all(name in names for name in found) else []


@dataclass
class _Derivation:
    """How a folded initializer follows from its source parameter: the op its readers run
    again (`fn`, as `op_type` with `attrs`) and its inverse (`to_source`)."""

    op_type: str
    to_source: Callable[[torch.Tensor], torch.Tensor]
    fn: Callable[[torch.Tensor], torch.Tensor]
    attrs: dict[str, Any]


@dataclass
class _Restoring:
    """The parameters being restored, the value names in use, what changed, and the
    Transposes to run just before a reader (by reader node id)."""

    parameters: MutableMapping[str, torch.Tensor]
    used: set[str]
    restored: Restored = field(default_factory=Restored)
    before: dict[int, list[Node]] = field(default_factory=dict)
    # each value a restored node derives again → the folded tensor it stands for
    derived: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.parameters[name] = torch.nn.Parameter(tensor)
        self.used.add(name)

    def untranspose(self, initializer: str, groups: Mapping[str, Reads]) -> None:
        """A folded `Transpose(weight)`: the weight becomes a parameter again, in its source
        shape (or, when the graph has it already, the parameter it is tied to), and each
        reader of the folded tensor reads its own `Transpose` of it, as an unoptimised export
        has it."""
        if self.parameters[initializer].dim() == 2:
            transpose = _Derivation("Transpose", torch.t, torch.t, {"perm": [1, 0]})
            if self._rederive(initializer, groups, transpose):
                self.restored.transposed[initializer] = next(iter(groups))

    def unreshape(self, initializer: str, groups: Mapping[str, Reads]) -> None:
        """A folded reshape of a vector (a GroupNorm's weight as [C, 1, 1] for its Mul), maybe
        merged across layers: one vector parameter per source again, each reader reading its
        own `Reshape` of it."""
        shape = tuple(self.parameters[initializer].shape)
        reshape = _Derivation("Reshape", torch.flatten, lambda w: w.reshape(shape), {})
        if self._rederive(initializer, groups, reshape):
            self.restored.reshaped[initializer] = next(iter(groups))
            if len(groups) > 1:
                self.restored.split[initializer] = list(groups)[1:]

    def uncopy(self, initializer: str, groups: Mapping[str, Reads], perm: list[int]) -> None:
        """A folded copy of a weight (an `aten.index` of `w[idx]` transposes it by the
        identity permutation first): the weight becomes a parameter again, each reader
        reading its own identity `Transpose` of it, as an unoptimised export has it."""
        identity = _Derivation("Transpose", lambda w: w, lambda w: w, {"perm": perm})
        if self._rederive(initializer, groups, identity):
            self.restored.copied[initializer] = next(iter(groups))

    def _rederive(
        self, initializer: str, groups: Mapping[str, Reads], derivation: _Derivation
    ) -> bool:
        """Each source parameter of `groups` from the folded tensor (`derivation.to_source`;
        one already in the graph must hold those values: a tie), the folded tensor gone, and
        each reader reading its own node that derives it again (`derivation.fn`)."""
        folded = self.parameters[initializer]
        with torch.no_grad():
            source_values = derivation.to_source(folded)
        for source in groups:
            if source in self.parameters:  # tied: the same values, or not the same parameter
                weight = self.parameters[source]
                with torch.no_grad():
                    if weight.shape != source_values.shape or not torch.equal(
                        weight, source_values
                    ):
                        return False
            elif source in self.used:
                return False
        del self.parameters[initializer]
        for source, reads in groups.items():
            if source not in self.parameters:
                self.add(source, source_values.contiguous().clone())
            else:
                self.restored.tied.append(source)
            for k, (node, slot) in enumerate(reads):
                value = f"{initializer}::{source}.{derivation.op_type}{k}"
                derived = Node(
                    name=value,
                    op_type=derivation.op_type,
                    inputs=[source],
                    outputs=[value],
                    fn=derivation.fn,
                )
                derived.attrs.update(derivation.attrs)
                self.before.setdefault(id(node), []).append(derived)
                self.derived[value] = folded
                _rewire([(node, slot)], value)
        return True

    def split(self, initializer: str, groups: Mapping[str, Reads]) -> None:
        """A merged initializer: the source parameters its readers read under other names
        become parameters of their own (clones of it)."""
        if initializer not in groups:
            return  # a source name read only under other names: nothing says which is right
        if any(s != initializer and s in self.used for s in groups):
            return  # a restored name would collide with a value of the graph
        tensor = self.parameters[initializer]
        for source, reads in groups.items():
            if source == initializer:
                continue
            self.add(source, tensor.detach().clone())
            _rewire(reads, source)
            self.restored.split.setdefault(initializer, []).append(source)

    def computed_ahead(
        self, initializer: str, groups: Mapping[str, Reads], sources: list[str], tracing: _Tracing
    ) -> None:
        """What each value split out of one computed ahead (`split`) was computed from: the
        same parameters of the module its readers run in, as far as the export names them."""
        added = self.restored.split.get(initializer, [])
        if not added:
            return
        self.restored.folded_from[initializer] = sources
        own = tracing.scopes_of(groups[initializer])
        names = set(tracing.known.values())
        for value in added:
            other = tracing.scopes_of(groups[value])
            self.restored.folded_from[value] = _sources_by_analogy(sources, own, other, names)

    def constant(self, initializer: str, reads: Reads) -> None:
        """`reads` of a parameter are an exporter's constant of equal values: each reads a
        copy of it that is no parameter (`constants`)."""
        name = _unused(f"{initializer}.constant", self.used)
        self.used.add(name)
        self.restored.constants[name] = self.parameters[initializer].detach().clone()
        _rewire(reads, name)

    def zero_bias(self, node: Node, known: Mapping[str, str]) -> None:
        """A Gemm from `aten.linear` or `aten.addmm` (GPT-2's Conv1D), or a Conv, whose bias
        input the optimizer dropped because it was all zeros (a fresh attention
        out-projection's, a ViT's patch embedding's): the bias comes back as a zero
        parameter, one for every Gemm or Conv whose FX op read it (a layer called twice)."""
        ops = {"Gemm": _BIASED_PRODUCTS, "Conv": _BIASED_CONVOLUTIONS}.get(node.op_type)
        if ops is None or not isinstance(node.source, NodeProto):
            return
        # the weight: a parameter, or a folded one its restored Transpose derives again
        weight = self.parameters.get(node.inputs[1], self.derived.get(node.inputs[1]))
        if (len(node.inputs) > 2 and node.inputs[2]) or weight is None:
            return
        fx_node = _metadata(node.source, FX_NODE_KEY) or ""
        arguments = _fx_positional_arguments(node.source) or []
        # the bias is the op's argument at its place, whatever the parameter is called (a
        # standalone `F.linear(x, w, b)`'s `b`)
        positions = [k for op, k in ops.items() if op in fx_node]
        if len(positions) != 1 or positions[0] >= len(arguments):
            return
        bias = arguments[positions[0]]
        if not bias.startswith("%") or not _PARAMETER_PLACEHOLDER.fullmatch(bias[1:]):
            return
        name = _dotted(bias[1:], node.inputs[1], name_scopes(node.source), known)
        if name is None or node.attrs.get("transA", 0):
            return
        transposed = node.op_type == "Gemm" and not node.attrs.get("transB", 0)
        features = weight.shape[-1] if transposed else weight.shape[0]
        if name in self.parameters:  # read elsewhere too, or restored for another Gemm
            existing = self.parameters[name]
            if existing.shape != (features,) or bool(existing.detach().any()):
                return
        elif name in self.used:
            return
        else:
            self.add(name, weight.detach().new_zeros(features))
            self.restored.zero_biases.append(name)
        node.inputs = [*node.inputs[:2], name]


def _unused(name: str, used: set[str]) -> str:
    candidate, count = name, 1
    while candidate in used:
        count += 1
        candidate = f"{name}_{count}"
    return candidate


def _rewire(reads: Sequence[tuple[Node, int]], name: str) -> None:
    for node, slot in reads:
        node.inputs = [name if i == slot else v for i, v in enumerate(node.inputs)]

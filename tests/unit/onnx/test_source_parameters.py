"""The dynamo exporter's optimizer merges equal initializers, folds `Transpose(weight)` into
`val_N` initializers and drops all-zero Gemm biases; the converter restores the source module's
parameters from the export's metadata (service/engine/onnx/source_parameters.py), so every
parameter of a `torch.onnx.export(..., dynamo=True)` file has its source name and shape and
reports its own gradient."""

from __future__ import annotations

import functools

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from service.engine.graph import ObservableGraph
from service.engine.onnx.conformance import check_conversion
from service.engine.onnx.convert import convert
from service.engine.onnx.source_parameters import FX_NODE_KEY
from tests.support.export import to_onnx


class Encoder(nn.Module):
    """`nn.TransformerEncoder` deep-copies its layer: both layers start as the same tensors,
    and LayerNorm weights (ones) and biases (zeros) are equal across layers too."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x))


class Tied(nn.Module):
    """Input and output embedding share one tensor: it must stay one parameter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.mid = nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.mid(self.emb(ids))), self.emb.weight)


X = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(1))


@functools.cache
def _exported(kind: str) -> tuple[nn.Module, bytes]:
    module: nn.Module = Encoder() if kind == "encoder" else Tied()
    example = X if kind == "encoder" else IDS
    # optimize=True: what `torch.onnx.export(..., dynamo=True)` does by default
    return module, to_onnx(module, example, dynamo=True, optimize=True)


def _gradients(module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    module.zero_grad()
    module(x).square().mean().backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _graph_gradients(graph: ObservableGraph, x: torch.Tensor) -> dict[str, torch.Tensor]:
    graph.run([x])[0].square().mean().backward()
    return {n: p.grad for n, p in graph.named_graph_parameters() if p.grad is not None}


def test_the_optimizer_did_merge_fold_and_drop() -> None:
    """The premise: without the restore the file's initializers are not the module's."""
    module, exported = _exported("encoder")
    names = {i.name for i in onnx.load_from_string(exported).graph.initializer}
    source = {n for n, _ in module.named_parameters()}
    assert "enc.layers.1.norm1.weight" not in names  # merged into layer 0's
    assert any(name.startswith("val_") for name in names)  # folded transposes
    assert "enc.layers.0.self_attn.out_proj.bias" not in names  # zeros, dropped
    assert len(source - names) >= 10


def test_every_source_parameter_is_back_with_its_own_gradient() -> None:
    module, exported = _exported("encoder")
    graph = convert(onnx.load_from_string(exported))
    expected = _gradients(module, X)
    ours = _graph_gradients(graph, X)
    assert set(ours) == set(expected)
    for name, grad in expected.items():
        assert torch.allclose(ours[name], grad, rtol=2e-3, atol=1e-6), name
    notes = " ".join(graph.metadata["notes"])
    assert "merged parameters with identical values" in notes and "also stood for" in notes
    assert "= enc.layers.0.linear1.weightᵀ" in notes
    assert "enc.layers.0.self_attn.out_proj.bias" in notes


def test_onnxruntime_still_gets_the_folded_weights() -> None:
    _, exported = _exported("encoder")
    model = onnx.load_from_string(exported)
    graph = convert(model)  # releases the proto's weights: the check refills them
    assert graph.metadata["transposed_initializers"]
    check = check_conversion(model, graph, [X])
    assert check.checked and check.max_abs_error is not None
    assert check.max_abs_error < 1e-5, check


def test_tied_weights_stay_one_parameter() -> None:
    module, exported = _exported("tied")
    graph = convert(onnx.load_from_string(exported))
    names = [n for n, _ in graph.named_graph_parameters()]
    assert names.count("emb.weight") == 1
    expected = _gradients(module, IDS)
    ours = _graph_gradients(graph, IDS)
    assert torch.allclose(ours["emb.weight"], expected["emb.weight"], rtol=2e-3, atol=1e-7)
    assert "storing a transposed copy (emb.weight)" in " ".join(graph.metadata["notes"])


def test_without_the_exporters_metadata_nothing_is_invented() -> None:
    _, exported = _exported("encoder")
    model = onnx.load_from_string(exported)
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key != FX_NODE_KEY]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    graph = convert(model)
    names = {n for n, _ in graph.named_graph_parameters()}
    assert names == {i.name for i in model.graph.initializer} & names
    assert "enc.layers.1.norm1.weight" not in names
    assert "transposed_initializers" not in graph.metadata


class SlicedPositions(nn.Module):
    """`pos[:, :T]`: the optimizer computes the slice ahead into a constant of its own name."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pos = nn.Parameter(torch.randn(1, 6, 16) * 0.1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x + self.pos[:, : x.shape[1]])


def test_a_parameter_computed_ahead_by_the_optimizer_names_its_source() -> None:
    exported = to_onnx(SlicedPositions(), X[:, :6], dynamo=True, optimize=True)
    graph = convert(onnx.load_from_string(exported))
    names = {n for n, _ in graph.named_graph_parameters()}
    assert "pos" not in names  # what the file holds is the computed slice
    (note,) = [n for n in graph.metadata["notes"] if "computed some parameters ahead" in n]
    assert "from pos" in note and "optimize=False" in note


class GroupNormBlocks(nn.Module):
    """GroupNorm exports as InstanceNormalization then Mul/Add by its weight and bias, which
    the optimizer folds into [C, 1, 1] initializers, merged across layers (all ones/zeros)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.norm1, self.norm2 = nn.GroupNorm(2, 8), nn.GroupNorm(2, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.silu(self.norm1(self.conv1(x)))
        return nn.functional.silu(self.norm2(self.conv2(h)))


IMAGES = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))


def test_a_folded_and_merged_normalisation_vector_is_each_layers_parameter_again() -> None:
    module = GroupNormBlocks()
    exported = to_onnx(module, IMAGES, dynamo=True, optimize=True)
    model = onnx.load_from_string(exported)
    assert any(i.name.startswith("val_") and len(i.dims) == 3 for i in model.graph.initializer)
    graph = convert(model)
    expected = _gradients(module, IMAGES)
    ours = _graph_gradients(graph, IMAGES)
    assert set(ours) == set(expected)
    for name, grad in expected.items():
        assert ours[name].shape == grad.shape, name
        assert torch.allclose(ours[name], grad, rtol=2e-3, atol=1e-6), name
    assert any("stored reshaped" in note for note in graph.metadata["notes"])
    check = check_conversion(model, graph, [IMAGES])  # weights released: refilled, reshaped
    assert check.checked and check.max_abs_error is not None and check.max_abs_error < 1e-5


class Conv1D(nn.Module):
    """GPT-2's linear layer: `addmm(bias, x, weight)`, the bias zeros when fresh."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.reshape(*x.shape[:-1], -1)


class HuggingFaceStyleBlock(nn.Module):
    """What transformers' models do that nn.TransformerEncoder does not: a module attribute
    with capitals (`LayerNorm`: torch.export lower-cases its placeholder), GPT-2's Conv1D,
    rotary tables computed from a non-persistent `inv_freq` buffer, and a causal mask built
    from `arange` and `finfo.min`; the optimizer folds the last two into initializers."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.LayerNorm = nn.LayerNorm(d)
        self.c_attn, self.c_proj = Conv1D(d, 3 * d), Conv1D(d, d)
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(0, d, 2) / d), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.arange(x.shape[1], dtype=torch.float32)
        angles = torch.outer(t, self.inv_freq)
        rotary = torch.cat([angles.cos(), angles.sin()], dim=-1)
        q, k, v = self.c_attn(self.LayerNorm(x)).split(x.shape[-1], dim=-1)
        scores = (q + rotary) @ (k + rotary).transpose(1, 2) / x.shape[-1] ** 0.5
        positions = torch.arange(x.shape[1])
        causal = positions[None, :] <= positions[:, None]
        mask = torch.where(causal, 0.0, torch.finfo(torch.float32).min)
        return x + self.c_proj((scores + mask).softmax(-1) @ v)


class HuggingFaceStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.ModuleList([HuggingFaceStyleBlock(), HuggingFaceStyleBlock()])
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            x = block(x)
        return self.head(x)


def test_hugging_face_style_names_biases_and_folded_tables_come_back_right() -> None:
    module = HuggingFaceStyle()
    model = onnx.load_from_string(to_onnx(module, X, dynamo=True, optimize=True))
    initializers = {i.name for i in model.graph.initializer}
    assert "layer.1.LayerNorm.weight" not in initializers  # merged into layer 0's
    assert "layer.0.c_proj.bias" not in initializers  # zeros: dropped from the Gemm
    graph = convert(model)
    expected = _gradients(module, X)
    ours = _graph_gradients(graph, X)
    # the rotary tables and the mask are no parameters; every parameter has its own gradient
    assert set(ours) == set(expected)
    for name, grad in expected.items():
        assert torch.allclose(ours[name], grad, rtol=2e-3, atol=1e-6), name
    assert not any("computed some parameters ahead" in n for n in graph.metadata["notes"])


def test_a_buffer_left_in_a_dynamic_shape_export_is_no_parameter() -> None:
    """With a dynamic sequence length nothing folds the rotary tables: `inv_freq` stays an
    initializer, which the export's signature names a buffer."""
    module = HuggingFaceStyle()
    seq = torch.export.Dim("seq", min=2, max=32)
    exported = to_onnx(module, X, dynamo=True, optimize=True, dynamic_shapes={"x": {1: seq}})
    model = onnx.load_from_string(exported)
    assert "layer.0.inv_freq" in {i.name for i in model.graph.initializer}
    graph = convert(model)
    longer = torch.randn(4, 9, 16, generator=torch.Generator().manual_seed(5))
    assert set(_graph_gradients(graph, longer)) == set(_gradients(module, longer))


class AudioFrontEnd(nn.Module):
    """wav2vec2's feature encoder: a conv whose zero bias the optimizer drops, then a GroupNorm
    with one group per channel, exported as InstanceNormalization to ones and zeros that the
    optimizer merges with the equal LayerNorm weight and bias."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(1, 8, 5, stride=2, bias=False)
        self.conv.bias = nn.Parameter(torch.zeros(8))  # fresh HF convs: zero biases
        self.group_norm = nn.GroupNorm(8, 8)
        self.layer_norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.group_norm(self.conv(audio[:, None])))
        return self.head(self.layer_norm(h.transpose(1, 2)))


def test_a_dropped_conv_bias_and_a_group_norms_own_constants_are_told_apart() -> None:
    module = AudioFrontEnd()
    audio = torch.randn(3, 40, generator=torch.Generator().manual_seed(4))
    model = onnx.load_from_string(to_onnx(module, audio, dynamo=True, optimize=True))
    initializers = {i.name for i in model.graph.initializer}
    assert "conv.bias" not in initializers and "group_norm.weight" not in initializers
    graph = convert(model)
    expected = _gradients(module, audio)
    ours = _graph_gradients(graph, audio)
    assert set(ours) == set(expected)
    for name, grad in expected.items():  # group_norm.weight's once, not also as the constant
        assert torch.allclose(ours[name], grad, rtol=2e-3, atol=1e-6), name


class MatmulByTranspose(nn.Module):
    """Falcon's style: `x @ w.T` (an FX `permute`) and `x @ w.t()` (a `t`): the optimizer
    folds each transpose into an initializer named after that FX node, not `val_N`."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Parameter(torch.randn(24, 16) / 4)
        self.down = nn.Parameter(torch.randn(8, 24) / 5)
        self.gate = nn.Parameter(torch.randn(24, 16) / 4)  # exp(gate)ᵀ: computed, no transpose

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ self.up.T) * (x @ self.gate.exp().T)
        return h @ self.down.t()


def test_a_transpose_folded_under_its_fx_name_is_the_source_weight_again() -> None:
    module, x = MatmulByTranspose(), torch.randn(4, 16)
    model = onnx.load_from_string(to_onnx(module, x, dynamo=True, optimize=True))
    names = {i.name for i in model.graph.initializer}
    assert "up" not in names and "down" not in names  # the premise: folded, renamed
    graph = convert(model)
    assert {"up", "down"} <= set(graph.param_names)
    out = graph(x)
    torch.testing.assert_close(out, module(x))
    out.square().sum().backward()
    module(x).square().sum().backward()
    ours = dict(graph.named_graph_parameters())
    for name in ("up", "down"):
        assert ours[name].shape == getattr(module, name).shape
        torch.testing.assert_close(
            ours[name].grad, getattr(module, name).grad, rtol=1e-4, atol=1e-5
        )
    assert "gate" not in graph.param_names  # exp(gate)ᵀ is computed ahead, not a transpose


class ParallelBlock(nn.Module):
    """GPT-NeoX's parallel residual: two LayerNorms of one input. Freshly initialised they
    are the same computation, which the optimizer merges into one node; `spare` is unused."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ln_attn, self.ln_mlp = nn.LayerNorm(16), nn.LayerNorm(16)
        self.attn, self.mlp = nn.Linear(16, 16), nn.Linear(16, 16)
        self.spare = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.ln_attn(x)) + torch.relu(self.mlp(self.ln_mlp(x)))


def test_source_parameters_the_graph_does_not_read_are_named_in_a_note() -> None:
    model = onnx.load_from_string(
        to_onnx(ParallelBlock(), torch.randn(2, 16), dynamo=True, optimize=True)
    )
    graph = convert(model)
    missing = {"ln_mlp.weight", "ln_mlp.bias", "spare.weight", "spare.bias"}
    assert not missing & set(graph.param_names)  # the premise: merged away, or unused
    (note,) = [n for n in graph.metadata["notes"] if "not read by the exported graph" in n]
    assert note.startswith(
        "4 parameter(s) of the source model (ln_mlp.bias, ln_mlp.weight, spare.bias, "
        "spare.weight) are not read"
    )


class GlobalResponseNorm(nn.Module):
    """ConvNeXt V2's GRN: its weight and bias both start as zeros, so the optimizer merges
    the two attributes into one initializer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 8)
        self.weight = nn.Parameter(torch.zeros(1, 1, 8))
        self.bias = nn.Parameter(torch.zeros(1, 1, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        norm = h.norm(p=2, dim=1, keepdim=True)
        h = self.weight * (h * (norm / (norm.mean(dim=-1, keepdim=True) + 1e-6))) + self.bias + h
        return self.head(h).mean(dim=1)


def test_two_attributes_merged_into_one_initializer_are_split_by_their_readers() -> None:
    module, x = GlobalResponseNorm(), torch.randn(2, 5, 8)
    model = onnx.load_from_string(to_onnx(module, x, dynamo=True, optimize=True))
    assert not {"weight", "bias"} <= {i.name for i in model.graph.initializer}  # merged
    graph = convert(model)
    assert {"weight", "bias"} <= set(graph.param_names)
    graph(x).square().sum().backward()
    module(x).square().sum().backward()
    ours = dict(graph.named_graph_parameters())
    for name in ("weight", "bias"):
        torch.testing.assert_close(ours[name].grad, getattr(module, name).grad)


def test_an_inference_export_sharing_equal_layers_says_their_gradients_are_summed() -> None:
    """The legacy exporter stores equal initializers once in an inference-mode export: a fresh
    TransformerEncoder's deep-copied layers read the first layer's weights through Identity."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    shared = convert(onnx.load_from_string(to_onnx(encoder, x, training=False)))
    (note,) = [n for n in shared.metadata.get("notes", []) if "Identity copies" in n]
    assert "sum over its uses" in note
    apart = convert(onnx.load_from_string(to_onnx(encoder.train(), x, training=True)))
    assert not [n for n in apart.metadata.get("notes", []) if "Identity copies" in n]

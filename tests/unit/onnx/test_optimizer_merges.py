"""Equal values the dynamo exporter's optimizer merges into one initializer where the readers
that tell them apart are not the plain case of test_source_parameters.py: a merged value read
through a node the optimizer made (no FX metadata: cross-attention's Split of its
in-projection bias), an exporter constant merged with a parameter (an affine-free LayerNorm's
ones scale), a slope reshaped for broadcasting (nn.PReLU's) and a value computed ahead from
each of two layers' parameters (Mamba's `-exp(A_log)`). Each export uses the default optimizer,
as `torch.onnx.export(..., dynamo=True)` does; every source parameter must come back under its
own name and shape with torch's gradient (service/engine/onnx/source_parameters.py)."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from service.engine.graph import ObservableGraph
from service.engine.onnx.conformance import check_conversion
from service.engine.onnx.convert import convert
from tests.support.export import to_onnx


def _converted(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> ObservableGraph:
    # optimize=True: what `torch.onnx.export(..., dynamo=True)` does by default
    model = onnx.load_from_string(to_onnx(module, inputs, dynamo=True, optimize=True))
    graph = convert(model, mode="train")
    check = check_conversion(model, graph, list(inputs))  # onnxruntime's copy agrees
    assert check.checked and check.max_abs_error is not None and check.max_abs_error < 1e-4
    return graph


def _assert_same_parameters(
    module: nn.Module, graph: ObservableGraph, inputs: tuple[torch.Tensor, ...]
) -> None:
    """Every parameter of `module` is one of the graph's, same name, shape and gradient."""
    module.zero_grad()
    module(*inputs).square().mean().backward()
    graph.run(list(inputs))[0].square().mean().backward()
    ours = dict(graph.named_graph_parameters())
    theirs = dict(module.named_parameters())
    assert set(ours) == set(theirs)
    for name, parameter in theirs.items():
        grad = ours[name].grad
        assert ours[name].shape == parameter.shape, name
        assert parameter.grad is not None and grad is not None, name
        assert torch.allclose(grad, parameter.grad, rtol=2e-3, atol=1e-7), name


class CrossAttention(nn.Module):
    """Self- then cross-attention: both in-projection biases start as zeros (merged); the
    cross-attention reads its own through a Split of q from k/v the optimizer made."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a1 = nn.MultiheadAttention(16, 2, batch_first=True)
        self.a2 = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        h = x + self.a1(x, x, x, need_weights=False)[0]
        return h + self.a2(h, memory, memory, need_weights=False)[0]


def test_a_bias_merged_into_an_optimizer_made_split_is_its_own_parameter_again() -> None:
    module = CrossAttention().train()
    inputs = (torch.randn(2, 5, 16), torch.randn(2, 7, 16))
    graph = _converted(module, inputs)
    _assert_same_parameters(module, graph, inputs)
    assert "a1.in_proj_bias also stood for a2.in_proj_bias" in " ".join(graph.metadata["notes"])


class SmallTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.t = nn.Transformer(16, 2, 1, 2, 32, dropout=0.0, batch_first=True)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.t(src, tgt)


def test_every_attention_of_a_transformer_has_its_own_in_projection_bias() -> None:
    module = SmallTransformer().train()
    inputs = (torch.randn(2, 5, 16), torch.randn(2, 4, 16))
    graph = _converted(module, inputs)
    _assert_same_parameters(module, graph, inputs)


class AffineFreeNormThenNorm(nn.Module):
    """An affine-free LayerNorm exports with a constant ones scale, which the optimizer merges
    with the fresh (all-ones) weight of the norm after it."""

    def __init__(self, norm: type[nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc0 = nn.Linear(8, 16)
        self.ln_plain = nn.LayerNorm(16, elementwise_affine=False)
        self.fc1 = nn.Linear(16, 16)
        self.norm = norm(16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.fc1(self.ln_plain(self.fc0(x)))))


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm])
def test_an_exporter_constant_merged_with_a_parameter_stays_a_constant(
    norm: type[nn.Module],
) -> None:
    module = AffineFreeNormThenNorm(norm).train()
    inputs = (torch.randn(16, 8),)
    graph = _converted(module, inputs)
    _assert_same_parameters(module, graph, inputs)
    (plain,) = [n for n in graph.nodes if n.scope == "ln_plain"]
    parameters = dict(graph.named_graph_parameters())
    assert not set(plain.inputs) & set(parameters)  # its ones scale is no norm's weight


@pytest.mark.parametrize("slopes", [16, 1])
def test_a_prelu_slope_reshaped_for_broadcasting_is_the_modules_parameter(slopes: int) -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv1d(3, 16, 3, padding=1), nn.PReLU(slopes), nn.Conv1d(16, 4, 1))
    inputs = (torch.randn(4, 3, 10),)
    graph = _converted(module.train(), inputs)
    _assert_same_parameters(module, graph, inputs)


class Decay(nn.Module):
    """Mamba's state decay `-exp(A_log)`: the optimizer computes it ahead."""

    def __init__(self) -> None:
        super().__init__()
        self.A_log = nn.Parameter(torch.log(torch.arange(1, 5).float()).repeat(16, 1))
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        decay = (x.sigmoid().unsqueeze(-1) * -torch.exp(self.A_log)).exp().mean(-1)
        return x + self.fc(decay)


class Decays(nn.Module):
    """Two layers whose `A_log` start equal: their computed-ahead decays are merged too."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([Decay(), Decay()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_values_computed_ahead_and_merged_are_each_layers_own_again() -> None:
    module = Decays().train()
    inputs = (torch.randn(3, 16),)
    graph = _converted(module, inputs)
    module(*inputs).square().mean().backward()
    graph.run(list(inputs))[0].square().mean().backward()
    parameters = dict(graph.named_graph_parameters())
    (note,) = [n for n in graph.metadata["notes"] if "computed some parameters ahead" in n]
    for k, layer in enumerate(module.layers):
        assert isinstance(layer, Decay) and layer.A_log.grad is not None
        (folded,) = [name for name in parameters if f"{name} from layers.{k}.A_log" in note]
        # the file holds A = -exp(A_log): its gradient is A_log's over dA/dA_log = A
        with torch.no_grad():
            expected = layer.A_log.grad / -torch.exp(layer.A_log)
        grad = parameters[folded].grad
        assert grad is not None
        assert torch.allclose(grad, expected, rtol=2e-3, atol=1e-7), folded
    assert "A_log" not in " ".join(n for n in graph.metadata["notes"] if "not read" in n)


class TiedProduct(nn.Module):
    """An embedding tied to the output projection and also read as the product `Wᵀ W / 20`,
    which the optimizer computes ahead into an initializer of its own: the file holds no path
    from it back to the weight the graph reads."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.mid = nn.Linear(8, 8, bias=False)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight

    def product(self) -> torch.Tensor:
        return self.emb.weight.t() @ self.emb.weight / 20

    def mixed(self, ids: torch.Tensor, product: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mid(self.emb(ids)))
        return self.out(h + nn.functional.linear(h, product))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mixed(ids, self.product())


def test_a_product_computed_ahead_from_a_tied_weight_keeps_its_gradient() -> None:
    torch.manual_seed(0)
    module = TiedProduct().train()
    ids = torch.randint(0, 20, (4, 6))
    graph = _converted(module, (ids,))
    graph.run([ids])[0].square().mean().backward()
    parameters = dict(graph.named_graph_parameters())
    notes = " ".join(graph.metadata["notes"])
    (product,) = [name for name in parameters if f"{name} from out.weight" in notes]
    assert f"out.weight → {product}" in notes  # its gradient is that of the direct reads
    # torch's, with the product a value of its own as the file holds it
    folded = module.product().detach().requires_grad_()
    module.mixed(ids, folded).square().mean().backward()
    assert folded.grad is not None
    expected = {
        "out.weight": module.out.weight.grad,
        "mid.weight": module.mid.weight.grad,
        product: folded.grad.t(),  # stored transposed, for its MatMul
    }
    for name, grad in expected.items():
        ours = parameters[name].grad
        assert grad is not None and ours is not None, name
        assert torch.allclose(ours, grad, rtol=2e-3, atol=1e-7), name
    # no part is lost: ours carried back through the product add up to torch's whole gradient
    direct, ahead = parameters["out.weight"].grad, parameters[product].grad
    assert direct is not None and ahead is not None
    (whole,) = torch.autograd.grad(module(ids).square().mean(), module.emb.weight)
    (through,) = torch.autograd.grad(module.product(), module.emb.weight, ahead.t())
    assert torch.allclose(direct + through, whole, rtol=2e-3, atol=1e-7)


class TiedWithSpare(nn.Module):
    """An embedding tied to the output projection (torch.export reads both through one
    placeholder) and a module the forward pass never calls."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight
        self.spare = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(ids)))


def test_parameters_of_a_module_never_called_are_unused_not_tied() -> None:
    graph = _converted(TiedWithSpare().train(), (torch.randint(0, 20, (4, 6)),))
    (note,) = [n for n in graph.metadata["notes"] if "not read by the exported graph" in n]
    unused, tied = note.split("; the modules of ")
    assert (
        "runs in the modules of spare.bias, spare.weight: the forward pass does not call" in unused
    )
    assert "tied" not in unused
    assert tied.startswith("emb.weight run") and "tied to it" in tied and "spare" not in tied


class FunctionalZeroBias(nn.Module):
    """Standalone zero biases given to `F.conv2d` and `F.linear` (no nn.Conv2d or nn.Linear
    around them; `kb` not even named a bias): the optimizer drops them from the Conv and the
    Gemm all the same. `tied`: the last linear reads the first one's weight transposed (a tied
    autoencoder's decoder), which the optimizer folds into an initializer of its own."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tied = tied
        self.k = nn.Parameter(torch.randn(4, 2, 3, 3) * 0.3)
        self.kb = nn.Parameter(torch.zeros(4))
        self.w = nn.Parameter(torch.randn(3, 4) * 0.3)
        self.dbias = nn.Parameter(torch.zeros(4 if tied else 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.conv2d(x, self.k, self.kb, padding=1).mean((2, 3))
        if not self.tied:
            return nn.functional.linear(h, self.w, self.dbias)
        h = torch.tanh(nn.functional.linear(h, self.w))
        return nn.functional.linear(h, self.w.t(), self.dbias)


@pytest.mark.parametrize("tied", [False, True])
def test_a_standalone_zero_bias_the_optimizer_dropped_is_a_parameter_again(tied: bool) -> None:
    module = FunctionalZeroBias(tied).train()
    inputs = (torch.randn(4, 2, 6, 6),)
    graph = _converted(module, inputs)
    _assert_same_parameters(module, graph, inputs)
    (note,) = [n for n in graph.metadata["notes"] if "zero biases" in n]
    assert "(kb, dbias)" in note or "(dbias, kb)" in note


class CalledTwice(nn.Module):
    """A Linear with a zero bias called twice: the optimizer drops the bias from both Gemms."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.fc(x)))


def test_a_dropped_zero_bias_of_a_layer_called_twice_has_the_gradient_of_both_calls() -> None:
    module = CalledTwice().train()
    inputs = (torch.randn(4, 8),)
    _assert_same_parameters(module, _converted(module, inputs), inputs)


class IndexedExperts(nn.Module):
    """A mixture of experts reading each token's expert weights as `w[idx]`: torchlib's
    `aten.index` transposes the weight by the identity permutation before its GatherND, which
    the optimizer folds into a copy under a generated name (`val_13`)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.router = nn.Linear(16, 4)
        shape = (4, 16, 8) if rank == 3 else (4, 16)
        self.w = nn.Parameter(torch.randn(*shape) * 0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        val, idx = torch.topk(self.router(x), 2, dim=-1)
        w = self.w[idx]  # [T, 2, 16, 8] or [T, 2, 16]
        y = torch.einsum("tc,tkch->tkh", x, w) if w.dim() == 4 else x.unsqueeze(1) * w
        return (torch.softmax(val, -1).unsqueeze(-1) * y).sum(1)


@pytest.mark.parametrize("rank", [3, 2])
def test_an_indexed_weight_the_optimizer_copied_is_the_modules_parameter(rank: int) -> None:
    module = IndexedExperts(rank).train()
    inputs = (torch.randn(12, 16),)
    graph = _converted(module, inputs)
    _assert_same_parameters(module, graph, inputs)
    (note,) = [n for n in graph.metadata["notes"] if "stored as copies" in n]
    assert note.endswith("= w)")  # not transposed, nor a value computed ahead


Recurrent = type[nn.RNN] | type[nn.GRU] | type[nn.LSTM]


class ZeroBiasRecurrent(nn.Module):
    """A recurrent layer whose biases all start as zeros (a common init): the optimizer merges
    bias_ih and bias_hh (of every layer and direction) into one initializer. The dynamo
    exporter writes nn.RNN out step by step, each step reading bias_hh as its
    `linear(h, weight_hh, bias_hh)`'s bias; an LSTM's or GRU's B it folds into one tensor."""

    def __init__(self, kind: Recurrent, layers: int, bidirectional: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = kind(3, 8, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(16 if bidirectional else 8, 2)
        for name, parameter in self.rnn.named_parameters():
            if "bias" in name:
                nn.init.zeros_(parameter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize(
    ("kind", "layers", "bidirectional"),
    [
        (nn.RNN, 1, False),
        (nn.RNN, 2, False),
        (nn.RNN, 1, True),
        (nn.GRU, 2, False),
        (nn.LSTM, 2, False),
    ],
)
def test_zero_recurrent_biases_merged_are_each_their_own_parameter_again(
    kind: Recurrent, layers: int, bidirectional: bool
) -> None:
    module = ZeroBiasRecurrent(kind, layers, bidirectional).train()
    inputs = (torch.randn(4, 6, 3),)
    graph = _converted(module, inputs)
    _assert_same_parameters(module, graph, inputs)
    assert kind.__name__ in {n.op_type for n in graph.nodes}  # run as one recurrent node
    notes = " ".join(graph.metadata["notes"])
    if kind is nn.RNN:
        assert "rnn.bias_ih_l0 also stood for rnn.bias_hh_l0" in notes
        assert "linear_" not in notes  # the folded first steps are no parameters

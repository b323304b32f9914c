"""Short PyTorch snippets for each fix, filled in with the layer and parameter names measured.

They are written against the user's own `nn.Module` (`model`, `optimizer`, `loss`), not against
gradhealth's converted graph: the point is the change to make in the training code.
"""

from __future__ import annotations


def _names(names: list[str]) -> str:
    """Every name, as a Python list the snippet's code iterates over."""
    return "[" + ", ".join(repr(n) for n in names) + "]"


def _some(names: list[str], limit: int = 8) -> str:
    """The first `limit` names for a comment, and how many more there are."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# new activation → (module, functional call in forward)
_NEW_MODULES = {
    "ReLU": ("nn.ReLU()", "F.relu(x)"),
    "LeakyReLU": ("nn.LeakyReLU(0.01)", "F.leaky_relu(x, 0.01)"),
    "GELU": ("nn.GELU()", "F.gelu(x)"),
    "SiLU": ("nn.SiLU()", "F.silu(x)"),
    "ELU": ("nn.ELU()", "F.elu(x)"),
    "Tanh": ("nn.Tanh()", "torch.tanh(x)"),
}
# canonical op → (module class, the ways forward() may call it)
_OLD_ACTIVATIONS = {
    "sigmoid": ("nn.Sigmoid", "torch.sigmoid(x) / F.sigmoid(x) / x.sigmoid()"),
    "tanh": ("nn.Tanh", "torch.tanh(x) / F.tanh(x) / x.tanh()"),
    "relu": ("nn.ReLU", "torch.relu(x) / F.relu(x) / x.relu()"),
    "hardsigmoid": ("nn.Hardsigmoid", "F.hardsigmoid(x)"),
    "hardtanh": ("nn.Hardtanh", "F.hardtanh(x)"),
    "relu6": ("nn.ReLU6", "F.relu6(x)"),
    "leaky_relu": ("nn.LeakyReLU", "F.leaky_relu(x)"),
    "elu": ("nn.ELU", "F.elu(x)"),
    "gelu": ("nn.GELU", "F.gelu(x)"),
    "silu": ("nn.SiLU", "F.silu(x) / x * torch.sigmoid(x)"),
}


def replace_activation(
    old: list[str], new: str, init: str | None, init_weights: list[str] | None = None
) -> str:
    """The module swap, the functional calls to edit by hand, and with `init` "kaiming" He
    initialisation of exactly `init_weights` (the weights before the swapped activations, as
    the verification re-initialises them; biases kept)."""
    module, call = _NEW_MODULES[new]
    classes = ", ".join(_OLD_ACTIVATIONS.get(o, ("nn." + o, ""))[0] for o in old)
    lines = [
        "import torch",
        "import torch.nn as nn",
        "import torch.nn.functional as F",
        "",
        f"# in the model definition: {' / '.join(old)} → {new}",
        "# 1. activation modules:",
        "for parent in model.modules():",
        "    for child_name, child in parent.named_children():",
        f"        if isinstance(child, ({classes},)):",
        f"            setattr(parent, child_name, {module})",
        "# 2. functional calls in forward() are no modules: the loop above does not change",
        "#    them; edit each by hand:",
    ]
    for o in old:
        calls = _OLD_ACTIVATIONS.get(o, ("", f"{o}(x)"))[1]
        lines.append(f"#      {calls}  →  {call}")
    if init == "kaiming" and init_weights:
        lines += [
            "# He initialisation suits the new activation: the weights before the swapped",
            "# activations (biases kept)",
            "params = dict(model.named_parameters())",
            f"for name in {_names(init_weights)}:",
            '    nn.init.kaiming_normal_(params[name], nonlinearity="relu")',
        ]
    return "\n".join(lines)


def reinitialize(
    scheme_by_param: dict[str, str],
    source_names: dict[str, list[str]] | None = None,
    stds: dict[str, float] | None = None,
) -> str:
    """`source_names`: graph parameter → the source model's parameters it was exported from
    (an ONNX LSTM's `B` → `lstm.bias_ih_l0`); the snippet names those, in torch's layout.
    `stds`: parameters drawn with an explicit std instead (a grouped conv's Xavier over its
    per-group fans, which torch's xavier_normal_ does not see)."""
    lines = ["import torch.nn as nn", "", "params = dict(model.named_parameters())"]
    groups: dict[str, list[str]] = {}
    for name, std in (stds or {}).items():
        lines.append(
            f"nn.init.normal_(params[{name!r}], std={std:.3g})  "
            f"# {scheme_by_param[name]} over the per-group fans of a grouped conv"
        )
    for name, scheme in scheme_by_param.items():
        if name in (stds or {}):
            continue
        if scheme.startswith(("onnx_", "no_bias_")):
            # the same change, written on torch's nn.LSTM / nn.GRU parameters
            gate = scheme.removeprefix("onnx_").removeprefix("no_bias_").removesuffix("_bias")
            scheme = f"{gate}_bias"
            for source in (source_names or {}).get(name, [name]):
                groups.setdefault(scheme, []).append(source)
            continue
        groups.setdefault(scheme, []).append(name)
    if any(s.startswith("no_bias_") for s in scheme_by_param.values()):
        lines.insert(2, "# build the nn.LSTM / nn.GRU with bias=True (the default), then:")
    for scheme, names in groups.items():
        call = {
            "kaiming": 'nn.init.kaiming_normal_(params[name], nonlinearity="relu")',
            "xavier_tanh": "nn.init.xavier_normal_(params[name], gain=5 / 3)  # tanh's gain",
            "xavier": "nn.init.xavier_normal_(params[name])",
            "zero_bias": "nn.init.zeros_(params[name])",
            "orthogonal": "nn.init.orthogonal_(params[name])",
            # torch's gate order i, f, g, o (ONNX's is i, o, f, c): chunk 1 is the forget gate;
            # the gate sees bias_ih + bias_hh, so bias_hh's slice is zeroed for a sum of 1
            "forget_bias": "params[name].data.chunk(4)[1].fill_(1.0)  # LSTM forget gate\n"
            '    params[name.replace("bias_ih", "bias_hh")].data.chunk(4)[1].zero_()  # sum 1',
            # GRU gate order r, z, n: chunk 1 is the update gate z
            "update_bias": "params[name].data.chunk(3)[1].fill_(1.0)  # GRU update gate\n"
            '    params[name.replace("bias_ih", "bias_hh")].data.chunk(3)[1].zero_()  # sum 1',
        }[scheme]
        lines += [f"for name in {_names(names)}:", f"    {call}"]
    return "\n".join(lines)


def clip_gradients(max_norm: float) -> str:
    return "\n".join(
        [
            "loss.backward()",
            f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={max_norm:g})",
            "optimizer.step()",
        ]
    )


def normalize_targets(mean: float, std: float, loss_kind: str) -> str:
    loss = "torch.nn.functional." + ("l1_loss" if loss_kind == "l1" else "mse_loss")
    return "\n".join(
        [
            f"# the training set's statistics (this batch's: mean {mean:.4g}, std {std:.4g})",
            "target_mean, target_std = y_train.mean(0), y_train.std(0)",
            f"loss = {loss}(model(x), (y - target_mean) / target_std)",
            "# predictions in the target's units:",
            "prediction = model(x) * target_std + target_mean",
        ]
    )


def lower_learning_rate(factor: float) -> str:
    return "\n".join(
        [
            "for group in optimizer.param_groups:",
            f'    group["lr"] *= {factor:g}',
            "# or warm up: torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01,"
            " total_iters=1000)",
        ]
    )


def add_normalization(kind: str, after: list[str]) -> str:
    norm = "nn.BatchNorm2d(out_channels)" if kind == "BatchNorm" else "nn.LayerNorm(out_features)"
    return "\n".join(
        [
            "import torch.nn as nn",
            "",
            f"# insert a {kind} between each of {_some(after, 4)} and its activation, e.g.",
            f"block = nn.Sequential(layer, {norm}, activation)",
        ]
    )


def add_residual(layers: list[str]) -> str:
    return "\n".join(
        [
            "import torch.nn as nn",
            "",
            "class Residual(nn.Module):",
            "    def __init__(self, block: nn.Module):",
            "        super().__init__()",
            "        self.block = block",
            "",
            "    def forward(self, x):",
            "        return x + self.block(x)  # the identity path carries the gradient back",
            "",
            f"# wrap each shape-preserving block among {_some(layers, 4)} in Residual(...)",
        ]
    )


def gated_recurrent(layers: list[str]) -> str:
    return "\n".join(
        [
            "import torch.nn as nn",
            "",
            f"# {_some(layers)}: nn.RNN → nn.LSTM (or nn.GRU), same sizes",
            "rnn = nn.LSTM(input_size, hidden_size, num_layers=num_layers, batch_first=True)",
            "out, (h, c) = rnn(x)  # nn.RNN returned (out, h)",
        ]
    )


def guard_numerics(op: str, node: str, exp_limit: float = 80.0) -> str:
    """The guard for `node`'s input domain; `exp_limit`: exp's largest safe input in the
    precision the model runs in (origin.py exp_input_limit)."""
    guards = {
        "log": "y = torch.log(x.clamp_min(1e-6))",
        "log2": "y = torch.log2(x.clamp_min(1e-6))",
        "log10": "y = torch.log10(x.clamp_min(1e-6))",
        "log1p": "y = torch.log1p(x.clamp_min(-1 + 1e-6))",
        "sqrt": "y = torch.sqrt(x.clamp_min(1e-6))",
        "rsqrt": "y = torch.rsqrt(x.clamp_min(1e-6))",
        "reciprocal": "y = 1.0 / torch.where(x.abs() < 1e-6, torch.full_like(x, 1e-6), x)",
        "div": "y = a / torch.where(b.abs() < 1e-6, torch.full_like(b, 1e-6), b)",
        "pow": "y = x.clamp_min(1e-6) ** p  # NaN below 0; infinite gradient at 0 if p < 1",
        "exp": f"y = torch.exp(x.clamp_max({exp_limit:g}))",
        "acos": "y = torch.acos(x.clamp(-1 + 1e-6, 1 - 1e-6))",
        "asin": "y = torch.asin(x.clamp(-1 + 1e-6, 1 - 1e-6))",
    }
    body = guards.get(op, f"y = torch.nan_to_num({op}(x))  # or guard its inputs")
    return f"# node {node!r} ({op}): guard its input domain\n{body}"


def log_softmax(node: str, softmax_node: str, dim: int) -> str:
    """log(softmax(z)) computed in one stable op."""
    return "\n".join(
        [
            f"# node {node!r} (log of the softmax {softmax_node!r}): softmax underflows to 0,",
            "# and log(0) = -inf; log_softmax computes z - logsumexp(z): finite, exact gradients",
            "import torch.nn.functional as F",
            "",
            f"# instead of  y = torch.log(torch.softmax(z, dim={dim}))",
            f"y = F.log_softmax(z, dim={dim})",
            "# y feeds F.nll_loss(y, target); or drop both: F.cross_entropy(z, target)",
        ]
    )


def loss_scaling(scale: float) -> str:
    return "\n".join(
        [
            f"scaler = torch.amp.GradScaler(init_scale={scale:g})",
            "with torch.autocast(device_type='cuda', dtype=torch.float16):",
            "    loss = loss_fn(model(x), y)",
            "scaler.scale(loss).backward()",
            "scaler.step(optimizer)",
            "scaler.update()",
        ]
    )


def use_bf16() -> str:
    return "\n".join(
        [
            "with torch.autocast(device_type='cuda', dtype=torch.bfloat16):",
            "    loss = loss_fn(model(x), y)",
            "loss.backward()  # bf16 keeps fp32's exponent range: no loss scaling needed",
        ]
    )


def recalibrate_quantizers(what: list[str]) -> str:
    return "\n".join(
        [
            "import torch",
            "import torch.ao.quantization as tq",
            "",
            f"# clipping quantisers: {_some(what, 4)}",
            "# torch.ao QAT: let the observers see representative batches again, then freeze",
            "model.apply(tq.enable_observer)",
            "with torch.no_grad():",
            "    for x, _ in calibration_batches:",
            "        model(x)",
            "model.apply(tq.disable_observer)",
            "# NVIDIA pytorch-quantization / ModelOpt: calibrate amax the same way, e.g.",
            "#   quantizer.enable_calib(); ...; quantizer.load_calib_amax('percentile',"
            " percentile=99.99)",
            "# or learn the scales: torch.ao's _LearnableFakeQuantize (LSQ, Esser et al. 2020)",
        ]
    )


def attend_over_more_tokens(node: str) -> str:
    return "\n".join(
        [
            f"# the attention whose softmax is {node} sees one token per sequence: a softmax",
            "# over one score is 1, so its query and key projections never learn. Either",
            "#   - give it more tokens: a smaller patch size or a larger input resolution",
            "#     (MobileViT: patch_size, image_size), or",
            "#   - drop the attention there: with one token its output is the value",
            "#     projection alone, a linear layer",
        ]
    )


def straight_through_estimator(op: str) -> str:
    fn = {"round": "torch.round", "floor": "torch.floor", "ceil": "torch.ceil"}.get(
        op.lower(), f"torch.{op.lower()}"
    )
    return "\n".join(
        [
            "import torch",
            "",
            f"# where the forward pass calls {fn}(x): keep its value, pass the gradient on",
            f"x_q = x + ({fn}(x) - x).detach()",
            "# (a torch.autograd.Function with backward `return grad` trains the same, but an",
            "# export keeps only its forward: write it as above to diagnose the exported model)",
        ]
    )

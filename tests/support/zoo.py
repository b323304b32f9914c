"""Tiny torch architectures for the converter's tests and benchmarks (reusable by anyone).

Each entry builds a module (seeded, deterministic) and an example input. Models are small
enough that both ONNX exporters handle each in well under a second. No torchvision: every
block is written here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, width)
        self.fc2 = nn.Linear(width, width)
        self.out = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc2(torch.relu(self.fc1(x)))))


class ConvBN(nn.Module):
    """CNN with BatchNorm, max pooling and a global average pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, width: int = 8, blocks: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers: list[nn.Module] = []
        cin = width
        for i in range(blocks):
            cout = width * (2 if i else 1)
            layers.append(BasicBlock(cin, cout, 2 if i else 1))
            cin = cout
        self.layer1 = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // 2, 1)
        self.expand = nn.Conv2d(channels // 2, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        s = nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(s))))
        return x * s


class MobileNet(nn.Module):
    """Inverted residual: expand 1x1, depthwise 3x3, squeeze-excite, project 1x1; HardSwish."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8))
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.depthwise = nn.Sequential(
            nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16)
        )
        self.se = SqueezeExcite(16)
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.hardswish(self.stem(x))
        y = nn.functional.hardswish(self.expand(x))
        y = self.se(nn.functional.hardswish(self.depthwise(y)))
        x = x + self.project(y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(nn.functional.gelu(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.block = ConvNeXtBlock(dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x))
        return self.head(self.norm(x.mean(dim=(2, 3))))


class ViT(nn.Module):
    """Patch embedding, class token, learned positions, one pre-norm attention block."""

    def __init__(self, dim: int = 16, heads: int = 2, patch: int = 4, image: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        tokens = (image // patch) ** 2 + 1
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.1)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp1 = nn.Linear(dim, 2 * dim)
        self.mlp2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        b, n, d = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embed
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n + 1, 3, self.heads, -1).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n + 1, d))
        x = x + self.mlp2(nn.functional.gelu(self.mlp1(self.norm2(x))))
        return self.head(x[:, 0])


class TransformerEncoder(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2, layers: int = 2, ffn: int = 32) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            dim, heads, ffn, dropout=0.0, batch_first=True, activation="gelu"
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class TinyGPT(nn.Module):
    """Token and position embeddings, one causal attention block, a tied-free LM head: the ops
    language-model exports carry (Gather on token ids, Range/arange positions, causal mask)."""

    def __init__(self, vocab: int = 50, dim: int = 16, heads: int = 2, context: int = 16) -> None:
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, -1))
        x = x + self.out(nn.functional.gelu(self.fc(self.ln2(x)), approximate="tanh"))
        return self.lm_head(x)


class ControlFlow(nn.Module):
    """A loop with a data-dependent trip count and a branch: scripted, so exported as
    ONNX Loop and If (with parameters read from the outer scope inside the bodies)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.step = nn.Linear(6, 6)
        self.pos = nn.Linear(6, 3)
        self.neg = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for _ in range(x.shape[0]):
            h = torch.tanh(self.step(h)) + h
        return self.pos(h) if bool(h.sum() > 0) else self.neg(h) * 2.0


class Cond(nn.Module):
    """A data-dependent branch written with `torch.cond`: the dynamo exporter's ONNX If."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.pos = nn.Linear(6, 3)
        self.neg = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return torch.cond(h.sum() > 0, lambda t: self.pos(t), lambda t: self.neg(t) * 2.0, (h,))


@dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[], nn.Module]
    example: Callable[[], torch.Tensor]
    scripted: bool = False  # export torch.jit.script(module): keeps control flow
    exporters: tuple[str, ...] = ("legacy", "dynamo")


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return factory()

    return build


def _tokens(*shape: int, vocab: int = 50) -> Callable[[], torch.Tensor]:
    def make() -> torch.Tensor:
        return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))

    return make


def _input(*shape: int, seed: int = 1) -> Callable[[], torch.Tensor]:
    def make() -> torch.Tensor:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

    return make


ZOO: dict[str, ZooModel] = {
    z.name: z
    for z in [
        ZooModel("mlp", _seeded(MLP), _input(3, 8)),
        ZooModel("cnn_bn", _seeded(ConvBN), _input(2, 3, 10, 10)),
        ZooModel("resnet", _seeded(ResNet), _input(2, 3, 8, 8)),
        ZooModel("mobilenet", _seeded(MobileNet), _input(2, 3, 8, 8)),
        ZooModel("convnext", _seeded(ConvNeXt), _input(2, 3, 8, 8)),
        ZooModel("vit", _seeded(ViT), _input(2, 3, 8, 8)),
        ZooModel("transformer", _seeded(TransformerEncoder), _input(2, 5, 16)),
        ZooModel("gpt", _seeded(TinyGPT), _tokens(2, 6)),
        ZooModel(
            "control_flow",
            _seeded(ControlFlow),
            _input(3, 4),
            scripted=True,
            exporters=("legacy",),  # TorchScript control flow: the legacy exporter only
        ),
        ZooModel("cond", _seeded(Cond), _input(3, 4), exporters=("dynamo",)),  # torch.cond
    ]
}

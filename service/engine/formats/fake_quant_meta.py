"""Shape-only (Meta) kernels for the fake quantisation ops that torch's fake tensors lack.

A quantisation-aware-training model traced or scripted to TorchScript calls
`aten::fake_quantize_per_tensor_affine` (torch.ao's FakeQuantize with tensor scale and zero
point; a quantiser with Python numbers), which dispatch to the two `_cachemask` ops below.
torch 2.13 has no Meta kernel for them, so `TS2EPConverter` (which traces with fake tensors)
failed and such a model was measured by parameter gradients only. A kernel only says what the
op returns: the fake-quantised tensor and its in-range mask, both shaped like the input.
"""

from __future__ import annotations

from typing import Any

import torch

_OPS = (
    "_fake_quantize_per_tensor_affine_cachemask_tensor_qparams",
    "fake_quantize_per_tensor_affine_cachemask",
)
# kept alive: a Library's registrations last as long as the object
_LIBRARY: torch.library.Library | None = None


def _shapes(x: torch.Tensor, *qparams: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


def register_fake_quant_meta() -> None:
    """Register the Meta kernels once, each unless torch has one of its own (a newer one)."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    _LIBRARY = torch.library.Library("aten", "IMPL")
    for op in _OPS:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", "Meta"):
            _LIBRARY.impl(op, _shapes, "Meta")

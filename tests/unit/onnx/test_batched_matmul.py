"""MatMul on equal batch dims runs torch's batched product directly: the same numbers, forward
and backward, as torch.matmul (which first broadcasts both operands with `expand`)."""

from __future__ import annotations

import pytest
import torch

from service.engine.onnx.ops.linalg import _matmul


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "b_transposed"),
    [
        ((2, 3, 5, 7), (2, 3, 7, 4), False),
        ((1, 12, 4, 8), (1, 12, 8, 4), True),  # attention's q @ k^T, k a transposed view
        ((2, 2, 3, 6, 5), (2, 2, 3, 5, 6), False),
        ((2, 1, 5, 7), (2, 3, 7, 4), False),  # broadcast batch: torch.matmul's own path
        ((4, 5, 7), (7, 3), False),
    ],
)
def test_matches_torch_matmul_bit_for_bit(
    a_shape: tuple[int, ...], b_shape: tuple[int, ...], b_transposed: bool
) -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(*a_shape, generator=gen, requires_grad=True)
    if b_transposed:
        stored = torch.randn(*b_shape[:-2], b_shape[-1], b_shape[-2], generator=gen)
        b = stored.transpose(-1, -2).requires_grad_()
    else:
        b = torch.randn(*b_shape, generator=gen, requires_grad=True)
    expected, ours = torch.matmul(a, b), _matmul(a, b)
    assert ours.shape == expected.shape and torch.equal(ours, expected)
    upstream = torch.randn(expected.shape, generator=gen)
    for want, got in zip(
        torch.autograd.grad(expected, (a, b), upstream),
        torch.autograd.grad(ours, (a, b), upstream),
        strict=True,
    ):
        assert torch.equal(want, got)

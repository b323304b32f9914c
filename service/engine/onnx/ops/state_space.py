"""Ops of linear-attention and state-space models (opset 27+): CausalConvWithState and
LinearAttention."""

from __future__ import annotations

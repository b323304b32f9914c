"""Spectral ops: DFT, STFT, the window functions and MelWeightMatrix (opset 17+)."""

from __future__ import annotations

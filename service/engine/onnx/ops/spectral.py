"""Spectral ops: DFT (17, 20), STFT, the Hann/Hamming/Blackman windows and MelWeightMatrix (17).

ONNX carries complex values as real tensors with a trailing pair dimension: [..., 2] holds
(real, imaginary), [..., 1] a real signal. The transforms turn that into a torch real or
complex tensor and go through `torch.fft`, whose kernels all have autograd formulas, so
gradients reach the signal (and STFT's window). Semantics follow onnx's reference
implementation (onnx/reference/ops/op_dft.py, op_stft.py, op_*_window.py,
op_mel_weight_matrix.py), edge cases included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from onnx import TensorProto

from service.engine.graph import NodeFn
from service.engine.onnx.ops._util import (
    FLOAT_DTYPES,
    LastTensorMemo,
    norm_axis,
    require,
    scalar,
    torch_dtype,
)
from service.engine.onnx.registry import OpContext, register

# torch.fft has no CPU kernels for half precision (and CUDA ones for powers of two only):
# those inputs are transformed in float32 and the result rounded back.
_FFT_DTYPES = (torch.float32, torch.float64)


def _int(value: Any) -> int:
    return int(scalar(value))


def _flag(ctx: OpContext, name: str, default: int) -> bool:
    value = int(ctx.attr(name, default))
    require(value in (0, 1), f"{name}={value} is not 0 or 1")
    return bool(value)


def _signal(x: torch.Tensor, op: str) -> torch.Tensor:
    """[..., 1] (real) or [..., 2] (real, imaginary) as a real or complex tensor without the
    pair dimension."""
    if x.dim() < 2 or x.shape[-1] not in (1, 2):
        raise ValueError(
            f"{op}: the input's last dimension must be 1 (real) or 2 (complex), "
            f"got shape {list(x.shape)}"
        )
    if x.dtype not in _FFT_DTYPES:
        x = x.float()
    if x.shape[-1] == 1:
        return x[..., 0]
    return torch.complex(x[..., 0], x[..., 1])


def _dft(
    x: torch.Tensor, length: int | None, axis: int, inverse: bool, onesided: bool
) -> torch.Tensor:
    """The DFT of `x` ([..., 1|2]) along `axis` as [..., 2] ([..., 1] for the IRFFT).

    `length` None: the axis' size, or 2 * (size - 1) for the IRFFT (onesided inverse). A
    onesided forward DFT of a complex input keeps the first length // 2 + 1 bins of the full
    transform, as the reference does.
    """
    rank = x.dim()
    a = norm_axis(axis, rank)
    if not 0 <= a <= rank - 2:
        raise ValueError(
            f"DFT: axis {axis} is out of range for a rank-{rank} input (the last dimension "
            "holds the real and imaginary parts)"
        )
    signal = _signal(x, "DFT")
    if inverse and onesided:
        n = length if length is not None else 2 * (signal.shape[a] - 1)
        return torch.fft.irfft(signal, n=n, dim=a).unsqueeze(-1).to(x.dtype)
    if inverse:
        spectrum = torch.fft.ifft(signal, n=length, dim=a)
    elif onesided and not signal.is_complex():
        spectrum = torch.fft.rfft(signal, n=length, dim=a)
    else:
        spectrum = torch.fft.fft(signal, n=length, dim=a)
        if onesided:
            spectrum = spectrum.narrow(a, 0, spectrum.shape[a] // 2 + 1)
    # (ifft of a real tensor is a lazily conjugated view, which view_as_real refuses)
    return torch.view_as_real(spectrum.resolve_conj()).to(x.dtype)


@register("DFT", since=17)
def dft_17(ctx: OpContext) -> NodeFn:
    axis = int(ctx.attr("axis", 1))
    inverse, onesided = _flag(ctx, "inverse", 0), _flag(ctx, "onesided", 0)
    require(axis != -1, "axis=-1 names the real/imaginary dimension")
    dft_length = LastTensorMemo(_int)  # mostly a constant: read back once, not per call

    def fn(x: torch.Tensor, length: torch.Tensor | None = None) -> torch.Tensor:
        n = dft_length(length) if length is not None else None
        return _dft(x, n, axis, inverse, onesided)

    return fn


@register("DFT", since=20)
def dft_20(ctx: OpContext) -> NodeFn:
    # `axis` became an optional input (default -2, the last signal axis).
    inverse, onesided = _flag(ctx, "inverse", 0), _flag(ctx, "onesided", 0)
    dft_length, axis_value = LastTensorMemo(_int), LastTensorMemo(_int)

    def fn(
        x: torch.Tensor, length: torch.Tensor | None = None, axis: torch.Tensor | None = None
    ) -> torch.Tensor:
        n = dft_length(length) if length is not None else None
        a = axis_value(axis) if axis is not None else -2
        return _dft(x, n, a, inverse, onesided)

    return fn


def _moved(value: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return value.to(device=device, dtype=dtype)


@register("STFT", since=17)
def stft(ctx: OpContext) -> NodeFn:
    onesided = _flag(ctx, "onesided", 1)
    step_value, length_value = LastTensorMemo(_int), LastTensorMemo(_int)
    # A window made by a window op (folded at conversion) is a CPU constant beside device data:
    # copied next to the signal once, not per call.
    window_moved = LastTensorMemo(_moved)

    def fn(
        signal: torch.Tensor,
        frame_step: torch.Tensor,
        window: torch.Tensor | None = None,
        frame_length: torch.Tensor | None = None,
    ) -> torch.Tensor:
        size = signal.shape[-2] if signal.dim() >= 2 else 0
        if frame_length is not None:
            n = length_value(frame_length)
        else:
            n = window.shape[0] if window is not None else size
        if window is not None and (window.dim() != 1 or window.shape[0] != n):
            raise ValueError(
                f"STFT: the window has shape {list(window.shape)}; expected [{n}] (frame_length)"
            )
        step = step_value(frame_step)
        if step < 1 or not 0 < n <= size:
            raise ValueError(
                f"STFT: frame_step {step} and frame_length {n} do not fit a signal of length {size}"
            )
        # [batch, frames, 1|2, n] → [batch, frames, n, 1|2]: frames are overlapping views.
        frames = signal.unfold(-2, n, step).transpose(-1, -2)
        if window is not None:
            if window.device != signal.device or window.dtype != signal.dtype:
                window = window_moved(window, signal.device, signal.dtype)
            frames = frames * window.unsqueeze(-1)
        return _dft(frames, None, -2, False, onesided)

    return fn


# The window ops' output types (T2): torch has no arithmetic for uint16/32/64, which
# `torch_dtype` refuses by name.
_WINDOW_DTYPES = FLOAT_DTYPES | {torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8}


def _output_dtype(ctx: OpContext) -> torch.dtype:
    onnx_type = int(ctx.attr("output_datatype", TensorProto.FLOAT))
    dtype = torch_dtype(onnx_type)
    require(
        dtype in _WINDOW_DTYPES,
        f"output_datatype {TensorProto.DataType.Name(onnx_type)} is not a real number type",
    )
    return dtype


def _hann(n: torch.Tensor, span: int) -> torch.Tensor:
    return torch.sin(n * math.pi / span) ** 2


def _hamming(n: torch.Tensor, span: int) -> torch.Tensor:
    # The reference's alpha is 25/46 (not the rounded 0.54 of torch.hamming_window).
    alpha = 25.0 / 46.0
    return alpha - torch.cos(n * (2 * math.pi) / span) * (1 - alpha)


def _blackman(n: torch.Tensor, span: int) -> torch.Tensor:
    return (
        torch.cos(n * (2 * math.pi) / span) * -0.5
        + torch.cos(n * (4 * math.pi) / span) * 0.08
        + 0.42
    )


def _register_window(op_type: str, formula: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
    @register(op_type, since=17)
    def build(ctx: OpContext) -> NodeFn:
        periodic = _flag(ctx, "periodic", 1)
        dtype = _output_dtype(ctx)
        size_value = LastTensorMemo(_int)

        def fn(size: torch.Tensor) -> torch.Tensor:
            count = size_value(size)
            # A periodic window is the first `size` points of a symmetric one of size + 1. As
            # in the reference, a symmetric window of size 1 divides 0 by 0 (NaN).
            span = count if periodic else count - 1
            n = torch.arange(count, dtype=torch.float64, device=size.device)
            return formula(n, span).to(dtype)

        return fn


_register_window("HannWindow", _hann)
_register_window("HammingWindow", _hamming)
_register_window("BlackmanWindow", _blackman)


def _mel(hertz: torch.Tensor) -> float:
    # As the reference: log1p in the input's precision, the division by ln 10 in float64.
    return float((torch.log1p(hertz.reshape(()) / 700) * 2595).item()) / math.log(10)


def _mel_bin_edges(
    num_mel_bins: int, dft_length: int, sample_rate: int, low_mel: float, high_mel: float
) -> list[int]:
    """The spectrogram bin of each triangle's left edge, centre and right edge (num_mel_bins
    + 2 points evenly spaced on the mel scale)."""
    count = num_mel_bins + 2
    step = (high_mel - low_mel) / count
    edges = []
    for k in range(count):
        hertz = 700 * math.expm1((k * step + low_mel) / 2595 * math.log(10))
        edges.append(int(((dft_length + 1) * hertz) // sample_rate))
    return edges


def _mel_matrix(num_mel_bins: int, dft_length: int, edges: list[int]) -> list[list[float]]:
    """[dft_length // 2 + 1][num_mel_bins] triangles peaking at 1, filled exactly as the
    reference's loops (Python lists index as numpy does, out-of-range edges raise)."""
    rows = [[0.0] * num_mel_bins for _ in range(dft_length // 2 + 1)]
    for i in range(num_mel_bins):
        left, centre, right = edges[i : i + 3]
        if centre == left:
            rows[centre][i] = 1.0
        else:
            for j in range(left, centre + 1):
                rows[j][i] = (j - left) / (centre - left)
        for j in range(centre, right):
            rows[j][i] = (right - j) / (right - centre)
    return rows


@register("MelWeightMatrix", since=17)
def mel_weight_matrix(ctx: OpContext) -> NodeFn:
    dtype = _output_dtype(ctx)

    def fn(
        num_mel_bins: torch.Tensor,
        dft_length: torch.Tensor,
        sample_rate: torch.Tensor,
        lower_edge_hertz: torch.Tensor,
        upper_edge_hertz: torch.Tensor,
    ) -> torch.Tensor:
        bins, length = _int(num_mel_bins), _int(dft_length)
        edges = _mel_bin_edges(
            bins, length, _int(sample_rate), _mel(lower_edge_hertz), _mel(upper_edge_hertz)
        )
        rows = _mel_matrix(bins, length, edges)
        matrix = torch.tensor(rows, dtype=torch.float64).reshape(length // 2 + 1, bins)
        return matrix.to(device=num_mel_bins.device, dtype=dtype)

    return fn

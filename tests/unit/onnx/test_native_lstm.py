"""The C++ LSTM loops (service/engine/native/recurrent_cpu.cpp) against the Python loops and
against torch's own nn.LSTM.

The module builds the extension first (a no-op where `make install` built it), so these tests
always run the C++ code; the Python path is reached by taking the loader away.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from service.engine import native
from service.engine.native import loader
from service.engine.onnx.ops import lstm_sequence as lstm_module
from service.engine.onnx.ops.integer import dynamically_dequantized
from service.engine.onnx.ops.lstm_sequence import lstm_sequence
from tests.support.recurrent_zoo import lstm_sequence_args

TORCH_GATE_BLOCKS = [0, 3, 1, 2]  # torch's i, f, g, o hold ONNX's i, o, f, c in these blocks


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    native.build()
    assert native.load_recurrent_cpu() is not None


@pytest.fixture
def python_loops(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(lstm_module, "native_loops", lambda x: None)
    yield


def _run(
    args: list[Tensor], reverse: bool = False, gate_blocks: list[int] | None = None
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Outputs, every input's gradient and ∂L/∂h_t for a loss weighing each element differently."""
    X, W, R, b, h0, c0 = args
    sink: list[Tensor] = []
    outputs = lstm_sequence(X, W, R, b, h0, c0, reverse, sink, gate_blocks)
    g = torch.Generator().manual_seed(1)
    loss = torch.stack(
        [(o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs]
    ).sum()
    grads = torch.autograd.grad(loss, args)
    return [o.detach() for o in outputs], list(grads), sink


def _python_path(
    monkeypatch: pytest.MonkeyPatch, args: list[Tensor], **kwargs: object
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    with monkeypatch.context() as patch:
        patch.setattr(lstm_module, "native_loops", lambda x: None)
        return _run(args, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("steps", [1, 7])
def test_cpp_loops_equal_the_python_loops(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, reverse: bool, steps: int
) -> None:
    args = lstm_sequence_args(steps, 3, 5, 6, dtype)
    assert lstm_module.native_loops(args[0]) is not None
    cpp = _run(args, reverse=reverse)
    python = _python_path(monkeypatch, args, reverse=reverse)
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-7, 1e-7)
    assert len(cpp[2]) == len(python[2]) == 1
    for got, expected in zip(
        [*cpp[0], *cpp[1], *cpp[2]], [*python[0], *python[1], *python[2]], strict=True
    ):
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


def test_cpp_loops_gradcheck_float64() -> None:
    args = lstm_sequence_args(4, 2, 3, 2, torch.float64)
    assert torch.autograd.gradcheck(lambda *a: lstm_sequence(*a), tuple(args), eps=1e-6, atol=1e-6)
    X, W, R, b, h0, c0 = args

    def torch_order(
        x: Tensor, w: Tensor, r: Tensor, bias: Tensor, h: Tensor, c: Tensor
    ) -> tuple[Tensor, ...]:
        return lstm_sequence(x, w, r, bias, h, c, gate_blocks=TORCH_GATE_BLOCKS)

    assert torch.autograd.gradcheck(torch_order, (X, W, R, b, h0, c0), eps=1e-6, atol=1e-6)


def _node_shaped(args: list[Tensor], bias_form: str) -> tuple[list[Tensor], dict[str, Tensor]]:
    """`args` as an ONNX LSTM node of one direction holds them: W [1, 4H, I], R [1, 4H, H],
    h0/c0 [1, B, H], and the bias as its [1, 8H] row (`row`) or as input-side and recurrent
    halves (`halves`, torch's bias_ih and bias_hh); new leaves."""
    X, W, R, b, h0, c0 = (t.detach() for t in args)
    halves = [0.6 * b, 0.4 * b]
    bias = torch.cat(halves).unsqueeze(0) if bias_form == "row" else halves[0]
    tensors = [X, W[None], R[None], bias, h0[None], c0[None]]
    extra = {"recurrent_bias": halves[1]} if bias_form == "halves" else {}
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    return leaves, {k: v.clone().requires_grad_(True) for k, v in extra.items()}


@pytest.mark.parametrize("path", ["cpp", "python"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias_form", ["row", "halves"])
def test_node_shaped_call_is_one_function_equal_to_the_plain_call(
    request: pytest.FixtureRequest, path: str, reverse: bool, bias_form: str
) -> None:
    """What a converted one-direction LSTM node calls (onnx_shapes, its inputs as the node
    holds them, the time flip inside): one autograd node, with the outputs, every input's
    gradient and ∂L/∂h_t of the plain call on [4H, ...] weights and a summed bias."""
    if path == "python":
        request.getfixturevalue("python_loops")
    args = lstm_sequence_args(5, 3, 4, 6, torch.float64)
    plain = _run(args, reverse=reverse)
    leaves, extra = _node_shaped(args, bias_form)
    X, W, R, bias, h0, c0 = leaves
    sink: list[Tensor] = []
    outputs = lstm_sequence(
        X,
        W,
        R,
        bias,
        h0,
        c0,
        reverse,
        sink,
        recurrent_bias=extra.get("recurrent_bias"),
        onnx_shapes=True,
    )
    assert [tuple(o.shape) for o in outputs] == [(5, 1, 3, 6), (1, 3, 6), (1, 3, 6)]
    assert {type(o.grad_fn).__name__ for o in outputs} == {"_LSTMSequenceBackward"}
    g = torch.Generator().manual_seed(1)
    flat = [o.reshape(p.shape) for o, p in zip(outputs, plain[0], strict=True)]
    loss = torch.stack(
        [(o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in flat]
    ).sum()
    grads = torch.autograd.grad(loss, [*leaves, *extra.values()])
    for got, want in zip(flat, plain[0], strict=True):
        torch.testing.assert_close(got.detach(), want)
    # the bias halves' gradients are the summed bias's (twice over for the [1, 8H] row)
    summed = plain[1][3]
    expected_bias = summed.repeat(2).view(1, -1) if bias_form == "row" else summed
    expected = [
        p.reshape(leaf.shape) for p, leaf in zip(plain[1], leaves, strict=True) if p is not summed
    ]
    expected.insert(3, expected_bias)
    expected += [summed] if extra else []
    assert len(grads) == len(expected)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(sink[0], plain[2][0])


@pytest.mark.parametrize("reverse", [False, True])
def test_node_shaped_call_gradcheck_float64(reverse: bool) -> None:
    args = lstm_sequence_args(4, 2, 3, 2, torch.float64)
    leaves, extra = _node_shaped(args, "halves")
    X, W, R, bias, h0, c0 = leaves

    def node(
        x: Tensor, w: Tensor, r: Tensor, b: Tensor, rb: Tensor, h: Tensor, c: Tensor
    ) -> tuple[Tensor, ...]:
        return lstm_sequence(
            x,
            w,
            r,
            b,
            h,
            c,
            reverse,
            gate_blocks=TORCH_GATE_BLOCKS,
            recurrent_bias=rb,
            onnx_shapes=True,
        )

    inputs = (X, W, R, bias, extra["recurrent_bias"], h0, c0)
    assert torch.autograd.gradcheck(node, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["cpp", "python"])
def test_torch_gate_order_equals_nn_lstm(request: pytest.FixtureRequest, path: str) -> None:
    """torch's own parameters (gates i, f, g, o) with gate_blocks [0, 3, 1, 2]: the same
    outputs and parameter gradients as nn.LSTM (the Python path reorders them first)."""
    if path == "python":
        request.getfixturevalue("python_loops")
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(5, 6).double()
    x = torch.randn(7, 3, 5, dtype=torch.float64, requires_grad=True)
    h0, c0 = torch.randn(2, 1, 3, 6, dtype=torch.float64).unbind(0)
    names = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
    weights = [dict(lstm.named_parameters())[name] for name in names]
    expected_out = lstm(x, (h0, c0))
    y, (h, c) = expected_out
    expected_grads = torch.autograd.grad(
        (y.sin().sum() + h.sum() + c.square().sum()), [x, *weights]
    )
    w_ih, w_hh, b_ih, b_hh = (t.detach().clone().requires_grad_(True) for t in weights)
    y2, h2, c2 = lstm_sequence(
        x, w_ih, w_hh, b_ih, h0[0], c0[0], gate_blocks=TORCH_GATE_BLOCKS, recurrent_bias=b_hh
    )
    grads = torch.autograd.grad(
        (y2.sin().sum() + h2.sum() + c2.square().sum()), [x, w_ih, w_hh, b_ih, b_hh]
    )
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(h2, h[0])
    torch.testing.assert_close(c2, c[0])
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_large_steps_equal_the_python_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sizes where the batch rows are split across threads (the grain is 16384 elements)."""
    torch.set_num_threads(2)
    args = lstm_sequence_args(3, 160, 8, 256, torch.float64)
    cpp = _run(args, gate_blocks=TORCH_GATE_BLOCKS)
    python = _python_path(monkeypatch, args, gate_blocks=TORCH_GATE_BLOCKS)
    for got, expected in zip(
        [*cpp[0], *cpp[1], *cpp[2]], [*python[0], *python[1], *python[2]], strict=True
    ):
        torch.testing.assert_close(got, expected)


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("two_threads")
def test_the_extensions_parallel_loops_run_on_torchs_threads() -> None:
    """Compiled with OpenMP: at::parallel_for is a header template, and without -fopenmp its
    `#pragma omp parallel` is dropped and every parallel loop of the extension runs on the
    calling thread alone (as it did, unnoticed, until session 5)."""
    loops = native.load_recurrent_cpu()
    assert loops is not None
    assert loops.parallel_tasks() == 2
    torch.set_num_threads(1)
    assert loops.parallel_tasks() == 1


@pytest.mark.usefixtures("two_threads")
def test_small_steps_split_across_two_threads_where_small_gemm_runs() -> None:
    loops = native.load_recurrent_cpu()
    assert loops is not None
    assert loops.split_steps_usable(8, 128) == loops.small_gemm_usable()
    assert not loops.split_steps_usable(8, 100)  # halves of 50 units: not whole vectors
    assert not loops.split_steps_usable(32, 512)  # a large step: oneDNN's packed product
    torch.set_num_threads(1)
    assert not loops.split_steps_usable(8, 128)


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize(("steps", "batch", "hidden"), [(1, 1, 32), (5, 3, 64), (6, 8, 128)])
@pytest.mark.parametrize("gate_blocks", [None, TORCH_GATE_BLOCKS], ids=["onnx", "torch"])
@pytest.mark.parametrize("threads", [2, 1])
def test_pointer_loops_equal_the_aten_loops_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch,
    steps: int,
    batch: int,
    hidden: int,
    gate_blocks: list[int] | None,
    threads: int,
) -> None:
    """The small-step loops on raw pointers (on two threads each computes its half of the
    hidden units; on one, all of them) do the ATen-based loops' arithmetic in the same order:
    outputs, every gradient and ∂L/∂h_t are identical."""
    torch.set_num_threads(threads)
    args = lstm_sequence_args(steps, batch, 7, hidden, torch.float32)
    split = _run(args, gate_blocks=gate_blocks)
    monkeypatch.setenv("GRADHEALTH_SPLIT_STEPS", "0")
    serial = _run(args, gate_blocks=gate_blocks)
    for got, expected in zip(
        [*split[0], *split[1], *split[2]], [*serial[0], *serial[1], *serial[2]], strict=True
    ):
        assert torch.equal(got, expected)


def test_bad_arguments_name_what_to_change() -> None:
    loops = native.load_recurrent_cpu()
    assert loops is not None
    projected, R = torch.zeros(2, 1, 8), torch.zeros(8, 2)
    h0 = c0 = torch.zeros(1, 2)
    with pytest.raises(RuntimeError, match=r"permutation of 0\.\.3"):
        loops.lstm_forward(projected, R, h0, c0, [0, 0, 1, 2])
    with pytest.raises(RuntimeError, match=r"R: \[4H, H\]"):
        loops.lstm_forward(projected, torch.zeros(6, 2), h0, c0, [0, 1, 2, 3])
    with pytest.raises(RuntimeError, match="dtype"):
        loops.lstm_forward(projected, R.double(), h0, c0, [0, 1, 2, 3])


def test_other_dtypes_take_the_python_loops() -> None:
    assert lstm_module.native_loops(torch.zeros(1, dtype=torch.bfloat16)) is None
    assert lstm_module.native_loops(torch.zeros(1)) is not None


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADHEALTH_NATIVE", "0")
    assert native.load_recurrent_cpu() is None


def test_a_build_for_another_torch_is_not_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    directory = native.built_dir()
    assert native.build() == directory / "gradhealth_recurrent_cpu.so"  # built: a no-op
    try:
        monkeypatch.setattr(torch, "__version__", "0.0.0+another")
        loader._loaded.cache_clear()
        assert native.built_dir() != directory
        assert native.load_recurrent_cpu() is None  # the Python loops run instead
    finally:
        monkeypatch.undo()
        loader._loaded.cache_clear()
    assert native.load_recurrent_cpu() is not None


@pytest.mark.slow  # a whole compile (~30 s on 2 cores)
def test_a_process_loads_what_it_has_just_built(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """cpp_extension.load appends torch's libraries to the flag list it is given: when that
    was the loader's own list, the build's key changed under it and the process that built
    looked for another folder (the Python loops ran, with a warning to build)."""
    monkeypatch.setenv("GRADHEALTH_NATIVE_DIR", str(tmp_path))
    loader._loaded.cache_clear()
    try:
        directory = native.built_dir()
        assert native.build() == directory / "gradhealth_recurrent_cpu.so"
        assert native.built_dir() == directory
        assert native.load_recurrent_cpu() is not None
    finally:
        monkeypatch.undo()
        loader._loaded.cache_clear()


def test_build_native_command_reports_the_library() -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "gradhealth"), "build-native"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert str(native.built_dir()) in done.stdout


def _ulps(got: Tensor, exact: Tensor) -> Tensor:
    """|got − exact| in units of the float spacing at exact."""
    magnitude = exact.float().abs()
    spacing = torch.nextafter(magnitude, torch.tensor(float("inf"))) - magnitude
    return (got.double() - exact).abs() / spacing.double()


def test_loop_activations_match_torch_over_the_float_range() -> None:
    """The loops' own sigmoid and tanh (activations.h) on every 997th float bit pattern of
    both signs: within a few ulp of the exact value wherever the result is a normal float,
    within 1e-7 everywhere, and NaN/inf as torch."""
    loops = native.load_recurrent_cpu()
    assert loops is not None
    patterns = torch.arange(0, 2**31, 997, dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([patterns, -patterns])
    x = x[torch.isfinite(x)]
    sigmoid, tanh = loops.activations(x)
    exact_sigmoid, exact_tanh = torch.sigmoid(x.double()), torch.tanh(x.double())
    normal = exact_sigmoid >= torch.finfo(torch.float32).tiny
    assert _ulps(sigmoid, exact_sigmoid)[normal].max() < 3  # torch's own: 2.4
    assert _ulps(tanh, exact_tanh).max() < 2  # torch's own: 0.6
    assert (sigmoid.double() - exact_sigmoid).abs().max() < 1e-7
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1e-45, 100.0])
    got_sigmoid, got_tanh = loops.activations(special)
    torch.testing.assert_close(got_sigmoid, torch.sigmoid(special), equal_nan=True)
    torch.testing.assert_close(got_tanh, torch.tanh(special), equal_nan=True)


def _quantized_run(args: list[Tensor], reverse: bool) -> tuple[list[Tensor], list[Tensor]]:
    X, W, R, b, h0, c0 = args
    outputs = lstm_sequence(X, W, R, b, h0, c0, reverse, state_quantizer=dynamically_dequantized)
    loss = torch.stack(
        [(o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outputs]
    ).sum()
    return [o.detach() for o in outputs], list(torch.autograd.grad(loss, args))


@pytest.mark.parametrize("batch, hidden", [(3, 6), (8, 64)])
def test_cpp_loop_rounds_h_as_the_python_quantizer_does_bit_for_bit(
    batch: int, hidden: int
) -> None:
    """A dynamically quantised LSTM's forward in C++ (recurrent_cpu.cpp dynamically_dequantized):
    every step's product reads h_{t-1} rounded exactly as integer.py's dynamic_quantization
    rounds it, from that step's own h (also at (8, 64), where the float LSTM's steps would take
    the two-thread loop)."""
    loops = native.load_recurrent_cpu()
    assert loops is not None
    X, W, R, b, h0, c0 = (
        a.detach() for a in lstm_sequence_args(9, batch, 5, hidden, torch.float32)
    )
    projected = (X @ W.t() + b).contiguous()
    read = torch.full((X.shape[0] + 1, batch, hidden), 7.0)
    _, _, _, Y = loops.lstm_forward(projected, R, h0, c0, [0, 1, 2, 3], None, read)
    previous = torch.cat([h0.unsqueeze(0), Y[:-1]])
    for t in range(X.shape[0]):
        assert torch.equal(read[t], dynamically_dequantized(previous[t])), t
    assert torch.equal(read[-1], torch.full((batch, hidden), 7.0)), "the last row is left as it is"
    assert not torch.equal(read[1], previous[1]), "h was rounded"


@pytest.mark.parametrize("reverse", [False, True])
def test_quantized_state_cpp_forward_equals_the_python_loop(
    monkeypatch: pytest.MonkeyPatch, reverse: bool
) -> None:
    """The quantised LSTM through the C++ forward and through the Python one: the same outputs
    and gradients (float64: the products' rounding moves no value across a rounding step)."""
    args = lstm_sequence_args(6, 3, 5, 8, torch.float64)
    cpp = _quantized_run(args, reverse)
    with monkeypatch.context() as patch:
        patch.setattr(lstm_module, "native_loops", lambda x: None)
        python = _quantized_run(args, reverse)
    for got, expected in zip([*cpp[0], *cpp[1]], [*python[0], *python[1]], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    X, W, R, b, h0, c0 = args
    plain = lstm_sequence(X, W, R, b, h0, c0)[0].detach()
    assert (plain - cpp[0][0]).abs().max() > 1e-4, "the quantizer changed the outputs"


def test_a_quantized_read_of_the_wrong_shape_names_what_to_change() -> None:
    loops = native.load_recurrent_cpu()
    assert loops is not None
    X, W, R, b, h0, c0 = (a.detach() for a in lstm_sequence_args(4, 2, 3, 4, torch.float32))
    projected = (X @ W.t() + b).contiguous()
    with pytest.raises(RuntimeError, match=r"quantized_read: a contiguous \[T \+ 1, B, H\]"):
        loops.lstm_forward(projected, R, h0, c0, [0, 1, 2, 3], None, torch.zeros(4, 2, 4))

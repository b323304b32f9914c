"""What diagnosing a quantised model costs against its float original, and how far it is from
onnxruntime.

    .venv/bin/python bench/quantized_models.py [--repeats 20] [--quick] [--threads 2]

Each row exports a float module with the legacy exporter, quantises it with onnxruntime
(`quantize_dynamic`, or `quantize_static` in the QOperator format), converts both files and
prints the median forward+backward time of the converted quantised model divided by the
converted float model's (measured alternately in one process), and the conformance check's
max abs error of the quantised conversion against onnxruntime. The quantised models run as
fake quantisation (bench numbers in bench/README.md): the extra cost is the quantisers
(DynamicQuantizeLinear per product, Q/DQ pairs) and, for the LSTM, its per-step quantisation
of h (in the C++ forward loop where that is built).
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from converter import LSTMModel, median_times, training_step  # (bench/ is on sys.path)

from service.engine.onnx.conformance import check_conversion
from service.engine.onnx.convert import convert


class _MLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *(m for _ in range(4) for m in (nn.Linear(width, width), nn.GELU())),
            nn.Linear(width, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _CNN(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.block = nn.Conv2d(channels, channels, 3, padding=1)
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.max_pool2d(torch.relu(self.stem(x)), 2)
        h = h + torch.relu(self.block(h))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def _exported(module: nn.Module, x: torch.Tensor, path: Path) -> None:
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter's deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (x,),
            buffer,  # type: ignore[arg-type]
            dynamo=False,
            input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
        )
    path.write_bytes(buffer.getvalue())


def _dynamic(source: Path, target: Path, _: torch.Tensor) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(source, target, weight_type=QuantType.QInt8)


def _static_qoperator(source: Path, target: Path, x: torch.Tensor) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[dict[str, np.ndarray]] = iter([{"x": x.numpy()}])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(source, target, Calibration(), quant_format=QuantFormat.QOperator)


def _diagnosis_step(graph: nn.Module, x: torch.Tensor) -> None:
    """A forward and backward from no gradients, as a diagnosis runs them (measure.py): an
    accumulation into earlier gradients would time a [K, N] weight's transposed add too."""
    for parameter in graph.parameters():
        parameter.grad = None
    training_step(graph, x)


def row(
    name: str,
    module: nn.Module,
    x: torch.Tensor,
    quantize: Callable[[Path, Path, torch.Tensor], None],
    repeats: int,
) -> None:
    with tempfile.TemporaryDirectory() as work:
        source, target = Path(work) / "float.onnx", Path(work) / "quantized.onnx"
        _exported(module, x, source)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize(source, target, x)
        model = onnx.load(target)
        graphs = {"float": convert(onnx.load(source)), "quantized": convert(model)}
    check = check_conversion(model, graphs["quantized"], [x])
    runs: dict[str, Callable[[], None]] = {
        key: functools.partial(_diagnosis_step, graph, x) for key, graph in graphs.items()
    }
    times = median_times(runs, repeats, torch.device("cpu"))
    ratio = times["quantized"] / times["float"]
    print(
        f"{name:<22} float {times['float'] * 1e3:8.2f} ms  quantised "
        f"{times['quantized'] * 1e3:8.2f} ms  ratio {ratio:5.2f}  "
        f"vs onnxruntime max abs {check.max_abs_error:.2e} rel {check.max_rel_error:.2e}"
    )
    if check.reason:
        print(f"{'':<22} ({check.reason})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    small = args.quick
    hidden, steps = (32, 8) if small else (256, 100)
    row(
        "dynamic LSTM",
        LSTMModel(64, hidden),
        torch.randn(16, steps, 64),
        _dynamic,
        args.repeats,
    )
    width = 64 if small else 1024
    row("dynamic MLP", _MLP(width), torch.randn(64, width), _dynamic, args.repeats)
    channels, size = (8, 8) if small else (64, 32)
    row(
        "QOperator CNN",
        _CNN(channels),
        torch.randn(16, 3, size, size),
        _static_qoperator,
        args.repeats,
    )


if __name__ == "__main__":
    main()

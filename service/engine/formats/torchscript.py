"""TorchScript (`torch.jit.save` zips): parameter gradients always, activation probes when the
scripted graph can be turned into an FX graph.

TorchScript graphs have no per-op hook point, so activations are observed by converting the
module with `torch._export.converter.TS2EPConverter` (TorchScript IR → an ExportedProgram) once
the batch is known, then running the FX graph as an ObservableGraph whose parameters are named as
the ScriptModule's `named_parameters()`. When that conversion fails (control flow or ops it does
not handle), the ScriptModule itself is run and only parameter gradients are measured:
`probe_coverage = "parameters_only"` with the converter's error as the reason.

TorchScript is deprecated upstream (torch 2.11+); `.pt2` (torch.export) is the preferred format.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import torch

from service.engine.formats.fake_quant_meta import register_fake_quant_meta
from service.engine.formats.fx import graph_from_fx
from service.engine.formats.loaded import LoadedModel, frozen_parameters_note
from service.engine.formats.torch_export import output_specs_from_value
from service.engine.report import TensorSpec
from service.errors import ModelFormatError


def _input_names(module: torch.jit.ScriptModule) -> list[str]:
    """Graph input names without TorchScript's `.N` suffixes (the first input is `self`)."""
    names: list[str] = []
    for value in list(module.graph.inputs())[1:]:
        debug = value.debugName()
        base = debug.rsplit(".", 1)[0] if "." in debug else debug
        names.append(base or f"input_{len(names)}")
    # duplicates after stripping (x.1, x.2) get their position appended
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def _inputs_with_defaults(module: torch.jit.ScriptModule, names: list[str]) -> frozenset[str]:
    """The inputs whose forward argument has a default (`bias: Optional[Tensor] = None`): a
    batch may leave them out and the model runs with the default, as `module(x)` would."""
    try:
        # a ScriptMethod (typed as a plain callable) carries its schema
        schema = module.forward.schema  # type: ignore[attr-defined]
        arguments = list(schema.arguments)[1:]  # the first is `self`
    except (AttributeError, RuntimeError):  # a module without a scripted forward
        return frozenset()
    if len(arguments) != len(names):
        return frozenset()
    return frozenset(
        name
        for name, argument in zip(names, arguments, strict=True)
        if argument.has_default_value()
    )


def load_torchscript(data: bytes, *, mode: str = "train", dropout: bool = False) -> LoadedModel:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as exc:
        raise ModelFormatError(
            f"the TorchScript file could not be loaded by torch.jit.load ({type(exc).__name__}: "
            f"{exc}); save it with torch.jit.save(torch.jit.script(model) or trace, path)"
        ) from exc
    names = _input_names(module)
    # TorchScript keeps no shapes in its signature: declared inputs are names only.
    inputs = [TensorSpec(name=n, shape=[], dtype="tensor") for n in names]
    if mode == "train":
        module.train()
    else:
        module.eval()
    loaded = LoadedModel(
        format="torchscript",
        module=module,
        graph=None,
        inputs=inputs,
        coverage_reason="TorchScript graph not converted yet (needs the batch)",
        source=module,
        notes=frozen_parameters_note(module),
        optional_inputs=_inputs_with_defaults(module, names),
    )

    def finish(example: Sequence[torch.Tensor]) -> None:
        # the converter rewrites the module it is given (an RNN's flat weights stop being its
        # parameters), so it gets a copy of its own and `module` stays usable as a fallback
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            copy = torch.jit.load(io.BytesIO(data), map_location="cpu")
        copy.train(mode == "train")
        if len(example) < len(names):
            left_out = ", ".join(names[len(example) :])
            loaded.coverage_reason = (
                f"input(s) {left_out} were left to their defaults, and the TorchScript graph "
                "converts to an observable FX graph only with every input fed; only parameter "
                "gradients are measured — add arrays for them, or export with torch.export "
                "(.pt2), for per-layer probes"
            )
            return
        _make_observable(loaded, copy, names, example, mode=mode, dropout=dropout)

    loaded.finish = finish
    loaded.describe_outputs = lambda example: _run_outputs(module, example)
    return loaded


def _make_observable(
    loaded: LoadedModel,
    module: torch.jit.ScriptModule,
    names: list[str],
    example: Sequence[torch.Tensor],
    *,
    mode: str,
    dropout: bool,
) -> None:
    parameter_names = [name for name, _ in module.named_parameters()]
    try:
        from torch._export.converter import TS2EPConverter

        register_fake_quant_meta()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = TS2EPConverter(module, tuple(t.detach() for t in example)).convert()
            fx_module = program.module()
        graph = graph_from_fx(
            fx_module,
            parameter_names=parameter_names,
            input_names=names,
            mode=mode,
            dropout=dropout,
            metadata={"format": "torchscript"},
        )
    except Exception as exc:  # the converter's failures are many and untyped
        loaded.coverage_reason = (
            "the TorchScript graph could not be converted to an observable FX graph "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "only parameter gradients are measured — export with torch.export (.pt2) for "
            "per-layer probes"
        )
        return
    missing = set(parameter_names) - {n for n, _ in graph.named_graph_parameters()}
    # asked of the module as loaded: the converter rewrote `module` (an RNN's flat weights no
    # longer feed its forward), which would make every weight it lost look unused
    original = loaded.source if isinstance(loaded.source, torch.jit.ScriptModule) else None
    unused = _unused_parameters(original, example, missing) if missing and original else set()
    if missing - unused:
        loaded.coverage_reason = (
            "the converted TorchScript graph lost parameters "
            f"{sorted(missing - unused)[:3]}; only parameter gradients are measured"
        )
        return
    # (the unused ones: graph_from_fx's note names them)
    loaded.graph = graph
    loaded.module = graph
    loaded.coverage_reason = None


def _run_outputs(
    module: torch.jit.ScriptModule, example: Sequence[torch.Tensor]
) -> list[TensorSpec]:
    """The outputs' names, shapes and dtypes, which TorchScript does not declare, from one
    forward on the batch without gradients; the buffers it changes (a traced train-mode batch
    norm's running statistics) are put back. Empty where the forward fails: the measurement
    runs it again and reports why."""
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    example = [x.to(device) for x in example]
    try:
        # its own random draws (dropout in train mode): the measurement's stay as they were
        with torch.no_grad(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = module(*example)
    except Exception:  # the measurement's own forward reports it
        return []
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return output_specs_from_value(value)


def _unused_parameters(
    module: torch.jit.ScriptModule, example: Sequence[torch.Tensor], names: set[str]
) -> set[str]:
    """Those of `names` that the module's own forward gives no gradient on `example` (an
    unused submodule, which the FX conversion drops): one forward and backward, only when the
    conversion lost parameters."""
    wanted = [(n, p) for n, p in module.named_parameters() if n in names and p.requires_grad]
    if not wanted:
        return set()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outputs = module(*example)
        flat = [t for t in _tensors(outputs) if t.is_floating_point() and t.requires_grad]
        if not flat:
            return {n for n, _ in wanted}
        total = torch.stack([t.float().sum() for t in flat]).sum()
        grads = torch.autograd.grad(total, [p for _, p in wanted], allow_unused=True)
    except Exception:  # the module's own failure: the lost parameters stay lost
        return set()
    return {n for (n, _), g in zip(wanted, grads, strict=True) if g is None}


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []

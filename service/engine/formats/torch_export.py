"""torch.export programs (`torch.export.save` `.pt2` zips) → ObservableGraph, full probes."""

from __future__ import annotations

import io
import json
import logging
import re
import zipfile
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from service.engine.formats.fx import graph_from_fx
from service.engine.formats.fx_regions import inline_wrapper_regions
from service.engine.formats.loaded import LoadedModel, frozen_parameters_note
from service.engine.formats.pytree_placeholders import register_placeholder, unregistered_type
from service.engine.report import TensorSpec
from service.errors import ModelFormatError


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def spec_from_value(name: str, value: Any) -> TensorSpec:
    """A TensorSpec from an FX `meta["val"]` (a FakeTensor whose dims may be symbolic)."""
    if not isinstance(value, torch.Tensor):
        return TensorSpec(name=name, shape=[], dtype=type(value).__name__)
    shape: list[int | str | None] = []
    for dim in value.shape:
        shape.append(int(dim) if isinstance(dim, int) else str(dim))
    return TensorSpec(name=name, shape=shape, dtype=dtype_name(value.dtype))


_WEIGHTS_CONFIG = "data/weights/model_weights_config.json"


def tied_parameter_names(data: bytes) -> list[list[str]]:
    """Groups of parameter names that are one tensor in the saved program: torch.export.save
    writes a tied tensor once and maps each of its names to that file
    (`data/weights/model_weights_config.json`); after loading they are separate tensors, and
    the graph reads one name only. Empty when the archive does not say (another layout)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            config_path = next(n for n in archive.namelist() if n.endswith(_WEIGHTS_CONFIG))
            config = json.loads(archive.read(config_path))["config"]
        by_file: dict[str, list[str]] = {}
        for name, entry in config.items():
            if entry.get("is_param"):
                by_file.setdefault(str(entry["path_name"]), []).append(str(name))
    except (StopIteration, KeyError, TypeError, AttributeError, ValueError, zipfile.BadZipFile):
        return []
    return [names for names in by_file.values() if len(names) > 1]


# torch.export.load logs why deserialising failed (as a warning with the traceback) and raises
# a RuntimeError that only says "check the warnings above"
_LOAD_LOGGER = "torch.export"
# an op of a library that is not installed here (torchao's quantisation primitives, ...)
_UNRESOLVED_OP = re.compile(r"failed to resolve (torch\.ops\.([A-Za-z_]\w*)\.\w+)")


class _FailureRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def cause(self) -> str | None:
        """The innermost error message among the records' tracebacks."""
        for record in reversed(self.records):
            error = record.exc_info[1] if record.exc_info else None
            while error is not None and (error.__cause__ or error.__context__) is not None:
                error = error.__cause__ or error.__context__
            if error is not None:
                return str(error)
        return None


def _load_program(data: bytes) -> torch.export.ExportedProgram:
    logger = logging.getLogger(_LOAD_LOGGER)
    # torch's own stderr handler is set aside: its tracebacks would flood the CLI's stderr
    records, handlers, propagate = _FailureRecords(), logger.handlers[:], logger.propagate
    logger.handlers = [records]
    logger.propagate = False
    try:
        return _load_with_placeholders(data, records)
    except Exception as exc:
        cause = records.cause()
        unresolved = _UNRESOLVED_OP.search(cause or "")
        if unresolved is not None:
            op, library = unresolved.group(1), unresolved.group(2)
            raise ModelFormatError(
                f"the .pt2 program calls {op}, an operator of the '{library}' library that is "
                "not installed here; gradhealth runs programs of torch's own operators: export "
                "the model without it (for a quantisation-aware-training model, fake "
                "quantisation with torch.fake_quantize_per_tensor_affine / _per_channel_affine)"
            ) from exc
        detail = f"{type(exc).__name__}: {cause or exc}".splitlines()[0]
        raise ModelFormatError(
            f"the .pt2 file could not be loaded by torch.export.load ({detail}); save it with "
            "torch.export.save(torch.export.export(model, args), path)"
        ) from exc
    finally:
        logger.handlers = handlers
        logger.propagate = propagate


def _load_with_placeholders(data: bytes, records: _FailureRecords) -> torch.export.ExportedProgram:
    """torch.export.load, with a stand-in for each pytree type its specs name that this
    process lacks (pytree_placeholders.py: a Hugging Face model's ModelOutput). torch logs the
    deserialisation error and raises a generic one: the name is read from the log."""
    while True:
        try:
            return torch.export.load(io.BytesIO(data))
        except Exception:
            missing = unregistered_type(records.cause() or "")
            if missing is None or not register_placeholder(missing):
                raise
            records.records.clear()


def _output_names(program: torch.export.ExportedProgram, count: int) -> list[str | None]:
    """Each output's place in what the model returned, where that names it: `loss` and
    `logits` of a Hugging Face ModelOutput or of a dict, `hidden.0` of a tuple in a dict
    (a flat tuple's places are only numbers: None, the graph's node names stay)."""
    spec = program.call_spec.out_spec
    if spec is None:
        return [None] * count
    try:
        paths = [
            path
            for path, _ in pytree.tree_flatten_with_path(
                pytree.tree_unflatten(list(range(count)), spec)
            )[0]
        ]
    except Exception:  # a container type without key paths: keep the node names
        return [None] * count
    names = [_path_name(path) for path in paths]
    return names if len(names) == count else [None] * count


def _path_name(path: Sequence[Any]) -> str | None:
    """`logits`, `hidden.0`: an output's key path where a key names it (a flat tuple's places
    are only numbers: None)."""
    if not any(isinstance(key, pytree.MappingKey | pytree.GetAttrKey) for key in path):
        return None
    return ".".join(_key_text(key) for key in path)


def output_specs_from_value(value: Any) -> list[TensorSpec]:
    """The outputs of one run of a model (TorchScript's, which declares none): each tensor of
    what it returned, named like a .pt2's outputs by its key path (`logits`, `hidden.0`), or
    `output` / `output_0`, `output_1`, … where only positions name them."""
    try:
        leaves = pytree.tree_flatten_with_path(value)[0]
    except Exception:  # a container type without key paths
        leaves = [((pytree.SequenceKey(i),), v) for i, v in enumerate(pytree.tree_leaves(value))]
    tensors = [(path, v) for path, v in leaves if isinstance(v, torch.Tensor)]
    specs = []
    for index, (path, tensor) in enumerate(tensors):
        fallback = "output" if len(tensors) == 1 else f"output_{index}"
        specs.append(spec_from_value(_path_name(path) or fallback, tensor))
    return specs


def input_aliases(program: torch.export.ExportedProgram, names: list[str]) -> dict[str, list[str]]:
    """Other names a batch array may have to feed each input that is one entry of a container
    argument: `forward(self, d)` reading `d["x"]` has the input `d_x` (torch.export joins the
    key path with `_`), which the user knows as `x`; `x`, `d.x` and `d/x` name it too (a
    safetensors file or a nested .pt batch joins with dots). A list's entry `xs_0` is also
    `xs.0`, never a bare `0`. Empty where the program's input spec says no more."""
    spec = program.call_spec.in_spec
    if spec is None:
        return {}
    try:
        leaves = pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(len(names))), spec))
    except Exception:  # a container type without key paths
        return {}
    paths = [path for path, _ in leaves[0]]
    if len(paths) != len(names):  # constants among the inputs: positions would not line up
        return {}
    aliases: dict[str, list[str]] = {}
    for name, path in zip(names, paths, strict=True):
        if len(path) < 2:
            continue
        # (args, kwargs) first: an argument is args[i] (named only in the placeholder's name)
        # or kwargs[name]
        keyword = isinstance(path[1], pytree.MappingKey)
        below = [_key_text(key) for key in path[2:]]
        if not below:
            continue
        argument = _key_text(path[1]) if keyword else None
        suffix = "_" + "_".join(re.sub(r"\W", "_", part) for part in below)
        if argument is None and name.endswith(suffix) and len(name) > len(suffix):
            argument = name[: -len(suffix)]
        found: list[str] = []
        if isinstance(path[2], pytree.MappingKey | pytree.GetAttrKey):
            found += [".".join(below), "/".join(below)]
        if argument is not None:
            found += [".".join([argument, *below]), "/".join([argument, *below])]
        if found:
            aliases[name] = [a for a in dict.fromkeys(found) if a != name]
    return aliases


def _key_text(key: Any) -> str:
    if isinstance(key, pytree.MappingKey):
        return str(key.key)
    if isinstance(key, pytree.SequenceKey):
        return str(key.idx)
    if isinstance(key, pytree.GetAttrKey):
        return key.name
    return str(key)


def load_torch_export(data: bytes, *, mode: str = "train", dropout: bool = False) -> LoadedModel:
    program = _load_program(data)
    signature = program.graph_signature
    by_name = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    inputs = [spec_from_value(n, by_name[n].meta.get("val")) for n in signature.user_inputs]
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    flat_outputs = list(output_node.args[0])
    outputs = []
    keyed = _output_names(program, len(signature.user_outputs))
    for index, name in enumerate(signature.user_outputs):
        match = next((n for n in flat_outputs if getattr(n, "name", None) == name), None)
        value = match.meta.get("val") if match is not None else None
        outputs.append(spec_from_value(keyed[index] or name or f"output_{index}", value))
    module = program.module()
    parameter_names = [name for name, _ in module.named_parameters()]
    read = {str(n.target) for n in module.graph.nodes if n.op == "get_attr" and n.users}
    notes: list[str] = frozen_parameters_note(module)
    notes += inline_wrapper_regions(module)
    unread: set[str] = set()
    for names in tied_parameter_names(data):
        used = [n for n in names if n in read]
        if len(used) == 1:
            unread.update(n for n in names if n != used[0])
            others = ", ".join(n for n in names if n != used[0])
            notes.append(
                f"{others} and {used[0]} are one tied parameter in the model (the program reads "
                f"it as {used[0]}): reported once, under that name, with the gradient of every use"
            )
    graph = graph_from_fx(
        module,
        parameter_names=parameter_names,
        input_names=[s.name for s in inputs],
        mode=mode,
        dropout=dropout,
        metadata={"format": "torch_export", "notes": notes},
        unread_aliases=frozenset(unread),
    )
    return LoadedModel(
        format="torch_export",
        module=graph,
        graph=graph,
        inputs=inputs,
        outputs=outputs,
        source=program,
        input_aliases=input_aliases(program, [s.name for s in inputs]),
    )

"""Sample batches (CONTRACT.md §2): `.npz` (no pickle), `.safetensors`, `.pt` (weights_only).

Arrays named like the model's inputs feed those inputs; the inputs no array is named after take
the other arrays in file order (for safetensors: the order of their data in the file, which its
writers choose), with a note saying which fed which. A .pt2 input that is an entry of a dict
argument (`d_x` for `d["x"]`) is also fed by an array named `x`, `d.x` or `d/x`; a nested .pt
batch (`{"d": {"x": t}}`) names its arrays by their key paths (`d.x`).
An array named `target` (or `targets`, `labels`, `y`) is the loss target, never an input.
Shapes and dtypes are checked against the model's declared inputs, and each error names
the input and what to change.

Dtype policy: a floating array feeding a floating input is cast to the input's declared dtype
(float32 data for an fp16 model is the common case and harmless); an integer array for a float
input, or the reverse, is an error, since it usually means arrays fed the wrong inputs.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from service.engine.losses import check_has_labels
from service.engine.report import ArrayInfo, BatchInfo, TensorSpec
from service.errors import BatchError

TARGET_NAMES = ("target", "targets", "labels", "y")

_NUMPY_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


@dataclass
class Batch:
    """A loaded batch, arrays in file order, before it is matched to a model."""

    arrays: dict[str, torch.Tensor]
    format: str


@dataclass
class MatchedBatch:
    inputs: list[torch.Tensor]
    target: torch.Tensor | None
    info: BatchInfo
    notes: list[str] = field(default_factory=list)
    # the declared inputs fed, in order: all of them but those left to their defaults
    specs: list[TensorSpec] = field(default_factory=list)


def load_batch(data: bytes) -> Batch:
    """Read a batch file, format from its content."""
    if not data:
        raise BatchError("the batch file is empty")
    if data.startswith(b"PK\x03\x04"):
        names = _zip_names(data)
        if any(n.endswith(".npy") for n in names):
            return Batch(_load_npz(data), "npz")
        if any(n.endswith("data.pkl") for n in names):
            return Batch(_load_pt(data), "pt")
        raise BatchError("the batch file is a zip but neither .npz nor a torch.save .pt file")
    if len(data) >= 8:
        header_len = int.from_bytes(data[:8], "little")
        if 0 < header_len <= len(data) - 8 and data[8:9] == b"{":
            return Batch(_load_safetensors(data), "safetensors")
    raise BatchError(
        "the batch file is not .npz, .safetensors or a torch.save .pt file; save arrays with "
        "numpy.savez, safetensors.torch.save_file or torch.save({name: tensor})"
    )


def _zip_names(data: bytes) -> list[str]:
    try:
        return zipfile.ZipFile(io.BytesIO(data)).namelist()
    except zipfile.BadZipFile as exc:
        raise BatchError(f"the batch file is a damaged zip archive ({exc})") from exc


def _load_npz(data: bytes) -> dict[str, torch.Tensor]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError as exc:
        raise BatchError(
            f"the .npz batch holds object arrays, which are refused (no pickle): {exc}"
        ) from exc
    out = {}
    for name, array in arrays.items():
        if array.dtype.name not in _NUMPY_DTYPES:
            raise BatchError(
                f"array {name!r} has dtype {array.dtype}; use a numeric dtype (float32, int64, ...)"
            )
        out[name] = torch.from_numpy(np.ascontiguousarray(array))
    return out


def _load_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    """Arrays in the order their data lies in the file: the header is a JSON object whose key
    order the writers do not keep (safetensors lays data out by dtype, then name)."""
    import json

    from safetensors.torch import load

    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        tensors = load(data)
    except Exception as exc:
        raise BatchError(f"the .safetensors batch could not be read: {exc}") from exc
    names = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]
    )
    return {name: tensors[name] for name in names}


def _load_pt(data: bytes) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:
        raise BatchError(_pt_refusal(exc)) from exc
    if isinstance(obj, torch.Tensor):
        return {"input": obj}
    if isinstance(obj, (list, tuple)):
        obj = {f"input_{i}": t for i, t in enumerate(obj)}
    if not isinstance(obj, dict):
        raise BatchError("the .pt batch must hold a tensor, a list of tensors or a dict of them")
    out: dict[str, torch.Tensor] = {}
    for name, value in obj.items():
        _flatten_entry(str(name), value, out)
    return out


def _flatten_entry(name: str, value: object, out: dict[str, torch.Tensor]) -> None:
    """A nested entry (`{"d": {"x": t}}`, a dict input's arrays) as arrays named by their key
    paths joined with dots (`d.x`), as safetensors writers name them."""
    if isinstance(value, torch.Tensor):
        out[name] = value
    elif isinstance(value, dict):
        for key, inner in value.items():
            _flatten_entry(f"{name}.{key}", inner, out)
    elif isinstance(value, (list, tuple)):
        for index, inner in enumerate(value):
            _flatten_entry(f"{name}.{index}", inner, out)
    else:
        raise BatchError(f"entry {name!r} of the .pt batch is a {type(value).__name__}")


_SAVE_TENSORS_ONLY = (
    "save only tensors (a tensor, or a list, tuple or dict of tensors) with torch.save, or "
    "send the batch as .npz or .safetensors"
)


def _pt_refusal(exc: Exception) -> str:
    """Why torch.load(weights_only=True) refused a .pt batch, without torch's header (which
    suggests weights_only=False: running the file's code, never what a server should do)."""
    import re

    text = str(exc)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused is not None:
        return (
            f"the .pt batch was refused: it holds a non-tensor object ({refused.group(1)}), "
            "which torch.load(weights_only=True) refuses: unpickling it could run code; "
            + _SAVE_TENSORS_ONLY
        )
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip()
        and "weights_only" not in line
        and not line.startswith(("Weights only load failed", "Check the documentation"))
    ]
    reason = lines[0] if lines else type(exc).__name__
    return (
        f"the .pt batch could not be loaded with torch.load(weights_only=True) ({reason}); "
        + _SAVE_TENSORS_ONLY
    )


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "float"
    if dtype == torch.bool:
        return "bool"
    return "int"


def _declared_dtype(spec: TensorSpec) -> torch.dtype | None:
    """The torch dtype an input declares; an optional tensor's (`optional(float32)`) is its
    element's, which a batch array feeds (a batch cannot leave an input empty)."""
    name = spec.dtype or ""
    if name.startswith("optional(") and name.endswith(")"):
        name = name.removeprefix("optional(").removesuffix(")")
    dtype = getattr(torch, name, None) if name else None
    return dtype if isinstance(dtype, torch.dtype) else None


SHOWN_NAMES = 5


def shown_names(names: Iterable[str], limit: int = SHOWN_NAMES) -> str:
    """'a, b, c, d, e and 95 more': a batch file can hold hundreds of arrays, and a message
    listing every name runs to many hundreds of characters on one stderr line."""
    names = list(names)
    if len(names) <= limit + 1:  # "and 1 more" is no shorter than the name itself
        return ", ".join(names)
    return f"{', '.join(names[:limit])} and {len(names) - limit} more"


def match_batch(
    batch: Batch,
    declared: list[TensorSpec],
    *,
    aliases: Mapping[str, Sequence[str]] | None = None,
    optional: Collection[str] = (),
) -> MatchedBatch:
    """Assign arrays to the model's inputs and check them against the declared specs.

    An array named like an input feeds it, whatever the other arrays are called; the inputs no
    array is named after take the remaining arrays in file order (a note says which fed which
    where that could be a guess). `aliases`: other names an input accepts (a .pt2 dict input
    `d_x` also takes `x`, `d.x`, `d/x`), used where only one input accepts the name.
    `optional`: inputs the model can run without (a TorchScript argument with a default):
    left out when no array is left for them, and then absent from `MatchedBatch.specs`."""
    input_names = [spec.name for spec in declared]
    accepted = _accepted_names(input_names, aliases or {})
    taken_by_inputs = set(input_names) | {n for names in accepted.values() for n in names}
    # a model input named like a target (a model that takes `labels` and returns its own loss)
    # is fed by that array: it is no target then
    target_name = next(
        (n for n in TARGET_NAMES if n in batch.arrays and n not in taken_by_inputs), None
    )
    candidates = {n: t for n, t in batch.arrays.items() if n != target_name}
    by_name: dict[str, str] = {}  # input → array
    for name in input_names:
        found = next((a for a in accepted[name] if a in candidates), None)
        if found is not None and found not in by_name.values():
            by_name[name] = found
    unnamed = [s for s in declared if s.name not in by_name]
    left = [n for n in candidates if n not in by_name.values()]
    notes = []
    if not unnamed:
        if left:
            notes.append(
                f"{len(left)} batch array(s) match no model input and were ignored: "
                f"{shown_names(left)}"
            )
        by_order: dict[str, str] = {}
    else:
        unnamed = _fed_by_order(unnamed, left, optional, declared, candidates, accepted)
        by_order = {s.name: a for s, a in zip(unnamed, left, strict=True)}
        if by_name or len(by_order) > 1:
            pairs = shown_names(f"{a} → {i}" for i, a in by_order.items())
            notes.append(
                f"model input(s) no batch array is named after took the remaining arrays in "
                f"file order: {pairs}; name each array after the input it feeds to choose "
                "otherwise"
            )
    fed = by_name | by_order
    specs = [s for s in declared if s.name in fed]
    left_out = [n for n in input_names if n not in fed]
    if left_out and input_names[-len(left_out) :] != left_out:
        # `module(*inputs)` passes them by position: a gap would shift the later ones
        raise BatchError(
            f"model input(s) {shown_names(left_out)} have no batch array but inputs after them "
            "do; inputs are passed by position, so add arrays for them too, or leave the "
            "later ones out"
        )
    if left_out:
        notes.append(
            f"model input(s) {shown_names(left_out)} have a default and no batch array: the "
            "model ran with the default"
        )
    inputs = []
    arrays = []
    for spec in specs:
        array_name = fed[spec.name]
        tensor = candidates[array_name]
        try:
            inputs.append(_check_input(spec, tensor))
        except BatchError as exc:
            if spec.name not in by_order:
                raise
            raise BatchError(
                f"{exc} (array {array_name!r} fed input {spec.name!r} by its place in the "
                f"file; name the arrays after the inputs they feed: "
                f"{_naming_hint(unnamed, accepted)})"
            ) from exc
        arrays.append(
            ArrayInfo(
                name=array_name,
                shape=list(tensor.shape),
                dtype=str(tensor.dtype).removeprefix("torch."),
                role="input",
                feeds=spec.name,
            )
        )
    target = batch.arrays.get(target_name) if target_name else None
    if target is not None:
        assert target_name is not None
        check_has_labels(target, target_name)
        arrays.append(
            ArrayInfo(
                name=target_name,
                shape=list(target.shape),
                dtype=str(target.dtype).removeprefix("torch."),
                role="target",
            )
        )
    size = int(inputs[0].shape[0]) if inputs and inputs[0].dim() > 0 else 1
    info = BatchInfo(
        names=[a.name for a in arrays],
        shapes=[a.shape for a in arrays],
        dtypes=[a.dtype for a in arrays],
        size=size,
        arrays=arrays,
    )
    return MatchedBatch(inputs=inputs, target=target, info=info, notes=notes, specs=specs)


def _accepted_names(
    input_names: list[str], aliases: Mapping[str, Sequence[str]]
) -> dict[str, list[str]]:
    """Each input's own name, then those of its aliases no other input claims (its own name
    or an alias of its own)."""
    claims: dict[str, int] = {}
    for name in input_names:
        for alias in {a for a in aliases.get(name, ()) if a != name}:
            claims[alias] = claims.get(alias, 0) + 1
    return {
        name: [name]
        + [
            a
            for a in dict.fromkeys(aliases.get(name, ()))
            if a != name and claims.get(a) == 1 and a not in input_names
        ]
        for name in input_names
    }


def _naming_hint(specs: Sequence[TensorSpec], accepted: Mapping[str, list[str]]) -> str:
    """'w' / 'd_x' (or x, d.x): the names the user can give the arrays for `specs`."""
    parts = []
    for spec in specs:
        others = accepted.get(spec.name, [spec.name])[1:]
        parts.append(f"{spec.name}" + (f" (or {', '.join(others)})" if others else ""))
    return shown_names(parts)


def _fed_by_order(
    unnamed: list[TensorSpec],
    left: list[str],
    optional: Collection[str],
    declared: list[TensorSpec],
    candidates: Mapping[str, torch.Tensor],
    accepted: Mapping[str, list[str]],
) -> list[TensorSpec]:
    """The inputs no array is named after that the `left` arrays feed in file order: all of
    them, less trailing inputs with a default when there are fewer arrays."""
    input_names = [s.name for s in declared]
    fed = list(unnamed)
    while len(fed) > len(left) and fed and fed[-1].name in optional:
        fed.pop()
    if len(left) < len(fed):
        missing = fed[len(left) :]
        raise BatchError(
            f"the model takes {len(declared)} inputs ({shown_names(input_names)}) but the "
            f"batch has {len(candidates)} input arrays ({shown_names(candidates) or 'none'}); "
            f"add arrays named {_naming_hint(missing, accepted)}"
        )
    if len(left) > len(fed):
        named = len(declared) - len(unnamed)
        if not named:
            raise BatchError(
                f"the batch has {len(candidates)} input arrays ({shown_names(candidates)}) but "
                f"the model takes {len(declared)} ({shown_names(input_names)}); name the arrays "
                "after the inputs or remove the extra ones"
            )
        raise BatchError(
            f"{named} batch array(s) are named like model inputs, but the other "
            f"{len(left)} ({shown_names(left)}) are more than the {len(fed)} input(s) left "
            f"({_naming_hint(fed, accepted)}); name the arrays for those inputs after them or "
            "remove the extra ones"
        )
    return fed


def _as_integer(spec: TensorSpec, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in the declared integer dtype, refused where a value does not fit it."""
    cast = tensor.to(dtype)
    if tensor.numel() and not torch.equal(cast.to(tensor.dtype), tensor):
        raise BatchError(
            f"input {spec.name!r} expects {spec.dtype} but the batch's "
            f"{str(tensor.dtype).removeprefix('torch.')} values do not fit it; convert that "
            f"array to {str(dtype).removeprefix('torch.')}"
        )
    return cast


def _check_input(spec: TensorSpec, tensor: torch.Tensor) -> torch.Tensor:
    declared_dtype = _declared_dtype(spec)
    if declared_dtype is not None:
        want, have = _dtype_kind(declared_dtype), _dtype_kind(tensor.dtype)
        if want != have:
            raise BatchError(
                f"input {spec.name!r} expects {spec.dtype} but the batch gives "
                f"{str(tensor.dtype).removeprefix('torch.')}; convert that array to "
                f"{str(declared_dtype).removeprefix('torch.')}"
            )
        if want == "float" and tensor.dtype != declared_dtype:
            tensor = tensor.to(declared_dtype)
        elif want == "int" and tensor.dtype != declared_dtype:
            # int32 ids for an int64 input (numpy's default int on some platforms, a
            # tokenizer's): a torch.export program asserts its traced dtype; ONNX and
            # TorchScript read them either way
            tensor = _as_integer(spec, tensor, declared_dtype)
    if spec.shape:
        shape = list(tensor.shape)
        mismatch = len(shape) != len(spec.shape) or any(
            isinstance(d, int) and d != s for d, s in zip(spec.shape, shape, strict=False)
        )
        if mismatch:
            want_shape = "[" + ", ".join("?" if d is None else str(d) for d in spec.shape) + "]"
            raise BatchError(
                f"input {spec.name!r} expects shape {want_shape} but the batch array has "
                f"shape {shape}; reshape it or export the model with matching (dynamic) shapes"
            )
    return tensor

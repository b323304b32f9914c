"""The arrays of an uploaded batch (name, shape, dtype), read from headers only, in the API
process, without torch and without unpickling anything a client sent.

- `.npz`: a zip of `.npy` members; each member's header is parsed by numpy's header reader
  (a literal dict, read with `ast.literal_eval`, never `pickle`). Object arrays are refused:
  they need pickle, and the engine loads batches with `allow_pickle=False`.
- `.safetensors`: an 8-byte little-endian length and a JSON header.
- `.pt` (`torch.save` zip): `data.pkl` is read by a restricted unpickler whose `find_class`
  returns inert stand-ins for the handful of names a tensor dict uses
  (`torch._utils._rebuild_tensor_v2`, `torch.*Storage`, `collections.OrderedDict`) and refuses
  every other global, so no code from the file can run. Containers other than a dict / list /
  single tensor are listed as not known here (`complete=False`): the worker, which loads with
  `weights_only=True`, has the last word and fails the job naming the problem.

Batch format comes from the content, never the file name.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from service.errors import BatchError

SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
TORCH_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


@dataclass
class BatchListing:
    format: str  # npz | safetensors | pt
    arrays: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = True  # False: the arrays could not all be listed without loading them


def list_batch(path: Path) -> BatchListing:
    with path.open("rb") as f:
        head = f.read(8)
    if not head:
        raise BatchError("the batch file is empty")
    if head.startswith(b"PK\x03\x04"):
        return _list_zip(path)
    if len(head) == 8:
        listing = _list_safetensors(path)
        if listing is not None:
            return listing
    raise BatchError(
        "the batch file is not .npz, .safetensors or a torch.save .pt of tensors; save it with "
        "numpy.savez, safetensors.torch.save_file or torch.save({'x': ..., 'target': ...})"
    )


def _list_zip(path: Path) -> BatchListing:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if names and all(n.endswith(".npy") for n in names):
                return BatchListing("npz", [_npy_header(archive, n) for n in names])
            pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
            if pickles:
                with archive.open(pickles[0]) as f:
                    return _list_torch_pickle(f)
    except zipfile.BadZipFile as exc:
        raise BatchError(f"the batch file is a damaged zip archive ({exc})") from exc
    raise BatchError("the batch file is a zip archive but neither .npz nor a torch.save .pt")


def _npy_header(archive: zipfile.ZipFile, member: str) -> dict[str, Any]:
    name = member[: -len(".npy")]
    with archive.open(member) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        except ValueError as exc:
            raise BatchError(f"the array '{name}' in the .npz has a bad header ({exc})") from exc
    if dtype.hasobject:
        raise BatchError(
            f"the array '{name}' holds Python objects (needs pickle, which is refused); "
            "save numeric arrays only"
        )
    return {"name": name, "shape": list(shape), "dtype": str(dtype)}


def _list_safetensors(path: Path) -> BatchListing | None:
    size = path.stat().st_size
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > min(SAFETENSORS_MAX_HEADER, size - 8):
            return None
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    arrays = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or "shape" not in info or "dtype" not in info:
            raise BatchError(f"the safetensors entry '{name}' has no shape/dtype")
        dtype = SAFETENSORS_DTYPES.get(str(info["dtype"]), str(info["dtype"]).lower())
        arrays.append({"name": name, "shape": list(info["shape"]), "dtype": dtype})
    return BatchListing("safetensors", arrays)


# -- .pt: a restricted unpickler ----------------------------------------------------------


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class _Storage:
    dtype: str


@dataclass(frozen=True)
class _Tensor:
    shape: tuple[int, ...]
    dtype: str


class _Unknown(Exception):
    """The pickle uses something this lister does not model."""


def _rebuild_tensor(storage: Any, _offset: Any, size: Any, *_rest: Any) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise _Unknown("tensor without a storage")
    return _Tensor(tuple(int(d) for d in size), storage.dtype)


class _TensorListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in TORCH_STORAGE_DTYPES:
            return _StorageType(TORCH_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise _Unknown(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and pid and pid[0] == "storage":
            storage_type = pid[1]
            if isinstance(storage_type, _StorageType):
                return _Storage(storage_type.dtype)
        raise _Unknown("storage reference")


def _list_torch_pickle(f: IO[bytes]) -> BatchListing:
    try:
        obj = _TensorListUnpickler(f).load()
    except _Unknown:
        return BatchListing("pt", [], complete=False)
    except Exception as exc:  # truncated or corrupt pickle data
        raise BatchError(f"the .pt batch cannot be read ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, _Tensor):
        items: list[tuple[str, Any]] = [("input", obj)]
    elif isinstance(obj, dict):
        items = [(str(k), v) for k, v in obj.items()]
    elif isinstance(obj, list | tuple):
        items = [(f"input{i}", v) for i, v in enumerate(obj)]
    else:
        return BatchListing("pt", [], complete=False)
    if not all(isinstance(v, _Tensor) for _, v in items):
        return BatchListing("pt", [], complete=False)
    arrays = [{"name": k, "shape": list(v.shape), "dtype": v.dtype} for k, v in items]
    return BatchListing("pt", arrays)

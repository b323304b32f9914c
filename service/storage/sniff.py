"""Cheap, safe looks at uploaded files in the API process: nothing here executes or unpickles
user data, and nothing loads torch. Models get only a format check so that garbage is refused
at once (422); their inputs, outputs and parameter count come from the worker's inspection job.

- TorchScript / torch.export: zip archives told apart by member names (the engine's rules,
  `service.engine.formats.detect`).
- ONNX: a protobuf `ModelProto`; its top-level fields are walked by seeking over their
  lengths (a 2 GB model costs a few reads), and it must hold a graph. The graph's initializers
  are walked the same way: one that keeps its bytes in an external data file
  (`torch.onnx.export(dynamo=True)` writes `model.onnx.data` next to the model) is refused at
  upload, because the worker would only find it missing; such models come as a zip bundle.
- ONNX bundle: a zip holding exactly one `.onnx` file plus its external data files.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from service.engine.formats.detect import format_of_zip_members
from service.errors import ModelFormatError

ZIP_MAGIC = b"PK\x03\x04"
# ModelProto fields (onnx.proto) and their wire types: 0 = varint, 2 = length-delimited.
ONNX_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
ONNX_GRAPH_FIELD = 7
GRAPH_INITIALIZER_FIELD = 5  # GraphProto.initializer (TensorProto)
TENSOR_NAME_FIELD = 8  # TensorProto.name
TENSOR_EXTERNAL_DATA_FIELD = 13  # TensorProto.external_data
TENSOR_DATA_LOCATION_FIELD = 14  # TensorProto.data_location; 1 = EXTERNAL
DATA_LOCATION_EXTERNAL = 1
# Lengths of the fixed-size wire types (1 = 64-bit, 5 = 32-bit).
FIXED_WIRE_SIZES = {1: 8, 5: 4}
MAX_TOP_LEVEL_FIELDS = 100_000
MAX_PROTOBUF_BYTES = 2 * 1024**3


def sniff_model_format(path: Path) -> str:
    """`onnx` | `torchscript` | `torch_export`, or ModelFormatError (422) saying what to send."""
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        raise ModelFormatError("the model file is empty")
    if head == ZIP_MAGIC:
        return _zip_model_format(path)
    if _looks_like_onnx(path):
        external = _external_initializer(path)
        if external is not None:
            raise ModelFormatError(
                f"the ONNX model keeps the weights of initializer '{external}' in a separate "
                "external data file (e.g. model.onnx.data, as torch.onnx.export writes by "
                "default), which this upload does not include; upload a zip bundle holding the "
                ".onnx file and its data files (zip model.zip model.onnx model.onnx.data)"
            )
        return "onnx"
    raise ModelFormatError(
        "the model file is not ONNX, TorchScript or a torch.export program (.pt2); "
        "save it with torch.onnx.export, torch.jit.save or torch.export.save"
    )


def zip_members(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except zipfile.BadZipFile as exc:
        raise ModelFormatError(f"the file is a damaged zip archive ({exc})") from exc


def _zip_model_format(path: Path) -> str:
    return format_of_zip_members(zip_members(path))


def _read_varint(f: BinaryIO) -> int | None:
    result = 0
    for shift in range(0, 64, 7):
        byte = f.read(1)
        if not byte:
            return None
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
    return None


def _looks_like_onnx(path: Path) -> bool:
    size = path.stat().st_size
    seen_graph = False
    with path.open("rb") as f:
        for _ in range(MAX_TOP_LEVEL_FIELDS):
            if f.tell() == size:
                return seen_graph
            tag = _read_varint(f)
            if tag is None:
                return False
            number, wire_type = tag >> 3, tag & 7
            if ONNX_MODEL_FIELDS.get(number) != wire_type:
                return False
            value = _read_varint(f)
            if value is None:
                return False
            if wire_type == 2:
                if f.tell() + value > size:
                    return False
                f.seek(value, 1)
                seen_graph = seen_graph or number == ONNX_GRAPH_FIELD
    return False


def _fields(f: BinaryIO, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, wire type, value) for each field up to `end`: the varint's value, or the
    length of a length-delimited field, whose payload starts at `f.tell()` on yield and is
    skipped when the consumer leaves it there. Stops quietly on anything malformed."""
    while f.tell() < end:
        tag = _read_varint(f)
        if tag is None:
            return
        number, wire_type = tag >> 3, tag & 7
        if wire_type in FIXED_WIRE_SIZES:
            f.seek(FIXED_WIRE_SIZES[wire_type], 1)
            continue
        if wire_type not in (0, 2):
            return
        value = _read_varint(f)
        if value is None:
            return
        start = f.tell()
        if wire_type == 2 and start + value > end:
            return
        yield number, wire_type, value
        if wire_type == 2:
            f.seek(start + value)


def _external_initializer(path: Path) -> str | None:
    """The name of the first graph initializer stored as external data, else None. Past
    protobuf's 2 GiB limit a model must use external data anyway: not walked (the worker's
    loader says what is missing)."""
    size = path.stat().st_size
    if size > MAX_PROTOBUF_BYTES:
        return None
    with path.open("rb") as f:
        for number, wire_type, length in _fields(f, size):
            if number != ONNX_GRAPH_FIELD or wire_type != 2:
                continue
            for field, kind, tensor_length in _fields(f, f.tell() + length):
                if field != GRAPH_INITIALIZER_FIELD or kind != 2:
                    continue
                name, external = "", False
                for tensor_field, tensor_kind, value in _fields(f, f.tell() + tensor_length):
                    if tensor_field == TENSOR_NAME_FIELD and tensor_kind == 2:
                        name = f.read(min(value, 200)).decode("utf-8", "replace")
                    external = (
                        external
                        or (
                            tensor_field == TENSOR_DATA_LOCATION_FIELD
                            and tensor_kind == 0
                            and value == DATA_LOCATION_EXTERNAL
                        )
                        or (tensor_field == TENSOR_EXTERNAL_DATA_FIELD and tensor_kind == 2)
                    )
                if external:
                    return name or "?"
    return None

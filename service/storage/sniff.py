"""Cheap, safe looks at uploaded files in the API process: nothing here executes or unpickles
user data, and nothing loads torch. Models get only a format check so that garbage is refused
at once (422); their inputs, outputs and parameter count come from the worker's inspection job.

- TorchScript / torch.export: zip archives told apart by member names (the engine's rules,
  `service.engine.formats.detect`).
- ONNX: a protobuf `ModelProto`; its top-level fields are walked by seeking over their
  lengths (a 2 GB model costs a few reads), and it must hold a graph.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import BinaryIO

from service.engine.formats.detect import format_of_zip_members
from service.errors import ModelFormatError

ZIP_MAGIC = b"PK\x03\x04"
# ModelProto fields (onnx.proto) and their wire types: 0 = varint, 2 = length-delimited.
ONNX_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
ONNX_GRAPH_FIELD = 7
MAX_TOP_LEVEL_FIELDS = 100_000


def sniff_model_format(path: Path) -> str:
    """`onnx` | `torchscript` | `torch_export`, or ModelFormatError (422) saying what to send."""
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        raise ModelFormatError("the model file is empty")
    if head == ZIP_MAGIC:
        return _zip_model_format(path)
    if _looks_like_onnx(path):
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

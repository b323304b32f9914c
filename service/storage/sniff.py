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
- ONNX bundle: a zip holding exactly one `.onnx` file plus its external data files. Checked
  at upload under the loader's rules (service/engine/onnx/loading.py): every member a relative
  path inside the bundle (no absolute path, `..` or symbolic link), and every external data
  reference of the `.onnx` a member of the bundle, its offset and length inside that file. The
  `.onnx` member itself is parsed for this (protobuf only, its data files are not read) when
  it is at most MAX_BUNDLE_ONNX_PARSE_BYTES; a larger one is left to the worker's loader.
"""

from __future__ import annotations

import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
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
# A bundle's .onnx keeps its weights in data files, so it is small; parsed at upload up to this.
MAX_BUNDLE_ONNX_PARSE_BYTES = 256 * 1024**2


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
    model_format = format_of_zip_members(zip_members(path))
    if model_format == "onnx":
        check_onnx_bundle(path)
    return model_format


def check_onnx_bundle(path: Path) -> None:
    """ModelFormatError (422) when the worker could not load the bundle: a member outside
    the bundle, a link, or external data the bundle does not hold (see the module docstring)."""
    from service.engine.onnx.loading import check_relative

    try:
        with zipfile.ZipFile(path) as archive:
            sizes: dict[str, int] = {}
            onnx_member: zipfile.ZipInfo | None = None
            for info in archive.infolist():
                if info.is_dir():
                    continue
                check_relative(info.filename, "bundle member")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise ModelFormatError(
                        f"bundle member '{info.filename}' is a symbolic link; links are refused"
                    )
                sizes[_normalised(info.filename)] = info.file_size
                if info.filename.lower().endswith(".onnx"):
                    onnx_member = info
            if onnx_member is None or onnx_member.file_size > MAX_BUNDLE_ONNX_PARSE_BYTES:
                return
            data = archive.read(onnx_member)
    except zipfile.BadZipFile as exc:
        raise ModelFormatError(f"the file is a damaged zip archive ({exc})") from exc
    _check_bundle_references(data, onnx_member.filename, sizes)


def _normalised(name: str) -> str:
    return str(PurePosixPath(name.replace("\\", "/")))


def _check_bundle_references(data: bytes, onnx_name: str, sizes: dict[str, int]) -> None:
    from google.protobuf.message import DecodeError
    from onnx import ModelProto, TensorProto

    from service.engine.onnx.loading import check_relative, iter_tensors

    model = ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelFormatError(
            f"the bundle's '{onnx_name}' is not a valid ONNX model: {exc}"
        ) from exc
    if not model.HasField("graph"):
        raise ModelFormatError(f"the bundle's '{onnx_name}' is not a valid ONNX model: no graph")
    folder = PurePosixPath(_normalised(onnx_name)).parent
    for tensor in iter_tensors(model.graph):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        what = f"external data location of tensor '{tensor.name}'"
        relative = check_relative(location, what)
        member = _normalised(str(folder / relative))
        if member not in sizes:
            raise ModelFormatError(
                f"tensor '{tensor.name}' of '{onnx_name}' keeps its data in '{location}', which "
                "the bundle does not hold; zip the .onnx file together with its data files "
                "(zip model.zip model.onnx model.onnx.data)"
            )
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else sizes[member] - offset
        except ValueError as exc:
            raise ModelFormatError(
                f"external data of tensor '{tensor.name}' has a malformed offset or length"
            ) from exc
        if offset < 0 or length < 0 or offset + length > sizes[member]:
            raise ModelFormatError(
                f"external data of tensor '{tensor.name}' (offset {offset}, length {length}) "
                f"lies outside the file '{location}' ({sizes[member]} bytes)"
            )


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

"""Reading ONNX bytes safely: size-agnostic parsing, external data confined to a bundle.

External data (tensors stored in side files, required past protobuf's 2 GB limit) is the one
place where an ONNX file names paths on disk. A path is honoured only when it resolves to a
regular file inside the bundle directory: absolute paths, `..` components and symbolic links
that lead outside are refused (onnx itself shipped path-traversal bugs here:
CVE-2024-27318, CVE-2024-5187), so the parser never reads outside what the user uploaded.

A *bundle* is a zip archive holding exactly one `.onnx` file plus the data files it names,
with paths relative to the zip root (`load_onnx_bundle`).
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from google.protobuf.message import DecodeError
from onnx import GraphProto, ModelProto, TensorProto

from service.errors import ModelFormatError

# A bundle's files are extracted to a temporary directory: cap what a zip bomb can write.
DEFAULT_MAX_BUNDLE_BYTES = 8 * 1024**3


def load_onnx(data: bytes, *, bundle_dir: Path | None = None) -> ModelProto:
    """Parse ONNX bytes; resolve external data only from files inside `bundle_dir`."""
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelFormatError(f"the file is not a valid ONNX model: {exc}") from exc
    if not model.HasField("graph"):
        raise ModelFormatError("the file is not a valid ONNX model: it has no graph")
    resolve_external_data(model, bundle_dir)
    return model


def load_onnx_bundle(zip_bytes: bytes, *, max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES) -> ModelProto:
    """Load a zip holding one `.onnx` file and its external data files."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(zip_bytes))
    except zipfile.BadZipFile as exc:
        raise ModelFormatError(f"the bundle is not a valid zip archive: {exc}") from exc
    with archive, tempfile.TemporaryDirectory(prefix="gradhealth-bundle-") as tmp:
        root = Path(tmp)
        total = 0
        models: list[str] = []
        for info in archive.infolist():
            name = info.filename
            if info.is_dir():
                continue
            _check_relative(name, "bundle member")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ModelFormatError(
                    f"bundle member '{name}' is a symbolic link; links are refused"
                )
            total += info.file_size
            if total > max_bytes:
                raise ModelFormatError(
                    f"the bundle unpacks to more than {max_bytes} bytes; upload a smaller model"
                )
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(target, "wb") as dst:
                _copy_capped(src, dst, info.file_size)
            if name.lower().endswith(".onnx"):
                models.append(name)
        if len(models) != 1:
            found = ", ".join(models) or "none"
            raise ModelFormatError(f"a bundle must contain exactly one .onnx file (found: {found})")
        return load_onnx((root / models[0]).read_bytes(), bundle_dir=(root / models[0]).parent)


def _copy_capped(src: IO[bytes], dst: IO[bytes], declared: int) -> None:
    written = 0
    while chunk := src.read(1 << 20):
        written += len(chunk)
        if written > declared:  # the header lied about the size
            raise ModelFormatError("a bundle member is larger than its zip header says")
        dst.write(chunk)


def _check_relative(location: str, what: str) -> PurePosixPath:
    path = PurePosixPath(location.replace("\\", "/"))
    if not location or path.is_absolute() or location.startswith(("/", "\\")) or ":" in location:
        raise ModelFormatError(
            f"{what} '{location}' is an absolute path; external data must be a path relative "
            "to the model inside its bundle"
        )
    if any(part == ".." for part in path.parts):
        raise ModelFormatError(
            f"{what} '{location}' goes outside the bundle ('..'); external data must stay "
            "inside the uploaded bundle"
        )
    return path


def iter_tensors(graph: GraphProto) -> Iterator[TensorProto]:
    """Every tensor stored in a graph: initializers and attribute tensors, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from iter_tensors(attr.g)
            for sub in attr.graphs:
                yield from iter_tensors(sub)


def resolve_external_data(model: ModelProto, bundle_dir: Path | None) -> None:
    """Replace every external-data reference by the bytes it names, read from `bundle_dir`."""
    for tensor in iter_tensors(model.graph):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        _check_relative(location, f"external data location of tensor '{tensor.name}'")
        if bundle_dir is None:
            raise ModelFormatError(
                f"tensor '{tensor.name}' keeps its data in a separate file '{location}'; upload "
                "a zip bundle containing the .onnx file and its data files"
            )
        root = Path(bundle_dir).resolve()
        path = (root / location).resolve()  # follows links: a link out of the bundle is caught
        if not path.is_relative_to(root):
            raise ModelFormatError(
                f"external data '{location}' of tensor '{tensor.name}' resolves outside the "
                "bundle (a symbolic link?); external data must stay inside the uploaded bundle"
            )
        if not path.is_file():
            raise ModelFormatError(
                f"external data file '{location}' of tensor '{tensor.name}' is not in the bundle"
            )
        offset = int(info.get("offset", 0) or 0)
        size = os.path.getsize(path)
        length = int(info["length"]) if info.get("length") else size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise ModelFormatError(
                f"external data of tensor '{tensor.name}' (offset {offset}, length {length}) "
                f"lies outside the file '{location}' ({size} bytes)"
            )
        with open(path, "rb") as handle:
            handle.seek(offset)
            tensor.raw_data = handle.read(length)
        del tensor.external_data[:]
        tensor.data_location = TensorProto.DEFAULT


# The path rule for bundle members and external data locations, for the API's upload check
# (service/storage/sniff.py), which applies it before accepting a bundle.
check_relative = _check_relative

__all__ = [
    "check_relative",
    "iter_tensors",
    "load_onnx",
    "load_onnx_bundle",
    "resolve_external_data",
]

"""Which model format a file is, from its content (CONTRACT.md §2: never from the name alone).

- torch.export `.pt2`: a zip whose members include `<root>/archive_format` or
  `<root>/models/*.json` (the serialized ExportedProgram).
- TorchScript: a zip with `<root>/code/` (the TorchScript source) or `<root>/constants.pkl`.
- ONNX: a protobuf `ModelProto` that parses and holds a graph; or an ONNX *bundle*, a zip
  holding exactly one `.onnx` file plus the external data files it names (what
  `torch.onnx.export(dynamo=True)` writes next to the model: `model.onnx` + `model.onnx.data`).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable

from service.engine.report import ModelFormat
from service.errors import ModelFormatError

_ZIP_MAGIC = b"PK\x03\x04"


def detect_format(data: bytes) -> ModelFormat:
    if not data:
        raise ModelFormatError("the model file is empty")
    if data.startswith(_ZIP_MAGIC):
        return _zip_format(data)
    if _is_onnx(data):
        return "onnx"
    raise ModelFormatError(
        "the model file is not ONNX, TorchScript or a torch.export program (.pt2); "
        "save it with torch.onnx.export, torch.jit.save or torch.export.save"
    )


def _zip_format(data: bytes) -> ModelFormat:
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except zipfile.BadZipFile as exc:
        raise ModelFormatError(f"the model file is a damaged zip archive ({exc})") from exc
    return format_of_zip_members(names)


def format_of_zip_members(names: Iterable[str]) -> ModelFormat:
    """torch.export, TorchScript or an ONNX bundle from a zip's member names; shared with the
    API's upload check (service/storage/sniff.py), which must not import torch."""
    names = list(names)
    members = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if "archive_format" in members or any(
        m.startswith("models/") and m.endswith(".json") for m in members
    ):
        return "torch_export"
    if "constants.pkl" in members or any(m.startswith("code/") for m in members):
        return "torchscript"
    onnx_files = [n for n in names if n.lower().endswith(".onnx") and not n.endswith("/")]
    if len(onnx_files) == 1:
        return "onnx"  # the data files it names are checked when the bundle is loaded
    if len(onnx_files) > 1:
        raise ModelFormatError(
            "the zip archive holds several .onnx files "
            f"({', '.join(sorted(onnx_files)[:5])}); an ONNX bundle must hold exactly one "
            ".onnx file plus its external data files"
        )
    if "data.pkl" in members:
        raise ModelFormatError(
            "the model file is a torch.save checkpoint (pickled module or state dict), which "
            "cannot be run safely; save the model with torch.export.save (.pt2) or torch.jit.save"
        )
    raise ModelFormatError(
        "the model file is a zip archive but neither a torch.export program, TorchScript nor "
        "an ONNX bundle (one .onnx file plus its external data files)"
    )


def _is_onnx(data: bytes) -> bool:
    import onnx

    try:
        model = onnx.ModelProto()
        model.ParseFromString(data)
    except Exception:
        return False
    return model.HasField("graph") and (len(model.graph.node) > 0 or len(model.graph.output) > 0)

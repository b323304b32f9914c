"""Multipart uploads for the endpoints: stream the body into spooled files (413 past the
limit, while reading), then check each file's content and store it in the blob store."""

from __future__ import annotations

from fastapi import Request

from service.config import Settings
from service.errors import BadInputError
from service.storage import SpooledUpload
from service.storage.multipart import MultipartForm, read_multipart


async def receive_form(
    request: Request, settings: Settings, *, files: tuple[str, ...]
) -> MultipartForm:
    form = await read_multipart(
        request,
        spool_dir=settings.upload_tmp_dir,
        max_bytes=settings.max_upload_bytes,
        file_fields=files,
    )
    missing = [name for name in files if name not in form.files]
    if missing:
        form.discard()
        raise BadInputError(
            f"missing file field(s) {missing}: send multipart/form-data with "
            + ", ".join(f"'{name}'" for name in files)
        )
    return form


def multipart_body(
    files: dict[str, str], fields: dict[str, dict[str, object]] | None = None
) -> dict[str, object]:
    """The OpenAPI `requestBody` of a streamed multipart endpoint (the endpoint reads the raw
    stream itself, so FastAPI cannot infer it): file inputs and optional text fields."""
    properties: dict[str, object] = {
        name: {"type": "string", "format": "binary", "description": text}
        for name, text in files.items()
    }
    properties.update(fields or {})
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": list(files),
                        "properties": properties,
                    }
                }
            },
        }
    }


__all__ = ["MultipartForm", "SpooledUpload", "multipart_body", "receive_form"]

"""A streaming `multipart/form-data` reader: file parts go straight into `SpooledUpload`s, so
the size limit is enforced while the body arrives (Starlette's own form parsing reads the whole
body before an endpoint sees it, which would accept a 10 GB upload before refusing it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from service.errors import BadInputError, GradhealthError, PayloadTooLargeError
from service.storage.spool import SpooledUpload

MAX_TEXT_FIELD_BYTES = 64 * 1024
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries, part headers, text fields


class UnsupportedMediaTypeError(GradhealthError):
    code = "unsupported_media_type"
    status = 415


@dataclass
class MultipartForm:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, SpooledUpload] = field(default_factory=dict)

    def discard(self) -> None:
        for upload in self.files.values():
            upload.discard()


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)
    upload: SpooledUpload | None = None
    text: bytearray = field(default_factory=bytearray)


async def read_multipart(
    request: Request, *, spool_dir: Path, max_bytes: int, file_fields: tuple[str, ...]
) -> MultipartForm:
    """Reads the body; `file_fields` are the names that may carry files (each up to
    `max_bytes`). Raises 413 past a limit, 415/422 for a body that is not the expected form."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise UnsupportedMediaTypeError(
            f"send the upload as multipart/form-data with the file field(s) {list(file_fields)}"
        )
    declared = request.headers.get("content-length")
    limit = max_bytes * len(file_fields) + MULTIPART_OVERHEAD_BYTES
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(
            f"the request declares {declared} bytes, more than the limit of {max_bytes} bytes per "
            "file (GRADHEALTH_MAX_UPLOAD_BYTES); send a smaller file or raise the limit"
        )

    form = MultipartForm()
    events: list[tuple[str, Any]] = []
    current = _Part()
    header_field = bytearray()
    header_value = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        events.append(("data", data[start:end]))

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        events.append(("header", (bytes(header_field).lower(), bytes(header_value))))
        header_field.clear()
        header_value.clear()

    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": lambda: events.append(("begin", None)),
            "on_part_data": on_part_data,
            "on_part_end": lambda: events.append(("end", None)),
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": lambda: events.append(("headers_done", None)),
        },
    )
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            for kind, value in events:
                current = _handle(kind, value, current, form, spool_dir, max_bytes, file_fields)
            events.clear()
        parser.finalize()
    except GradhealthError:
        form.discard()
        if current.upload is not None:
            current.upload.discard()
        raise
    except Exception as exc:  # python-multipart's parse errors
        form.discard()
        raise BadInputError(f"the multipart body is malformed ({exc})") from exc
    return form


def _handle(
    kind: str,
    value: Any,
    part: _Part,
    form: MultipartForm,
    spool_dir: Path,
    max_bytes: int,
    file_fields: tuple[str, ...],
) -> _Part:
    if kind == "begin":
        return _Part()
    if kind == "header":
        name, raw = value
        part.headers[name] = raw
    elif kind == "headers_done":
        _, options = parse_options_header(part.headers.get(b"content-disposition", b""))
        part.name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        part.filename = filename.decode("utf-8", "replace") if filename is not None else None
        if part.name in file_fields:
            if part.name in form.files:
                raise BadInputError(f"the field '{part.name}' was sent twice; send one file")
            part.upload = SpooledUpload(
                spool_dir, max_bytes=max_bytes, field=part.name, filename=part.filename
            )
            form.files[part.name] = part.upload
        elif part.filename is not None:
            raise BadInputError(
                f"unexpected file field '{part.name}'; files go in {list(file_fields)}"
            )
    elif kind == "data":
        if part.upload is not None:
            part.upload.write(value)
        else:
            part.text.extend(value)
            if len(part.text) > MAX_TEXT_FIELD_BYTES:
                raise BadInputError(
                    f"the form field '{part.name}' is longer than {MAX_TEXT_FIELD_BYTES} bytes"
                )
    elif kind == "end":
        if part.upload is not None:
            part.upload.finish()
        else:
            form.fields[part.name] = part.text.decode("utf-8", "replace")
    return part

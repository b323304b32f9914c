"""One error shape for every answer that is not a success: `{"error": {code, message}}`.

GradhealthError → its status; request validation → 422 `validation_error` (with the pydantic
details under `error.details`); unknown routes / methods → 404 / 405 in the same shape; any
other exception → 500 `internal_error` (a defect: logged with its traceback).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import GradhealthError

log = logging.getLogger(__name__)
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message, **extra}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _describe(errors: list[Any]) -> str:
    parts = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


async def handle_gradhealth_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GradhealthError)
    if exc.status >= 500:
        log.error("internal error %s: %s", exc.code, exc.message, exc_info=exc)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return error_response(exc.status, exc.code, exc.message, headers)


async def handle_validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{k: v for k, v in err.items() if k in ("loc", "msg", "type")} for err in exc.errors()]
    return error_response(422, "validation_error", _describe(errors), details=errors)


async def handle_http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    headers = dict(exc.headers) if exc.headers else None
    return error_response(exc.status_code, code, str(exc.detail), headers)


async def handle_unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "internal error (a defect: see the server log)")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GradhealthError, handle_gradhealth_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_error)
    app.add_exception_handler(Exception, handle_unexpected)

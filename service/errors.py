"""One error type for everything a user or client can be told about.

`GradhealthError(code, message, status)`: the API turns it into
`{"error": {"code", "message"}}` with `status`; the CLI prints `message` on stderr and exits 2
(bad input, status < 500) or 3 (internal failure). Messages name the thing the user must change.
"""

from __future__ import annotations


class GradhealthError(Exception):
    """Base error: a stable machine-readable `code`, a sentence for people, an HTTP status."""

    code: str = "internal_error"
    status: int = 500

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    @property
    def is_client_error(self) -> bool:
        return self.status < 500

    def to_dict(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class BadInputError(GradhealthError):
    """Something the user supplied (model, batch, option) cannot be used as given."""

    code = "bad_input"
    status = 422


class UnsupportedModelError(BadInputError):
    """The model uses something gradhealth cannot run (an op, an attribute, a format)."""

    code = "unsupported_model"


class ModelFormatError(BadInputError):
    """The uploaded bytes are not a model in any supported format, or are malformed."""

    code = "bad_model"


class BatchError(BadInputError):
    """The sample batch cannot feed the model (missing input, wrong shape or dtype, bad file)."""

    code = "bad_batch"


class NotFoundError(GradhealthError):
    code = "not_found"
    status = 404


class PayloadTooLargeError(GradhealthError):
    code = "payload_too_large"
    status = 413


class JobTimeoutError(GradhealthError):
    code = "timeout"
    status = 500


class EngineError(GradhealthError):
    """gradhealth itself failed on an input that should work (a converter or probe defect):
    a 5xx, exit 3, never blamed on the user."""

    code = "engine_error"
    status = 500


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name: torch's and
    onnxruntime's errors carry pages of context after the sentence a person needs."""
    for line in str(exc).strip().splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__

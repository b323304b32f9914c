"""An upload on its way in: written to a temporary file while its sha256 and size are computed,
refused (413) the moment it grows past the limit, never held in memory."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from service.errors import PayloadTooLargeError


class SpooledUpload:
    def __init__(self, directory: Path, *, max_bytes: int, field: str, filename: str | None):
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="upload-", dir=directory)
        self._file = os.fdopen(fd, "wb")
        self.path = Path(name)
        self.field = field
        self.filename = filename
        self.max_bytes = max_bytes
        self.size_bytes = 0
        self._hash = hashlib.sha256()
        self.sha256 = ""

    def write(self, chunk: bytes) -> None:
        self.size_bytes += len(chunk)
        if self.size_bytes > self.max_bytes:
            self.discard()
            raise PayloadTooLargeError(
                f"the upload '{self.field}' is larger than the limit of {self.max_bytes} bytes "
                "(GRADHEALTH_MAX_UPLOAD_BYTES); send a smaller file or raise the limit"
            )
        self._hash.update(chunk)
        self._file.write(chunk)

    def finish(self) -> None:
        self._file.close()
        self.sha256 = self._hash.hexdigest()

    def head(self, n: int) -> bytes:
        with self.path.open("rb") as f:
            return f.read(n)

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)

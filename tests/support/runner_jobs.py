"""What the in-process JobRunner tests share: blobs in a folder, npz batches, and reports
compared without what differs between two runs of the same job."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch


def store_blob(directory: Path, data: bytes) -> str:
    """Write `data` as a content-addressed blob in `directory`; returns its sha256."""
    sha = hashlib.sha256(data).hexdigest()
    (directory / sha).write_bytes(data)
    return sha


def npz_batch(x: torch.Tensor, target: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=x.numpy(), target=target)
    return buffer.getvalue()


def comparable_report(report: dict[str, Any]) -> str:
    """The report without what may differ between two runs of the same job."""
    report = dict(report)
    report.pop("timing")
    report.pop("created_at")
    report["notes"] = [n for n in report["notes"] if "worker's cache" not in n]
    return json.dumps(report, sort_keys=True)

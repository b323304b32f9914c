"""The diagnosis engine: pure (no FastAPI, no SQLAlchemy, no global state).

`diagnose(model, batch, options)` is the one entry point; the CLI, the workers and the
tests all call it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.engine.report import Report


def diagnose(model: Any, batch: Any, options: Any = None) -> Report:
    """See `service.engine.pipeline.diagnose` (imported lazily: torch is heavy)."""
    from service.engine.pipeline import diagnose as _diagnose

    return _diagnose(model, batch, options)

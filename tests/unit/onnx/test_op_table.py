"""README.md's "Supported ONNX ops" section is generated from the registry and up to date."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "gen_op_table.py"


def _script():
    spec = importlib.util.spec_from_file_location("gen_op_table", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_ops_section_is_up_to_date() -> None:
    script = _script()
    text = script.README.read_text()
    assert script.BEGIN in text and script.END in text
    assert script.updated(text) == text, "run: .venv/bin/python scripts/gen_op_table.py"


def test_ops_section_lists_every_registered_op() -> None:
    from service.engine.onnx.registry import supported_ops

    section = _script().render()
    for _, op_type in supported_ops():
        assert op_type in section

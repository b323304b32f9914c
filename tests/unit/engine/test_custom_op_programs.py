"""A .pt2 program that calls an operator of a library not installed here (torchao's
quantisation primitives, say): the error names the op and its library, is bad input (exit 2),
and torch's deserialisation tracebacks do not flood stderr."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from service.engine.formats.torch_export import load_torch_export
from service.errors import ModelFormatError

_SAVE_WITH_A_CUSTOM_OP = """
import sys, torch
lib = torch.library.Library("gradhealth_test_lib", "DEF")
lib.define("twice(Tensor x) -> Tensor")
lib.impl("twice", lambda x: 2 * x, "CompositeExplicitAutograd")
lib.impl("twice", lambda x: torch.empty_like(x), "Meta")

class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.ops.gradhealth_test_lib.twice(self.fc(x))

program = torch.export.export(M(), (torch.randn(2, 4),))
torch.export.save(program, sys.argv[1])
"""


@pytest.fixture(scope="module")
def program_with_custom_op(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("custom") / "custom.pt2"
    # saved by another process: the op is registered there, not here
    subprocess.run(
        [sys.executable, "-c", _SAVE_WITH_A_CUSTOM_OP, str(path)], check=True, timeout=300
    )
    return Path(path).read_bytes()


def test_the_error_names_the_unregistered_op_and_its_library(
    program_with_custom_op: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("torch.export")
    handlers = logger.handlers[:]
    with pytest.raises(ModelFormatError) as raised:
        load_torch_export(program_with_custom_op)
    message = str(raised.value)
    assert "torch.ops.gradhealth_test_lib.twice" in message
    assert "'gradhealth_test_lib' library that is not installed here" in message
    assert "Traceback" not in message and "\n" not in message
    assert logger.handlers == handlers  # torch's own handler is back
    assert not [r for r in caplog.records if r.name == "torch.export"]

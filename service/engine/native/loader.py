"""Build and load the engine's C++ extensions (see the package docstring)."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import sys
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
RECURRENT_CPU = "recurrent_cpu"
# -O3: the element loops are auto-vectorised (SSE2 on any x86-64, AVX2 clones where
# activations.h's target_clones ask; no -march flag, so a build runs on every CPU of its
# architecture). -fno-trapping-math lets the compiler evaluate both sides of the activations'
# branch-free selects (clamps, the two tanh formulas), without which it vectorises nothing;
# it changes no result (NaN and inf stay what IEEE arithmetic makes them). -fopenmp:
# at::parallel_for is a header template whose `#pragma omp parallel` is compiled into this
# extension; without the flag the pragma is dropped and every parallel_for runs on the calling
# thread alone. Linked
# with it, the extension needs libgomp.so.1, which the process already has loaded from torch's
# own lib/ (one OpenMP runtime, torch's thread pool). Linux only: that is where torch's wheels
# bring GNU libgomp (elsewhere the loops run on one thread, as before).
OPENMP = ("-fopenmp",) if sys.platform.startswith("linux") else ()
CFLAGS = ("-O3", "-fno-trapping-math", *OPENMP)
LDFLAGS = OPENMP


class BuildError(RuntimeError):
    """The C++ extension could not be compiled (the message says what is missing)."""


def _module_name(name: str) -> str:
    return f"gradhealth_{name}"


def _key(name: str) -> str:
    """What a build depends on: the source, the compiler flags, torch and Python."""
    import torch

    digest = hashlib.sha256((SOURCE_DIR / f"{name}.cpp").read_bytes())
    for header in sorted(SOURCE_DIR.glob("*.h")):  # what the source includes
        digest.update(header.read_bytes())
    digest.update(" ".join((*CFLAGS, *LDFLAGS)).encode())
    digest.update(torch.__version__.encode())
    digest.update(f"{sys.version_info[:2]}-{platform.machine()}".encode())
    return digest.hexdigest()[:16]


def native_root() -> Path:
    """Where builds go: $GRADHEALTH_NATIVE_DIR, else inside the Python environment (a new
    virtualenv starts with none, so a stale build never outlives its torch)."""
    configured = os.environ.get("GRADHEALTH_NATIVE_DIR")
    return Path(configured) if configured else Path(sys.prefix) / "share" / "gradhealth" / "native"


def built_dir(name: str = RECURRENT_CPU) -> Path:
    return native_root() / f"{name}-{_key(name)}"


def _library(name: str) -> Path:
    return built_dir(name) / f"{_module_name(name)}.so"


def build(name: str = RECURRENT_CPU, verbose: bool = False) -> Path:
    """Compile `name`.cpp (a no-op when this source is already built for this torch); returns
    the built library. Needs a C++ compiler and ninja."""
    from torch.utils import cpp_extension

    library = _library(name)
    if library.exists():
        return library
    directory = library.parent
    directory.mkdir(parents=True, exist_ok=True)
    # ninja from this environment's bin/ (the `ninja` package) even when it is not on PATH
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    try:
        cpp_extension.verify_ninja_availability()
        cpp_extension.load(
            _module_name(name),
            [str(SOURCE_DIR / f"{name}.cpp")],
            # copies: load() appends torch's libraries to the list it is given, which
            # changed this build's key in the process that built it (a test building,
            # then loading, looked for another folder)
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            build_directory=str(directory),
            verbose=verbose,
        )
    except (RuntimeError, OSError, ImportError) as exc:
        raise BuildError(
            f"building {name}.cpp failed (a C++ compiler and ninja are needed): {exc}"
        ) from exc
    if not library.exists():
        raise BuildError(f"building {name}.cpp produced no {library}")
    _loaded.cache_clear()
    return library


def _enabled() -> bool:
    return os.environ.get("GRADHEALTH_NATIVE", "1") not in ("0", "false", "no")


@functools.cache
def _loaded(name: str) -> ModuleType | None:
    library = _library(name)
    if not library.exists():
        log.warning(  # an installation gap that only shows as slowness: say it once
            "the C++ %s code is not built for this torch (%s); using the Python ones "
            "(same results, slower): run `gradhealth build-native`",
            name,
            library.parent,
        )
        return None
    import torch  # noqa: F401  (the extension links against torch's libraries, loaded first)

    spec = importlib.util.spec_from_file_location(_module_name(name), library)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:  # built for another torch build with the same version string
        log.warning("could not load %s (%s); using the Python code", library, exc)
        return None
    return module


def load_recurrent_cpu() -> ModuleType | None:
    """The built recurrent-loop extension, or None (not built, or GRADHEALTH_NATIVE=0)."""
    return _loaded(RECURRENT_CPU) if _enabled() else None

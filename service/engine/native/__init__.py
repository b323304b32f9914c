"""C++ parts of the engine, compiled against the installed torch (torch's cpp_extension).

Today one: `recurrent_cpu`, the per-step loops of recurrent layers on the CPU (recurrent_cpu.cpp
says why).
They are built once, ahead of use, by `gradhealth build-native` (`make install` and the Dockerfile
run it) into a folder keyed by the source, the torch and the Python version; a process only loads
what is built and never compiles on its own, so a diagnosis never waits for a compiler. Where the
build is missing (no compiler, a new torch), the engine runs the same loops in Python: same
results, slower. `GRADHEALTH_NATIVE=0` turns the C++ parts off.
"""

from service.engine.native.loader import BuildError, build, built_dir, load_recurrent_cpu

__all__ = ["BuildError", "build", "built_dir", "load_recurrent_cpu"]

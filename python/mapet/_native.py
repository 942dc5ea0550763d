"""Loads the Swift extension after the OpenBLAS it links against.

`mapet._core` needs ``libscipy_openblas.so`` from the ``scipy-openblas32`` wheel. Its RPATH
points at the usual site-packages neighbour; loading the library here first (RTLD_GLOBAL)
also covers installs where the two packages live in different directories.
"""
import atexit
import ctypes
import os
import platform

import scipy_openblas32 as _openblas

# The Swift kernels are compiled for x86-64-v3 (-target-cpu haswell); on an older CPU they would
# die on an illegal instruction, so say so instead (OpenBLAS picks its own kernels at run time).
_NEEDED = ("avx2", "fma", "f16c", "bmi2")


def _missing_cpu_features(cpuinfo: str = "/proc/cpuinfo") -> list:
    """The x86-64-v3 features this CPU lacks ([] when all are there or the CPU cannot be read)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return []
    return [] if flags is None else [x for x in _NEEDED if x not in flags]


_missing = _missing_cpu_features()
if _missing:
    raise ImportError(f"mapet's engine needs an x86-64-v3 CPU (AVX2, FMA, F16C, BMI2); this one lacks "
                      f"{', '.join(_missing)}. Build from source with MAPET_TARGET_CPU=<your cpu> (see the README).")

_blas = ctypes.CDLL(
    os.path.join(_openblas.get_lib_dir(), _openblas.get_library(fullname=True)),
    mode=ctypes.RTLD_GLOBAL,
)

from . import _core  # noqa: E402  (must follow the BLAS preload)

# At exit, long native calls still running in (daemon) threads stop at their next chunk
# boundary before the interpreter tears down the arrays they read.
atexit.register(_core.request_shutdown, 5.0)

__all__ = ["_core"]

"""Loads the Swift extension after the OpenBLAS it links against.

`mapet._core` needs ``libscipy_openblas.so`` from the ``scipy-openblas32`` wheel. Its RPATH
points at the usual site-packages neighbour; loading the library here first (RTLD_GLOBAL)
also covers installs where the two packages live in different directories.
"""
import atexit
import ctypes
import os

import scipy_openblas32 as _openblas

_blas = ctypes.CDLL(
    os.path.join(_openblas.get_lib_dir(), _openblas.get_library(fullname=True)),
    mode=ctypes.RTLD_GLOBAL,
)

from . import _core  # noqa: E402  (must follow the BLAS preload)

# At exit, long native calls still running in (daemon) threads stop at their next chunk
# boundary before the interpreter tears down the arrays they read.
atexit.register(_core.request_shutdown, 5.0)

__all__ = ["_core"]

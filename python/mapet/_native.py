"""Loads the Swift extension after the OpenBLAS it links against.

`mapet._core` needs ``libscipy_openblas.so`` from the ``scipy-openblas32`` wheel. Its RPATH
points at the usual site-packages neighbour; loading the library here first (RTLD_GLOBAL)
also covers installs where the two packages live in different directories.
"""
import ctypes
import os

import scipy_openblas32 as _openblas

_blas = ctypes.CDLL(
    os.path.join(_openblas.get_lib_dir(), _openblas.get_library(fullname=True)),
    mode=ctypes.RTLD_GLOBAL,
)

from . import _core  # noqa: E402  (must follow the BLAS preload)

__all__ = ["_core"]

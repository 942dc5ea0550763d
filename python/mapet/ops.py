"""Single kernels of the Swift engine on NumPy arrays (zero-copy in and out).

These are the building blocks models use; they are exposed for testing and for people
who want one fast operation. Inputs are converted once with ``np.ascontiguousarray``
(no copy when already float32 and C-contiguous); outputs may be supplied with ``out=``
and are then written in place.
"""
from typing import Optional

import numpy as np

from ._native import _core


def _f32(x: np.ndarray, name: str) -> np.ndarray:
    if x is None:
        raise TypeError(f"{name}: expected an array, got None")
    return np.ascontiguousarray(x, dtype=np.float32)


def matmul(a: np.ndarray, b: np.ndarray, out: Optional[np.ndarray] = None, *,
           trans_a: bool = False, trans_b: bool = False,
           alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """Float32 GEMM through OpenBLAS: ``out = alpha·op(a)·op(b) + beta·out``.

    Args:
        a: [M, K] (or [K, M] with ``trans_a``).
        b: [K, N] (or [N, K] with ``trans_b``).
        out: optional float32 C-contiguous [M, N] written in place.
        trans_a, trans_b: use the transpose of ``a`` / ``b``.
        alpha, beta: scalars of the update.

    Returns:
        ``out`` (the same object when given).

    Example:
        >>> import numpy as np, mapet
        >>> mapet.ops.matmul(np.eye(2, dtype=np.float32), np.ones((2, 3), np.float32)).shape
        (2, 3)
    """
    a, b = _f32(a, "a"), _f32(b, "b")
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"matmul: expected 2-d a and b, got shapes {a.shape} and {b.shape}")
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    if out is None:
        if beta != 0.0:
            raise ValueError("matmul: beta != 0 needs out=")
        out = np.empty((m, n), dtype=np.float32)
    _core.gemm(a, b, out, bool(trans_a), bool(trans_b), float(alpha), float(beta))
    return out


def gelu(x: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Exact GELU, ``x·Φ(x)``, elementwise on any shape.

    Args:
        x: float array (converted to float32).
        out: optional float32 C-contiguous array of the same shape, written in place.

    Returns:
        The result array.
    """
    x = _f32(x, "x")
    if out is None:
        out = np.empty_like(x)
    if out.shape != x.shape:
        raise ValueError(f"gelu: out has shape {out.shape}, expected {x.shape}")
    _core.gelu_forward(x.reshape(-1), out.reshape(-1))
    return out


def gelu_backward(dout: np.ndarray, x: np.ndarray, dx: Optional[np.ndarray] = None) -> np.ndarray:
    """Accumulate the GELU gradient: ``dx += dout·gelu'(x)``; returns ``dx``."""
    x, dout = _f32(x, "x"), _f32(dout, "dout")
    if dout.shape != x.shape:
        raise ValueError(f"gelu_backward: dout has shape {dout.shape}, x has {x.shape}")
    if dx is None:
        dx = np.zeros_like(x)
    _core.gelu_backward(dout.reshape(-1), x.reshape(-1), dx.reshape(-1))
    return dx


# Objective kernels (defined with their objectives in mapet.objectives).
from .objectives import ccvit_pixel_targets, dtm_loss, masked_mse  # noqa: E402,F401

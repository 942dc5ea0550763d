"""What Python does before handing arrays and numbers to the engine: convert, nothing else.

The extension (``PyModule``) checks shapes, dtypes and ranges and words the errors; these helpers
only give it what it reads (C-contiguous arrays of its dtype, 64-bit seed patterns), as faiss's
Python layer does with ``np.ascontiguousarray``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

U64 = (1 << 64) - 1


def f32(x: Any) -> np.ndarray:
    """``x`` as a C-contiguous float32 array (no copy when it already is one)."""
    return np.ascontiguousarray(x, dtype=np.float32)


def i32(x: Any) -> np.ndarray:
    """``x`` as a C-contiguous int32 array (no copy when it already is one)."""
    return np.ascontiguousarray(x, dtype=np.int32)


def i64(x: Any) -> np.ndarray:
    """``x`` as a C-contiguous int64 array (no copy when it already is one)."""
    return np.ascontiguousarray(x, dtype=np.int64)


def seed_bits(seed: Any, name: str = "seed") -> int:
    """An int seed in [-2**63, 2**64) as the signed 64-bit pattern the engine's generators take
    (seeds ≥ 2**63 wrap to negative patterns; the generator sees the same 64 bits)."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(seed).__name__}")
    v = int(seed) & U64
    return v - (1 << 64) if v >= (1 << 63) else v

"""What Python does before handing arrays and numbers to the engine, and with what it hands back:
convert, nothing else.

The extension (``PyModule``) checks shapes, dtypes and ranges and words the errors; these helpers
only give it what it reads (C-contiguous arrays of its dtype, 64-bit seed patterns), as faiss's
Python layer does with ``np.ascontiguousarray``.
"""
from __future__ import annotations

from typing import Any, List, Optional

import numpy as np

U64 = (1 << 64) - 1


def f32(x: Any, name: str = "x") -> np.ndarray:
    """``x`` as a C-contiguous float32 array (no copy when it already is one); None is refused
    (NumPy would make it a NaN scalar)."""
    if x is None:
        raise TypeError(f"{name}: expected an array, got None")
    return np.ascontiguousarray(x, dtype=np.float32)


def rows_f32(x: Any, name: str) -> np.ndarray:
    """``x`` as float32 whose rows the engine can read in place: a 2-d float32 array with unit
    stride along its rows passes uncopied (a column slice ``big[:, :k]`` included), anything else
    goes through ``np.ascontiguousarray``."""
    if x is None:
        raise TypeError(f"{name}: expected an array, got None")
    if (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 2
            and x.strides[1] == 4 and x.strides[0] >= 4 * x.shape[1] and x.strides[0] % 4 == 0):
        return x
    return np.ascontiguousarray(x, dtype=np.float32)


def opt_f32(x: Any, name: str) -> "np.ndarray | None":
    """``f32(x)``, or None for None (an optional input such as a bias)."""
    return None if x is None else f32(x, name)


def images(x: Any, name: str = "images") -> np.ndarray:
    """Images [B, C, H, W] of any float dtype as C-contiguous float32. Integer images are refused
    rather than converted (uint8 pixels in 0..255 are not the [0, 1] floats the models expect);
    the engine checks the number of dimensions and the shape against the model (a 0-d array stays
    0-d, so its message shows what arrived)."""
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{name}: expected a floating-point array [B, C, H, W] (float32), got dtype {a.dtype}")
    return np.asarray(a, dtype=np.float32, order="C")


def i32(x: Any, name: str) -> np.ndarray:
    """Integer (or bool) array as C-contiguous int32, refusing values int32 cannot hold."""
    if x is None:
        raise TypeError(f"{name}: expected an integer array, got None")
    a = np.asarray(x)
    if a.dtype == np.bool_:
        return np.ascontiguousarray(a, dtype=np.int32)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name}: expected an integer or bool array, got dtype {a.dtype}")
    if not np.can_cast(a.dtype, np.int32) and a.size and (a.min() < -2**31 or a.max() >= 2**31):
        raise ValueError(f"{name}: values outside the int32 range (min {a.min()}, max {a.max()})")
    return np.ascontiguousarray(a, dtype=np.int32)


def indices(x: Any, name: str, what: str) -> np.ndarray:
    """Indices (class labels, visual tokens: ``what``) as int32. Only what the conversion would lose
    is refused here: floats and bools (truncated, or read as 0/1) and values beyond int32; the engine
    checks the shape and the range against the model."""
    a = np.asarray(x)
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name}: expected an integer array of {what}, got dtype {a.dtype}")
    return i32(a, name)


def seed_bits(seed: Any, name: str = "seed") -> int:
    """An int seed in [0, 2**64) as the signed 64-bit pattern the engine's generators take (seeds
    ≥ 2**63 become negative patterns; the generator sees the same 64 bits). The one seed rule of
    the package: TypeError for a non-int (bool included), ValueError outside [0, 2**64)."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name}: expected an int in [0, 2**64), got {type(seed).__name__}")
    v = int(seed)
    if not 0 <= v <= U64:
        raise ValueError(f"{name}: expected an int in [0, 2**64), got {v}")
    return v - (1 << 64) if v >= (1 << 63) else v


def outputs(result: Any) -> Any:
    """An engine call's result as NumPy: each tensor the engine allocated as an array (zero-copy),
    numbers (losses) and None unchanged, a tuple kept a tuple in its order."""
    if isinstance(result, tuple):
        return tuple(outputs(r) for r in result)
    return result if result is None or isinstance(result, (float, int)) else np.asarray(result)


def batches(x: np.ndarray, size: Optional[int]) -> List[np.ndarray]:
    """``x`` in slices of ``size`` along its first axis (None: one slice of all of it; none for an
    empty batch). A 0-d array is one slice as it is: the engine refuses it with its own message."""
    if x.ndim == 0:
        return [x]
    step = len(x) if size is None else int(size)
    return [x[i:i + step] for i in range(0, len(x), max(step, 1))]

"""Single kernels of the Swift engine on NumPy arrays (zero-copy in and out).

These are the building blocks models use; they are exposed for testing and for people
who want one fast operation. Inputs are converted once with ``np.ascontiguousarray``
(no copy when already float32 and C-contiguous); outputs may be supplied with ``out=``
and are then written in place.
"""
from typing import Optional

import numpy as np

from ._convert import f32 as _f32, indices
from ._native import _core
from .objectives import _i32
from ._runtime import warn_if_bf16_inactive



def _require_array(x, name: str) -> None:
    """An output argument must be a NumPy array (written in place), not anything array-like."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a float32 NumPy array to write into, got {type(x).__name__}")


def _rows_f32(x: np.ndarray, name: str) -> np.ndarray:
    """float32 2-d array with contiguous rows; a column slice ``big[:, :k]`` passes uncopied."""
    if x is None:
        raise TypeError(f"{name}: expected an array, got None")
    if (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 2
            and x.strides[1] == 4 and x.strides[0] >= 4 * x.shape[1] and x.strides[0] % 4 == 0):
        return x
    return np.ascontiguousarray(x, dtype=np.float32)


def matmul(a: np.ndarray, b: np.ndarray, out: Optional[np.ndarray] = None, *,
           trans_a: bool = False, trans_b: bool = False,
           alpha: float = 1.0, beta: float = 0.0, precision: str = "fp32") -> np.ndarray:
    """GEMM ``out = alpha·op(a)·op(b) + beta·out`` in float32 (OpenBLAS) or bf16.

    With ``precision="bf16"`` every element of ``a`` and ``b`` is rounded to bfloat16
    (round-to-nearest-even) and the products are summed in float32 by mapet's AVX512-BF16
    kernel (see :func:`mapet.bf16_info`); the error against the float32 product is about
    2⁻⁸·Σ|a·b| per element. Where that kernel is not active (CPU without avx512_bf16, or the
    environment variable ``MAPET_BF16=off``) the product is computed in float32 and one line
    is logged, once per process.

    Args:
        a: [M, K] (or [K, M] with ``trans_a``). Rows may be strided (``x[:, :k]`` is not copied).
        b: [K, N] (or [N, K] with ``trans_b``).
        out: optional float32 [M, N] with contiguous rows, written in place.
        trans_a, trans_b: use the transpose of ``a`` / ``b``.
        alpha, beta: scalars of the update (``beta == 0`` never reads ``out``).
        precision: ``"fp32"`` or ``"bf16"``.

    Returns:
        ``out`` (the same object when given).

    Example:
        >>> import numpy as np, mapet
        >>> mapet.ops.matmul(np.eye(2, dtype=np.float32), np.ones((2, 3), np.float32)).shape
        (2, 3)
        >>> mapet.ops.matmul(np.eye(2, dtype=np.float32), np.ones((2, 3), np.float32), precision="bf16")[0]
        array([1., 1., 1.], dtype=float32)
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"matmul: precision must be 'fp32' or 'bf16', got {precision!r}")
    a, b = _rows_f32(a, "a"), _rows_f32(b, "b")
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"matmul: expected 2-d a and b, got shapes {a.shape} and {b.shape}")
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    if out is None:
        if beta != 0.0:
            raise ValueError("matmul: beta != 0 needs out=")
        out = np.empty((m, n), dtype=np.float32)
    _require_array(out, "out")
    if precision == "bf16":
        warn_if_bf16_inactive("matmul(precision='bf16')")
        _core.gemm_bf16(a, b, out, bool(trans_a), bool(trans_b), float(alpha), float(beta))
    else:
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
    out = np.empty_like(x) if out is None else _zeros_or(out, x.shape, "out")
    _core.gelu_forward(x.reshape(-1), out.reshape(-1))
    return out


def gelu_backward(dout: np.ndarray, x: np.ndarray, dx: Optional[np.ndarray] = None) -> np.ndarray:
    """Accumulate the GELU gradient: ``dx += dout·gelu'(x)``; returns ``dx``."""
    x, dout = _f32(x, "x"), _f32(dout, "dout")
    if dout.shape != x.shape:
        raise ValueError(f"gelu_backward: dout has shape {dout.shape}, x has {x.shape}")
    dx = _zeros_or(dx, x.shape, "dx")
    _core.gelu_backward(dout.reshape(-1), x.reshape(-1), dx.reshape(-1))
    return dx


# Objective kernels (defined with their objectives in mapet.objectives).
from .objectives import ccvit_pixel_targets, dtm_loss, masked_mse  # noqa: E402,F401


# ---------------------------------------------------------------- transformer kernels
# Forward functions return their outputs and the cache the backward needs; backward
# functions take gradient arrays (zeros created when omitted) and ACCUMULATE into them.

def _zeros_or(x: Optional[np.ndarray], shape, name: str) -> np.ndarray:
    if x is None:
        return np.zeros(shape, np.float32)
    _require_array(x, name)
    if x.shape != tuple(shape) or x.dtype != np.float32 or not x.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous float32 array of shape {tuple(shape)}, got {x.dtype} {x.shape}")
    return x


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray):
    """LayerNorm over the last axis (eps 1e-6). x [R, C] → (out, mean [R], rstd [R])."""
    x, weight, bias = _f32(x, "x"), _f32(weight, "weight"), _f32(bias, "bias")
    if x.ndim != 2:
        raise ValueError(f"layer_norm: expected x [R, C], got shape {x.shape}")
    out = np.empty_like(x)
    mean = np.empty(x.shape[0], np.float32)
    rstd = np.empty(x.shape[0], np.float32)
    _core.layer_norm_forward(out, mean, rstd, x, weight, bias)
    return out, mean, rstd


def layer_norm_backward(dout, x, weight, mean, rstd, dx=None, dweight=None, dbias=None):
    """Accumulate LayerNorm gradients; returns (dx, dweight, dbias)."""
    x, dout = _f32(x, "x"), _f32(dout, "dout")
    dx = _zeros_or(dx, x.shape, "dx")
    dweight = _zeros_or(dweight, (x.shape[1],), "dweight")
    dbias = _zeros_or(dbias, (x.shape[1],), "dbias")
    _core.layer_norm_backward(dx, dweight, dbias, dout, x, _f32(weight, "weight"), _f32(mean, "mean"), _f32(rstd, "rstd"))
    return dx, dweight, dbias


def softmax(x: np.ndarray) -> np.ndarray:
    """Row softmax of x [R, C]."""
    x = _f32(x, "x")
    out = np.empty_like(x)
    _core.softmax_forward(out, x)
    return out


def softmax_backward(dout, out, dx=None):
    """dx += out ⊙ (dout − rowsum(dout ⊙ out)); returns dx."""
    out, dout = _f32(out, "out"), _f32(dout, "dout")
    dx = _zeros_or(dx, out.shape, "dx")
    _core.softmax_backward(dx, dout, out)
    return dx


def linear(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray] = None) -> np.ndarray:
    """x [R, IC] · weightᵀ [IC, OC] + bias (PyTorch Linear layout)."""
    x, weight = _f32(x, "x"), _f32(weight, "weight")
    out = np.empty((x.shape[0], weight.shape[0]), np.float32)
    _core.linear_forward(out, x, weight, None if bias is None else _f32(bias, "bias"))
    return out


def linear_backward(dout, x, weight, dx=None, dweight=None, dbias=None):
    """Accumulate Linear gradients; returns (dx, dweight, dbias)."""
    x, weight, dout = _f32(x, "x"), _f32(weight, "weight"), _f32(dout, "dout")
    dx = _zeros_or(dx, x.shape, "dx")
    dweight = _zeros_or(dweight, weight.shape, "dweight")
    dbias = _zeros_or(dbias, (weight.shape[0],), "dbias")
    _core.linear_backward(dx, dweight, dbias, dout, x, weight)
    return dx, dweight, dbias


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int, mask: Optional[np.ndarray] = None,
              precision: str = "fp32"):
    """Multi-head attention, q [B, M, C], k/v [B, Nk, C]; mask [B, M, Nk] bool (True = may attend).

    ``precision="bf16"`` rounds the inputs of QKᵀ and PV to bf16 and accumulates in fp32 (as the
    models do); softmax stays fp32.

    Returns (out [B, M, C], probs [B, heads, M, Nk]).
    """
    q, k, v = _f32(q, "q"), _f32(k, "k"), _f32(v, "v")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 3:
            raise ValueError(f"attention: expected {name} [B, {'M' if name == 'q' else 'N'}, C], got shape {t.shape}")
    out = np.empty_like(q)
    probs = np.empty((q.shape[0], int(heads), q.shape[1], k.shape[1]), np.float32)
    m = None if mask is None else _i32(mask, "mask")
    _core.attention_forward(out, probs, q, k, v, int(heads), m, precision)
    return out, probs


def attention_backward(dout, probs, q, k, v, heads, dq=None, dk=None, dv=None, precision: str = "fp32"):
    """Accumulate attention gradients; returns (dq, dk, dv). ``precision`` as in `attention`."""
    q, k, v, dout, probs = (_f32(a, n) for a, n in ((q, "q"), (k, "k"), (v, "v"), (dout, "dout"), (probs, "probs")))
    dq, dk, dv = _zeros_or(dq, q.shape, "dq"), _zeros_or(dk, k.shape, "dk"), _zeros_or(dv, v.shape, "dv")
    _core.attention_backward(dq, dk, dv, dout, probs, q, k, v, int(heads), precision)
    return dq, dk, dv


def residual(x, branch, gamma=None, keep=None):
    """x + keep[b]·gamma⊙branch for [B, T, C] (layer scale and drop path optional)."""
    x, branch = _f32(x, "x"), _f32(branch, "branch")
    out = np.empty_like(x)
    _core.residual_forward(out, x, branch, None if gamma is None else _f32(gamma, "gamma"),
                           None if keep is None else _f32(keep, "keep"))
    return out


def residual_backward(dout, branch, gamma=None, keep=None, dx=None, dbranch=None, dgamma=None):
    """Accumulate (dx, dbranch, dgamma) of ``residual``."""
    dout, branch = _f32(dout, "dout"), _f32(branch, "branch")
    dx = _zeros_or(dx, branch.shape, "dx")
    dbranch = _zeros_or(dbranch, branch.shape, "dbranch")
    dgamma = None if gamma is None else _zeros_or(dgamma, (branch.shape[2],), "dgamma")
    _core.residual_backward(dx, dbranch, dgamma, dout, branch, None if gamma is None else _f32(gamma, "gamma"),
                            None if keep is None else _f32(keep, "keep"))
    return dx, dbranch, dgamma


def drop_path_keep(batch: int, rate: float, seed: int = 0) -> np.ndarray:
    """Per-sample drop-path scales in {0, 1/(1-rate)} (timm drop_path with scale_by_keep)."""
    keep = np.empty(int(batch), np.float32)
    _core.drop_path_keep(keep, float(rate), int(seed))
    return keep


def dropout_mask(shape, rate: float, seed: int = 0) -> np.ndarray:
    """Element scales in {0, 1/(1-rate)} for inverted dropout."""
    mask = np.empty(shape, np.float32)
    _core.dropout_mask(mask.reshape(-1), float(rate), int(seed))
    return mask


def drop_path(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """x [B, ...] scaled per sample by keep [B]."""
    x = _f32(x, "x")
    out = np.empty_like(x)
    _core.scale_rows_forward(out.reshape(x.shape[0], -1), x.reshape(x.shape[0], -1), _f32(keep, "keep"))
    return out


def drop_path_backward(dout, keep, dx=None):
    dout = _f32(dout, "dout")
    dx = _zeros_or(dx, dout.shape, "dx")
    _core.scale_rows_backward(dx.reshape(dout.shape[0], -1), dout.reshape(dout.shape[0], -1), _f32(keep, "keep"))
    return dx


def dropout(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """x ⊙ mask (mask from ``dropout_mask``)."""
    x, mask = _f32(x, "x"), _f32(mask, "mask")
    if mask.shape != x.shape:
        raise ValueError(f"dropout: mask has shape {mask.shape}, x has {x.shape}")
    out = np.empty_like(x)
    _core.scale_rows_forward(out.reshape(1, -1), x.reshape(1, -1), mask.reshape(-1))
    return out


def dropout_backward(dout, mask, dx=None):
    dout, mask = _f32(dout, "dout"), _f32(mask, "mask")
    dx = _zeros_or(dx, dout.shape, "dx")
    _core.scale_rows_backward(dx.reshape(1, -1), dout.reshape(1, -1), mask.reshape(-1))
    return dx


def patch_embed(images: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray] = None):
    """Stride-p conv as patchify + GEMM. images [B, Cin, S, S], weight [C, Cin, p, p].

    Returns (out [B, n, C], patches [B, n, Cin·p·p]).
    """
    images, weight = _f32(images, "images"), _f32(weight, "weight")
    if images.ndim != 4 or weight.ndim != 4:
        raise ValueError(f"patch_embed: expected 4-d images and weight, got {images.shape} and {weight.shape}")
    B, S, p = images.shape[0], images.shape[2], weight.shape[2]
    n = (S // p) ** 2 if p > 0 else 0
    out = np.empty((B, n, weight.shape[0]), np.float32)
    patches = np.empty((B, n, weight.shape[1] * p * p), np.float32)
    _core.patch_embed_forward(out, patches, images, weight, None if bias is None else _f32(bias, "bias"))
    return out, patches


def patch_embed_backward(dout, patches, weight, img_size: int, dimages=None, dweight=None, dbias=None):
    """Accumulate (dimages, dweight, dbias) of ``patch_embed``."""
    dout, patches, weight = _f32(dout, "dout"), _f32(patches, "patches"), _f32(weight, "weight")
    if weight.ndim != 4 or patches.ndim != 3:
        raise ValueError(f"patch_embed_backward: expected weight [C, Cin, p, p] and patches [B, n, Cin·p·p], "
                         f"got shapes {weight.shape} and {patches.shape}")
    B, Cin = patches.shape[0], weight.shape[1]
    dimages = _zeros_or(dimages, (B, Cin, img_size, img_size), "dimages")
    dweight = _zeros_or(dweight, weight.shape, "dweight")
    dbias = _zeros_or(dbias, (weight.shape[0],), "dbias")
    _core.patch_embed_backward(dimages, dweight, dbias, dout, patches, weight, int(img_size))
    return dimages, dweight, dbias


def mean_pool(x: np.ndarray, start: int = 1) -> np.ndarray:
    """Mean over tokens ``start:`` of x [B, T, C] (start=1 skips the CLS token)."""
    x = _f32(x, "x")
    out = np.empty((x.shape[0], x.shape[2]), np.float32)
    _core.mean_pool_forward(out, x, int(start))
    return out


def mean_pool_backward(dout, tokens: int, start: int = 1, dx=None):
    dout = _f32(dout, "dout")
    dx = _zeros_or(dx, (dout.shape[0], tokens, dout.shape[1]), "dx")
    _core.mean_pool_backward(dx, dout, int(start))
    return dx


def cross_entropy(logits: np.ndarray, targets: np.ndarray, smoothing: float = 0.0):
    """Mean softmax cross-entropy over rows with target ≥ 0 (negative targets are ignored).

    Returns (mean loss, per-row losses [R], probs [R, K]).
    """
    logits = _f32(logits, "logits")
    t = indices(targets, "targets", "class indices")
    losses = np.empty(logits.shape[0], np.float32)
    probs = np.empty_like(logits)
    loss = _core.cross_entropy_forward(losses, probs, logits, t, float(smoothing))
    return loss, losses, probs


def cross_entropy_backward(probs, targets, smoothing: float = 0.0, scale: Optional[float] = None, dlogits=None):
    """dlogits += scale·(probs − q); scale defaults to 1 / (rows with target ≥ 0)."""
    probs = _f32(probs, "probs")
    t = _i32(targets, "targets")
    if scale is None:
        scale = 1.0 / max(int((t >= 0).sum()), 1)
    dlogits = _zeros_or(dlogits, probs.shape, "dlogits")
    _core.cross_entropy_backward(dlogits, probs, t, float(smoothing), float(scale))
    return dlogits


def conv2d(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray] = None, *, stride: int = 1,
           padding: int = 0, residual: Optional[np.ndarray] = None, relu: bool = False,
           precision: str = "fp32") -> np.ndarray:
    """2-d convolution, PyTorch ``nn.Conv2d`` semantics (NCHW, groups 1, zero padding), inference only.

    ``out = relu?(conv(x, weight) + bias + residual)``: the optional residual add and ReLU run in
    the same call (a ResNet bottleneck's last convolution, shortcut and activation). Computed as
    im2col + the engine's GEMM (``precision="bf16"``: GEMM inputs rounded to bfloat16).

    Args:
        x: [B, Cin, H, W]. weight: [Cout, Cin, kH, kW]. bias: [Cout] or None.
        stride, padding: as ``nn.Conv2d`` (one value for both axes).
        residual: [B, Cout, Ho, Wo] added before the ReLU, or None.
        relu: apply max(·, 0) last.

    Returns:
        out [B, Cout, Ho, Wo], Ho = (H + 2·padding − kH) // stride + 1 (Wo likewise).

    Example:
        >>> import numpy as np, mapet
        >>> mapet.ops.conv2d(np.ones((1, 2, 5, 5), np.float32), np.ones((3, 2, 3, 3), np.float32), padding=1).shape
        (1, 3, 5, 5)
    """
    # the engine checks the shapes, stride and padding and allocates the output
    out = _core.conv2d_forward(None, _f32(x, "x"), _f32(weight, "weight"), None if bias is None else _f32(bias, "bias"),
                               None if residual is None else _f32(residual, "residual"), bool(relu), stride, padding,
                               precision)
    return np.asarray(out)


def avg_pool2d(x: np.ndarray, stride: int) -> np.ndarray:
    """Mean over non-overlapping ``stride × stride`` windows (``nn.AvgPool2d(stride)``), x [B, C, H, W]
    → [B, C, H // stride, W // stride].

    Example:
        >>> import numpy as np, mapet
        >>> mapet.ops.avg_pool2d(np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4), 2)[0, 0]
        array([[ 2.5,  4.5],
               [10.5, 12.5]], dtype=float32)
    """
    return np.asarray(_core.avg_pool2d_forward(None, _f32(x, "x"), stride))

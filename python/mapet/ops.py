"""Single kernels of the Swift engine on NumPy arrays (zero-copy in and out).

These are the building blocks models use; they are exposed for testing and for people
who want one fast operation. Inputs are converted once with ``np.ascontiguousarray``
(no copy when already float32 and C-contiguous); outputs may be supplied with ``out=``
(gradients with ``dx=`` etc.) and are then written in place and returned as themselves; left
out, the engine allocates them (gradients start at zero) with the shapes it checked.
"""
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from ._convert import f32 as _f32, i32 as _i32, indices, opt_f32 as _opt, rows_f32 as _rows_f32
from ._native import _core
from ._runtime import warn_if_bf16_inactive

# The engine (PyModule) checks every shape, dtype and size and words the errors; where an output
# or gradient argument is None it allocates it (zeros where the kernel accumulates) and returns
# it. These wrappers only convert inputs (``_convert``) and hand back the caller's own arrays.

Array = np.ndarray
Grad = Optional[np.ndarray]


def _given(result, given: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """The caller's own output object when one was given, else the engine's new array."""
    return given if given is not None else (None if result is None else np.asarray(result))


def _all_given(results, *given: Optional[np.ndarray]) -> tuple:
    return tuple(_given(r, g) for r, g in zip(results, given))


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
    if precision == "bf16":
        warn_if_bf16_inactive("matmul(precision='bf16')")
    return _given(_core.gemm(_rows_f32(a, "a"), _rows_f32(b, "b"), out, trans_a, trans_b, alpha, beta, precision), out)


def gelu(x: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Exact GELU, ``x·Φ(x)``, elementwise on any shape.

    Args:
        x: float array (converted to float32).
        out: optional float32 C-contiguous array of the same shape, written in place.

    Returns:
        The result array.
    """
    return _given(_core.gelu_forward(_f32(x, "x"), out), out)


def gelu_backward(dout: np.ndarray, x: np.ndarray, dx: Grad = None) -> np.ndarray:
    """Accumulate the GELU gradient: ``dx += dout·gelu'(x)``; returns ``dx`` (new zeros when omitted)."""
    return _given(_core.gelu_backward(_f32(dout, "dout"), _f32(x, "x"), dx), dx)


# Objective kernels (defined with their objectives in mapet.objectives).
from .objectives import ccvit_pixel_targets, dtm_loss, masked_mse  # noqa: E402,F401


# ---------------------------------------------------------------- transformer kernels
# Forward functions return their outputs and the cache the backward needs; backward
# functions take gradient arrays (zeros created when omitted) and ACCUMULATE into them.

def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> Tuple[Array, Array, Array]:
    """LayerNorm over the last axis (eps 1e-6). x [R, C] → (out, mean [R], rstd [R])."""
    return tuple(np.asarray(r) for r in _core.layer_norm_forward(None, None, None, _f32(x, "x"), _f32(weight, "weight"),
                                                                 _f32(bias, "bias")))


def layer_norm_backward(dout: np.ndarray, x: np.ndarray, weight: np.ndarray, mean: np.ndarray, rstd: np.ndarray,
                        dx: Grad = None, dweight: Grad = None, dbias: Grad = None) -> Tuple[Array, Array, Array]:
    """Accumulate LayerNorm gradients; returns (dx, dweight, dbias)."""
    r = _core.layer_norm_backward(dx, dweight, dbias, _f32(dout, "dout"), _f32(x, "x"), _f32(weight, "weight"),
                                  _f32(mean, "mean"), _f32(rstd, "rstd"))
    return _all_given(r, dx, dweight, dbias)


def softmax(x: np.ndarray) -> np.ndarray:
    """Row softmax of x [R, C]."""
    return np.asarray(_core.softmax_forward(None, _f32(x, "x")))


def softmax_backward(dout: np.ndarray, out: np.ndarray, dx: Grad = None) -> np.ndarray:
    """dx += out ⊙ (dout − rowsum(dout ⊙ out)); returns dx."""
    return _given(_core.softmax_backward(dx, _f32(dout, "dout"), _f32(out, "out")), dx)


def linear(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray] = None) -> np.ndarray:
    """x [R, IC] · weightᵀ [IC, OC] + bias (PyTorch Linear layout)."""
    return np.asarray(_core.linear_forward(None, _f32(x, "x"), _f32(weight, "weight"), _opt(bias, "bias")))


def linear_backward(dout: np.ndarray, x: np.ndarray, weight: np.ndarray, dx: Grad = None, dweight: Grad = None,
                    dbias: Grad = None) -> Tuple[Array, Array, Array]:
    """Accumulate Linear gradients; returns (dx, dweight, dbias)."""
    r = _core.linear_backward(dx, dweight, dbias, _f32(dout, "dout"), _f32(x, "x"), _f32(weight, "weight"))
    return _all_given(r, dx, dweight, dbias)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int, mask: Optional[np.ndarray] = None,
              precision: str = "fp32") -> Tuple[Array, Array]:
    """Multi-head attention, q [B, M, C], k/v [B, Nk, C]; mask [B, M, Nk] bool (True = may attend).

    ``precision="bf16"`` rounds the inputs of QKᵀ and PV to bf16 and accumulates in fp32 (as the
    models do); softmax stays fp32.

    Returns (out [B, M, C], probs [B, heads, M, Nk]).
    """
    m = None if mask is None else _i32(mask, "mask")
    r = _core.attention_forward(None, None, _f32(q, "q"), _f32(k, "k"), _f32(v, "v"), heads, m, precision)
    return tuple(np.asarray(a) for a in r)


def attention_backward(dout: np.ndarray, probs: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int,
                       dq: Grad = None, dk: Grad = None, dv: Grad = None,
                       precision: str = "fp32") -> Tuple[Array, Array, Array]:
    """Accumulate attention gradients; returns (dq, dk, dv). ``precision`` as in `attention`."""
    r = _core.attention_backward(dq, dk, dv, _f32(dout, "dout"), _f32(probs, "probs"), _f32(q, "q"), _f32(k, "k"),
                                 _f32(v, "v"), heads, precision)
    return _all_given(r, dq, dk, dv)


def residual(x: np.ndarray, branch: np.ndarray, gamma: Optional[np.ndarray] = None,
             keep: Optional[np.ndarray] = None) -> np.ndarray:
    """x + keep[b]·gamma⊙branch for [B, T, C] (layer scale and drop path optional)."""
    return np.asarray(_core.residual_forward(None, _f32(x, "x"), _f32(branch, "branch"), _opt(gamma, "gamma"),
                                             _opt(keep, "keep")))


def residual_backward(dout: np.ndarray, branch: np.ndarray, gamma: Optional[np.ndarray] = None,
                      keep: Optional[np.ndarray] = None, dx: Grad = None, dbranch: Grad = None,
                      dgamma: Grad = None) -> Tuple[Array, Array, Optional[Array]]:
    """Accumulate (dx, dbranch, dgamma) of ``residual`` (dgamma is None without gamma)."""
    r = _core.residual_backward(dx, dbranch, dgamma, _f32(dout, "dout"), _f32(branch, "branch"), _opt(gamma, "gamma"),
                                _opt(keep, "keep"))
    return _all_given(r, dx, dbranch, None if gamma is None else dgamma)


def drop_path_keep(batch: int, rate: float, seed: int = 0) -> np.ndarray:
    """Per-sample drop-path scales in {0, 1/(1-rate)} (timm drop_path with scale_by_keep)."""
    return np.asarray(_core.drop_path_keep(batch, rate, seed))


def dropout_mask(shape: Union[int, Sequence[int]], rate: float, seed: int = 0) -> np.ndarray:
    """Element scales in {0, 1/(1-rate)} for inverted dropout."""
    return np.asarray(_core.dropout_mask(shape, rate, seed))


def drop_path(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """x [B, ...] scaled per sample by keep [B]."""
    return np.asarray(_core.scale_rows_forward(None, _f32(x, "x"), _f32(keep, "keep"), False))


def drop_path_backward(dout: np.ndarray, keep: np.ndarray, dx: Grad = None) -> np.ndarray:
    """Accumulate the gradient of ``drop_path``: dx += keep[b]·dout; returns dx."""
    return _given(_core.scale_rows_backward(dx, _f32(dout, "dout"), _f32(keep, "keep"), False), dx)


def dropout(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """x ⊙ mask (mask from ``dropout_mask``, of x's shape)."""
    return np.asarray(_core.scale_rows_forward(None, _f32(x, "x"), _f32(mask, "mask"), True))


def dropout_backward(dout: np.ndarray, mask: np.ndarray, dx: Grad = None) -> np.ndarray:
    """Accumulate the gradient of ``dropout``: dx += mask·dout; returns dx."""
    return _given(_core.scale_rows_backward(dx, _f32(dout, "dout"), _f32(mask, "mask"), True), dx)


def patch_embed(images: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray] = None) -> Tuple[Array, Array]:
    """Stride-p conv as patchify + GEMM. images [B, Cin, S, S], weight [C, Cin, p, p].

    Returns (out [B, n, C], patches [B, n, Cin·p·p]).
    """
    r = _core.patch_embed_forward(None, None, _f32(images, "images"), _f32(weight, "weight"), _opt(bias, "bias"))
    return tuple(np.asarray(a) for a in r)


def patch_embed_backward(dout: np.ndarray, patches: np.ndarray, weight: np.ndarray, img_size: int,
                         dimages: Grad = None, dweight: Grad = None, dbias: Grad = None) -> Tuple[Array, Array, Array]:
    """Accumulate (dimages, dweight, dbias) of ``patch_embed``."""
    r = _core.patch_embed_backward(dimages, dweight, dbias, _f32(dout, "dout"), _f32(patches, "patches"),
                                   _f32(weight, "weight"), img_size)
    return _all_given(r, dimages, dweight, dbias)


def mean_pool(x: np.ndarray, start: int = 1) -> np.ndarray:
    """Mean over tokens ``start:`` of x [B, T, C] (start=1 skips the CLS token)."""
    return np.asarray(_core.mean_pool_forward(None, _f32(x, "x"), start))


def mean_pool_backward(dout: np.ndarray, tokens: int, start: int = 1, dx: Grad = None) -> np.ndarray:
    """Accumulate the gradient of ``mean_pool`` into dx [B, tokens, C]; returns dx."""
    return _given(_core.mean_pool_backward(dx, _f32(dout, "dout"), start, tokens), dx)


def cross_entropy(logits: np.ndarray, targets: np.ndarray, smoothing: float = 0.0) -> Tuple[float, Array, Array]:
    """Mean softmax cross-entropy over rows with target ≥ 0 (negative targets are ignored).

    Returns (mean loss, per-row losses [R], probs [R, K]).
    """
    loss, losses, probs = _core.cross_entropy_forward(None, None, _f32(logits, "logits"),
                                                      indices(targets, "targets", "class indices"), smoothing)
    return loss, np.asarray(losses), np.asarray(probs)


def cross_entropy_backward(probs: np.ndarray, targets: np.ndarray, smoothing: float = 0.0,
                           scale: Optional[float] = None, dlogits: Grad = None) -> np.ndarray:
    """dlogits += scale·(probs − q); scale defaults to 1 / (rows with target ≥ 0)."""
    return _given(_core.cross_entropy_backward(dlogits, _f32(probs, "probs"), _i32(targets, "targets"), smoothing,
                                               scale), dlogits)


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
    out = _core.conv2d_forward(None, _f32(x, "x"), _f32(weight, "weight"), _opt(bias, "bias"),
                               _opt(residual, "residual"), relu, stride, padding, precision)
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

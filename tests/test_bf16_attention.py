"""bf16 attention (`ops.attention(..., precision="bf16")`, the fused per-head kernel on CPUs with
AVX512-BF16) against NumPy float64 references written here.

Every product rounds its inputs to bf16 (Q, K, V, dO, and P, dS as they come out of the fp32
softmax and its backward) and sums in fp32. The references use the same roundings, so what is
left is bounded from first principles (u = 2⁻²⁴ fp32, u_b = 2⁻⁸ bf16 unit roundoff):
- a product summed over n terms: |err| ≤ (2n + 4)·u·Σ|a·b| (as in test_bf16_gemm.py);
- the softmax: exp to 2·10⁻⁷ relative (Cephes' polynomial), the row sum and the scaling to
  (Nk + 2)·u; the score errors scale·ΔS enter P as relative errors of 2·max|scale·ΔS|.
- where the kernel rounds an fp32 value (P, dS) that carries an error, its bf16 neighbour may
  differ from the reference's: an extra u_b·|x| per element, plus the error itself.
Bounds are first order; the factor 2 on them covers the second-order terms.
Which path runs is decided from /proc/cpuinfo (not by skipping): without avx512_bf16 (or with
MAPET_BF16=off) bf16 must give the fp32 path's bits.
"""
import numpy as np
import pytest

from test_bf16_gemm import ACTIVE, UB, U32, bf16_round

from mapet import ops


def heads(x, H):
    B, T, C = x.shape
    return np.asarray(x, np.float64).reshape(B, T, H, C // H).transpose(0, 2, 1, 3)


def merge(x):
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def case(seed, B, M, Nk, H, D, masked):
    rng = np.random.default_rng(seed)
    q, k, v, do = (rng.standard_normal((B, n, H * D)).astype(np.float32) for n in (M, Nk, Nk, M))
    mask = None
    if masked:
        mask = rng.random((B, M, Nk)) < 0.6
        mask[:, 0, :] = False            # a query row with no key: zeros, not NaN
    return q, k, v, do, mask


SHAPES = [  # B, M, Nk, H, D
    (2, 197, 197, 3, 64),    # ViT-Tiny's shapes (one panel of D; the last key panel 5 wide)
    (1, 13, 7, 2, 5),        # odd everything: D odd (a padded k-pair), M not a multiple of 6
    (1, 40, 300, 1, 70),     # several key panels, more than 2·128 keys, D over one panel
]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("B,M,Nk,H,D", SHAPES)
def test_forward_follows_the_rounded_float64_reference(B, M, Nk, H, D, masked):
    q, k, v, _, mask = case(1, B, M, Nk, H, D, masked)
    out, probs = ops.attention(q, k, v, H, mask=mask, precision="bf16")
    if not ACTIVE:
        ref_out, ref_probs = ops.attention(q, k, v, H, mask=mask)
        assert np.array_equal(out, ref_out) and np.array_equal(probs, ref_probs)
        return
    scale = 1 / np.sqrt(D)
    Q, K, V = (heads(bf16_round(t), H) for t in (q, k, v))
    S = Q @ K.transpose(0, 1, 3, 2)
    dS = (2 * D + 4) * U32 * (np.abs(Q) @ np.abs(K).transpose(0, 1, 3, 2)) * scale
    logits = S * scale
    if mask is not None:
        logits = np.where(mask[:, None], logits, -np.inf)
    top = logits.max(-1, keepdims=True)
    e = np.exp(logits - np.where(np.isfinite(top), top, 0))
    total = e.sum(-1, keepdims=True)
    P = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    rel = 2 * dS.max(-1, keepdims=True) + 2e-7 + (Nk + 2) * U32
    assert np.all(np.abs(probs - P) <= 2 * rel * P + 1e-30)
    if mask is not None:
        assert np.all(probs[~np.broadcast_to(mask[:, None], probs.shape)] == 0)
        assert np.all(out[:, 0] == 0)
    # P·V from the kernel's own probabilities, rounded as it rounds them.
    Pk = np.asarray(bf16_round(probs), np.float64)
    ref = merge(Pk @ V)
    bound = merge((2 * Nk + 4) * U32 * (np.abs(Pk) @ np.abs(V)))
    assert np.all(np.abs(out - ref) <= 2 * bound + 1e-30)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("B,M,Nk,H,D", SHAPES)
def test_backward_follows_the_rounded_float64_reference(B, M, Nk, H, D, masked):
    q, k, v, do, mask = case(2, B, M, Nk, H, D, masked)
    _, probs = ops.attention(q, k, v, H, mask=mask, precision="bf16")
    dq, dk, dv = ops.attention_backward(do, probs, q, k, v, H, precision="bf16")
    if not ACTIVE:
        ref = ops.attention_backward(do, probs, q, k, v, H)
        assert all(np.array_equal(a, b) for a, b in zip((dq, dk, dv), ref))
        return
    scale = 1 / np.sqrt(D)
    Q, K, V, dO = (heads(bf16_round(t), H) for t in (q, k, v, do))
    P = np.asarray(probs, np.float64)
    Pb = np.asarray(bf16_round(probs), np.float64)
    T = lambda x: x.transpose(0, 1, 3, 2)   # noqa: E731
    # dV = P̃ᵀ·dÕ: only fp32 summation separates the kernel from this.
    ref_dv = merge(T(Pb) @ dO)
    assert np.all(np.abs(dv - ref_dv) <= 2 * merge((2 * M + 4) * U32 * (T(np.abs(Pb)) @ np.abs(dO))) + 1e-30)
    # dS = P ⊙ (dÕ·Ṽᵀ − rowsum) · scale, with the error the fp32 dP and row sum carry.
    dP = dO @ T(V)
    err_dP = (2 * D + 4) * U32 * (np.abs(dO) @ T(np.abs(V)))
    s = (P * dP).sum(-1, keepdims=True)
    err_s = (P * err_dP).sum(-1, keepdims=True) + (Nk + 2) * U32 * (P * np.abs(dP)).sum(-1, keepdims=True)
    dS = P * (dP - s) * scale
    err_dS = P * (err_dP + err_s) * scale + 3 * U32 * np.abs(dS)
    # The kernel rounds its dS to bf16: one u_b of it, plus the error it carries.
    near = err_dS + UB * (np.abs(dS) + err_dS)
    for got, ref, bound in (
        (dq, merge(dS @ K), merge(near @ np.abs(K) + (2 * Nk + 4) * U32 * (np.abs(dS) @ np.abs(K)))),
        (dk, merge(T(dS) @ Q), merge(T(near) @ np.abs(Q) + (2 * M + 4) * U32 * (T(np.abs(dS)) @ np.abs(Q)))),
    ):
        assert np.all(np.abs(got - ref) <= 2 * bound + 1e-30)


def test_bf16_attention_is_close_to_fp32_and_not_equal():
    """The bf16 path is really taken (differs from fp32) and stays at bf16 distance from it."""
    q, k, v, _, _ = case(3, 2, 50, 50, 2, 32, False)
    out16, p16 = ops.attention(q, k, v, 2, precision="bf16")
    out32, p32 = ops.attention(q, k, v, 2)
    if not ACTIVE:
        assert np.array_equal(out16, out32)
        return
    assert not np.array_equal(out16, out32)
    # Rounding q and k moves each score by at most (2u_b + u_b²)·scale·Σ|q·k| (+ fp32 sums),
    # hence each probability by a relative 2·max of that over its row (first order).
    mag = (np.abs(heads(q, 2)) @ np.abs(heads(k, 2)).transpose(0, 1, 3, 2)) / np.sqrt(32)
    rel = 2 * ((2 * UB + UB * UB) + 2 * (2 * 32 + 4) * U32) * mag.max(-1, keepdims=True)
    assert np.all(np.abs(p16 - p32) <= 2 * rel * p32 + 1e-30)

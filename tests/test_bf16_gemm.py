"""The bf16 GEMM (`mapet.ops.matmul(..., precision="bf16")`) against NumPy float64 references
written here.

Reference: round both inputs to bf16 in NumPy (round-to-nearest-even on the uint32 view),
multiply in float64. Products of two bf16 values (8-bit significands) are exact in fp32, so the
kernel differs from that reference only by fp32 rounding while accumulating:
  |err| ≤ n·2⁻²⁴·(|α|·Σ_k|ã_k·b̃_k| + |β|·|c|)   (first order; γ_n = n·u/(1 − n·u) ≈ n·u here)
where n counts the roundings on an element's path, bounded without knowing the blocking: at
most K in the k loop (two additions per k-pair), at most 2 per K block (α-scaling and the add
into C) with at most K/2 blocks, and 2 for the first α·acc + β·c. So n = 2K + 4.
Against the fp32 inputs, bf16 rounding (unit roundoff u_b = 2⁻⁸) dominates:
|ã·b̃ − a·b| ≤ (2u_b + u_b²)·|a·b|, which test_difference_to_fp32_is_bf16_input_rounding
checks together with its statistical size.

Which path runs is decided from /proc/cpuinfo here (not by skipping): on a CPU with
avx512_bf16 the kernel must be active; without it, precision="bf16" must give the fp32 result.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from cpu_flags import cpu_flags

import mapet
from mapet import ops

U32 = 2.0 ** -24      # fp32 unit roundoff
UB = 2.0 ** -8        # bf16 unit roundoff (8-bit significand)


FLAGS = cpu_flags()
CPU_BF16 = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= FLAGS
ENV_OFF = os.environ.get("MAPET_BF16", "").lower() in ("off", "0", "false")
ACTIVE = CPU_BF16 and not ENV_OFF


def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bf16 (ties to even), returned as float32."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return r.astype(np.uint32).view(np.float32).reshape(np.shape(x))


def op(x, t):
    return x.T if t else x


def reference(a, b, ta, tb, alpha=1.0, beta=0.0, c=None, rounded=True):
    """(alpha·op(a)·op(b) + beta·c in float64, alpha·Σ|a·b| + |beta·c|) with inputs bf16-rounded."""
    ra, rb = (bf16_round(a), bf16_round(b)) if rounded else (a, b)
    A, B = op(np.asarray(ra, np.float64), ta), op(np.asarray(rb, np.float64), tb)
    ref, mag = alpha * (A @ B), abs(alpha) * (np.abs(A) @ np.abs(B))
    if beta != 0.0:
        ref = ref + beta * np.asarray(c, np.float64)
        mag = mag + abs(beta) * np.abs(np.asarray(c, np.float64))
    return ref, mag


def operands(rng, M, N, K, ta, tb, with_c=False):
    """a and b for op(a)·op(b) of [M, K]·[K, N] (and, with_c, a C [M, N] for beta), drawn in that order."""
    a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
    b = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
    return (a, b, rng.standard_normal((M, N)).astype(np.float32)) if with_c else (a, b)


def check_accumulation(got, ref, mag, K):
    bound = (2 * K + 4) * U32 * mag
    excess = np.abs(np.asarray(got, np.float64) - ref) - bound
    worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.size else None
    assert excess.size == 0 or excess.max() <= 0, (
        f"error {abs(got[worst] - ref[worst]):.3g} > bound {bound[worst]:.3g} at {worst}")


# ---------------------------------------------------------------- the path in use

def test_info_matches_cpu():
    info = mapet.bf16_info()
    assert info["native"] == CPU_BF16
    assert info["active"] == ACTIVE
    if ACTIVE:
        assert info["kernel"].startswith("avx512bf16")
    else:
        assert "fp32" in info["kernel"]


# ---------------------------------------------------------------- against the float64 reference

SHAPES = [(1, 1, 1), (7, 5, 3), (33, 17, 65), (6, 64, 256), (97, 131, 301), (200, 65, 1),
          (13, 200, 513), (301, 517, 263), (130, 70, 1000), (61, 197, 1601)]


@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_matches_rounded_float64_reference(M, N, K, ta, tb):
    rng = np.random.default_rng(M * 7919 + N * 31 + K + 2 * ta + tb)
    a, b = operands(rng, M, N, K, ta, tb)
    got = ops.matmul(a, b, trans_a=ta, trans_b=tb, precision="bf16")
    if not ACTIVE:  # fallback: the fp32 product, bit for bit
        np.testing.assert_array_equal(got, ops.matmul(a, b, trans_a=ta, trans_b=tb))
        return
    ref, mag = reference(a, b, ta, tb)
    check_accumulation(got, ref, mag, K)


@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_large_shape(ta, tb):
    # Several tiles in both directions, several K blocks, edges everywhere.
    M, N, K = 1003, 771, 1537
    rng = np.random.default_rng(5)
    a, b = operands(rng, M, N, K, ta, tb)
    got = ops.matmul(a, b, trans_a=ta, trans_b=tb, precision="bf16")
    if not ACTIVE:
        np.testing.assert_array_equal(got, ops.matmul(a, b, trans_a=ta, trans_b=tb))
        return
    ref, mag = reference(a, b, ta, tb)
    check_accumulation(got, ref, mag, K)


@pytest.mark.parametrize("ta,tb", [(False, False), (True, True), (False, True)])
def test_alpha_beta(ta, tb):
    M, N, K = 45, 83, 129
    rng = np.random.default_rng(11)
    a, b, c0 = operands(rng, M, N, K, ta, tb, with_c=True)
    out = c0.copy()
    got = ops.matmul(a, b, out, trans_a=ta, trans_b=tb, alpha=0.75, beta=-1.5, precision="bf16")
    assert got is out
    if not ACTIVE:
        np.testing.assert_array_equal(got, ops.matmul(a, b, c0.copy(), trans_a=ta, trans_b=tb,
                                                      alpha=0.75, beta=-1.5))
        return
    ref, mag = reference(a, b, ta, tb, 0.75, -1.5, c0)   # c0 is used as is, never rounded
    check_accumulation(got, ref, mag, K)


@pytest.mark.parametrize("K", [0, 1, 300])
def test_beta_zero_ignores_nan_in_out(K):
    M, N = 29, 70
    rng = np.random.default_rng(K)
    a, b = operands(rng, M, N, K, False, True)
    out = np.full((M, N), np.nan, np.float32)
    ops.matmul(a, b, out, trans_b=True, alpha=2.0, beta=0.0, precision="bf16")
    assert np.isfinite(out).all()
    if K == 0:
        np.testing.assert_array_equal(out, 0)
    elif ACTIVE:
        ref, mag = reference(a, b, False, True, 2.0)
        check_accumulation(out, ref, mag, K)


def test_k_zero_scales_out_by_beta():
    c0 = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = c0.copy()
    ops.matmul(np.zeros((3, 0), np.float32), np.zeros((0, 4), np.float32), out, beta=-0.5, precision="bf16")
    np.testing.assert_array_equal(out, -0.5 * c0)


def test_empty_results():
    assert ops.matmul(np.zeros((0, 5), np.float32), np.ones((5, 3), np.float32), precision="bf16").shape == (0, 3)
    assert ops.matmul(np.ones((4, 5), np.float32), np.ones((5, 0), np.float32), precision="bf16").shape == (4, 0)


@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_strided_rows(ta, tb):
    # Column slices of wider arrays: lda, ldb, ldc larger than the rows; nothing is copied and
    # the columns outside `out` stay untouched.
    M, N, K = 37, 91, 75
    rng = np.random.default_rng(3)
    a, b = operands(rng, M, N, K, ta, tb)
    wa = rng.standard_normal((a.shape[0], a.shape[1] + 13)).astype(np.float32)
    wb = rng.standard_normal((b.shape[0], b.shape[1] + 5)).astype(np.float32)
    wa[:, :a.shape[1]] = a
    wb[:, :b.shape[1]] = b
    wc = np.full((M, N + 7), 3.0, np.float32)
    sa, sb, sc = wa[:, :a.shape[1]], wb[:, :b.shape[1]], wc[:, :N]
    assert not sa.flags.c_contiguous and not sc.flags.c_contiguous
    got = ops.matmul(sa, sb, sc, trans_a=ta, trans_b=tb, alpha=1.0, beta=0.5, precision="bf16")
    assert got is sc and np.shares_memory(got, wc)
    np.testing.assert_array_equal(wc[:, N:], 3.0)
    if not ACTIVE:
        np.testing.assert_array_equal(got, ops.matmul(a, b, np.full((M, N), 3.0, np.float32), trans_a=ta,
                                                      trans_b=tb, beta=0.5))
        return
    ref, mag = reference(a, b, ta, tb, 1.0, 0.5, np.full((M, N), 3.0, np.float32))
    check_accumulation(got, ref, mag, K)


def test_strided_fp32_matches_contiguous():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((50, 40)).astype(np.float32)
    b = rng.standard_normal((30, 20)).astype(np.float32)
    np.testing.assert_array_equal(ops.matmul(w[:, :30], b), ops.matmul(np.ascontiguousarray(w[:, :30]), b))


# ---------------------------------------------------------------- size of the bf16 error

@pytest.mark.parametrize("K", [64, 192, 768])
def test_difference_to_fp32_is_bf16_input_rounding(K):
    M, N = 120, 150
    rng = np.random.default_rng(K)
    a, b = operands(rng, M, N, K, False, True)
    got = np.asarray(ops.matmul(a, b, trans_b=True, precision="bf16"), np.float64)
    exact, mag = reference(a, b, False, True, rounded=False)
    d = got - exact
    if not ACTIVE:
        assert np.abs(d).max() <= (2 * K + 4) * U32 * mag.max()
        return
    # Rigorous: each product is off by at most (2u_b + u_b²)|a·b|, plus fp32 accumulation.
    assert (np.abs(d) <= (2 * UB + UB ** 2 + (2 * K + 4) * U32) * mag).all()
    # Statistical size: first order, d = Σ_k a·b·(ε_a + ε_b) with independent relative rounding
    # errors ε. Predict its rms from the ε measured on these inputs; the kernel's difference must
    # have that size (a kernel computing in fp32 would give ~1e-4 of it).
    ea = (bf16_round(a).astype(np.float64) - a) / a
    eb = (bf16_round(b).astype(np.float64) - b) / b
    var = (a.astype(np.float64) ** 2) @ (b.astype(np.float64) ** 2).T * (np.mean(ea ** 2) + np.mean(eb ** 2))
    ratio = np.sqrt(np.mean(d ** 2) / np.mean(var))
    assert 0.8 < ratio < 1.25, ratio
    # Relative to Σ|a·b|: of the order 2⁻⁸/√K typically, at most 2⁻⁷.
    assert np.max(np.abs(d) / mag) < 2 * UB


# ---------------------------------------------------------------- threads

@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("M,N,K", [(613, 389, 301),
                                   # K long against M and N (a weight gradient): one tile per
                                   # worker, cut along M here and along N below; 3 K blocks
                                   (197, 131, 1601), (67, 259, 1601)])
def test_thread_count_does_not_change_bits(ta, tb, M, N, K):
    rng = np.random.default_rng(8)
    a, b, c0 = operands(rng, M, N, K, ta, tb, with_c=True)
    before = mapet.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            mapet.set_num_threads(threads)
            got = ops.matmul(a, b, c0.copy(), trans_a=ta, trans_b=tb, alpha=0.5, beta=2.0, precision="bf16")
            if not ACTIVE:  # the fp32 fallback at the same thread count
                np.testing.assert_array_equal(got, ops.matmul(a, b, c0.copy(), trans_a=ta, trans_b=tb,
                                                              alpha=0.5, beta=2.0))
            results.append(got)
    finally:
        mapet.set_num_threads(before)
    if ACTIVE:
        np.testing.assert_array_equal(results[0], results[1])
        np.testing.assert_array_equal(results[0], results[2])


# ---------------------------------------------------------------- switching it off

_OFF_SCRIPT = """
import json, logging, numpy as np, mapet
rng = np.random.default_rng(1)
a = rng.standard_normal((65, 33)).astype(np.float32)
b = rng.standard_normal((47, 33)).astype(np.float32)
x = mapet.ops.matmul(a, b, trans_b=True, precision="bf16")
y = mapet.ops.matmul(a, b, trans_b=True, precision="bf16")
z = mapet.ops.matmul(a, b, trans_b=True)
print(json.dumps({"info": mapet.bf16_info(), "equal": bool((x == z).all() and (y == z).all())}))
"""


def test_environment_switch_forces_fp32():
    env = dict(os.environ, MAPET_BF16="off")
    proc = subprocess.run([sys.executable, "-c", _OFF_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["info"]["active"] is False
    assert out["info"]["native"] == CPU_BF16
    assert out["equal"]
    lines = [ln for ln in proc.stderr.splitlines() if "bf16 is unavailable" in ln]
    assert len(lines) == 1, proc.stderr


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("call,exc", [
    (lambda: ops.matmul(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32), precision="fp16"), ValueError),
    (lambda: ops.matmul(np.ones((2, 3), np.float32), np.ones((2, 2), np.float32), precision="bf16"), ValueError),
    (lambda: ops.matmul(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32),
                        np.zeros((4, 4), np.float32)[:, ::2], precision="bf16"), ValueError),
    (lambda: ops.matmul(None, np.ones((2, 2), np.float32), precision="bf16"), TypeError),
])
def test_bad_input_raises(call, exc):
    with pytest.raises(exc):
        call()

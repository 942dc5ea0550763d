"""Each transformer kernel, forward and backward, against a float64 NumPy transcription of its
equation written here (never by calling mapet), on random odd shapes. Criterion: the largest
error relative to the largest reference magnitude, ≤ 1e-4."""
import math

import numpy as np
import pytest

import mapet
from mapet import ops

TOL = 1e-4


def rel_err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def check(got, ref, tol=TOL):
    e = rel_err(got, ref)
    assert e <= tol, f"relative error {e:.3g} > {tol}"


def rand(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def f64(*xs):
    return [np.asarray(x, np.float64) for x in xs]


# ---------------------------------------------------------------- LayerNorm

def test_layer_norm_forward_backward():
    rng = np.random.default_rng(0)
    R, C = 37, 53
    x = rand(rng, R, C) * 3 + 5  # offset mean: the two-pass variance matters
    w, b = rand(rng, C), rand(rng, C)
    out, mean, rstd = ops.layer_norm(x, w, b)
    X, W, Bb = f64(x, w, b)
    mu = X.mean(1, keepdims=True)
    var = ((X - mu) ** 2).mean(1, keepdims=True)
    xh = (X - mu) / np.sqrt(var + 1e-6)
    check(out, xh * W + Bb)
    check(mean, mu[:, 0])
    check(rstd, 1 / np.sqrt(var[:, 0] + 1e-6))

    dy = rand(rng, R, C)
    dx0 = rand(rng, R, C)  # backward accumulates onto existing values
    dx, dw, db = ops.layer_norm_backward(dy, x, w, mean, rstd, dx=dx0.copy())
    DY = np.asarray(dy, np.float64)
    g = DY * W
    rs = 1 / np.sqrt(var + 1e-6)
    ref_dx = rs * (g - g.mean(1, keepdims=True) - xh * (g * xh).mean(1, keepdims=True))
    check(dx - dx0, ref_dx)
    check(dw, (DY * xh).sum(0))
    check(db, DY.sum(0))


def test_norm_and_residual_parameter_sums_over_row_blocks():
    # dWeight/dBias (LayerNorm) and dGamma (layer scale) are summed in blocks of rows during
    # the per-row pass: with several blocks and a partial last one, against float64, onto
    # existing values, and the same bits on 1, 2 and 3 threads.
    rng = np.random.default_rng(11)
    B, T, C = 3, 67, 40                      # 201 rows: blocks of 64, 64, 64, 9
    x = rand(rng, B * T, C) * 2 + 1
    w, b = rand(rng, C), rand(rng, C)
    _, mean, rstd = ops.layer_norm(x, w, b)
    dy, y, gamma = rand(rng, B * T, C), rand(rng, B * T, C), rand(rng, C)
    keep = np.array([2, 0, 2], np.float32)
    w0, b0, g0 = rand(rng, C), rand(rng, C), rand(rng, C)
    X, DY, Y, G, Kp = f64(x, dy, y, gamma, keep)
    xh = (X - X.mean(1, keepdims=True)) / np.sqrt(X.var(1, keepdims=True) + 1e-6)
    before = mapet.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            mapet.set_num_threads(threads)
            _, dw, db = ops.layer_norm_backward(dy, x, w, mean, rstd, dweight=w0.copy(), dbias=b0.copy())
            _, _, dg = ops.residual_backward(dy.reshape(B, T, C), y.reshape(B, T, C), gamma, keep, dgamma=g0.copy())
            results.append((dw, db, dg))
    finally:
        mapet.set_num_threads(before)
    dw, db, dg = results[0]
    check(dw - w0, (DY * xh).sum(0))
    check(db - b0, DY.sum(0))
    check(dg - g0, (np.repeat(Kp, T)[:, None] * DY * Y).sum(0))
    for other in results[1:]:
        for got, ref in zip(other, results[0]):
            np.testing.assert_array_equal(got, ref)


# ---------------------------------------------------------------- softmax

def test_softmax_forward_backward():
    rng = np.random.default_rng(1)
    R, C = 29, 67
    x = rand(rng, R, C, scale=8.0)
    y = ops.softmax(x)
    X = np.asarray(x, np.float64)
    e = np.exp(X - X.max(1, keepdims=True))
    ref = e / e.sum(1, keepdims=True)
    check(y, ref)
    dy = rand(rng, R, C)
    dx = ops.softmax_backward(dy, y)
    DY = np.asarray(dy, np.float64)
    check(dx, ref * (DY - (DY * ref).sum(1, keepdims=True)))


def test_softmax_extreme_logits_are_finite():
    x = np.array([[1e4, -1e4, 0.0], [-100.0, -100.0, -100.0]], np.float32)
    y = ops.softmax(x)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(y[1], 1 / 3, rtol=1e-6)


# ---------------------------------------------------------------- Linear

@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_forward_backward(with_bias):
    rng = np.random.default_rng(2)
    R, IC, OC = 41, 23, 19
    x, w = rand(rng, R, IC), rand(rng, OC, IC)
    b = rand(rng, OC) if with_bias else None
    out = ops.linear(x, w, b)
    X, W = f64(x, w)
    ref = X @ W.T + (np.asarray(b, np.float64) if with_bias else 0)
    check(out, ref)
    dy = rand(rng, R, OC)
    dx, dw, db = ops.linear_backward(dy, x, w)
    DY = np.asarray(dy, np.float64)
    check(dx, DY @ W)
    check(dw, DY.T @ X)
    check(db, DY.sum(0))
    # accumulation: a second call doubles
    ops.linear_backward(dy, x, w, dx=dx, dweight=dw, dbias=db)
    check(dw, 2 * DY.T @ X)


# ---------------------------------------------------------------- attention

def attention_ref(q, k, v, H, mask=None):
    B, M, C = q.shape
    Nk = k.shape[1]
    D = C // H
    qh = q.reshape(B, M, H, D).transpose(0, 2, 1, 3)
    kh = k.reshape(B, Nk, H, D).transpose(0, 2, 1, 3)
    vh = v.reshape(B, Nk, H, D).transpose(0, 2, 1, 3)
    s = qh @ kh.transpose(0, 1, 3, 2) / math.sqrt(D)
    if mask is not None:
        s = np.where(mask[:, None], s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p = p / p.sum(-1, keepdims=True)
    o = (p @ vh).transpose(0, 2, 1, 3).reshape(B, M, C)
    return o, p, (qh, kh, vh)


def attention_backward_ref(do, p, qh, kh, vh, B, M, Nk, C, H):
    D = C // H
    doh = do.reshape(B, M, H, D).transpose(0, 2, 1, 3)
    dvh = p.transpose(0, 1, 3, 2) @ doh
    dp = doh @ vh.transpose(0, 1, 3, 2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / math.sqrt(D)
    dqh = ds @ kh
    dkh = ds.transpose(0, 1, 3, 2) @ qh
    back = lambda t, n: t.transpose(0, 2, 1, 3).reshape(B, n, C)  # noqa: E731
    return back(dqh, M), back(dkh, Nk), back(dvh, Nk)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_rectangular_forward_backward(masked):
    rng = np.random.default_rng(3)
    B, M, Nk, C, H = 3, 7, 11, 15, 3
    q, k, v = rand(rng, B, M, C), rand(rng, B, Nk, C), rand(rng, B, Nk, C)
    mask = None
    if masked:
        mask = rng.random((B, M, Nk)) < 0.5
        mask[np.arange(B)[:, None], np.arange(M)[None, :], rng.integers(0, Nk, (B, M))] = True  # ≥ 1 key per row
    out, probs = ops.attention(q, k, v, H, mask)
    Q, K, V = f64(q, k, v)
    ref, p, (qh, kh, vh) = attention_ref(Q, K, V, H, mask)
    check(out, ref)
    check(probs, p)
    if masked:
        assert np.all(probs[~np.broadcast_to(mask[:, None], probs.shape)] == 0.0)  # exactly zero, not tiny
    do = rand(rng, B, M, C)
    dq, dk, dv = ops.attention_backward(do, probs, q, k, v, H)
    rq, rk, rv = attention_backward_ref(np.asarray(do, np.float64), p, qh, kh, vh, B, M, Nk, C, H)
    check(dq, rq)
    check(dk, rk)
    check(dv, rv)


@pytest.mark.bitwise
def test_attention_rows_are_thread_count_independent():
    rng = np.random.default_rng(4)
    q, k, v = rand(rng, 4, 9, 8), rand(rng, 4, 13, 8), rand(rng, 4, 13, 8)
    old = mapet.get_num_threads()
    try:
        mapet.set_num_threads(1)
        a, _ = ops.attention(q, k, v, 2)
        mapet.set_num_threads(2)
        b, _ = ops.attention(q, k, v, 2)
    finally:
        mapet.set_num_threads(old)
    assert np.array_equal(a, b)


# ---------------------------------------------------------------- residual, layer scale, drop path, dropout

def test_residual_layer_scale_drop_path():
    rng = np.random.default_rng(5)
    B, T, C = 5, 7, 13
    x, y, gamma = rand(rng, B, T, C), rand(rng, B, T, C), rand(rng, C)
    keep = np.array([0, 2, 2, 0, 2], np.float32)
    out = ops.residual(x, y, gamma, keep)
    X, Y, G, Kp = f64(x, y, gamma, keep)
    check(out, X + Kp[:, None, None] * G * Y)
    dy = rand(rng, B, T, C)
    dx, dbranch, dgamma = ops.residual_backward(dy, y, gamma, keep)
    DY = np.asarray(dy, np.float64)
    check(dx, DY)
    check(dbranch, Kp[:, None, None] * G * DY)
    check(dgamma, (Kp[:, None, None] * DY * Y).sum((0, 1)))
    # no layer scale, no drop path: a plain residual
    check(ops.residual(x, y), X + Y)


def test_drop_path_keep_distribution_and_kernels():
    rate = 0.3
    keep = ops.drop_path_keep(20000, rate, seed=7)
    assert set(np.unique(keep)) <= {0.0, np.float32(1 / (1 - rate))}
    frac = float((keep > 0).mean())
    assert abs(frac - (1 - rate)) < 5 * math.sqrt(rate * (1 - rate) / 20000)
    assert np.array_equal(keep, ops.drop_path_keep(20000, rate, seed=7))  # seeded
    assert not np.array_equal(keep, ops.drop_path_keep(20000, rate, seed=8))
    rng = np.random.default_rng(6)
    x = rand(rng, 9, 3, 5)
    k9 = ops.drop_path_keep(9, 0.5, seed=1)
    check(ops.drop_path(x, k9), np.asarray(x, np.float64) * k9[:, None, None])
    dy = rand(rng, 9, 3, 5)
    check(ops.drop_path_backward(dy, k9), np.asarray(dy, np.float64) * k9[:, None, None])


def test_dropout_mask_and_kernels():
    rate = 0.25
    mask = ops.dropout_mask((200, 101), rate, seed=3)
    assert set(np.unique(mask)) <= {0.0, np.float32(1 / (1 - rate))}
    assert abs(float((mask > 0).mean()) - 0.75) < 5 * math.sqrt(0.25 * 0.75 / mask.size)
    rng = np.random.default_rng(7)
    x, dy = rand(rng, 200, 101), rand(rng, 200, 101)
    check(ops.dropout(x, mask), np.asarray(x, np.float64) * mask)
    check(ops.dropout_backward(dy, mask), np.asarray(dy, np.float64) * mask)


# ---------------------------------------------------------------- patch embedding

def conv_ref(images, w, b):
    """Stride-p, kernel-p convolution as explicit sums, tokens in row-major grid order."""
    B, Cin, S, _ = images.shape
    C, _, p, _ = w.shape
    g = S // p
    out = np.zeros((B, g * g, C))
    for gy in range(g):
        for gx in range(g):
            patch = images[:, :, gy * p:(gy + 1) * p, gx * p:(gx + 1) * p]  # [B, Cin, p, p]
            out[:, gy * g + gx] = np.einsum("bcij,ocij->bo", patch, w) + b
    return out


def test_patch_embed_forward_backward():
    rng = np.random.default_rng(8)
    B, Cin, S, p, C = 3, 3, 15, 5, 7
    images, w, b = rand(rng, B, Cin, S, S), rand(rng, C, Cin, p, p), rand(rng, C)
    out, patches = ops.patch_embed(images, w, b)
    I, W, Bb = f64(images, w, b)
    check(out, conv_ref(I, W, Bb))
    dy = rand(rng, B, (S // p) ** 2, C)
    dimg, dw, db = ops.patch_embed_backward(dy, patches, w, S)
    DY = np.asarray(dy, np.float64)
    g = S // p
    ref_dw = np.zeros_like(W)
    ref_di = np.zeros_like(I)
    for gy in range(g):
        for gx in range(g):
            t = gy * g + gx
            patch = I[:, :, gy * p:(gy + 1) * p, gx * p:(gx + 1) * p]
            ref_dw += np.einsum("bo,bcij->ocij", DY[:, t], patch)
            ref_di[:, :, gy * p:(gy + 1) * p, gx * p:(gx + 1) * p] += np.einsum("bo,ocij->bcij", DY[:, t], W)
    check(dw, ref_dw)
    check(db, DY.sum((0, 1)))
    check(dimg, ref_di)


# ---------------------------------------------------------------- pooling

def test_mean_pool_forward_backward():
    rng = np.random.default_rng(9)
    B, T, C = 4, 11, 6
    x = rand(rng, B, T, C)
    check(ops.mean_pool(x, start=1), np.asarray(x, np.float64)[:, 1:].mean(1))
    dy = rand(rng, B, C)
    dx = ops.mean_pool_backward(dy, T, start=1)
    ref = np.zeros((B, T, C))
    ref[:, 1:] = np.asarray(dy, np.float64)[:, None] / (T - 1)
    check(dx, ref)


# ---------------------------------------------------------------- cross-entropy

@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_smoothing_and_ignored_rows(smoothing):
    rng = np.random.default_rng(10)
    R, K = 13, 17
    logits = rand(rng, R, K, scale=4.0)
    targets = rng.integers(0, K, R)
    targets[[2, 7]] = -1  # ignored
    loss, losses, probs = ops.cross_entropy(logits, targets.astype(np.int64), smoothing)
    X = np.asarray(logits, np.float64)
    logp = X - X.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    keep = targets >= 0
    q = np.full((R, K), smoothing / K)
    q[np.arange(R)[keep], targets[keep]] += 1 - smoothing
    ref_rows = -(q * logp).sum(1) * keep
    check(losses, ref_rows)
    assert abs(loss - ref_rows[keep].mean()) <= TOL * abs(ref_rows[keep].mean())
    d = ops.cross_entropy_backward(probs, targets, smoothing)
    ref_d = (np.exp(logp) - q) * keep[:, None] / keep.sum()
    check(d, ref_d)


# ---------------------------------------------------------------- bad input

def test_kernel_bad_inputs_name_the_argument():
    x = np.zeros((4, 5), np.float32)
    with pytest.raises(ValueError, match="weight"):
        ops.layer_norm(x, np.ones(6, np.float32), np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="heads"):
        ops.attention(np.zeros((1, 2, 5), np.float32), np.zeros((1, 3, 5), np.float32), np.zeros((1, 3, 5), np.float32), 2)
    with pytest.raises(ValueError, match="targets"):
        ops.cross_entropy(x, np.array([0, 1, 5, 2]))
    with pytest.raises(TypeError, match="targets"):
        ops.cross_entropy(x, np.array([0.0, 1, 2, 2]))
    with pytest.raises(ValueError, match="rate"):
        ops.drop_path_keep(4, 1.0)

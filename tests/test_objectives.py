"""DTM and CCViT objective pieces against independent NumPy references: brute-force token
morphing, a SplitMix64 transcription, smooth-L1 / MSE in float64, finite differences."""
import math

import numpy as np
import pytest

import mapet
from mapet import ops

MASK64 = (1 << 64) - 1


# ------------------------------------------------------------------ references in NumPy

class SplitMix64:
    """Transcription of the documented generator (ObjectiveRNG.swift)."""

    def __init__(self, seed, stream=None):
        if stream is None:
            self.state = seed & MASK64
        else:
            mixer = SplitMix64((seed + stream * 0xD1B54A32D192ED03) & MASK64)
            self.state = mixer.next()

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def below(self, bound):
        limit = MASK64 - (MASK64 % bound)
        while True:
            x = self.next()
            if x < limit:
                return x % bound

    def integer(self, lo, hi):
        return lo + self.below(hi - lo + 1)


def morph_reference(x, r, iterations, protect_first=True):
    """Bipartite soft matching by the rules, with explicit groups (float64).

    Returns (membership [n], sizes [G], merged [G, d]).
    """
    n = x.shape[0]
    toks = [(x[i].astype(np.float64), 1.0, [i]) for i in range(n)]  # feature, size, members
    for _ in range(iterations):
        t = len(toks)
        rr = min(r, (t - int(protect_first)) // 2)
        if rr <= 0:
            break
        feats = np.stack([f for f, _, _ in toks])
        unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        evens, odds = list(range(0, t, 2)), list(range(1, t, 2))
        best = []
        for a, i in enumerate(evens):
            if protect_first and i == 0:
                best.append((-math.inf, 0))
                continue
            sims = [float(unit[i] @ unit[j]) for j in odds]
            j = max(range(len(odds)), key=lambda q: (sims[q], -q))  # first maximum
            best.append((sims[j], j))
        ranking = sorted(range(len(evens)), key=lambda a: (-best[a][0], a))
        sources = set(ranking[:rr])
        kept = [toks[evens[a]] for a in range(len(evens)) if a not in sources]
        into = [[toks[j]] for j in odds]
        for a in sorted(sources):
            into[best[a][1]].append(toks[evens[a]])
        merged = []
        for parts in into:
            size = sum(s for _, s, _ in parts)
            feat = sum(f * s for f, s, _ in parts) / size
            merged.append((feat, size, sorted(m for _, _, ms in parts for m in ms)))
        toks = kept + merged
    membership = np.empty(n, np.int64)
    for g, (_, _, members) in enumerate(toks):
        membership[members] = g
    return membership, np.array([s for _, s, _ in toks]), np.stack([f for f, _, _ in toks])


def smooth_l1(u, beta=2.0):
    a = np.abs(u)
    return np.where(a < beta, 0.5 * u * u / beta, a - 0.5 * beta)


def dtm_loss_reference(pred, target, memberships, beta=2.0):
    """The reference's matrix form: S [G, n] one-hot, Sᵀ (S x / (S.sum + 1e-6))."""
    L, B, n = memberships.shape
    total = 0.0
    for l in range(L):
        for b in range(B):
            S = np.zeros((n, n))
            S[memberships[l, b], np.arange(n)] = 1.0
            mp = S.T @ (S @ pred[b].astype(np.float64) / (S.sum(1, keepdims=True) + 1e-6))
            mt = S.T @ (S @ target[b].astype(np.float64) / (S.sum(1, keepdims=True) + 1e-6))
            total += smooth_l1(mp - mt, beta).sum()
    return total / (L * B * n * pred.shape[2])


def patchify(images, p):
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


# ------------------------------------------------------------------ DTM: morphing

@pytest.mark.parametrize("n,d,r,k,protect", [
    (16, 6, 3, 2, True), (17, 5, 4, 3, True), (24, 8, 2, 6, True),
    (9, 4, 100, 4, True),  # r clamped to (t-1)//2 every round
    (12, 3, 3, 3, False), (2, 4, 1, 1, True), (1, 3, 5, 2, True),
])
def test_morphing_matches_brute_force(n, d, r, k, protect):
    rng = np.random.default_rng(n * 100 + r)
    x = rng.standard_normal((3, n, d)).astype(np.float32)
    res = mapet.morph_tokens(x, r=r, iterations=k, protect_first=protect)
    for b in range(3):
        m, sizes, merged = morph_reference(x[b], r, k, protect)
        np.testing.assert_array_equal(res.membership[b], m)
        np.testing.assert_array_equal(res.sizes[b], sizes)
        np.testing.assert_allclose(res.merged[b], merged, rtol=1e-5, atol=1e-5)
        # the merged feature of a group is the mean of its members' original features
        for g in range(len(sizes)):
            np.testing.assert_allclose(res.merged[b, g], x[b][m == g].mean(0), rtol=1e-5, atol=1e-5)


def test_morphing_tie_rule():
    # Integer one-hot directions make every cosine exactly 0 or 1: ties in both the best
    # match (first odd index wins) and the ranking (lower even index wins).
    rng = np.random.default_rng(7)
    for trial in range(20):
        n, d = int(rng.integers(4, 20)), 3
        x = np.eye(d, dtype=np.float32)[rng.integers(0, d, n)] * rng.integers(1, 3, (n, 1))
        r, k = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        res = mapet.morph_tokens(x, r=r, iterations=k)
        m, sizes, _ = morph_reference(x, r, k)
        np.testing.assert_array_equal(res.membership, m)
        np.testing.assert_array_equal(res.sizes, sizes)


def test_token_zero_never_merged_and_groups_partition():
    x = np.random.default_rng(1).standard_normal((4, 33, 7)).astype(np.float32)
    res = mapet.morph_tokens(x, r=16, iterations=14)
    assert res.merged.shape[1] == 2  # 33 → 17 → 9 → 5 → 3 → 2, then (2-1)//2 = 0
    assert np.all(res.membership[:, 0] == 0) and np.all(res.sizes[:, 0] == 1)
    assert np.all(res.membership[:, 1:] != 0)
    for b in range(4):
        np.testing.assert_array_equal(np.bincount(res.membership[b], minlength=2), res.sizes[b])
    unprotected = mapet.morph_tokens(x, r=16, iterations=14, protect_first=False)
    assert unprotected.merged.shape[1] == 1  # everything ends in one group


def test_schedule_is_the_documented_generator():
    sched = mapet.DTMSchedule(seed=12345)
    ref = SplitMix64(12345)
    for _ in range(50):
        entries = sched.draw(196)
        budgets = [ref.integer(0, 196) for _ in range(2)]
        iters = [ref.integer(1, 14) for _ in range(2)]
        for e, nb, k in zip(entries, budgets, iters):
            up = -(-nb // k)
            assert (e.num_tokens, e.iterations) == (nb, k)
            assert e.r == (nb // k if up * k > 196 else up)
            assert e.r * e.iterations <= 196
    # same seed, same stream; the whole ranges are reached
    a = mapet.DTMSchedule(seed=3)
    b = mapet.DTMSchedule(seed=3)
    draws = [a.draw(10) for _ in range(400)]
    assert draws == [b.draw(10) for _ in range(400)]
    assert {e.num_tokens for d in draws for e in d} == set(range(11))
    assert {e.iterations for d in draws for e in d} == set(range(1, 15))


def test_morph_tokens_budget_and_drawn_schedule():
    x = np.random.default_rng(2).standard_normal((2, 196, 4)).astype(np.float32)
    res = mapet.morph_tokens(x, num_tokens=100, iterations=7)  # ⌈100/7⌉·7 = 105 ≤ 196
    assert res.r == 15 and res.merged.shape[1] == 196 - 105
    res = mapet.morph_tokens(x, num_tokens=196, iterations=3)  # ⌈196/3⌉·3 = 198 > 196 → ⌊⌋
    assert res.r == 65
    drawn = mapet.morph_tokens(x, seed=5)
    e = mapet.DTMSchedule(5, num_schedules=1).draw(196)[0]
    assert (drawn.r, drawn.iterations) == (e.r, e.iterations)
    mem = mapet.dtm_memberships(x, mapet.DTMSchedule(5).draw(196))
    assert mem.shape == (2, 2, 196) and mem.dtype == np.int32
    one = mapet.morph_tokens(x[0], r=e.r, iterations=e.iterations)
    np.testing.assert_array_equal(one.membership, drawn.membership[0])


# ------------------------------------------------------------------ DTM: loss

def test_dtm_loss_r0_is_plain_smooth_l1():
    rng = np.random.default_rng(3)
    pred = (rng.standard_normal((2, 10, 5)) * 3).astype(np.float32)  # both smooth-L1 branches
    target = rng.standard_normal((2, 10, 5)).astype(np.float32)
    mem = mapet.dtm_memberships(target, [mapet.objectives.DTMScheduleEntry(0, 3, 0)] * 2)
    np.testing.assert_array_equal(mem, np.broadcast_to(np.arange(10), (2, 2, 10)))
    loss, _ = ops.dtm_loss(pred, target, mem)
    plain = smooth_l1(pred.astype(np.float64) - target).mean()
    assert loss == pytest.approx(plain, rel=1e-5)


def test_dtm_loss_matches_matrix_form():
    rng = np.random.default_rng(4)
    target = rng.standard_normal((3, 20, 6)).astype(np.float32)
    pred = (target + 2 * rng.standard_normal((3, 20, 6))).astype(np.float32)
    mem = mapet.dtm_memberships(target, mapet.DTMSchedule(9).draw(20))
    loss, _ = ops.dtm_loss(pred, target, mem)
    assert loss == pytest.approx(dtm_loss_reference(pred, target, mem), rel=1e-10)


def test_group_means_invariant_to_order_within_groups():
    rng = np.random.default_rng(5)
    target = rng.standard_normal((2, 16, 4)).astype(np.float32)
    pred = rng.standard_normal((2, 16, 4)).astype(np.float32)
    mem = mapet.morph_tokens(target, r=4, iterations=2).membership
    # permute tokens among the members of each group (sample by sample)
    perm_pred, perm_target = pred.copy(), target.copy()
    for b in range(2):
        for g in np.unique(mem[b]):
            idx = np.flatnonzero(mem[b] == g)
            perm_pred[b, idx] = pred[b, rng.permutation(idx)]
            perm_target[b, idx] = target[b, rng.permutation(idx)]
    assert not np.array_equal(perm_pred, pred)
    l0, g0 = ops.dtm_loss(pred, target, mem)
    l1, g1 = ops.dtm_loss(perm_pred, perm_target, mem)
    assert l1 == pytest.approx(l0, rel=1e-12)
    np.testing.assert_allclose(g1, g0, rtol=1e-6, atol=1e-12)


def test_dtm_loss_gradient_finite_differences():
    rng = np.random.default_rng(6)
    target = rng.standard_normal((2, 9, 3)).astype(np.float32)
    pred = (target + 2.5 * rng.standard_normal((2, 9, 3))).astype(np.float32)
    mem = np.stack([mapet.morph_tokens(target, r=2, iterations=2).membership,
                    mapet.morph_tokens(target, r=1, iterations=4).membership])
    dpred = np.full_like(pred, 0.5)
    _, dpred = ops.dtm_loss(pred, target, mem, dpred=dpred, dloss=2.0)
    grad = dpred - 0.5  # accumulated into the buffer
    fd = np.zeros_like(grad, dtype=np.float64)
    for i in np.ndindex(pred.shape):
        hi, lo = pred.copy(), pred.copy()
        hi[i] += 1e-3
        lo[i] -= 1e-3
        step = float(hi[i]) - float(lo[i])
        fd[i] = 2.0 * (ops.dtm_loss(hi, target, mem, backward=False)[0]
                       - ops.dtm_loss(lo, target, mem, backward=False)[0]) / step
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-3 * np.abs(fd).max())


def test_dtm_loss_rejects_bad_memberships():
    p = np.zeros((1, 4, 2), np.float32)
    with pytest.raises(ValueError, match="memberships"):
        ops.dtm_loss(p, p, np.array([[0, 1, 2, 4]]))
    with pytest.raises(ValueError, match="memberships"):
        ops.dtm_loss(p, p, np.zeros((1, 2, 4), np.int32))
    with pytest.raises(ValueError, match="target"):
        ops.dtm_loss(p, np.zeros((1, 4, 3), np.float32), np.zeros((1, 4)))


# ------------------------------------------------------------------ CCViT

def _ccvit_inputs(seed, B=3, P=4, grid=6, K=10, masked=12):
    rng = np.random.default_rng(seed)
    n = grid * grid
    images = rng.random((B, 3, grid * P, grid * P)).astype(np.float32)
    mask = np.zeros((B, n), bool)
    for b in range(B):
        mask[b, rng.choice(n, masked, replace=False)] = True
    ids = rng.integers(0, K, (B, n))
    centroids = rng.random((K, 3 * P * P)).astype(np.float32)
    return images, mask, ids, centroids


def test_ccvit_corruption_counts_disjoint_and_centroid_pixels():
    images, mask, ids, centroids = _ccvit_inputs(0)
    out, replaced = mapet.ccvit_corrupt(images, mask, ids, centroids, num_replace=7, seed=11)
    assert replaced.dtype == bool and np.all(replaced.sum(1) == 7)
    assert not np.any(replaced & mask)
    before, after = patchify(images, 4), patchify(out, 4)
    np.testing.assert_array_equal(after[replaced], centroids[ids[replaced]])
    np.testing.assert_array_equal(after[~replaced], before[~replaced])
    assert not np.array_equal(out, images)  # input untouched, a copy came back


def test_ccvit_corruption_is_the_documented_shuffle():
    images, mask, ids, centroids = _ccvit_inputs(1)
    _, replaced = mapet.ccvit_corrupt(images, mask, ids, centroids, num_replace=20, seed=99)
    for b in range(len(mask)):
        visible = list(np.flatnonzero(~mask[b]))
        rng = SplitMix64(99, stream=b)
        for s in range(20):
            j = s + rng.below(len(visible) - s)
            visible[s], visible[j] = visible[j], visible[s]
        np.testing.assert_array_equal(np.flatnonzero(replaced[b]), sorted(visible[:20]))


def test_ccvit_corruption_of_a_split_batch_equals_the_whole_batch():
    # first_sample places a part of a batch in the global sample stream (data-parallel ranks):
    # image i draws from stream first_sample + i, so the halves draw what the whole batch draws.
    images, mask, ids, centroids = _ccvit_inputs(2)
    whole, rep = mapet.ccvit_corrupt(images, mask, ids, centroids, num_replace=5, seed=7, first_sample=10)
    h = len(images) // 2
    a, ra = mapet.ccvit_corrupt(images[:h], mask[:h], ids[:h], centroids, num_replace=5, seed=7, first_sample=10)
    b, rb = mapet.ccvit_corrupt(images[h:], mask[h:], ids[h:], centroids, num_replace=5, seed=7,
                                first_sample=10 + h)
    np.testing.assert_array_equal(np.concatenate([a, b]), whole)
    np.testing.assert_array_equal(np.concatenate([ra, rb]), rep)
    visible = list(np.flatnonzero(~mask[h]))
    rng = SplitMix64(7, stream=10 + h)
    for s in range(5):
        j = s + rng.below(len(visible) - s)
        visible[s], visible[j] = visible[j], visible[s]
    np.testing.assert_array_equal(np.flatnonzero(rep[h]), sorted(visible[:5]))
    _, r0 = mapet.ccvit_corrupt(images, mask, ids, centroids, num_replace=5, seed=7)
    assert not np.array_equal(r0, rep)  # another offset, other picks


def test_ccvit_corruption_picks_visible_patches_uniformly():
    images, mask, ids, centroids = _ccvit_inputs(2, B=1, P=2, grid=4, masked=6)
    counts = np.zeros(16)
    for seed in range(2000):
        counts += mapet.ccvit_corrupt(images, mask, ids, centroids, num_replace=3, seed=seed)[1][0]
    visible = ~mask[0]
    assert np.all(counts[~visible] == 0)
    expected = 2000 * 3 / visible.sum()  # 600 per visible patch
    chi2 = ((counts[visible] - expected) ** 2 / expected).sum()
    assert chi2 < 30  # 9 dof: p ≈ 4e-4 for a fair pick


def test_ccvit_corruption_few_visible_inplace_and_errors():
    images, mask, ids, centroids = _ccvit_inputs(3, masked=30)  # 6 visible of 36
    buf = images.copy()
    out, replaced = mapet.ccvit_corrupt(buf, mask, ids, centroids, num_replace=20, seed=0, inplace=True)
    assert out is buf and np.array_equal(replaced, ~mask)
    with pytest.raises(ValueError, match="centroid_ids"):
        mapet.ccvit_corrupt(images, mask, np.full_like(ids, 10), centroids)
    with pytest.raises(ValueError, match="mask"):
        mapet.ccvit_corrupt(images, mask[:, :5], ids, centroids)


def test_pixel_targets_match_numpy():
    rng = np.random.default_rng(8)
    images = rng.random((2, 3, 32, 48)).astype(np.float32)
    got = ops.ccvit_pixel_targets(images, patch_size=16)
    x = patchify(images.astype(np.float64), 16)
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, ddof=1, keepdims=True) + 1e-6)
    assert got.shape == (2, 6, 768)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    flat = np.zeros((1, 3, 4, 4), np.float32)  # constant patch: zero, not NaN
    assert np.all(ops.ccvit_pixel_targets(flat, 2) == 0)


def test_masked_mse_value_and_gradient():
    rng = np.random.default_rng(9)
    pred = rng.standard_normal((2, 5, 6)).astype(np.float32)
    target = rng.standard_normal((2, 5, 6)).astype(np.float32)
    mask = rng.random((2, 5)) < 0.5
    mask[0, 0] = True
    loss, grad = ops.masked_mse(pred, target, mask)
    d = pred.astype(np.float64) - target
    assert loss == pytest.approx((d[mask] ** 2).mean(), rel=1e-10)
    assert np.all(grad[~mask] == 0)
    fd = np.zeros(pred.shape)
    for i in np.ndindex(pred.shape):
        hi, lo = pred.copy(), pred.copy()
        hi[i] += 1e-3
        lo[i] -= 1e-3
        fd[i] = (ops.masked_mse(hi, target, mask, backward=False)[0]
                 - ops.masked_mse(lo, target, mask, backward=False)[0]) / (float(hi[i]) - float(lo[i]))
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-6)
    assert ops.masked_mse(pred, target, np.zeros((2, 5), bool))[0] == 0.0

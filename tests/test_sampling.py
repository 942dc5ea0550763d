"""MaPeT permutations, the two-stream may-attend rules and BEiT block masks.

The masks are checked against a brute-force transcription of the ALGORITHMS.md §2 rules written here,
the generator against a pure-Python transcription of its documented algorithm (SplitMix64 →
xoshiro256** streams, Lemire bounded integers, Fisher–Yates), and the block masks against a
pure-Python transcription of BEiT's block-wise masking driven by that same generator.
"""
import math
import time

import numpy as np
import pytest

import mapet

M64 = (1 << 64) - 1


# ------------------------------------------------------------------ reference generator

def splitmix64_output(seed, k):
    """Output k (0-based) of SplitMix64 started at state `seed`."""
    z = (seed + (k + 1) * 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def rotl(x, k):
    return ((x << k) | (x >> (64 - k))) & M64


class Xoshiro:
    def __init__(self, state):
        self.s = list(state)

    @classmethod
    def stream(cls, seed, s):
        return cls([splitmix64_output(seed, 4 * s + k) for k in range(4)])

    def next(self):
        s = self.s
        result = (rotl((s[1] * 5) & M64, 7) * 9) & M64
        t = (s[1] << 17) & M64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = rotl(s[3], 45)
        return result

    def below(self, n):
        m = self.next() * n
        low = m & M64
        if low < n:
            threshold = ((1 << 64) - n) % n
            while low < threshold:
                m = self.next() * n
                low = m & M64
        return m >> 64

    def uniform(self, a=0.0, b=1.0):
        return a + (b - a) * ((self.next() >> 11) * 2.0 ** -53)


def reference_order(seed, s, N):
    rng = Xoshiro.stream(seed, s)
    patches = list(range(1, N))
    for i in range(N - 2, 0, -1):
        j = rng.below(i + 1)
        patches[i], patches[j] = patches[j], patches[i]
    return [0] + patches


def test_reference_generator_matches_published_values():
    # SplitMix64 from state 0 and xoshiro256** from state (1, 2, 3, 4): the values of the
    # authors' C code, so the transcription above (and hence the engine) is the real thing.
    assert splitmix64_output(0, 0) == 0xE220A8397B1DCDAF
    assert splitmix64_output(0, 1) == 0x6E789E6AA1B965F4
    x = Xoshiro([1, 2, 3, 4])
    assert [x.next() for _ in range(2)] == [11520, 0]


def test_sampler_follows_the_documented_generator():
    seed, N = 1234567, 37
    sampler = mapet.PermutationSampler(N - 1, least_number=5, seed=seed)
    first, second = sampler.sample(3), sampler.sample(2)
    expected = [reference_order(seed, s, N) for s in range(5)]
    assert first.orders.tolist() == expected[:3]
    assert second.orders.tolist() == expected[3:]


def test_sampler_seed_above_2_63():
    seed = (1 << 64) - 12345
    b = mapet.PermutationSampler(15, least_number=3, seed=seed).sample(2)
    assert b.orders.tolist() == [reference_order(seed, s, 16) for s in range(2)]


# ------------------------------------------------------------------ brute-force ALGORITHMS.md §2 rules

def reference_masks(order, L, positional=True):
    """Dense content and query masks straight from the ALGORITHMS.md §2 sentences."""
    N = len(order)
    rank = {t: k for k, t in enumerate(order)}
    C = {t for t in range(N) if rank[t] < L}
    T = sorted(set(range(N)) - C)
    P = len(T)

    def token_sees(r, c):  # content row token r -> column token c
        return c in C or rank[c] < rank[r] or c == r

    K = N + P if positional else N
    content = np.zeros((K, K), dtype=bool)
    query = np.zeros((P, K), dtype=bool)
    for r in range(N):
        for c in range(N):
            content[r, c] = token_sees(r, c)
        if positional:
            for j, p in enumerate(T):
                content[r, N + j] = not token_sees(r, p)
    if positional:
        for i in range(P):
            for c in range(N):
                content[N + i, c] = c in C
            for j in range(P):
                content[N + i, N + j] = True
    for i, p in enumerate(T):
        for c in range(N):
            query[i, c] = c in C or rank[c] < rank[p]
        if positional:
            for j, pj in enumerate(T):
                query[i, N + j] = rank[pj] >= rank[p]
    return content, query, T


def random_orders(rng, B, N):
    return np.stack([np.concatenate([[0], 1 + rng.permutation(N - 1)]) for _ in range(B)])


MASK_CASES = [(2, 1), (3, 1), (3, 2), (9, 1), (9, 4), (9, 8), (17, 1), (17, 16), (17, 7), (30, 1), (30, 29), (30, 12)]


@pytest.mark.parametrize("N,L", MASK_CASES)
def test_masks_match_brute_force(N, L):
    rng = np.random.default_rng(N * 100 + L)
    orders = random_orders(rng, 6, N)
    batch = mapet.PermutationBatch.from_orders(orders, least_number=L)
    assert batch.num_predicted == N - L
    for i in range(len(batch)):
        for positional in (True, False):
            content, query, T = reference_masks(orders[i].tolist(), L, positional)
            assert batch.predicted[i].tolist() == T
            np.testing.assert_array_equal(batch.content_mask(i, positional_tokens=positional), content)
            np.testing.assert_array_equal(batch.query_mask(i, positional_tokens=positional), query)


def test_sampled_masks_match_brute_force_at_full_size():
    batch = mapet.PermutationSampler(196, least_number=50, seed=3).sample(2)
    for i in range(2):
        content, query, T = reference_masks(batch.orders[i].tolist(), 50)
        assert content.shape == (197 + 147,) * 2 and query.shape == (147, 197 + 147)
        np.testing.assert_array_equal(batch.content_mask(i), content)
        np.testing.assert_array_equal(batch.query_mask(i), query)


def transitive_closure(a):
    r = a | np.eye(a.shape[0], dtype=bool)
    while True:
        nxt = r | ((r.astype(np.int32) @ r.astype(np.int32)) > 0)
        if (nxt == r).all():
            return r
        r = nxt


@pytest.mark.parametrize("positional", [True, False])
@pytest.mark.parametrize("L", [1, 5, 40, 48])
def test_no_leak_through_any_number_of_layers(positional, L):
    # Information reaching query row p_i after any depth (content stream iterated, then one
    # query step) may only come from tokens ranked before p_i: never from p_i itself nor from
    # any later-ranked predicted token.
    N = 49
    batch = mapet.PermutationSampler(N - 1, least_number=L, seed=L).sample(3)
    for i in range(3):
        content, query = batch.content_mask(i, positional), batch.query_mask(i, positional)
        reach = (query.astype(np.int32) @ transitive_closure(content).astype(np.int32)) > 0
        ranks = batch.ranks[i]
        for j, p in enumerate(batch.predicted[i]):
            leaked = np.nonzero(reach[j, :N] & (ranks >= ranks[p]))[0]
            assert leaked.size == 0, f"query row of token {p} sees content of {leaked}"
        # and a content token row never sees a later-ranked non-context token directly
        later = (ranks[None, :] > ranks[:, None]) & (ranks[None, :] >= L)
        assert not (content[:N, :N] & later).any()


@pytest.mark.parametrize("N,L", [(2, 1), (17, 1), (17, 16), (197, 50)])
def test_every_row_attends_something(N, L):
    batch = mapet.PermutationSampler(N - 1, least_number=L, seed=7).sample(4)
    for i in range(4):
        for positional in (True, False):
            assert batch.content_mask(i, positional).any(axis=1).all()
            assert batch.query_mask(i, positional).any(axis=1).all()


@pytest.mark.parametrize("stream", ["content", "query"])
@pytest.mark.parametrize("positional", [True, False])
def test_block_skipping_is_exact(stream, positional):
    rng = np.random.default_rng(11)
    batch = mapet.PermutationSampler(40, least_number=int(rng.integers(1, 40)), seed=5).sample(3)
    for i in range(3):
        dense = (batch.content_mask if stream == "content" else batch.query_mask)(i, positional)
        rows, keys = dense.shape
        seen = set()
        for _ in range(300):
            q0, q1 = sorted(rng.integers(0, rows + 1, 2))
            k0, k1 = sorted(rng.integers(0, keys + 1, 2))
            got = batch._any_allowed(stream, i, range(q0, q1), range(k0, k1), positional)
            want = bool(dense[q0:q1, k0:k1].any())
            assert got == want, (stream, positional, i, q0, q1, k0, k1)
            seen.add(want)
        assert seen == {True, False}


# ------------------------------------------------------------------ batch tables

def test_batch_tables_are_consistent():
    N, L = 197, 50
    batch = mapet.PermutationSampler(N - 1, least_number=L, seed=0).sample(64)
    o, r = batch.orders, batch.ranks
    assert o.dtype == np.int64 and r.dtype == np.int64 and batch.predicted.dtype == np.int64
    assert o.shape == (64, N) and batch.predicted.shape == (64, N - L)
    assert (o[:, 0] == 0).all()
    assert (np.sort(o, axis=1) == np.arange(N)).all()
    assert (np.take_along_axis(r, o, axis=1) == np.arange(N)).all()
    for b in range(64):
        assert batch.predicted[b].tolist() == np.nonzero(r[b] >= L)[0].tolist()
    assert (np.diff(batch.predicted, axis=1) > 0).all()
    assert (batch.predicted_ranks == np.take_along_axis(r, batch.predicted, axis=1)).all()
    assert (batch.context == (r < L)).all() and batch.context.sum(axis=1).tolist() == [L] * 64
    with pytest.raises(ValueError):
        batch.ranks[0, 0] = 5  # the tables the masks read are read-only


def test_permutations_are_uniform():
    # 3 patches: each of the 6 orders about equally often; and the patch at slot 1 uniform.
    b = mapet.PermutationSampler(3, least_number=1, seed=99).sample(6000)
    _, counts = np.unique(b.orders[:, 1:], axis=0, return_counts=True)
    assert len(counts) == 6
    chi2 = ((counts - 1000) ** 2 / 1000).sum()
    assert chi2 < 20.5  # p ≈ 0.001 for 5 degrees of freedom


# ------------------------------------------------------------------ upper_limit

@pytest.mark.parametrize("upper", [None, 50, 51, 120, 196, 197, 500])
def test_upper_limit_selects_by_rank_like_the_reference(upper):
    N, L = 197, 50
    batch = mapet.PermutationSampler(N - 1, least_number=L, upper_limit=upper, seed=1).sample(8)
    for b in range(8):
        order = batch.orders[b].tolist()
        # The reference counts, for every token, how many tokens precede it in the order
        # and keeps a predicted token when that count is not above upper_limit.
        preceding = {t: order.index(t) for t in range(N)}
        want = [upper is None or preceding[p] <= upper for p in batch.predicted[b].tolist()]
        assert batch.loss_mask[b].tolist() == want
    kept = batch.loss_mask.sum(axis=1)
    expected = N - L if upper is None else min(upper, N - 1) - L + 1
    assert kept.tolist() == [expected] * 8
    np.testing.assert_allclose(batch.loss_weights.sum(), 1.0, rtol=1e-6)
    assert (batch.loss_weights[~batch.loss_mask] == 0).all()


def test_upper_limit_below_least_number_is_rejected():
    with pytest.raises(ValueError, match="upper_limit"):
        mapet.PermutationSampler(196, least_number=50, upper_limit=49)


# ------------------------------------------------------------------ seeds, threads, state

def test_seeds_reproducible_and_distinct():
    a = mapet.PermutationSampler(196, seed=42).sample(16).orders
    b = mapet.PermutationSampler(196, seed=42).sample(16).orders
    c = mapet.PermutationSampler(196, seed=43).sample(16).orders
    assert (a == b).all() and not (a == c).all()
    assert len({tuple(r) for r in a}) == 16  # distinct streams per sample


def test_independent_of_thread_count_and_batch_split():
    before = mapet.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            mapet.set_num_threads(threads)
            results.append(mapet.PermutationSampler(196, seed=9).sample(2048).orders.copy())
            blocks = mapet.BlockMaskGenerator(seed=9).sample(700)
            results.append(blocks)
        for k in range(2, len(results)):
            assert (results[k] == results[k % 2]).all()
    finally:
        mapet.set_num_threads(before)
    s = mapet.PermutationSampler(196, seed=9)
    split = np.concatenate([s.sample(1000).orders, s.sample(1048).orders])
    assert (split == results[0]).all()


def test_state_dict_resumes_exactly():
    s = mapet.PermutationSampler(196, least_number=60, upper_limit=150, seed=2024)
    s.sample(5)
    state = s.state_dict()
    assert state["samples_drawn"] == 5 and state["seed"] == 2024
    nxt = s.sample(7).orders
    t = mapet.PermutationSampler(196, least_number=60, upper_limit=150)  # OS-seeded
    t.load_state_dict(state)
    assert t.seed == 2024 and (t.sample(7).orders == nxt).all()
    with pytest.raises(ValueError, match="least_number"):
        mapet.PermutationSampler(196, least_number=50, upper_limit=150).load_state_dict(state)
    with pytest.raises(ValueError, match="generator"):
        t.load_state_dict({**state, "generator": "mt19937"})


def test_unseeded_samplers_differ_and_report_their_seed():
    a, b = mapet.PermutationSampler(196), mapet.PermutationSampler(196)
    assert a.seed != b.seed
    assert (mapet.PermutationSampler(196, seed=a.seed).sample(2).orders == a.sample(2).orders).all()


# ------------------------------------------------------------------ validation

def test_from_orders_accepts_any_integer_dtype():
    orders = random_orders(np.random.default_rng(0), 3, 10)
    for dtype in (np.int16, np.int32, np.int64, np.uint8):
        b = mapet.PermutationBatch.from_orders(orders.astype(dtype), least_number=4)
        assert (b.orders == orders).all()


def test_from_orders_names_the_bad_row():
    good = random_orders(np.random.default_rng(1), 4, 10)
    bad = good.copy()
    bad[2, [0, 3]] = bad[2, [3, 0]]
    with pytest.raises(ValueError, match=r"row 2: expected the class token 0 at position 0"):
        mapet.PermutationBatch.from_orders(bad, 3)
    bad = good.copy()
    bad[3, 5] = bad[3, 6]
    with pytest.raises(ValueError, match=r"row 3: token \d+ appears twice \(positions 5 and 6\)"):
        mapet.PermutationBatch.from_orders(bad, 3)
    bad = good.copy()
    bad[1, 4] = 10
    with pytest.raises(ValueError, match=r"row 1: value 10 at position 4"):
        mapet.PermutationBatch.from_orders(bad, 3)
    bad[1, 4] = -1
    with pytest.raises(ValueError, match=r"row 1: value -1 at position 4"):
        mapet.PermutationBatch.from_orders(bad, 3)


@pytest.mark.parametrize("L", [0, 10, 11, -3])
def test_from_orders_least_number_range(L):
    with pytest.raises(ValueError, match="least_number"):
        mapet.PermutationBatch.from_orders(random_orders(np.random.default_rng(2), 2, 10), L)


def test_from_orders_type_and_shape_errors():
    with pytest.raises(TypeError, match="orders: expected an integer array"):
        mapet.PermutationBatch.from_orders(np.zeros((2, 5)), 2)
    with pytest.raises(TypeError, match="orders"):
        mapet.PermutationBatch.from_orders(np.zeros((2, 5), dtype=bool), 2)
    with pytest.raises(ValueError, match="2-d"):
        mapet.PermutationBatch.from_orders(np.arange(5), 2)
    with pytest.raises(ValueError, match="N ≥ 2"):
        mapet.PermutationBatch.from_orders(np.zeros((3, 1), dtype=np.int64), 1)
    with pytest.raises(TypeError, match="least_number"):
        mapet.PermutationBatch.from_orders(np.array([[0, 1]]), 1.0)


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match="least_number"):
        mapet.PermutationSampler(16)  # default least_number 50 > N - 1
    with pytest.raises(ValueError, match="num_patches"):
        mapet.PermutationSampler(0, least_number=1)
    with pytest.raises(ValueError, match="seed"):
        mapet.PermutationSampler(16, least_number=2, seed=-1)
    with pytest.raises(ValueError, match="batch_size"):
        mapet.PermutationSampler(16, least_number=2, seed=0).sample(0)
    b = mapet.PermutationSampler(16, least_number=2, seed=0).sample(2)
    with pytest.raises(IndexError, match="sample index 2"):
        b.content_mask(2)
    assert (b.query_mask(-1) == b.query_mask(1)).all()


# ------------------------------------------------------------------ block masks

def reference_block_mask(seed, s, g, target, lo, hi, min_aspect, max_aspect, exact):
    """BEiT block-wise masking (ALGORITHMS.md §2) transcribed, driven by stream s of the generator."""
    rng = Xoshiro.stream(seed, s)
    mask = np.zeros((g, g), dtype=bool)
    log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)
    count, blocks = 0, []
    while count < target:
        budget = min(target - count, hi)
        delta = 0
        for _ in range(10):
            area = rng.uniform(lo, budget)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if h < g and w < g:
                top, left = rng.below(g - h + 1), rng.below(g - w + 1)
                new = h * w - mask[top:top + h, left:left + w].sum()
                if 0 < new <= budget:
                    mask[top:top + h, left:left + w] = True
                    delta += new
                    blocks.append((top, left, h, w, budget))
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    if exact and count < target:
        free = list(np.nonzero(~mask.reshape(-1))[0])
        for k in range(target - count):
            pick = k + rng.below(len(free) - k)
            free[k], free[pick] = free[pick], free[k]
            mask.reshape(-1)[free[k]] = True
    return mask, blocks


@pytest.mark.parametrize("cfg", [
    dict(g=14, target=75, lo=16, hi=None, exact=True),
    dict(g=14, target=75, lo=16, hi=None, exact=False),
    dict(g=14, target=120, lo=4, hi=30, exact=True),
    dict(g=7, target=49, lo=16, hi=None, exact=True),
    dict(g=6, target=5, lo=16, hi=None, exact=True),
])
def test_block_masks_match_transcription(cfg):
    hi = cfg["target"] if cfg["hi"] is None else cfg["hi"]
    gen = mapet.BlockMaskGenerator(cfg["g"], cfg["target"], cfg["lo"], cfg["hi"], exact=cfg["exact"], seed=77)
    masks = gen.sample(12)
    mask, blocks = gen.sample_with_blocks()
    for s in range(13):
        want, want_blocks = reference_block_mask(77, s, cfg["g"], cfg["target"], cfg["lo"], hi, 0.3, 1 / 0.3,
                                                 cfg["exact"])
        got = masks[s].reshape(cfg["g"], cfg["g"]) if s < 12 else mask
        np.testing.assert_array_equal(got, want)
        if s == 12:
            assert [tuple(b) for b in blocks] == want_blocks


def test_block_mask_counts_and_blocks():
    gen = mapet.BlockMaskGenerator(14, 75, seed=5)
    assert gen().shape == (14, 14) and gen().dtype == bool
    assert (gen.sample(300).sum(axis=1) == 75).all()
    loose = mapet.BlockMaskGenerator(14, 75, exact=False, seed=6)
    lo, hi = 0.3, 1 / 0.3
    for _ in range(60):
        mask, blocks = loose.sample_with_blocks()
        union = np.zeros((14, 14), dtype=bool)
        for top, left, h, w, budget in blocks:
            assert 1 <= h < 14 and 1 <= w < 14 and top + h <= 14 and left + w <= 14
            added = h * w - union[top:top + h, left:left + w].sum()
            assert 0 < added <= budget
            union[top:top + h, left:left + w] = True
            # h, w are round(√(area·aspect)), round(√(area/aspect)) for some area between 16
            # and the budget and some aspect in [0.3, 1/0.3]: invert the rounding.
            a_lo, a_hi = sorted((16, budget))
            assert (h - .5) * (w - .5) <= a_hi and (h + .5) * (w + .5) >= a_lo
            assert (h - .5) / (w + .5) <= hi and (h + .5) / (w - .5) >= lo  # h/w ≈ aspect
        assert (mask == union).all() and mask.sum() <= 75
    # most BEiT masks get close to the target from blocks alone
    counts = loose.sample(400).sum(axis=1)
    assert (counts <= 75).all() and counts.mean() > 60


def test_block_mask_state_and_seed():
    a = mapet.BlockMaskGenerator(seed=3)
    first = a.sample(4)
    state = a.state_dict()
    nxt = a.sample(3)
    b = mapet.BlockMaskGenerator()
    b.load_state_dict(state)
    assert (b.sample(3) == nxt).all()
    assert (mapet.BlockMaskGenerator(seed=3).sample(4) == first).all()
    assert not (mapet.BlockMaskGenerator(seed=4).sample(4) == first).all()
    with pytest.raises(ValueError, match="num_masking_patches"):
        mapet.BlockMaskGenerator(num_masking_patches=60).load_state_dict(state)


def test_block_mask_argument_errors():
    with pytest.raises(ValueError, match="num_masking_patches"):
        mapet.BlockMaskGenerator(14, 197)
    with pytest.raises(ValueError, match="min_aspect"):
        mapet.BlockMaskGenerator(14, 75, min_aspect=0.0)
    with pytest.raises(ValueError, match="max_aspect"):
        mapet.BlockMaskGenerator(14, 75, min_aspect=0.5, max_aspect=0.4)
    with pytest.raises(ValueError, match="input_size"):
        mapet.BlockMaskGenerator((14, 14, 3))
    rect = mapet.BlockMaskGenerator((10, 20), 50, seed=1)
    assert rect().shape == (10, 20) and rect().sum() == 50


# ------------------------------------------------------------------ speed

def test_sampler_speed_batch_2048():
    sampler = mapet.PermutationSampler(196, least_number=50, seed=0)
    sampler.sample(2048)  # warm up
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        sampler.sample(2048)
        times.append(time.perf_counter() - t0)
    # target < 50 ms (bench/sampler.py reports it); slack for a shared, noisy machine
    assert np.median(times) < 0.1, f"median {np.median(times) * 1e3:.1f} ms"

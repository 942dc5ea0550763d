"""MaPeT / PIM / BEiT pre-training models against the float64 NumPy reference (tests/reference_twostream.py).

Tiny configs (16 px images, 4 px patches → n = 16 patches, N = 17 tokens, C = 24, 3 heads, depth 2,
11 visual tokens). Forward logits must match the reference to 1e-4 relative; gradients are
checked against central finite differences of the *float64 reference* loss (see
``test_gradients_match_finite_differences`` for the step and tolerance).
"""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_twostream as ref  # noqa: E402

import mapet  # noqa: E402
from mapet.io import load_file  # noqa: E402
from mapet.pretrain_models import BEiT, MaPeT, create_pretrain_model, load_pretrain_model  # noqa: E402

IMG, PATCH, C, DEPTH, HEADS, V = 16, 4, 24, 2, 3, 11
n = (IMG // PATCH) ** 2
N = n + 1
TINY = dict(img_size=IMG, patch_size=PATCH, embed_dim=C, depth=DEPTH, num_heads=HEADS, num_tokens=V, least_number=5)
REF_KIND = {"mapet": "mapet", "pim": "pim", "beit": "mim"}


def images_and_tokens(rng, B):
    """B random images [B, 3, IMG, IMG] and their visual tokens [B, n] in [0, V), drawn in that order."""
    return rng.standard_normal((B, 3, IMG, IMG)).astype(np.float32), rng.integers(0, V, (B, n))


def make(kind, rng, least_number=5, drop_path_rate=0.0, **kw):
    """A tiny model of `kind` loaded with random reference weights; returns (model, weights)."""
    m = create_pretrain_model(f"{kind}_tiny_patch16_224",
                              **dict(TINY, least_number=least_number, drop_path_rate=drop_path_rate, **kw))
    w = ref.random_weights(rng, embed_dim=C, depth=DEPTH, num_heads=HEADS, num_tokens=V, patch_size=PATCH,
                           img_size=IMG, kind=REF_KIND[kind])
    m.load_state_dict(w)
    return m, w


def random_masks(rng, B, count):
    mask = np.zeros((B, n), bool)
    for b in range(B):
        mask[b, rng.choice(n, count, replace=False)] = True
    return mask


def ref_logits(kind, w, x, arg, keeps=None):
    if kind == "beit":
        return ref.mim_forward(w, x, arg, HEADS, drop_path=keeps)
    return ref.two_stream_forward(w, x, arg.orders, arg.least_number, HEADS, kind == "mapet", drop_path=keeps)


def ref_loss(kind, w, x, tokens, arg, keeps=None):
    logits = ref_logits(kind, w, x, arg, keeps)
    if kind == "beit":
        return ref.mim_loss(logits, tokens, arg)
    return ref.two_stream_loss(logits, tokens, arg.predicted, arg.loss_mask)


def rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


# ------------------------------------------------------------------ names, layout, init

def expected_names(kind, depth=DEPTH):
    special, head = ("mask_token", "lm_head") if kind == "beit" else ("mask_positional_token", "decoder")
    names = ["cls_token", "pos_embed", special, "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        p = f"blocks.{i}."
        names += [p + s for s in ("norm1.weight", "norm1.bias", "attn.kv.weight", "attn.kv.bias", "attn.q.weight",
                                  "attn.q.bias", "attn.proj.weight", "attn.proj.bias", "ls1.gamma", "norm2.weight",
                                  "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
                                  "ls2.gamma")]
    return names + ["norm.weight", "norm.bias", head + ".weight", head + ".bias"]


@pytest.mark.parametrize("kind", ["mapet", "pim", "beit"])
def test_state_dict_reference_names_order_and_zero_copy(kind):
    m = create_pretrain_model(f"{kind}_tiny_patch16_224", **TINY)
    sd = m.state_dict()
    assert list(sd) == expected_names(kind)
    head = "lm_head" if kind == "beit" else "decoder"
    assert sd[head + ".weight"].shape == (V, C) and sd["pos_embed"].shape == (1, N, C)
    assert sd["blocks.0.attn.kv.weight"].shape == (2 * C, C)
    # Views into one block: writing a state_dict entry changes params_flat, and the other way round.
    flat = m.params_flat()
    assert flat.dtype == np.float32 and flat.ndim == 1 and sum(v.size for v in sd.values()) <= flat.size
    for name, v in sd.items():
        assert np.shares_memory(v, flat), name
    sd["norm.bias"][3] = 7.5
    _, _, off = [e for e in m.parameter_table if e[0] == "norm.bias"][0]
    assert flat[off + 3] == 7.5
    assert all(np.shares_memory(g, m.grads_flat()) for g in m.grads().values())
    assert m.config["num_tokens"] == V and m.config["least_number"] == 5


def test_least_number_defaults_to_the_papers_share_and_warns_when_little_is_predicted():
    from mapet.pretrain_models import default_least_number
    assert default_least_number(196) == 50 and default_least_number(16) == 4 and default_least_number(1) == 1
    for n, least in ((196, 50), (64, 16), (16, 4)):
        assert round(n * 50 / 196) == least
    with pytest.warns(UserWarning, match="leaves 1 predicted token"):
        create_pretrain_model("mapet_tiny_patch16_224", img_size=16, patch_size=4, depth=1, num_tokens=8,
                              least_number=16)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = create_pretrain_model("pim_tiny_patch16_224", img_size=16, patch_size=4, depth=1, num_tokens=8)
    assert m.config["least_number"] == 4 and m.sampler(seed=0).sample(1).num_predicted == 13


def test_init_follows_spec_and_is_reproducible():
    a = create_pretrain_model("mapet_tiny_patch16_224", img_size=128, patch_size=16, depth=2)
    b = create_pretrain_model("mapet_tiny_patch16_224", img_size=128, patch_size=16, depth=2)
    c = create_pretrain_model("mapet_tiny_patch16_224", img_size=128, patch_size=16, depth=2, seed=1)
    assert np.array_equal(a.params_flat(), b.params_flat())
    assert not np.array_equal(a.params_flat(), c.params_flat())
    sd = a.state_dict()
    assert a.config["init_values"] == 0.1 and a.config["drop_path_rate"] == 0.1
    assert a.config["num_tokens"] == 8192 and a.config["least_number"] == 16  # 50/196 of 64 patches
    assert 0.3e-6 < sd["cls_token"].std() < 3e-6
    for name in ("pos_embed", "mask_positional_token", "decoder.weight", "blocks.1.attn.q.weight", "blocks.0.mlp.fc2.weight"):
        assert 0.017 < sd[name].std() < 0.023, name
    assert np.all(sd["blocks.0.ls1.gamma"] == np.float32(0.1)) and np.all(sd["blocks.1.ls2.gamma"] == np.float32(0.1))
    assert np.all(sd["decoder.bias"] == 0) and np.all(sd["blocks.0.attn.q.bias"] == 0)
    assert np.all(sd["norm.weight"] == 1) and np.all(sd["norm.bias"] == 0)
    bound = 1 / np.sqrt(3 * 16 * 16)
    w = sd["patch_embed.proj.weight"]
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    assert np.all(a.grads_flat() == 0)


def test_create_pretrain_model_names_and_sizes():
    assert isinstance(create_pretrain_model("beit_tiny_patch16_224", depth=1, num_tokens=8), BEiT)
    p = create_pretrain_model("pim_small_patch16_224", depth=1, num_tokens=8)
    assert isinstance(p, MaPeT) and not p.positional_tokens and p.config["embed_dim"] == 384
    assert create_pretrain_model("mapet_base_patch16_224", depth=1, num_tokens=8).config["num_heads"] == 12
    with pytest.raises(ValueError, match="unknown model 'mapet_huge_patch16_224'"):
        create_pretrain_model("mapet_huge_patch16_224")
    with pytest.raises(TypeError, match="unknown option"):
        create_pretrain_model("mapet_tiny_patch16_224", num_classes=3)
    with pytest.raises(ValueError, match="least_number"):
        create_pretrain_model("mapet_tiny_patch16_224", **dict(TINY, least_number=N))
    with pytest.raises(ValueError, match="least_number"):
        create_pretrain_model("pim_tiny_patch16_224", **dict(TINY, least_number=0))
    with pytest.raises(ValueError, match="embed_dim"):
        create_pretrain_model("beit_tiny_patch16_224", **dict(TINY, num_heads=5))


# ------------------------------------------------------------------ forward vs the float64 reference

@pytest.mark.parametrize("kind", ["mapet", "pim"])
@pytest.mark.parametrize("least_number", [1, 2, 5, 11, N - 1])
def test_two_stream_forward_matches_reference(kind, least_number):
    rng = np.random.default_rng(least_number + (0 if kind == "mapet" else 100))
    m, w = make(kind, rng, least_number=least_number)
    x = rng.standard_normal((3, 3, IMG, IMG)).astype(np.float32)
    batch = mapet.PermutationSampler(n, least_number, seed=least_number).sample(3)
    got = m(x, batch)
    want = ref_logits(kind, w, x, batch)
    assert got.shape == (3, N - least_number, V)
    assert rel_err(got, want) <= 1e-4


def test_mapet_and_pim_differ_and_orders_matter():
    rng = np.random.default_rng(7)
    m, w = make("mapet", rng)
    p, _ = make("pim", rng)
    p.load_state_dict(w)
    x = rng.standard_normal((2, 3, IMG, IMG)).astype(np.float32)
    orders = np.stack([np.r_[0, rng.permutation(n) + 1] for _ in range(2)])
    a = mapet.PermutationBatch.from_orders(orders, 5)
    # Same predicted set, different order among the predicted tokens: logits must change.
    swapped = orders.copy()
    swapped[:, [6, 7]] = swapped[:, [7, 6]]
    b = mapet.PermutationBatch.from_orders(swapped, 5)
    assert np.array_equal(a.predicted, b.predicted)
    assert np.abs(m(x, a) - m(x, b)).max() > 1e-3
    assert np.abs(m(x, a) - p(x, a)).max() > 1e-3
    assert rel_err(m(x, b), ref_logits("mapet", w, x, b)) <= 1e-4


@pytest.mark.parametrize("count", [1, 6, n])
def test_beit_forward_matches_reference(count):
    rng = np.random.default_rng(count)
    m, w = make("beit", rng)
    x = rng.standard_normal((3, 3, IMG, IMG)).astype(np.float32)
    mask = random_masks(rng, 3, count)
    got = m(x, mask)
    assert got.shape == (3, count, V)
    assert rel_err(got, ref.mim_forward(w, x, mask, HEADS)) <= 1e-4


def test_beit_with_block_masks_and_grid_shaped_mask():
    rng = np.random.default_rng(3)
    m, w = make("beit", rng)
    gen = mapet.BlockMaskGenerator(4, 6, min_num_patches=2, seed=0)
    mask = gen.sample(4)
    x = rng.standard_normal((4, 3, IMG, IMG)).astype(np.float32)
    got = m(x, mask.reshape(4, 4, 4))
    assert rel_err(got, ref.mim_forward(w, x, mask, HEADS)) <= 1e-4


@pytest.mark.parametrize("kind", ["mapet", "pim", "beit"])
def test_train_step_loss_and_logits_match_reference(kind):
    rng = np.random.default_rng(11)
    m, w = make(kind, rng)
    x = rng.standard_normal((3, 3, IMG, IMG)).astype(np.float32)
    tokens = rng.integers(0, V, (3, n)).astype(np.uint8)    # any integer dtype
    arg = random_masks(rng, 3, 5) if kind == "beit" else mapet.PermutationSampler(n, 5, seed=2).sample(3)
    loss, logits = m.train_step(x, tokens, arg, return_logits=True)
    want = ref_logits(kind, w, x, arg)
    assert rel_err(logits.reshape(want.shape), want) <= 1e-4
    assert abs(loss - ref_loss(kind, w, x, tokens, arg)) <= 1e-5 * max(1.0, abs(loss))


def test_upper_limit_leaves_late_tokens_out_of_the_loss():
    rng = np.random.default_rng(5)
    m, w = make("mapet", rng)
    x, tokens = images_and_tokens(rng, 4)
    batch = mapet.PermutationSampler(n, 5, upper_limit=10, seed=3).sample(4)
    assert 0 < batch.loss_mask.sum() < batch.loss_mask.size
    loss = m.train_step(x, tokens, batch)
    want = ref.two_stream_loss(ref_logits("mapet", w, x, batch), tokens, batch.predicted, batch.loss_mask)
    unmasked = ref.two_stream_loss(ref_logits("mapet", w, x, batch), tokens, batch.predicted)
    assert abs(loss - want) <= 1e-5 * abs(want) and abs(want - unmasked) > 1e-3


# ------------------------------------------------------------------ gradients

def _perturbed(W, d, h):
    return {k: W[k] + h * d[k] for k in W}


@pytest.mark.parametrize("kind,least_number", [("mapet", 5), ("mapet", 1), ("mapet", N - 1), ("pim", 3), ("beit", 0)])
def test_gradients_match_finite_differences(kind, least_number):
    """Analytic float32 gradients vs central differences of the float64 reference loss.

    Differencing the float64 reference (not the float32 model) keeps the finite difference itself
    accurate: with step h = 1e-5 the truncation error is O(h²)·|f'''| ≈ 1e-10 and the rounding
    error ≈ 1e-16/h = 1e-11, far below the float32 gradient's own error (relative ~1e-6 for
    sums of O(1) terms). So the tolerances are set by float32: 1e-4 relative on directional
    derivatives along random directions over *all* parameters at once, and for single coordinates
    |fd − g| ≤ 1e-3·(|fd| + 1e-3) (coordinates are ~1e-3…1, each a float32 sum of many terms).
    """
    rng = np.random.default_rng(1000 + least_number)
    m, w = make(kind, rng, least_number=max(least_number, 1))
    x, tokens = images_and_tokens(rng, 2)
    if kind == "beit":
        arg = random_masks(rng, 2, 6)
    else:
        arg = mapet.PermutationSampler(n, least_number, upper_limit=12 if least_number == 5 else None,
                                       seed=least_number).sample(2)
    m.zero_grad()
    m.train_step(x, tokens, arg)
    g = {k: v.astype(np.float64) for k, v in m.grads().items()}
    W = {k: v.astype(np.float64) for k, v in w.items()}
    f = lambda weights: ref_loss(kind, weights, x, tokens, arg)  # noqa: E731
    h = 1e-5
    for _ in range(2):
        d = {k: rng.standard_normal(v.shape) for k, v in W.items()}
        fd = (f(_perturbed(W, d, h)) - f(_perturbed(W, d, -h))) / (2 * h)
        an = sum(float((g[k] * d[k]).sum()) for k in W)
        assert abs(fd - an) <= 1e-4 * abs(fd), (fd, an)
    names = list(W)
    for name in rng.choice(names, 12, replace=False):
        idx = int(rng.integers(W[name].size))
        d = {k: np.zeros_like(v) for k, v in W.items()}
        d[name].reshape(-1)[idx] = 1.0
        fd = (f(_perturbed(W, d, h)) - f(_perturbed(W, d, -h))) / (2 * h)
        an = g[name].reshape(-1)[idx]
        assert abs(fd - an) <= 1e-3 * (abs(fd) + 1e-3), (name, idx, fd, an)


def test_gradients_accumulate_and_zero_grad_clears():
    rng = np.random.default_rng(2)
    m, _ = make("mapet", rng)
    x, tokens = images_and_tokens(rng, 2)
    batch = m.sampler(seed=0).sample(2)
    m.train_step(x, tokens, batch)
    once = m.grads_flat().copy()
    m.train_step(x, tokens, batch)
    np.testing.assert_allclose(m.grads_flat(), 2 * once, rtol=1e-5, atol=1e-7)
    m.zero_grad()
    assert not m.grads_flat().any()


# ------------------------------------------------------------------ drop path

@pytest.mark.parametrize("kind", ["mapet", "pim"])
def test_drop_path_one_keep_mask_per_sample_shared_by_both_streams(kind):
    """depth 2, drop_path_rate 0.6: block 0 has rate 0, block 1 rate 0.6 (linear rise). The
    training logits of each sample must equal the reference with ONE (attention, MLP) keep pair
    applied to both streams — out of the 4 shared pairs exactly one fits, and the pairs are
    distinguishable (no two give the same logits)."""
    rng = np.random.default_rng(21)
    m, w = make(kind, rng, drop_path_rate=0.6)
    B = 6
    x = rng.standard_normal((B, 3, IMG, IMG)).astype(np.float32)
    tokens = rng.integers(0, V, (B, n))
    batch = mapet.PermutationSampler(n, 5, seed=4).sample(B)
    _, logits = m.train_step(x, tokens, batch, return_logits=True)
    s = 1 / (1 - 0.6)
    pairs = [(a, b) for a in (0.0, s) for b in (0.0, s)]
    seen = set()
    for pair in pairs:
        keeps = np.ones((DEPTH, 2, B))
        keeps[1, 0, :], keeps[1, 1, :] = pair
        want = ref_logits(kind, w, x, batch, keeps)
        for b in range(B):
            if np.abs(logits[b] - want[b]).max() <= 1e-4 * np.abs(want[b]).max():
                seen.add((b, pair))
    per_sample = [sum((b, p) in seen for p in pairs) for b in range(B)]
    assert per_sample == [1] * B, per_sample
    assert len({p for _, p in seen}) >= 2   # the masks really vary across samples


@pytest.mark.bitwise
def test_rng_state_resumes_training_bitwise_and_seed_restarts():
    rng = np.random.default_rng(8)
    m, _ = make("mapet", rng, drop_path_rate=0.5)
    x, tokens = images_and_tokens(rng, 4)
    batch = mapet.PermutationSampler(n, 5, seed=9).sample(4)
    state = m.rng_state()
    json.dumps(state)
    losses = [m.train_step(x, tokens, batch) for _ in range(4)]
    grads = m.grads_flat().copy()
    assert len(set(losses)) > 1          # different keep masks per step
    m.zero_grad()
    m.set_rng_state(state)
    again = [m.train_step(x, tokens, batch) for _ in range(4)]
    assert again == losses and np.array_equal(m.grads_flat(), grads)
    m.set_seed(123)
    first = m.train_step(x, tokens, batch)
    m.set_seed(123)
    assert m.train_step(x, tokens, batch) == first
    with pytest.raises(ValueError, match="state"):
        m.set_rng_state({"generator": "xoshiro256**", "state": [0, 0, 0, 0]})
    with pytest.raises(ValueError, match="state"):
        m.set_rng_state({"state": [1, 2, 3]})


def test_inference_has_no_drop_path():
    rng = np.random.default_rng(4)
    m, w = make("mapet", rng, drop_path_rate=0.9)
    x = rng.standard_normal((2, 3, IMG, IMG)).astype(np.float32)
    batch = mapet.PermutationSampler(n, 5, seed=1).sample(2)
    assert rel_err(m(x, batch), ref_logits("mapet", w, x, batch)) <= 1e-4


def test_non_finite_loss_leaves_gradients_and_rng_unchanged():
    rng = np.random.default_rng(6)
    m, _ = make("mapet", rng, drop_path_rate=0.3)
    x, tokens = images_and_tokens(rng, 2)
    batch = mapet.PermutationSampler(n, 5, seed=1).sample(2)
    state = m.rng_state()
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        m.train_step(bad, tokens, batch)
    assert not m.grads_flat().any() and m.rng_state() == state


# ------------------------------------------------------------------ files

@pytest.mark.parametrize("kind", ["mapet", "beit"])
def test_save_load_round_trip(kind, tmp_path):
    rng = np.random.default_rng(12)
    m, _ = make(kind, rng)
    path = str(tmp_path / f"{kind}.safetensors")
    m.save(path)
    tensors, meta = load_file(path)
    assert meta["format"] == "mapet" and meta["model"] == kind and json.loads(meta["config"]) == m.config
    assert sorted(tensors) == sorted(m.state_dict())  # the safetensors package orders the file
    back = load_pretrain_model(path)
    assert type(back) is type(m) and back.config == m.config
    assert np.array_equal(back.params_flat(), m.params_flat())
    x = rng.standard_normal((2, 3, IMG, IMG)).astype(np.float32)
    arg = random_masks(rng, 2, 4) if kind == "beit" else mapet.PermutationSampler(n, 5, seed=0).sample(2)
    assert np.array_equal(back(x, arg), m(x, arg))


def test_load_state_dict_strict_errors_name_what_differs():
    rng = np.random.default_rng(13)
    m, w = make("mapet", rng)
    before = m.params_flat().copy()
    missing = {k: v for k, v in w.items() if k != "decoder.bias"}
    with pytest.raises(KeyError, match=r"missing keys \['decoder.bias'\]"):
        m.load_state_dict(missing)
    with pytest.raises(KeyError, match=r"unexpected keys \['extra'\]"):
        m.load_state_dict(dict(w, extra=np.zeros(1)))
    with pytest.raises(ValueError, match=r"pos_embed has shape \(1, 5, 24\), the model expects \(1, 17, 24\)"):
        m.load_state_dict(dict(w, pos_embed=np.zeros((1, 5, C))))
    with pytest.raises(ValueError, match="non-finite"):
        m.load_state_dict(dict(w, cls_token=np.full((1, 1, C), np.inf)))
    assert np.array_equal(m.params_flat(), before)
    # BEiT names do not fit MaPeT: strict fails, non-strict copies the shared trunk only.
    beit_w = ref.random_weights(rng, embed_dim=C, depth=DEPTH, num_heads=HEADS, num_tokens=V, kind="mim")
    with pytest.raises(KeyError, match="mask_positional_token"):
        m.load_state_dict(beit_w)
    m.load_state_dict(beit_w, strict=False)
    assert np.array_equal(m.state_dict()["blocks.1.mlp.fc1.weight"], beit_w["blocks.1.mlp.fc1.weight"])
    assert np.array_equal(m.state_dict()["decoder.weight"], w["decoder.weight"])


# ------------------------------------------------------------------ bad input

def test_bad_inputs_raise_named_errors():
    rng = np.random.default_rng(14)
    m, _ = make("mapet", rng)
    b, _ = make("beit", rng)
    x, tokens = images_and_tokens(rng, 2)
    batch = mapet.PermutationSampler(n, 5, seed=0).sample(2)
    with pytest.raises(ValueError, match="images: expected 3 channels"):
        m(x[:, :2], batch)
    with pytest.raises(ValueError, match="images: expected 16×16"):
        m(np.zeros((2, 3, 8, 8), np.float32), batch)
    with pytest.raises(TypeError, match="images: expected a floating-point"):
        m(x.astype(np.int32), batch)
    with pytest.raises(ValueError, match="images: expected a 4-d"):
        m(x[0], batch)
    with pytest.raises(TypeError, match="batch: expected a mapet.PermutationBatch"):
        m(x, batch.orders)
    with pytest.raises(ValueError, match="batch: holds 3 permutations for 2 images"):
        m(x, mapet.PermutationSampler(n, 5, seed=0).sample(3))
    with pytest.raises(ValueError, match="batch: permutations over 10 tokens"):
        m(x, mapet.PermutationSampler(9, 5, seed=0).sample(2))
    with pytest.raises(TypeError, match="tokens: expected an integer array"):
        m.train_step(x, tokens.astype(np.float32), batch)
    with pytest.raises(ValueError, match=r"tokens: expected shape \[2, 16\]"):  # the engine's check
        m.train_step(x, tokens[:, :5], batch)
    with pytest.raises(ValueError, match=r"tokens: expected visual tokens in \[0, 11\), got 11"):
        m.train_step(x, np.where(np.arange(n) == 3, V, tokens), batch)
    with pytest.raises(ValueError, match="got -1"):
        m.train_step(x, np.where(np.arange(n) == 0, -1, tokens), batch)
    with pytest.raises(TypeError, match="mask: expected a bool"):
        b(x, np.zeros((2, n), np.float32))
    with pytest.raises(ValueError, match=r"mask: expected shape \[2, 16\] \(one flag per patch of the 2 images\), got \[2, 15\]"):
        b(x, np.zeros((2, 15), bool))
    with pytest.raises(ValueError, match="same number of patches"):
        b(x, np.r_[random_masks(rng, 1, 3), random_masks(rng, 1, 4)])
    with pytest.raises(ValueError, match="tokens: expected visual tokens"):
        b.train_step(x, tokens + V, random_masks(rng, 2, 3))
    assert not m.grads_flat().any() and not b.grads_flat().any()


def test_engine_validates_even_without_the_facade():
    """The PyModule layer checks on its own: a bad call straight into _core raises, never traps."""
    from mapet._native import _core
    rng = np.random.default_rng(15)
    m, _ = make("mapet", rng)
    b, _ = make("beit", rng)
    x = rng.standard_normal((2, 3, IMG, IMG)).astype(np.float32)
    tokens = rng.integers(0, V, (2, n)).astype(np.int32)
    batch = mapet.PermutationSampler(n, 5, seed=0).sample(2)
    with pytest.raises(ValueError, match=r"tokens: expected visual tokens in \[0, 11\), got 99 at \[1, 3\]"):
        t = tokens.copy()
        t[1, 3] = 99
        _core.twostream_train_step(m._handle, x, t, batch._handle, None)
    with pytest.raises(TypeError, match="tokens: expected a int32 array"):
        _core.twostream_train_step(m._handle, x, tokens.astype(np.int64), batch._handle, None)
    with pytest.raises(ValueError, match="batch: holds 3 permutations for 2 images"):
        _core.twostream_forward(m._handle, x, mapet.PermutationSampler(n, 5).sample(3)._handle,
                                np.empty((2, 12, V), np.float32))
    with pytest.raises(ValueError, match="out: expected"):
        _core.twostream_forward(m._handle, x, batch._handle, np.empty((2, 11, V), np.float32))
    with pytest.raises(TypeError, match="handle holds a different kind"):
        _core.twostream_forward(b._handle, x, batch._handle, np.empty((2, 12, V), np.float32))
    with pytest.raises(TypeError, match="batch: expected a mapet handle"):
        _core.twostream_forward(m._handle, x, None, np.empty((2, 12, V), np.float32))
    with pytest.raises(ValueError, match="mask: expected shape"):
        _core.mim_train_step(b._handle, x, tokens, np.zeros((2, 4), np.int32), None)
    config = dict(kind="beit", img_size=16, patch_size=4, in_chans=3, embed_dim=24, depth=2, num_heads=3,
                  mlp_ratio=4.0, num_tokens=11, output_dim=None, least_number=5, init_values=None,
                  drop_path_rate=0.0, qkv_bias=True, seed=0, early_layers=None, head_layers=None)
    _core.pretrain_create(config)  # the config crosses as one dict
    with pytest.raises(ValueError, match="kind: expected 'mapet', 'pim', 'beit', 'ccvit' or 'dtm'"):
        _core.pretrain_create(dict(config, kind="vit"))
    with pytest.raises(ValueError, match=r"early_layers must be in \[1, depth=2\], got 3"):
        _core.pretrain_create(dict(config, kind="ccvit", early_layers=3, head_layers=2))
    with pytest.raises(TypeError, match="early_layers: expected an int, got NoneType"):
        _core.pretrain_create(dict(config, kind="ccvit"))  # CCViT's own keys have no default in the engine
    with pytest.raises(ValueError, match="config: missing 'seed'"):
        _core.pretrain_create({k: v for k, v in config.items() if k != "seed"})
    with pytest.raises(ValueError, match="config: unknown keys"):
        _core.pretrain_create(dict(config, depht=2))
    with pytest.raises(TypeError, match="config: expected a dict, got list"):
        _core.pretrain_create([1, 2])
    with pytest.raises(TypeError, match="output_dim: expected an int, got float"):
        _core.pretrain_create(dict(config, kind="dtm", output_dim=1.5))
    with pytest.raises(TypeError, match="model: expected a beit model, got a dtm model"):
        d = create_pretrain_model("dtm_tiny_patch16_224", img_size=IMG, patch_size=PATCH, embed_dim=24, depth=1,
                                  num_heads=3, output_dim=8)
        _core.mim_train_step(d._handle, x, tokens, np.zeros((2, n), np.int32), None)


# ------------------------------------------------------------------ learning

def test_mapet_pretraining_learns_predictable_tokens():
    """Images of 4×4 constant patches whose level is (base + row + col) mod V, with a random base
    per image and pixel noise; the visual token of a patch is its quantised mean intensity (=
    its level). The predicted patches are hidden from the query stream, but the context reveals
    the base, so a model that uses the context and the positions can reach ~0 loss; chance is
    log(V). MaPeT pre-training with Adam (written here on params_flat / grads_flat) must bring the
    mean loss of 10 consecutive steps below log(V)/10 within 400 steps (~165 steps, 2 s here)."""
    Vt, B = 8, 32
    rng = np.random.default_rng(0)
    m = create_pretrain_model("mapet_tiny_patch16_224", img_size=IMG, patch_size=PATCH, embed_dim=32, depth=2,
                              num_heads=2, num_tokens=Vt, least_number=6, drop_path_rate=0.0, seed=3)
    sampler = m.sampler(seed=1)
    g = IMG // PATCH
    rows, cols = np.divmod(np.arange(n), g)

    def data():
        base = rng.integers(0, Vt, B)
        levels = (base[:, None] + rows[None] + cols[None]) % Vt                  # [B, n]
        img = (levels.reshape(B, g, 1, g, 1) + 0.5) / Vt
        img = np.broadcast_to(img, (B, g, PATCH, g, PATCH)).reshape(B, 1, IMG, IMG)
        img = np.repeat(img, 3, axis=1) + rng.normal(0, 0.02, (B, 3, IMG, IMG))
        means = img.reshape(B, 3, g, PATCH, g, PATCH).mean(axis=(1, 3, 5)).reshape(B, n)
        tokens = np.clip(np.floor(means * Vt), 0, Vt - 1).astype(np.int64)     # quantised mean intensity
        assert np.array_equal(tokens, levels)
        return img.astype(np.float32), tokens

    p, gr = m.params_flat(), m.grads_flat()
    mom, vel = np.zeros_like(p), np.zeros_like(p)
    lr, b1, b2 = 3e-3, 0.9, 0.999
    losses = []
    for t in range(1, 401):
        img, tokens = data()
        m.zero_grad()
        losses.append(m.train_step(img, tokens, sampler.sample(B)))
        mom[:] = b1 * mom + (1 - b1) * gr
        vel[:] = b2 * vel + (1 - b2) * gr * gr
        p -= lr * (mom / (1 - b1 ** t)) / (np.sqrt(vel / (1 - b2 ** t)) + 1e-8)
        if t >= 50 and np.mean(losses[-10:]) < 0.1 * np.log(Vt):
            break
    assert abs(losses[0] - np.log(Vt)) < 0.5
    assert np.mean(losses[-10:]) < 0.1 * np.log(Vt), losses[-10:]

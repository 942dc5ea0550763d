"""CCViT and DTM pre-training models against the float64 NumPy reference (tests/reference_objectives.py).

Tiny configs (16 px images, 4 px patches → n = 16 patches, N = 17 tokens, C = 16, 2 heads,
depth 3; CCViT with 11 centroids, P = 3·4·4 = 48 pixels per patch and 2 pixel-head blocks;
DTM with a 6-d teacher). Forward outputs must match the reference to 1e-4 relative (float32
engine vs float64 transcription), losses to 1e-5 relative; gradients are checked against central
finite differences of the *float64 reference* loss, as in tests/test_pretrain_models.py (see
``_check_gradients`` for the step and tolerances).
"""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_objectives as ro  # noqa: E402
import reference_twostream as ref  # noqa: E402

import mapet  # noqa: E402
from mapet._native import _core  # noqa: E402
from mapet.io import load_file  # noqa: E402
from mapet.objectives import DTMScheduleEntry  # noqa: E402

IMG, PATCH, C, DEPTH, HEADS, V, D, HEAD_LAYERS = 16, 4, 16, 3, 2, 11, 6, 2
n = (IMG // PATCH) ** 2
N = n + 1
P = 3 * PATCH * PATCH
TINY = dict(img_size=IMG, patch_size=PATCH, embed_dim=C, depth=DEPTH, num_heads=HEADS, drop_path_rate=0.0)


def make_ccvit(rng, early_layers=2, **kw):
    """A tiny CCViT loaded with random reference weights (strict names): (model, weights)."""
    m = mapet.create_model("ccvit_tiny_patch16_224", **dict(TINY, num_tokens=V, early_layers=early_layers,
                                                            head_layers=HEAD_LAYERS, **kw))
    w = ref.random_weights(rng, embed_dim=C, depth=DEPTH, num_heads=HEADS, num_tokens=V, patch_size=PATCH,
                           img_size=IMG, kind="ccvit", head_layers=HEAD_LAYERS)
    m.load_state_dict(w)
    return m, w


def make_dtm(rng, **kw):
    m = mapet.create_model("dtm_tiny_patch16_224", **dict(TINY, output_dim=D, **kw))
    w = ref.random_weights(rng, embed_dim=C, depth=DEPTH, num_heads=HEADS, patch_size=PATCH, img_size=IMG,
                           kind="dtm", output_dim=D)
    m.load_state_dict(w)
    return m, w


def corruption(rng, masked_counts, replaced_counts):
    """Disjoint mask / replaced flags [B, n] with the given per-sample counts."""
    B = len(masked_counts)
    mask, replaced = np.zeros((B, n), bool), np.zeros((B, n), bool)
    for b in range(B):
        idx = rng.permutation(n)
        mask[b, idx[:masked_counts[b]]] = True
        replaced[b, idx[masked_counts[b]:masked_counts[b] + replaced_counts[b]]] = True
    return mask, replaced


def ccvit_data(rng, B=3, masked_counts=(5, 8, 3), replaced_counts=(2, 0, 4)):
    x = rng.random((B, 3, IMG, IMG)).astype(np.float32)
    tokens = rng.integers(0, V, (B, n))
    targets = mapet.ccvit_pixel_targets(rng.random((B, 3, IMG, IMG)).astype(np.float32), patch_size=PATCH)
    mask, replaced = corruption(rng, masked_counts[:B], replaced_counts[:B])
    return x, tokens, targets, mask, replaced


def rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def _perturbed(W, d, h):
    return {k: W[k] + h * d[k] for k in W}


def _check_gradients(rng, g, W, f, names, directions=2):
    """Analytic float32 gradients `g` vs central differences of the float64 reference loss `f`.

    As in test_pretrain_models: differencing the float64 reference with h = 1e-5 leaves a
    truncation error O(h²)·|f'''| ≈ 1e-10 and a rounding error ≈ 1e-16/h = 1e-11, far below the
    float32 gradient's own error (relative ~1e-6 for sums of O(1) terms). Tolerances are therefore
    those of float32: 1e-4 relative on directional derivatives along random directions over all
    parameters at once; |fd − g| ≤ 1e-3·(|fd| + 1e-3) on single coordinates — for every name in
    `names`, its largest-gradient coordinate and one random coordinate.
    """
    h = 1e-5
    for _ in range(directions):
        d = {k: rng.standard_normal(v.shape) for k, v in W.items()}
        fd = (f(_perturbed(W, d, h)) - f(_perturbed(W, d, -h))) / (2 * h)
        an = sum(float((g[k] * d[k]).sum()) for k in W)
        assert abs(fd - an) <= 1e-4 * abs(fd), (fd, an)
    for name in names:
        for idx in (int(np.abs(g[name]).argmax()), int(rng.integers(W[name].size))):
            d = {k: np.zeros_like(v) for k, v in W.items()}
            d[name].reshape(-1)[idx] = 1.0
            fd = (f(_perturbed(W, d, h)) - f(_perturbed(W, d, -h))) / (2 * h)
            an = g[name].reshape(-1)[idx]
            assert abs(fd - an) <= 1e-3 * (abs(fd) + 1e-3), (name, idx, fd, an)


def _block_names(prefix, params=("norm1.weight", "attn.q.weight", "attn.kv.weight", "attn.kv.bias",
                                 "attn.proj.weight", "ls1.gamma", "norm2.bias", "mlp.fc1.weight", "mlp.fc2.weight",
                                 "ls2.gamma")):
    return [f"{prefix}.{p}" for p in params]


# ------------------------------------------------------------------ names, shapes, init

def _trunk_names(depth):
    names = ["cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        names += _block_names(f"blocks.{i}", ("norm1.weight", "norm1.bias", "attn.kv.weight", "attn.kv.bias",
                                              "attn.q.weight", "attn.q.bias", "attn.proj.weight", "attn.proj.bias",
                                              "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight",
                                              "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma"))
    return names + ["norm.weight", "norm.bias", "lm_head.weight", "lm_head.bias"]


def test_ccvit_state_dict_names_shapes_and_init():
    m = mapet.create_model("ccvit_tiny_patch16_224",
                           **dict(TINY, num_tokens=V, early_layers=2, head_layers=HEAD_LAYERS))
    assert isinstance(m, mapet.CCViT) and m.pixel_dim == P
    sd = m.state_dict()
    head = []
    for i in range(HEAD_LAYERS):
        head += [k.replace("blocks.0", f"cls_pt_layers.{i}") for k in _trunk_names(1) if k.startswith("blocks.0.")]
    assert list(sd) == _trunk_names(DEPTH) + head + ["cls_pt_norm.weight", "cls_pt_norm.bias",
                                                     "cls_pt_lm_head.weight", "cls_pt_lm_head.bias"]
    w = ref.random_weights(np.random.default_rng(0), embed_dim=C, depth=DEPTH, num_heads=HEADS, num_tokens=V,
                           patch_size=PATCH, img_size=IMG, kind="ccvit", head_layers=HEAD_LAYERS)
    assert set(w) == set(sd) and all(sd[k].shape == w[k].shape for k in sd)
    assert sd["lm_head.weight"].shape == (V, C) and sd["cls_pt_lm_head.weight"].shape == (P, C)
    assert sd["cls_pt_layers.1.attn.kv.weight"].shape == (2 * C, C)
    assert sd["cls_pt_layers.0.mlp.fc1.weight"].shape == (4 * C, C)
    assert np.all(sd["cls_pt_norm.weight"] == 1) and np.all(sd["cls_pt_norm.bias"] == 0)
    assert np.all(sd["cls_pt_lm_head.bias"] == 0) and 0.01 < sd["cls_pt_lm_head.weight"].std() < 0.03
    assert np.all(sd["cls_pt_layers.1.ls2.gamma"] == np.float32(0.1))
    assert np.all(sd["cls_pt_layers.0.norm1.weight"] == 1) and np.all(sd["cls_pt_layers.0.attn.q.bias"] == 0)
    assert np.abs(sd["mask_token"]).max() > 0 and np.all(m.grads_flat() == 0)
    # early_layers defaults to 3/4 of depth
    assert mapet.create_model("ccvit_tiny_patch16_224", depth=4, img_size=32).config["early_layers"] == 3


def test_dtm_state_dict_names_and_shapes():
    m = mapet.create_model("dtm_tiny_patch16_224", **dict(TINY, output_dim=D))
    assert isinstance(m, mapet.DTM)
    sd = m.state_dict()
    assert list(sd) == _trunk_names(DEPTH)
    assert sd["lm_head.weight"].shape == (D, C) and sd["lm_head.bias"].shape == (D,)
    w = ref.random_weights(np.random.default_rng(0), embed_dim=C, depth=DEPTH, num_heads=HEADS, patch_size=PATCH,
                           img_size=IMG, kind="dtm", output_dim=D)
    assert set(w) == set(sd) and all(sd[k].shape == w[k].shape for k in sd)
    assert np.all(sd["norm.weight"] == 1) and np.all(sd["lm_head.bias"] == 0)


# ------------------------------------------------------------------ CCViT forward and losses

@pytest.mark.parametrize("early_layers", [1, 2, DEPTH])
def test_ccvit_forward_matches_reference(early_layers):
    rng = np.random.default_rng(10 + early_layers)
    m, w = make_ccvit(rng, early_layers)
    x, _, _, mask, replaced = ccvit_data(rng)
    logits, pixels = m(x, mask, replaced)
    M = int((mask | replaced).sum())
    assert logits.shape == (M, V) and pixels.shape == (M, P)
    want_logits, want_pixels = ro.ccvit_forward(w, x, mask, replaced, HEADS, early_layers)
    assert rel_err(logits, want_logits) <= 1e-4
    assert rel_err(pixels, want_pixels) <= 1e-4


def test_ccvit_pixel_head_reads_the_early_layer_and_replaced_rows_see_their_pixels():
    """The early layer matters (the reference with another early layer is far off), and a
    replaced patch is a visible patch: its pixels change its outputs, a masked patch's do not."""
    rng = np.random.default_rng(3)
    m, w = make_ccvit(rng, early_layers=2)
    x, _, _, mask, replaced = ccvit_data(rng, B=1, masked_counts=(4,), replaced_counts=(3,))
    _, pixels = m(x, mask, replaced)
    assert rel_err(pixels, ro.ccvit_forward(w, x, mask, replaced, HEADS, 1)[1]) > 1e-2
    g = IMG // PATCH
    for t, changes in ((np.flatnonzero(mask[0])[0], False), (np.flatnonzero(replaced[0])[0], True)):
        y = x.copy()
        r, c = divmod(int(t), g)
        y[0, :, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] += 0.5
        logits2, pixels2 = m(y, mask, replaced)
        assert (np.abs(pixels2 - pixels).max() > 1e-3) == changes
        want = ro.ccvit_forward(w, y, mask, replaced, HEADS, 2)
        assert rel_err(logits2, want[0]) <= 1e-4 and rel_err(pixels2, want[1]) <= 1e-4


def test_ccvit_corrupted_is_the_union_of_mask_and_replaced():
    rng = np.random.default_rng(4)
    m, w = make_ccvit(rng)
    x, _, _, mask, replaced = ccvit_data(rng, B=2, masked_counts=(4, 6), replaced_counts=(3, 2))
    replaced[0, np.flatnonzero(mask[0])[0]] = True          # one overlap: counted once
    logits, pixels = m(x, mask, replaced)
    assert logits.shape[0] == int((mask | replaced).sum()) == 15
    want = ro.ccvit_forward(w, x, mask, replaced, HEADS, 2)
    assert rel_err(logits, want[0]) <= 1e-4 and rel_err(pixels, want[1]) <= 1e-4


@pytest.mark.parametrize("token_weight,pixel_weight", [(1.0, 1.0), (0.3, 2.0)])
def test_ccvit_train_step_losses_match_reference(token_weight, pixel_weight):
    rng = np.random.default_rng(20)
    m, w = make_ccvit(rng, early_layers=2)
    x, tokens, targets, mask, replaced = ccvit_data(rng)
    loss, logits, pixels = m.train_step(x, tokens.astype(np.int16), targets, mask, replaced,
                                        token_weight=token_weight, pixel_weight=pixel_weight, return_outputs=True)
    want_logits, want_pixels = ro.ccvit_forward(w, x, mask, replaced, HEADS, 2)
    assert rel_err(logits, want_logits) <= 1e-4 and rel_err(pixels, want_pixels) <= 1e-4
    total, ce, mse = ro.ccvit_losses(want_logits, want_pixels, tokens, targets, mask, replaced,
                                     token_weight, pixel_weight)
    got = m.last_losses
    assert set(got) == {"loss", "token_loss", "pixel_loss"} and got["loss"] == loss
    assert abs(got["token_loss"] - ce) <= 1e-5 * max(1.0, ce)
    assert abs(got["pixel_loss"] - mse) <= 1e-5 * max(1.0, mse)
    assert abs(loss - total) <= 1e-5 * max(1.0, total)
    assert abs(loss - (token_weight * got["token_loss"] + pixel_weight * got["pixel_loss"])) <= 1e-12 * loss


def test_ccvit_samples_without_corruption():
    """A sample with nothing corrupted contributes no rows; a batch with nothing corrupted has
    zero losses, empty outputs and zero gradients."""
    rng = np.random.default_rng(21)
    m, w = make_ccvit(rng)
    x, tokens, targets, mask, replaced = ccvit_data(rng, masked_counts=(5, 0, 3), replaced_counts=(2, 0, 4))
    loss, logits, pixels = m.train_step(x, tokens, targets, mask, replaced, return_outputs=True)
    want_logits, want_pixels = ro.ccvit_forward(w, x, mask, replaced, HEADS, 2)
    assert logits.shape == (14, V) and rel_err(logits, want_logits) <= 1e-4 and rel_err(pixels, want_pixels) <= 1e-4
    total = ro.ccvit_losses(want_logits, want_pixels, tokens, targets, mask, replaced)[0]
    assert abs(loss - total) <= 1e-5 * max(1.0, total)
    m.zero_grad()
    none = np.zeros_like(mask)
    assert m.train_step(x, tokens, targets, none, none) == 0.0
    assert m.last_losses == {"loss": 0.0, "token_loss": 0.0, "pixel_loss": 0.0}
    assert not m.grads_flat().any()
    assert [a.shape for a in m(x, none, none)] == [(0, V), (0, P)]


# ------------------------------------------------------------------ CCViT gradients

@pytest.mark.parametrize("early_layers", [2, DEPTH])
def test_ccvit_gradients_of_both_heads_match_finite_differences(early_layers):
    rng = np.random.default_rng(30 + early_layers)
    m, w = make_ccvit(rng, early_layers)
    x, tokens, targets, mask, replaced = ccvit_data(rng, B=2)
    tw, pw = 0.6, 1.5
    m.zero_grad()
    m.train_step(x, tokens, targets, mask, replaced, token_weight=tw, pixel_weight=pw)
    g = {k: v.astype(np.float64) for k, v in m.grads().items()}
    W = {k: v.astype(np.float64) for k, v in w.items()}
    f = lambda weights: ro.ccvit_loss(weights, x, tokens, targets, mask, replaced, HEADS, early_layers,  # noqa: E731
                                      tw, pw)
    names = ["lm_head.weight", "lm_head.bias", "norm.weight", "norm.bias", "cls_pt_lm_head.weight",
             "cls_pt_lm_head.bias", "cls_pt_norm.weight", "cls_pt_norm.bias", "mask_token", "pos_embed",
             "cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    names += _block_names("cls_pt_layers.0") + _block_names("cls_pt_layers.1")[::2]
    names += _block_names(f"blocks.{early_layers - 1}") + _block_names(f"blocks.{DEPTH - 1}")[1::2]
    _check_gradients(rng, g, W, f, list(dict.fromkeys(names)))
    # pos_embed's class row gets gradient through the class token's path into both heads
    assert np.abs(g["pos_embed"][0, 0]).max() > 1e-4


def test_ccvit_head_weights_switch_their_gradients_off():
    """pixel_weight = 0: the pixel head gets exactly zero gradient; token_weight = 0: lm_head and
    the final norm do. The full gradient is the sum of the two single-head gradients."""
    rng = np.random.default_rng(40)
    m, _ = make_ccvit(rng, early_layers=2)
    x, tokens, targets, mask, replaced = ccvit_data(rng)

    def grads(tw, pw):
        m.zero_grad()
        m.train_step(x, tokens, targets, mask, replaced, token_weight=tw, pixel_weight=pw)
        return {k: v.copy() for k, v in m.grads().items()}

    tok, pix, both = grads(1.0, 0.0), grads(0.0, 1.0), grads(1.0, 1.0)
    for k in tok:
        if k.startswith("cls_pt_"):
            assert not tok[k].any() and pix[k].any(), k
        elif k.startswith("lm_head") or k.startswith("norm."):
            assert not pix[k].any() and tok[k].any(), k
        else:                        # the trunk hears from both heads
            assert tok[k].any() and pix[k].any(), k
        scale = np.abs(both[k]).max()
        np.testing.assert_allclose(tok[k] + pix[k], both[k], rtol=0, atol=1e-5 * scale, err_msg=k)
    # blocks after early_layers only feed the pixel head through the class row: still non-zero
    assert np.abs(pix[f"blocks.{DEPTH - 1}.attn.q.weight"]).max() > 0


# ------------------------------------------------------------------ DTM

def dtm_data(rng, B=2, scale=2.0):
    x = rng.random((B, 3, IMG, IMG)).astype(np.float32)
    target = (scale * rng.standard_normal((B, n, D))).astype(np.float32)   # both smooth-L1 branches
    mask, _ = corruption(rng, [6, 9, 4][:B], [0] * B)
    return x, target, mask


def test_dtm_forward_matches_reference():
    rng = np.random.default_rng(50)
    m, w = make_dtm(rng)
    x, _, mask = dtm_data(rng, B=3)
    got = m(x, mask)
    assert got.shape == (3, n, D)
    assert rel_err(got, ro.dtm_forward(w, x, mask, HEADS)) <= 1e-4
    plain = m(x)                                               # nothing masked
    assert rel_err(plain, ro.dtm_forward(w, x, None, HEADS)) <= 1e-4
    assert np.abs(plain - got).max() > 1e-2


def test_dtm_reference_loss_with_singleton_groups_is_plain_smooth_l1():
    rng = np.random.default_rng(51)
    pred, target = 3 * rng.standard_normal((2, n, D)), rng.standard_normal((2, n, D))
    u = pred - target
    assert (np.abs(u) < 2).any() and (np.abs(u) >= 2).any()
    plain = np.where(np.abs(u) < 2, 0.25 * u * u, np.abs(u) - 1).mean()
    mem = np.broadcast_to(np.arange(n), (2, 2, n))
    assert ro.dtm_loss(pred, target, mem, 2.0) == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize("source", ["schedules", "identity"])
def test_dtm_train_step_loss_matches_reference(source):
    rng = np.random.default_rng(52)
    m, w = make_dtm(rng)
    x, target, mask = dtm_data(rng)
    if source == "identity":
        mem = np.broadcast_to(np.arange(n), (2, 2, n))
    else:
        mem = mapet.dtm_memberships(target, [DTMScheduleEntry(8, 2, 4), DTMScheduleEntry(5, 5, 1)])
        assert mem.shape == (2, 2, n) and len(np.unique(mem[0, 0])) == n - 8
    loss, pred = m.train_step(x, target, mask, mem, return_pred=True)
    want_pred = ro.dtm_forward(w, x, mask, HEADS)
    assert rel_err(pred, want_pred) <= 1e-4
    want = ro.dtm_loss(want_pred, target, mem, 2.0)
    assert abs(loss - want) <= 1e-5 * max(1.0, want)
    u = np.abs(want_pred - target)
    assert (u < 2).any() and (u >= 2).any()      # both smooth-L1 branches are exercised
    m.zero_grad()
    loss_b = m.train_step(x, target, mask, mem, beta=0.5)
    assert abs(loss_b - ro.dtm_loss(want_pred, target, mem, 0.5)) <= 1e-5 * max(1.0, loss_b)


def test_dtm_gradients_match_finite_differences():
    rng = np.random.default_rng(53)
    m, w = make_dtm(rng)
    x, target, mask = dtm_data(rng)
    mem = mapet.dtm_memberships(target, [DTMScheduleEntry(6, 2, 3), DTMScheduleEntry(12, 3, 4)])
    assert all(len(np.unique(mem[l, b])) < n for l in range(2) for b in range(2))
    m.zero_grad()
    m.train_step(x, target, mask, mem)
    g = {k: v.astype(np.float64) for k, v in m.grads().items()}
    W = {k: v.astype(np.float64) for k, v in w.items()}
    f = lambda weights: ro.dtm_loss(ro.dtm_forward(weights, x, mask, HEADS), target, mem, 2.0)  # noqa: E731
    names = ["lm_head.weight", "lm_head.bias", "norm.weight", "norm.bias", "mask_token", "pos_embed", "cls_token",
             "patch_embed.proj.weight", "patch_embed.proj.bias"]
    names += _block_names("blocks.0")[::2] + _block_names("blocks.1")[1::2] + _block_names(f"blocks.{DEPTH - 1}")
    _check_gradients(rng, g, W, f, names)


def test_dtm_target_class_row_and_schedules_path():
    rng = np.random.default_rng(54)
    m, _ = make_dtm(rng)
    x, target, mask = dtm_data(rng)
    mem = mapet.dtm_memberships(target, mapet.DTMSchedule(3).draw(n))
    with_cls = np.concatenate([rng.standard_normal((2, 1, D)).astype(np.float32) * 50, target], 1)
    m.zero_grad()
    plain = m.train_step(x, target, mask, mem)
    g_plain = m.grads_flat().copy()
    m.zero_grad()
    assert m.train_step(x, with_cls, mask, mem) == plain
    assert np.array_equal(m.grads_flat(), g_plain)
    # schedules= computes the memberships from the (class-row-free) target
    schedules = mapet.DTMSchedule(7).draw(n)
    mem2 = mapet.dtm_memberships(target, schedules)
    m.zero_grad()
    via_mem = m.train_step(x, target, mask, mem2)
    g_mem = m.grads_flat().copy()
    m.zero_grad()
    assert m.train_step(x, with_cls, mask, schedules=schedules) == via_mem
    assert np.array_equal(m.grads_flat(), g_mem)
    # a 2-d membership is one schedule
    m.zero_grad()
    one = m.train_step(x, target, mask, mem[0])
    assert one == pytest.approx(ro.dtm_loss(m(x, mask), target, mem[:1], 2.0), rel=1e-5)


# ------------------------------------------------------------------ bad inputs

def test_ccvit_bad_inputs_raise_named_errors():
    rng = np.random.default_rng(60)
    m, _ = make_ccvit(rng)
    x, tokens, targets, mask, replaced = ccvit_data(rng)
    before = m.params_flat().copy()
    with pytest.raises(ValueError, match=r"pixel_targets: expected shape \[3, 16, 48\]"):
        m.train_step(x, tokens, targets[:, :, :40], mask, replaced)
    with pytest.raises(ValueError, match=r"pixel_targets: expected shape \[3, 16, 48\]"):
        m.train_step(x, tokens, targets[:2], mask, replaced)
    with pytest.raises(TypeError, match="pixel_targets: expected a float array"):
        m.train_step(x, tokens, targets.astype(np.int32), mask, replaced)
    grads_before = m.flat_grads.copy()
    for kw, exc in ((dict(token_weight=-1.0), ValueError), (dict(pixel_weight=-0.5), ValueError),
                    (dict(pixel_weight=np.nan), ValueError), (dict(token_weight="1"), TypeError)):
        name = next(iter(kw))  # the engine checks the weights (finite, ≥ 0) before any work
        with pytest.raises(exc, match=f"^{name}: expected a (finite non-negative weight|finite number|float)"):
            m.train_step(x, tokens, targets, mask, replaced, **kw)
    np.testing.assert_array_equal(m.flat_grads, grads_before)
    with pytest.raises(TypeError, match="mask: expected a bool"):
        m.train_step(x, tokens, targets, mask.astype(np.float32), replaced)
    with pytest.raises(TypeError, match="replaced: expected a bool"):
        m(x, mask, replaced.astype(np.float64))
    with pytest.raises(ValueError, match=r"replaced: expected shape \[3, 16\] \(one flag per patch of the 3 images\), got \[3, 15\]"):
        m(x, mask, replaced[:, :15])
    with pytest.raises(ValueError, match=r"tokens: expected visual tokens in \[0, 11\)"):
        m.train_step(x, tokens + V, targets, mask, replaced)
    with pytest.raises(ValueError, match="images: expected 3 channels"):
        m(x[:, :2], mask, replaced)
    # straight into the engine
    t32 = tokens.astype(np.int32)
    m32, r32 = mask.astype(np.int32), replaced.astype(np.int32)
    with pytest.raises(ValueError, match="^pixel_weight: expected a finite non-negative weight, got -1.0"):
        _core.ccvit_train_step(m._handle, x, t32, targets, m32, r32, 1.0, -1.0, None, None)
    with pytest.raises(ValueError, match="logits_out: expected"):
        _core.ccvit_forward(m._handle, x, m32, r32, np.empty((3, V), np.float32), np.empty((3, P), np.float32))
    with pytest.raises(ValueError, match="mask: expected shape"):
        _core.ccvit_train_step(m._handle, x, t32, targets, np.zeros((3, 4), np.int32), r32, 1.0, 1.0, None, None)
    beit = mapet.create_model("beit_tiny_patch16_224", **dict(TINY, num_tokens=V))
    dtm, _ = make_dtm(rng)
    for other in (beit, dtm):
        with pytest.raises(TypeError, match="model: handle holds a different kind"):
            _core.ccvit_train_step(other._handle, x, t32, targets, m32, r32, 1.0, 1.0, None, None)
        with pytest.raises(TypeError, match="model: handle holds a different kind"):
            _core.ccvit_forward(other._handle, x, m32, r32, np.empty((1, V), np.float32), np.empty((1, P), np.float32))
    with pytest.raises(TypeError, match="model: expected a mapet handle"):
        _core.ccvit_train_step(None, x, t32, targets, m32, r32, 1.0, 1.0, None, None)
    assert not m.grads_flat().any() and np.array_equal(m.params_flat(), before)
    assert not dtm.grads_flat().any() and not beit.grads_flat().any()
    # the model still works after all that
    assert np.isfinite(m.train_step(x, tokens, targets, mask, replaced))


def test_dtm_bad_inputs_raise_named_errors():
    rng = np.random.default_rng(61)
    m, _ = make_dtm(rng)
    x, target, mask = dtm_data(rng)
    mem = mapet.dtm_memberships(target, mapet.DTMSchedule(1).draw(n))
    with pytest.raises(ValueError, match=r"target: expected teacher features of shape \[2, 16, 6\]"):
        m.train_step(x, target[:, :, :5], mask, mem)
    with pytest.raises(ValueError, match=r"target: expected teacher features of shape \[2, 16, 6\] \(batch, patches, output_dim\), got \[2, 12, 6\]"):
        m.train_step(x, target[:, :12], mask, schedules=mapet.DTMSchedule(1).draw(n))
    with pytest.raises(TypeError, match="target: expected float"):
        m.train_step(x, target.astype(np.int32), mask, mem)
    with pytest.raises(ValueError, match=r"memberships: expected shape \[L ≥ 1, 2, 16\]"):
        m.train_step(x, target, mask, mem[:, :, :10])
    with pytest.raises(ValueError, match=r"memberships: expected shape \[L ≥ 1, 2, 16\]"):
        m.train_step(x, target, mask, mem[:, :1])
    bad = mem.copy()
    bad[1, 0, 5] = n
    with pytest.raises(ValueError, match=r"memberships: expected group ids in \[0, 16\), got 16"):
        m.train_step(x, target, mask, bad)
    bad[1, 0, 5] = -1
    with pytest.raises(ValueError, match=r"memberships: expected group ids in \[0, 16\), got -1"):
        m.train_step(x, target, mask, bad)
    with pytest.raises(TypeError, match="memberships: expected integer group ids"):
        m.train_step(x, target, mask, mem.astype(np.float32))
    with pytest.raises(ValueError, match="give memberships or schedules"):
        m.train_step(x, target, mask)
    with pytest.raises(ValueError, match="beta: expected a positive number"):
        m.train_step(x, target, mask, mem, beta=0.0)
    with pytest.raises(TypeError, match="mask: expected a bool"):
        m.train_step(x, target, mask.astype(np.float32), mem)
    with pytest.raises(ValueError, match=r"mask: expected shape \[2, 16\] \(one flag per patch of the 2 images\), got \[2, 8\]"):
        m(x, mask[:, :8])
    ccvit, _ = make_ccvit(rng)
    beit = mapet.create_model("beit_tiny_patch16_224", **dict(TINY, num_tokens=V))
    m32 = mask.astype(np.int32)
    with pytest.raises(TypeError, match="model: expected a dtm model, got a ccvit model"):
        _core.dtm_train_step(ccvit._handle, x, m32, target, mem, 2.0, None)
    with pytest.raises(TypeError, match="model: expected a dtm model, got a beit model"):
        _core.dtm_forward(beit._handle, x, m32, np.empty((2, n, D), np.float32))
    mapet_model = mapet.create_model("mapet_tiny_patch16_224", **dict(TINY, num_tokens=V, least_number=5))
    with pytest.raises(TypeError, match="model: handle holds a different kind"):
        _core.dtm_train_step(mapet_model._handle, x, m32, target, mem, 2.0, None)
    with pytest.raises(ValueError, match="pred_out: expected"):
        _core.dtm_train_step(m._handle, x, m32, target, mem, 2.0, np.empty((2, n, D + 1), np.float32))
    assert not m.grads_flat().any() and not ccvit.grads_flat().any()
    assert np.isfinite(m.train_step(x, target, mask, mem))


def test_non_finite_losses_leave_gradients_unchanged():
    rng = np.random.default_rng(62)
    c, _ = make_ccvit(rng)
    x, tokens, targets, mask, replaced = ccvit_data(rng)
    bad = targets.copy()
    bad[0, np.flatnonzero(mask[0])[0], 0] = np.inf          # at a corrupted patch: enters the loss
    with pytest.raises(ValueError, match="not finite"):
        c.train_step(x, tokens, bad, mask, replaced)
    assert not c.grads_flat().any()
    d, _ = make_dtm(rng)
    x, target, mask = dtm_data(rng)
    target[1, 3, 2] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        d.train_step(x, target, mask, np.broadcast_to(np.arange(n), (1, 2, n)))
    assert not d.grads_flat().any()


# ------------------------------------------------------------------ files

@pytest.mark.parametrize("kind", ["ccvit", "dtm"])
def test_save_load_round_trip(kind, tmp_path):
    rng = np.random.default_rng(70)
    m, _ = make_ccvit(rng, early_layers=1) if kind == "ccvit" else make_dtm(rng)
    path = str(tmp_path / f"{kind}.safetensors")
    m.save(path)
    tensors, meta = load_file(path)
    assert meta["format"] == "mapet" and meta["model"] == kind and json.loads(meta["config"]) == m.config
    back = mapet.load(path)
    assert type(back) is type(m) and back.config == m.config
    a, b = m.state_dict(), back.state_dict()
    # model order in memory; the safetensors package orders the file's tensors itself
    assert list(a) == list(b) and sorted(tensors) == sorted(a)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    if kind == "ccvit":
        x, tokens, targets, mask, replaced = ccvit_data(rng)
        for u, v in zip(m(x, mask, replaced), back(x, mask, replaced)):
            assert np.array_equal(u, v)
        assert back.train_step(x, tokens, targets, mask, replaced) == m.train_step(x, tokens, targets, mask, replaced)
    else:
        x, target, mask = dtm_data(rng)
        assert np.array_equal(back(x, mask), m(x, mask))
        mem = mapet.dtm_memberships(target, mapet.DTMSchedule(2).draw(n))
        assert back.train_step(x, target, mask, mem) == m.train_step(x, target, mask, mem)

"""The model step path's one validation layer: PyModule sizes and allocates the outputs from the
checked inputs (mask counts included) and raises every shape error itself, naming the argument,
what was expected and what arrived. Hostile inputs never crash the interpreter."""
import numpy as np
import pytest

import mapet
from mapet._native import _core
from mapet.clip.vit import CLIPVisionTransformer
from mapet.pretrain_models import create_pretrain_model

IMG, PATCH, V, D = 16, 4, 11, 6
n = (IMG // PATCH) ** 2
TINY = dict(img_size=IMG, patch_size=PATCH, embed_dim=24, depth=2, num_heads=3, drop_path_rate=0.0)


def pretrain(kind, **kw):
    extra = dict(output_dim=D) if kind == "dtm" else dict(num_tokens=V)
    if kind in ("mapet", "pim"):
        extra["least_number"] = 5
    return create_pretrain_model(f"{kind}_tiny_patch16_224", seed=3, **TINY, **extra, **kw)


def flags(counts, seed=0):
    """bool [len(counts), n] with counts[b] flagged patches in row b (random positions)."""
    rng = np.random.default_rng(seed)
    m = np.zeros((len(counts), n), bool)
    for b, c in enumerate(counts):
        m[b, rng.permutation(n)[:c]] = True
    return m


def images(rng, B=2):
    return rng.random((B, 3, IMG, IMG)).astype(np.float32)


BAD_IMAGES = [
    (np.float32(0.5), r"got a 0-d array of shape \[\]"),
    (np.zeros(7, np.float32), r"got a 1-d array of shape \[7\]"),
    (np.zeros((2, 3, IMG, IMG, 1), np.float32), rf"got a 5-d array of shape \[2, 3, {IMG}, {IMG}, 1\]"),
]


@pytest.mark.parametrize("bad, got", BAD_IMAGES)
def test_wrong_ndim_images_are_refused_by_the_engine(bad, got):
    """0-d, 1-d and 5-d images reach PyModule, which words the error (Python no longer checks ndim)."""
    rng = np.random.default_rng(1)
    want = rf"^images: expected a 4-d array \[B, 3, {IMG}, {IMG}\]"
    tokens = rng.integers(0, V, (2, n))
    m = pretrain("mapet")
    batch = m.sampler(seed=0).sample(2)
    beit, ccvit, dtm = pretrain("beit"), pretrain("ccvit", early_layers=1), pretrain("dtm")
    vit = mapet.create_model("vit_tiny_patch16_224", num_classes=3, **TINY)
    mask = flags([3, 3])
    calls = [lambda x: m(x, batch), lambda x: m.train_step(x, tokens, batch),
             lambda x: beit(x, mask), lambda x: beit.train_step(x, tokens, mask, return_logits=True),
             lambda x: ccvit(x, mask, ~mask), lambda x: dtm(x), lambda x: dtm(x, mask),
             lambda x: dtm.train_step(x, np.zeros((2, n, D), np.float32), mask,
                                      schedules=mapet.DTMSchedule(1).draw(n)),
             vit, vit.predict, vit.forward_features, lambda x: vit.train_step(x, [0, 1])]
    for call in calls:
        with pytest.raises(ValueError, match=want + ".*" + got):
            call(bad)
    tower = CLIPVisionTransformer(img_size=IMG, patch_size=PATCH, width=24, layers=1, heads=3, output_dim=8)
    for call in (tower.encode_image, tower.forward_features, lambda x: tower.encode_image(x, batch_size=None)):
        with pytest.raises(ValueError, match=want + r" \(CLIP-preprocessed.*" + got):
            call(bad)
    for model in (m, beit, ccvit, dtm, vit):
        assert not model.grads_flat().any()


@pytest.mark.parametrize("kind", ["beit", "dtm", "ccvit"])
def test_wrong_mask_shapes_and_dtypes(kind):
    """Shape errors of the flags come from the engine against the images' batch; a float array is
    refused by the conversion (``!= 0`` would silently make flags of it)."""
    rng = np.random.default_rng(2)
    m = pretrain(kind, **(dict(early_layers=1) if kind == "ccvit" else {}))
    x = images(rng)
    good = flags([4, 4])
    call = {"beit": lambda mk: m(x, mk), "dtm": lambda mk: m(x, mk), "ccvit": lambda mk: m(x, mk, good)}[kind]
    for bad, got in ((good[:, :15], r"\[2, 15\]"), (flags([4, 4, 4]), r"\[3, 16\]"), (good[0], r"\[16\]"),
                     (good[None], rf"\[1, 2, {n}\]"), (good.reshape(2, 2, 2, 4)[..., None], r"\[2, 2, 2, 4, 1\]")):
        with pytest.raises(ValueError, match=rf"^mask: expected .*\[2, {n}\].*{got}"):
            call(bad)
    with pytest.raises(TypeError, match=r"^mask: expected a bool \(or 0/1 integer\) array"):
        call(good.astype(np.float32))
    # a [B, grid, grid] mask is read as [B, n]; integer flags count as set when non-zero
    grid = good.reshape(2, 4, 4)
    np.testing.assert_array_equal(call(grid) if kind != "ccvit" else call(grid)[0],
                                  call(good) if kind != "ccvit" else call(good)[0])
    np.testing.assert_array_equal(call(good.astype(np.int64) * 7) if kind != "ccvit" else call(good * 7)[1],
                                  call(good) if kind != "ccvit" else call(good)[1])
    # straight into the engine: an int64 mask is a TypeError naming the dtype it wants
    fwd = {"beit": _core.mim_forward, "dtm": _core.dtm_forward}.get(kind)
    if fwd is not None:
        with pytest.raises(TypeError, match=r"^mask: expected a int32 array.*got dtype int64"):
            fwd(m._handle, x, good.astype(np.int64), None)
    assert not m.grads_flat().any()


def test_beit_unequal_counts_are_refused_by_the_engine_and_allowed_in_training():
    rng = np.random.default_rng(3)
    m = pretrain("beit")
    x, tokens = images(rng), rng.integers(0, V, (2, n))
    uneven = flags([3, 5])
    with pytest.raises(ValueError, match=r"^mask: every sample must mask the same number of patches "
                                         r"for logits \[B, M, num_tokens\], got counts \[3, 5\]"):
        m(x, uneven)
    with pytest.raises(ValueError, match=r"^mask: every sample must mask the same number"):
        _core.mim_forward(m._handle, x, uneven.astype(np.int32), None)
    assert not m.grads_flat().any()
    # the train step takes uneven counts: logits [3 + 5, V], sized by the engine
    loss, logits = m.train_step(x, tokens, uneven, return_logits=True)
    assert isinstance(loss, float) and isinstance(logits, np.ndarray)
    assert logits.shape == (8, V) and logits.dtype == np.float32
    # with drop path 0 the training-mode logits are the inference logits of each sample's masked rows
    want = np.concatenate([m(x[b:b + 1], uneven[b:b + 1])[0] for b in range(2)])
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    # an equal-count mask: forward [B, M, V] from the engine, float64 softmax-CE against it
    even = flags([4, 4], seed=1)
    out = m(x, even)
    assert out.shape == (2, 4, V)
    m.zero_grad()
    loss = m.train_step(x, tokens, even)
    z = out.reshape(-1, V).astype(np.float64)
    t = tokens[even]
    ce = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1) - z[np.arange(len(t)), t]
    assert abs(loss - ce.mean()) < 1e-4 * max(1.0, abs(ce.mean()))


def test_engine_allocates_or_fills_the_outputs():
    """None: the engine allocates and returns the output; an array: filled and returned as itself;
    True on a train step: allocated and returned after the loss; a wrong output shape is named."""
    rng = np.random.default_rng(4)
    m = pretrain("mapet")
    x, tokens = images(rng), rng.integers(0, V, (2, n)).astype(np.int32)
    batch = m.sampler(seed=1).sample(2)
    P = batch.num_predicted
    got = np.asarray(_core.twostream_forward(m._handle, x, batch._handle, None))
    assert got.shape == (2, P, V)
    out = np.empty((2, P, V), np.float32)
    assert _core.twostream_forward(m._handle, x, batch._handle, out) is out
    np.testing.assert_array_equal(out, got)
    with pytest.raises(ValueError, match=rf"^out: expected a float32 array of shape \[2, {P}, {V}\]"):
        _core.twostream_forward(m._handle, x, batch._handle, np.empty((2, P + 1, V), np.float32))
    loss = _core.twostream_train_step(m._handle, x, tokens, batch._handle, None)
    assert isinstance(loss, float)
    for flag in (False,):
        assert isinstance(_core.twostream_train_step(m._handle, x, tokens, batch._handle, flag), float)
    loss2, logits = _core.twostream_train_step(m._handle, x, tokens, batch._handle, True)
    assert np.asarray(logits).shape == (2, P, V)
    mine = np.empty((2, P, V), np.float32)
    loss3, same = _core.twostream_train_step(m._handle, x, tokens, batch._handle, mine)
    assert same is mine and loss3 == loss2 == loss
    np.testing.assert_array_equal(mine, np.asarray(logits))
    with pytest.raises(ValueError, match=r"^logits_out: expected a float32 array of shape"):
        _core.twostream_train_step(m._handle, x, tokens, batch._handle, np.empty((2, P, V + 1), np.float32))
    with pytest.raises(TypeError, match=r"^logits_out: expected a float32 array"):
        _core.twostream_train_step(m._handle, x, tokens, batch._handle, "yes")
    # CCViT: the M corrupted rows counted by the engine (mask | replaced)
    c = pretrain("ccvit", early_layers=1)
    mask, replaced = flags([3, 1]), np.zeros((2, n), bool)
    replaced[:, 0] = ~mask[:, 0]
    M = int((mask | replaced).sum())
    logits, pixels = c(x, mask, replaced)
    assert logits.shape == (M, V) and pixels.shape == (M, 3 * PATCH * PATCH)
    targets = mapet.ccvit_pixel_targets(images(rng), patch_size=PATCH)
    loss, lg, px = c.train_step(x, tokens, targets, mask, replaced, return_outputs=True)
    assert lg.shape == (M, V) and px.shape == (M, 3 * PATCH * PATCH)
    assert set(c.last_losses) == {"loss", "token_loss", "pixel_loss"} and c.last_losses["loss"] == loss


def test_dtm_targets_are_checked_once_by_the_engine():
    rng = np.random.default_rng(5)
    m = pretrain("dtm")
    x, mask = images(rng), flags([4, 6])
    target = rng.standard_normal((2, n, D)).astype(np.float32)
    sched = mapet.DTMSchedule(2).draw(n)
    mem = mapet.dtm_memberships(target, sched)
    for bad, got in ((target[0], rf"\[{n}, {D}\]"), (target[:1], rf"\[1, {n}, {D}\]"),
                     (target[:, :12], rf"\[2, 12, {D}\]"), (target[..., :5], rf"\[2, {n}, 5\]"),
                     (target[None], rf"\[1, 2, {n}, {D}\]")):
        for kw in (dict(schedules=sched), dict(memberships=mem)):
            with pytest.raises(ValueError, match=rf"^target: expected .*\[2, {n}, {D}\].*{got}"):
                m.train_step(x, bad, mask, **kw)
    with pytest.raises(TypeError, match=r"^target: expected float teacher features"):
        m.train_step(x, target.astype(np.int64), mask, schedules=sched)
    with pytest.raises(ValueError, match=r"^memberships: expected as many r as iterations"):
        _core.dtm_train_step(m._handle, x, mask.astype(np.int32), target, ([1, 2], [1]), 2.0, None)
    with pytest.raises(ValueError, match=r"^memberships: schedule 0 needs r ≥ 0"):
        _core.dtm_train_step(m._handle, x, mask.astype(np.int32), target, ([-1], [1]), 2.0, None)
    with pytest.raises(ValueError, match=r"^memberships: expected group ids \[L, B, n\] or the schedules"):
        _core.dtm_train_step(m._handle, x, mask.astype(np.int32), target, ([1], [1], [1]), 2.0, None)
    assert not m.grads_flat().any()
    # schedules morphed by the engine = memberships from dtm_memberships (same kernel, same inputs)
    loss_s, pred_s = m.train_step(x, target, mask, schedules=sched, return_pred=True)
    grads_s = m.grads_flat().copy()
    m.zero_grad()
    loss_m, pred_m = m.train_step(x, target, mask, mem, return_pred=True)
    assert loss_s == loss_m
    np.testing.assert_array_equal(pred_s, pred_m)
    np.testing.assert_array_equal(m.grads_flat(), grads_s)
    assert pred_m.shape == (2, n, D)
    # a class token first is dropped (a conversion), and None masks nothing
    with_cls = np.concatenate([np.zeros((2, 1, D), np.float32), target], axis=1)
    m.zero_grad()
    assert m.train_step(x, with_cls, mask, mem) == loss_m
    np.testing.assert_array_equal(m(x), m(x, np.zeros((2, n), bool)))


def test_zero_d_targets_reach_the_engine_as_they_are():
    rng = np.random.default_rng(6)
    x, mask = images(rng), flags([4, 6])
    with pytest.raises(ValueError, match=rf"^target: expected teacher features of shape \[2, {n}, {D}\] .*, got \[\]$"):
        pretrain("dtm").train_step(x, np.float32(1), mask, schedules=mapet.DTMSchedule(2).draw(n))
    c = pretrain("ccvit", early_layers=1)
    with pytest.raises(ValueError, match=r"^pixel_targets: expected shape \[2, 16, 48\] .*, got \[\]"):
        c.train_step(x, rng.integers(0, V, (2, n)), np.float32(1), mask, ~mask)

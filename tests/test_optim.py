"""AdamW against a float64 NumPy transcription of torch.optim.AdamW (+ clip_grad_norm_ and
BEiT layer-wise lr decay), written here; state round trips; bad gradients."""
import numpy as np
import pytest

import mapet


def tiny(**kw):
    return mapet.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=24, depth=2,
                              num_heads=3, num_classes=5, init_values=0.1, **kw)


def numpy_adamw(params, grads_seq, lrs, scales, decay, b1, b2, eps, wd, clip):
    """torch.optim.AdamW (decoupled decay, bias corrections) with per-name lr scales, after
    torch.nn.utils.clip_grad_norm_ (coef = clip / (norm + 1e-6), applied when < 1)."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t, (g, lr) in enumerate(zip(grads_seq, lrs), start=1):
        g = {k: x.astype(np.float64) for k, x in g.items()}
        norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
        if clip is not None and clip / (norm + 1e-6) < 1:
            g = {k: x * (clip / (norm + 1e-6)) for k, x in g.items()}
        for k in p:
            lr_k = lr * scales[k]
            if decay[k]:
                p[k] *= 1 - lr_k * wd
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v2[k] = b2 * v2[k] + (1 - b2) * g[k] ** 2
            denom = np.sqrt(v2[k]) / np.sqrt(1 - b2 ** t) + eps
            p[k] -= lr_k / (1 - b1 ** t) * m[k] / denom
    return p, m, v2


@pytest.mark.parametrize("clip", [None, 0.5])
def test_adamw_matches_numpy_transcription(clip):
    rng = np.random.default_rng(0)
    model = tiny()
    opt = mapet.AdamW(model, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, layer_decay=0.7, clip_grad=clip)
    start = {k: v.copy() for k, v in model.state_dict().items()}
    grads_seq, lrs = [], [1e-2, 3e-3, 5e-3]
    for i, lr in enumerate(lrs):
        g = {k: (rng.standard_normal(v.shape) * 0.1).astype(np.float32) for k, v in start.items()}
        grads_seq.append(g)
        model.zero_grad()
        for k, v in model.grads().items():
            v[...] = g[k]
        norm = opt.step(lr=None if i == 0 else lr)
        ref_norm = np.sqrt(sum((x.astype(np.float64) ** 2).sum() for x in g.values()))
        assert abs(norm - ref_norm) < 1e-6 * ref_norm
        if clip is not None:  # clipping scales the gradients in place, as clip_grad_norm_
            coef = min(1.0, clip / (ref_norm + 1e-6))
            np.testing.assert_allclose(model.grads()["head.weight"], g["head.weight"] * coef, rtol=1e-6)
    # BEiT scales: head 1, block i 0.7**(depth-i), embeddings 0.7**(depth+1)
    assert opt.lr_scales["head.weight"] == 1.0
    assert abs(opt.lr_scales["blocks.0.attn.q.weight"] - 0.7 ** 2) < 1e-12
    assert abs(opt.lr_scales["pos_embed"] - 0.7 ** 3) < 1e-12
    decay = opt.decay
    assert decay["blocks.1.mlp.fc1.weight"] and decay["head.weight"] and decay["patch_embed.proj.weight"]
    assert not any(decay[k] for k in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.q.bias",
                                      "blocks.1.ls2.gamma", "head.bias", "norm.weight"))
    p, m, v = numpy_adamw(start, grads_seq, lrs, opt.lr_scales, decay, 0.8, 0.95, 1e-6, 0.1, clip)
    state = opt.state_dict()
    assert state["step"] == 3
    # Float32 vs float64: atol ≈ a few float32 ulps at the scale of each quantity (params ~1e-2,
    # gradients ~1e-1 → m ~1e-2, g² ~1e-2 → v ~1e-3), where cancellation leaves small entries.
    for k, got in model.state_dict().items():
        np.testing.assert_allclose(got, p[k], rtol=1e-5, atol=1e-7, err_msg=k)
        np.testing.assert_allclose(state["exp_avg"][k], m[k], rtol=1e-5, atol=2e-8, err_msg=k)
        np.testing.assert_allclose(state["exp_avg_sq"][k], v[k], rtol=1e-5, atol=1e-10, err_msg=k)


def test_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)
    y = np.array([0, 1, 2, 3])
    a = tiny(seed=3)
    opt_a = mapet.AdamW(a, lr=1e-3, clip_grad=1.0)
    for _ in range(2):
        a.train_step(x, y)
        opt_a.step()
        opt_a.zero_grad()
    b = tiny(seed=9)
    b.load_state_dict(a.state_dict())
    opt_b = mapet.AdamW(b, lr=0.5)
    opt_b.load_state_dict({k: (dict((n, t.copy()) for n, t in v.items()) if isinstance(v, dict) else v)
                           for k, v in opt_a.state_dict().items()})
    for m_, o in ((a, opt_a), (b, opt_b)):
        m_.train_step(x, y)
        o.step()
    np.testing.assert_array_equal(a.flat_params, b.flat_params)


def test_non_finite_gradients_raise_and_change_nothing():
    model = tiny()
    opt = mapet.AdamW(model, lr=1e-3)
    model.grads()["head.bias"][0] = np.nan
    before = model.flat_params.copy()
    with pytest.raises(ValueError, match="gradient norm is not finite"):
        opt.step()
    np.testing.assert_array_equal(model.flat_params, before)
    assert opt.step_count == 0 and not opt.state_dict()["exp_avg"]["head.weight"].any()


def test_bad_hyperparameters_are_named():
    model = tiny()
    with pytest.raises(ValueError, match="betas"):
        mapet.AdamW(model, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        mapet.AdamW(model, lr=float("nan"))
    with pytest.raises(ValueError, match="clip_grad"):
        mapet.AdamW(model, clip_grad=0.0)
    with pytest.raises(KeyError, match="layer_decay"):
        mapet.AdamW(model, layer_decay={"nope": 0.5})
    opt = mapet.AdamW(model, layer_decay={"head.weight": 0.0})
    assert opt.lr_scales["head.weight"] == 0.0 and opt.lr_scales["head.bias"] == 1.0

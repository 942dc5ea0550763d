"""CLIP's ModifiedResNet on the engine against NumPy float64 transcriptions written here.

Pieces: conv2d (strides, padding, rectangular images and kernels, bias / shortcut / ReLU
epilogue), average pooling, BatchNorm folding, and a whole tiny random tower — stem, anti-aliased
bottlenecks (avgpool before conv3 and in the shortcut), attention pool — with BatchNorm applied
unfolded in the reference. Tolerances: a float32 dot product of length K is within
γ_K·Σ|aᵢbᵢ| of the exact one (tests/float32_bounds.py), so each conv output is compared with
γ_{K+3} times the same conv of absolute values (+ |bias| + |residual|).
"""
import numpy as np
import pytest

import mapet
from mapet import _core, ops
from mapet.clip.resnet import ModifiedResNet, fold_batchnorm
from mapet.convert import convert
from float32_bounds import U, gamma
from torch_writer import tensors, write_zip

RNG = np.random.default_rng(1)


def conv_ref(x, w, b=None, stride=1, padding=0):
    """out[b,o,y,x] = Σ_{c,i,j} w[o,c,i,j]·xpad[b,c,y·s+i,x·s+j] (+ bias), float64."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    B, C, H, W = x.shape
    O, _, kh, kw = w.shape
    xp = np.zeros((B, C, H + 2 * padding, W + 2 * padding))
    xp[:, :, padding:padding + H, padding:padding + W] = x
    ho, wo = (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1
    out = np.zeros((B, O, ho, wo))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
            out += np.einsum("oc,bchw->bohw", w[:, :, i, j], patch)
    if b is not None:
        out += np.asarray(b, np.float64)[None, :, None, None]
    return out


def pool_ref(x, s):
    B, C, H, W = x.shape
    x = np.asarray(x, np.float64)[:, :, :H // s * s, :W // s * s]
    return x.reshape(B, C, H // s, s, W // s, s).mean(axis=(3, 5))


def _f32(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("B,C,H,W,O,k,kw,stride,pad", [
    (2, 3, 9, 9, 5, 3, 3, 1, 1),
    (1, 3, 17, 12, 4, 3, 3, 2, 1),     # the stem's strided conv, rectangular image, odd side
    (2, 6, 7, 7, 8, 1, 1, 1, 0),       # 1×1: the direct (no im2col) path
    (1, 4, 11, 13, 3, 5, 2, 3, 2),     # rectangular kernel, stride 3, padding 2
    (1, 2, 70, 66, 3, 3, 3, 1, 1),     # > 4096 output pixels: several im2col blocks
    (1, 3, 8, 8, 2, 7, 7, 2, 3),       # a ResNet-style 7×7/2 stem
])
def test_conv2d_matches_float64_reference(B, C, H, W, O, k, kw, stride, pad):
    x, w, b = _f32(B, C, H, W), _f32(O, C, k, kw), _f32(O)
    ref = conv_ref(x, w, b, stride, pad)
    got = ops.conv2d(x, w, b, stride=stride, padding=pad)
    assert got.shape == ref.shape
    bound = gamma(C * k * kw + 3) * (conv_ref(np.abs(x), np.abs(w), np.abs(b), stride, pad))
    assert np.all(np.abs(got - ref) <= bound)
    # shortcut + ReLU epilogue
    res = _f32(*ref.shape)
    got = ops.conv2d(x, w, b, stride=stride, padding=pad, residual=res, relu=True)
    full = ref + res
    assert np.all(np.abs(got - np.maximum(full, 0)) <= bound + gamma(2) * np.abs(res))
    assert np.all(got >= 0) and np.all(got[full < -(bound + np.abs(res))] == 0)


def test_conv2d_bf16_within_the_rounding_bound():
    x, w = _f32(2, 16, 10, 10), _f32(8, 16, 3, 3)
    ref = conv_ref(x, w, None, 1, 1)
    got = ops.conv2d(x, w, padding=1, precision="bf16")
    # each bf16 input is within 2⁻⁹ relative: a product within 2·2⁻⁹ + 2⁻¹⁸, then fp32 accumulation
    K = 16 * 9
    bound = (2 * 2.0 ** -9 + 2.0 ** -18 + gamma(K + 3)) * conv_ref(np.abs(x), np.abs(w), None, 1, 1)
    assert np.all(np.abs(got - ref) <= bound)


@pytest.mark.parametrize("shape,s", [((2, 3, 8, 8), 2), ((1, 4, 9, 7), 2), ((1, 2, 10, 11), 3), ((1, 1, 5, 5), 1)])
def test_avg_pool2d_matches_reference_and_floors(shape, s):
    x = _f32(*shape)
    got = ops.avg_pool2d(x, s)
    ref = pool_ref(x, s)
    assert got.shape == ref.shape
    assert np.all(np.abs(got - ref) <= gamma(s * s + 2) * pool_ref(np.abs(x), s))


def test_folded_batchnorm_equals_conv_then_batchnorm():
    x, w = _f32(2, 5, 9, 9), _f32(6, 5, 3, 3)
    g, beta = (0.5 + RNG.random(6)).astype(np.float32), _f32(6, scale=0.3)
    mean, var = _f32(6, scale=0.5), (0.2 + RNG.random(6)).astype(np.float32)
    z = conv_ref(x, w, None, 2, 1)
    sh = (1, -1, 1, 1)
    ref = (z - mean.reshape(sh)) / np.sqrt(var.astype(np.float64).reshape(sh) + 1e-5) * g.reshape(sh) + beta.reshape(sh)
    wf, bf = fold_batchnorm(w, g, beta, mean, var)
    got = ops.conv2d(x, wf, bf, stride=2, padding=1)
    # w', b' are float32 roundings of exact values (one more u each), then the conv's γ_{K+3}
    assert np.all(np.abs(got - ref) <= gamma(5 * 9 + 4) * conv_ref(np.abs(x), np.abs(wf), np.abs(bf), 2, 1))


def test_conv2d_boundary_checks():
    x, w = _f32(1, 3, 8, 8), _f32(4, 3, 3, 3)
    out = np.empty((1, 4, 8, 8), np.float32)
    with pytest.raises(ValueError, match="out: expected"):
        _core.conv2d_forward(np.empty((1, 4, 7, 7), np.float32), x, w, None, None, False, 1, 1, "fp32")
    with pytest.raises(ValueError, match="weight: expected"):
        _core.conv2d_forward(out, x, _f32(4, 2, 3, 3), None, None, False, 1, 1, "fp32")
    with pytest.raises(ValueError, match="stride"):
        _core.conv2d_forward(out, x, w, None, None, False, 0, 1, "fp32")
    with pytest.raises(ValueError, match="smaller than the 9×9 kernel"):
        ops.conv2d(x, _f32(4, 3, 9, 9))
    with pytest.raises(ValueError, match="share memory with residual"):
        _core.conv2d_forward(out, x, w, None, out, True, 1, 1, "fp32")
    with pytest.raises(ValueError, match="share memory with x"):
        _core.conv2d_forward(out, out, _f32(4, 4, 1, 1), None, None, False, 1, 0, "fp32")
    with pytest.raises(ValueError, match="precision"):
        _core.conv2d_forward(out, x, w, None, None, False, 1, 1, "fp16")
    with pytest.raises(TypeError, match="bias"):
        _core.conv2d_forward(out, x, w, np.zeros(4, np.float64), None, False, 1, 1, "fp32")
    with pytest.raises(ValueError, match="pooling window"):
        ops.avg_pool2d(_f32(1, 1, 2, 2), 3)
    # the ops only convert: the engine checks and words every error, and sizes the output
    with pytest.raises(ValueError, match=r"x: expected a float32 array of shape \[\*, \*, \*, \*\], got 3-d array"):
        ops.conv2d(_f32(3, 8, 8), w)
    with pytest.raises(TypeError, match="stride: expected an int, got float"):
        ops.conv2d(x, w, stride=1.5)
    with pytest.raises(ValueError, match="padding: expected an int ≥ 0, got -1"):
        ops.conv2d(x, w, padding=-1)
    with pytest.raises(ValueError, match="stride: expected an int ≥ 1, got 0"):
        ops.avg_pool2d(x, 0)
    assert ops.conv2d(x, w, stride=2, padding=1).shape == (1, 4, 4, 4)
    assert ops.avg_pool2d(x, 3).shape == (1, 3, 2, 2)


# ---------------------------------------------------------------- the tower, in float64

def _random_weights(model: ModifiedResNet, seed: int = 0):
    rng = np.random.default_rng(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("running_var") or (k.endswith(".weight") and v.ndim == 1):
            sd[k] = (0.5 + rng.random(v.shape)).astype(np.float32)
        elif k.endswith("running_mean") or k.endswith(".bias"):
            sd[k] = (0.1 * rng.standard_normal(v.shape)).astype(np.float32)
        elif v.ndim == 4:
            sd[k] = (rng.standard_normal(v.shape) * np.sqrt(2.0 / np.prod(v.shape[1:]))).astype(np.float32)
        else:
            sd[k] = (rng.standard_normal(v.shape) * v.shape[-1] ** -0.5).astype(np.float32)
    return sd


def tower_ref(p, layers, heads, x):
    """CLIP's ModifiedResNet.forward transcribed: returns (layer-4 map, attnpool embedding), float64."""
    P = {k: np.asarray(v, np.float64) for k, v in p.items()}

    def bn(z, name):
        sh = (1, -1, 1, 1)
        return ((z - P[name + ".running_mean"].reshape(sh)) / np.sqrt(P[name + ".running_var"].reshape(sh) + 1e-5)
                * P[name + ".weight"].reshape(sh) + P[name + ".bias"].reshape(sh))

    relu = lambda z: np.maximum(z, 0)  # noqa: E731
    z = np.asarray(x, np.float64)
    z = relu(bn(conv_ref(z, P["conv1.weight"], None, 2, 1), "bn1"))
    z = relu(bn(conv_ref(z, P["conv2.weight"], None, 1, 1), "bn2"))
    z = relu(bn(conv_ref(z, P["conv3.weight"], None, 1, 1), "bn3"))
    z = pool_ref(z, 2)
    for i, n in enumerate(layers):
        for j in range(n):
            pre, stride = f"layer{i + 1}.{j}.", (2 if i > 0 and j == 0 else 1)
            out = relu(bn(conv_ref(z, P[pre + "conv1.weight"]), pre + "bn1"))
            out = relu(bn(conv_ref(out, P[pre + "conv2.weight"], None, 1, 1), pre + "bn2"))
            out = pool_ref(out, stride)                        # anti-aliasing: pool, then the 1×1
            out = bn(conv_ref(out, P[pre + "conv3.weight"]), pre + "bn3")
            if pre + "downsample.0.weight" in P:
                z = bn(conv_ref(pool_ref(z, stride), P[pre + "downsample.0.weight"]), pre + "downsample.1")
            z = relu(out + z)
    grid = z
    B, C = grid.shape[:2]
    if grid.shape[2] * grid.shape[3] + 1 != P["attnpool.positional_embedding"].shape[0]:
        return grid, None  # CLIP's pool is made for one grid size
    t = grid.reshape(B, C, -1).transpose(0, 2, 1)
    t = np.concatenate([t.mean(axis=1, keepdims=True), t], axis=1) + P["attnpool.positional_embedding"][None]
    lin = lambda a, n: a @ P[f"attnpool.{n}.weight"].T + P[f"attnpool.{n}.bias"]  # noqa: E731
    q, k, v = lin(t[:, :1], "q_proj"), lin(t, "k_proj"), lin(t, "v_proj")
    D = C // heads
    split = lambda a: a.reshape(B, a.shape[1], heads, D).transpose(0, 2, 1, 3)  # noqa: E731
    s = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(D)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    o = (s @ split(v)).transpose(0, 2, 1, 3).reshape(B, C)
    return grid, lin(o, "c_proj")


def _tiny(**kw):
    cfg = dict(layers=(1, 2, 1, 1), width=8, output_dim=12, heads=2, image_size=64)
    cfg.update(kw)
    return cfg


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _path_bound(m: ModifiedResNet) -> float:
    """First-order accumulated rounding of the deepest path: Σ over its products of γ_{K+3}."""
    c = m.config
    w = c["width"]
    ks = [27, 9 * w // 2, 9 * w // 2]
    inplanes = w
    for i, n in enumerate(c["layers"]):
        planes = w << i
        for _ in range(n):
            ks += [inplanes, 9 * planes, planes]
            inplanes = planes * 4
    ks += [inplanes] * 3 + [inplanes]  # q/k/v projections, c_proj
    return sum(gamma(k + 3) for k in ks)


@pytest.mark.parametrize("side", [64, 72, 96])  # 72: odd maps on the way (floors), same 2×2 grid
def test_tiny_random_tower_matches_float64_reference(side):
    cfg = _tiny()
    m = mapet.create_model("clip_rn50", **cfg)
    sd = _random_weights(m)
    m.load_state_dict(sd)
    x = _f32(3, 3, side, side)
    grid_ref, embed_ref = tower_ref(sd, cfg["layers"], cfg["heads"], x)
    feats = m.forward_features(x)
    B, C, h, w = grid_ref.shape
    assert feats.shape == (B, h * w, C) == (3, (side // 32) ** 2, 8 * 32)
    tol = _path_bound(m)
    assert _rel(feats, grid_ref.reshape(B, C, -1).transpose(0, 2, 1)) <= tol
    if side // 32 == cfg["image_size"] // 32:
        embed = m.encode_image(x)
        assert embed.shape == (3, 12)
        assert _rel(embed, embed_ref) <= tol
    else:
        with pytest.raises(ValueError, match="64-pixel images"):
            m.encode_image(x)


@pytest.mark.bitwise
def test_results_do_not_depend_on_thread_count_or_batch_split():
    m = mapet.create_model("clip_rn50", **_tiny())
    m.load_state_dict(_random_weights(m, 2))
    x = _f32(4, 3, 64, 64)
    before = mapet.get_num_threads()
    try:
        mapet.set_num_threads(1)
        one = m.encode_image(x), m.forward_features(x)
        mapet.set_num_threads(2)
        two = m.encode_image(x), m.forward_features(x)
    finally:
        mapet.set_num_threads(before)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])


def test_pretrained_from_torch_file_and_converted_safetensors(tmp_path):
    cfg = _tiny()
    ref_model = ModifiedResNet(**cfg)
    sd = _random_weights(ref_model, 3)
    ref_model.load_state_dict(sd)
    full = {"visual." + k: v for k, v in sd.items()}
    full["visual.bn1.num_batches_tracked"] = np.array(10, np.int64)
    full["token_embedding.weight"] = _f32(10, 4)         # text tower: ignored
    full["logit_scale"] = np.array(4.6, np.float32)
    src = str(tmp_path / "open_clip_pytorch_model.bin")
    write_zip(src, tensors(full))
    x = _f32(2, 3, 64, 64)
    want = ref_model.encode_image(x)
    direct = mapet.create_model("clip_rn50", pretrained=src, **cfg)
    np.testing.assert_array_equal(direct.encode_image(x), want)
    assert "token_embedding.weight" in direct.pretrained_report["skipped"]
    dst = str(tmp_path / "rn.safetensors")
    convert(src, dst, visual_only=True)
    np.testing.assert_array_equal(mapet.create_model("clip_rn50", pretrained=dst, **cfg).encode_image(x), want)
    with pytest.raises(ValueError, match="not a clip_rn50 tower"):
        mapet.create_model("clip_rn50", pretrained=dst)       # the full-size RN50 shapes


def test_bad_inputs_and_weights_raise_and_leave_the_model_unchanged():
    m = mapet.create_model("clip_rn50", **_tiny())
    sd = _random_weights(m, 4)
    m.load_state_dict(sd)
    x = _f32(1, 3, 64, 64)
    before = m.encode_image(x)
    with pytest.raises(TypeError, match="floating-point"):
        m.encode_image(np.zeros((1, 3, 64, 64), np.int32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        m.forward_features(_f32(1, 4, 64, 64))
    with pytest.raises(ValueError, match="at least 32"):
        m.forward_features(_f32(1, 3, 16, 64))
    bad = dict(sd, **{"layer1.0.conv2.weight": _f32(8, 8, 1, 1)})
    with pytest.raises(ValueError, match="layer1.0.conv2.weight: shape"):
        m.load_state_dict(bad)
    with pytest.raises(ValueError, match="missing"):
        m.load_state_dict({k: v for k, v in sd.items() if not k.startswith("attnpool.")})
    nan = dict(sd, **{"bn1.running_var": np.full(4, np.nan, np.float32)})
    with pytest.raises(ValueError, match="NaN"):
        m.load_state_dict(nan)
    np.testing.assert_array_equal(m.encode_image(x), before)
    with pytest.raises(TypeError, match="unknown option"):
        mapet.create_model("clip_rn50", depth=3)
    with pytest.raises(ValueError, match="unknown model .clip_rn42."):
        mapet.create_model("clip_rn42")
    with pytest.raises(ValueError, match="multiple of 32"):
        ModifiedResNet(image_size=100)


def test_module_example_runs():
    import doctest

    import mapet.clip.resnet as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0

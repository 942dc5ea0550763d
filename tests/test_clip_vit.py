"""The CLIP ViT image tower (ALGORITHMS.md §6): the engine against a NumPy float64 transcription of
OpenAI's ``VisionTransformer`` written here (conv1 without bias, class embedding, positional
embedding, ln_pre, pre-LN blocks with the fused ``in_proj`` q/k/v layout, QuickGELU or exact GELU,
ln_post on every token, ``proj``), on tiny random towers; checkpoint loading in the OpenAI /
open_clip layout; CLIP preprocessing against a direct Pillow computation.

Tolerance (fp32 engine vs float64): every output is a chain of ~6 float32 reductions per block
of length ≤ 4·width (= 192 here), each with relative error ≲ K·2⁻²⁴ ≈ 1e-5 in the worst case
and ≈ √K·2⁻²⁴ typically; LayerNorms renormalise. 2 blocks → we allow 1e-4 of the output scale
for the largest element and 1e-5 for the median (measured: ≈ 1e-6 and 1e-7).
"""
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_twostream as ref  # noqa: E402  (bf16_round / bf16_matmuls / mm)

import mapet  # noqa: E402
from mapet._native import _core  # noqa: E402
from mapet.clip import CLIP_MEAN, CLIP_STD, CLIPVisionTransformer, preprocess  # noqa: E402
from mapet.io import save_file  # noqa: E402

TINY = dict(img_size=32, patch_size=8, width=48, layers=2, heads=3, output_dim=24)


# ------------------------------------------------------------------ float64 reference (OpenAI CLIP)

def layer_norm(x, w, b, eps=1e-5):  # nn.LayerNorm default eps
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def quick_gelu(x):
    return x / (1.0 + np.exp(-1.702 * x))


def gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def reference_tower(sd, images, heads, quick=True):
    """(tokens after ln_post [B, N, C], projected [B, N, E], embedding [B, E]) in float64."""
    mm = ref.mm
    w = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    x = np.asarray(images, np.float64)
    B, _, S, _ = x.shape
    conv = w["conv1.weight"]
    C, cin, p, _ = conv.shape
    g = S // p
    # conv1 (stride p, kernel p, no bias): patches flattened (channel, row, col), grid row-major.
    patches = x.reshape(B, cin, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(B, g * g, cin * p * p)
    t = mm(patches, conv.reshape(C, -1).T)
    cls = np.broadcast_to(w["class_embedding"], (B, 1, C))
    x = np.concatenate([cls, t], axis=1) + w["positional_embedding"]
    x = layer_norm(x, w["ln_pre.weight"], w["ln_pre.bias"])
    N, D = x.shape[1], C // heads
    act = quick_gelu if quick else gelu
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in w:
        pre = f"transformer.resblocks.{i}."
        h = layer_norm(x, w[pre + "ln_1.weight"], w[pre + "ln_1.bias"])
        qkv = mm(h, w[pre + "attn.in_proj_weight"].T) + w[pre + "attn.in_proj_bias"]  # [B, N, 3C]: q | k | v
        q, k, v = (qkv[..., j * C:(j + 1) * C].reshape(B, N, heads, D).transpose(0, 2, 1, 3) for j in range(3))
        s = mm(q, k.transpose(0, 1, 3, 2)) / math.sqrt(D)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = mm(s, v).transpose(0, 2, 1, 3).reshape(B, N, C)
        x = x + mm(a, w[pre + "attn.out_proj.weight"].T) + w[pre + "attn.out_proj.bias"]
        h = layer_norm(x, w[pre + "ln_2.weight"], w[pre + "ln_2.bias"])
        h = act(mm(h, w[pre + "mlp.c_fc.weight"].T) + w[pre + "mlp.c_fc.bias"])
        x = x + mm(h, w[pre + "mlp.c_proj.weight"].T) + w[pre + "mlp.c_proj.bias"]
        i += 1
    tokens = layer_norm(x, w["ln_post.weight"], w["ln_post.bias"])
    projected = mm(tokens, w["proj"])
    return tokens, projected, mm(tokens[:, 0], w["proj"])


def random_state(model, seed=0):
    """Random weights of every tensor (LayerNorms away from (1, 0), so every parameter matters)."""
    rng = np.random.default_rng(seed)
    sd = {}
    for name, v in model.state_dict().items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight")):
            sd[name] = (1 + 0.3 * rng.standard_normal(v.shape)).astype(np.float32)
        elif v.ndim == 1:
            sd[name] = (0.3 * rng.standard_normal(v.shape)).astype(np.float32)
        else:
            fan_in = v.shape[-1] if name != "proj" else v.shape[0]
            if name == "conv1.weight":
                fan_in = int(np.prod(v.shape[1:]))
            std = 1.0 if name in ("positional_embedding",) else 1.5 / math.sqrt(fan_in)
            sd[name] = (std * rng.standard_normal(v.shape)).astype(np.float32)
    return sd


def rel_errors(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.abs(want).max()
    d = np.abs(got - want) / scale
    return float(d.max()), float(np.median(d))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize("quick", [True, False])
def test_tower_matches_float64_reference(images, quick):
    m = CLIPVisionTransformer(**TINY, quick_gelu=quick)
    sd = random_state(m, seed=2)
    m.load_state_dict(sd)
    tokens, projected, embedding = reference_tower(sd, images, TINY["heads"], quick=quick)
    got_t = m.forward_features(images)
    got_p = m.forward_features(images, proj=True)
    got_e = m.encode_image(images)
    assert got_t.shape == (3, 17, 48) and got_p.shape == (3, 17, 24) and got_e.shape == (3, 24)
    for what, got, want in (("tokens", got_t, tokens), ("projected", got_p, projected), ("embedding", got_e, embedding)):
        worst, med = rel_errors(got, want)
        assert worst <= 1e-4 and med <= 1e-5, f"{what}: max {worst:.2e}, median {med:.2e} of the output scale"
    # The activation matters: the other one gives a visibly different tower.
    other, _, _ = reference_tower(sd, images, TINY["heads"], quick=not quick)
    assert rel_errors(got_t, other)[0] > 1e-3


def test_batching_does_not_change_results(images):
    m = CLIPVisionTransformer(**TINY)
    m.load_state_dict(random_state(m, seed=3))
    # Not bitwise: the GEMMs block rows differently for other batch sizes (fp32 rounding only).
    whole = m.forward_features(images, batch_size=None)
    assert rel_errors(m.forward_features(images[1:2]), whole[1:2])[0] <= 1e-5
    chunked = m.forward_features(images, batch_size=2)
    assert rel_errors(chunked, whole)[0] <= 1e-5
    e = m.encode_image(images, batch_size=1)
    assert rel_errors(e, m.encode_image(images, batch_size=None))[0] <= 1e-5
    assert rel_errors(e, m.forward_features(images, proj=True)[:, 0])[0] <= 1e-5


def test_layout_in_proj_rows_are_q_then_k_then_v(images):
    """Swapping the k and v rows of in_proj changes the output (the engine reads the fused layout,
    not a permutation-invariant summary of it), and the reference follows the swap."""
    m = CLIPVisionTransformer(**TINY)
    sd = random_state(m, seed=4)
    C = TINY["width"]
    w = sd["transformer.resblocks.0.attn.in_proj_weight"].copy()
    sd["transformer.resblocks.0.attn.in_proj_weight"] = np.concatenate([w[:C], w[2 * C:], w[C:2 * C]])
    m.load_state_dict(sd)
    worst, _ = rel_errors(m.forward_features(images), reference_tower(sd, images, TINY["heads"])[0])
    assert worst <= 1e-4


@pytest.mark.skipif(not mapet.bf16_info()["active"], reason="bf16 products are not active on this CPU / process")
def test_bf16_follows_the_bf16_reference(images):
    """precision="bf16": the engine follows a reference whose matrix products round their inputs
    to bf16 (criteria of tests/test_precision.py: median error ≤ 2⁻⁸ of the median bf16 effect,
    largest ≤ 2⁻⁷ of the output scale), and differs from fp32 by a bf16-sized amount."""
    m = CLIPVisionTransformer(**TINY, precision="bf16")
    sd = random_state(m, seed=5)
    m.load_state_dict(sd)
    want64 = reference_tower(sd, images, TINY["heads"])
    with ref.bf16_matmuls():
        want16 = reference_tower(sd, images, TINY["heads"])
    got = (m.forward_features(images), m.forward_features(images, proj=True), m.encode_image(images))
    for what, g, w16, w64 in zip(("tokens", "projected", "embedding"), got, want16, want64):
        g, w16, w64 = (np.asarray(a, np.float64) for a in (g, w16, w64))
        scale = np.abs(w16).max()
        effect = float(np.median(np.abs(w16 - w64)))
        assert effect > 2.0 ** -20 * scale
        assert float(np.median(np.abs(g - w16))) <= 2.0 ** -8 * effect, what
        assert float(np.abs(g - w16).max()) <= 2.0 ** -7 * scale, what
    m.precision = "fp32"
    fp32 = m.forward_features(images)
    d = float(np.abs(got[0] - fp32).max() / np.abs(fp32).max())
    assert 2.0 ** -12 <= d <= 2.0 ** -4


# ------------------------------------------------------------------ checkpoints

def test_create_model_reads_a_full_clip_state_dict(tmp_path, images):
    m = CLIPVisionTransformer(**TINY)
    sd = random_state(m, seed=6)
    full = {"visual." + k: v for k, v in sd.items()}
    full.update({"logit_scale": np.float32([4.6]), "token_embedding.weight": np.zeros((10, 8), np.float32),
                 "transformer.resblocks.0.ln_1.weight": np.ones(8, np.float32),  # text tower: same names
                 "text_projection": np.zeros((8, 24), np.float32)})
    full["visual.conv1.weight"] = full["visual.conv1.weight"].astype(np.float16)  # OpenAI ships fp16
    path = str(tmp_path / "clip.safetensors")
    save_file(full, path)
    with pytest.raises(ValueError, match="pass heads="):  # width 48: heads are not width / 64
        mapet.create_model("clip_vit_b16", pretrained=path)
    loaded = mapet.create_model("clip_vit_b16", pretrained=path, heads=3)
    assert loaded.config == dict(TINY, mlp_ratio=4.0, quick_gelu=True)
    sd["conv1.weight"] = sd["conv1.weight"].astype(np.float16).astype(np.float32)
    worst, _ = rel_errors(loaded.encode_image(images), reference_tower(sd, images, TINY["heads"])[2])
    assert worst <= 1e-4
    fresh = CLIPVisionTransformer(**TINY)
    report = fresh.load_clip_state_dict(path)
    assert report["ignored"] == 4 and len(report["loaded"]) == len(sd)
    assert np.array_equal(fresh.encode_image(images), loaded.encode_image(images))
    # The visual part alone, as a mapping, with GELU.
    alone = mapet.create_model("clip_vit_b16", pretrained=sd, quick_gelu=False, heads=3)
    assert not alone.config["quick_gelu"]
    assert rel_errors(alone.forward_features(images),
                      reference_tower(sd, images, TINY["heads"], quick=False)[0])[0] <= 1e-4


def test_published_geometries():
    for name, (patch, width, layers, out) in {"clip_vit_b32": (32, 768, 12, 512), "clip_vit_b16": (16, 768, 12, 512),
                                              "clip_vit_l14": (14, 1024, 24, 768)}.items():
        m = mapet.create_model(name, layers=1)
        c = m.config
        assert (c["patch_size"], c["width"], c["output_dim"], c["img_size"]) == (patch, width, out, 224), name
        assert m.state_dict()["positional_embedding"].shape == ((224 // patch) ** 2 + 1, width)
        assert layers in (12, 24)


def test_bad_inputs_raise_named_errors(images):
    m = CLIPVisionTransformer(**TINY)
    with pytest.raises(ValueError, match=r"images: expected shape \[B, 3, 32, 32\]"):
        m.forward_features(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(TypeError, match="images: expected a floating-point array"):
        m.encode_image(np.zeros((1, 3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="batch_size"):
        m.encode_image(images, batch_size=0)
    with pytest.raises(ValueError, match=r"must be a positive multiple of num_heads"):
        CLIPVisionTransformer(**dict(TINY, heads=5))
    with pytest.raises(ValueError, match="img_size"):
        CLIPVisionTransformer(**dict(TINY, img_size=30))
    with pytest.raises(TypeError, match="width: expected an int, got float"):
        CLIPVisionTransformer(**dict(TINY, width=64.0))
    with pytest.raises(ValueError, match="config: missing 'seed'"):  # the engine has no defaults
        _core.clip_vit_create(dict(TINY, mlp_ratio=4.0, activation="gelu"))
    with pytest.raises(ValueError, match="unknown model .clip_vit_h99."):
        mapet.create_model("clip_vit_h99")
    with pytest.raises(TypeError, match="unknown option"):
        mapet.create_model("clip_vit_b16", embed_dim=3)
    sd = random_state(m)
    del sd["ln_post.bias"]
    with pytest.raises(KeyError, match="ln_post.bias"):
        mapet.create_model("clip_vit_b16", pretrained=sd, heads=3)
    with pytest.raises(ValueError, match="not a CLIP ViT image tower"):
        mapet.create_model("clip_vit_b16", pretrained={"weight": np.zeros(3, np.float32)})
    with pytest.raises(TypeError, match="frozen"):
        m.grads()


# ------------------------------------------------------------------ preprocessing

def pillow_clip(img, size):
    """OpenAI's transform written out with Pillow: Resize(size, BICUBIC) → CenterCrop → /255 → normalise."""
    from PIL import Image
    w, h = img.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    img = img.convert("RGB").resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    a = np.asarray(img.crop((left, top, left + size, top + size)), np.float64) / 255.0
    return ((a - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)


def test_preprocess_matches_pillow():
    from PIL import Image
    rng = np.random.default_rng(7)
    pics = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 37), (40, 64), (33, 33))]
    got = preprocess(pics, size=32)
    want = np.stack([pillow_clip(p, 32) for p in pics])
    assert got.shape == (3, 3, 32, 32) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-5  # float32 of the same arithmetic
    # uint8 arrays go through the same Pillow path.
    a = np.asarray(pics[1])
    assert np.array_equal(preprocess(a, size=32)[0], got[1])


def test_preprocess_float_arrays_resize_each_channel_with_pillow():
    from PIL import Image
    x = np.random.default_rng(8).random((2, 3, 20, 30)).astype(np.float32)
    got = preprocess(x, size=16, normalize_output=False)
    # Resize (shorter side 20 → 16, longer 30 → 24) each channel in float mode, crop columns 4..20.
    want = np.stack([np.stack([np.asarray(Image.fromarray(x[b, c], "F").resize((24, 16), Image.BICUBIC))[:, 4:20]
                               for c in range(3)]) for b in range(2)])
    assert np.array_equal(got, want)
    norm = preprocess(x[:, :, :16, :16], size=16)  # already at size: only normalised
    assert np.allclose(norm, (x[:, :, :16, :16] - np.float32(CLIP_MEAN).reshape(3, 1, 1))
                       / np.float32(CLIP_STD).reshape(3, 1, 1), atol=1e-6)


def test_image_folder_is_clip_preprocessed(tmp_path):
    from PIL import Image
    from mapet.clip import ImageFolder
    rng = np.random.default_rng(9)
    pics = {}
    for cls in ("a", "b"):
        os.makedirs(tmp_path / cls)
        pic = Image.fromarray(rng.integers(0, 256, (45, 30, 3), dtype=np.uint8))
        pic.save(tmp_path / cls / "x.png")
        pics[cls] = pic
    ds = ImageFolder(str(tmp_path), size=24)
    assert ds.clip_preprocessed and len(ds) == 2
    img, label = ds[1]
    assert label == 1 and img.shape == (3, 24, 24)
    assert np.abs(img - pillow_clip(pics["b"], 24)).max() <= 1e-5

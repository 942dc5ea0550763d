"""k-CLIP end to end (issue 16): FeatureTokenizer.from_clip on the built-in digits through a tiny
random CLIP tower, its bounded streaming sample, encode_images against brute force, the tokenize
command with tokenizer=kclip, DTM with a CLIP teacher, and the token-map figure."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import mapet
import mapet.train
from mapet.clip import CLIPTokenizer, CLIPVisionTransformer, Reservoir, clip_teacher, normalize, preprocess
from mapet.data import load_digits
from mapet.io import save_file

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(mapet.__file__)))
# Patch 4 at 32 px: the 8×8 grid of the CLI's default model (img_size 32, patch_size 4).
TINY = dict(img_size=32, patch_size=4, width=64, layers=2, heads=1, output_dim=8)  # width 64: heads read off files


@pytest.fixture(scope="module")
def clip():
    m = CLIPVisionTransformer(**TINY, seed=3)
    rng = np.random.default_rng(0)
    for name, v in m.state_dict().items():  # LayerNorms away from (1, 0)
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight")):
            v[...] = 1 + 0.2 * rng.standard_normal(v.shape)
    return m


@pytest.fixture(scope="module")
def digits():
    return load_digits(32, "train")[0][:96]


def test_from_clip_fits_and_encodes_digits_as_brute_force(clip, digits):
    tok = mapet.FeatureTokenizer.from_clip(clip, digits, k=16, sample_fraction=0.5, n_iter=8, batch_size=40)
    assert isinstance(tok, CLIPTokenizer) and tok.centroids.shape == (16, 64)
    # Half of 96·64 patch features are candidates (binomial: well inside ±10 %), all kept (cap 16·256).
    assert abs(tok.candidates_ - 96 * 64 / 2) < 0.1 * 96 * 64 / 2 and tok.sampled_ == tok.candidates_
    tokens = tok.encode_images(digits)
    assert tokens.shape == (96, 64) and tokens.dtype == np.int32
    # Brute force: CLIP-normalised digits (already 32 px) → ln_post patch tokens → nearest centroid (float64).
    f = clip.forward_features(normalize(digits))[:, 1:].astype(np.float64)
    c = tok.centroids.astype(np.float64)
    d = ((f[:, :, None, :] - c[None, None]) ** 2).sum(-1)
    want = d.argmin(-1)
    agree = tokens == want
    if not agree.all():  # only near-ties may differ (float32 distances in the engine)
        srt = np.sort(d, -1)
        assert np.all((srt[..., 1] - srt[..., 0])[~agree] <= 1e-4 * srt[..., 1][~agree])
    assert len(np.unique(tokens)) >= 8  # the digits use many of the 16 tokens


def test_from_clip_on_a_resnet_tower_clusters_its_layer4_grid(digits, tmp_path):
    # The reference's default tower is a ModifiedResNet (RN50x64): its layer-4 grid is the feature set,
    # no class token to drop. A tiny random one at 64 px gives a 2×2 grid of 256-d features.
    rn = mapet.create_model("clip_rn50", layers=(1, 1, 1, 1), width=8, output_dim=16, image_size=64, seed=1)
    tok = mapet.FeatureTokenizer.from_clip(rn, digits, k=6, sample_fraction=1.0, n_iter=6, batch_size=32)
    assert tok.skip_tokens == 0 and tok.centroids.shape == (6, 256) and tok.candidates_ == 96 * 4
    tokens = tok.encode_images(digits)
    assert tokens.shape == (96, 4) and rn.grid == 2
    f = rn.forward_features(preprocess(digits, 64)).astype(np.float64)
    d = ((f[:, :, None, :] - tok.centroids.astype(np.float64)[None, None]) ** 2).sum(-1)
    agree = tokens == d.argmin(-1)
    if not agree.all():  # only near-ties may differ (float32 distances in the engine)
        srt = np.sort(d, -1)
        assert np.all((srt[..., 1] - srt[..., 0])[~agree] <= 1e-4 * srt[..., 1][~agree])
    # The same tower from its weights file: load_clip recognises a ResNet checkpoint.
    path = str(tmp_path / "rn.safetensors")
    save_file({"visual." + k: v for k, v in rn.state_dict().items()}, path)
    again = mapet.FeatureTokenizer.from_clip(path, digits, k=6, sample_fraction=1.0, n_iter=6, batch_size=32)
    assert np.array_equal(again.centroids, tok.centroids)


def test_sample_is_capped_and_streamed(clip, digits):
    tok = mapet.FeatureTokenizer.from_clip(clip, digits, k=4, max_points_per_centroid=25, sample_fraction=1.0,
                                           n_iter=3, batch_size=16)
    assert tok.sampled_ == 100 and tok.candidates_ == 96 * 64  # the cap k·max_points_per_centroid
    # An iterable of (images, labels) batches and a dataset give the same tokenizer as the array.
    from mapet.data import ArrayDataset
    y = np.zeros(len(digits), np.int64)
    a = mapet.FeatureTokenizer.from_clip(clip, digits, k=4, n_iter=3, batch_size=32, sample_fraction=0.3)
    b = mapet.FeatureTokenizer.from_clip(clip, ArrayDataset(digits, y), k=4, n_iter=3, batch_size=32,
                                         sample_fraction=0.3)
    c = mapet.FeatureTokenizer.from_clip(clip, [(digits[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)], k=4,
                                         n_iter=3, batch_size=32, sample_fraction=0.3)
    assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.centroids, c.centroids)
    with pytest.raises(ValueError, match="sample_fraction"):
        mapet.FeatureTokenizer.from_clip(clip, digits, k=4, sample_fraction=0)


def test_reservoir_is_uniform_over_the_stream():
    # 20 batches of 50 rows (row value = its stream position), cap 100: every position is kept with
    # probability 100/1000. Over 200 runs each batch's share of kept rows is 1/20 ± 4 σ.
    counts = np.zeros(20)
    for run in range(200):
        r = Reservoir(100, np.random.default_rng(run))
        for b in range(20):
            r.add(np.arange(b * 50, (b + 1) * 50, dtype=np.float32)[:, None])
        s = r.sample()[:, 0]
        assert s.shape == (100,) and len(np.unique(s)) == 100 and r.seen == 1000
        counts += np.bincount((s // 50).astype(int), minlength=20)
    share = counts / counts.sum()
    sigma = np.sqrt(0.05 * 0.95 / counts.sum())
    assert np.all(np.abs(share - 0.05) < 4 * sigma), share


def test_preprocessing_follows_the_dataset(clip, digits, tmp_path):
    tok = mapet.FeatureTokenizer.from_clip(clip, digits[:32], k=4, n_iter=3, sample_fraction=1.0)
    x16 = load_digits(16, "train")[0][:4]  # other size: bicubic resize to the tower's 32 px first
    assert np.array_equal(tok.encode_images(x16), tok.encode(clip.forward_features(preprocess(x16, 32))))
    # Already CLIP-preprocessed images pass through with preprocess=False.
    assert np.array_equal(tok.encode_images(normalize(digits[:4]), preprocess=False), tok.encode_images(digits[:4]))
    path = str(tmp_path / "kclip.safetensors")
    tok.save(path)
    again = CLIPTokenizer.load(path, clip)
    assert np.array_equal(again.encode_images(digits[:8]), tok.encode_images(digits[:8]))


def test_dtm_with_a_clip_teacher(clip, digits, tmp_path):
    teach = clip_teacher(clip)
    x = digits[:4]
    np.testing.assert_array_equal(teach(x), clip.forward_features(normalize(x), proj=True))
    path = str(tmp_path / "clip.safetensors")
    save_file({"visual." + k: v for k, v in clip.state_dict().items()}, path)
    assert np.array_equal(clip_teacher(path)(x), teach(x))
    kw = dict(model="tiny", data=digits[:64], epochs=1, batch_size=32, img_size=32, patch_size=4, embed_dim=24,
              depth=2, num_heads=3)
    for t in (clip, path):
        model, hist = mapet.train.pretrain("dtm", teacher=t, **kw)
        assert isinstance(model, mapet.DTM) and model.config["output_dim"] == 8  # the tower's proj width
        assert len(hist["loss"]) == 2 and np.all(np.isfinite(hist["loss"]))


def test_tokenize_command_with_kclip(clip, tmp_path):
    path = str(tmp_path / "clip.safetensors")
    save_file({"visual." + k: v for k, v in clip.state_dict().items()}, path)
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    args = [sys.executable, "-m", "mapet", "tokenize", "--set", "tokenizer=kclip", "--set", f"clip={path}",
            "--set", "tokenizer.n_tokens=8", "--set", "tokenizer.n_iter=3", "--set", "tokenizer.sample_fraction=0.05",
            "--threads", "2", "-o", "out"]
    r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    cache = os.path.join(tmp_path, r.stdout.strip().splitlines()[-1])
    manifest = json.loads(open(os.path.join(cache, "manifest.json")).read())
    assert manifest["n_tokens"] == 8 and manifest["n_patches"] == 64
    tok = CLIPTokenizer.load(os.path.join(tmp_path, "out", "kclip.safetensors"), clip)
    tokens = mapet.data.TokenCache.open(cache).tokens
    x = load_digits(32, "train")[0][:5]
    assert np.array_equal(np.asarray(tokens[:5]), tok.encode_images(x))
    # A grid that does not match the model's is refused with the fix.
    bad = subprocess.run(args[:-2] + ["--set", "model.patch_size=8", "-o", "bad"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=600)
    assert bad.returncode != 0 and "tokens must align with patches" in bad.stderr


def test_token_map_figure(clip, digits, tmp_path):
    tok = mapet.FeatureTokenizer.from_clip(clip, digits[:32], k=6, n_iter=3, sample_fraction=1.0)
    tokens = tok.encode_images(digits[:3])
    maps = mapet.viz.token_maps(tokens, 32)
    assert maps.shape == (3, 3, 32, 32)
    # Same token → same colour; patch (r, c) covers pixels [4r, 4r+4) × [4c, 4c+4).
    colours = mapet.viz.token_colors(np.arange(6))
    assert len({tuple(np.round(c, 6)) for c in colours}) == 6
    assert np.allclose(maps[1, :, 8:12, 20:24], colours[tokens[1, 2 * 8 + 5]][:, None, None])
    fig = mapet.viz.plot_token_maps(digits[:3], tokens, path=str(tmp_path / "maps.png"))
    assert len(fig.axes) == 6 and os.path.getsize(tmp_path / "maps.png") > 0
    assert "k-CLIP token" in mapet.viz.caption_of(fig)

"""PixelTokenizer (CCViT) and FeatureTokenizer (k-CLIP): patch order, round trips, save/load."""
import numpy as np
import pytest

import mapet
from float32_bounds import clear_of_ties


def patchify_loops(img, p):
    """Reference: [C, H, W] → [n, C·p·p], patches row-major, each flattened (channel, row, col)."""
    C, H, W = img.shape
    out = []
    for gy in range(H // p):
        for gx in range(W // p):
            v = [img[c, gy * p + r, gx * p + q] for c in range(C) for r in range(p) for q in range(p)]
            out.append(v)
    return np.array(out, dtype=np.float32)


def test_patchify_order_and_inverse():
    rng = np.random.default_rng(0)
    imgs = rng.random((2, 3, 12, 8), dtype=np.float32)
    tok = mapet.PixelTokenizer(patch_size=4, n_tokens=4)
    P = tok.patchify(imgs)
    assert P.shape == (2, 6, 48)
    for b in range(2):
        np.testing.assert_array_equal(P[b], patchify_loops(imgs[b], 4))
    np.testing.assert_array_equal(tok.unpatchify(P, grid=(3, 2)), imgs)


def test_pixel_round_trip_is_lossless_on_centroid_patches():
    rng = np.random.default_rng(1)
    train = rng.random((6, 3, 32, 32), dtype=np.float32)
    tok = mapet.PixelTokenizer(patch_size=8, n_tokens=40, n_iter=5, seed=2).fit(train)
    tokens = rng.integers(0, 40, size=(3, 16)).astype(np.int32)
    images = tok.decode(tokens)                          # every patch is exactly a centroid
    assert images.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(tok.encode(images), tokens)
    np.testing.assert_array_equal(tok.decode(tok.encode(images)), images)


@pytest.mark.bitwise
def test_pixel_encode_is_nearest_centroid_and_batches_stream():
    rng = np.random.default_rng(2)
    imgs = rng.random((8, 3, 16, 16), dtype=np.float32)
    tok = mapet.PixelTokenizer(patch_size=4, n_tokens=20, n_iter=4, seed=0).fit(imgs)
    P = tok.patchify(imgs).reshape(-1, 48).astype(np.float64)
    D = ((P[:, None] - tok.centroids.astype(np.float64)[None]) ** 2).sum(-1)
    tokens = tok.encode(imgs)
    assert tokens.dtype == np.int32 and tokens.shape == (8, 16)
    srt = np.sort(D, 1)
    clear = srt[:, 1] - srt[:, 0] > 1e-5
    np.testing.assert_array_equal(tokens.reshape(-1)[clear], D.argmin(1)[clear])
    # Batches of 3 and 5 images are other GEMM shapes than 8: the same token wherever no float32
    # evaluation can change the nearest centroid (float32_bounds), and nearly everywhere.
    streamed = tok.encode(iter([imgs[:3], imgs[3:]]))
    sure = clear_of_ties(P, tok.centroids)
    assert sure.mean() > 0.95
    np.testing.assert_array_equal(streamed.reshape(-1)[sure], tokens.reshape(-1)[sure])
    again = mapet.PixelTokenizer(patch_size=4, n_tokens=20, n_iter=4, seed=0).fit([imgs[:5], imgs[5:]])
    np.testing.assert_array_equal(again.centroids, tok.centroids)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    imgs = rng.random((4, 3, 16, 16), dtype=np.float32)
    tok = mapet.PixelTokenizer(patch_size=8, n_tokens=8, n_iter=3, seed=5).fit(imgs)
    tok.save(tmp_path / "pix.safetensors")
    back = mapet.PixelTokenizer.load(tmp_path / "pix.safetensors")
    assert back.patch_size == 8 and back.n_tokens == 8 and back.kmeans.seed == 5
    np.testing.assert_array_equal(back.centroids, tok.centroids)
    np.testing.assert_array_equal(back.encode(imgs), tok.encode(imgs))
    with pytest.raises(ValueError, match="expected a FeatureTokenizer file"):
        mapet.FeatureTokenizer.load(tmp_path / "pix.safetensors")

    f = rng.standard_normal((5, 10, 12)).astype(np.float32)
    ft = mapet.FeatureTokenizer(n_tokens=6, n_iter=3, skip_tokens=1).fit(f)
    ft.save(tmp_path / "feat.safetensors")
    fb = mapet.FeatureTokenizer.load(tmp_path / "feat.safetensors")
    assert fb.skip_tokens == 1
    np.testing.assert_array_equal(fb.encode(f), ft.encode(f))


def test_feature_tokenizer_matches_kmeans_on_flattened_patches():
    rng = np.random.default_rng(4)
    f = rng.standard_normal((6, 17, 24)).astype(np.float32)      # class token + 16 patches
    tok = mapet.FeatureTokenizer(n_tokens=10, n_iter=5, seed=1, skip_tokens=1).fit(f)
    km = mapet.KMeans(10, n_iter=5, seed=1).fit(f[:, 1:].reshape(-1, 24))
    np.testing.assert_array_equal(tok.centroids, km.cluster_centers_)
    tokens = tok.encode(f)
    assert tokens.shape == (6, 16)
    np.testing.assert_array_equal(tokens.reshape(-1), km.predict(f[:, 1:].reshape(-1, 24)))


def test_tokenizer_bad_inputs():
    rng = np.random.default_rng(5)
    tok = mapet.PixelTokenizer(patch_size=8, n_tokens=4, n_iter=2)
    with pytest.raises(ValueError, match="multiples of patch_size=8"):
        tok.fit(rng.random((2, 3, 12, 16), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tok.fit(rng.random((2, 1, 16, 16), dtype=np.float32))
    with pytest.raises(TypeError, match="float array"):
        tok.fit(np.zeros((2, 3, 16, 16), np.uint8))
    with pytest.raises(RuntimeError, match="fit"):
        tok.decode(np.zeros((1, 4), np.int32))
    tok.fit(rng.random((2, 3, 16, 16), dtype=np.float32))
    with pytest.raises(ValueError, match=r"values in \[0, 4\)"):
        tok.decode(np.full((1, 4), 4, np.int32))
    ft = mapet.FeatureTokenizer(n_tokens=4, n_iter=2).fit(rng.standard_normal((2, 8, 6)).astype(np.float32))
    with pytest.raises(ValueError, match="expected d = 6"):
        ft.encode(rng.standard_normal((2, 8, 5)).astype(np.float32))
    with pytest.raises(ValueError, match=r"\[B, n_patches, d\]"):
        ft.encode(rng.standard_normal((8, 6)).astype(np.float32))

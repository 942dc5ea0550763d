"""Data: the built-in digits, bilinear upsampling, image folders (views, bad files), the seeded
prefetching loader (coverage, resume), token caches (round trip, mismatches)."""
import math
import os
import threading
import warnings

import numpy as np
import pytest
from PIL import Image

from mapet.data import (ArrayDataset, DataLoader, ImageFolder, ImageLoadError, TokenCache, TokenCacheError,
                        digits_split, load_digits, random_resized_crop_params, resize_bilinear,
                        tokenizer_fingerprint)


# ------------------------------------------------------------------ digits

def _bilinear_reference(img: np.ndarray, out: int) -> np.ndarray:
    """Per-pixel float64 transcription of half-pixel-centre bilinear interpolation."""
    n = img.shape[0]
    res = np.zeros((out, out))
    for oy in range(out):
        sy = min(max((oy + 0.5) * n / out - 0.5, 0.0), n - 1)
        y0 = int(math.floor(sy)); y1 = min(y0 + 1, n - 1); fy = sy - y0
        for ox in range(out):
            sx = min(max((ox + 0.5) * n / out - 0.5, 0.0), n - 1)
            x0 = int(math.floor(sx)); x1 = min(x0 + 1, n - 1); fx = sx - x0
            res[oy, ox] = ((1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x1])
                           + fy * ((1 - fx) * img[y1, x0] + fx * img[y1, x1]))
    return res


def test_digits_file_is_the_uci_set():
    x, y = load_digits(8, "all")
    assert x.shape == (1797, 3, 8, 8) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    levels = np.unique(np.rint(x * 16))
    assert levels.min() == 0 and levels.max() == 16 and np.allclose(x * 16, np.rint(x * 16))
    assert np.array_equal(x[:, 0], x[:, 1]) and np.array_equal(x[:, 0], x[:, 2])
    # first sample of the UCI/sklearn file is a zero
    assert y[0] == 0 and np.rint(x[0, 0, 0] * 16).tolist() == [0, 0, 5, 13, 9, 1, 0, 0]


@pytest.mark.parametrize("size", [32, 20, 5])
def test_digits_upsampling_matches_direct_formula(size):
    raw, _ = load_digits(8, "all")
    up, _ = load_digits(size, "all")
    assert up.shape == (1797, 3, size, size)
    for i in (0, 1, 500, 1796):
        ref = _bilinear_reference(raw[i, 0].astype(np.float64), size)
        np.testing.assert_allclose(up[i, 0], ref, rtol=0, atol=2e-6)
        np.testing.assert_array_equal(up[i, 1], up[i, 0])
    assert up.min() >= 0 and up.max() <= 1


def test_resize_bilinear_reproduces_linear_ramps_and_rectangles():
    ramp = np.add.outer(np.arange(6.0), 2 * np.arange(9.0))  # f(y, x) = y + 2x
    out = resize_bilinear(ramp, 12, 18)
    ys = np.clip((np.arange(12) + 0.5) / 2 - 0.5, 0, 5)
    xs = np.clip((np.arange(18) + 0.5) / 2 - 0.5, 0, 8)
    np.testing.assert_allclose(out, np.add.outer(ys, 2 * xs), atol=1e-12)
    assert out.dtype == np.float64
    with pytest.raises(ValueError, match="positive"):
        resize_bilinear(ramp, 0, 3)


def test_digits_split_is_fixed_stratified_and_disjoint():
    _, y_all = load_digits(8, "all")
    tr, te = digits_split(y_all)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 1797
    assert len(tr) == 1438 and len(te) == 359
    for c in range(10):
        assert abs((y_all[te] == c).sum() - 0.2 * (y_all == c).sum()) <= 0.5
    x_all, _ = load_digits(16, "all")
    x_tr, y_tr = load_digits(16, "train")
    x_te, y_te = load_digits(16, "test")
    np.testing.assert_array_equal(x_tr, x_all[tr]); np.testing.assert_array_equal(y_te, y_all[te])
    x_te2, _ = load_digits(16, "test")
    np.testing.assert_array_equal(x_te, x_te2)  # deterministic
    _, te1 = digits_split(y_all, seed=1)
    assert not np.array_equal(te, te1)
    with pytest.raises(ValueError, match="split"):
        load_digits(32, "val")


def test_array_dataset_validates():
    with pytest.raises(ValueError, match=r"\[n, C, H, W\]"):
        ArrayDataset(np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="labels"):
        ArrayDataset(np.zeros((3, 1, 8, 8)), np.zeros(4, int))
    with pytest.raises(TypeError, match="integers"):
        ArrayDataset(np.zeros((3, 1, 8, 8)), np.zeros(3))


# ------------------------------------------------------------------ loader

def _indexed_dataset(n: int) -> ArrayDataset:
    """Image i is filled with the value i, label i: a batch reveals which samples it holds."""
    return ArrayDataset(np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 3, 2, 2)).copy(),
                        np.arange(n))


class _ItemOnly:
    """The same content without get_batch, so the loader's per-item collation is exercised."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.full((3, 2, 2), float(i), np.float32), i


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_loader_covers_every_sample_once_per_epoch(drop_last, prefetch):
    n, bs = 103, 10
    loader = DataLoader(_indexed_dataset(n), bs, shuffle=True, drop_last=drop_last, seed=3, prefetch=prefetch)
    assert len(loader) == (10 if drop_last else 11)
    orders = []
    for epoch in range(3):
        seen = []
        for images, labels in loader:
            assert images.dtype == np.float32 and images.shape[1:] == (3, 2, 2) and images.flags.c_contiguous
            np.testing.assert_array_equal(images[:, 0, 0, 0], labels)
            seen.append(labels)
        seen = np.concatenate(seen)
        if drop_last:
            assert len(seen) == 100 and len(np.unique(seen)) == 100
        else:
            assert sorted(seen.tolist()) == list(range(n))
        orders.append(seen)
        assert loader.epoch == epoch + 1 and loader.position == 0
    assert not np.array_equal(orders[0], orders[1])
    # the same seed gives the same stream; the per-item path collates identically
    other = DataLoader(_ItemOnly(n), bs, shuffle=True, drop_last=drop_last, seed=3, prefetch=prefetch)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in other]), orders[0])


def test_loader_without_shuffle_keeps_order_and_short_last_batch():
    loader = DataLoader(_indexed_dataset(7), 3, shuffle=False)
    sizes = [b[1].tolist() for b in loader]
    assert sizes == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.parametrize("stop_after", [3, 11, 14])
def test_loader_resume_gives_identical_subsequent_batches(stop_after):
    def stream(loader, n):
        out = []
        while len(out) < n:
            for b in loader:
                out.append(b)
                if len(out) == n:
                    break
        return out

    ds = _indexed_dataset(53)
    full = stream(DataLoader(ds, 8, seed=7, return_indices=True), 20)  # 7 batches/epoch: crosses 2 epochs
    first = DataLoader(ds, 8, seed=7, return_indices=True)
    head = stream(first, stop_after)
    state = first.state_dict()
    resumed = DataLoader(ds, 8, seed=99, return_indices=True)  # seed comes from the state
    resumed.load_state_dict(state)
    tail = stream(resumed, 20 - stop_after)
    for a, b in zip(head + tail, full):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(full[0][2], full[0][1])  # indices are the dataset indices


def test_loader_set_epoch_and_state_validation():
    ds = _indexed_dataset(20)
    loader = DataLoader(ds, 4, seed=1)
    it = iter(loader)
    next(it); next(it)
    it.close()
    assert loader.state_dict()["position"] == 2
    loader.set_epoch(0)  # same epoch: keeps the position (resume-friendly loops)
    assert loader.position == 2
    loader.set_epoch(5)
    assert (loader.epoch, loader.position) == (5, 0)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in loader]), loader.order(5))
    with pytest.raises(ValueError, match="length"):
        DataLoader(_indexed_dataset(21), 4).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader(ds, 4).load_state_dict(dict(loader.state_dict(), batch_size=5))
    with pytest.raises(ValueError, match="batch_size must be positive"):
        DataLoader(ds, 0)
    with pytest.raises(ValueError, match="no batch"):
        DataLoader(ds, 21, drop_last=True)


class _Exploding(_ItemOnly):
    def __getitem__(self, i):
        if i == 13:
            raise ImageLoadError("/data/x/13.png: cannot read image")
        return super().__getitem__(i)


def test_loader_propagates_errors_from_the_prefetch_thread_and_stops_it():
    before = threading.active_count()
    loader = DataLoader(_Exploding(40), 4, shuffle=False, prefetch=2)
    with pytest.raises(ImageLoadError, match="13.png"):
        for _ in loader:
            pass
    for _ in range(3):  # breaking early must not leak worker threads
        for _ in DataLoader(_ItemOnly(400), 4, prefetch=2):
            break
    assert threading.active_count() == before


# ------------------------------------------------------------------ image folders

def _save(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def _rand_rgb(rng, h, w):
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture()
def tree(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for cls, names in (("cat", ["a.png", "b.png"]), ("dog", ["c.png"]), ("ant", ["d.png", "e.png"])):
        for name in names:
            arr = _rand_rgb(rng, 40, 32)  # H=40, W=32
            _save(str(tmp_path / cls / name), arr)
            arrays[str(tmp_path / cls / name)] = arr
    return tmp_path, arrays


def test_image_folder_labels_follow_sorted_class_names(tree):
    root, arrays = tree
    ds = ImageFolder(root, 28, mode="eval")
    assert ds.classes == ["ant", "cat", "dog"]
    got = [(os.path.relpath(p, root), y) for p, y in ds.samples]
    assert got == [("ant/d.png", 0), ("ant/e.png", 0), ("cat/a.png", 1), ("cat/b.png", 1), ("dog/c.png", 2)]


def test_eval_view_is_resize_then_centre_crop(tree):
    root, arrays = tree
    # img_size 28 / crop_pct 0.875 = 32 = the shorter side already: the resize is the identity
    ds = ImageFolder(root, 28, mode="eval")
    for i, (path, label) in enumerate(ds.samples):
        img, y = ds[i]
        assert y == label and img.shape == (3, 28, 28) and img.dtype == np.float32
        top, left = round((40 - 28) / 2), round((32 - 28) / 2)
        ref = arrays[path][top:top + 28, left:left + 28].transpose(2, 0, 1) / 255.0
        np.testing.assert_allclose(img, ref, atol=1e-6)


def test_pretrain_view_is_the_centred_square_and_the_tokenizer_crop_matches(tree):
    root, arrays = tree
    ds = ImageFolder(root, 32, mode="pretrain", second_size=16, second_interpolation="box")
    assert ds.deterministic
    for i, (path, _) in enumerate(ds.samples):
        img, tok_img, _ = ds[i]
        square = arrays[path][4:36].astype(np.float64) / 255.0  # largest centred square of 40×32
        np.testing.assert_allclose(img, square.transpose(2, 0, 1), atol=1e-6)
        half = square.reshape(16, 2, 16, 2, 3).mean(axis=(1, 3)).transpose(2, 0, 1)  # box filter = 2×2 mean
        np.testing.assert_allclose(tok_img, half, atol=1 / 255 + 1e-6)
    ds.set_epoch(4)
    np.testing.assert_array_equal(ds[0][0], ImageFolder(root, 32, mode="pretrain")[0][0])


def test_finetune_view_is_seeded_per_sample_and_epoch(tree):
    root, arrays = tree
    a = ImageFolder(root, 24, mode="finetune", seed=5)
    b = ImageFolder(root, 24, mode="finetune", seed=5)
    assert not a.deterministic
    np.testing.assert_array_equal(a[2][0], b[2][0])
    b.set_epoch(1)
    assert not np.array_equal(a[2][0], b[2][0])
    # a full-image crop with certain flip is the mirrored image
    flip = ImageFolder(root, 32, mode="finetune", scale=(1, 1), ratio=(1, 1), hflip=1.0)
    path = flip.samples[0][0]
    np.testing.assert_allclose(flip[0][0], arrays[path][4:36, ::-1].transpose(2, 0, 1) / 255.0, atol=1e-6)


def test_random_resized_crop_params_stay_inside_and_respect_scale():
    rng = np.random.default_rng(0)
    fallbacks = 0
    for _ in range(300):
        h, w = int(rng.integers(20, 200)), int(rng.integers(20, 200))
        top, left, ch, cw = random_resized_crop_params(rng, h, w, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
        frac = ch * cw / (h * w)
        centred = (top, left) == ((h - ch) // 2, (w - cw) // 2)
        if not (0.06 <= frac <= 1.0):
            assert centred
            fallbacks += 1
    assert fallbacks < 30
    assert random_resized_crop_params(rng, 40, 32, (1, 1), (1, 1)) == (4, 0, 32, 32)


def test_bad_files_raise_naming_the_file_or_are_skipped_with_a_warning(tree):
    root, arrays = tree
    corrupt = root / "cat" / "broken.png"
    good = open(root / "cat" / "a.png", "rb").read()
    corrupt.write_bytes(good[: len(good) // 2])  # truncated PNG
    fake = root / "dog" / "notes.jpg"
    fake.write_text("this is not an image")
    (root / "dog" / "README.txt").write_text("labels by hand")
    with pytest.warns(UserWarning, match="README.txt"):
        ds = ImageFolder(root, 28)
    names = [os.path.basename(p) for p, _ in ds.samples]
    assert "broken.png" in names and "notes.jpg" in names and "README.txt" not in names
    with pytest.raises(ImageLoadError, match="broken.png"):
        ds[names.index("broken.png")]
    with pytest.raises(ImageLoadError, match="notes.jpg"):
        ds[names.index("notes.jpg")]
    with pytest.raises(ImageLoadError, match="broken.png"):  # also through the prefetching loader
        for _ in DataLoader(ds, 2, shuffle=False, prefetch=2):
            pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        skipping = ImageFolder(root, 28, on_error="skip")
    text = " ".join(str(w.message) for w in caught)
    assert "broken.png" in text and "notes.jpg" in text
    assert len(skipping) == 5
    for i, (path, label) in enumerate(skipping.samples):  # every remaining label is its folder's
        assert skipping.classes[label] == os.path.basename(os.path.dirname(path))
        assert skipping[i][1] == label


def test_empty_or_missing_folders_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolder(tmp_path / "nowhere", 32)
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolder(tmp_path, 32)
    _save(str(tmp_path / "a" / "x.png"), np.zeros((8, 8, 3), np.uint8))
    os.makedirs(tmp_path / "b")
    with pytest.raises(ValueError, match=r"class folder .*b contains no image"):
        ImageFolder(tmp_path, 32)


# ------------------------------------------------------------------ token caches

def test_token_cache_round_trip_dtype_and_loader(tmp_path):
    rng = np.random.default_rng(0)
    x, y = load_digits(16, "test")
    centroids = rng.standard_normal((512, 48)).astype(np.float32)
    tokens = rng.integers(0, 512, size=(len(x), 16))
    cache = TokenCache.write(tmp_path / "c", tokens, n_tokens=512, tokenizer=centroids, dataset="digits-test-16")
    assert cache.tokens.dtype == np.int16 and len(cache) == len(x)
    opened = TokenCache.open(tmp_path / "c", length=len(x), tokenizer=centroids, n_patches=16, n_tokens=512,
                             dataset="digits-test-16", verify=True)
    np.testing.assert_array_equal(opened.tokens, tokens)
    big = TokenCache.write(tmp_path / "big", np.array([[40000, 1]]), n_tokens=40001, tokenizer="t")
    assert big.tokens.dtype == np.int32 and big[0].tolist() == [40000, 1]
    assert TokenCache.write(tmp_path / "edge", np.array([[32766]]), n_tokens=32767, tokenizer="t").tokens.dtype == np.int16
    loader = DataLoader(opened.attach(ArrayDataset(x, y)), 32, seed=2, return_indices=True)
    for images, labels, toks, idx in loader:
        np.testing.assert_array_equal(toks, tokens[idx])
        np.testing.assert_array_equal(images, x[idx])


def test_token_cache_written_in_chunks_and_incomplete_caches(tmp_path):
    tokens = np.arange(60).reshape(10, 6) % 7
    w = TokenCache.create(tmp_path / "c", length=10, n_patches=6, n_tokens=7, tokenizer="pix")
    w.write(0, tokens[:4])
    with pytest.raises(TokenCacheError, match="tokenization did not finish"):
        TokenCache.open(tmp_path / "c")
    with pytest.raises(TokenCacheError, match="never written"):
        w.close()
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        w.write(4, tokens[4:] + 7)
    with pytest.raises(ValueError, match="outside"):
        w.write(8, tokens[4:])
    w.write(4, tokens[4:])
    np.testing.assert_array_equal(w.close().tokens, tokens)


def test_token_cache_mismatches_are_named(tmp_path):
    rng = np.random.default_rng(1)
    cents = rng.standard_normal((8, 4))
    TokenCache.write(tmp_path / "c", rng.integers(0, 8, (30, 4)), n_tokens=8, tokenizer=cents)
    manifest = str(tmp_path / "c" / "manifest.json")
    with pytest.raises(TokenCacheError, match=r"manifest.json: length mismatch .* 30, expected 31"):
        TokenCache.open(tmp_path / "c", length=31)
    other = cents.copy(); other[0, 0] += 1e-3
    with pytest.raises(TokenCacheError, match="tokenizer mismatch"):
        TokenCache.open(tmp_path / "c", tokenizer=other)
    assert tokenizer_fingerprint(cents) == tokenizer_fingerprint(cents.copy())
    with pytest.raises(TokenCacheError, match="n_patches mismatch"):
        TokenCache.open(tmp_path / "c", n_patches=16)
    with pytest.raises(TokenCacheError, match="has 30 samples but the dataset has 29|holds 30 samples"):
        TokenCache.open(tmp_path / "c").attach(_indexed_dataset(29))
    # the array file replaced by one of another shape
    np.save(tmp_path / "c" / "tokens.npy", np.zeros((30, 5), np.int16))
    with pytest.raises(TokenCacheError, match=r"tokens.npy: holds int16 \(30, 5\)"):
        TokenCache.open(tmp_path / "c")
    # same shape, different content: caught by verify
    np.save(tmp_path / "c" / "tokens.npy", np.zeros((30, 4), np.int16))
    TokenCache.open(tmp_path / "c")
    with pytest.raises(TokenCacheError, match="checksum"):
        TokenCache.open(tmp_path / "c", verify=True)
    with open(manifest, "w") as f:
        f.write("{not json")
    with pytest.raises(TokenCacheError, match="corrupt manifest"):
        TokenCache.open(tmp_path / "c")


def test_token_cache_refuses_a_random_view(tree, tmp_path):
    root, _ = tree
    ds = ImageFolder(root, 24, mode="finetune")
    cache = TokenCache.write(tmp_path / "c", np.zeros((len(ds), 4), int), n_tokens=3, tokenizer="t")
    with pytest.raises(ValueError, match="random"):
        cache.attach(ds)


def _ra_image(seed=0, h=24, w=20):
    from PIL import Image
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_rand_augment_point_ops_match_numpy_formulas():
    from mapet.data.transforms import rand_augment_op
    img = _ra_image()
    a = np.asarray(img).astype(np.int64)
    out = lambda name, m, s=1.0: np.asarray(rand_augment_op(img, name, m, s)).astype(np.int64)  # noqa: E731
    assert np.array_equal(out("Invert", 9), 255 - a)
    t = 256 - int(0.9 * 256)  # magnitude 9: threshold 26
    assert np.array_equal(out("SolarizeIncreasing", 9), np.where(a >= t, 255 - a, a))
    for m in (0, 5, 9, 10):  # magnitude 10 keeps 0 bits: black (a magnitude of 9 ± 0.5 is clipped to 10 at times)
        bits = 4 - int(m / 10 * 4)
        assert np.array_equal(out("PosterizeIncreasing", m), a & ~((1 << (8 - bits)) - 1)), m
    assert not out("PosterizeIncreasing", 10).any()
    add = int(0.9 * 110)
    assert np.array_equal(out("SolarizeAdd", 9), np.where(a < 128, np.minimum(a + add, 255), a))
    for sign in (1.0, -1.0):  # brightness: a blend with black by 1 ± 0.9·m/10, rounded, clipped
        f = 1 + sign * 0.9 * 0.9
        assert np.abs(out("BrightnessIncreasing", 9, sign) - np.clip(a * f, 0, 255)).max() <= 1
    assert np.array_equal(out("Rotate", 0), a)  # magnitude 0 leaves geometry alone


def test_rand_augment_never_fails_at_any_magnitude_or_sign():
    # every op at the clipped ends of the magnitude range (the recipe's N(9, 0.5) reaches 10)
    from mapet.data.transforms import RAND_AUGMENT_OPS, rand_augment_op
    img = _ra_image()
    for name in RAND_AUGMENT_OPS:
        for m in (0.0, 5.0, 10.0):
            for sign in (1.0, -1.0):
                out = rand_augment_op(img, name, m, sign)
                assert out.size == img.size and out.mode == "RGB", (name, m, sign)


def test_rand_augment_translate_moves_pixels_and_fills_with_the_mean():
    from mapet.data.transforms import rand_augment_op
    img = _ra_image(1, 20, 20)
    a = np.asarray(img)
    m = 10 * 5 / (0.45 * 20)  # a shift of exactly 5 pixels
    b = np.asarray(rand_augment_op(img, "TranslateXRel", m, 1.0))
    assert np.array_equal(b[:, :15], a[:, 5:]) and np.all(b[:, 15:] == (124, 116, 104))
    b = np.asarray(rand_augment_op(img, "TranslateYRel", m, -1.0))
    assert np.array_equal(b[5:], a[:15]) and np.all(b[:5] == (124, 116, 104))


def test_rand_augment_in_the_finetune_view_is_seeded_and_parsed(tree):
    from mapet.data.transforms import parse_randaugment
    root, _ = tree
    assert parse_randaugment("rand-m9-mstd0.5-inc1") == (2, 9.0, 0.5)
    assert parse_randaugment("rand-n3-m7") == (3, 7.0, 0.5)
    for bad in ("auto-m9", "rand-m11", "rand-q2", "rand-inc0"):
        with pytest.raises(ValueError, match="randaugment"):
            parse_randaugment(bad)
    with pytest.raises(ValueError, match="only meaningful with mode='finetune'"):
        ImageFolder(root, 16, mode="eval", randaugment="rand-m9")
    a = ImageFolder(root, 16, mode="finetune", seed=2, randaugment="rand-m9-mstd0.5-inc1")
    b = ImageFolder(root, 16, mode="finetune", seed=2, randaugment="rand-m9-mstd0.5-inc1")
    plain = ImageFolder(root, 16, mode="finetune", seed=2)
    assert not a.deterministic and "rand-m9" in a.view_id
    same = [np.array_equal(a[i][0], b[i][0]) for i in range(len(a))]
    assert all(same)
    assert any(not np.array_equal(a[i][0], plain[i][0]) for i in range(len(a)))
    a.set_epoch(1)
    assert any(not np.array_equal(a[i][0], b[i][0]) for i in range(len(a)))

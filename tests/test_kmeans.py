"""mapet.KMeans against NumPy float64 references: assignment, Lloyd steps, faiss-style splits."""
import logging

import numpy as np
import pytest

import mapet


def brute_force(x, c):
    """float64 squared distances [n, k]."""
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    return ((x64[:, None, :] - c64[None, :, :]) ** 2).sum(-1)


def blobs(n_per, centers, scale, rng):
    k, d = centers.shape
    x = np.concatenate([centers[j] + scale * rng.standard_normal((n_per, d)) for j in range(k)])
    y = np.repeat(np.arange(k), n_per)
    p = rng.permutation(len(y))
    return x[p].astype(np.float32), y[p]


def same_partition(a, b):
    """True when labels a and b define the same partition (up to renaming)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def numpy_lloyd(x, c, iters):
    """Plain float64 Lloyd (no empty clusters expected)."""
    c = c.astype(np.float64)
    objs = []
    for _ in range(iters):
        D = brute_force(x, c)
        a = D.argmin(1)
        objs.append(D[np.arange(len(a)), a].sum())
        assert np.bincount(a, minlength=len(c)).min() > 0
        c = np.stack([x[a == j].astype(np.float64).mean(0) for j in range(len(c))])
    return c, objs


def test_assignment_matches_brute_force():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 40)).astype(np.float32)      # not a multiple of the 256-row block
    c = rng.standard_normal((1500, 40)).astype(np.float32)      # more than one 1024-centroid chunk
    km = mapet.KMeans(1500)
    km.cluster_centers_ = c
    dist, labels = km.assign(x, chunk_size=300)
    D = brute_force(x, c)
    ref = D.argmin(1)
    srt = np.sort(D, 1)
    clear = (srt[:, 1] - srt[:, 0]) > 1e-4 * srt[:, 0]           # ties aside
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(labels[clear], ref[clear])
    np.testing.assert_allclose(dist, D[np.arange(len(x)), labels], rtol=1e-5)
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(km.predict(x), labels)


def test_lloyd_matches_numpy_reference_and_objective_never_increases():
    rng = np.random.default_rng(1)
    x, _ = blobs(150, rng.standard_normal((6, 12)) * 3, 1.0, rng)
    init = x[:6].copy()
    ref_c, ref_obj = numpy_lloyd(x, init, 8)
    km = mapet.KMeans(6, n_iter=8).fit(x, init_centroids=init)
    np.testing.assert_allclose(km.cluster_centers_, ref_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(km.obj, ref_obj, rtol=1e-5)
    obj = np.array(km.obj + [km.inertia_])
    assert np.all(np.diff(obj) <= 1e-6 * obj[:-1])
    assert len(km.history_) == km.n_iter_ == 8


def test_objective_never_increases_random_data_with_splits():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3000, 20)).astype(np.float32)
    km = mapet.KMeans(64, n_iter=15, seed=3).fit(x)
    obj = np.array(km.obj + [km.inertia_])
    assert np.all(np.diff(obj) <= 1e-6 * obj[:-1])
    D = brute_force(x, km.cluster_centers_)
    np.testing.assert_allclose(km.inertia_, D.min(1).sum(), rtol=1e-5)


@pytest.mark.bitwise
def test_bounds_give_the_plain_lloyd_result():
    rng = np.random.default_rng(4)
    x, _ = blobs(400, rng.standard_normal((40, 32)) * 2, 1.0, rng)
    a = mapet.KMeans(40, n_iter=12, seed=5, bounds=True).fit(x)
    b = mapet.KMeans(40, n_iter=12, seed=5, bounds=False).fit(x)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    assert a.obj == b.obj and a.inertia_ == b.inertia_
    searched = [h["searched"] for h in a.history_]
    n = len(a.labels_)                                         # the 256·k subsample
    assert searched[0] == n and min(searched[1:]) < n // 2     # the bounds skip work
    assert all(h["searched"] == n for h in b.history_)


@pytest.mark.bitwise
def test_yinyang_groups_give_the_plain_lloyd_result_and_float64_lloyd_labels():
    # k = 300 → 30 centroid groups: the group filter and its GEMM fallback both run. Blobs share
    # centroids (k < blobs) so points keep moving for several iterations.
    rng = np.random.default_rng(11)
    x, _ = blobs(12, rng.standard_normal((500, 48)) * 1.5, 1.0, rng)
    init = x[rng.choice(len(x), 300, replace=False)]
    a = mapet.KMeans(300, n_iter=16, bounds=True).fit(x, init_centroids=init)
    b = mapet.KMeans(300, n_iter=16, bounds=False).fit(x, init_centroids=init)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    assert a.obj == b.obj and a.inertia_ == b.inertia_
    searched = [h["searched"] for h in a.history_]
    assert searched[0] == len(x) and searched[-1] < len(x) // 4    # converged: the bounds prove every label
    # The final labels are the float64 arg-min at the final centroids (no near ties on this data).
    D = brute_force(x, a.cluster_centers_)
    top2 = np.sort(D, 1)[:, :2]
    clear = top2[:, 1] - top2[:, 0] > 1e-3 * top2[:, 0]
    assert clear.mean() > 0.99
    final = a.predict(x)
    np.testing.assert_array_equal(final[clear], D.argmin(1)[clear])


def test_empty_cluster_is_split_faiss_style():
    rng = np.random.default_rng(6)
    x, _ = blobs(50, np.array([[5.0, 0, 0, 0], [-5.0, 0, 0, 0], [0, 5.0, 0, 0]]), 0.5, rng)
    x = x + np.float32(1.0)                                   # no zero coordinates
    init = np.stack([x[0], x[0], x[1], x[2]])                 # centroids 0 and 1 coincide → 1 stays empty
    km = mapet.KMeans(4, n_iter=1).fit(x, init_centroids=init)
    assert km.history_[0]["splits"] == 1
    a = brute_force(x, init).argmin(1)                        # ties → lowest index, as the engine
    assert np.bincount(a, minlength=4)[1] == 0
    means = np.stack([x[a == j].astype(np.float64).mean(0) if (a == j).any() else np.zeros(4) for j in range(4)])
    eps = 1.0 / 1024
    sign = np.where(np.arange(4) % 2 == 0, 1.0, -1.0)
    c = km.cluster_centers_.astype(np.float64)
    donors = [j for j in (0, 2, 3)
              if np.allclose(c[1], means[j] * (1 + sign * eps), rtol=1e-6)
              and np.allclose(c[j], means[j] * (1 - sign * eps), rtol=1e-6)]
    assert len(donors) == 1
    for j in (0, 2, 3):
        if j != donors[0]:
            np.testing.assert_allclose(c[j], means[j], rtol=1e-6)


def test_duplicate_points_force_splits_and_every_cluster_ends_nonempty():
    rng = np.random.default_rng(7)
    x = np.repeat(rng.standard_normal((5, 8)).astype(np.float32), 40, axis=0) + 2
    x[:20] += 0.01 * rng.standard_normal((20, 8)).astype(np.float32)
    km = mapet.KMeans(12, n_iter=10, seed=1).fit(x)            # 12 clusters, ~5 distinct places
    assert sum(h["splits"] for h in km.history_) > 0
    assert np.isfinite(km.cluster_centers_).all()


def test_spherical_centroids_are_unit_norm():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2000, 24)).astype(np.float32) + 0.5
    km = mapet.KMeans(16, n_iter=8, spherical=True, seed=2).fit(x)
    np.testing.assert_allclose(np.linalg.norm(km.cluster_centers_, axis=1), 1.0, rtol=1e-5)
    # with unit centroids the L2 assignment is the inner-product arg-max
    ip = x.astype(np.float64) @ km.cluster_centers_.T.astype(np.float64)
    srt = np.sort(ip, 1)
    clear = srt[:, -1] - srt[:, -2] > 1e-4
    np.testing.assert_array_equal(km.predict(x)[clear], ip.argmax(1)[clear])


@pytest.mark.bitwise
@pytest.mark.parametrize("init", ["random", "k-means++"])
def test_same_seed_same_centroids_on_one_and_two_threads(init):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3000, 48)).astype(np.float32)
    before = mapet.get_num_threads()
    try:
        mapet.set_num_threads(1)
        a = mapet.KMeans(50, n_iter=6, seed=11, init=init).fit(x)
        mapet.set_num_threads(2)
        b = mapet.KMeans(50, n_iter=6, seed=11, init=init).fit(x)
    finally:
        mapet.set_num_threads(before)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    assert a.obj == b.obj
    c = mapet.KMeans(50, n_iter=6, seed=12, init=init).fit(x)
    assert not np.array_equal(a.cluster_centers_, c.cluster_centers_)


@pytest.mark.parametrize("init,n_redo", [("k-means++", 1), ("k-means++", 3)])
def test_well_separated_clusters_are_recovered(init, n_redo):
    # (random init merges two blobs often enough — 8 distinct picks out of 8 blobs has p ≈ 0.2% —
    # that plain Lloyd from it is no test of recovery; k-means++ spreads the seeds)
    rng = np.random.default_rng(10)
    centers = rng.standard_normal((8, 16)) * 20
    x, y = blobs(100, centers, 0.5, rng)
    km = mapet.KMeans(8, n_iter=10, init=init, n_redo=n_redo, seed=0).fit(x)
    assert same_partition(km.predict(x), y)


def test_n_redo_keeps_the_best_run():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((1500, 10)).astype(np.float32)
    one = mapet.KMeans(30, n_iter=5, n_redo=1, seed=4).fit(x)
    three = mapet.KMeans(30, n_iter=5, n_redo=3, seed=4).fit(x)
    assert three.inertia_ <= one.inertia_


def test_subsampling_logs_and_trains_on_the_cap(caplog):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((500, 6)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="mapet.kmeans"):
        km = mapet.KMeans(5, n_iter=3, max_points_per_centroid=20).fit(x)
    assert len(km.labels_) == 100
    assert any("sampling 100 of 500" in r.getMessage() for r in caplog.records)


def test_faiss_aliases():
    rng = np.random.default_rng(13)
    x = rng.standard_normal((400, 8)).astype(np.float32)
    km = mapet.KMeans(7, n_iter=4, seed=1)
    obj = km.train(x)
    assert obj == km.inertia_ and km.centroids is km.cluster_centers_ and len(km.obj) == 4
    D, I = km.assign(x)
    np.testing.assert_array_equal(I, km.predict(x))
    np.testing.assert_allclose(D.astype(np.float64).sum(), km.inertia_, rtol=1e-5)
    np.testing.assert_array_equal(mapet.KMeans(7, n_iter=4, seed=1).fit_predict(x), I)


def test_partial_fit_streams_memmap_chunks(tmp_path):
    rng = np.random.default_rng(14)
    centers = rng.standard_normal((6, 12)) * 20
    x, y = blobs(300, centers, 0.5, rng)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=x.shape)
    mm[:] = x
    mm.flush()
    km = mapet.KMeans(6, init="k-means++", seed=3)
    for lo in range(0, len(mm), 400):
        km.partial_fit(mm[lo:lo + 400])
    assert km.n_iter_ == 5
    labels = km.predict(mm)
    assert same_partition(labels, y)
    # each centroid is the mean of every point it received; with these separated blobs that is its blob
    for j in range(6):
        np.testing.assert_allclose(km.cluster_centers_[j], x[labels == j].astype(np.float64).mean(0), atol=1e-4)


def test_bad_inputs_raise_named_errors():
    rng = np.random.default_rng(15)
    x = rng.standard_normal((50, 4)).astype(np.float32)
    bad = x.copy()
    bad[17, 2] = np.nan
    with pytest.raises(ValueError, match="row 17.*NaN or Inf"):
        mapet.KMeans(3).fit(bad)
    bad[17, 2] = np.inf
    with pytest.raises(ValueError, match="row 17"):
        mapet.KMeans(3, max_points_per_centroid=1000).fit(bad)
    with pytest.raises(ValueError, match="at least 60 points, got 50"):
        mapet.KMeans(60).fit(x)
    with pytest.raises(ValueError, match="n_clusters: expected ≥ 1, got 0"):
        mapet.KMeans(0)
    with pytest.raises(TypeError, match="expected a float array"):
        mapet.KMeans(3).fit(x.astype(np.int64))
    with pytest.raises(ValueError, match="2-D"):
        mapet.KMeans(3).fit(x[0])
    with pytest.raises(ValueError, match="init"):
        mapet.KMeans(3, init="kmeans||")
    km = mapet.KMeans(3, n_iter=2).fit(x)
    with pytest.raises(ValueError, match="dimension d = 4.*shape \\(5, 5\\)"):
        km.predict(np.zeros((5, 5), np.float32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        km.predict(bad)
    with pytest.raises(RuntimeError, match="fit"):
        mapet.KMeans(3).predict(x)

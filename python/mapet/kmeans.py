"""k-means with scikit-learn's names and faiss's semantics, on mapet's Swift engine.

Semantics (ALGORITHMS.md §3, as faiss ``Clustering``): Lloyd iterations with squared L2. Each iteration
assigns every point to its nearest centroid, records the objective Σ‖x − c‖², moves each
centroid to the mean of its points, then re-seeds empty clusters by *splitting* a large one:
for each empty cluster e (in index order) clusters j = 0, 1, … are visited cyclically and j is
taken with probability (size_j − 1)/(n − k); c_e becomes a copy of c_j and the two are pushed
apart symmetrically by a relative ε = 1/1024 (even coordinates ×(1 ± ε), odd ones ×(1 ∓ ε)) and
j's points are shared half and half. ``spherical=True`` renormalises the centroids to unit norm
after every update (with unit centroids the L2 arg-min is the inner-product arg-max). At most
``max_points_per_centroid · n_clusters`` points are used for training (a uniform subsample,
logged); ``n_redo`` restarts keep the run with the lowest final objective.

Exactness and speed: the distance pass is a blocked GEMM (‖x‖² − 2x·c + ‖c‖²) fused with the
arg-min, so no n × k matrix is allocated; from the second iteration on, Yinyang bounds (Ding et
al. 2015: one lower bound per group of ~10 centroids) skip points that provably keep their centroid
and restrict the others to the groups that could hold a closer one; near ties go to the GEMM search,
so the labels are exactly those of plain Lloyd.
Results depend on ``seed`` only, never on ``mapet.set_num_threads``.

``partial_fit`` is mini-batch k-means (Sculley 2010): each chunk is assigned and every centroid
moves to the running mean of all points it has received (learning rate 1/count), for data
streamed from a NumPy memmap that does not fit in memory.
"""
import logging
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ._convert import f32, seed_bits
from ._native import _core
from .progress import bar as progress_bar

__all__ = ["KMeans"]

logger = logging.getLogger(__name__)

_INITS = {"random": 0, "k-means++": 1}
_CHUNK = 65536  # rows per predict/assign call: memory stays O(chunk · d) for inputs of any n


def _check_points(x: Any, name: str = "x", d: Optional[int] = None) -> Any:
    """x as a 2-D real array-like (not yet converted: memmaps stay lazy); raises on bad input."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    dt = np.dtype(x.dtype)
    if dt.kind != "f":
        raise TypeError(f"{name}: expected a float array (float16/32/64), got dtype {dt}")
    if len(x.shape) != 2:
        raise ValueError(f"{name}: expected a 2-D array [n, d], got shape {tuple(x.shape)}")
    if d is not None and x.shape[1] != d:
        raise ValueError(f"{name}: expected rows of dimension d = {d} (the fitted centroids'), got shape {tuple(x.shape)}")
    return x


class FaissAliases:
    """faiss's names for a fitted k-means (``cluster_centers_`` and ``history_`` set by ``fit``)."""

    cluster_centers_: Optional[np.ndarray]
    history_: List[Dict[str, float]]

    @property
    def centroids(self) -> Optional[np.ndarray]:
        """faiss alias of ``cluster_centers_``."""
        return self.cluster_centers_

    @property
    def obj(self) -> List[float]:
        """faiss: objective at each iteration's assignment."""
        return [h["objective"] for h in self.history_]


class KMeans(FaissAliases):
    """k-means clustering (Lloyd, squared L2), faiss semantics, scikit-learn and faiss names.

    Args:
        n_clusters: k, ≥ 1 (faiss ``k``).
        n_iter: Lloyd iterations (faiss ``niter``; scikit-learn's ``max_iter`` but always run in full).
        n_redo: restarts with independent initialisations; the lowest final objective wins.
        spherical: unit-norm centroids (inner-product k-means).
        init: ``"random"`` (k distinct points, as faiss) or ``"k-means++"``.
        max_points_per_centroid: training uses at most this many points per centroid
            (a uniform subsample when there are more; logged at INFO).
        seed: the only source of randomness (subsample, initialisation, splits).
        verbose: print one line per iteration (objective, seconds, splits, points searched).
        bounds: use Yinyang bounds to skip distance work that cannot change a label (same result).
        progress: a tqdm bar over the restarts of ``fit`` (objective in the postfix) and over the
            chunks of ``assign`` / ``predict`` beyond one chunk: None draws one in a terminal or
            notebook (not in CI, not on MPI ranks ≠ 0; see :mod:`mapet.progress`), True always,
            False never. The iterations of one restart run in a single engine call.

    Attributes (after ``fit``):
        cluster_centers_ / centroids: float32 [k, d].
        inertia_: Σ‖x − nearest centroid‖² over the training points at the final centroids.
        labels_: int32 labels of the training points (the subsample if one was drawn).
        n_iter_: iterations run. history_: one dict per iteration (objective, seconds, splits,
            searched). obj: the per-iteration objectives (faiss).

    Example:
        >>> import numpy as np, mapet
        >>> x = np.random.default_rng(0).standard_normal((1000, 16)).astype(np.float32)
        >>> km = mapet.KMeans(8, n_iter=10, seed=1).fit(x)
        >>> km.predict(x[:5]).dtype
        dtype('int32')
    """

    def __init__(self, n_clusters: int, n_iter: int = 20, n_redo: int = 1, spherical: bool = False,
                 init: str = "random", max_points_per_centroid: int = 256, seed: int = 0,
                 verbose: bool = False, bounds: bool = True, progress: Optional[bool] = None) -> None:
        if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)):
            raise TypeError(f"n_clusters: expected an int, got {type(n_clusters).__name__}")
        if n_clusters < 1:
            raise ValueError(f"n_clusters: expected ≥ 1, got {n_clusters}")
        if int(n_iter) < 0:
            raise ValueError(f"n_iter: expected ≥ 0, got {n_iter}")
        if int(n_redo) < 1:
            raise ValueError(f"n_redo: expected ≥ 1, got {n_redo}")
        if init not in _INITS:
            raise ValueError(f"init: expected 'random' or 'k-means++', got {init!r}")
        if int(max_points_per_centroid) < 1:
            raise ValueError(f"max_points_per_centroid: expected ≥ 1, got {max_points_per_centroid}")
        seed_bits(seed)
        self.n_clusters = int(n_clusters)
        self.n_iter = int(n_iter)
        self.n_redo = int(n_redo)
        self.spherical = bool(spherical)
        self.init = init
        self.max_points_per_centroid = int(max_points_per_centroid)
        self.seed = int(seed)
        self.verbose = bool(verbose)
        self.bounds = bool(bounds)
        self.progress = progress
        self.cluster_centers_: Optional[np.ndarray] = None
        self.inertia_: Optional[float] = None
        self.labels_: Optional[np.ndarray] = None
        self.n_iter_ = 0
        self.history_: List[Dict[str, float]] = []
        self._counts: Optional[np.ndarray] = None
        self._lock = threading.Lock()

    # ----- faiss names -----
    @property
    def k(self) -> int:
        return self.n_clusters

    @property
    def d(self) -> Optional[int]:
        return None if self.cluster_centers_ is None else int(self.cluster_centers_.shape[1])

    # ----- fitting -----
    def _training_set(self, x: Any) -> np.ndarray:
        n = x.shape[0]
        cap = self.max_points_per_centroid * self.n_clusters
        if n > cap:
            idx = np.sort(np.random.default_rng(self.seed).choice(n, size=cap, replace=False))
            logger.info("KMeans: sampling %d of %d points for training (max_points_per_centroid=%d × k=%d)",
                        cap, n, self.max_points_per_centroid, self.n_clusters)
            if self.verbose:
                print(f"KMeans: sampling {cap} of {n} points for training "
                      f"(max_points_per_centroid={self.max_points_per_centroid} × k={self.n_clusters})", flush=True)
            return f32(x[idx])
        return f32(x)

    def _run(self, x: np.ndarray, centroids: np.ndarray, init: int, stream: int) -> Tuple[float, np.ndarray, list]:
        labels = np.empty(x.shape[0], dtype=np.int32)
        inertia, hist = _core.kmeans_fit(x, centroids, labels, self.n_iter, self.spherical, init,
                                         seed_bits(self.seed), stream, self.bounds)
        return inertia, labels, hist

    def fit(self, x: Any, y: Any = None, init_centroids: Optional[np.ndarray] = None) -> "KMeans":
        """Cluster x [n, d] (float; memmaps are read only where sampled).

        Args:
            x: points, n ≥ n_clusters, finite.
            y: ignored (scikit-learn signature).
            init_centroids: optional float [k, d] starting centroids (faiss ``train(x, init_centroids)``);
                overrides ``init`` and makes ``n_redo`` > 1 pointless.

        Returns:
            self.

        Raises:
            TypeError: x is not a float array. ValueError: wrong shape, n < k, NaN/Inf rows.
        """
        x = _check_points(x)
        n, d = x.shape
        if n < self.n_clusters:
            raise ValueError(f"x: k-means into {self.n_clusters} clusters needs at least {self.n_clusters} points, got {n}")
        xt = self._training_set(x)
        best = None
        bar = progress_bar(self.n_redo, f"k-means {n}×{d} → {self.n_clusters}", unit="restart",
                           progress=self.progress)
        for r in range(self.n_redo):
            c = np.empty((self.n_clusters, d), dtype=np.float32)
            init = _INITS[self.init]
            if init_centroids is not None:
                given = _check_points(init_centroids, "init_centroids", d)
                if given.shape[0] != self.n_clusters:
                    raise ValueError(f"init_centroids: expected {self.n_clusters} rows [k, d], got shape {tuple(given.shape)}")
                c[...] = given
                init = 2
            t0 = time.perf_counter()
            inertia, labels, hist = self._run(xt, c, init, r)
            if self.verbose:
                for i, (o, s, sp, se) in enumerate(hist):
                    print(f"  redo {r} iter {i:3d}  objective {o:.6g}  {s:.3f} s  splits {sp}  searched {se}", flush=True)
                print(f"  redo {r}: final objective {inertia:.6g} in {time.perf_counter() - t0:.2f} s", flush=True)
            if best is None or inertia < best[0]:
                best = (inertia, c, labels, hist)
            if bar is not None:
                bar.set_postfix(objective=f"{inertia:.5g}", iters=self.n_iter)
                bar.update(1)
        if bar is not None:
            bar.close()
        inertia, c, labels, hist = best
        self.cluster_centers_ = c
        self.inertia_ = float(inertia)
        self.labels_ = labels
        self.n_iter_ = self.n_iter
        self.history_ = [dict(objective=o, seconds=s, splits=sp, searched=se) for o, s, sp, se in hist]
        self._counts = np.bincount(labels, minlength=self.n_clusters).astype(np.int64)
        return self

    def train(self, x: Any, init_centroids: Optional[np.ndarray] = None) -> float:
        """faiss alias: fit and return the final objective."""
        self.fit(x, init_centroids=init_centroids)
        return float(self.inertia_)

    def partial_fit(self, x: Any, y: Any = None) -> "KMeans":
        """One mini-batch step on a chunk (e.g. a slice of a memmap).

        The first call draws the initial centroids from the chunk (which then needs at least
        n_clusters rows); every call assigns the chunk and moves each centroid to the running
        mean of all points it has received. Clusters that receive no point stay where they are.

        Args:
            x: float [m, d] chunk.

        Returns:
            self (``history_`` gets the chunk's objective before the step).
        """
        x = _check_points(x, d=self.d)
        t0 = time.perf_counter()
        xc = f32(x)
        with self._lock:  # the step updates the centroids and counts in place
            return self._partial_fit(xc, t0)

    def _partial_fit(self, xc: np.ndarray, t0: float) -> "KMeans":
        if self.cluster_centers_ is None:
            if xc.shape[0] < self.n_clusters:
                raise ValueError(f"x: the first partial_fit chunk must hold at least n_clusters = "
                                 f"{self.n_clusters} rows to draw the initial centroids, got {xc.shape[0]}")
            c = np.empty((self.n_clusters, xc.shape[1]), dtype=np.float32)
            _core.kmeans_fit(xc, c, np.empty(xc.shape[0], np.int32), 0, self.spherical, _INITS[self.init],
                             seed_bits(self.seed), 0, False)
            self.cluster_centers_ = c
            self._counts = np.zeros(self.n_clusters, dtype=np.int64)
            self.history_ = []
            self.n_iter_ = 0
        labels = np.empty(xc.shape[0], dtype=np.int32)
        objective = _core.kmeans_minibatch_step(xc, self.cluster_centers_, self._counts, labels, self.spherical)
        self.history_.append(dict(objective=objective, seconds=time.perf_counter() - t0, splits=0,
                                  searched=xc.shape[0]))
        self.n_iter_ += 1
        self.labels_ = labels
        self.inertia_ = None
        return self

    # ----- assignment -----
    def _require_fitted(self) -> np.ndarray:
        if self.cluster_centers_ is None:
            raise RuntimeError("KMeans: call fit (or partial_fit) before predict/assign")
        return self.cluster_centers_

    def assign(self, x: Any, chunk_size: int = _CHUNK) -> Tuple[np.ndarray, np.ndarray]:
        """faiss-style search for the nearest centroid, streamed in chunks of rows.

        Args:
            x: float [n, d]; a memmap is read chunk by chunk (memory O(chunk_size · d)).
            chunk_size: rows per engine call.

        Returns:
            (distances float32 [n], labels int32 [n]): squared L2 to the nearest centroid, its index.
        """
        c = self._require_fitted()
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
            raise TypeError(f"chunk_size: expected an int, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size: expected an int ≥ 1, got {chunk_size}")
        x = _check_points(x, d=c.shape[1])
        n = x.shape[0]
        labels = np.empty(n, dtype=np.int32)
        dist = np.empty(n, dtype=np.float32)
        bar = progress_bar(n, f"k-means assign → {c.shape[0]}", unit="pt",
                           progress=self.progress) if n > chunk_size else None
        for lo in range(0, n, chunk_size):
            hi = min(n, lo + chunk_size)
            try:
                _core.kmeans_assign(f32(x[lo:hi]), c, labels[lo:hi], dist[lo:hi])
            except ValueError as e:
                raise ValueError(f"{e} (at row offset {lo})") from None
            if bar is not None:
                bar.update(hi - lo)
        if bar is not None:
            bar.close()
        return dist, labels

    def predict(self, x: Any) -> np.ndarray:
        """int32 [n] index of the nearest centroid of each row of x (squared L2)."""
        return self.assign(x)[1]

    def fit_predict(self, x: Any, y: Any = None) -> np.ndarray:
        """fit(x), then predict(x) (labels against the final centroids for every row of x)."""
        return self.fit(x).predict(x)

    def transform(self, x: Any) -> np.ndarray:
        """Squared distances [n] to the nearest centroid."""
        return self.assign(x)[0]

"""k-means over points sharded across MPI ranks (``mapet.distributed.KMeans``).

Each rank assigns its own points with the single-process search (``_core.kmeans_assign``); the
per-cluster sums, counts and objective are all-reduced in float64, and the end of every Lloyd
step (empty-cluster splits, spherical normalisation) and the random initial rows come from the
same Swift functions and generator stream as ``mapet.KMeans``, so the result equals the
single-process one on the concatenated data up to float summation order.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ._convert import seed_bits
from ._native import _core
from .distributed import Context, MismatchError, context
from .kmeans import FaissAliases

log = logging.getLogger(__name__)


def _assign_local(x: np.ndarray, centroids: np.ndarray, chunk: int = 16384) -> Tuple[np.ndarray, np.ndarray]:
    """(labels int32, squared distances float32) of the rows of x to their nearest centroid, by the
    single-process k-means search (``_core.kmeans_assign``), ``chunk`` rows per call."""
    n = x.shape[0]
    labels = np.empty(n, dtype=np.int32)
    dist = np.empty(n, dtype=np.float32)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        _core.kmeans_assign(x[lo:hi], centroids, labels[lo:hi], dist[lo:hi])
    return labels, dist


class KMeans(FaissAliases):
    """k-means over points sharded across ranks, with the single-process semantics.

    Each rank holds a shard of the points (the dataset is the concatenation of the shards in
    rank order). Per Lloyd iteration every rank assigns its points to the current centroids,
    accumulates per-cluster partial sums and counts in float64 and the partial objective; one
    ``Allreduce`` of [sums, counts, objective] gives every rank the same totals, hence the
    same new centroids. Empty clusters are split by faiss's rule with the same
    xoshiro256** stream (seed, redo index) as ``mapet.KMeans``; ``init="random"`` draws the
    same k global row indices as the single-process version and the owning ranks contribute
    the rows; the ``max_points_per_centroid`` subsample draws the same global indices; with
    ``n_redo`` the run with the lowest final objective wins. So with the same seed (and
    initial centroids) the result equals single-process k-means on the concatenated data up
    to float summation order. Alone (no MPI) it is plain Lloyd k-means.

    Args:
        n_clusters, n_iter, n_redo, spherical, max_points_per_centroid, seed, verbose: as
            ``mapet.KMeans``.
        init: ``"random"`` (k-means++ is sequential over all points; pass ``init_centroids``
            computed on a sample instead).
        ctx: the :class:`Context` (default: :func:`context`).

    Attributes (after ``fit``):
        cluster_centers_ / centroids: float32 [k, d], identical on every rank.
        inertia_: global Σ‖x − nearest centroid‖² at the final centroids.
        labels_: int32 labels of this rank's (training) points. history_, obj, n_iter_.

    Example:
        >>> # mpiexec -n 4 python script.py ; each rank loads its own shard
        >>> km = mapet.distributed.KMeans(1024, n_iter=20, seed=0).fit(my_shard)
        >>> tokens = km.predict(my_shard)
    """

    def __init__(self, n_clusters: int, n_iter: int = 20, n_redo: int = 1, spherical: bool = False,
                 init: str = "random", max_points_per_centroid: int = 256, seed: int = 0,
                 verbose: bool = False, ctx: Optional[Context] = None) -> None:
        if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)) or n_clusters < 1:
            raise ValueError(f"n_clusters: expected an int ≥ 1, got {n_clusters!r}")
        if int(n_iter) < 0 or int(n_redo) < 1 or int(max_points_per_centroid) < 1:
            raise ValueError(f"n_iter ≥ 0, n_redo ≥ 1, max_points_per_centroid ≥ 1 expected, got "
                             f"{n_iter}, {n_redo}, {max_points_per_centroid}")
        if init != "random":
            raise ValueError(f"init: distributed k-means supports 'random' or init_centroids, got {init!r}")
        self.n_clusters, self.n_iter, self.n_redo = int(n_clusters), int(n_iter), int(n_redo)
        self.spherical, self.init, self.seed = bool(spherical), init, int(seed)
        self.max_points_per_centroid, self.verbose = int(max_points_per_centroid), bool(verbose)
        self.ctx = ctx
        self.cluster_centers_: Optional[np.ndarray] = None
        self.inertia_: Optional[float] = None
        self.labels_: Optional[np.ndarray] = None
        self.n_iter_ = 0
        self.history_: List[Dict[str, float]] = []
        self.comm_seconds = 0.0  # time spent in collectives during the last fit

    def _allreduce(self, ctx: Context, buf: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        ctx.allreduce_(buf)
        self.comm_seconds += time.perf_counter() - t0
        return buf

    def fit(self, x: Any, y: Any = None, init_centroids: Optional[np.ndarray] = None) -> "KMeans":
        """Cluster the union of every rank's ``x`` (this rank's shard, float [n_r, d]).

        Args:
            x: this rank's points; shards may differ in size (even be empty) but not in d.
            y: ignored.
            init_centroids: optional float [k, d] starting centroids (rank 0's are used).

        Returns:
            self.
        """
        ctx = self.ctx or context()
        x = np.asarray(x)
        if x.ndim != 2 or x.dtype.kind != "f":
            raise ValueError(f"x: expected a 2-D float array [n, d], got {x.dtype} shape {x.shape}")
        k = self.n_clusters
        self.comm_seconds = 0.0
        shapes = ctx.allgather(tuple(x.shape))
        dims = {s[1] for s in shapes}
        if len(dims) != 1:
            raise MismatchError(f"x: ranks hold points of different dimensions: {shapes}")
        d = dims.pop()
        sizes = [s[0] for s in shapes]
        n = sum(sizes)
        if n < k:
            raise ValueError(f"x: k-means into {k} clusters needs at least {k} points over all ranks, got {n}")
        offset = sum(sizes[:ctx.rank])
        cap = self.max_points_per_centroid * k
        if n > cap:  # the same global subsample as the single-process version
            idx = np.sort(np.random.default_rng(self.seed).choice(n, size=cap, replace=False))
            mine = idx[(idx >= offset) & (idx < offset + x.shape[0])] - offset
            xt = np.ascontiguousarray(x[mine], dtype=np.float32)
            sizes = [int(np.sum((idx >= sum(sizes[:r])) & (idx < sum(sizes[:r + 1])))) for r in range(len(sizes))]
            n, offset = cap, sum(sizes[:ctx.rank])
            log.info("KMeans: sampling %d points for training (max_points_per_centroid=%d × k=%d)",
                     cap, self.max_points_per_centroid, k)
        else:
            xt = np.ascontiguousarray(x, dtype=np.float32)
        if not np.all(np.isfinite(xt)):
            raise ValueError(f"x: rank {ctx.rank} holds NaN or Inf values")
        best = None
        for redo in range(self.n_redo):
            # the single-process generator (seed, redo): the same global rows, the same split draws
            # (given centroids: no rows drawn, the generator stays fresh for the split draws)
            rng = np.zeros(4, dtype=np.int64)
            rows = np.empty(0 if init_centroids is not None else k, dtype=np.int64)
            _core.kmeans_random_rows(n, rows, seed_bits(self.seed), redo, rng)
            c = np.zeros((k, d), dtype=np.float32)
            if init_centroids is not None:
                c[...] = np.asarray(init_centroids, dtype=np.float32).reshape(k, d)
                ctx.broadcast_(c, root=0)
            else:
                mine = (rows >= offset) & (rows < offset + xt.shape[0])
                c[mine] = xt[rows[mine] - offset]
                self._allreduce(ctx, c)  # each row is non-zero on its owner only: the sum is exact
            if self.spherical:
                nrm = np.sqrt(np.einsum("kd,kd->k", c, c)).astype(np.float32)
                c[nrm > 0] *= (np.float32(1) / nrm[nrm > 0])[:, None]
            history: List[Dict[str, float]] = []
            buf = np.empty(k * d + k + 1, dtype=np.float64)
            for _ in range(self.n_iter):
                t0 = time.perf_counter()
                labels, dist = _assign_local(xt, c)
                counts = np.bincount(labels, minlength=k)
                buf[:k * d] = 0
                sums = buf[:k * d].reshape(k, d)
                if xt.shape[0]:
                    order = np.argsort(labels, kind="stable")
                    present = np.flatnonzero(counts)
                    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[present]
                    sums[present] = np.add.reduceat(xt[order].astype(np.float64), starts, axis=0)
                buf[k * d:k * d + k] = counts
                buf[-1] = float(np.sum(dist, dtype=np.float64))
                self._allreduce(ctx, buf)
                total = np.rint(buf[k * d:k * d + k]).astype(np.int64)
                present = np.flatnonzero(total)
                c[present] = (sums[present] * (1.0 / total[present])[:, None]).astype(np.float32)
                splits = _core.kmeans_finish_step(c, total, n, self.spherical, rng)
                history.append(dict(objective=float(buf[-1]), seconds=time.perf_counter() - t0,
                                    splits=splits, searched=n))
                if self.verbose and ctx.is_main:
                    print(f"  redo {redo} iter {len(history) - 1:3d}  objective {buf[-1]:.6g}  splits {splits}",
                          flush=True)
            labels, dist = _assign_local(xt, c)
            inertia = ctx.sum(float(np.sum(dist, dtype=np.float64)))
            if best is None or inertia < best[0]:
                best = (inertia, c, labels, history)
        inertia, c, labels, history = best
        self.cluster_centers_, self.inertia_, self.labels_ = c, float(inertia), labels
        self.history_, self.n_iter_ = history, self.n_iter
        return self

    def train(self, x: Any, init_centroids: Optional[np.ndarray] = None) -> float:
        """faiss alias: fit and return the final objective."""
        return float(self.fit(x, init_centroids=init_centroids).inertia_)

    def assign(self, x: Any) -> Tuple[np.ndarray, np.ndarray]:
        """(squared distances float32 [n], labels int32 [n]) of this rank's rows (no communication)."""
        if self.cluster_centers_ is None:
            raise RuntimeError("KMeans: call fit before predict/assign")
        labels, dist = _assign_local(np.ascontiguousarray(x, dtype=np.float32), self.cluster_centers_)
        return dist, labels

    def predict(self, x: Any) -> np.ndarray:
        """int32 index of the nearest centroid of each of this rank's rows."""
        return self.assign(x)[1]



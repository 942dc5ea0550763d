"""Data-parallel training and distributed k-means on MPI (mpi4py), optional.

A single process never imports MPI. Under ``mpiexec -n N python -m mapet ...`` (or any script
calling :func:`init`), rank and world size come from ``mpi4py``:

* at the start of a training run the ranks compare a fingerprint of the run's configuration,
  the mapet version and the extension binary (a mismatch raises :class:`MismatchError` on
  every rank), parameters are broadcast from rank 0 and checked bitwise equal (CRC32);
* each rank reads its own shard of the data (:meth:`mapet.data.DataLoader.shard`): the epoch's
  seeded permutation is cut into global batches of ``world × batch_size`` and every global
  batch is dealt to the ranks in contiguous parts, so every sample is seen once per epoch,
  the global batch equals the single-process batch of size ``world × batch_size``, and every
  rank runs the same number of steps (a rank whose part of the last batch is empty runs a
  zero-sample micro-batch that contributes nothing);
* gradients are averaged in place on the model's one contiguous gradient block
  (``Allreduce`` with ``IN_PLACE``), weighted by each rank's sample count, which gives exactly
  the gradient of one process on the combined batch;
* only rank 0 logs, writes checkpoints, plots and prints; every rank resumes from the same
  checkpoint file (shared file system) and the ranks check that they resumed the same state;
* an uncaught exception on any rank prints ``mapet: rank R of N failed: ...`` and calls
  ``MPI_Abort``, so the job ends with a non-zero status instead of hanging in a collective.

Why gradients are all-reduced after backward and not in buckets during it: overlapping needs
hooks in the Swift backward and pays only when communication is a noticeable share of a step
and a core is free to drive it. ``bench/distributed.py`` measured on this 2-core machine
(2 ranks × 1 thread, ViT-Tiny/16 at 224 px, 8 images per rank, 5.7 M parameters): the one
23 MB ``Allreduce`` took 27–89 ms (median 47 ms) of a 1.6–2.1 s step (median 1.9 s), i.e.
about 2.5 % (shared-memory transport). Perfect overlap could hide at most that 2.5 %, and both
cores are busy with backward anyway, so it is not done. On a cluster with a slow network the
share grows (23 MB per step at 10 Gb/s ≈ 20–40 ms with a ring); bucketed overlap is the next
step then.

Install the optional MPI stack from PyPI (no system packages): ``pip install "mapet[mpi]"``
brings ``mpi4py`` and the ``mpich`` wheel with its ``mpiexec``.

Example:
    mpiexec -n 2 python -m mapet finetune -o runs/ft --threads 1
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)

_LAUNCH_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALRANKID", "HYDRA_CONTROL_FD",
                "PMIX_RANK")


def launched_by_mpi() -> bool:
    """True when this process was started by ``mpiexec``/``mpirun`` (judged from the environment)."""
    return any(v in os.environ for v in _LAUNCH_VARS)


class MismatchError(RuntimeError):
    """Ranks disagree (config, code version, resumed state, parameters); raised on every rank."""

    collective = True


@dataclass
class Context:
    """Who this process is: ``rank`` of ``world_size``, and the communicator (None alone)."""

    rank: int = 0
    world_size: int = 1
    comm: Any = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, writes checkpoints and plots."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one rank."""
        return self.world_size > 1

    # -------------------------------------------------------------- collectives

    def allreduce_(self, array: np.ndarray) -> np.ndarray:
        """Sum ``array`` over ranks, in place (``MPI.IN_PLACE``); a no-op alone."""
        if self.comm is not None and self.world_size > 1:
            from mpi4py import MPI
            if not array.flags.c_contiguous:
                raise ValueError("allreduce_: array must be C-contiguous")
            self.comm.Allreduce(MPI.IN_PLACE, array, op=MPI.SUM)
        return array

    def broadcast_(self, array: np.ndarray, root: int = 0) -> np.ndarray:
        """Overwrite ``array`` on every rank with rank ``root``'s values, in place."""
        if self.comm is not None and self.world_size > 1:
            self.comm.Bcast(array, root=root)
        return array

    def allgather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if self.comm is not None and self.world_size > 1:
            return self.comm.allgather(obj)
        return [obj]

    def sum(self, value: float) -> float:
        """Sum of a scalar over ranks."""
        if self.comm is not None and self.world_size > 1:
            return float(self.comm.allreduce(float(value)))
        return float(value)

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.comm is not None and self.world_size > 1:
            self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (``MPI_Abort``)."""
        if self.comm is not None:
            self.comm.Abort(code)
        os._exit(code)


_context: Optional[Context] = None


def init(comm: Any = None, abort_on_error: bool = True, threads: Optional[int] = None) -> Context:
    """Set up the process group once and return this process's :class:`Context`.

    Args:
        comm: an ``mpi4py`` communicator; default ``MPI.COMM_WORLD`` when launched by mpiexec,
            otherwise a single-process context that never imports MPI.
        abort_on_error: install an exception hook so that an uncaught exception on any rank
            prints ``mapet: rank R of N failed: ...`` and aborts the whole job (no silent hang
            of the ranks waiting for it in a collective).
        threads: mapet worker threads for this rank; default (under MPI) the machine's cores
            divided by the ranks on this node, so N ranks on one machine do not oversubscribe
            it. ``--threads`` / ``mapet.set_num_threads`` afterwards override it.

    Returns:
        The context (also returned by later calls).

    Example:
        >>> ctx = mapet.distributed.init()      # under mpiexec: rank/world from MPI
        >>> ctx.rank, ctx.world_size
    """
    global _context
    if _context is not None and comm is None:
        return _context
    if comm is None and not launched_by_mpi():
        _context = Context()
        return _context
    from mpi4py import MPI
    if comm is None:
        comm = MPI.COMM_WORLD
    _context = Context(rank=comm.Get_rank(), world_size=comm.Get_size(), comm=comm)
    if _context.world_size > 1:
        if abort_on_error:
            _install_abort_hook(_context)
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        per_node = local.Get_size()
        local.Free()
        from ._runtime import set_num_threads
        set_num_threads(threads or max(1, (os.cpu_count() or 1) // per_node))
    if not _context.is_main:
        logging.getLogger("mapet").setLevel(logging.WARNING)
    return _context


def context() -> Context:
    """The current context (single-process until :func:`init` runs under mpiexec)."""
    return _context if _context is not None else init()


def _install_abort_hook(ctx: Context) -> None:
    previous = sys.excepthook

    def hook(kind, value, tb):
        try:
            # The one-line verdict first, then the traceback; both flushed, then a short pause:
            # MPI_Abort tears the launcher's output forwarding down, and text still in flight
            # would be lost.
            sys.stderr.write(f"mapet: rank {ctx.rank} of {ctx.world_size} failed: {kind.__name__}: {value}; "
                             "aborting the job\n")
            sys.stderr.flush()
            previous(kind, value, tb)
            sys.stderr.flush()
            if getattr(value, "collective", False):
                # raised on every rank at once: let every rank print its message first
                ctx.barrier()
            time.sleep(0.5)
        finally:
            ctx.abort(1)

    sys.excepthook = hook


# ------------------------------------------------------------------ consistency checks

def fingerprint(config: Any) -> str:
    """A short hash of a JSON-able config plus the mapet version and extension binary."""
    from . import __version__
    from ._native import _core
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(__version__.encode())
    with open(_core.__file__, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:16]


def check_same_everywhere(ctx: Context, config: Any, what: str = "model config or mapet build") -> None:
    """Raise :class:`MismatchError` on every rank if ranks run different configs or code versions."""
    prints = ctx.allgather(fingerprint(config))
    if len(set(prints)) > 1:
        detail = ", ".join(f"rank {r}: {p}" for r, p in enumerate(prints))
        raise MismatchError(f"ranks disagree on {what} ({detail})")


def checksum(array: np.ndarray) -> int:
    """CRC32 of the bytes of ``array`` (bitwise equality check across ranks)."""
    return zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B"))


def check_equal(ctx: Context, name: str, *arrays: np.ndarray) -> None:
    """Raise :class:`MismatchError` on every rank unless ``arrays`` are bitwise equal everywhere."""
    sums = ctx.allgather([checksum(a) for a in arrays])
    if any(s != sums[0] for s in sums):
        raise MismatchError(f"{name} differ across ranks (CRC32 per rank: {sums})")


def broadcast_parameters(ctx: Context, flat_params: np.ndarray) -> None:
    """Copy rank 0's parameters to every rank in place, then verify bitwise equality."""
    ctx.broadcast_(flat_params, root=0)
    check_equal(ctx, "parameters after broadcast", flat_params)


def average_gradients(ctx: Context, flat_grads: np.ndarray, local_count: int,
                      total: Optional[int] = None) -> int:
    """Turn per-rank mean gradients into the mean over the global batch, in place.

    Each rank's gradient is the mean over its ``local_count`` samples (zero when it has
    none); scaling by the count, summing over ranks (``Allreduce`` IN_PLACE on the one
    contiguous block) and dividing by the global count gives the gradient of one process on
    the combined batch, also when ranks hold different numbers of samples.

    Args:
        ctx: the context.
        flat_grads: the model's contiguous float32 gradient block.
        local_count: samples behind this rank's gradient.
        total: the global count when already known (saves one collective).

    Returns:
        The global sample count.
    """
    if not ctx.distributed:
        return local_count
    if total is None:
        total = int(round(ctx.sum(local_count)))
    if total == 0:
        flat_grads[...] = 0
        return 0
    if local_count != 1:
        flat_grads *= np.float32(local_count)
    ctx.allreduce_(flat_grads)
    flat_grads *= np.float32(1.0 / total)
    return total


def shard_batches(order: np.ndarray, batch_size: int, rank: int, world_size: int,
                  drop_last: bool = False) -> List[np.ndarray]:
    """This rank's micro-batches of one epoch.

    ``order`` (the epoch's permutation) is cut into global batches of ``world_size ×
    batch_size``; global batch g goes to the ranks in contiguous near-equal parts (rank r
    gets part r of ``np.array_split``). Every rank gets the same number of batches; some may
    be empty in the last, short global batch.
    """
    g = batch_size * world_size
    n = len(order)
    count = n // g if drop_last else -(-n // g)
    return [np.array_split(order[b * g:(b + 1) * g], world_size)[rank] for b in range(count)]


def shard_indices(n: int, ctx: Context, epoch: int, seed: int = 0, shuffle: bool = True) -> np.ndarray:
    """This rank's sample indices for ``epoch``: a seeded permutation of ``range(n)`` dealt
    round-robin, so every sample is seen exactly once per epoch across ranks."""
    order = np.arange(n)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[ctx.rank::ctx.world_size]


def contiguous_shard(n: int, ctx: Optional[Context] = None) -> slice:
    """Rows of ``range(n)`` this rank owns when n items are split contiguously (evaluation,
    tokenizing): rank r gets part r of ``np.array_split``."""
    ctx = ctx or context()
    base, extra = divmod(n, ctx.world_size)
    lo = ctx.rank * base + min(ctx.rank, extra)
    return slice(lo, lo + base + (1 if ctx.rank < extra else 0))


# ------------------------------------------------------------------ k-means

_MASK = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


class _Xoshiro:
    """xoshiro256** seeded as mapet's Swift ``Xoshiro256StarStar(seed:stream:)`` (SplitMix64
    outputs 4s..4s+3), with its documented derived draws; a handful of draws per iteration."""

    def __init__(self, seed: int, stream: int):
        state = (seed + ((stream * 4) & _MASK) * _GAMMA) & _MASK
        words = []
        for _ in range(4):
            state = (state + _GAMMA) & _MASK
            z = state
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
            words.append(z ^ (z >> 31))
        self.s = words

    @staticmethod
    def _rotl(x: int, k: int) -> int:
        return ((x << k) | (x >> (64 - k))) & _MASK

    def next(self) -> int:
        s0, s1, s2, s3 = self.s
        result = (self._rotl((s1 * 5) & _MASK, 7) * 9) & _MASK
        t = (s1 << 17) & _MASK
        s2 ^= s0
        s3 ^= s1
        s1 ^= s2
        s0 ^= s3
        s2 ^= t
        s3 = self._rotl(s3, 45)
        self.s = [s0, s1, s2, s3]
        return result

    def below(self, n: int) -> int:
        m = self.next() * n
        if (m & _MASK) < n:
            threshold = ((1 << 64) - n) % n
            while (m & _MASK) < threshold:
                m = self.next() * n
        return m >> 64

    def uniform(self) -> float:
        return (self.next() >> 11) * 2.0 ** -53


def _seed_bits(seed: int) -> int:
    return int(seed) & _MASK


def _assign_local(x: np.ndarray, centroids: np.ndarray, chunk: int = 16384) -> Tuple[np.ndarray, np.ndarray]:
    """(labels int32, squared distances float32) of the rows of x to their nearest centroid.

    Uses the single-process k-means kernel ``_core.kmeans_assign`` (the same search as
    ``mapet.KMeans``) when this build has it, otherwise a blocked GEMM through
    :func:`mapet.ops.matmul`: ‖x‖² − 2x·c + ‖c‖², arg-min per row."""
    from ._native import _core
    n = x.shape[0]
    labels = np.empty(n, dtype=np.int32)
    dist = np.empty(n, dtype=np.float32)
    if hasattr(_core, "kmeans_assign"):
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            _core.kmeans_assign(x[lo:hi], centroids, labels[lo:hi], dist[lo:hi])
        return labels, dist
    from .ops import matmul
    cn = np.einsum("kd,kd->k", centroids, centroids)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        xb = x[lo:hi]
        d2 = matmul(xb, centroids, trans_b=True)
        d2 *= -2
        d2 += cn
        lab = np.argmin(d2, axis=1)
        labels[lo:hi] = lab
        best = d2[np.arange(hi - lo), lab] + np.einsum("nd,nd->n", xb, xb)
        dist[lo:hi] = np.maximum(best, 0)
    return labels, dist


def _normalize_rows(c: np.ndarray) -> None:
    nrm = np.sqrt(np.einsum("kd,kd->k", c, c)).astype(np.float32)
    ok = nrm > 0
    c[ok] *= (np.float32(1) / nrm[ok])[:, None]


def _split_empty(c: np.ndarray, sizes: np.ndarray, n: int, rng: _Xoshiro) -> int:
    """faiss's empty-cluster rule, as the single-process k-means: for each empty cluster e in
    index order walk j = 0, 1, … cyclically, take j when a uniform draw < (size_j − 1)/(n − k),
    copy c_j into c_e and push the two apart by ε = 1/1024 (even coordinates c_e·(1+ε),
    c_j·(1−ε), odd ones the reverse); size_e = size_j // 2, size_j −= size_e."""
    k = c.shape[0]
    eps = np.float32(1.0 / 1024)
    up, down = np.float32(1) + eps, np.float32(1) - eps
    denom = float(max(n - k, 1))
    splits = 0
    for e in range(k):
        if sizes[e] != 0:
            continue
        j = 0
        while True:
            if rng.uniform() < (sizes[j] - 1) / denom:
                break
            j = (j + 1) % k
        v = c[j].copy()
        c[e, 0::2], c[j, 0::2] = v[0::2] * up, v[0::2] * down
        c[e, 1::2], c[j, 1::2] = v[1::2] * down, v[1::2] * up
        sizes[e] = sizes[j] // 2
        sizes[j] -= sizes[e]
        splits += 1
    return splits


class KMeans:
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

    @property
    def centroids(self) -> Optional[np.ndarray]:
        """faiss alias of ``cluster_centers_``."""
        return self.cluster_centers_

    @property
    def obj(self) -> List[float]:
        """Objective at each iteration's assignment (faiss)."""
        return [h["objective"] for h in self.history_]

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
            rng = _Xoshiro(_seed_bits(self.seed), redo)
            c = np.zeros((k, d), dtype=np.float32)
            if init_centroids is not None:
                c[...] = np.asarray(init_centroids, dtype=np.float32).reshape(k, d)
                ctx.broadcast_(c, root=0)
            else:
                # partial Fisher–Yates over the global indices, as the single-process init
                perm: Dict[int, int] = {}
                for i in range(k):
                    j = i + rng.below(n - i)
                    perm[i], perm[j] = perm.get(j, j), perm.get(i, i)
                    g = perm[i] - offset
                    if 0 <= g < xt.shape[0]:
                        c[i] = xt[g]
                self._allreduce(ctx, c)  # each row is non-zero on its owner only: the sum is exact
            if self.spherical:
                _normalize_rows(c)
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
                splits = _split_empty(c, total, n, rng)
                if self.spherical:
                    _normalize_rows(c)
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


# ------------------------------------------------------------------ tokenizing across ranks

def tokenize_to_cache(tokenizer: Any, images: np.ndarray, directory: str, ctx: Optional[Context] = None,
                      batch_size: int = 256, dataset: Optional[str] = None,
                      grid: Optional[Sequence[int]] = None):
    """Tokenize a dataset spread over ranks into one token cache: every rank encodes its
    contiguous share of the rows into its own shard file ``tokens-RRRRR-of-WWWWW.npy``, then
    rank 0 writes the one manifest that lists the shards (written last, atomically).

    Args:
        tokenizer: a fitted tokenizer with ``encode`` and ``n_tokens`` (e.g. PixelTokenizer); every
            rank must hold the same one (fit with the same seed, or load the same file).
        images: the whole dataset as seen by every rank (an array or a memmap; each rank reads only
            its rows).
        directory: the cache directory (on a file system all ranks see).
        batch_size: images encoded per call.

    Returns:
        The opened ``TokenCache`` (on every rank).
    """
    from .data.token_cache import MANIFEST, TokenCache, _FORMAT, _VERSION, _sha256_file, tokenizer_fingerprint
    from .io import atomic_write

    ctx = ctx or context()
    n = len(images)
    lo, hi = n * ctx.rank // ctx.world_size, n * (ctx.rank + 1) // ctx.world_size
    dtype = np.dtype(np.int16 if tokenizer.n_tokens <= np.iinfo(np.int16).max else np.int32)
    parts = [np.asarray(tokenizer.encode(images[i:min(i + batch_size, hi)])) for i in range(lo, hi, batch_size)]
    n_patches = int(parts[0].shape[1]) if parts else 0
    mine = np.concatenate(parts).astype(dtype) if parts else np.zeros((0, n_patches), dtype)
    name = f"tokens-{ctx.rank:05d}-of-{ctx.world_size:05d}.npy"
    os.makedirs(directory, exist_ok=True)
    if ctx.is_main and os.path.exists(os.path.join(directory, MANIFEST)):
        os.unlink(os.path.join(directory, MANIFEST))  # not a valid cache until the new manifest lands
    atomic_write(os.path.join(directory, name), lambda f: np.save(f, mine, allow_pickle=False))
    shards = ctx.allgather({"file": name, "start": lo, "stop": hi, "n_patches": int(mine.shape[1]),
                            "sha256": _sha256_file(os.path.join(directory, name))})
    if ctx.is_main:
        n_patches = max(s.pop("n_patches") for s in shards)
        manifest = {"format": _FORMAT, "version": _VERSION, "complete": True, "length": n,
                    "n_patches": n_patches, "grid": list(grid) if grid is not None else None,
                    "n_tokens": int(tokenizer.n_tokens), "dtype": dtype.name,
                    "tokenizer": tokenizer_fingerprint(tokenizer), "dataset": dataset, "shards": shards}
        blob = json.dumps(manifest, indent=2).encode()
        atomic_write(os.path.join(directory, MANIFEST), lambda f: f.write(blob))
    ctx.barrier()
    return TokenCache.open(directory)

"""Communication for data-parallel runs on MPI (mpi4py), optional: the process group, consistency
checks, gradient averaging. Sharding rules live in :mod:`mapet.data.sharding`, the sharded token-cache
writer in :meth:`mapet.data.TokenCache.write_sharded`, k-means over ranks in :mod:`mapet.distributed_kmeans`
(``mapet.distributed.KMeans``).

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
from typing import Any, List, Optional, Sequence

import numpy as np

from .data.sharding import contiguous_part, shard_batches  # noqa: F401  (shard_batches: public name)

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


def contiguous_shard(n: int, ctx: Optional[Context] = None) -> slice:
    """Rows of ``range(n)`` this rank owns when n items are split contiguously (evaluation,
    tokenizing): :func:`mapet.data.sharding.contiguous_part` of this rank."""
    ctx = ctx or context()
    return contiguous_part(n, ctx.rank, ctx.world_size)


def tokenize_to_cache(tokenizer: Any, images: np.ndarray, directory: str, ctx: Optional[Context] = None,
                      batch_size: int = 256, dataset: Optional[str] = None, grid: Optional[Sequence[int]] = None):
    """Tokenize a dataset spread over ranks into one token cache: see
    :meth:`mapet.data.TokenCache.write_sharded` (this name is kept for existing scripts)."""
    from .data.token_cache import TokenCache
    return TokenCache.write_sharded(tokenizer, images, directory, ctx=ctx or context(), batch_size=batch_size,
                                    dataset=dataset, grid=grid)


def __getattr__(name: str) -> Any:
    # distributed k-means lives in its own module (it needs the engine, this one only MPI)
    if name == "KMeans":
        from .distributed_kmeans import KMeans
        return KMeans
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

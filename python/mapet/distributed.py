"""Data-parallel training and distributed k-means on MPI (mpi4py), optional.

A single process never imports MPI. Under ``mpiexec -n N python -m mapet ...`` (or any script
calling :func:`init`), ranks and world size come from ``mpi4py``; parameters are broadcast
from rank 0 and checked equal on every rank; each rank reads its own shard of the data;
gradients are averaged in place on the model's one contiguous gradient block; only rank 0
logs, writes checkpoints and plots.

Install the optional MPI stack from PyPI (no system packages): ``pip install "mapet[mpi]"``
brings ``mpi4py`` and the ``mpich`` wheel with its ``mpiexec``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

_LAUNCH_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALRANKID", "HYDRA_CONTROL_FD",
                "PMIX_RANK")


def launched_by_mpi() -> bool:
    """True when this process was started by ``mpiexec``/``mpirun`` (judged from the environment)."""
    return any(v in os.environ for v in _LAUNCH_VARS)


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
        if self.comm is not None and self.world_size > 1:
            self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (``MPI_Abort``)."""
        if self.comm is not None:
            self.comm.Abort(code)
        os._exit(code)


_context: Optional[Context] = None


def init(comm: Any = None, abort_on_error: bool = True) -> Context:
    """Set up the process group once and return this process's :class:`Context`.

    Args:
        comm: an ``mpi4py`` communicator; default ``MPI.COMM_WORLD`` when launched by mpiexec,
            otherwise a single-process context that never imports MPI.
        abort_on_error: install an exception hook so that an uncaught exception on any rank
            prints ``mapet: rank R failed: ...`` and aborts the whole job (no silent hang of
            the ranks waiting for it in a collective).

    Returns:
        The context (also returned by later calls).
    """
    global _context
    if _context is not None and comm is None:
        return _context
    if comm is None and not launched_by_mpi():
        _context = Context()
        return _context
    if comm is None:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    _context = Context(rank=comm.Get_rank(), world_size=comm.Get_size(), comm=comm)
    if abort_on_error and _context.world_size > 1:
        _install_abort_hook(_context)
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
            previous(kind, value, tb)
            sys.stderr.write(f"mapet: rank {ctx.rank} of {ctx.world_size} failed: {kind.__name__}: {value}; "
                             "aborting the job\n")
            sys.stderr.flush()
        finally:
            ctx.abort(1)

    sys.excepthook = hook


# ------------------------------------------------------------------ consistency checks

def fingerprint(config: Any) -> str:
    """A short hash of a JSON-able config plus the mapet version and extension binary."""
    from . import __version__, _core
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(__version__.encode())
    with open(_core.__file__, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:16]


def check_same_everywhere(ctx: Context, config: Any) -> None:
    """Raise on every rank if ranks run different configs or code versions."""
    prints = ctx.allgather(fingerprint(config))
    if len(set(prints)) > 1:
        detail = ", ".join(f"rank {r}: {p}" for r, p in enumerate(prints))
        raise RuntimeError(f"ranks disagree on model config or mapet build ({detail})")


def checksum(array: np.ndarray) -> int:
    """CRC32 of the bytes of ``array`` (bitwise equality check across ranks)."""
    return zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B"))


def broadcast_parameters(ctx: Context, flat_params: np.ndarray) -> None:
    """Copy rank 0's parameters to every rank in place, then verify bitwise equality."""
    ctx.broadcast_(flat_params, root=0)
    sums = ctx.allgather(checksum(flat_params))
    if len(set(sums)) > 1:
        raise RuntimeError(f"parameters differ across ranks after broadcast: {sums}")


def average_gradients(ctx: Context, flat_grads: np.ndarray, local_count: int) -> int:
    """Turn per-rank mean gradients into the mean over the global batch, in place.

    Each rank's gradient is the mean over its ``local_count`` samples; scaling by the count,
    summing over ranks and dividing by the global count gives exactly the gradient of one
    process on the combined batch (also when ranks hold different numbers of samples).

    Returns:
        The global sample count.
    """
    if not ctx.distributed:
        return local_count
    total = int(round(ctx.sum(local_count)))
    if total == 0:
        return 0
    flat_grads *= np.float32(local_count)
    ctx.allreduce_(flat_grads)
    flat_grads *= np.float32(1.0 / total)
    return total


def shard_indices(n: int, ctx: Context, epoch: int, seed: int = 0, shuffle: bool = True) -> np.ndarray:
    """This rank's sample indices for ``epoch``: a seeded permutation of ``range(n)`` dealt
    round-robin, so every sample is seen exactly once per epoch across ranks."""
    order = np.arange(n)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[ctx.rank::ctx.world_size]

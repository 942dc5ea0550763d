"""How rows are dealt to the ranks of a data-parallel run: one contiguous rule everywhere.

``n`` items over ``world_size`` ranks: rank r owns part r of ``np.array_split(range(n), world_size)``
(the first ``n % world_size`` parts one item longer). The loader deals each global batch this way,
evaluation and tokenizing deal the whole set this way.
"""
from __future__ import annotations

from typing import List

import numpy as np


def contiguous_part(n: int, rank: int, world_size: int) -> slice:
    """Rows of ``range(n)`` that rank ``rank`` of ``world_size`` owns (part ``rank`` of
    ``np.array_split``).

    Example:
        >>> contiguous_part(10, 1, 3)
        slice(4, 7, None)
    """
    base, extra = divmod(int(n), int(world_size))
    lo = rank * base + min(rank, extra)
    return slice(lo, lo + base + (1 if rank < extra else 0))


def shard_batches(order: np.ndarray, batch_size: int, rank: int, world_size: int,
                  drop_last: bool = False) -> List[np.ndarray]:
    """This rank's micro-batches of one epoch.

    ``order`` (the epoch's permutation) is cut into global batches of ``world_size ×
    batch_size``; global batch g goes to the ranks by :func:`contiguous_part`. Every rank gets
    the same number of batches; some may be empty in the last, short global batch.
    """
    g = batch_size * world_size
    n = len(order)
    count = n // g if drop_last else -(-n // g)
    out = []
    for b in range(count):
        chunk = order[b * g:(b + 1) * g]
        out.append(chunk[contiguous_part(len(chunk), rank, world_size)])
    return out

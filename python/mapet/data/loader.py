"""A seeded, resumable batch loader that prefetches on a background thread.

With ``workers > 1`` the items of a batch are decoded and augmented by a pool of threads
(Pillow releases the GIL while it decodes and resizes), in the batch's order, so the batches are
the same for any number of workers. Memory is bounded by ``(prefetch + 1)`` batches whatever the
dataset's size: nothing but file paths is held for an image folder.

The order of epoch ``e`` is ``default_rng([seed, e]).permutation(n)`` and augmentation is a
function of (seed, epoch, index), so the whole stream of batches is a pure function of
(seed, epoch, position): ``state_dict()`` is those three numbers and a resumed loader yields
exactly the batches an uninterrupted one would have.
"""
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, Optional

import numpy as np

from .sharding import shard_batches

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _collate(items: list) -> tuple:
    """Stack a list of item tuples field by field (images → float32, integers → int64)."""
    out = []
    for field in zip(*items):
        first = field[0]
        if isinstance(first, (int, np.integer)):
            out.append(np.asarray(field, dtype=np.int64))
        else:
            a = np.stack([np.asarray(f) for f in field])
            if a.dtype == np.float64:
                a = a.astype(np.float32)
            out.append(np.ascontiguousarray(a))
    return tuple(out)


class DataLoader:
    """Batches a dataset into NCHW float32 arrays, in a seeded order, prefetching in a thread.

    Iterating yields the rest of the current epoch as tuples ``(images, labels, ...)`` (plus
    the int64 sample indices last when ``return_indices``); when an epoch is exhausted the
    loader moves to the next one, so ``for epoch in range(loader.epoch, E): for batch in loader:``
    resumes correctly after ``load_state_dict``.

    Args:
        dataset: ``len`` + ``__getitem__`` returning tuples; ``get_batch(indices)`` is used when present.
        batch_size: samples per batch.
        shuffle: permute each epoch (seeded); otherwise the dataset order.
        drop_last: drop the final short batch.
        seed: seeds the permutation and (through ``dataset.set_epoch`` + the dataset's own
            seed) nothing else; augmentation seeds live in the dataset.
        prefetch: batches prepared ahead on a background thread (0: synchronous).
        return_indices: also yield the dataset indices of each batch (e.g. to read a token cache).
        workers: threads decoding the items of a batch (datasets without ``get_batch``); 0 or 1:
            the prefetch thread decodes alone. The result does not depend on it.

    Example:
        >>> loader = DataLoader(ArrayDataset(*load_digits(32)), batch_size=64, seed=0)
        >>> for images, labels in loader: ...
        >>> state = loader.state_dict()            # save with the checkpoint
        >>> loader.load_state_dict(state)          # later: continue exactly there
    """

    def __init__(self, dataset, batch_size: int, shuffle: bool = True, drop_last: bool = False,
                 seed: int = 0, prefetch: int = 2, return_indices: bool = False, workers: int = 0):
        if int(batch_size) <= 0:
            raise ValueError(f"DataLoader: batch_size must be positive, got {batch_size}")
        if int(prefetch) < 0:
            raise ValueError(f"DataLoader: prefetch must be >= 0, got {prefetch}")
        if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or int(workers) < 0:
            raise ValueError(f"DataLoader: workers must be an int >= 0, got {workers!r}")
        if len(dataset) == 0:
            raise ValueError("DataLoader: the dataset is empty")
        self.workers = int(workers)
        self._pool: Optional[ThreadPoolExecutor] = None
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.shuffle, self.drop_last, self.seed = bool(shuffle), bool(drop_last), int(seed)
        self.prefetch, self.return_indices = int(prefetch), bool(return_indices)
        self.epoch, self.position = 0, 0
        self.rank, self.world_size = 0, 1
        if len(self) == 0:
            raise ValueError(f"DataLoader: drop_last with batch_size {batch_size} > {len(dataset)} samples "
                             "leaves no batch")

    def __len__(self) -> int:
        """Batches per epoch (per rank when sharded: the same on every rank)."""
        n, g = len(self.dataset), self.batch_size * self.world_size
        return n // g if self.drop_last else -(-n // g)

    def shard(self, rank: int, world_size: int) -> "DataLoader":
        """Make this loader yield only rank ``rank``'s part of every global batch (data parallel).

        The epoch's order is cut into global batches of ``world_size × batch_size`` samples,
        each dealt to the ranks in contiguous near-equal parts
        (:func:`mapet.data.sharding.shard_batches`): every sample is seen once per epoch across
        ranks, the ranks' parts together are exactly the single-process batch of size
        ``world_size × batch_size``, and all ranks yield ``len(self)`` items. A rank whose part
        of the last, short global batch is empty yields ``None`` there (a zero-sample
        micro-batch). Position and epoch count global batches, so one ``state_dict`` fits all ranks.

        Returns:
            self.
        """
        if not 0 <= int(rank) < int(world_size):
            raise ValueError(f"DataLoader.shard: rank must be in [0, {world_size}), got {rank}")
        self.rank, self.world_size = int(rank), int(world_size)
        if len(self) == 0:
            raise ValueError(f"DataLoader.shard: drop_last with {world_size} × batch_size {self.batch_size} "
                             f"> {len(self.dataset)} samples leaves no batch")
        return self

    def order(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch`` (int64 indices)."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([self.seed & 0xFFFFFFFF, int(epoch)]).permutation(n).astype(np.int64)

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of ``epoch``; a no-op when already in that epoch (keeps a resumed position)."""
        if int(epoch) != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def shard_span(self, batch: int) -> tuple:
        """(offset of this rank's part inside global batch ``batch``, the global batch's length).

        Lets per-sample random streams (permutation samplers, mask generators) draw, on every
        rank, exactly the samples one process would draw for the same positions."""
        g = self.batch_size * self.world_size
        m = min(g, len(self.dataset) - batch * g)
        base, extra = divmod(m, self.world_size)
        return self.rank * base + min(self.rank, extra), m

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "length": len(self.dataset), "world_size": self.world_size}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from a ``state_dict()``; the dataset length and batch size must match."""
        for key, mine in (("length", len(self.dataset)), ("batch_size", self.batch_size)):
            if key in state and int(state[key]) != mine:
                raise ValueError(f"DataLoader.load_state_dict: saved {key} {state[key]} != current {mine}")
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world_size and int(state["position"]) != 0:
            raise ValueError(f"DataLoader.load_state_dict: saved mid-epoch with {saved_world} ranks, now "
                             f"{self.world_size}; resume with the same number of ranks")
        if not 0 <= int(state["position"]) <= len(self):
            raise ValueError(f"DataLoader.load_state_dict: position {state['position']} outside 0..{len(self)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.seed = int(state.get("seed", self.seed))

    def _items(self, indices: np.ndarray) -> list:
        if self.workers > 1 and len(indices) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="mapet-decode")
            return list(self._pool.map(lambda i: self.dataset[int(i)], indices))
        return [self.dataset[int(i)] for i in indices]

    def close(self) -> None:
        """Stop the decoding threads (started again on demand)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _batch(self, indices: np.ndarray) -> tuple:
        # a wrapper over a decoding dataset (token cache, subset) says so: its items go to the workers
        if hasattr(self.dataset, "get_batch") and not getattr(self.dataset, "decode_per_item", False):
            out = tuple(self.dataset.get_batch(indices))
        else:
            out = _collate(self._items(indices))
        return out + (indices,) if self.return_indices else out

    def _batches(self, epoch: int, start: int) -> Iterator[tuple]:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        order = self.order(epoch)
        if self.world_size > 1:
            parts = shard_batches(order, self.batch_size, self.rank, self.world_size, self.drop_last)
            for b in range(start, len(self)):
                yield self._batch(parts[b]) if len(parts[b]) else None
            return
        for b in range(start, len(self)):
            yield self._batch(order[b * self.batch_size:(b + 1) * self.batch_size])

    def __iter__(self) -> Iterator[tuple]:
        epoch, start = self.epoch, self.position
        if start >= len(self):  # a finished epoch was restored: begin the next one
            epoch, start = epoch + 1, 0
            self.epoch, self.position = epoch, 0
        source = self._batches(epoch, start) if self.prefetch == 0 else self._prefetched(epoch, start)
        try:
            for batch in source:
                self.position += 1
                yield batch
        finally:
            source.close()
        if self.position >= len(self):
            self.epoch, self.position = epoch + 1, 0

    def _prefetched(self, epoch: int, start: int) -> Iterator[tuple]:
        q: "queue.Queue" = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for batch in self._batches(epoch, start):
                    if not put(batch):
                        return
                put(_DONE)
            except BaseException as e:  # handed to the consumer, raised there
                put(_Failure(e))

        worker = threading.Thread(target=produce, name="mapet-loader", daemon=True)
        worker.start()
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            stop.set()
            worker.join()

"""Permutation sampler speed: a batch of 2048 MaPeT permutations (num_patches 196, least_number 50).

mapet draws orders, ranks, predicted positions and their ranks in Swift (the tables its masks
read; no dense masks). Peers in the same run, interleaved, median of 7:
  numpy  the same tables: argsort of uniform keys, inverse by scatter, predicted by sorting.
  torch  the same tables the same way, plus what the reference data path adds per sample:
         dense additive float masks (content [N+P, N+P], query [P, N+P]); timed on 128 samples
         (2048 would need 1.2 GB) and scaled to 2048.

Run: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv-bench/bin/python bench/sampler.py
(the peer venv needs scipy-openblas32 to import mapet).
"""
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import mapet  # noqa: E402

try:
    import torch
except ImportError:  # numpy peer only
    torch = None

B, n, L, THREADS, RUNS = 2048, 196, 50, 2, 7
N = n + 1


def numpy_tables(rng):
    patches = np.argsort(rng.random((B, n)), axis=1) + 1
    orders = np.concatenate([np.zeros((B, 1), dtype=np.int64), patches], axis=1)
    ranks = np.empty_like(orders)
    np.put_along_axis(ranks, orders, np.arange(N), axis=1)
    predicted = np.sort(orders[:, L:], axis=1)
    return orders, ranks, predicted, np.take_along_axis(ranks, predicted, axis=1)


def torch_tables(batch=B):
    patches = torch.argsort(torch.rand(batch, n), dim=1) + 1
    orders = torch.cat([torch.zeros(batch, 1, dtype=torch.int64), patches], dim=1)
    ranks = torch.empty_like(orders).scatter_(1, orders, torch.arange(N).expand(batch, N).contiguous())
    predicted = torch.sort(orders[:, L:], dim=1).values
    return orders, ranks, predicted, torch.gather(ranks, 1, predicted)


def torch_dense_masks(batch, tables=None):
    # The reference's rules as dense additive masks (0 / -1e30), vectorised over the batch.
    _, ranks, predicted, pranks = tables if tables is not None else torch_tables(batch)
    rr, rc = ranks[:, :, None], ranks[:, None, :]
    tok = (rc < L) | (rc <= rr)                                          # [B, N, N]
    tok_m = pranks[:, None, :] > rr                                      # [B, N, P]
    m_tok = (ranks < L)[:, None, :].expand(batch, N - L, N)             # [B, P, N]
    m_m = torch.ones(batch, N - L, N - L, dtype=torch.bool)
    content = torch.cat([torch.cat([tok, tok_m], 2), torch.cat([m_tok, m_m], 2)], 1)
    pq = pranks[:, :, None]
    query = torch.cat([rc.expand(batch, N - L, N) < pq, pranks[:, None, :] >= pq], 2)
    zero = torch.zeros((), dtype=torch.float32)
    neg = torch.full((), -1e30, dtype=torch.float32)
    return torch.where(content, zero, neg), torch.where(query, zero, neg)


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    mapet.set_num_threads(THREADS)
    if torch is not None:
        torch.set_num_threads(THREADS)
    sampler = mapet.PermutationSampler(n, least_number=L, seed=0)
    rng = np.random.default_rng(0)
    peers = {"mapet": lambda: sampler.sample(B), "numpy": lambda: numpy_tables(rng)}
    if torch is not None:
        peers["torch"] = lambda: torch_tables()
        peers["torch+dense masks (x16 of 128)"] = lambda: torch_dense_masks(128)
    if torch is not None:  # the dense peer computes the same masks
        check = sampler.sample(4)
        tables = tuple(torch.from_numpy(np.array(a)) for a in
                       (check.orders, check.ranks, check.predicted, check.predicted_ranks))
        content, query = torch_dense_masks(4, tables)
        for i in range(4):
            assert ((content[i] == 0).numpy() == check.content_mask(i)).all()
            assert ((query[i] == 0).numpy() == check.query_mask(i)).all()
    for fn in peers.values():
        fn()  # warm up
    times = {k: [] for k in peers}
    for _ in range(RUNS):
        for k, fn in peers.items():
            times[k].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    if "torch+dense masks (x16 of 128)" in med:
        med["torch+dense masks (x16 of 128)"] *= B / 128
    print(f"batch {B}, num_patches {n}, least_number {L}, {THREADS} threads, median of {RUNS}")
    for k, v in med.items():
        ratio = "" if k == "mapet" else f"   mapet is {v / med['mapet']:.1f}x faster"
        print(f"  {k:32s} {v * 1e3:8.2f} ms{ratio}")
    print(f"  target < 50 ms: {'met' if med['mapet'] < 0.05 else 'MISSED'}")


if __name__ == "__main__":
    main()

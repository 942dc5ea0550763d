"""Dense MaPeT attention masks, built the way the reference implementation builds them.

Benchmark-only (needs torch); nothing in tests/ or python/ may import this file.

The reference (aimagelab/MaPeT, ``utils/models.py::attention_mask_full_mapet_1``, called per sample by
``data/clipped_imagenet.py::SequenceDataset.get_permutation``) derives every mask from one matrix
``S[r, c] = 1 iff rank(c) < rank(r)`` ("r comes after c in the permutation"), then:

  1. rank(t) < least_number  -> t is context;  the other tokens are predicted, ascending index p_0 < p_1 < ...
     rank(t) <= upper_limit  -> t counts in the loss (the reference dataset hard-codes upper_limit = 197,
     so with 197 tokens this never removes anything; ``--upper_limit`` is parsed but not wired).
  2. every context column is opened:  S[:, C] = 1.
  3. content token block = S + I (each token also sees itself).
  4. content token row r -> column m_j  = NOT (S + I)[r, p_j]   (placeholder of what r cannot see).
  5. content row m_i -> token column c  = c is context;  m_i -> m_j = always.
  6. query rows = the predicted rows of [S | NOT S[:, predicted]]  (no diagonal: a query never sees
     its own content, it sees its own placeholder because NOT S[p_i, p_i] = 1).
  7. additive float masks: allowed -> 0.0, forbidden -> -1e30; the reference then repeats them per head
     ([H, ., .] per sample). We keep [B, ., .] and broadcast over heads, which is the same arithmetic.

Orders here are 0-based token indices with the class token (0) first; the reference uses 1-based values
(1 = class token) in its permutation vector. ``reference_masks`` is written from that description, not
copied; ``spec_masks_bruteforce`` is an independent per-pair transcription of ALGORITHMS.md §2. Run

    python bench/torch_masks.py --check

to assert that the two agree on random permutations (and print where they would differ).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

NEG = -1e30  # the reference's "forbidden" value (finite, so a row never becomes NaN)


def ranks_from_orders(orders: torch.Tensor) -> torch.Tensor:
    """orders [B, N] (orders[b, k] = token at position k) -> ranks [B, N] (ranks[b, t] = position of t)."""
    B, N = orders.shape
    ranks = torch.empty_like(orders)
    ranks.scatter_(1, orders, torch.arange(N, dtype=orders.dtype).expand(B, N).contiguous())
    return ranks


def validate_orders(orders: torch.Tensor, least_number: int) -> None:
    B, N = orders.shape
    if not (1 <= least_number <= N - 1):
        raise ValueError(f"least_number must be in [1, {N - 1}] for N={N}, got {least_number}")
    if not bool((orders[:, 0] == 0).all()):
        raise ValueError("orders[:, 0] must be the class token 0")
    ok = torch.sort(orders, dim=1).values == torch.arange(N, dtype=orders.dtype)
    if not bool(ok.all()):
        raise ValueError("each row of orders must be a permutation of 0..N-1")


def reference_masks(orders: torch.Tensor, least_number: int, upper_limit: int | None = None,
                    positional: bool = True):
    """The reference's dense masks for a batch, vectorised.

    Args:
        orders: int64 [B, N], class token 0 first.
        least_number: number of context tokens (CLS included); P = N - least_number.
        upper_limit: predicted tokens with rank > upper_limit are left out of the loss (None = keep all).
        positional: True = MaPeT (content stream carries P auxiliary positional tokens);
            False = PIM (no auxiliary tokens: content [B, N, N], query [B, P, N]).

    Returns:
        content: float32 [B, N+P, N+P] (PIM: [B, N, N]) additive mask.
        query:   float32 [B, P, N+P]   (PIM: [B, P, N]) additive mask.
        predicted: int64 [B, P] predicted token indices, ascending.
        in_loss: bool [B, P] whether each predicted token counts in the loss (rank <= upper_limit).
    """
    orders = orders.long()
    validate_orders(orders, least_number)
    B, N = orders.shape
    P = N - least_number
    ranks = ranks_from_orders(orders)
    context = ranks < least_number                                   # [B, N]
    S = ranks.unsqueeze(1) < ranks.unsqueeze(2)                      # S[b, r, c] = rank(c) < rank(r)
    S = S | context.unsqueeze(1)                                     # open context columns
    eye = torch.eye(N, dtype=torch.bool).expand(B, N, N)
    content_tok = S | eye

    # predicted indices, ascending (the reference selects with a boolean row mask -> ascending order)
    predicted = torch.nonzero(~context)[:, 1].reshape(B, P)
    in_loss = torch.ones(B, P, dtype=torch.bool) if upper_limit is None else \
        torch.gather(ranks, 1, predicted) <= upper_limit

    gather_cols = predicted.unsqueeze(1).expand(B, N, P)
    query_tok = torch.gather(S, 1, predicted.unsqueeze(2).expand(B, P, N))     # rows p_i of S
    if positional:
        content_pos = ~torch.gather(content_tok, 2, gather_cols)               # [B, N, P]
        query_pos = ~torch.gather(torch.gather(S, 2, gather_cols), 1,
                                  predicted.unsqueeze(2).expand(B, P, P))      # [B, P, P]
        m_rows = torch.cat([context.unsqueeze(1).expand(B, P, N),
                            torch.ones(B, P, P, dtype=torch.bool)], dim=2)     # [B, P, N+P]
        content = torch.cat([torch.cat([content_tok, content_pos], dim=2), m_rows], dim=1)
        query = torch.cat([query_tok, query_pos], dim=2)
    else:
        content, query = content_tok, query_tok
    zero = torch.zeros((), dtype=torch.float32)
    neg = torch.full((), NEG, dtype=torch.float32)
    return torch.where(content, zero, neg), torch.where(query, zero, neg), predicted, in_loss


def spec_masks_bruteforce(order: np.ndarray, least_number: int, positional: bool = True):
    """ALGORITHMS.md §2 may-attend rules, one pair at a time, for one sample. Returns boolean (content, query)."""
    N = len(order)
    rank = np.empty(N, dtype=np.int64)
    rank[np.asarray(order)] = np.arange(N)
    ctx = [rank[t] < least_number for t in range(N)]
    pred = [t for t in range(N) if not ctx[t]]
    P = len(pred)

    def tok_sees_tok(r, c):
        return ctx[c] or rank[c] < rank[r] or c == r

    if not positional:
        content = np.array([[tok_sees_tok(r, c) for c in range(N)] for r in range(N)], dtype=bool)
        query = np.array([[ctx[c] or rank[c] < rank[p] for c in range(N)] for p in pred], dtype=bool)
        return content, query
    M = N + P
    content = np.zeros((M, M), dtype=bool)
    for r in range(M):
        for c in range(M):
            if r < N and c < N:
                content[r, c] = tok_sees_tok(r, c)
            elif r < N:
                content[r, c] = not tok_sees_tok(r, pred[c - N])
            elif c < N:
                content[r, c] = ctx[c]
            else:
                content[r, c] = True
    query = np.zeros((P, M), dtype=bool)
    for i, p in enumerate(pred):
        for c in range(M):
            if c < N:
                query[i, c] = ctx[c] or rank[c] < rank[p]
            else:
                query[i, c] = rank[pred[c - N]] >= rank[p]
    return content, query


def random_orders(B: int, N: int, generator: torch.Generator) -> torch.Tensor:
    """Class token first, patches 1..N-1 in uniformly random order (as the reference samples them)."""
    perm = torch.argsort(torch.rand(B, N - 1, generator=generator), dim=1) + 1
    return torch.cat([torch.zeros(B, 1, dtype=torch.long), perm], dim=1)


def _describe(kind, b, r, c, got, want):
    return f"{kind} mask, sample {b}, row {r}, col {c}: reference={got} spec={want}"


def check(trials: int = 6, seed: int = 0) -> int:
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    cases = []
    for N in (2, 3, 5, 10, 17, 50):
        for ln in sorted({1, 2, N - 1, int(rng.integers(1, N))}):
            if 1 <= ln <= N - 1:
                cases.append((N, ln))
    cases.append((197, 50))
    cases.append((197, 1))
    cases.append((197, 196))
    checked = 0
    for N, ln in cases:
        orders = random_orders(trials if N < 197 else 2, N, g)
        for positional in (True, False):
            content, query, predicted, _ = reference_masks(orders, ln, positional=positional)
            for b in range(orders.shape[0]):
                want_c, want_q = spec_masks_bruteforce(orders[b].numpy(), ln, positional)
                got_c = (content[b] == 0).numpy()
                got_q = (query[b] == 0).numpy()
                for kind, got, want in (("content", got_c, want_c), ("query", got_q, want_q)):
                    if got.shape != want.shape or not np.array_equal(got, want):
                        bad = np.argwhere(got != want)[:5] if got.shape == want.shape else []
                        msg = [f"MISMATCH N={N} least_number={ln} positional={positional} "
                               f"shapes {got.shape} vs {want.shape}"]
                        msg += [_describe(kind, b, r, c, got[r, c], want[r, c]) for r, c in bad]
                        raise AssertionError("\n".join(msg))
                # properties: every row attends something; predicted ascending
                assert got_c.any(axis=1).all() and got_q.any(axis=1).all()
                assert bool((predicted[b][1:] > predicted[b][:-1]).all())
                # no leak: a query row p_i never sees the content of a predicted token ranked at/after it
                rank = ranks_from_orders(orders[b:b + 1])[0]
                for i, p in enumerate(predicted[b].tolist()):
                    for j, q in enumerate(predicted[b].tolist()):
                        if rank[q] >= rank[p]:
                            assert not got_q[i, q]
                checked += 1
    print(f"reference masks == ALGORITHMS.md §2 brute force on {checked} (sample, variant) pairs "
          f"over {len(cases)} (N, least_number) cases, MaPeT and PIM")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare against the brute force of the rules")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.check:
        sys.exit(check(seed=args.seed))
    ap.print_help()

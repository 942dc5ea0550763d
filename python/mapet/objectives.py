"""The model-independent parts of the DTM and CCViT objectives, on the Swift engine.

DTM (Dynamic Token Morphing): :class:`DTMSchedule` draws the random morphing schedules,
:func:`morph_tokens` merges teacher tokens by repeated bipartite soft matching and reports
which token went where, :func:`dtm_memberships` does that for a whole step's schedules, and
:func:`dtm_loss` is the group-mean smooth-L1 loss with its gradient.

CCViT: :func:`ccvit_corrupt` replaces a few visible patches by their own nearest centroid,
:func:`ccvit_pixel_targets` builds the per-patch normalised pixel targets, and
:func:`masked_mse` is the pixel loss on the corrupted positions with its gradient.

The semantics follow the reference code (naver-ai/dtm, Cakeyan/CCViT_Public); the Swift
sources under ``Sources/MaPeTKernels/Objectives`` say in comments what was matched.
"""
import logging
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ._convert import f32 as _f32
from ._convert import i32 as _i32
from ._native import _core

logger = logging.getLogger(__name__)

__all__ = [
    "DTMSchedule", "DTMScheduleEntry", "MorphResult", "morph_tokens", "dtm_memberships",
    "dtm_loss", "ccvit_corrupt", "ccvit_pixel_targets", "masked_mse",
]



# ------------------------------------------------------------------------------ DTM

class DTMScheduleEntry(NamedTuple):
    """One morphing schedule: ``iterations`` rounds of ``r`` merges (``num_tokens`` = n̄)."""
    num_tokens: int
    iterations: int
    r: int


class DTMSchedule:
    """Seeded stream of DTM morphing schedules (ALGORITHMS.md §5), one :meth:`draw` per step.

    Each draw picks, for each of ``num_schedules`` (L) schedules, a token budget
    n̄ ~ U{0..n} and an iteration count k ~ U{1..max_iterations}, and derives the merges
    per round r = ⌈n̄/k⌉ (⌊n̄/k⌋ when ⌈n̄/k⌉·k would exceed n), as the reference does.
    The generator is SplitMix64 (``ObjectiveRNG`` in Swift): the sequence depends only
    on ``seed``.

    Args:
        seed: non-negative integer seed.
        max_iterations: k's upper bound (14 in the paper).
        num_schedules: L, schedules per step (2 in the paper).

    Example:
        >>> import mapet
        >>> s = mapet.DTMSchedule(seed=0)
        >>> [e.r <= e.num_tokens for e in s.draw(196)]
        [True, True]
    """

    def __init__(self, seed: int = 0, *, max_iterations: int = 14, num_schedules: int = 2) -> None:
        self.seed = int(seed)
        self.max_iterations = int(max_iterations)
        self.num_schedules = int(num_schedules)
        self._handle = _core.dtm_schedule_new(self.seed)

    def draw(self, num_patches: int) -> List[DTMScheduleEntry]:
        """Draws the next step's schedules for ``num_patches`` patch tokens (n; 196 for ViT-*/16 at 224).

        Returns:
            A list of L :class:`DTMScheduleEntry`.
        """
        raw = _core.dtm_schedule_draw(self._handle, int(num_patches), self.max_iterations,
                                      self.num_schedules)
        return [DTMScheduleEntry(*e) for e in raw]

    def __repr__(self) -> str:
        return (f"DTMSchedule(seed={self.seed}, max_iterations={self.max_iterations}, "
                f"num_schedules={self.num_schedules})")


class MorphResult(NamedTuple):
    """Output of :func:`morph_tokens`.

    membership: [B, n] int32, the group (0..G-1) of every original token.
    sizes: [B, G] int32, tokens per group.
    merged: [B, G, d] float32, the size-weighted mean feature of each group.
    r, iterations: the schedule that was applied.
    """
    membership: np.ndarray
    sizes: np.ndarray
    merged: np.ndarray
    r: int
    iterations: int


def _features(features, name: str = "features") -> Tuple[np.ndarray, bool]:
    x = _f32(features, name)
    if x.ndim == 2:
        return x[None], True
    if x.ndim != 3:
        raise ValueError(f"{name}: expected [B, n, d] or [n, d], got shape {x.shape}")
    return x, False


def morph_tokens(features: np.ndarray, r: Optional[int] = None, iterations: Optional[int] = None,
                 num_tokens: Optional[int] = None, *, protect_first: bool = True,
                 seed: Optional[int] = None) -> MorphResult:
    """Dynamic token morphing of teacher features (bipartite soft matching, repeated).

    Each round L2-normalises the current tokens, splits them into even and odd positions,
    matches every even token to its most cosine-similar odd token and merges the ``r``
    best pairs by size-weighted mean; token 0 is never merged when ``protect_first``.

    Args:
        features: [B, n, d] (or [n, d]) teacher tokens, e.g. a frozen encoder's
            ``forward_features`` output.
        r: merges per round. If omitted it is derived from ``num_tokens``.
        iterations: rounds k (default 1 when ``r`` or ``num_tokens`` is given).
        num_tokens: token budget n̄; r = ⌈n̄/k⌉ (or ⌊n̄/k⌋ if that would exceed n).
        protect_first: keep token 0 out of every merge (the reference's ``class_token``).
        seed: when neither ``r`` nor ``num_tokens`` is given, draw one schedule from
            ``DTMSchedule(seed)`` (default seed 0).

    Returns:
        :class:`MorphResult` (membership [B, n] int32, sizes [B, G] int32,
        merged [B, G, d] float32, r, iterations); a 2-d input gives unbatched arrays.

    Example:
        >>> import numpy as np, mapet
        >>> x = np.random.default_rng(0).standard_normal((2, 16, 8)).astype(np.float32)
        >>> res = mapet.morph_tokens(x, r=3, iterations=2)
        >>> res.merged.shape, int(res.sizes.sum(axis=1)[0])
        ((2, 10, 8), 16)
    """
    x, single = _features(features)
    B, n, d = x.shape
    if r is None:
        if num_tokens is None:
            entry = DTMSchedule(0 if seed is None else seed, num_schedules=1).draw(n)[0]
            r, iterations = entry.r, entry.iterations
        else:
            iterations = 1 if iterations is None else int(iterations)
            if iterations < 1:
                raise ValueError(f"iterations: expected ≥ 1 with num_tokens, got {iterations}")
            r = _core.dtm_merges_per_iteration(int(num_tokens), iterations, n)
    elif num_tokens is not None:
        raise ValueError("morph_tokens: give r or num_tokens, not both")
    iterations = 1 if iterations is None else int(iterations)
    r = int(r)
    groups = _core.token_morphing_group_count(n, r, iterations, bool(protect_first))
    membership = np.empty((B, n), np.int32)
    sizes = np.empty((B, groups), np.int32)
    merged = np.empty((B, groups, d), np.float32)
    _core.token_morphing(x, r, iterations, bool(protect_first), membership, sizes, merged)
    if single:
        membership, sizes, merged = membership[0], sizes[0], merged[0]
    return MorphResult(membership, sizes, merged, r, iterations)


def dtm_memberships(features: np.ndarray, schedules: Sequence[DTMScheduleEntry], *,
                    protect_first: bool = True) -> np.ndarray:
    """Group memberships of ``features`` under each schedule of one step.

    Args:
        features: [B, n, d] teacher tokens.
        schedules: L entries with ``r`` and ``iterations`` (e.g. ``DTMSchedule.draw(n)``).
        protect_first: keep token 0 out of every merge.

    Returns:
        [L, B, n] int32 group ids, the ``memberships`` argument of :func:`dtm_loss`.
    """
    x, _ = _features(features)
    B, n, _ = x.shape
    rs = [int(s.r) for s in schedules]
    its = [int(s.iterations) for s in schedules]
    out = np.empty((len(rs), B, n), np.int32)
    _core.dtm_memberships(x, rs, its, bool(protect_first), out)
    return out


def dtm_loss(pred: np.ndarray, target: np.ndarray, memberships: np.ndarray, *, beta: float = 2.0,
             dpred: Optional[np.ndarray] = None, dloss: float = 1.0,
             backward: bool = True) -> Tuple[float, Optional[np.ndarray]]:
    """DTM loss: group-mean smooth-L1 between predictions and targets, mean over schedules.

    For each schedule both ``pred`` and ``target`` are replaced at every position by the
    mean of the position's group (Σ/(|g|+1e-6), as the reference), compared with
    smooth-L1 (``beta``; torch ``smooth_l1_loss`` definition) averaged over all n
    positions and d channels; the L schedule losses are averaged.

    Args:
        pred: [B, n, d] student predictions.
        target: [B, n, d] teacher features.
        memberships: [L, B, n] (or [B, n]) int group ids in [0, n).
        beta: smooth-L1 transition point (2 in DTM).
        dpred: optional float32 [B, n, d] gradient buffer, accumulated into (``+=``).
        dloss: upstream gradient of the loss.
        backward: also compute the gradient.

    Returns:
        ``(loss, dpred)``; ``dpred`` is None when ``backward`` is False.

    Example:
        >>> import numpy as np, mapet
        >>> p = np.zeros((1, 4, 2), np.float32); t = np.ones((1, 4, 2), np.float32)
        >>> round(mapet.ops.dtm_loss(p, t, np.arange(4)[None])[0], 4)  # 0.5·1²/2
        0.25
    """
    p, t = _f32(pred, "pred"), _f32(target, "target")
    if p.ndim != 3:
        raise ValueError(f"pred: expected [B, n, d], got shape {p.shape}")
    if t.shape != p.shape:
        raise ValueError(f"target: expected shape {p.shape} like pred, got {t.shape}")
    m = _i32(memberships, "memberships")
    if m.ndim == 2:
        m = m[None]
    loss = _core.dtm_loss_forward(p, t, m, float(beta))
    if not backward:
        return loss, None
    if dpred is None:
        dpred = np.zeros_like(p)
    _core.dtm_loss_backward(float(dloss), p, t, m, float(beta), dpred)
    return loss, dpred


# ----------------------------------------------------------------------------- CCViT

def ccvit_corrupt(images: np.ndarray, mask: np.ndarray, centroid_ids: np.ndarray,
                  centroids: np.ndarray, num_replace: int = 20, seed: int = 0, *,
                  patch_size: Optional[int] = None, first_sample: int = 0,
                  inplace: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """CCViT corruption: replace ``num_replace`` visible patches by their own centroid.

    Of the patches not block-masked, ``num_replace`` per image are picked uniformly
    without replacement (seeded; image i draws from stream ``first_sample + i``) and their pixels are
    overwritten with their nearest centroid's pixels. Do this on raw pixels, before
    mean/std normalisation. The block-masked patches are left alone (the model swaps
    them for its mask token).

    Args:
        images: [B, C, H, W] pixels.
        mask: [B, n] bool/int, true for block-masked patches (n = (H/P)·(W/P)).
        centroid_ids: [B, n] the nearest centroid of every clean patch.
        centroids: [K, C·P·P] centroid pixels in (channel, row, col) order.
        num_replace: patches to replace per image (20 in the paper; fewer when fewer
            are visible).
        seed: non-negative seed.
        patch_size: P; inferred from ``centroids`` when omitted.
        first_sample: the index of ``images[0]`` in a global sample stream: a batch split in
            parts (data-parallel ranks) draws exactly what the whole batch would.
        inplace: write into ``images`` (must be float32 C-contiguous) instead of a copy.

    Returns:
        ``(corrupted_images, replaced)`` with ``replaced`` a [B, n] bool array. The
        corrupted positions of the loss are ``mask | replaced``.
    """
    if inplace:
        if not (isinstance(images, np.ndarray) and images.dtype == np.float32
                and images.flags.c_contiguous and images.flags.writeable):
            raise ValueError("images: inplace=True needs a writable float32 C-contiguous array")
        out = images
    else:
        out = np.array(images, dtype=np.float32, order="C", copy=True)
    if out.ndim != 4:
        raise ValueError(f"images: expected [B, C, H, W], got shape {out.shape}")
    c = _f32(centroids, "centroids")
    if c.ndim != 2:
        raise ValueError(f"centroids: expected [K, C·P·P], got shape {c.shape}")
    if patch_size is None:
        per = c.shape[1] // max(out.shape[1], 1)
        patch_size = int(round(per ** 0.5))
        if patch_size * patch_size * out.shape[1] != c.shape[1]:
            raise ValueError(f"centroids: {c.shape[1]} values per centroid is not C·P·P for C={out.shape[1]}")
    B = out.shape[0]
    replaced = np.zeros((B, (out.shape[2] // patch_size) * (out.shape[3] // patch_size)), np.int32)
    _core.ccvit_corrupt(out, _i32(mask, "mask"), _i32(centroid_ids, "centroid_ids"), c,
                        int(patch_size), int(num_replace), int(seed), replaced, int(first_sample))
    return out, replaced.astype(bool)


def ccvit_pixel_targets(images: np.ndarray, patch_size: int = 16) -> np.ndarray:
    """Per-patch normalised pixel targets of CCViT's pixel head.

    Each P×P patch becomes a (channel, row, col) vector x of C·P·P values and is
    normalised as ``(x - mean) / sqrt(var_unbiased + 1e-6)``. Use the clean images.

    Args:
        images: [B, C, H, W] pixels.
        patch_size: P.

    Returns:
        [B, n, C·P·P] float32.
    """
    x = _f32(images, "images")
    if x.ndim != 4:
        raise ValueError(f"images: expected [B, C, H, W], got shape {x.shape}")
    B, C, H, W = x.shape
    P = int(patch_size)
    if P < 1 or H % P or W % P:
        raise ValueError(f"patch_size: expected a positive divisor of {H} and {W}, got {patch_size}")
    out = np.empty((B, (H // P) * (W // P), C * P * P), np.float32)
    _core.ccvit_pixel_targets(x, P, out)
    return out


def masked_mse(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, *,
               dpred: Optional[np.ndarray] = None, dloss: float = 1.0,
               backward: bool = True) -> Tuple[float, Optional[np.ndarray]]:
    """Mean squared error over the selected positions (torch ``MSELoss`` on ``pred[mask]``).

    Args:
        pred: [..., M] predictions (e.g. [B, n, C·P·P]).
        target: same shape as ``pred``.
        mask: ``pred.shape[:-1]`` bool/int, true where the loss applies.
        dpred: optional float32 gradient buffer like ``pred``, accumulated into.
        dloss: upstream gradient.
        backward: also compute the gradient.

    Returns:
        ``(loss, dpred)``; loss is 0 when nothing is selected.
    """
    p, t = _f32(pred, "pred"), _f32(target, "target")
    if t.shape != p.shape or p.ndim < 1:
        raise ValueError(f"target: expected shape {p.shape} like pred, got {t.shape}")
    m = _i32(mask, "mask")
    if m.shape != p.shape[:-1]:
        raise ValueError(f"mask: expected shape {p.shape[:-1]}, got {m.shape}")
    M = p.shape[-1]
    p2, t2, m1 = p.reshape(-1, M), t.reshape(-1, M), m.reshape(-1)
    loss = _core.masked_mse_forward(p2, t2, m1)
    if not backward:
        return loss, None
    if dpred is None:
        dpred = np.zeros_like(p)
    if dpred.shape != p.shape:
        raise ValueError(f"dpred: expected shape {p.shape}, got {dpred.shape}")
    _core.masked_mse_backward(float(dloss), p2, t2, m1, dpred.reshape(-1, M))
    return loss, dpred

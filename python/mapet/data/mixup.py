"""Mixup and CutMix for fine-tuning (the BEiT / MaPeT recipe: mixup α 0.8, cutmix α 1.0, switch
probability 0.5, applied per batch, with label smoothing folded into the targets).

Semantics of timm's ``Mixup(mode="batch")`` (Zhang et al. 2018; Yun et al. 2019):

- with probability ``mixup_prob`` a batch is mixed; then CutMix with probability ``mixup_switch_prob`` (when
  both α > 0), else Mixup; λ ~ Beta(α, α) of the chosen one;
- Mixup: ``x ← λ·x + (1 − λ)·flip(x)`` where ``flip`` reverses the batch (sample i pairs with
  B − 1 − i); CutMix: a box of side ``int(S·√(1 − λ))`` centred at a uniform pixel (clipped at the
  borders) is pasted from ``flip(x)``, and λ is corrected to the share of pixels kept;
- targets: ``λ·smooth(y) + (1 − λ)·smooth(flip(y))`` with ``smooth(y) = (1 − ε)·onehot(y) + ε/K``
  — rows of K probabilities summing to 1, for the engine's soft-target cross-entropy
  (``VisionTransformer.train_step(images, targets)``).

The draws of a batch are a pure function of (seed, epoch, batch index), like the loader's order
and augmentation, so a resumed run mixes exactly as an uninterrupted one (no state to save). An
odd batch mixes its middle sample with itself (timm requires even batches instead). Under
``mpiexec`` every rank draws the same λ and box for a global batch and mixes within its own share
(as timm does under DDP), so unlike unmixed fine-tuning the run is not the single-process one.
"""
import math
from typing import Any, Dict, Optional, Tuple

import numpy as np

#: The fine-tuning recipe of BEiT / MaPeT (timm's argument names).
RECIPE = {"mixup": 0.8, "cutmix": 1.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5}

_STREAM = 0x6D6978  # "mix": keeps these draws apart from every other seeded stream


def mixup_target(labels: np.ndarray, num_classes: int, lam: float, smoothing: float = 0.0) -> np.ndarray:
    """``λ·smooth(onehot(y)) + (1 − λ)·smooth(onehot(flip(y)))`` as float32 [B, num_classes]
    (timm's ``mixup_target``); ``lam=1`` gives the label-smoothed one-hot targets."""
    y = np.asarray(labels, dtype=np.int64)
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    rows = np.arange(y.shape[0])
    y1 = np.full((y.shape[0], num_classes), off, np.float64)
    y1[rows, y] = on
    y2 = y1[::-1]
    return (y1 * lam + y2 * (1.0 - lam)).astype(np.float32)


def rand_bbox(rng: np.random.Generator, height: int, width: int, lam: float) -> Tuple[int, int, int, int]:
    """CutMix box (top, bottom, left, right) for mixing ratio ``lam``, as timm's ``rand_bbox``:
    sides ``int(H·√(1 − λ))`` × ``int(W·√(1 − λ))`` around a uniform centre, clipped to the image."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
    left, right = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
    return top, bottom, left, right


def _check_settings(num_classes: Any, mixup: Any, cutmix: Any, prob: Any, switch_prob: Any, smoothing: Any) -> None:
    for name, v in (("mixup", mixup), ("cutmix", cutmix)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}: expected a Beta α ≥ 0 (0: off), got {v!r}")
    for name, v in (("mixup_prob", prob), ("mixup_switch_prob", switch_prob), ("label_smoothing", smoothing)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{name}: expected a probability in [0, 1], got {v!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")


class Mixup:
    """Per-batch Mixup / CutMix with label smoothing, seeded by (seed, epoch, batch).

    Args:
        num_classes: classes K of the soft targets.
        mixup: Mixup's Beta(α, α) parameter (0: off).
        cutmix: CutMix's Beta(α, α) parameter (0: off).
        mixup_prob: probability that a batch is mixed at all (timm's ``prob``).
        mixup_switch_prob: probability of CutMix rather than Mixup when both are on (``switch_prob``).
        label_smoothing: ε folded into the targets.
        seed: the run's seed.

    Example:
        >>> mix = Mixup(10, **RECIPE, label_smoothing=0.1, seed=0)
        >>> images, targets = mix(np.zeros((4, 3, 32, 32), np.float32), np.arange(4), epoch=0, batch=0)
        >>> targets.shape, bool(np.allclose(targets.sum(1), 1))
        ((4, 10), True)
    """

    def __init__(self, num_classes: int, mixup: float = 0.8, cutmix: float = 1.0, mixup_prob: float = 1.0,
                 mixup_switch_prob: float = 0.5, label_smoothing: float = 0.1, seed: int = 0) -> None:
        prob, switch_prob = mixup_prob, mixup_switch_prob
        _check_settings(num_classes, mixup, cutmix, prob, switch_prob, label_smoothing)
        if mixup == 0 and cutmix == 0:
            raise ValueError("Mixup: mixup and cutmix are both 0 (off); leave the mixing out instead")
        self.num_classes, self.mixup, self.cutmix = int(num_classes), float(mixup), float(cutmix)
        self.prob, self.switch_prob = float(prob), float(switch_prob)
        self.label_smoothing, self.seed = float(label_smoothing), int(seed)

    @property
    def config(self) -> Dict[str, Any]:
        """The settings (recorded with a run's checkpoint)."""
        return {"mixup": self.mixup, "cutmix": self.cutmix, "mixup_prob": self.prob,
                "mixup_switch_prob": self.switch_prob, "label_smoothing": self.label_smoothing}

    def params(self, epoch: int, batch: int) -> Tuple[float, bool]:
        """(λ drawn, CutMix?) of batch ``batch`` of ``epoch``; λ = 1 means the batch is not mixed."""
        rng = self._rng(epoch, batch)
        return self._draw(rng)

    def _rng(self, epoch: int, batch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, _STREAM, int(epoch), int(batch)])

    def _draw(self, rng: np.random.Generator) -> Tuple[float, bool]:
        if rng.random() >= self.prob:
            return 1.0, False
        if self.mixup > 0 and self.cutmix > 0:
            cut = bool(rng.random() < self.switch_prob)
        else:
            cut = self.cutmix > 0
        lam = float(rng.beta(self.cutmix, self.cutmix) if cut else rng.beta(self.mixup, self.mixup))
        return lam, cut

    def __call__(self, images: Any, labels: Any, epoch: int, batch: int) -> Tuple[np.ndarray, np.ndarray]:
        """Mix one batch: returns (mixed images float32 [B, C, H, W] (a new array), soft targets
        float32 [B, num_classes]). ``epoch`` and ``batch`` (the batch's index in its epoch) seed the draws."""
        x = np.array(images, dtype=np.float32, copy=True)
        if x.ndim != 4:
            raise ValueError(f"images: expected [B, C, H, W], got shape {x.shape}")
        y = np.asarray(labels)
        if not np.issubdtype(y.dtype, np.integer) or y.shape != (x.shape[0],):
            raise ValueError(f"labels: expected integer class indices of shape ({x.shape[0]},), got "
                             f"{y.dtype} {y.shape}")
        if y.size and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(f"labels: expected class indices in [0, {self.num_classes}), got {int(y.min())}..{int(y.max())}")
        rng = self._rng(epoch, batch)
        lam, cut = self._draw(rng)
        if lam < 1.0:
            if cut:
                H, W = x.shape[2], x.shape[3]
                top, bottom, left, right = rand_bbox(rng, H, W, lam)
                x[:, :, top:bottom, left:right] = x[::-1, :, top:bottom, left:right].copy()
                lam = 1.0 - (bottom - top) * (right - left) / float(H * W)
            else:
                x = (x * np.float32(lam) + x[::-1] * np.float32(1.0 - lam)).astype(np.float32)
        return np.ascontiguousarray(x), mixup_target(y, self.num_classes, lam, self.label_smoothing)


def make_mixup(num_classes: int, mixup: float = 0.0, cutmix: float = 0.0, mixup_prob: float = 1.0,
               mixup_switch_prob: float = 0.5, label_smoothing: float = 0.0, seed: int = 0) -> Optional[Mixup]:
    """A :class:`Mixup` when ``mixup`` or ``cutmix`` is on, else None (plain hard-label training)."""
    _check_settings(num_classes, mixup, cutmix, mixup_prob, mixup_switch_prob, label_smoothing)
    if not mixup and not cutmix:
        return None
    return Mixup(num_classes, mixup, cutmix, mixup_prob, mixup_switch_prob, label_smoothing, seed)

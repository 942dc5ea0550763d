"""Learning-rate schedules and per-parameter scales (BEiT / MaPeT recipes).

``cosine_lr`` reproduces the reference ``cosine_scheduler`` (BEiT, used by MaPeT) value for
value: a linear warm-up ``linspace(warmup_start_lr, base_lr, warmup_steps)`` (both ends
included), then ``min_lr + (base_lr - min_lr)/2 · (1 + cos(π i / (total - warmup)))`` for
``i = 0 .. total - warmup - 1``. ``layer_decay_scales`` is BEiT's layer-wise lr decay.
"""
import math
from typing import Dict, Iterable, Sequence, Tuple

import numpy as np


def cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0,
              warmup_start_lr: float = 1e-6, min_lr: float = 1e-5) -> float:
    """The learning rate at ``step`` (0-based) of a warm-up + cosine schedule.

    Args:
        step: optimizer step, 0 .. total_steps-1 (later steps get ``min_lr``).
        total_steps: length of the schedule (epochs × steps per epoch).
        base_lr: peak rate, reached at the last warm-up step.
        warmup_steps: linear warm-up steps from ``warmup_start_lr`` to ``base_lr`` inclusive.
        warmup_start_lr: first warm-up value (reference 1e-6).
        min_lr: final value the cosine decays towards (reference 1e-5).

    Example:
        >>> cosine_lr(0, 100, 1e-3, warmup_steps=10)
        1e-06
    """
    if total_steps <= 0:
        raise ValueError(f"cosine_lr: total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"cosine_lr: warmup_steps must lie in 0..{total_steps}, got {warmup_steps}")
    if step < 0:
        raise ValueError(f"cosine_lr: step must be >= 0, got {step}")
    if step < warmup_steps:
        if warmup_steps == 1:
            return float(warmup_start_lr)
        return float(warmup_start_lr + (base_lr - warmup_start_lr) * step / (warmup_steps - 1))
    if step >= total_steps:
        return float(min_lr)
    i, span = step - warmup_steps, total_steps - warmup_steps
    return float(min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * i / span)))


def cosine_schedule(total_steps: int, base_lr: float, warmup_steps: int = 0,
                    warmup_start_lr: float = 1e-6, min_lr: float = 1e-5) -> np.ndarray:
    """``cosine_lr`` for every step 0 .. total_steps-1, as a float64 array."""
    return np.array([cosine_lr(s, total_steps, base_lr, warmup_steps, warmup_start_lr, min_lr)
                     for s in range(total_steps)])


def layer_id(name: str, depth: int) -> int:
    """BEiT's layer id of a parameter: 0 for embeddings, i+1 for ``blocks.i.*``, depth+1 otherwise.

    Embeddings: ``cls_token``, ``pos_embed``, ``mask_token``, ``mask_positional_token`` and
    ``patch_embed.*``. Everything after the blocks (norms, heads, decoder) is ``depth + 1``.
    """
    if name in ("cls_token", "pos_embed", "mask_token", "mask_positional_token") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        part = name.split(".")[1]
        if part.isdigit():
            return int(part) + 1
    return depth + 1


def layer_decay_scales(param_names: Iterable[str], depth: int, decay: float) -> Dict[str, float]:
    """Layer-wise lr decay (BEiT): name → ``decay ** (depth + 1 - layer_id(name))``.

    The head (and final norm) keep scale 1; block i gets ``decay ** (depth - i)``; embeddings
    ``decay ** (depth + 1)``. Multiply each parameter's learning rate by its scale.

    Example:
        >>> layer_decay_scales(["pos_embed", "blocks.11.mlp.fc1.weight", "head.weight"], 12, 0.65)["head.weight"]
        1.0
    """
    if depth < 0:
        raise ValueError(f"layer_decay_scales: depth must be >= 0, got {depth}")
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"layer_decay_scales: decay must lie in (0, 1], got {decay}")
    return {n: float(decay ** (depth + 1 - layer_id(n, depth))) for n in param_names}


def no_weight_decay(name: str, shape: Sequence[int]) -> bool:
    """True for parameters the recipe excludes from weight decay: 1-D tensors (biases, norms,
    layer scales) and the token / position embeddings."""
    base = name.rsplit(".", 1)[-1]
    return len(tuple(shape)) <= 1 or base in ("cls_token", "pos_embed", "mask_token", "mask_positional_token")


def weight_decay_mask(params: Dict[str, np.ndarray]) -> Dict[str, bool]:
    """name → whether weight decay applies (see ``no_weight_decay``)."""
    return {n: not no_weight_decay(n, np.shape(p)) for n, p in params.items()}


def split_total_steps(epochs: int, steps_per_epoch: int, warmup_epochs: float) -> Tuple[int, int]:
    """(total_steps, warmup_steps) for an epoch-based recipe."""
    total = int(epochs) * int(steps_per_epoch)
    return total, min(total, int(round(warmup_epochs * steps_per_epoch)))

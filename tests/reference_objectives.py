"""Independent float64 NumPy transcription of the CCViT and DTM pre-training models (ALGORITHMS.md §4, §5),
for tests. Built on the ViT pieces of ``reference_twostream`` (same names, same block math).

Both models use the BEiT masked trunk: patch embeddings of masked patches are replaced by
``mask_token``, the class token is prepended, pos_embed added, then pre-norm blocks with full
attention. ``xs[l]`` below is the [B, N, C] input of block l (``xs[depth]`` the trunk output,
before the final ``norm``).

* ``ccvit_forward``: corrupted = mask | replaced ([B, n]); its rows are taken sample-major,
  patch ascending (M rows in all).
    token head:  logits [M, V] = lm_head(norm(xs[depth][patch rows][corrupted]))
    pixel head:  h = [xs[depth] class row ; xs[early_layers] patch rows]   (no final norm)
                 h = cls_pt_layers.i(h) for each head block (full attention over the N rows)
                 pixels [M, P] = cls_pt_lm_head(cls_pt_norm(h[patch rows][corrupted]))
  ``ccvit_loss`` = token_weight · mean CE(logits, tokens[corrupted])
                 + pixel_weight · mean over M·P of (pixels − pixel_targets[corrupted])².
* ``dtm_forward``: lm_head(norm(xs[depth]))[:, 1:] → [B, n, D] at every patch.
  ``dtm_loss``: for each schedule l, with S the one-hot group matrix of memberships[l, b]
  (S[g, i] = 1 iff token i is in group g), both pred and target are replaced at every position
  i by the mean of i's group, Σ_{j∈g} x_j / (|g| + 1e-6); smooth-L1 (torch definition, β)
  of the difference averaged over B·n·D; then the mean over the L schedules.
"""
from typing import Dict, List, Optional, Tuple

import numpy as np

from reference_twostream import (as_float64, attention, cross_entropy, depth_of, embed_patches, layer_norm,
                                 linear, mlp)

Weights = Dict[str, np.ndarray]


def block_forward(w: Weights, pre: str, x: np.ndarray, num_heads: int) -> np.ndarray:
    """One pre-norm ViT block with full attention and layer scale (if present)."""
    C = x.shape[-1]
    ls1, ls2 = w.get(pre + ".ls1.gamma", np.ones(C)), w.get(pre + ".ls2.gamma", np.ones(C))
    xn = layer_norm(x, w[pre + ".norm1.weight"], w[pre + ".norm1.bias"])
    x = x + ls1 * attention(w, pre + ".attn", xn, xn, None, num_heads)
    xn = layer_norm(x, w[pre + ".norm2.weight"], w[pre + ".norm2.bias"])
    return x + ls2 * mlp(w, pre + ".mlp", xn)


def masked_trunk(w: Weights, images: np.ndarray, mask: Optional[np.ndarray], num_heads: int) -> List[np.ndarray]:
    """[xs[0], …, xs[depth]], each [B, N, C] (w already float64)."""
    x = embed_patches(w, images)
    B, n, C = x.shape
    if mask is not None:
        m = np.asarray(mask, dtype=bool).reshape(B, n)
        x = np.where(m[..., None], w["mask_token"].reshape(1, 1, C), x)
    x = np.concatenate([np.broadcast_to(w["cls_token"].reshape(1, 1, C), (B, 1, C)), x], 1)
    xs = [x + w["pos_embed"].reshape(1, n + 1, C)]
    for i in range(depth_of(w)):
        xs.append(block_forward(w, f"blocks.{i}", xs[-1], num_heads))
    return xs


def head_depth_of(w: Weights) -> int:
    d = 0
    while f"cls_pt_layers.{d}.norm1.weight" in w:
        d += 1
    return d


def corrupted_of(mask: np.ndarray, replaced: np.ndarray) -> np.ndarray:
    """[B, n] bool: masked or centroid-replaced."""
    m = np.asarray(mask, dtype=bool)
    return m.reshape(m.shape[0], -1) | np.asarray(replaced, dtype=bool).reshape(m.shape[0], -1)


def ccvit_forward(weights: Weights, images: np.ndarray, mask: np.ndarray, replaced: np.ndarray,
                  num_heads: int, early_layers: int) -> Tuple[np.ndarray, np.ndarray]:
    """(token logits [M, V], pixels [M, P]) at the corrupted patches (see module docstring)."""
    w = as_float64(weights)
    xs = masked_trunk(w, images, mask, num_heads)
    corrupted = corrupted_of(mask, replaced)
    xL = xs[-1]
    logits = linear(layer_norm(xL[:, 1:][corrupted], w["norm.weight"], w["norm.bias"]), w, "lm_head")
    h = np.concatenate([xL[:, :1], xs[early_layers][:, 1:]], 1)
    for i in range(head_depth_of(w)):
        h = block_forward(w, f"cls_pt_layers.{i}", h, num_heads)
    pixels = linear(layer_norm(h[:, 1:][corrupted], w["cls_pt_norm.weight"], w["cls_pt_norm.bias"]), w,
                    "cls_pt_lm_head")
    return logits, pixels


def ccvit_losses(logits: np.ndarray, pixels: np.ndarray, tokens: np.ndarray, pixel_targets: np.ndarray,
                 mask: np.ndarray, replaced: np.ndarray, token_weight: float = 1.0,
                 pixel_weight: float = 1.0) -> Tuple[float, float, float]:
    """(total, token CE, pixel MSE) on the corrupted patches."""
    corrupted = corrupted_of(mask, replaced)
    ce = cross_entropy(logits, np.asarray(tokens, dtype=np.int64)[corrupted])
    mse = float(((pixels - np.asarray(pixel_targets, dtype=np.float64)[corrupted]) ** 2).mean())
    return token_weight * ce + pixel_weight * mse, ce, mse


def ccvit_loss(weights: Weights, images, tokens, pixel_targets, mask, replaced, num_heads: int,
               early_layers: int, token_weight: float = 1.0, pixel_weight: float = 1.0) -> float:
    logits, pixels = ccvit_forward(weights, images, mask, replaced, num_heads, early_layers)
    return ccvit_losses(logits, pixels, tokens, pixel_targets, mask, replaced, token_weight, pixel_weight)[0]


def dtm_forward(weights: Weights, images: np.ndarray, mask: Optional[np.ndarray], num_heads: int) -> np.ndarray:
    """Student predictions [B, n, D] at every patch."""
    w = as_float64(weights)
    xL = masked_trunk(w, images, mask, num_heads)[-1]
    return linear(layer_norm(xL, w["norm.weight"], w["norm.bias"])[:, 1:], w, "lm_head")


def smooth_l1(u: np.ndarray, beta: float) -> np.ndarray:
    a = np.abs(u)
    return np.where(a < beta, 0.5 * u * u / beta, a - 0.5 * beta)


def dtm_loss(pred: np.ndarray, target: np.ndarray, memberships: np.ndarray, beta: float = 2.0) -> float:
    """Group-mean smooth-L1 over every position, mean over schedules (see module docstring)."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    mem = np.asarray(memberships)
    if mem.ndim == 2:
        mem = mem[None]
    L, B, n = mem.shape
    losses = []
    for l in range(L):
        per_sample = []
        for b in range(B):
            S = (mem[l, b][None, :] == np.arange(n)[:, None]).astype(np.float64)     # [groups, n]
            size = S.sum(axis=1, keepdims=True)

            def spread(x):
                return S.T @ (S @ x / (size + 1e-6))                               # group mean at each i

            per_sample.append(smooth_l1(spread(pred[b]) - spread(target[b]), beta))
        losses.append(np.mean(per_sample))
    return float(np.mean(losses))

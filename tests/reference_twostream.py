"""Independent float64 NumPy transcription of the pre-training forwards (ALGORITHMS.md §1–2), for tests.

Three models over one ViT trunk (pre-norm blocks, split ``attn.q`` / ``attn.kv`` projections,
exact GELU, LayerNorm eps 1e-6, optional layer scale), all taking weights keyed by the
PyTorch reference names (timm ViT + MaPeT / BEiT heads):

  cls_token [1,1,C]  pos_embed [1,N,C]  patch_embed.proj.weight [C,in,p,p]  patch_embed.proj.bias [C]
  blocks.{i}.norm1.weight/.bias  blocks.{i}.attn.q.weight [C,C]/.bias  blocks.{i}.attn.kv.weight [2C,C]/.bias
  blocks.{i}.attn.proj.weight/.bias  blocks.{i}.ls1.gamma [C]  blocks.{i}.norm2.weight/.bias
  blocks.{i}.mlp.fc1.weight [H,C]/.bias  blocks.{i}.mlp.fc2.weight [C,H]/.bias  blocks.{i}.ls2.gamma  norm.weight/.bias
  MaPeT / PIM:  mask_positional_token [1,1,C]   decoder.weight [V,C]  decoder.bias [V]
  MIM (BEiT):   mask_token [1,1,C]              lm_head.weight [V,C]  lm_head.bias [V]

* ``mapet_forward``: the two-stream model with auxiliary positional tokens. Content stream
  h = [x_0..x_{N-1} ; m_0..m_{P-1}], query stream g = [m_0..m_{P-1}], m_j = mask_positional_token
  + pos_embed[p_j]; both streams share every weight, K and V come from norm1(h) only; dense
  boolean masks from the ALGORITHMS.md §2 sentences (``two_stream_masks``). Logits [B, P, V] for the
  predicted positions in ascending order: decoder(norm(g)).
* ``pim_forward``: the same without auxiliary positional tokens (h has N rows; content rows
  see the context, earlier tokens and themselves; query rows the context and earlier tokens).
  The query stream starts, as in MaPeT, from m_j = mask_positional_token + pos_embed[p_j]
  (the only position-bearing input XLNet-style PIM has for the token to predict).
* ``mim_forward``: BEiT MIM. Patch embeddings of masked patches are replaced by ``mask_token``
  before the class token is prepended and pos_embed added; full attention; lm_head(norm(x))
  at the masked patches, ascending per sample → [B, M, V] (every mask has the same count M).

``drop_path`` (optional) is an array [depth, 2, B] of per-sample residual multipliers
(0 or 1/keep) for the attention and MLP branch of every block, shared by both streams.
Losses: mean cross-entropy over predicted (MaPeT/PIM, optionally restricted by a loss mask)
or masked (MIM) positions against the visual token of that patch (``tokens`` [B, n]).

Mixed precision (ALGORITHMS.md §7): inside ``with bf16_matmuls():`` every matrix product of these
references (patch embedding, linears, QKᵀ, PV — not the losses) first rounds both inputs to
bfloat16 (``bf16_round``: float32, then round to nearest, ties to even, to the upper 16 bits)
and multiplies in float64 — what an autocast engine computes up to its fp32 accumulation.
"""
import contextlib
import math
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

try:
    from scipy.special import erf as _erf
except ImportError:  # pragma: no cover
    _erf = np.vectorize(math.erf)

Weights = Dict[str, np.ndarray]


# ------------------------------------------------------------------ bf16 matrix products

def bf16_round(x: np.ndarray) -> np.ndarray:
    """x as float32, rounded to the nearest bfloat16 (ties to even; NaN stays NaN), as float64."""
    a = np.ascontiguousarray(x, dtype=np.float32)
    bits = a.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(a), a, rounded).astype(np.float64)


_BF16 = [False]


@contextlib.contextmanager
def bf16_matmuls() -> Iterator[None]:
    """Within the block, ``mm`` (every matrix product of the references) rounds its inputs to bf16."""
    _BF16.append(True)
    try:
        yield
    finally:
        _BF16.pop()


def mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b in float64, inputs rounded to bf16 first inside ``bf16_matmuls()``."""
    if _BF16[-1]:
        return bf16_round(a) @ bf16_round(b)
    return np.asarray(a, dtype=np.float64) @ np.asarray(b, dtype=np.float64)


# ------------------------------------------------------------------ pieces

def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def linear(x: np.ndarray, weights: Weights, name: str) -> np.ndarray:
    y = mm(x, weights[name + ".weight"].T)
    if name + ".bias" in weights:
        y = y + weights[name + ".bias"]
    return y


def as_float64(weights: Dict[str, np.ndarray]) -> Weights:
    return {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}


def patchify(images: np.ndarray, p: int) -> np.ndarray:
    """[B, in, H, W] → [B, n, in·p·p]: patches in row-major grid order, each flattened in
    (channel, row, col) order — the conv ``patch_embed.proj`` as a GEMM."""
    B, c, H, W = images.shape
    gh, gw = H // p, W // p
    x = images.reshape(B, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(B, gh * gw, c * p * p)


def embed_patches(weights: Weights, images: np.ndarray) -> np.ndarray:
    w = weights["patch_embed.proj.weight"]
    C, p = w.shape[0], w.shape[-1]
    return mm(patchify(np.asarray(images, dtype=np.float64), p), w.reshape(C, -1).T) + weights["patch_embed.proj.bias"]


def depth_of(weights: Weights) -> int:
    d = 0
    while f"blocks.{d}.norm1.weight" in weights:
        d += 1
    return d


def attention(weights: Weights, pre: str, xq: np.ndarray, xkv: np.ndarray, allowed: Optional[np.ndarray],
              heads: int) -> np.ndarray:
    """proj(softmax(q(xq)·k(xkv)ᵀ/√d + mask)·v(xkv)); allowed [B, M, K] bool or None (full)."""
    B, M, C = xq.shape
    K = xkv.shape[1]
    d = C // heads
    q = linear(xq, weights, pre + ".q").reshape(B, M, heads, d).transpose(0, 2, 1, 3)
    kv = linear(xkv, weights, pre + ".kv")
    k = kv[..., :C].reshape(B, K, heads, d).transpose(0, 2, 1, 3)
    v = kv[..., C:].reshape(B, K, heads, d).transpose(0, 2, 1, 3)
    s = mm(q, k.transpose(0, 1, 3, 2)) / math.sqrt(d)
    if allowed is not None:
        s = np.where(allowed[:, None], s, -np.inf)
    s = s - s.max(axis=-1, keepdims=True)
    a = np.exp(s)
    a = a / a.sum(axis=-1, keepdims=True)
    out = mm(a, v).transpose(0, 2, 1, 3).reshape(B, M, C)
    return linear(out, weights, pre + ".proj")


def mlp(weights: Weights, pre: str, x: np.ndarray) -> np.ndarray:
    return linear(gelu(linear(x, weights, pre + ".fc1")), weights, pre + ".fc2")


def _gamma(weights: Weights, name: str, C: int) -> np.ndarray:
    return weights.get(name, np.ones(C))


def _keep(drop_path: Optional[np.ndarray], i: int, branch: int, B: int) -> np.ndarray:
    if drop_path is None:
        return np.ones((B, 1, 1))
    return np.asarray(drop_path, dtype=np.float64)[i, branch].reshape(B, 1, 1)


# ------------------------------------------------------------------ masks (ALGORITHMS.md §2 sentences)

def two_stream_masks(orders: np.ndarray, least_number: int,
                     positional_tokens: bool = True) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense may-attend masks from permutation orders [B, N].

    Returns (content [B, K, K], query [B, P, K], predicted [B, P]) with K = N + P (MaPeT) or
    N (PIM), True = may attend.
    """
    orders = np.asarray(orders)
    B, N = orders.shape
    L = least_number
    P = N - L
    ranks = np.argsort(orders, axis=1)
    in_context = ranks < L                                             # [B, N]
    predicted = np.stack([np.nonzero(~in_context[b])[0] for b in range(B)]).reshape(B, P)
    prank = np.take_along_axis(ranks, predicted, axis=1)               # [B, P]
    eye = np.eye(N, dtype=bool)[None]
    # content token r -> token c: c in context, or c earlier than r, or c = r
    tok_tok = in_context[:, None, :] | (ranks[:, None, :] < ranks[:, :, None]) | eye
    # query p_i -> token c: c in context or earlier than p_i (never itself)
    q_tok = in_context[:, None, :] | (ranks[:, None, :] < prank[:, :, None])
    if not positional_tokens:
        return tok_tok, q_tok, predicted
    # content token r -> m_j: iff r may NOT attend p_j
    tok_m = ~np.take_along_axis(tok_tok, np.broadcast_to(predicted[:, None, :], (B, N, P)), axis=2)
    m_tok = np.broadcast_to(in_context[:, None, :], (B, P, N))         # m_i -> token c: c in context
    m_m = np.ones((B, P, P), dtype=bool)                               # m_i -> m_j: always
    content = np.concatenate([np.concatenate([tok_tok, tok_m], 2), np.concatenate([m_tok, m_m], 2)], 1)
    q_m = prank[:, None, :] >= prank[:, :, None]                       # p_i -> m_j: rank(p_j) >= rank(p_i)
    return content, np.concatenate([q_tok, q_m], 2), predicted


# ------------------------------------------------------------------ models

def two_stream_forward(weights: Dict[str, np.ndarray], images: np.ndarray, orders: np.ndarray,
                       least_number: int, num_heads: int, positional_tokens: bool = True,
                       drop_path: Optional[np.ndarray] = None) -> np.ndarray:
    """MaPeT (positional_tokens=True) or PIM (False) logits [B, P, V] for the predicted
    positions in ascending order."""
    w = as_float64(weights)
    x = embed_patches(w, images)
    B, n, C = x.shape
    N = n + 1
    content, query, predicted = two_stream_masks(orders, least_number, positional_tokens)
    pos = w["pos_embed"].reshape(N, C)
    x = np.concatenate([np.broadcast_to(w["cls_token"].reshape(1, 1, C), (B, 1, C)), x], 1) + pos
    m = w["mask_positional_token"].reshape(1, 1, C) + pos[predicted]    # [B, P, C]
    h = np.concatenate([x, m], 1) if positional_tokens else x
    g = m
    for i in range(depth_of(w)):
        pre = f"blocks.{i}"
        hn = layer_norm(h, w[pre + ".norm1.weight"], w[pre + ".norm1.bias"])
        gn = layer_norm(g, w[pre + ".norm1.weight"], w[pre + ".norm1.bias"])
        ls1, ls2 = _gamma(w, pre + ".ls1.gamma", C), _gamma(w, pre + ".ls2.gamma", C)
        k1, k2 = _keep(drop_path, i, 0, B), _keep(drop_path, i, 1, B)
        h_att = attention(w, pre + ".attn", hn, hn, content, num_heads)
        g_att = attention(w, pre + ".attn", gn, hn, query, num_heads)
        h = h + k1 * ls1 * h_att
        g = g + k1 * ls1 * g_att
        h = h + k2 * ls2 * mlp(w, pre + ".mlp", layer_norm(h, w[pre + ".norm2.weight"], w[pre + ".norm2.bias"]))
        g = g + k2 * ls2 * mlp(w, pre + ".mlp", layer_norm(g, w[pre + ".norm2.weight"], w[pre + ".norm2.bias"]))
    g = layer_norm(g, w["norm.weight"], w["norm.bias"])
    return linear(g, w, "decoder")


def mapet_forward(weights, images, orders, least_number, num_heads, drop_path=None) -> np.ndarray:
    """MaPeT logits [B, P, V] (see module docstring)."""
    return two_stream_forward(weights, images, orders, least_number, num_heads, True, drop_path)


def pim_forward(weights, images, orders, least_number, num_heads, drop_path=None) -> np.ndarray:
    """PIM logits [B, P, V]: the two-stream model without auxiliary positional tokens."""
    return two_stream_forward(weights, images, orders, least_number, num_heads, False, drop_path)


def mim_forward(weights: Dict[str, np.ndarray], images: np.ndarray, bool_masked_pos: np.ndarray,
                num_heads: int, drop_path: Optional[np.ndarray] = None) -> np.ndarray:
    """BEiT MIM logits [B, M, V] at the masked patches (ascending per sample)."""
    w = as_float64(weights)
    x = embed_patches(w, images)
    B, n, C = x.shape
    mask = np.asarray(bool_masked_pos, dtype=bool).reshape(B, n)
    M = int(mask[0].sum())
    assert (mask.sum(axis=1) == M).all(), "every sample must mask the same number of patches"
    x = np.where(mask[..., None], w["mask_token"].reshape(1, 1, C), x)
    x = np.concatenate([np.broadcast_to(w["cls_token"].reshape(1, 1, C), (B, 1, C)), x], 1)
    x = x + w["pos_embed"].reshape(1, n + 1, C)
    for i in range(depth_of(w)):
        pre = f"blocks.{i}"
        ls1, ls2 = _gamma(w, pre + ".ls1.gamma", C), _gamma(w, pre + ".ls2.gamma", C)
        xn = layer_norm(x, w[pre + ".norm1.weight"], w[pre + ".norm1.bias"])
        x = x + _keep(drop_path, i, 0, B) * ls1 * attention(w, pre + ".attn", xn, xn, None, num_heads)
        xn = layer_norm(x, w[pre + ".norm2.weight"], w[pre + ".norm2.bias"])
        x = x + _keep(drop_path, i, 1, B) * ls2 * mlp(w, pre + ".mlp", xn)
    x = layer_norm(x, w["norm.weight"], w["norm.bias"])[:, 1:]
    return linear(x[mask].reshape(B, M, C), w, "lm_head")


# ------------------------------------------------------------------ losses

def cross_entropy(logits: np.ndarray, targets: np.ndarray, weights: Optional[np.ndarray] = None) -> float:
    """Mean (or ``weights``-weighted sum) of -log softmax(logits)[target] over the last axis."""
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], axis=-1)[..., 0]
    if weights is None:
        return float(nll.mean())
    return float((nll * weights).sum())


def two_stream_loss(logits: np.ndarray, tokens: np.ndarray, predicted: np.ndarray,
                    loss_mask: Optional[np.ndarray] = None) -> float:
    """Mean CE over predicted tokens (all, or those where ``loss_mask``) against the visual
    token of patch p_j: ``tokens[b, p_j − 1]`` (tokens are per patch, [B, n])."""
    targets = np.take_along_axis(np.asarray(tokens, dtype=np.int64), np.asarray(predicted) - 1, axis=1)
    if loss_mask is None:
        return cross_entropy(logits, targets)
    m = np.asarray(loss_mask, dtype=np.float64)
    return cross_entropy(logits, targets, m / m.sum())


def mim_loss(logits: np.ndarray, tokens: np.ndarray, bool_masked_pos: np.ndarray) -> float:
    """Mean CE over masked patches."""
    B = logits.shape[0]
    targets = np.asarray(tokens, dtype=np.int64)[np.asarray(bool_masked_pos, dtype=bool).reshape(B, -1)]
    return cross_entropy(logits, targets.reshape(B, -1))


# ------------------------------------------------------------------ weights for tests

def random_weights(rng: np.random.Generator, *, embed_dim: int = 16, depth: int = 2, num_heads: int = 2,
                   patch_size: int = 4, img_size: int = 16, in_chans: int = 3, num_tokens: int = 11,
                   mlp_ratio: float = 4.0, layer_scale: bool = True, kind: str = "mapet",
                   head_layers: int = 2, output_dim: int = 8) -> Weights:
    """Random float32 weights with the reference names (scales chosen so that every part of the
    network matters in a test: unit-ish activations, non-trivial layer scale and norms).

    kind: "mapet" / "pim" (decoder), "mim" (mask_token, lm_head [num_tokens, C]), "ccvit" (as
    "mim", plus the pixel head: ``head_layers`` blocks cls_pt_layers.{i}.*, cls_pt_norm and
    cls_pt_lm_head [in_chans·patch², C]) or "dtm" (mask_token, lm_head [output_dim, C])."""
    C, H = embed_dim, int(embed_dim * mlp_ratio)
    n = (img_size // patch_size) ** 2

    def t(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {
        "cls_token": t(1, 1, C), "pos_embed": t(1, n + 1, C),
        "patch_embed.proj.weight": t(C, in_chans, patch_size, patch_size, scale=0.2), "patch_embed.proj.bias": t(C),
        "norm.weight": 1 + t(C, scale=0.1), "norm.bias": t(C, scale=0.1),
    }

    def block(pre: str) -> None:
        w.update({
            pre + ".norm1.weight": 1 + t(C, scale=0.1), pre + ".norm1.bias": t(C, scale=0.1),
            pre + ".attn.q.weight": t(C, C), pre + ".attn.q.bias": t(C, scale=0.1),
            pre + ".attn.kv.weight": t(2 * C, C), pre + ".attn.kv.bias": t(2 * C, scale=0.1),
            pre + ".attn.proj.weight": t(C, C), pre + ".attn.proj.bias": t(C, scale=0.1),
            pre + ".norm2.weight": 1 + t(C, scale=0.1), pre + ".norm2.bias": t(C, scale=0.1),
            pre + ".mlp.fc1.weight": t(H, C), pre + ".mlp.fc1.bias": t(H, scale=0.1),
            pre + ".mlp.fc2.weight": t(C, H, scale=0.15), pre + ".mlp.fc2.bias": t(C, scale=0.1),
        })
        if layer_scale:
            w[pre + ".ls1.gamma"] = 0.5 + t(C, scale=0.1)
            w[pre + ".ls2.gamma"] = 0.5 + t(C, scale=0.1)

    for i in range(depth):
        block(f"blocks.{i}")
    if kind in ("mapet", "pim"):
        w["mask_positional_token"] = t(1, 1, C)
        w["decoder.weight"], w["decoder.bias"] = t(num_tokens, C), t(num_tokens, scale=0.1)
    elif kind in ("mim", "ccvit"):
        w["mask_token"] = t(1, 1, C)
        w["lm_head.weight"], w["lm_head.bias"] = t(num_tokens, C), t(num_tokens, scale=0.1)
        if kind == "ccvit":
            P = in_chans * patch_size * patch_size
            for i in range(head_layers):
                block(f"cls_pt_layers.{i}")
            w["cls_pt_norm.weight"], w["cls_pt_norm.bias"] = 1 + t(C, scale=0.1), t(C, scale=0.1)
            w["cls_pt_lm_head.weight"], w["cls_pt_lm_head.bias"] = t(P, C), t(P, scale=0.1)
    elif kind == "dtm":
        w["mask_token"] = t(1, 1, C)
        w["lm_head.weight"], w["lm_head.bias"] = t(output_dim, C), t(output_dim, scale=0.1)
    else:
        raise ValueError(f"kind: expected 'mapet', 'pim', 'mim', 'ccvit' or 'dtm', got {kind!r}")
    return w

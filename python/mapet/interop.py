"""Parameter names of the BEiT-family reference code (BEiT, CCViT, DTM) ↔ mapet's names.

mapet's blocks carry the names of the MaPeT reference (timm-style ``attn.q`` / ``attn.kv``
linears with biases, ``ls1.gamma`` / ``ls2.gamma`` layer scale), because MaPeT's two-stream
attention needs separate query and key/value projections. The BEiT code base, on which
Cakeyan/CCViT_Public and naver-ai/dtm are built, fuses them: ``attn.qkv.weight`` without a bias,
``attn.q_bias`` and ``attn.v_bias`` (the key has no bias), and ``gamma_1`` / ``gamma_2``.
Everything else (``patch_embed``, ``cls_token``, ``pos_embed``, ``mask_token``, ``norm1``,
``mlp.fc1``, ``norm``, ``lm_head``, ``cls_pt_*``) has the same name in both.

A key bias adds ``q·b_k`` to every score of a query row, which the softmax cancels: it changes
no output and its gradient is zero up to rounding, so :func:`to_beit_layout` drops it (an
optimizer may have moved it by rounding-level gradients; the outputs do not depend on it).

Example:
    >>> import mapet
    >>> from mapet.interop import from_beit_layout, to_beit_layout
    >>> m = mapet.create_model("ccvit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_tokens=16)
    >>> ref = to_beit_layout(m.state_dict())
    >>> ref["blocks.0.attn.qkv.weight"].shape, "blocks.0.gamma_1" in ref
    ((576, 192), True)
    >>> sorted(from_beit_layout(ref)) == sorted(m.state_dict())
    True
"""
from __future__ import annotations

import logging
import re
from typing import Dict, Mapping

import numpy as np

__all__ = ["is_beit_layout", "from_beit_layout", "to_beit_layout"]

log = logging.getLogger(__name__)

_BEIT_ONLY = re.compile(r"(^|\.)(attn\.qkv\.weight|attn\.q_bias|attn\.v_bias|gamma_1|gamma_2)$")


def is_beit_layout(state_dict: Mapping[str, object]) -> bool:
    """True when ``state_dict`` uses the fused BEiT attention / layer-scale names."""
    return any(_BEIT_ONLY.search(k) for k in state_dict)


def _blocks(state_dict: Mapping[str, object], suffix: str):
    """Prefixes ``…blocks.i.`` / ``…cls_pt_layers.i.`` of every block that has ``suffix``."""
    return sorted(k[: -len(suffix)] for k in state_dict if k.endswith(suffix))


def from_beit_layout(state_dict: Mapping[str, object]) -> Dict[str, np.ndarray]:
    """BEiT / CCViT / DTM reference names → mapet names (new dict; arrays float32).

    ``attn.qkv.weight`` [3C, C] splits into ``attn.q.weight`` [C, C] and ``attn.kv.weight``
    [2C, C]; ``attn.q_bias`` becomes ``attn.q.bias``; ``attn.kv.bias`` is ``[0 ; v_bias]``
    (zeros when the reference has no biases); ``gamma_1`` / ``gamma_2`` become ``ls1.gamma`` /
    ``ls2.gamma``. Keys of other modules pass through unchanged.

    Raises:
        ValueError: a fused weight whose first dimension is not 3 × its second.
    """
    out = {k: np.asarray(v, dtype=np.float32) for k, v in state_dict.items()}
    for pre in _blocks(out, "attn.qkv.weight"):
        w = out.pop(pre + "attn.qkv.weight")
        C = w.shape[1]
        if w.ndim != 2 or w.shape[0] != 3 * C:
            raise ValueError(f"{pre}attn.qkv.weight: expected shape [3·C, C], got {w.shape}")
        out[pre + "attn.q.weight"] = np.ascontiguousarray(w[:C])
        out[pre + "attn.kv.weight"] = np.ascontiguousarray(w[C:])
        q_bias = out.pop(pre + "attn.q_bias", None)
        v_bias = out.pop(pre + "attn.v_bias", None)
        out[pre + "attn.q.bias"] = np.zeros(C, np.float32) if q_bias is None else q_bias
        out[pre + "attn.kv.bias"] = np.concatenate(
            [np.zeros(C, np.float32), np.zeros(C, np.float32) if v_bias is None else v_bias])
    for k in [k for k in out if k.endswith("gamma_1") or k.endswith("gamma_2")]:
        out[k[: -len("gamma_1")] + ("ls1.gamma" if k.endswith("1") else "ls2.gamma")] = out.pop(k)
    return out


def to_beit_layout(state_dict: Mapping[str, object]) -> Dict[str, np.ndarray]:
    """mapet names → BEiT / CCViT / DTM reference names (the inverse of :func:`from_beit_layout`).

    The key bias (first C entries of ``attn.kv.bias``) has no place in the fused layer and no
    effect on any output; it is dropped (its largest magnitude is logged at DEBUG level).
    """
    out = {k: np.asarray(v, dtype=np.float32) for k, v in state_dict.items()}
    for pre in _blocks(out, "attn.q.weight"):
        q, kv = out.pop(pre + "attn.q.weight"), out.pop(pre + "attn.kv.weight")
        C = q.shape[1]
        out[pre + "attn.qkv.weight"] = np.concatenate([q, kv])
        q_bias, kv_bias = out.pop(pre + "attn.q.bias", None), out.pop(pre + "attn.kv.bias", None)
        if kv_bias is not None:
            log.debug("%sattn.kv.bias: dropping the key bias (max |b_k| = %.3g)", pre, float(np.abs(kv_bias[:C]).max()))
            out[pre + "attn.q_bias"] = q_bias if q_bias is not None else np.zeros(C, np.float32)
            out[pre + "attn.v_bias"] = np.ascontiguousarray(kv_bias[C:])
    for k in [k for k in out if k.endswith("ls1.gamma") or k.endswith("ls2.gamma")]:
        out[k[: -len("ls1.gamma")] + ("gamma_1" if k.endswith("ls1.gamma") else "gamma_2")] = out.pop(k)
    return out

"""Array painters behind :mod:`mapet.viz`'s figures (re-exported there): patches coloured by their
DTM token group or their visual token. They return images as arrays; no figure is made here."""
from __future__ import annotations

from typing import Any

import numpy as np

# distinguishable colours (Okabe–Ito), RGB
PALETTE = np.array([[0, 114, 178], [213, 94, 0], [0, 158, 115], [204, 121, 167], [230, 159, 0],
                    [86, 180, 233], [240, 228, 66], [0, 0, 0]], dtype=np.uint8)


def group_overlay(images: np.ndarray, membership: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Paint every patch of ``images`` with the colour of its token group (DTM morphing).

    Args:
        images: [B, C, H, W] in [0, 1] (C = 1 or 3), a square grid of patches.
        membership: [B, n] group id of every patch (``mapet.morph_tokens(...).membership``);
            groups of one patch are left unpainted, so merged regions stand out.
        alpha: weight of the group colour.

    Returns:
        float [B, 3, H, W] in [0, 1], for :func:`image_rows`.

    Example:
        >>> x = np.zeros((1, 3, 8, 8)); g = np.array([[0, 0, 1, 2]])
        >>> group_overlay(x, g).shape
        (1, 3, 8, 8)
    """
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"group_overlay: expected images [B, 1|3, H, W], got shape {x.shape}")
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    g = np.asarray(membership)
    B, _, H, W = x.shape
    grid = int(round(g.shape[-1] ** 0.5)) if g.ndim == 2 else 0
    if g.shape != (B, grid * grid) or H % grid or W % grid:
        raise ValueError(f"group_overlay: membership must be [{B}, a square number of patches dividing "
                         f"{H}×{W}], got shape {g.shape}")
    ph, pw = H // grid, W // grid
    colours = PALETTE[:7].astype(np.float64) / 255.0  # no black
    out = x.copy()
    for b in range(B):
        ids, counts = np.unique(g[b], return_counts=True)
        merged = {int(i): k for k, i in enumerate(ids[counts > 1])}
        for q, gid in enumerate(g[b]):
            if int(gid) in merged:
                r, c = divmod(q, grid)
                tile_ = out[b, :, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw]
                tile_ *= 1 - alpha
                tile_ += alpha * colours[merged[int(gid)] % len(colours)][:, None, None]
    return out


def token_colors(tokens: Any) -> np.ndarray:
    """A colour per token id: float [..., 3] in [0, 1], hue stepping by the golden ratio so that nearby ids
    look different; the same id always gets the same colour."""
    from matplotlib.colors import hsv_to_rgb
    t = np.asarray(tokens, dtype=np.int64)
    hsv = np.stack([(t * 0.6180339887498949) % 1.0, 0.55 + 0.35 * ((t // 7) % 2), 0.95 - 0.25 * ((t // 3) % 2)], -1)
    return hsv_to_rgb(hsv)


def token_maps(tokens: Any, size: int) -> np.ndarray:
    """Images [B, 3, size, size] with every patch filled by the colour of its token.

    Args:
        tokens: [B, n] token ids of a square grid of patches (row-major, as the models' patches).
        size: side of the output images (a multiple of the grid side).

    Example:
        >>> token_maps(np.array([[0, 1, 2, 3]]), 8).shape
        (1, 3, 8, 8)
    """
    t = np.asarray(tokens)
    grid = int(round(t.shape[-1] ** 0.5)) if t.ndim == 2 else 0
    if t.ndim != 2 or grid * grid != t.shape[1] or grid == 0 or int(size) % grid:
        raise ValueError(f"token_maps: tokens must be [B, a square number of patches dividing size {size}], "
                         f"got shape {t.shape}")
    p = int(size) // grid
    colours = token_colors(t).reshape(t.shape[0], grid, grid, 3)
    return np.ascontiguousarray(colours.repeat(p, 1).repeat(p, 2).transpose(0, 3, 1, 2))

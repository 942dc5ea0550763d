"""Pictures as PNG files: training curves, attention masks, image grids, token groups.

Works with NumPy alone (a small PNG encoder over ``zlib`` and a line rasteriser); when
matplotlib is installed, ``plot_curves`` uses it for labelled axes and a legend
(``backend="auto"``). Files are written atomically.
"""
import logging
import struct
import zlib
from typing import Mapping, Optional, Sequence

import numpy as np

from .io import atomic_write

logger = logging.getLogger(__name__)

# distinguishable line colours (Okabe–Ito), RGB
PALETTE = np.array([[0, 114, 178], [213, 94, 0], [0, 158, 115], [204, 121, 167], [230, 159, 0],
                    [86, 180, 233], [240, 228, 66], [0, 0, 0]], dtype=np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes for uint8 pixels [H, W] (grey), [H, W, 3] (RGB) or [H, W, 4] (RGBA).

    8-bit, no interlace, filter 0 on every row, zlib level 6.
    """
    a = np.asarray(pixels)
    if a.dtype != np.uint8:
        raise TypeError(f"encode_png: pixels must be uint8, got {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"encode_png: expected [H, W], [H, W, 3] or [H, W, 4] with H, W > 0, got {pixels.shape}")
    h, w, c = a.shape
    color_type = {1: 0, 3: 2, 4: 6}[c]
    raw = np.zeros((h, 1 + w * c), dtype=np.uint8)  # leading 0 = filter "None" per row
    raw[:, 1:] = a.reshape(h, w * c)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
            + chunk(b"IEND", b""))


def write_png(path: str, pixels: np.ndarray) -> None:
    """Write uint8 pixels ([H, W], [H, W, 3] or [H, W, 4]) to ``path`` as PNG, atomically."""
    data = encode_png(pixels)
    atomic_write(path, lambda f: f.write(data))


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def image_grid(path: Optional[str], images: np.ndarray, nrow: Optional[int] = None, padding: int = 2,
               scale: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Tile images into one PNG.

    Args:
        path: output file (None: only return the pixels).
        images: float NCHW in [0, 1] (values outside are clipped), C = 1 or 3; or NHW.
        nrow: images per row (default ``ceil(sqrt(N))``).
        padding: pixels between tiles and around the grid.
        scale: integer nearest-neighbour magnification (small images such as 32×32 digits).
        pad_value: grey level of the padding in [0, 1].

    Returns:
        The uint8 pixels written, [H, W, 3].

    Example:
        >>> image_grid("grid.png", np.concatenate([images[:8], recon[:8]]), nrow=8, scale=4)
    """
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"image_grid: expected images [N, 1|3, H, W] (or [N, H, W]), got shape {np.shape(images)}")
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    n, _, h, w = x.shape
    if scale > 1:
        x = x.repeat(scale, axis=2).repeat(scale, axis=3)
        h, w = h * scale, w * scale
    cols = int(nrow) if nrow else int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, 3), pad_value, np.float64)
    for k in range(n):
        r, c = divmod(k, cols)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top:top + h, left:left + w] = x[k].transpose(1, 2, 0)
    pixels = _to_uint8(grid)
    if path is not None:
        write_png(path, pixels)
    return pixels


def group_overlay(images: np.ndarray, membership: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Paint every patch of ``images`` with the colour of its token group (DTM morphing).

    Args:
        images: [B, C, H, W] in [0, 1] (C = 1 or 3), a square grid of patches.
        membership: [B, n] group id of every patch (``mapet.morph_tokens(...).membership``);
            groups of one patch are left unpainted, so merged regions stand out.
        alpha: weight of the group colour.

    Returns:
        float [B, 3, H, W] in [0, 1], for :func:`image_grid`.

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
                tile = out[b, :, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw]
                tile *= 1 - alpha
                tile += alpha * colours[merged[int(gid)] % len(colours)][:, None, None]
    return out


def mask_image(mask: np.ndarray, cell: int = 4, true_color=(0, 0, 0), false_color=(255, 255, 255)) -> np.ndarray:
    """A boolean matrix as uint8 RGB pixels, each entry a ``cell``×``cell`` square."""
    m = np.asarray(mask)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"mask_image: expected a non-empty 2-D mask, got shape {m.shape}")
    m = m.astype(bool).repeat(cell, axis=0).repeat(cell, axis=1)
    return np.where(m[:, :, None], np.asarray(true_color, np.uint8), np.asarray(false_color, np.uint8))


def plot_masks(path: str, content_mask: np.ndarray, query_mask: np.ndarray, cell: Optional[int] = None,
               gap: int = 8) -> np.ndarray:
    """Draw a permutation's content mask [(N+P), (N+P)] above its query mask [P, (N+P)].

    Dark = "may attend" (True). Both share the column axis, so a query row lines up with the
    content columns it may read. Returns the uint8 RGB pixels written.

    Example:
        >>> plot_masks("masks.png", batch.content_mask(0), batch.query_mask(0))
    """
    c, q = np.asarray(content_mask), np.asarray(query_mask)
    if c.ndim != 2 or q.ndim != 2 or c.shape[1] != q.shape[1]:
        raise ValueError(f"plot_masks: masks must be 2-D with the same number of columns, got "
                         f"content {c.shape} and query {q.shape}")
    if cell is None:
        cell = max(1, min(8, 1024 // max(c.shape[1], 1)))
    top, bottom = mask_image(c, cell), mask_image(q, cell)
    sep = np.full((gap, top.shape[1], 3), (200, 60, 60), np.uint8)  # a red band separates the two
    pixels = np.concatenate([top, sep, bottom], axis=0)
    write_png(path, pixels)
    return pixels


def _draw_line(canvas: np.ndarray, x0: float, y0: float, x1: float, y1: float, color, width: int = 1) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.rint(np.linspace(x0, x1, n + 1)).astype(int)
    ys = np.rint(np.linspace(y0, y1, n + 1)).astype(int)
    h, w = canvas.shape[:2]
    r = width // 2
    for dy in range(-r, width - r):
        for dx in range(-r, width - r):
            yy, xx = ys + dy, xs + dx
            ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            canvas[yy[ok], xx[ok]] = color


def _curves_numpy(curves: Mapping[str, Sequence[float]], width: int, height: int, logy: bool) -> np.ndarray:
    canvas = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 40, width - 16, 16, height - 32
    series = []
    for k, (name, values) in enumerate(curves.items()):
        v = np.asarray(values, dtype=np.float64).ravel()
        if logy:
            v = np.where(v > 0, np.log10(np.where(v > 0, v, 1.0)), np.nan)
        series.append((name, v, PALETTE[k % len(PALETTE)]))
    finite = np.concatenate([v[np.isfinite(v)] for _, v, _ in series] + [np.zeros(0)])
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    longest = max((len(v) for _, v, _ in series), default=1)
    for t in np.linspace(0, 1, 5):  # light grid
        y = bottom - t * (bottom - top)
        _draw_line(canvas, left, y, right, y, (230, 230, 230))
    _draw_line(canvas, left, top, left, bottom, (0, 0, 0))
    _draw_line(canvas, left, bottom, right, bottom, (0, 0, 0))
    for _, v, color in series:
        if len(v) == 0:
            continue
        xs = left + (np.arange(len(v)) / max(longest - 1, 1)) * (right - left)
        ys = bottom - (v - lo) / (hi - lo) * (bottom - top)
        if len(v) == 1:
            _draw_line(canvas, xs[0], ys[0], xs[0], ys[0], color, 3)
        for i in range(len(v) - 1):
            if np.isfinite(ys[i]) and np.isfinite(ys[i + 1]):
                _draw_line(canvas, xs[i], ys[i], xs[i + 1], ys[i + 1], color, 2)
    for k, (_, _, color) in enumerate(series):  # legend swatches in series order, bottom left
        x0 = left + 4 + 22 * k
        canvas[height - 20:height - 8, x0:x0 + 16] = color
    return canvas


def _pyplot(backend: str, caller: str):
    """matplotlib.pyplot (Agg) for backend "matplotlib", or for "auto" when it is installed; else None."""
    if backend not in ("auto", "matplotlib", "numpy"):
        raise ValueError(f"{caller}: backend must be 'auto', 'matplotlib' or 'numpy', got {backend!r}")
    if backend == "numpy":
        return None
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        if backend == "matplotlib":
            raise
        return None
    return plt


def plot_curves(path: str, curves: Mapping[str, Sequence[float]], title: Optional[str] = None,
                xlabel: str = "step", logy: bool = False, backend: str = "auto",
                width: int = 640, height: int = 400) -> str:
    """Plot named series (e.g. ``{"mapet loss": [...], "mim loss": [...]}``) into a PNG.

    Each series is spread over the full x range of the longest one; NaN/Inf points are left out.

    Args:
        path: output PNG.
        curves: name → values.
        title, xlabel: labels (matplotlib backend only).
        logy: logarithmic y axis.
        backend: "auto" (matplotlib if importable, else NumPy), "matplotlib" or "numpy". The NumPy
            renderer draws axes, a grid and the lines in ``PALETTE`` order with colour swatches
            in the same order (no text: it has no font).
        width, height: pixels.

    Returns:
        The backend used ("matplotlib" or "numpy").
    """
    if not curves:
        raise ValueError("plot_curves: no curves given")
    plt = _pyplot(backend, "plot_curves")
    if plt is not None:
        fig, ax = plt.subplots(figsize=(width / 100, height / 100), dpi=100)
        try:
            for k, (name, values) in enumerate(curves.items()):
                ax.plot(np.asarray(values, dtype=np.float64).ravel(), label=name,
                        color=PALETTE[k % len(PALETTE)] / 255.0)
            if logy:
                ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            if title:
                ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            import io as _io
            buf = _io.BytesIO()
            fig.savefig(buf, format="png")
        finally:
            plt.close(fig)
        data = buf.getvalue()
        atomic_write(path, lambda f: f.write(data))
        return "matplotlib"
    write_png(path, _curves_numpy(curves, width, height, logy))
    return "numpy"


def plot_bars(path: str, table: Mapping[str, Mapping[str, float]], title: Optional[str] = None,
              backend: str = "auto", width: int = 640, height: int = 400) -> str:
    """Grouped bar chart of a results table (e.g. method → {"linear probe": 0.9, "fine-tune": 0.8})
    with values in [0, 1] (accuracies), written as a PNG.

    Rows are groups along x, columns are bars within a group in ``PALETTE`` order. The NumPy
    renderer (used without matplotlib) draws the bars, gridlines at 0.25 steps and a baseline;
    a bar of value v is ``round(v · plot height)`` pixels tall.

    Returns:
        The backend used ("matplotlib" or "numpy").
    """
    if not table:
        raise ValueError("plot_bars: empty table")
    rows = list(table)
    cols = list(dict.fromkeys(c for r in rows for c in table[r]))
    values = np.array([[float(table[r].get(c, np.nan)) for c in cols] for r in rows])
    plt = _pyplot(backend, "plot_bars")
    if plt is not None:
        fig, ax = plt.subplots(figsize=(width / 100, height / 100), dpi=100)
        try:
            w = 0.8 / len(cols)
            for j, c in enumerate(cols):
                ax.bar(np.arange(len(rows)) + (j - (len(cols) - 1) / 2) * w, values[:, j], w, label=c,
                       color=PALETTE[j % len(PALETTE)] / 255.0)
            ax.set_xticks(np.arange(len(rows)), rows)
            ax.set_ylim(0, 1)
            if title:
                ax.set_title(title)
            ax.legend()
            ax.grid(axis="y", alpha=0.3)
            fig.tight_layout()
            fig.savefig(path, format="png")
        finally:
            plt.close(fig)
        return "matplotlib"
    margin = 20
    plot_h = height - 2 * margin
    canvas = np.full((height, width, 3), 255, np.uint8)
    for k in range(1, 5):  # gridlines at 0.25, 0.5, 0.75, 1.0
        y = height - margin - int(round(k / 4 * plot_h))
        canvas[y, margin:width - margin] = (220, 220, 220)
    group_w = (width - 2 * margin) / len(rows)
    bar_w = max(1, int(group_w * 0.8 / len(cols)))
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = values[i, j]
            if not np.isfinite(v):
                continue
            h = int(round(min(max(v, 0.0), 1.0) * plot_h))
            x0 = int(margin + i * group_w + group_w * 0.1 + j * bar_w)
            if h:
                canvas[height - margin - h:height - margin, x0:x0 + bar_w - 1] = PALETTE[j % len(PALETTE)]
    canvas[height - margin, margin:width - margin] = (0, 0, 0)  # baseline
    write_png(path, canvas)
    return "numpy"

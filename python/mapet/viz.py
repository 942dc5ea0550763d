"""Figures a person can read: training curves, results bars, MaPeT's attention masks, captioned
rows of images.

Every function returns a matplotlib ``Figure`` (it shows itself inline in a notebook) and, given
``path=``, also writes it as a PNG (atomically). Every figure carries a title, labelled axes, a
legend with names where there are several series, and a caption line saying what it shows.
Figures are built without ``pyplot``: no global state, no GUI backend, nothing left open.
matplotlib is imported on first use, so ``import mapet`` stays quick.

Example:
    >>> fig = viz.plot_curves({"mapet": history["loss"]}, title="MaPeT pre-training")
    >>> fig.save("curves.png")          # or just leave ``fig`` as a notebook cell's result
"""
import io as _io
import logging
import textwrap
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

if TYPE_CHECKING:  # matplotlib is imported on first use
    from matplotlib.figure import Figure

# the array painters (no matplotlib figure) live in _overlays; re-exported here
from ._overlays import PALETTE, group_overlay, token_colors, token_maps  # noqa: F401
from .io import atomic_write

logger = logging.getLogger(__name__)


ALLOWED_COLOR = "#1d3557"   # "may attend" cells of the attention masks
BLOCKED_COLOR = "#ffffff"
CAPTION_SIZE = 9

_FIGURE_CLASS = None


_LINE_COLORS = PALETTE[[0, 1, 2, 3, 4, 5, 7]]  # the yellow is too faint for lines and bars on white


def _color(k: int) -> Tuple[float, float, float]:
    return tuple(_LINE_COLORS[k % len(_LINE_COLORS)] / 255.0)


def _figure_class():
    """``matplotlib.figure.Figure`` with ``save`` and a PNG ``_repr_png_`` (built on first use)."""
    global _FIGURE_CLASS
    if _FIGURE_CLASS is None:
        from matplotlib.figure import Figure

        class MapetFigure(Figure):
            """A matplotlib Figure that renders itself in notebooks (``_repr_png_``) and saves atomically."""

            def _repr_png_(self) -> bytes:
                buf = _io.BytesIO()
                self.savefig(buf, format="png")
                return buf.getvalue()

            def save(self, path: str, dpi: Optional[float] = None) -> str:
                """Write the figure as a PNG at ``path`` (atomically); returns ``path``."""
                return save(self, path, dpi=dpi)

        _FIGURE_CLASS = MapetFigure
    return _FIGURE_CLASS


def _new_figure(width: float, height: float) -> "Figure":
    return _figure_class()(figsize=(width, height), dpi=100, layout="constrained")


def save(fig: Any, path: str, dpi: Optional[float] = None) -> str:
    """Write a matplotlib figure as a PNG at ``path``, atomically (an interrupted write leaves any
    previous file untouched). Returns ``path``."""
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(data))
    return path


def _finish(fig: "Figure", title: Optional[str], caption: Optional[str], path: Optional[str]) -> "Figure":
    """Title on top, the caption (wrapped to the figure's width) at the bottom, then save."""
    if title:
        fig.suptitle(title, fontsize=13, fontweight="bold")
    if caption:
        width_chars = max(40, int(fig.get_figwidth() * 72 / (CAPTION_SIZE * 0.6)))
        text = "\n".join(textwrap.fill(p, width_chars) for p in caption.split("\n"))
        fig.supxlabel(text, fontsize=CAPTION_SIZE, x=0.01, ha="left", multialignment="left", color="#333333")
    if path is not None:
        save(fig, path)
    return fig


def caption_of(fig: Any) -> str:
    """The caption line(s) of a figure made here (its ``supxlabel``), unwrapped."""
    label = getattr(fig, "_supxlabel", None)
    return " ".join(label.get_text().split()) if label is not None else ""


# ------------------------------------------------------------------ curves and results

def plot_curves(curves: Mapping[str, Any], *, title: str = "Training loss", xlabel: str = "optimizer step",
                ylabel: str = "loss", logy: Union[bool, Sequence[str]] = False, caption: Optional[str] = None,
                path: Optional[str] = None, width: float = 10.0, height: float = 5.2) -> "Figure":
    """Line plot of named series; one panel, or one panel per group.

    Args:
        curves: name → values (one panel), or panel title → {name → values} (panels side by
            side, e.g. pre-training and fine-tuning losses that live on different scales). Each
            series is plotted against its own step index; NaN/Inf points are left out. A name
            keeps its colour in every panel.
        title, xlabel, ylabel: the figure's title and the axes' labels.
        logy: logarithmic y axes (True: all panels; or the titles of the panels that get one).
        caption: what the figure shows (a line under it).
        path: also write the figure as a PNG there.
        width, height: inches (100 dpi).

    Returns:
        The matplotlib Figure.

    Example:
        >>> plot_curves({"pre-training": {"MaPeT": a, "MIM": b}, "fine-tuning": {"scratch": c}})
    """
    if not curves:
        raise ValueError("plot_curves: curves: expected at least one series, got none")
    grouped = all(isinstance(v, Mapping) for v in curves.values())
    panels = dict(curves) if grouped else {"": dict(curves)}
    if any(not p for p in panels.values()):
        raise ValueError("plot_curves: curves: a panel has no series")
    fig = _new_figure(width, height)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colour = {name: k for k, name in enumerate(dict.fromkeys(n for p in panels.values() for n in p))}
    for ax, (panel, series) in zip(axes, panels.items()):
        log_axis = bool(logy) if isinstance(logy, bool) else panel in logy
        for name, values in series.items():
            v = np.asarray(values, dtype=np.float64).ravel()
            v = np.where(np.isfinite(v) & ((v > 0) | (not log_axis)), v, np.nan)
            ax.plot(np.arange(len(v)), v, label=str(name), color=_color(colour[name]), linewidth=1.4)
        if log_axis:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if panel:
            ax.set_title(panel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=9, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2)
    return _finish(fig, title, caption, path)


def plot_bars(table: Mapping[str, Mapping[str, float]], *, title: str = "Results",
              xlabel: str = "top-1 accuracy (%)", caption: Optional[str] = None, percent: bool = True,
              path: Optional[str] = None, width: float = 9.0, height: Optional[float] = None) -> "Figure":
    """Horizontal grouped bars of a results table, each bar labelled with its value.

    Args:
        table: row (e.g. method) → {column (e.g. "linear probe") → value}. Rows are listed top
            to bottom in the table's order, columns are the bars of a row (one colour each, named
            in the legend). Missing values are left out.
        percent: values are fractions in [0, 1] shown as percentages (axis 0–100); otherwise
            plotted as they are.
        title, xlabel, caption, path, width, height: as in :func:`plot_curves` (height grows with
            the number of rows by default).

    Returns:
        The matplotlib Figure.
    """
    if not table:
        raise ValueError("plot_bars: table: expected at least one row, got none")
    rows = list(table)
    cols = list(dict.fromkeys(c for r in rows for c in table[r]))
    values = np.array([[float(table[r].get(c, np.nan)) for c in cols] for r in rows])
    scale = 100.0 if percent else 1.0
    fig = _new_figure(width, height or 1.4 + 0.55 * len(rows) * max(1, len(cols)))
    ax = fig.subplots()
    bar_h = 0.8 / len(cols)
    y = np.arange(len(rows))
    for j, c in enumerate(cols):
        ok = np.isfinite(values[:, j])
        pos = y[ok] + (j - (len(cols) - 1) / 2) * bar_h
        bars = ax.barh(pos, values[ok, j] * scale, bar_h * 0.92, label=str(c), color=_color(j))
        ax.bar_label(bars, labels=[f"{v * scale:.1f}%" if percent else f"{v:.4g}" for v in values[ok, j]],
                     padding=3, fontsize=9)
    ax.set_yticks(y, [str(r) for r in rows])
    ax.invert_yaxis()  # first row on top
    finite = values[np.isfinite(values)]
    top = 100.0 if percent else (float(finite.max()) if finite.size else 1.0)
    ax.set_xlim(min(0.0, float(finite.min()) * scale if finite.size else 0.0), top * 1.12)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=9, frameon=False)
    return _finish(fig, title, caption, path)


def plot_confusion(matrix: Any, classes: Sequence[str], *, title: str = "Confusion matrix",
                   caption: Optional[str] = None, path: Optional[str] = None) -> "Figure":
    """A confusion matrix as a labelled heat map: rows the true class, columns the predicted one,
    each cell its count; the colour is the share of its row (so rare classes read as clearly as
    common ones).

    Args:
        matrix: [C, C] counts (``evaluate(..., confusion=True)["confusion"]``).
        classes: the C class names, in the matrix's order.
        title, caption, path: as in :func:`plot_curves`.

    Returns:
        The matplotlib Figure.
    """
    m = np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(classes):
        raise ValueError(f"plot_confusion: matrix: expected [{len(classes)}, {len(classes)}] for "
                         f"{len(classes)} classes, got shape {m.shape}")
    counts = m.astype(np.float64)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = 2.5 + 0.45 * len(classes)
    fig = _new_figure(side + 1.2, side)
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, [str(c) for c in classes], rotation=90 if max(map(len, map(str, classes))) > 3 else 0)
    ax.set_yticks(ticks, [str(c) for c in classes])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if len(classes) <= 30:
        for i in range(len(classes)):
            for j in range(len(classes)):
                if counts[i, j]:
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, label="share of the true class", shrink=0.8)
    total = counts.sum()
    acc = np.trace(counts) / total if total else float("nan")
    return _finish(fig, title, caption or f"{int(total)} images, top-1 {100 * acc:.1f}%: the diagonal holds the "
                   "correct predictions; each row adds up to one true class.", path)


# ------------------------------------------------------------------ MaPeT's masks

def permutation_order(batch: Any, index: int = 0, positional_tokens: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Row/column orders that sort sample ``index``'s masks by its sampled permutation.

    Returns:
        (content order, query order): indices into the content mask's rows and columns (the N
        tokens by rank, then — with ``positional_tokens`` — the placeholders m_j by the rank of
        the token p_j they stand for), and into the query mask's rows (predicted tokens by rank).
    """
    N = int(batch.sequence_length)
    token_order = np.asarray(batch.orders[index], dtype=np.int64)
    query_order = np.argsort(np.asarray(batch.predicted_ranks[index]), kind="stable")
    content = np.concatenate([token_order, N + query_order]) if positional_tokens else token_order
    return content, query_order


def plot_masks(batch: Any, index: int = 0, *, positional_tokens: bool = True,
               title: Optional[str] = None, caption: Optional[str] = None, path: Optional[str] = None,
               width: float = 12.0) -> "Figure":
    """One sample's content- and query-stream masks, in patch order and in permutation order.

    Four panels: the content mask [(N+P), (N+P)] above the query mask [P, (N+P)]; left with rows
    and columns in patch order (as the engine indexes them), right sorted by the sampled order
    (:func:`permutation_order`), where the rule becomes visible: the context block, the lower
    triangle of tokens that attend to the tokens before them, and the query stream's predicted
    tail. Dark cells may attend. Segment labels on the axes name the class token and patches,
    the context, the predicted tokens and the auxiliary positional placeholders m_j.

    Args:
        batch: a ``mapet.PermutationBatch`` (``PermutationSampler.sample`` / ``from_orders``).
        index: which sample.
        positional_tokens: MaPeT (True) or PIM's masks without placeholders (False).
        title, caption, path, width: as in :func:`plot_curves` (a default caption is written).

    Returns:
        The matplotlib Figure (axes ``fig.axes[:4]``: content patch order, content permutation
        order, query patch order, query permutation order).
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    B = int(batch.batch_size)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not -B <= int(index) < B:
        raise ValueError(f"plot_masks: index: expected an int in [{-B}, {B}), got {index!r}")
    index = int(index) % B
    N, L, P = int(batch.sequence_length), int(batch.least_number), int(batch.num_predicted)
    content = batch.content_mask(index, positional_tokens)
    query = batch.query_mask(index, positional_tokens)
    c_order, q_order = permutation_order(batch, index, positional_tokens)
    keys = content.shape[1]
    cmap = ListedColormap([BLOCKED_COLOR, ALLOWED_COLOR])

    fig = _new_figure(width, width * 0.5 * (keys + P) / keys + 1.6)
    axes = fig.subplots(2, 2, gridspec_kw={"height_ratios": [content.shape[0], P]})
    # segments along the columns: (start, end, label) in each ordering
    patch_segments = [(0, 1, "cls"), (1, N, f"patches 1…{N - 1}")]
    perm_segments = [(0, L, f"context\n(first {L})"), (L, N, f"predicted\n({P})")]
    if positional_tokens:
        patch_segments.append((N, N + P, f"placeholders\nm_0…m_{P - 1}"))
        perm_segments.append((N, N + P, "placeholders\n(same order)"))
    q_patch_segments = [(0, P, f"predicted tokens\n(by position)")]
    q_perm_segments = [(0, P, f"predicted tokens\n(by rank {L}…{N - 1})")]

    panels = [(axes[0, 0], content, patch_segments, patch_segments, "content stream — patch order"),
              (axes[0, 1], content[np.ix_(c_order, c_order)], perm_segments, perm_segments,
               "content stream — sorted by the sampled order"),
              (axes[1, 0], query, q_patch_segments, patch_segments, "query stream — patch order"),
              (axes[1, 1], query[np.ix_(q_order, c_order)], q_perm_segments, perm_segments,
               "query stream — sorted by the sampled order")]
    for ax, mask, row_segments, col_segments, name in panels:
        ax.imshow(mask.astype(np.uint8), cmap=cmap, vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        ax.set_title(name, fontsize=11)
        for segments, set_ticks, line in ((col_segments, ax.set_xticks, ax.axvline),
                                          (row_segments, ax.set_yticks, ax.axhline)):
            set_ticks([(a + b) / 2 - 0.5 for a, b, _ in segments], [s for _, _, s in segments], fontsize=8)
            for a, _, _ in segments[1:]:
                line(a - 0.5, color="#e63946", linewidth=1.0)
        ax.set_xlabel("key: the token attended to", fontsize=9)
        ax.set_ylabel("query: the attending row", fontsize=9)
        ax.tick_params(length=0)
    axes[0, 1].legend(handles=[Patch(facecolor=ALLOWED_COLOR, label="may attend"),
                               Patch(facecolor=BLOCKED_COLOR, edgecolor="#888888", label="blocked")],
                      loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    if title is None:
        title = f"MaPeT attention masks of one sample ({N - 1} patches + class token, {L} in context)"
    if caption is None:
        caption = (f"Left: rows and columns in patch order — the rule looks scattered. Right: both sorted by the "
                   f"sampled permutation. Content stream: every token sees the {L} context tokens and the tokens "
                   f"before it in the order (lower triangle, itself included)"
                   + (", and the placeholder m_j of each predicted token it cannot see" if positional_tokens else "")
                   + f". Query stream (one row per predicted token, the {P} of the predicted tail): a token sees "
                   f"only tokens strictly before it (it must predict itself)"
                   + (", plus the placeholders of itself and of every later token (upper triangle on the right)"
                      if positional_tokens else "") + ". Red lines separate the segments.")
    return _finish(fig, title, caption, path)


# ------------------------------------------------------------------ images

def tile(images: np.ndarray, padding: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Images [N, C, H, W] (C = 1 or 3) or [N, H, W] in [0, 1] side by side in one row: float [H, W', 3]."""
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"tile: images: expected [N, 1|3, H, W] (or [N, H, W]) with N > 0, got shape {np.shape(images)}")
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    n, _, h, w = x.shape
    out = np.full((h, n * w + (n - 1) * padding, 3), pad_value, np.float64)
    for k in range(n):
        out[:, k * (w + padding):k * (w + padding) + w] = x[k].transpose(1, 2, 0)
    return np.clip(out, 0.0, 1.0)


def image_rows(rows: Sequence[Tuple[str, np.ndarray]], *, title: Optional[str] = None,
               caption: Optional[str] = None, path: Optional[str] = None, width: float = 11.0,
               label_width: float = 2.4) -> "Figure":
    """Rows of images, each row captioned on its left (e.g. inputs / reconstructions / predictions).

    Args:
        rows: (caption, images [N, C, H, W] or [N, H, W] in [0, 1]) per row; values outside are clipped.
        title, caption, path, width: as in :func:`plot_curves`.
        label_width: inches kept for the row captions.

    Returns:
        The matplotlib Figure: per row a caption axes (``fig.axes[2 * i].texts[0]``) and an
        image axes (``fig.axes[2 * i + 1].images[0]``, the tiled row).

    Example:
        >>> image_rows([("test digits", x), ("tokenizer reconstruction", tok.decode(tok.encode(x)))])
    """
    if not rows:
        raise ValueError("image_rows: rows: expected at least one (caption, images) row, got none")
    tiles = [tile(images) for _, images in rows]
    aspect = max(t.shape[1] for t in tiles) / max(t.shape[0] for t in tiles)
    row_h = (width - label_width) / aspect
    fig = _new_figure(width, row_h * len(rows) + 1.5)
    grid = fig.subplots(len(rows), 2, squeeze=False,
                        gridspec_kw={"width_ratios": [label_width, width - label_width]})
    for (label_ax, ax), (label, _), t in zip(grid, rows, tiles):
        ax.imshow(t, interpolation="nearest")
        label_ax.set_axis_off()  # a column of its own for the caption: never clipped
        label_ax.text(1.0, 0.5, textwrap.fill(str(label), max(12, int(label_width * 10))),
                      transform=label_ax.transAxes, ha="right", va="center", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
    return _finish(fig, title, caption, path)


# ------------------------------------------------------------------ visual tokens

def plot_token_maps(images: Any, tokens: Any, *, name: str = "k-CLIP", title: Optional[str] = None,
                    caption: Optional[str] = None, path: Optional[str] = None, width: float = 6.0) -> "Figure":
    """Each image beside its token map (every patch coloured by its visual token).

    Args:
        images: [B, C, H, W] in [0, 1] (C = 1 or 3, square).
        tokens: [B, n] token ids (e.g. ``CLIPTokenizer.encode_images(images)``), a square grid.
        name: the tokenizer's name for the labels.
        title, caption, path, width: as in :func:`plot_curves`.

    Returns:
        The Figure of :func:`image_rows`: one row per image, ``[image | token map]``.
    """
    x = np.asarray(images, dtype=np.float64)
    t = np.asarray(tokens)
    if x.ndim != 4 or t.ndim != 2 or x.shape[0] != t.shape[0] or x.shape[0] == 0:
        raise ValueError(f"plot_token_maps: expected images [B, C, H, W] and tokens [B, n] with the same B > 0, "
                         f"got {x.shape} and {t.shape}")
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    maps = token_maps(t, x.shape[-1])
    rows = [(f"image {i}: {len(np.unique(t[i]))} distinct tokens", np.stack([x[i], maps[i]])) for i in range(len(x))]
    grid = int(round(t.shape[1] ** 0.5))
    if title is None:
        title = f"{name} token maps"
    if caption is None:
        caption = (f"Left: the image. Right: its {grid}×{grid} patches, each filled with the colour of its {name} "
                   f"token (same colour = same token). Regions the encoder sees alike share tokens.")
    return image_rows(rows, title=title, caption=caption, path=path, width=width, label_width=2.0)

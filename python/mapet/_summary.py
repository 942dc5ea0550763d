"""A model's summary for people: configuration, parameter counts and shapes, precision.

``model.summary()`` gives the text and ``model._repr_html_()`` a table, which is what a Jupyter
notebook shows when a model is a cell's result. The transformer blocks share one layout, so
they are listed once as ``blocks.{0…depth-1}.*`` with the count for all of them.
"""
import html
import re
from typing import Any, List, Tuple

import numpy as np

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")


def _rows(model: Any) -> List[Tuple[str, str, int]]:
    """(name, shape, parameters) with the blocks folded into one pattern."""
    rows: List[Tuple[str, str, int]] = []
    folded = {}
    depth = 0
    for name, shape, _ in model.parameter_table:
        count = int(np.prod(shape)) if shape else 1
        m = _BLOCK.match(name)
        if m:
            depth = max(depth, int(m.group(1)) + 1)
            key = m.group(2)
            if key not in folded:
                folded[key] = len(rows)
                rows.append((key, "×".join(map(str, shape)), 0))
            i = folded[key]
            rows[i] = (rows[i][0], rows[i][1], rows[i][2] + count)
        else:
            rows.append((name, "×".join(map(str, shape)) or "scalar", count))
    if depth:
        label = f"blocks.{{0…{depth - 1}}}." if depth > 1 else "blocks.0."
        rows = [(label + n if i in folded.values() else n, s, c) for i, (n, s, c) in enumerate(rows)]
    return rows


def _headline(model: Any) -> Tuple[str, List[Tuple[str, str]]]:
    c = dict(getattr(model, "config", {}) or {})
    kind = getattr(model, "_kind", "") or "vit"
    title = f"{type(model).__name__} ({kind})"
    n = int(model.num_params)
    facts = [("parameters", f"{n:,} ({n * 4 / 2**20:.1f} MiB as float32)")]
    precision = getattr(model, "precision", None)
    if precision is not None:
        facts.append(("precision", str(precision)))
    if "img_size" in c and "patch_size" in c:
        g = c["img_size"] // c["patch_size"]
        facts.append(("input", f"[B, {c.get('in_chans', 3)}, {c['img_size']}, {c['img_size']}] → "
                               f"{g}×{g} = {g * g} patches of {c['patch_size']}×{c['patch_size']}"))
    for key in ("embed_dim", "depth", "num_heads", "mlp_ratio", "num_classes", "global_pool", "num_tokens",
                "least_number", "early_layers", "head_layers", "output_dim", "init_values", "drop_path_rate"):
        if key in c and c[key] is not None:
            facts.append((key, str(c[key])))
    return title, facts


def summary(model: Any) -> str:
    """Plain-text summary (what ``print(model.summary())`` shows)."""
    title, facts = _headline(model)
    lines = [title] + [f"  {k}: {v}" for k, v in facts] + ["  parameters by name:"]
    rows = _rows(model)
    width = max(len(n) for n, _, _ in rows)
    lines += [f"    {n:<{width}}  {s:>14}  {c:>10,}" for n, s, c in rows]
    return "\n".join(lines)


def to_html(model: Any) -> str:
    """An HTML table (``_repr_html_``)."""
    title, facts = _headline(model)
    esc = html.escape
    head = "".join(f"<tr><th style='text-align:left'>{esc(k)}</th><td style='text-align:left'>{esc(v)}</td></tr>"
                   for k, v in facts)
    body = "".join(f"<tr><td style='text-align:left'><code>{esc(n)}</code></td><td>{esc(s)}</td>"
                   f"<td style='text-align:right'>{c:,}</td></tr>" for n, s, c in _rows(model))
    return (f"<div><strong>{esc(title)}</strong><table>{head}</table>"
            f"<details><summary>parameters by name</summary><table><tr><th>name</th><th>shape</th>"
            f"<th>parameters</th></tr>{body}</table></details></div>")

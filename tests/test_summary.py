"""Model summaries for notebooks: counts add up to the state_dict's sizes, blocks fold into one
pattern, precision is shown when a model has one, and the HTML is escaped."""
import types

import numpy as np

import mapet
from mapet import _summary


def test_summary_counts_match_the_state_dict():
    m = mapet.create_model("mapet_tiny_patch16_224", img_size=32, patch_size=4, depth=3, embed_dim=48,
                           num_tokens=64, least_number=16)
    text = m.summary()
    total = sum(v.size for v in m.state_dict().values())
    assert f"parameters: {total:,}" in text
    rows = _summary._rows(m)
    assert sum(c for _, _, c in rows) == total
    assert any(n == "blocks.{0…2}.attn.q.weight" and s == "48×48" and c == 3 * 48 * 48 for n, s, c in rows)
    assert "input: [B, 3, 32, 32] → 8×8 = 64 patches of 4×4" in text and "least_number: 16" in text
    page = m._repr_html_()
    assert page.startswith("<div>") and "MaPeT (mapet)" in page and f"{total:,}" in page
    assert "precision: fp32" in text
    m.precision = "bf16"
    assert "precision: bf16" in m.summary() and "bf16" in m._repr_html_()


def test_vit_summary_and_precision_when_present():
    v = mapet.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1, num_classes=7)
    assert "num_classes: 7" in v.summary() and "blocks.0.mlp.fc1.weight" in v.summary()
    assert "precision: fp32" in v.summary()
    fake = types.SimpleNamespace(parameter_table=[("w<x>", (2, 3), 0)], num_params=6, config={},
                                 precision="bf16", _kind="test")
    assert "precision: bf16" in _summary.summary(fake)
    page = _summary.to_html(fake)
    assert "w&lt;x&gt;" in page and "<x>" not in page and "bf16" in page

"""Schedules against independent formulas: BEiT's array-built warm-up + cosine, and
layer-wise decay scales computed from the layer index by hand."""
import math

import numpy as np
import pytest

from mapet.schedules import (cosine_lr, cosine_schedule, layer_decay_scales, layer_id, no_weight_decay,
                             split_total_steps, weight_decay_mask)


def _reference_schedule(base, final, total, warmup, start):
    """The reference construction: linspace warm-up (ends included), then a cosine over the rest."""
    warm = np.linspace(start, base, warmup) if warmup > 0 else np.array([])
    iters = np.arange(total - warmup)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate([warm, cos])


@pytest.mark.parametrize("total,warmup", [(100, 10), (37, 0), (50, 1), (20, 19), (8, 2)])
def test_cosine_matches_the_reference_construction(total, warmup):
    ours = cosine_schedule(total, 1.5e-3, warmup, 1e-6, 1e-5)
    np.testing.assert_allclose(ours, _reference_schedule(1.5e-3, 1e-5, total, warmup, 1e-6), rtol=1e-12, atol=0)


def test_cosine_shape_properties():
    lr = cosine_schedule(200, 1e-3, 20, 1e-6, 1e-5)
    assert lr[0] == 1e-6 and lr[19] == pytest.approx(1e-3, rel=1e-12) and lr[20] == pytest.approx(1e-3, rel=1e-12)
    assert np.all(np.diff(lr[:20]) > 0) and np.all(np.diff(lr[20:]) < 0)
    mid = 20 + 90  # half way through the cosine: the mean of peak and floor
    assert lr[mid] == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-12)
    assert cosine_lr(200, 200, 1e-3, 20) == 1e-5 and cosine_lr(10_000, 200, 1e-3) == 1e-5
    assert lr[20:].min() > 1e-5  # the floor is approached, never reached, within the schedule
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_lr(0, 10, 1e-3, warmup_steps=11)
    assert split_total_steps(300, 10, 10) == (3000, 100)


def test_layer_decay_scales_beit():
    depth, decay = 12, 0.65
    names = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "mask_token",
             "blocks.0.norm1.weight", "blocks.5.attn.q.weight", "blocks.11.mlp.fc2.bias",
             "norm.weight", "fc_norm.bias", "head.weight", "decoder.weight", "mask_positional_token"]
    scales = layer_decay_scales(names, depth, decay)
    expected_ids = [0, 0, 0, 0, 0, 1, 6, 12, 13, 13, 13, 13, 0]
    for name, lid in zip(names, expected_ids):
        assert layer_id(name, depth) == lid
        assert scales[name] == pytest.approx(math.pow(decay, 13 - lid), rel=1e-15)
    assert scales["head.weight"] == 1.0
    assert scales["blocks.11.mlp.fc2.bias"] == pytest.approx(0.65)
    block_scales = [layer_decay_scales([f"blocks.{i}.x"], depth, decay)[f"blocks.{i}.x"] for i in range(12)]
    assert np.all(np.diff(block_scales) > 0)
    assert set(layer_decay_scales(names, depth, 1.0).values()) == {1.0}
    with pytest.raises(ValueError, match="decay"):
        layer_decay_scales(names, depth, 0.0)


def test_weight_decay_exclusions():
    params = {"blocks.0.attn.q.weight": np.zeros((4, 4)), "blocks.0.attn.q.bias": np.zeros(4),
              "pos_embed": np.zeros((1, 5, 4)), "cls_token": np.zeros((1, 1, 4)), "norm.weight": np.zeros(4),
              "patch_embed.proj.weight": np.zeros((4, 3, 2, 2)), "blocks.0.ls1.gamma": np.zeros(4)}
    mask = weight_decay_mask(params)
    assert mask == {"blocks.0.attn.q.weight": True, "blocks.0.attn.q.bias": False, "pos_embed": False,
                    "cls_token": False, "norm.weight": False, "patch_embed.proj.weight": True,
                    "blocks.0.ls1.gamma": False}
    assert no_weight_decay("mask_positional_token", (1, 1, 4))

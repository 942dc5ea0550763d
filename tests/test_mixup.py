"""Mixup / CutMix (the BEiT/MaPeT fine-tuning recipe): the mixing against NumPy written here,
seeded per (seed, epoch, batch), the draws' frequencies, fine-tuning with it (resumes bitwise),
and its options from the shell."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import mapet
from mapet.data.mixup import RECIPE, Mixup, make_mixup, mixup_target
from _helpers import TINY_VIT as FT, digits_subset, finetune_tiny

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(mapet.__file__)))


def _smooth(y, K, eps):
    q = np.full((len(y), K), eps / K)
    q[np.arange(len(y)), y] += 1 - eps
    return q


def test_mixup_target_is_the_mixed_smoothed_one_hot():
    y = np.array([3, 0, 2, 2, 1])
    for lam in (1.0, 0.7, 0.0):
        ref = lam * _smooth(y, 4, 0.1) + (1 - lam) * _smooth(y[::-1], 4, 0.1)
        got = mixup_target(y, 4, lam, 0.1)
        assert got.dtype == np.float32 and got.shape == (5, 4)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-7)
        np.testing.assert_allclose(got.sum(1), 1.0, rtol=0, atol=1e-6)


def test_mixup_blends_each_image_with_its_partner_in_the_reversed_batch():
    rng = np.random.default_rng(0)
    x = rng.random((6, 3, 8, 8), dtype=np.float32)
    x0 = x.copy()
    y = np.array([0, 1, 2, 3, 4, 0])
    mix = Mixup(5, mixup=0.8, cutmix=0.0, label_smoothing=0.1, seed=7)
    out, targets = mix(x, y, epoch=2, batch=5)
    lam, cut = mix.params(2, 5)
    assert not cut and 0 < lam < 1
    ref = lam * x.astype(np.float64) + (1 - lam) * x[::-1].astype(np.float64)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(targets, lam * _smooth(y, 5, 0.1) + (1 - lam) * _smooth(y[::-1], 5, 0.1), atol=1e-6)
    assert not np.shares_memory(out, x) and np.array_equal(x, x0)  # the caller's batch is left alone


def test_cutmix_pastes_one_box_from_the_partner_and_corrects_lambda():
    rng = np.random.default_rng(1)
    x = rng.random((4, 3, 16, 16), dtype=np.float32) + 1.0   # no two pixels equal by chance
    y = np.array([0, 1, 2, 3])
    mix = Mixup(4, mixup=0.0, cutmix=1.0, label_smoothing=0.0, seed=3)
    found = 0
    for b in range(20):
        out, targets = mix(x, y, epoch=0, batch=b)
        lam_drawn, cut = mix.params(0, b)
        assert cut
        changed = np.any(out != x, axis=1)                     # [B, H, W]
        assert np.array_equal(changed[0], changed[1]) and np.array_equal(changed[0], changed[3])
        rows, cols = np.flatnonzero(changed[0].any(1)), np.flatnonzero(changed[0].any(0))
        area = int(changed[0].sum())
        if area:
            found += 1
            # one axis-aligned box, filled from the reversed batch
            assert area == rows.size * cols.size and np.ptp(rows) + 1 == rows.size and np.ptp(cols) + 1 == cols.size
            box = np.s_[:, :, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            assert np.array_equal(out[box], x[::-1][box])
            # the box's sides are 2·(int(16·√(1 − λ)) // 2) before clipping at the border
            side = 2 * (int(16 * math.sqrt(1 - lam_drawn)) // 2)
            assert rows.size <= side and cols.size <= side
        lam = 1 - area / 256
        np.testing.assert_allclose(targets, lam * _smooth(y, 4, 0) + (1 - lam) * _smooth(y[::-1], 4, 0), atol=1e-6)
    assert found >= 15


def test_draws_follow_seed_epoch_and_batch_and_the_recipe_frequencies():
    mix = Mixup(10, **RECIPE, label_smoothing=0.1, seed=0)
    assert mix.params(3, 4) == mix.params(3, 4) == Mixup(10, **RECIPE, seed=0).params(3, 4)
    assert mix.params(3, 4) != mix.params(3, 5) and mix.params(3, 4) != mix.params(4, 4)
    assert mix.params(3, 4) != Mixup(10, **RECIPE, seed=1).params(3, 4)
    draws = [mix.params(0, b) for b in range(4000)]
    cut = np.array([c for _, c in draws])
    lam = np.array([v for v, _ in draws])
    # switch_prob 0.5: 4000 Bernoulli draws, sd 0.008; Beta(α, α) has mean 1/2 and variance 1/(4(2α+1))
    assert abs(cut.mean() - 0.5) < 0.04
    for sel, alpha in ((cut, 1.0), (~cut, 0.8)):
        n = sel.sum()
        var = 1 / (4 * (2 * alpha + 1))
        assert abs(lam[sel].mean() - 0.5) < 5 * math.sqrt(var / n)
        assert abs(lam[sel].var() - var) < 0.25 * var
    half = Mixup(10, mixup=0.8, cutmix=0.0, mixup_prob=0.5, label_smoothing=0.0, seed=0)
    unmixed = np.mean([half.params(0, b)[0] == 1.0 for b in range(4000)])
    assert abs(unmixed - 0.5) < 0.04
    x, y = np.ones((2, 3, 4, 4), np.float32), np.array([1, 2])
    b = next(b for b in range(100) if half.params(0, b)[0] == 1.0)
    out, targets = half(x, y, 0, b)   # not mixed: the images, and label-smoothed one-hots
    assert np.array_equal(out, x)
    np.testing.assert_allclose(targets, _smooth(y, 10, 0.0), atol=0)


@pytest.mark.parametrize("kw, match", [
    (dict(mixup=-1.0), "mixup: expected a Beta α ≥ 0"),
    (dict(cutmix=float("nan")), "cutmix: expected a Beta α ≥ 0"),
    (dict(mixup_prob=1.5), r"mixup_prob: expected a probability in \[0, 1\]"),
    (dict(mixup_switch_prob=-0.1), "mixup_switch_prob: expected a probability"),
    (dict(mixup=0.0, cutmix=0.0), "both 0"),
])
def test_bad_settings_are_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        Mixup(10, **kw)
    assert make_mixup(10) is None


def test_bad_batches_are_errors():
    mix = Mixup(3, seed=0)
    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, 3\)"):
        mix(np.zeros((2, 3, 4, 4), np.float32), np.array([0, 3]), 0, 0)
    with pytest.raises(ValueError, match="labels: expected integer class indices"):
        mix(np.zeros((2, 3, 4, 4), np.float32), np.array([0.0, 1.0]), 0, 0)


@pytest.fixture(scope="module")
def digits():
    return digits_subset(160)


_run = finetune_tiny


@pytest.mark.bitwise
def test_finetuning_with_mixup_and_cutmix_resumes_bitwise(digits, tmp_path):
    mapet.set_num_threads(2)
    full, h_full = _run(digits, tmp_path / "full", **RECIPE)
    _run(digits, tmp_path / "cut", stop_after=3, **RECIPE)   # inside epoch 0 (5 steps per epoch)
    resumed, h_resumed = _run(digits, tmp_path / "cut", **RECIPE)
    assert len(h_full["loss"]) == 10 and h_resumed["loss"] == h_full["loss"]
    assert np.array_equal(resumed.flat_params, full.flat_params)
    plain, _ = _run(digits, tmp_path / "plain")
    assert not np.array_equal(plain.flat_params, full.flat_params)
    from mapet.checkpoint import find_checkpoint, load_checkpoint
    saved = load_checkpoint(find_checkpoint(str(tmp_path / "full")))[1]["config"]["mixup"]
    assert saved == dict(RECIPE, label_smoothing=0.1)


def test_a_mixed_step_is_the_soft_target_step_on_the_mixed_batch(digits):
    # What finetune runs for one batch, redone by hand: mix, then the engine's soft-target loss
    # (checked against NumPy in test_vit.py) on the mixed images.
    x, y = digits[0][:8], digits[1][:8]
    mix = Mixup(10, **RECIPE, label_smoothing=0.1, seed=5)
    images, targets = mix(x, y, 0, 0)
    m = mapet.create_model("vit_tiny_patch16_224", num_classes=10, **dict(FT, drop_path_rate=0.0))
    loss, logits = m.train_step(images, targets, return_logits=True)
    z = logits.astype(np.float64)
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    assert loss == pytest.approx(-(targets * logp).sum(1).mean(), rel=1e-5)


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    return subprocess.run([sys.executable, "-m", "mapet", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


TINY = ["--set", "model.img_size=16", "--set", "model.patch_size=4", "--set", "model.embed_dim=24",
        "--set", "model.depth=2", "--set", "model.num_heads=3", "--threads", "2"]


def test_mixup_and_cutmix_from_the_shell(tmp_path):
    args = ["finetune", *TINY, "--set", "epochs=1", "--set", "batch_size=256", "--set", "progress=false"]
    r = _cli(*args, "--set", "mixup=0.8", "--set", "cutmix=1.0", "-o", "mix", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["top1"] >= 0
    assert "mixup" in _cli("finetune", "--list-options", cwd=tmp_path).stdout
    for bad, match in ((["--set", "mixup=-1"], "mixup: expected a Beta α ≥ 0 (0: off), got -1.0"),
                       (["--set", "cutmix=lots"], "option 'cutmix' expects a number"),
                       (["--set", "mixup_prob=2"], "mixup_prob: expected a probability in [0, 1], got 2.0"),
                       (["--set", "mixup_switch=0.5"], "did you mean 'mixup_switch_prob'?")):
        r = _cli(*args, *bad, cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and match in lines[0], r.stderr

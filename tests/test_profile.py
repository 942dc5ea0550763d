"""mapet.profile(): per-kernel-class time accounting of the steps run inside it."""
import time

import numpy as np
import pytest

import mapet

CLASSES = ["gemm", "attention", "norms", "elementwise", "loss", "optimizer"]


def _vit():
    return mapet.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=10, seed=0)


def test_profile_attributes_a_train_step_to_the_kernel_classes():
    model = _vit()
    opt = mapet.AdamW(model, lr=1e-3)
    x = np.random.default_rng(0).random((8, 3, 32, 32), dtype=np.float32)
    y = np.arange(8) % 10
    model.train_step(x, y)  # warm-up outside the profile
    with mapet.profile() as prof:
        for _ in range(3):
            model.zero_grad()
            model.train_step(x, y)
            opt.step()
    d = prof.as_dict()
    assert set(d) == set(CLASSES) | {"engine other", "boundary", "python", "wall"}
    calls = {name: c for name, _, c in prof.rows}
    # a ViT step runs every class: matmuls, attention, LayerNorm, GELU/residuals, the loss; AdamW once per step
    for name in CLASSES:
        assert d[name] > 0, name
    assert calls["optimizer"] == 3 and calls["loss"] == 6  # loss forward + backward per step
    # the rows partition the wall time (up to clock granularity; single-threaded caller)
    assert sum(v for k, v in d.items() if k != "wall") == pytest.approx(d["wall"], rel=0.02)
    assert d["gemm"] + d["attention"] > d["python"]
    assert "gemm" in prof.table() and "wall" in prof.table()


def test_python_time_is_python_and_profiling_stops_on_exit():
    with mapet.profile() as prof:
        time.sleep(0.05)
    d = prof.as_dict()
    assert d["python"] >= 0.045 and all(d[k] == 0 for k in CLASSES)
    # outside a profile nothing is accounted; a fresh profile starts from zero
    model = _vit()
    model.train_step(np.zeros((2, 3, 32, 32), np.float32), np.array([0, 1]))
    with mapet.profile() as again:
        pass
    assert all(again.as_dict()[k] == 0 for k in CLASSES)


def test_one_profile_at_a_time():
    with mapet.profile():
        with pytest.raises(RuntimeError, match="another profile is running"):
            with mapet.profile():
                pass


def test_a_kernel_inside_another_is_not_counted_twice():
    """fp32 runs fc1 as its product then GELU, each an entry point of its own, inside the linear
    layer's bracket; bf16 fuses them. Each class must count the same calls in both precisions."""
    x = np.random.default_rng(1).random((4, 3, 32, 32), dtype=np.float32)
    y = np.arange(4) % 10
    calls = {}
    for precision in ("fp32", "bf16"):
        model = _vit()
        model.precision = precision
        model.train_step(x, y)
        with mapet.profile() as prof:
            model.train_step(x, y)
        calls[precision] = {name: c for name, _, c in prof.rows if name in CLASSES}
    assert calls["fp32"] == calls["bf16"]

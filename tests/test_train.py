"""Training loops: exact resume, gradient accumulation, transfer of pre-trained weights."""
import numpy as np
import pytest

import mapet
from mapet.data import load_digits
from mapet.train import evaluate, finetune, linear_probe

from _helpers import TINY_VIT, digits_subset, finetune_tiny

TINY = TINY_VIT


@pytest.fixture(scope="module")
def digits():
    return digits_subset(192)


_run = finetune_tiny


@pytest.mark.bitwise
def test_resume_is_bitwise_identical(digits, tmp_path):
    full, hist_full = _run(digits, tmp_path / "full")
    # Interrupted after 5 optimizer steps (a checkpoint is written there), then started again
    # from scratch in a fresh model: it must resume and end on exactly the same weights.
    _run(digits, tmp_path / "cut", stop_after=5)
    resumed, hist_resumed = _run(digits, tmp_path / "cut")
    assert len(hist_full["loss"]) == 12
    assert hist_resumed["loss"] == hist_full["loss"]
    assert np.array_equal(resumed.flat_params, full.flat_params)


def test_accumulation_matches_big_batch_without_drop_path(digits, tmp_path):
    # Two micro-batches of 16 accumulated = one batch of 32 (the loss is a mean, so the loop
    # averages the accumulated gradients); without drop path the two runs see identical data.
    kw = dict(TINY, drop_path_rate=0.0)
    a, _ = finetune("vit_tiny_patch16_224", digits, epochs=1, batch_size=32, lr=1e-3, seed=1,
                    layer_decay=None, **kw)
    b, _ = finetune("vit_tiny_patch16_224", digits, epochs=1, batch_size=16, accum_steps=2, lr=1e-3,
                    seed=1, layer_decay=None, **kw)
    # The loader orders differ in batch grouping only if the permutation differs: same seed,
    # same permutation, consecutive pairs of 16 form the batches of 32.
    np.testing.assert_allclose(a.flat_params, b.flat_params, rtol=0, atol=2e-5)


def test_pretrained_transfer_reports_skipped_keys(tmp_path):
    src = mapet.create_model("vit_tiny_patch16_224", num_classes=7, seed=5, **TINY)
    path = tmp_path / "m.safetensors"
    src.save(str(path))
    dst = mapet.create_model("vit_tiny_patch16_224", num_classes=3, seed=6, pretrained=str(path), **TINY)
    rep = dst.pretrained_report
    assert set(rep["skipped"]) == {"head.weight", "head.bias"}  # shape differs: 7 vs 3 classes
    assert set(rep["missing"]) == {"head.weight", "head.bias"}
    for k in rep["loaded"]:
        assert np.array_equal(dst.state_dict()[k], src.state_dict()[k])


def test_finetune_learns_and_probe_runs():
    x, y = load_digits(16, "train")
    xt, yt = load_digits(16, "test")
    model, hist = finetune("vit_tiny_patch16_224", (x, y), epochs=4, batch_size=32, lr=1e-3, seed=0,
                           layer_decay=None, warmup_epochs=0.5, label_smoothing=0.0,
                           **dict(TINY, embed_dim=48, drop_path_rate=0.0), global_pool="avg")
    assert hist["loss"][-1] < hist["loss"][0] - 0.5
    acc = evaluate(model, (xt, yt))["top1"]
    assert acc > 0.3, acc  # 10 classes: chance is 0.1 (measured 0.43 with these seeds)
    probe = linear_probe(model, (x, y), (xt, yt), epochs=30)
    assert probe["val_top1"] > 0.3, probe


# ------------------------------------------------------------------ CCViT and DTM pre-training

@pytest.fixture(scope="module")
def pixel_tokens(digits):
    tok = mapet.PixelTokenizer(patch_size=4, n_tokens=16, n_iter=5, seed=0).fit(digits[0])
    return tok, tok.encode(digits[0])


def _pretrain(method, digits, pixel_tokens, out=None, stop_after=None, epochs=2, **kw):
    from mapet.train import pretrain
    tok, tokens = pixel_tokens
    model = mapet.create_model(f"{method}_tiny_patch16_224", seed=2, num_tokens=16, **dict(TINY, **kw.pop("arch", {})))
    extra = dict(tokenizer=tok, tokens=tokens) if method == "ccvit" else dict(teacher=kw.pop("teacher"))
    return pretrain(method, model=model, data=digits[0], epochs=epochs, batch_size=32, lr=2e-3, seed=4,
                    output_dir=None if out is None else str(out), checkpoint_every=2, stop_after=stop_after,
                    **extra, **kw)


@pytest.mark.bitwise
@pytest.mark.parametrize("method", ["ccvit", "dtm"])
def test_ccvit_and_dtm_pretraining_resume_bitwise(method, digits, pixel_tokens, tmp_path):
    # The per-step draws (block masks, replaced patches / morphing schedules, drop path) are
    # checkpointed: an interrupted run resumed in a fresh process state ends on the same weights.
    teacher = mapet.create_model("vit_tiny_patch16_224", seed=9, **TINY)
    kw = {} if method == "ccvit" else dict(teacher=teacher, arch=dict(output_dim=24))
    full, h_full = _pretrain(method, digits, pixel_tokens, tmp_path / "full", **dict(kw))
    _pretrain(method, digits, pixel_tokens, tmp_path / "cut", stop_after=5, **dict(kw))
    resumed, h_resumed = _pretrain(method, digits, pixel_tokens, tmp_path / "cut", **dict(kw))
    assert len(h_full["loss"]) == 12
    assert h_resumed["loss"] == h_full["loss"]
    assert np.array_equal(resumed.flat_params, full.flat_params)


def test_ccvit_pretraining_lowers_both_losses(digits, pixel_tokens):
    # Loss at initialisation vs after 12 epochs (72 steps) on one fixed corrupted batch, each part
    # separately: token CE 2.79 → 1.95, pixel MSE 0.96 → 0.57 here.
    from mapet.objectives import ccvit_corrupt, ccvit_pixel_targets
    tok, tokens = pixel_tokens
    x, t = digits[0][:32], tokens[:32]
    mask = mapet.BlockMaskGenerator(4, 6, min_num_patches=2, seed=11).sample(32)
    corrupted, replaced = ccvit_corrupt(x, mask, t, tok.centroids, 2, seed=1)
    targets = ccvit_pixel_targets(x, 4)

    def parts(model):
        model.train_step(corrupted, t, targets, mask, replaced)
        model.zero_grad()
        return model.last_losses

    model = mapet.create_model("ccvit_tiny_patch16_224", seed=2, num_tokens=16, **dict(TINY, drop_path_rate=0.0))
    before = parts(model)
    trained, hist = _pretrain("ccvit", digits, pixel_tokens, epochs=12, arch=dict(drop_path_rate=0.0))
    after = parts(trained)
    assert after["token_loss"] < 0.8 * before["token_loss"]
    assert after["pixel_loss"] < 0.8 * before["pixel_loss"]
    assert np.mean(hist["loss"][-5:]) < np.mean(hist["loss"][:5])


def test_dtm_teacher_from_a_pretraining_file_is_its_trunk(digits, tmp_path):
    # A MaPeT file as DTM teacher: its trunk weights in a ViT, features = forward_features.
    from mapet.train import teacher_features
    src = mapet.create_model("mapet_tiny_patch16_224", seed=3, num_tokens=16, least_number=4, **TINY)
    path = str(tmp_path / "mapet.safetensors")
    src.save(path)
    vit = mapet.create_model("vit_tiny_patch16_224", pretrained=path, global_pool="token", init_values=0.1, **TINY)
    assert not [k for k in vit.pretrained_report["missing"] if k.startswith("blocks.")]
    x = digits[0][:4]
    np.testing.assert_array_equal(teacher_features(path)(x), vit.forward_features(x))
    # pretrain(method="dtm") sizes the student's head from the teacher.
    model, hist = mapet.train.pretrain("dtm", model="tiny", data=digits[0][:64], teacher=path, epochs=1,
                                       batch_size=32, **TINY)
    assert isinstance(model, mapet.DTM) and model.config["output_dim"] == 24 and len(hist["loss"]) == 2
    with pytest.raises(ValueError, match="method 'dtm' needs a dtm_\\* model"):
        mapet.train.pretrain("dtm", model=src, data=digits[0][:64], teacher=path, epochs=1)
    with pytest.raises(ValueError, match="needs tokenizer="):
        mapet.train.pretrain("ccvit", model="tiny", data=digits[0][:64], tokens=np.zeros((64, 16), int),
                             epochs=1, num_tokens=16, **TINY)


@pytest.mark.bitwise
def test_dtm_with_precomputed_teacher_features_equals_the_live_teacher(digits):
    # Features stored once per image (e.g. CLIP run offline) ride along with the images through
    # the loader: the same run as calling the teacher on every batch.
    # The teacher runs image by image, so every image's features come from the same call with
    # the same operands whichever batch it rides in: bitwise equal by construction (a batched
    # teacher would change GEMM shapes, hence the last bits; see float32_bounds).
    x = digits[0][:64]
    vit = mapet.create_model("vit_tiny_patch16_224", seed=9, **TINY)

    def teacher(images):
        return np.concatenate([vit.forward_features(images[i:i + 1]) for i in range(len(images))])

    kw = dict(model="tiny", data=x, epochs=1, batch_size=32, seed=1, **TINY)
    live, h_live = mapet.train.pretrain("dtm", teacher=teacher, **kw)
    stored, h_stored = mapet.train.pretrain("dtm", teacher=teacher(x), **kw)
    assert h_stored["loss"] == h_live["loss"]
    assert np.array_equal(stored.flat_params, live.flat_params)
    with pytest.raises(ValueError, match=r"teacher: precomputed features must be \[64, 16"):
        mapet.train.pretrain("dtm", teacher=np.zeros((63, 16, 8), np.float32), **kw)


@pytest.mark.bitwise
def test_ccvit_tokens_default_to_the_tokenizers_encoding(digits, pixel_tokens):
    tok, tokens = pixel_tokens
    kw = dict(model="tiny", data=digits[0][:64], tokenizer=tok, epochs=1, batch_size=32, seed=2, num_tokens=16, **TINY)
    given, h_given = mapet.train.pretrain("ccvit", tokens=tokens[:64], **kw)
    implied, h_implied = mapet.train.pretrain("ccvit", **kw)
    assert h_implied["loss"] == h_given["loss"]
    assert np.array_equal(implied.flat_params, given.flat_params)

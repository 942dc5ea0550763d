"""A researcher's own data from the shell and from Python: strict configs, run directories that
remember their config, data checks, streaming that equals the in-memory path."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import mapet
from _helpers import PYTHON_DIR, TINY_CLI, cli, cli_mistake
from mapet.data import (ArrayDataset, DataLoader, ImageFolder, TokenCache, check_same_classes, split_dataset)
from mapet.train import evaluate, finetune, pretrain

_cli, _mistake, TINY = cli, cli_mistake, TINY_CLI


def _make_folder(root, classes, per_class, size=(20, 24), seed=0, ext="png"):
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
            Image.fromarray(a).save(os.path.join(root, c, f"{i:04d}.{ext}"))
    return str(root)


# ------------------------------------------------------------------ strict configuration

def test_unknown_or_mistyped_keys_are_one_line_errors(tmp_path):
    _mistake("pretrain", "--set", "epochz=3", cwd=tmp_path, match="unknown option 'epochz'; did you mean 'epochs'?")
    _mistake("finetune", "--set", "model.img_sise=3", cwd=tmp_path, match="did you mean 'model.img_size'?")
    _mistake("pretrain", "--set", "epochs=three", cwd=tmp_path, match="option 'epochs' expects an integer")
    _mistake("pretrain", "--set", "on_error=ignore", cwd=tmp_path, match="on_error must be 'raise' or 'skip'")
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"ccvit": {"pixel_wieght": 2}}))
    _mistake("pretrain", "-c", str(conf), cwd=tmp_path, match="did you mean 'ccvit.pixel_weight'?")
    _mistake("pretrain", "--threads", "0", cwd=tmp_path, match="--threads must be at least 1")
    # options the issue found ignored are now real keys
    r = _cli("pretrain", "--set", "num_masking_patches=20", "--set", "on_error=skip", "--print-config", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["num_masking_patches"] == 20


def test_list_options_shows_every_key_with_default_and_meaning(tmp_path):
    from mapet.commands import PRETRAIN_DEFAULTS
    from mapet.config import flatten
    r = _cli("pretrain", "--list-options", cwd=tmp_path)
    assert r.returncode == 0
    lines = r.stdout.strip().splitlines()
    keys = [line.split(" = ")[0] for line in lines]
    assert keys == list(flatten(PRETRAIN_DEFAULTS))
    assert all(len(line.split(" = ", 1)[1].split(None, 1)) == 2 for line in lines), "a key without a meaning"
    assert any(line.startswith("epochs = 10 ") for line in lines)
    assert "val_data" in keys and "least_number" in keys
    help_text = _cli("finetune", "--help", cwd=tmp_path).stdout
    assert "--list-options" in help_text and "--fresh" in help_text and "--resume" in help_text


def test_a_run_directory_refuses_another_config_unless_told(tmp_path):
    args = ["finetune", *TINY, "--set", "epochs=1", "--set", "batch_size=256", "--set", "progress=false"]
    assert _cli(*args, "-o", "ft", cwd=tmp_path).returncode == 0
    first = (tmp_path / "ft" / "model.safetensors").read_bytes()
    line = _mistake(*args, "--set", "lr=0.01", "-o", "ft", cwd=tmp_path, match="another configuration")
    assert "lr: 0.001 → 0.01" in line and "--resume" in line and "--fresh" in line
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert saved["lr"] == 0.001  # the refused run did not rewrite the record
    # the same config resumes the finished run (nothing to do, same weights)
    assert _cli(*args, "-o", "ft", cwd=tmp_path).returncode == 0
    assert (tmp_path / "ft" / "model.safetensors").read_bytes() == first
    # --fresh starts over with the new values: equal to a new directory's run
    assert _cli(*args, "--set", "lr=0.01", "--fresh", "-o", "ft", cwd=tmp_path).returncode == 0
    assert _cli(*args, "--set", "lr=0.01", "-o", "ft2", cwd=tmp_path).returncode == 0
    fresh = (tmp_path / "ft" / "model.safetensors").read_bytes()
    assert fresh != first and fresh == (tmp_path / "ft2" / "model.safetensors").read_bytes()
    # --resume continues the checkpoint with the new values (here: one more epoch)
    r = _cli(*args, "--set", "lr=0.01", "--set", "epochs=2", "--resume", "-o", "ft", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["epochs"] == 2


# ------------------------------------------------------------------ data checks

def test_split_root_class_mismatch_and_eval_without_data_are_explained(tmp_path):
    root = tmp_path / "set"
    _make_folder(root / "train", ["a", "b"], 3)
    _make_folder(root / "val", ["a", "c"], 2)
    _mistake("finetune", *TINY, "--set", f"data={root}", cwd=tmp_path, match="looks like a dataset root")
    _mistake("finetune", *TINY, "--set", f"data={root / 'train'}", "--set", f"val_data={root / 'val'}",
             cwd=tmp_path, match="only in the training data: b; only in val_data: c")
    _mistake("finetune", *TINY, "--set", f"data={root / 'train'}", cwd=tmp_path, match="needs held-out data")
    _mistake("eval", "--set", "checkpoint=x.safetensors", cwd=tmp_path, match="eval needs data")
    _mistake("eval", "--set", "data=digits", cwd=tmp_path, match="eval needs checkpoint")
    with pytest.raises(ValueError, match="only in val"):
        check_same_classes(["a", "b"], ["a", "b", "c"], "val")


def test_bad_images_follow_on_error_from_the_shell(tmp_path):
    root = _make_folder(tmp_path / "imgs", ["a", "b"], 4, ext="jpg")
    bad = os.path.join(root, "a", "0001.jpg")
    with open(bad, "r+b") as f:
        f.truncate(200)
    common = ["tokenize", *TINY, "--set", f"data={root}", "--set", "tokenizer.n_tokens=4", "--set", "tokenizer.n_iter=2"]
    _mistake(*common, "-o", "t1", cwd=tmp_path, match="0001.jpg: cannot read image")
    r = _cli(*common, "--set", "on_error=skip", "-o", "t2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "skipping 1 unreadable file" in r.stderr
    assert TokenCache.open(os.path.join(tmp_path, "t2", "tokens")).tokens.shape == (7, 16)


def test_image_folder_survives_symlink_cycles(tmp_path):
    root = _make_folder(tmp_path / "imgs", ["a", "b"], 2)
    os.symlink(os.path.join(root, "a"), os.path.join(root, "a", "loop"))      # a/loop -> a
    os.symlink(os.path.join(root, "b"), os.path.join(root, "a", "other"))     # a/other -> b (entered once)
    ds = ImageFolder(root, 16)
    names = [os.path.relpath(p, root) for p, _ in ds.samples]
    assert names == ["a/0000.png", "a/0001.png", "a/other/0000.png", "a/other/0001.png", "b/0000.png", "b/0001.png"]


def test_validation_split_from_one_folder_is_stratified_and_disjoint(tmp_path):
    root = _make_folder(tmp_path / "imgs", ["a", "b", "c"], 10)
    ds = ImageFolder(root, 16, mode="finetune")
    train, val = split_dataset(ds, 0.2, seed=0)
    assert len(train) == 24 and len(val) == 6
    assert sorted(np.bincount(val.targets).tolist()) == [2, 2, 2]
    assert not set(train.indices) & set(val.indices)
    r = _cli("finetune", *TINY, "--set", f"data={root}", "--set", "val_split=0.2", "--set", "epochs=1",
             "-o", "ft", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "ft" / "classes.json").read_text()) == ["a", "b", "c"]
    val_metrics = json.loads((tmp_path / "ft" / "val.json").read_text())
    assert set(val_metrics["per_class_top1"]) == {"a", "b", "c"}
    # eval on a folder with the same classes, at the checkpoint's image size (no model keys given)
    r = _cli("eval", "--set", f"data={root}", "--set", "checkpoint=ft/model.safetensors", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    other = _make_folder(tmp_path / "other", ["a", "b", "d"], 2)
    _mistake("eval", "--set", f"data={other}", "--set", "checkpoint=ft/model.safetensors", cwd=tmp_path,
             match="only in the training data: c; only in data: d")


# ------------------------------------------------------------------ streaming

def test_streaming_batches_equal_the_in_memory_ones(tmp_path):
    root = _make_folder(tmp_path / "imgs", ["a", "b", "c"], 7, size=(23, 19))
    ds = ImageFolder(root, 16, mode="finetune", seed=3)
    images = np.stack([ds[i][0] for i in range(len(ds))])  # epoch 0's augmentation, in memory
    labels = np.asarray(ds.targets)
    mem = list(DataLoader(ArrayDataset(images, labels), 5, seed=1, prefetch=0))
    for workers in (0, 3):
        streamed = DataLoader(ds, 5, seed=1, prefetch=2, workers=workers)
        got = list(streamed)
        streamed.close()
        assert len(got) == len(mem)
        for (xa, ya), (xb, yb) in zip(got, mem):
            assert np.array_equal(xa, xb) and np.array_equal(ya, yb)


def test_streaming_training_equals_the_in_memory_run(tmp_path):
    mapet.set_num_threads(2)
    root = _make_folder(tmp_path / "imgs", ["a", "b"], 6)
    ds = ImageFolder(root, 16, mode="eval")
    images = np.stack([ds[i][0] for i in range(len(ds))])
    labels = np.asarray(ds.targets)
    kw = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3, num_classes=2, seed=0)
    a, ha = finetune(mapet.create_model("vit_tiny_patch16_224", **kw), ds, epochs=2, batch_size=4, workers=2)
    b, hb = finetune(mapet.create_model("vit_tiny_patch16_224", **kw), (images, labels), epochs=2, batch_size=4)
    assert ha["loss"] == hb["loss"] and np.array_equal(a.flat_params, b.flat_params)
    assert evaluate(a, ds, batch_size=5, workers=2) == evaluate(b, (images, labels), batch_size=5)
    # pre-training over a token cache attached to the folder = arrays + tokens in memory
    tokens = np.random.default_rng(0).integers(0, 8, (len(ds), 16))
    cache = TokenCache.write(str(tmp_path / "tok"), tokens, n_tokens=8, tokenizer="test")
    pkw = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3, num_tokens=8, least_number=4)
    ma, pa = pretrain("mapet", model=mapet.create_model("mapet_tiny_patch16_224", **pkw),
                      data=cache.attach(ImageFolder(root, 16, mode="pretrain")), epochs=1, batch_size=4, workers=3)
    pre = ImageFolder(root, 16, mode="pretrain")
    mb, pb = pretrain("mapet", model=mapet.create_model("mapet_tiny_patch16_224", **pkw),
                      data=np.stack([pre[i][0] for i in range(len(pre))]), tokens=tokens, epochs=1, batch_size=4)
    assert pa["loss"] == pb["loss"] and np.array_equal(ma.flat_params, mb.flat_params)


def test_per_epoch_validation_keeps_the_best_weights(tmp_path):
    x, y = mapet.data.load_digits(16, "train")
    vx, vy = mapet.data.load_digits(16, "test")
    model = mapet.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=24, depth=1,
                               num_heads=3, num_classes=10)
    out = str(tmp_path / "run")
    model, hist = finetune(model, (x[:256], y[:256]), val=(vx, vy), epochs=3, batch_size=64, lr=3e-3,
                           output_dir=out, validate_every_epoch=True)
    assert len(hist["val_top1"]) == 3 and hist["best_val_top1"] == max(hist["val_top1"])
    best = mapet.load(os.path.join(out, "best.safetensors"))
    assert evaluate(best, (vx, vy))["top1"] == hist["best_val_top1"]
    m = evaluate(model, (vx, vy), confusion=True)
    assert m["confusion"].sum() == len(vy) and np.trace(m["confusion"]) == round(m["top1"] * len(vy))
    assert m["top1"] <= m["top5"]
    logits = model(vx)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert m["top5"] == pytest.approx(np.mean(np.any(top5 == vy[:, None], axis=1)), abs=1e-12)
    for c in range(10):
        assert m["per_class"][c] == pytest.approx(np.mean(np.argmax(logits[vy == c], 1) == c), abs=1e-12)


_RSS_SCRIPT = r"""
import resource, sys, numpy as np
from mapet.data import DataLoader, ImageFolder
ds = ImageFolder(sys.argv[1], 64, mode="finetune")
loader = DataLoader(ds, 32, seed=0, prefetch=2, workers=2)
it = iter(loader)
next(it)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = 32 + sum(b[0].shape[0] for b in it)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(n, base, peak)
"""


def test_streaming_memory_does_not_grow_with_the_dataset(tmp_path):
    from PIL import Image
    root = tmp_path / "many"
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (16, 40, 48, 3), dtype=np.uint8)
    for i in range(3000):
        folder = root / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(tiles[i % 16]).save(folder / f"{i:05d}.jpg", quality=80)
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(root)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    n, base, peak = map(int, r.stdout.split())
    assert n == 3000
    whole = 3000 * 3 * 64 * 64 * 4 / 1024  # KiB the decoded split would take in memory (141 MiB)
    assert (peak - base) < 0.15 * whole, (base, peak)


def test_csv_log_is_written_parseable_and_trimmed_on_resume(tmp_path):
    import csv
    x, y = mapet.data.load_digits(16, "train")
    data = (x[:96], y[:96])
    kw = dict(img_size=16, patch_size=4, embed_dim=24, depth=1, num_heads=3, num_classes=10)
    out = str(tmp_path / "run")
    finetune(mapet.create_model("vit_tiny_patch16_224", **kw), data, epochs=2, batch_size=32, output_dir=out,
             stop_after=4)
    with open(os.path.join(out, "log.csv"), "a") as f:
        f.write("5,1,9.9,0.1,1\n")  # a row written after the checkpoint, before a kill
    _, hist = finetune(mapet.create_model("vit_tiny_patch16_224", **kw), data, epochs=2, batch_size=32,
                       output_dir=out)
    with open(os.path.join(out, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert [int(r["epoch"]) for r in rows] == [0, 0, 0, 1, 1, 1]
    assert [float(r["loss"]) for r in rows] == pytest.approx(hist["loss"], rel=1e-8)
    assert [float(r["lr"]) for r in rows] == pytest.approx(hist["lr"], rel=1e-8)
    assert all(float(r["images_per_s"]) > 0 for r in rows)


def test_tensorboard_needs_its_writer_library(tmp_path, monkeypatch):
    """Without tensorboardX or torch, asking for TensorBoard is an ImportError naming what to install
    (the libraries are hidden here, so the case runs whatever is installed)."""
    for name in ("tensorboardX", "torch", "torch.utils", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)
    x, y = mapet.data.load_digits(16, "train")
    model = mapet.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=24, depth=1,
                               num_heads=3, num_classes=10)
    out = str(tmp_path / "run")
    with pytest.raises(ImportError, match="tensorboardX"):
        finetune(model, (x[:32], y[:32]), epochs=1, batch_size=32, output_dir=out, tensorboard=True)


def test_demo_on_ones_own_folder_says_so_and_draws_from_it(tmp_path):
    root = _make_folder(tmp_path / "imgs", ["x", "y"], 12, size=(18, 18))
    r = _cli("demo", *TINY, "--set", f"data={root}", "--set", "val_split=0.25", "--set", "tokenizer.n_tokens=8",
             "--set", "tokenizer.n_iter=2", "--set", "pretrain.epochs=1", "--set", "pretrain.least_number=4",
             "--set", "finetune.epochs=1", "--set", "linprobe.epochs=2", "-o", "demo", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"data: ImageFolder {root}: 18 train / 6 held-out images (val_split 0.25 of it), 2 classes" in r.stdout
    assert "digits" not in r.stdout
    results = (tmp_path / "demo" / "results.md").read_text()
    assert str(root) in results and "18 train / 6 held-out" in results
    for f in ("tokens.png", "ccvit.png", "dtm.png", "masks.png"):
        assert os.path.exists(tmp_path / "demo" / f)
    from mapet.demo import figure_images
    cfg = {"data": root, "val_split": 0.25, "model": {"img_size": 16}, "seed": 0}
    held = figure_images(cfg, 8)
    _, val = split_dataset(ImageFolder(root, 16, mode="eval"), 0.25, seed=0)
    assert held.shape == (6, 3, 16, 16) and np.array_equal(held[0], val[0][0])


def test_a_streamed_run_stopped_mid_epoch_resumes_bitwise(tmp_path):
    mapet.set_num_threads(2)
    root = _make_folder(tmp_path / "imgs", ["a", "b", "c"], 5)
    kw = dict(img_size=16, patch_size=4, embed_dim=24, depth=1, num_heads=3, num_classes=3, seed=0)

    def run(out, stop_after=None):
        ds = ImageFolder(root, 16, mode="finetune", seed=1)  # random crops and flips, seeded per image
        return finetune(mapet.create_model("vit_tiny_patch16_224", **kw), ds, epochs=2, batch_size=4, workers=2,
                        output_dir=str(out), stop_after=stop_after)

    whole, hw = run(tmp_path / "whole")
    run(tmp_path / "cut", stop_after=2)  # 4 steps per epoch: stopped inside epoch 0
    resumed, hr = run(tmp_path / "cut")
    assert hr["loss"] == hw["loss"] and np.array_equal(resumed.flat_params, whole.flat_params)


def test_options_of_another_method_are_errors(tmp_path):
    _mistake("pretrain", "--set", "num_masking_patches=20", cwd=tmp_path,
             match="method mapet does not use num_masking_patches")
    _mistake("pretrain", "--set", "method=mim", "--set", "least_number=20", cwd=tmp_path,
             match="method mim does not use least_number")
    _mistake("pretrain", "--set", "ccvit.pixel_weight=2", cwd=tmp_path, match="does not use ccvit.*")


def test_augmentation_presets_from_the_shell(tmp_path):
    root = _make_folder(tmp_path / "imgs", ["a", "b"], 6)
    args = ["finetune", *TINY, "--set", f"data={root}", "--set", "val_split=0.34", "--set", "epochs=1"]
    _mistake(*args, "--set", "augment=mixup", cwd=tmp_path, match="augment must be one of none, crop_flip, randaugment")
    r = _cli(*args, "--set", "augment=randaugment", "--set", "label_smoothing=0.2", "-o", "ra", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["top1"] >= 0


def test_a_saved_config_is_a_valid_config_file(tmp_path):
    args = ["linprobe", *TINY, "--set", "epochs=2"]
    assert _cli(*args, "-o", "lp", cwd=tmp_path).returncode == 0
    r = _cli("linprobe", "-c", str(tmp_path / "lp" / "config.json"), "--print-config", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads((tmp_path / "lp" / "config.json").read_text())


def _read_tfrecords(path):
    """The records of a TFRecord file (TensorBoard's event files): uint64 length, masked CRC32C
    of the length, the bytes, masked CRC32C of the bytes; lengths are checked against the file."""
    import struct
    out = []
    with open(path, "rb") as f:
        blob = f.read()
    i = 0
    while i < len(blob):
        (n,) = struct.unpack("<Q", blob[i:i + 8])
        assert i + 12 + n + 4 <= len(blob), "truncated record"
        out.append(blob[i + 12:i + 12 + n])
        i += 12 + n + 4
    return out


def test_tensorboard_event_files_hold_the_logged_scalars(tmp_path):
    from tensorboardX.proto import event_pb2   # in the test extras; optional for users
    x, y = mapet.data.load_digits(16, "train")
    model = mapet.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=24, depth=1,
                               num_heads=3, num_classes=10)
    out = str(tmp_path / "run")
    _, hist = finetune(model, (x[:96], y[:96]), epochs=1, batch_size=32, output_dir=out, tensorboard=True)
    folder = os.path.join(out, "tensorboard")
    scalars = {}
    for name in os.listdir(folder):
        for record in _read_tfrecords(os.path.join(folder, name)):
            event = event_pb2.Event.FromString(record)
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(hist["loss"], rel=1e-6)
    assert [v for _, v in scalars["train/lr"]] == pytest.approx(hist["lr"], rel=1e-6)
    assert all(v > 0 for _, v in scalars["train/images_per_s"])

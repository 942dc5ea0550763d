"""Image size and normalisation come from the checkpoint: recorded by save, read by load, used by
finetune / eval / predict from the shell; a different value given there is a one-line error naming
both. Also the ``predict`` command and ``predict_files``."""
import csv
import json
import os

import numpy as np
import pytest

import mapet
from _helpers import TINY_CLI, cli, cli_mistake
from mapet.data import ArrayDataset, DataLoader, ImageFolder
from mapet.data.data_config import IDENTITY, Normalized, check_normalization, read_file_config, resolve

IMAGENET = ["--set", "mean=[0.485,0.456,0.406]", "--set", "std=[0.229,0.224,0.225]"]
_cli, _mistake, TINY = cli, cli_mistake, TINY_CLI


def _make_folder(root, classes, per_class, size=(20, 24), seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)).save(
                os.path.join(root, c, f"{i:04d}.png"))
    return str(root)


def test_save_records_and_load_restores_the_normalisation(tmp_path):
    m = mapet.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, num_classes=3)
    m.save(str(tmp_path / "plain.safetensors"))
    assert read_file_config(str(tmp_path / "plain.safetensors")) == (16, None)
    assert mapet.load(str(tmp_path / "plain.safetensors")).data_config is None
    m.data_config = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    m.save(str(tmp_path / "norm.safetensors"))
    assert mapet.load(str(tmp_path / "norm.safetensors")).data_config == m.data_config
    p = mapet.create_model("mapet_tiny_patch16_224", img_size=16, patch_size=4, depth=1, num_tokens=8, least_number=4)
    p.data_config = IDENTITY
    p.save(str(tmp_path / "pre.safetensors"))
    assert mapet.load(str(tmp_path / "pre.safetensors")).data_config == IDENTITY
    # resolve: unset values come from the file, equal ones pass, different ones name both
    path = str(tmp_path / "norm.safetensors")
    assert resolve(path) == (16, m.data_config)
    assert resolve(path, 16, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]) == (16, m.data_config)
    with pytest.raises(ValueError, match=r"img_size: 32 given, but the checkpoint .* was made for 16×16 images"):
        resolve(path, 32)
    with pytest.raises(ValueError, match=r"mean/std: \[0.0, 0.0, 0.0\] / \[1.0, 1.0, 1.0\] given, .*"
                                         r"mean \[0.5, 0.4, 0.3\] / std \[0.2, 0.25, 0.3\]"):
        resolve(path, None, [0, 0, 0], [1, 1, 1])
    assert resolve(None) == (None, IDENTITY)
    for mean, std, match in (([0, 0], [1, 1, 1], "mean: expected a list of 3"), ([0, 0, 0], [1, 0, 1], "std: expected positive"),
                             ("imagenet", [1, 1, 1], "mean: expected a list of 3")):
        with pytest.raises(ValueError, match=match):
            check_normalization(mean, std)


def test_normalized_dataset_against_numpy(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((5, 3, 4, 4), dtype=np.float32)
    y = np.arange(5) % 2
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    ref = (x.astype(np.float64) - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    ds = Normalized(ArrayDataset(x, y), mean, std)
    (bx, by), = list(DataLoader(ds, 5, shuffle=False, prefetch=0))
    np.testing.assert_allclose(bx, ref, rtol=1e-6, atol=1e-6)
    assert np.array_equal(by, y) and list(ds.targets) == list(y)
    root = _make_folder(tmp_path / "imgs", ["a", "b"], 3)
    folder = ImageFolder(root, 16)
    got = list(DataLoader(Normalized(folder, mean, std), 3, shuffle=False, prefetch=1, workers=2))
    raw = np.stack([folder[i][0] for i in range(len(folder))]).astype(np.float64)
    np.testing.assert_allclose(np.concatenate([b[0] for b in got]),
                               (raw - np.array(mean)[:, None, None]) / np.array(std)[:, None, None], rtol=1e-6, atol=1e-6)


def test_shell_takes_size_and_normalisation_from_the_checkpoint(tmp_path):
    root = _make_folder(tmp_path / "imgs", ["a", "b", "c"], 6)
    common = ["--set", f"data={root}", "--set", "val_split=0.34", "--set", "epochs=1", "--set", "progress=false"]
    r = _cli("finetune", *TINY, *common, *IMAGENET, "-o", "ft", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ckpt = str(tmp_path / "ft" / "model.safetensors")
    norm = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert read_file_config(ckpt) == (16, norm)
    assert read_file_config(str(tmp_path / "ft" / "checkpoints" / "best.safetensors")) == (16, norm)
    # eval: nothing repeated; its numbers are those of the model on normalised eval views
    r = _cli("eval", "--set", f"data={root}", "--set", f"checkpoint={ckpt}", "--set", "workers=0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    model = mapet.load(ckpt)
    folder = ImageFolder(root, 16)
    x = np.stack([folder[i][0] for i in range(len(folder))]).astype(np.float64)
    x = ((x - np.array(norm["mean"])[:, None, None]) / np.array(norm["std"])[:, None, None]).astype(np.float32)
    top1 = float(np.mean(np.argmax(model(x), 1) == np.asarray(folder.targets)))
    assert json.loads(r.stdout.strip().splitlines()[-1])["top1"] == pytest.approx(top1, abs=1e-12)
    # predict: the same view, class names from classes.json
    r = _cli("predict", "--set", f"checkpoint={ckpt}", "--set", f"data={root}", "--set", "topk=2", "-o", "pred",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "pred" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["path"] for row in rows] == [p for p, _ in folder.samples]
    probs = model.predict(x, probabilities=True)
    assert [row["predicted"] for row in rows] == [["a", "b", "c"][i] for i in probs.argmax(1)]
    np.testing.assert_allclose([float(row["probability"]) for row in rows], probs.max(1), atol=1e-6)
    assert all(len(row["top2"].split(";")) == 2 for row in rows)
    # mistakes: a different size or normalisation than the checkpoint's, each one line naming both
    line = _mistake("eval", "--set", f"data={root}", "--set", f"checkpoint={ckpt}", "--set", "img_size=32",
                    cwd=tmp_path, match="img_size: 32 given, but the checkpoint")
    assert "16×16" in line
    line = _mistake("eval", "--set", f"data={root}", "--set", f"checkpoint={ckpt}", "--set", "mean=[0,0,0]",
                    "--set", "std=[1,1,1]", cwd=tmp_path, match="mean/std: [0.0, 0.0, 0.0] / [1.0, 1.0, 1.0] given")
    assert "[0.485, 0.456, 0.406]" in line
    _mistake("predict", "--set", f"checkpoint={ckpt}", "--set", f"data={root}", "--set", "img_size=24", cwd=tmp_path,
             match="img_size: 24 given")
    _mistake("eval", "--set", f"data={root}", "--set", f"checkpoint={ckpt}", "--set", "mean=[0.5,0.5,0.5]",
             cwd=tmp_path, match="std: set both mean and std")
    _mistake("finetune", *TINY, *common, "--set", "mean=imagenet", "--set", "std=[1,1,1]", "-o", "x", cwd=tmp_path,
             match="mean: expected a list of 3 finite numbers")
    _mistake("predict", "--set", f"checkpoint={ckpt}", cwd=tmp_path, match="predict needs data")
    _mistake("predict", "--set", f"data={root}", cwd=tmp_path, match="predict needs checkpoint")
    _mistake("predict", "--set", f"checkpoint={ckpt}", "--set", f"data={tmp_path / 'nothing'}", cwd=tmp_path,
             match="is neither an image file nor a directory")


def test_transfer_takes_size_and_normalisation_from_the_pretrained_checkpoint(tmp_path):
    root = _make_folder(tmp_path / "imgs", ["a", "b"], 6)
    pre = mapet.create_model("mapet_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3,
                             num_tokens=8, least_number=4)
    pre.data_config = IDENTITY  # what `pretrain` records: it trains on pixels in [0, 1]
    pre.save(str(tmp_path / "pre.safetensors"))
    common = ["--set", f"data={root}", "--set", "val_split=0.5", "--set", "epochs=1", "--set", "progress=false",
              "--set", f"pretrained={tmp_path / 'pre.safetensors'}"]
    r = _cli("finetune", *common, "-o", "ft", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert read_file_config(str(tmp_path / "ft" / "model.safetensors")) == (16, IDENTITY)
    _mistake("finetune", *common, "--set", "model.img_size=32", "-o", "ft2", cwd=tmp_path,
             match="img_size: 32 given, but the pre-trained checkpoint")
    line = _mistake("finetune", *common, *IMAGENET, "-o", "ft3", cwd=tmp_path,
                    match="but the pre-trained checkpoint")
    assert "[0.485, 0.456, 0.406]" in line and "[0.0, 0.0, 0.0]" in line
    _mistake("linprobe", *common[:-2], "--set", f"pretrained={tmp_path / 'pre.safetensors'}", *IMAGENET, cwd=tmp_path,
             match="but the pre-trained checkpoint")


def test_predict_files_from_python(tmp_path):
    root = _make_folder(tmp_path / "imgs", ["a", "b"], 2)
    m = mapet.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, num_classes=2)
    m.data_config = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    m.save(str(tmp_path / "m.safetensors"))
    from mapet.predict import predict_files
    paths, probs, names = predict_files(str(tmp_path / "m.safetensors"), root, workers=0)
    folder = ImageFolder(root, 16)
    x = (np.stack([folder[i][0] for i in range(len(folder))]) - 0.5) / 0.25
    np.testing.assert_allclose(probs, m.predict(x.astype(np.float32), probabilities=True), atol=1e-6)
    assert names == ["0", "1"] and paths == [p for p, _ in folder.samples]

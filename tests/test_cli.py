"""Every `python -m mapet` subcommand runs on a tiny config (in a subprocess, as a user would)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import mapet

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(mapet.__file__)))
TINY = ["--set", "model.img_size=16", "--set", "model.patch_size=4", "--set", "model.embed_dim=24",
        "--set", "model.depth=2", "--set", "model.num_heads=3", "--threads", "2"]


def _run(*args, cwd):
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    r = subprocess.run([sys.executable, "-m", "mapet", *args], capture_output=True, text=True, env=env,
                       cwd=cwd, timeout=600)
    assert r.returncode == 0, f"python -m mapet {' '.join(args)}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout


def test_help_lists_every_subcommand(tmp_path):
    out = _run("--help", cwd=tmp_path)
    for cmd in ("tokenize", "pretrain", "finetune", "linprobe", "eval", "demo"):
        assert cmd in out
    assert "--set" in _run("pretrain", "--help", cwd=tmp_path)


def test_tokenize_pretrain_finetune_linprobe_eval(tmp_path):
    tok = ["--set", "tokenizer.n_tokens=16", "--set", "tokenizer.n_iter=5"]
    cache = _run("tokenize", *TINY, *tok, "-o", "tok", cwd=tmp_path).strip().splitlines()[-1]
    assert os.path.exists(os.path.join(tmp_path, cache, "manifest.json"))
    for method, size in (("mapet", "least_number=4"), ("mim", "num_masking_patches=6")):
        out = _run("pretrain", *TINY, *tok, "--set", f"method={method}", "--set", f"tokens={cache}",
                   "--set", "epochs=1", "--set", size, "-o", method, cwd=tmp_path)
        assert json.loads(out.strip().splitlines()[-1])["steps"] > 0
        assert os.path.exists(os.path.join(tmp_path, method, "model.safetensors"))
        assert os.path.exists(os.path.join(tmp_path, method, "config.json"))  # the resolved config
    out = _run("pretrain", *TINY, *tok, "--set", "method=ccvit", "--set", f"tokens={cache}", "--set", "epochs=1",
               "--set", "ccvit.pixel_weight=0.5", "-o", "ccvit", cwd=tmp_path)
    assert json.loads(out.strip().splitlines()[-1])["steps"] > 0
    ccvit = mapet.load(os.path.join(tmp_path, "ccvit", "model.safetensors"))
    assert isinstance(ccvit, mapet.CCViT) and ccvit.config["num_tokens"] == 16
    out = _run("pretrain", *TINY, "--set", "method=dtm", "--set", "dtm.teacher=mapet/model.safetensors",
               "--set", "epochs=1", "-o", "dtm", cwd=tmp_path)
    assert json.loads(out.strip().splitlines()[-1])["steps"] > 0
    dtm = mapet.load(os.path.join(tmp_path, "dtm", "model.safetensors"))
    assert isinstance(dtm, mapet.DTM) and dtm.config["output_dim"] == 24  # the teacher's embed_dim
    count = len(mapet.data.load_digits(16, "train")[0])
    np.save(os.path.join(tmp_path, "feats.npy"), np.random.default_rng(0).random((count, 17, 8), dtype=np.float32))
    out = _run("pretrain", *TINY, "--set", "method=dtm", "--set", "dtm.teacher=feats.npy", "--set", "epochs=1",
               "-o", "dtm-npy", cwd=tmp_path)
    assert json.loads(out.strip().splitlines()[-1])["steps"] > 0
    assert mapet.load(os.path.join(tmp_path, "dtm-npy", "model.safetensors")).config["output_dim"] == 8
    out = _run("finetune", *TINY, "--set", "epochs=1", "--set", "pretrained=mapet/model.safetensors",
               "-o", "ft", cwd=tmp_path)
    assert 0.0 <= json.loads(out.strip().splitlines()[-1])["top1"] <= 1.0
    out = _run("linprobe", *TINY, "--set", "epochs=5", "--set", "pretrained=mim/model.safetensors",
               cwd=tmp_path)
    assert 0.0 <= json.loads(out.strip().splitlines()[-1])["val_top1"] <= 1.0
    # eval takes the image size from the checkpoint; the data must be named
    out = _run("eval", "--set", "data=digits", "--set", "checkpoint=ft/model.safetensors", "-o", "ev", cwd=tmp_path)
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["top1"] <= metrics["top5"] <= 1.0
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert saved["top1"] == metrics["top1"] and sorted(saved["per_class_top1"]) == [str(c) for c in range(10)]
    rows = (tmp_path / "ev" / "eval-confusion.csv").read_text().strip().splitlines()
    counts = np.array([[int(v) for v in r.split(",")[1:]] for r in rows[1:]])
    assert counts.shape == (10, 10) and counts.sum() == 359
    assert np.trace(counts) / 359 == pytest.approx(metrics["top1"], abs=1e-12)
    assert (tmp_path / "ev" / "eval-confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_on_a_tiny_budget(tmp_path):
    out = _run("demo", *TINY, "--set", "tokenizer.n_tokens=16", "--set", "tokenizer.n_iter=3",
               "--set", "pretrain.epochs=1", "--set", "pretrain.least_number=4", "--set", "finetune.epochs=1",
               "--set", "linprobe.epochs=3", "-o", "demo", cwd=tmp_path)
    for row in ("MaPeT", "MIM", "CCViT", "DTM", "scratch"):
        assert row in out
    for f in ("results.md", "results.png", "results.json", "curves.png", "masks.png", "tokens.png", "ccvit.png",
              "dtm.png"):
        assert os.path.exists(os.path.join(tmp_path, "demo", f))

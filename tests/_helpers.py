"""Helpers several test modules share (imported as ``from _helpers import ...``, like float32_bounds)."""
import os
import subprocess
import sys

import mapet
from mapet.data import load_digits
from mapet.train import finetune

# A ViT small enough to fine-tune for two epochs in a test.
TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3, drop_path_rate=0.1)


def digits_subset(n: int):
    """The first ``n`` training digits at 16×16: (images, labels)."""
    x, y = load_digits(16, "train")
    return x[:n], y[:n]


def finetune_tiny(digits, out, stop_after=None, **kw):
    """Two epochs of ``finetune`` of TINY_VIT (batch 32, lr 2e-3, seed 3) with a checkpoint every 2
    steps in ``out``; returns (model, history)."""
    return finetune("vit_tiny_patch16_224", digits, epochs=2, batch_size=32, lr=2e-3, seed=3, output_dir=str(out),
                    checkpoint_every=2, stop_after=stop_after, **TINY_VIT, **kw)


# ---------------------------------------------------------------- the command line, as a user runs it

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(mapet.__file__)))
# The tiny ViT of the CLI tests as --set options (two threads).
TINY_CLI = ["--set", "model.img_size=16", "--set", "model.patch_size=4", "--set", "model.embed_dim=24",
            "--set", "model.depth=2", "--set", "model.num_heads=3", "--threads", "2"]


def cli(*args, cwd):
    """``python -m mapet *args`` in ``cwd`` with this checkout's package; the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    return subprocess.run([sys.executable, "-m", "mapet", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def cli_mistake(*args, cwd, match):
    """A user's mistake: exit status 2 and one line on stderr containing ``match``; returns that line."""
    r = cli(*args, cwd=cwd)
    assert r.returncode == 2, f"{args}: status {r.returncode}\n{r.stdout}\n{r.stderr}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert match in lines[0], lines[0]
    return lines[0]

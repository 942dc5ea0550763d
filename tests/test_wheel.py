"""The distributable wheel made by scripts/build_wheel.sh: a manylinux tag for this interpreter,
OpenBLAS left to the scipy-openblas32 dependency, and — installed with pip into a fresh virtual
environment, with the Swift toolchain off PATH — it imports and trains.

The wheel takes minutes to build, so .ci/run builds it once and passes its path in MAPET_WHEEL.
Under CI (CI=true) a missing MAPET_WHEEL fails the test; elsewhere the test is skipped with the
command to run.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

WHEEL = os.environ.get("MAPET_WHEEL")
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")

TRAIN = r"""
import json, os, shutil, sys
import numpy as np
import mapet

assert shutil.which("swift") is None and shutil.which("swiftc") is None, "the toolchain is still on PATH"
rng = np.random.default_rng(0)
x = rng.random((8, 3, 16, 16), dtype=np.float32)
tokens = rng.integers(0, 8, (8, 16)).astype(np.int32)
model = mapet.create_model("mapet_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=24, depth=1,
                           num_heads=3, num_tokens=8, least_number=4, drop_path_rate=0.0)
opt = mapet.AdamW(model, lr=1e-2, weight_decay=0.0)
batch = mapet.PermutationSampler(16, least_number=4, seed=0).sample(8)
losses = []
for _ in range(6):
    losses.append(float(model.train_step(x, tokens, batch)))
    opt.step(); opt.zero_grad()
toolchain = os.environ["HIDDEN_TOOLCHAIN"]
mapped = sorted({line.split()[-1] for line in open("/proc/self/maps") if len(line.split()) >= 6})
print(json.dumps({"file": mapet.__file__, "prefix": sys.prefix, "losses": losses, "blas": mapet.blas_info(),
                  "from_toolchain": [p for p in mapped if toolchain and p.startswith(toolchain)],
                  "swift_runtime": [p for p in mapped if "libswift" in os.path.basename(p)]}))
"""


def _wheel() -> Path:
    if not WHEEL:
        if IN_CI:
            pytest.fail("MAPET_WHEEL is not set: .ci/run must build the wheel (bash scripts/build_wheel.sh) "
                        "and export its path before running the tests")
        pytest.skip("no wheel given: MAPET_WHEEL=$(bash scripts/build_wheel.sh | tail -n 1) python3 -m pytest "
                    "tests/test_wheel.py")
    path = Path(WHEEL)
    assert path.is_file(), f"MAPET_WHEEL={WHEEL} does not exist"
    return path


def test_wheel_tag_and_contents():
    path = _wheel()
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    m = re.fullmatch(rf"mapet-[0-9][^-]*-{py}-{py}-manylinux_2_(\d+)_x86_64\.whl", path.name)
    assert m, f"expected a manylinux_2_xx_x86_64 wheel for {py}, got {path.name}"
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        info = next(n for n in names if n.endswith(".dist-info/WHEEL"))
        wheel_meta = z.read(info).decode()
        meta = z.read(info.replace("WHEEL", "METADATA")).decode()
    assert f"Tag: {py}-{py}-manylinux_2_{m.group(1)}_x86_64" in wheel_meta
    assert "Root-Is-Purelib: false" in wheel_meta
    assert any(re.fullmatch(r"mapet/_core\..*\.so", n) for n in names)
    assert not any("openblas" in n.lower() for n in names), "OpenBLAS must come from scipy-openblas32"
    assert "Requires-Dist: scipy-openblas32" in meta and "Requires-Dist: matplotlib" in meta


def test_wheel_installs_and_trains_without_swift(tmp_path):
    path = _wheel()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", str(path)], check=True, timeout=900)

    swift = shutil.which("swift")
    toolchain = os.path.dirname(os.path.dirname(os.path.realpath(swift))) if swift else ""
    hidden = [d for d in os.environ.get("PATH", "").split(os.pathsep)
              if d and not (os.path.exists(os.path.join(d, "swift")) or os.path.exists(os.path.join(d, "swiftc")))]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LD_LIBRARY_PATH", "LD_PRELOAD")}
    env.update(PATH=os.pathsep.join([str(venv / "bin")] + hidden), HIDDEN_TOOLCHAIN=toolchain,
               PYTHONNOUSERSITE="1")
    out = subprocess.run([python, "-c", TRAIN], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["file"].startswith(str(venv)), r["file"]   # the wheel's copy, not the source tree
    assert r["from_toolchain"] == [] and r["swift_runtime"] == [], r
    losses = r["losses"]
    assert all(l == l and l < 10 for l in losses) and losses[-1] < losses[0], losses


def test_cpu_baseline_check_names_what_is_missing(tmp_path):
    from mapet import _native
    full = tmp_path / "full"
    full.write_text("processor : 0\nflags : fpu sse2 avx avx2 fma f16c bmi1 bmi2 avx512f\n")
    old = tmp_path / "old"
    old.write_text("processor : 0\nflags : fpu sse2 avx\n")
    assert _native._missing_cpu_features(str(full)) == []
    assert _native._missing_cpu_features(str(old)) == ["avx2", "fma", "f16c", "bmi2"]
    assert _native._missing_cpu_features(str(tmp_path / "absent")) == []
    assert _native._missing_cpu_features() == []          # this machine runs the tests

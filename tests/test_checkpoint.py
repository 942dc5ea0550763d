"""Checkpoints: round trip of tensors and run state, and atomicity — a write that fails or is
killed midway leaves the previous checkpoint loadable."""
import glob
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import mapet.io
from mapet.checkpoint import find_checkpoint, load_checkpoint, restore_rng, rng_state, save_checkpoint
from mapet.data import DataLoader, load_digits, ArrayDataset

# Subprocesses import the same mapet as this process (installed, or the source tree in dev).
import mapet as _mapet

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(_mapet.__file__)))


def _groups(rng, scale=1.0):
    return {
        "model": {"blocks.0.attn.q.weight": (scale * rng.standard_normal((8, 8))).astype(np.float32),
                  "pos_embed": rng.standard_normal((1, 5, 8)).astype(np.float32)},
        "optimizer.exp_avg": {"blocks.0.attn.q.weight": rng.standard_normal((8, 8)).astype(np.float32)},
        "extra": {"steps": np.array([3, 4], np.int64), "half": np.ones(3, np.float16), "flag": np.array([True, False])},
    }


def test_round_trip_of_tensors_and_state(tmp_path):
    rng = np.random.default_rng(0)
    groups = _groups(rng)
    gen = np.random.default_rng(123)
    gen.random(5)
    ds = ArrayDataset(*load_digits(8, "test"))
    loader = DataLoader(ds, 16, seed=4)
    it = iter(loader); next(it); next(it); it.close()
    state = {"epoch": 2, "step": np.int64(17), "lr": np.float32(0.5), "loader": loader.state_dict(),
             "rng": rng_state(gen), "perm": np.arange(4, dtype=np.int32), "config": {"model": "vit", "sizes": (1, 2)}}
    path = save_checkpoint(tmp_path, groups, state)
    assert path == str(tmp_path / "last.safetensors") and find_checkpoint(tmp_path) == path
    got, st = load_checkpoint(tmp_path)
    assert list(got) == list(groups)
    for g in groups:
        assert set(got[g]) == set(groups[g])
        for k, v in groups[g].items():
            assert got[g][k].dtype == v.dtype and got[g][k].shape == v.shape
            np.testing.assert_array_equal(got[g][k], v)
    assert st["epoch"] == 2 and st["step"] == 17 and st["lr"] == 0.5 and st["config"]["sizes"] == [1, 2]
    assert st["perm"].dtype == np.int32 and st["perm"].tolist() == [0, 1, 2, 3]
    # RNG and loader states restore to continue exactly
    np.testing.assert_array_equal(restore_rng(st["rng"]).random(7), gen.random(7))
    resumed = DataLoader(ds, 16, seed=0)
    resumed.load_state_dict(st["loader"])
    np.testing.assert_array_equal(next(iter(resumed))[1], next(iter(loader))[1])


def test_bad_inputs_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="group names"):
        save_checkpoint(tmp_path / "a.safetensors", {"a/b": {"x": np.zeros(1)}})
    with pytest.raises(TypeError, match="cannot store a object"):
        save_checkpoint(tmp_path / "a.safetensors", {"m": {}}, {"x": object()})
    mapet.io.save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="plain.safetensors: not a mapet checkpoint"):
        load_checkpoint(tmp_path / "plain.safetensors")
    save_checkpoint(tmp_path / "ok.safetensors", {"m": {"x": np.zeros(1000, np.float32)}}, {"step": 1})
    raw = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "torn.safetensors").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(ValueError, match="torn.safetensors: truncated"):
        load_checkpoint(tmp_path / "torn.safetensors")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing")
    assert find_checkpoint(tmp_path / "nothing") is None


class _Boom(RuntimeError):
    pass


def test_failure_inside_the_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    old = _groups(rng)
    save_checkpoint(tmp_path, old, {"step": 1})
    original = mapet.io.atomic_write
    written = []

    class Exploding:
        """A file object that fails once half the checkpoint's bytes are on disk."""

        def __init__(self, f, limit):
            self.f, self.left = f, limit

        def write(self, data):
            data = memoryview(data).cast("B")
            if len(data) >= self.left:
                self.f.write(data[: self.left])
                self.f.flush()
                written.append(os.path.getsize(self.f.name))
                raise _Boom("disk full")
            self.left -= len(data)
            return self.f.write(data)

    def failing_atomic_write(path, write):
        return original(path, lambda f: write(Exploding(f, 600)))

    monkeypatch.setattr(mapet.io, "atomic_write", failing_atomic_write)
    with pytest.raises(_Boom):
        save_checkpoint(tmp_path, _groups(rng, 5.0), {"step": 2})
    assert written and written[0] == 600  # the new file really was half-written
    monkeypatch.undo()
    got, st = load_checkpoint(tmp_path)
    assert st["step"] == 1
    np.testing.assert_array_equal(got["model"]["blocks.0.attn.q.weight"], old["model"]["blocks.0.attn.q.weight"])
    assert os.listdir(tmp_path) == ["last.safetensors"]  # the temporary file was removed


_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from mapet.checkpoint import save_checkpoint
    step = 0
    while True:
        step += 1
        w = np.full(6_000_000, float(step), np.float32)   # 24 MB per checkpoint
        save_checkpoint(sys.argv[2], {"model": {"w": w}, "opt": {"m": w[:1000] * 2}}, {"step": step})
        print(step, flush=True)
""")


def test_kill_during_a_write_leaves_the_last_good_checkpoint(tmp_path):
    killed_mid_write = False
    for attempt in range(5):
        run = tmp_path / f"run{attempt}"
        run.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, PYTHON_DIR, str(run)],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "1"  # one complete checkpoint exists
            deadline = time.time() + 20
            while time.time() < deadline:  # wait until the next write is under way, then kill
                temps = glob.glob(str(run / ".tmp-last.safetensors-*"))
                if temps and 0 < _size(temps[0]) < 24_000_000:
                    break
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        got, st = load_checkpoint(run)
        w = got["model"]["w"]
        assert w.shape == (6_000_000,) and st["step"] >= 1
        assert np.all(w == st["step"]) and np.all(got["opt"]["m"] == 2 * st["step"])  # one consistent version
        leftovers = glob.glob(str(run / ".tmp-last.safetensors-*"))
        if leftovers and _size(leftovers[0]) < 24_000_000:
            killed_mid_write = True
            # the next save by the same run replaces the stale temporary and completes
            save_checkpoint(run, {"model": {"w": np.zeros(3, np.float32)}}, {"step": -1})
            assert os.listdir(run) == ["last.safetensors"] and load_checkpoint(run)[1]["step"] == -1
            break
    assert killed_mid_write, "never caught the writer mid-write in 5 attempts"


def _size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def test_equal_content_is_written_as_equal_bytes(tmp_path):
    # safetensors keeps metadata in a hash map; mapet.io sorts it, so the same weights and metadata
    # give the same file on every run (checksums, byte-wise comparison of two runs).
    from mapet import io
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    meta = {f"key{i}": f"value {i} é" for i in range(12)}
    files = set()
    for i in range(6):
        io.save_file(tensors, str(tmp_path / f"{i}.safetensors"), meta)
        files.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(files) == 1
    got, got_meta = io.load_file(str(tmp_path / "0.safetensors"))
    assert got_meta == meta and all(np.array_equal(got[k], v) for k, v in tensors.items())

"""Data-parallel training and distributed k-means under ``mpiexec -n 2`` (pip-installed MPI).

Every multi-rank test launches a real MPI job in a subprocess (mpiexec from the ``mpich``
wheel, found next to the interpreter or on PATH) and compares what the ranks produced with a
single process in this test: the same weights as one process on the combined batch, the same
centroids as single-process k-means on the concatenated points, a failing rank ending the job
quickly with its rank named, and a single process that never imports mpi4py.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import mapet
from mapet import distributed
from mapet.data import ArrayDataset, DataLoader, load_digits
from mapet.train import finetune
from float32_bounds import clear_of_ties

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(mapet.__file__)))
TINY = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3, drop_path_rate=0.0)


def _mpiexec() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = here if os.path.exists(here) else shutil.which("mpiexec")
    if found is None:
        raise RuntimeError('mpiexec not found: install the MPI extra, python3 -m pip install ".[test,mpi]"')
    return found


def _run(code: str, tmp_path, ranks: int = 2, timeout: float = 90):
    """Run ``code`` as a script on ``ranks`` MPI ranks; returns (CompletedProcess, seconds)."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(code))
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR, HYDRA_LAUNCHER="fork")
    t0 = time.perf_counter()
    proc = subprocess.run([_mpiexec(), "-n", str(ranks), sys.executable, str(script)], capture_output=True,
                          text=True, env=env, cwd=str(tmp_path), timeout=timeout)
    return proc, time.perf_counter() - t0


# ------------------------------------------------------------------ sharding (no MPI needed)

def test_shards_are_disjoint_cover_the_epoch_and_rebuild_the_global_batches():
    order = np.random.default_rng(0).permutation(81)
    parts = [distributed.shard_batches(order, 8, r, 2) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 6  # ceil(81 / 16) steps on every rank
    for b in range(6):  # rank 0's part then rank 1's = the single-process batch of 16
        assert np.array_equal(np.concatenate([parts[0][b], parts[1][b]]), order[b * 16:(b + 1) * 16])
    assert len(parts[1][-1]) == 0  # the last global batch has 1 sample: rank 1 runs an empty micro-batch
    seen = np.concatenate([p for rank in parts for p in rank])
    assert np.array_equal(np.sort(seen), np.arange(81))

    ds = ArrayDataset(np.zeros((81, 1, 1, 1), np.float32), np.arange(81))
    loaders = [DataLoader(ds, 8, seed=4, prefetch=0).shard(r, 2) for r in range(2)]
    for epoch in range(2):  # epoch-dependent shards, every sample once per epoch
        got = [[b[1] if b is not None else np.zeros(0, np.int64) for b in ld] for ld in loaders]
        assert np.array_equal(np.sort(np.concatenate(got[0] + got[1])), np.arange(81))
        assert np.array_equal(np.concatenate(got[0] + got[1])[:8], loaders[0].order(epoch)[:8])
    assert not np.array_equal(loaders[0].order(0), loaders[0].order(1))


# ------------------------------------------------------------------ data-parallel training

TRAIN_JOB = """
    import logging
    import numpy as np
    from mapet import distributed
    from mapet.data import load_digits
    from mapet.train import finetune
    logging.basicConfig(level=logging.INFO)
    ctx = distributed.init()
    x, y = load_digits(16, "train")
    x, y = x[:81], y[:81]
    kw = dict(epochs=2, batch_size=8, lr=2e-3, seed=3, layer_decay=None, warmup_epochs=0.5,
              output_dir="ckpt", checkpoint_every=2, img_size=16, patch_size=4, embed_dim=24, depth=2,
              num_heads=3, drop_path_rate=0.0)
    # interrupted after 3 steps, then a fresh model resumes from rank 0's checkpoint on every rank
    finetune("vit_tiny_patch16_224", (x, y), stop_after=3, **kw)
    model, hist = finetune("vit_tiny_patch16_224", (x, y), **kw)
    np.save(f"params{ctx.rank}.npy", model.flat_params)
    np.save(f"loss{ctx.rank}.npy", np.array(hist["loss"]))
"""


def test_two_ranks_train_like_one_process_on_the_combined_batch(tmp_path):
    proc, _ = _run(TRAIN_JOB, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    p0, p1 = np.load(tmp_path / "params0.npy"), np.load(tmp_path / "params1.npy")
    assert np.array_equal(p0, p1)  # identical weights on every rank
    # rank 0 logged the resume; rank 1 logs nothing at INFO (only rank 0 logs)
    assert proc.stderr.count("finetune: resumed from") == 1 and "at step 3/12" in proc.stderr
    # one process, batch 16 = 2 ranks × 8, the same 81 samples (last batch: 1 sample, so rank 1
    # ran a zero-sample micro-batch there), no interruption
    x, y = load_digits(16, "train")
    single, hist = finetune("vit_tiny_patch16_224", (x[:81], y[:81]), epochs=2, batch_size=16, lr=2e-3, seed=3,
                            layer_decay=None, warmup_epochs=0.5, **TINY)
    assert len(hist["loss"]) == 12
    np.testing.assert_allclose(np.load(tmp_path / "loss0.npy"), hist["loss"], rtol=1e-5, atol=1e-6)
    # The two runs' GEMMs have other shapes (batch 8 per rank vs 16), so their gradients agree
    # within float32 rounding, not bitwise. AdamW normalises each update: where a parameter's
    # gradient is itself at rounding level, its sign is rounding's choice and the two runs may
    # step that element in opposite directions (up to lr per step), while every other element
    # follows the same trajectory to ~1e-6 of its update. So compare the updates as a whole: a
    # handful of such elements weigh far below 1e-3 of the update's norm, while an error in the
    # averaging (a wrong divisor, a rank's gradient missing) moves it by 1/16 of its norm or more.
    init = mapet.create_model("vit_tiny_patch16_224", num_classes=10, seed=3, **TINY).flat_params
    update_dist, update_single = p0 - init, single.flat_params - init
    assert np.linalg.norm(update_single) > 1e-2  # it trained
    assert np.linalg.norm(update_dist - update_single) <= 1e-3 * np.linalg.norm(update_single)
    close = np.abs(update_dist - update_single) <= 2e-5
    assert close.mean() > 0.999, f"{np.count_nonzero(~close)} of {close.size} elements differ by more than 2e-5"
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["last.safetensors", "log.csv"]  # rank 0 alone wrote them


CCVIT_DTM_JOB = """
    import numpy as np
    import mapet
    from mapet import distributed
    from mapet.data import load_digits
    from mapet.train import pretrain
    ctx = distributed.init()
    x = load_digits(16, "train")[0][:40]
    tok = mapet.PixelTokenizer(patch_size=4, n_tokens=8, n_iter=3, seed=0).fit(x)
    arch = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3, drop_path_rate=0.0)
    teacher = mapet.create_model("vit_tiny_patch16_224", seed=5, **arch)
    kw = dict(epochs=2, batch_size=BATCH, lr=2e-3, seed=3, warmup_epochs=0.5)
    c, _ = pretrain("ccvit", model="tiny", data=x, tokens=tok.encode(x), tokenizer=tok, num_replace=2,
                    num_tokens=8, **kw, **arch)
    d, _ = pretrain("dtm", model="tiny", data=x, teacher=teacher, **kw, **arch)
    np.save(f"ccvit{ctx.rank}.npy", c.flat_params)
    np.save(f"dtm{ctx.rank}.npy", d.flat_params)
"""


def test_ccvit_and_dtm_on_two_ranks_train_like_one_process(tmp_path):
    # 2 ranks × 8 images = one process × 16: block masks, CCViT's replaced patches (global sample
    # streams) and DTM's schedules (one per global step) are drawn as one process draws them.
    (tmp_path / "mpi").mkdir()
    proc, _ = _run(CCVIT_DTM_JOB.replace("BATCH", "8"), tmp_path / "mpi")
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = tmp_path / "single"
    single.mkdir()
    script = single / "job.py"
    script.write_text(textwrap.dedent(CCVIT_DTM_JOB.replace("BATCH", "16")))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=str(single),
                       env=dict(os.environ, PYTHONPATH=PYTHON_DIR), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("ccvit", "dtm"):
        p0, p1 = np.load(tmp_path / "mpi" / f"{name}0.npy"), np.load(tmp_path / "mpi" / f"{name}1.npy")
        assert np.array_equal(p0, p1)
        np.testing.assert_allclose(p0, np.load(single / f"{name}0.npy"), rtol=0, atol=2e-5)


# ------------------------------------------------------------------ k-means

_M64 = (1 << 64) - 1


class _RefRNG:
    """xoshiro256** streams via SplitMix64, transcribed from the generator's documentation."""

    def __init__(self, seed, stream):
        def mix(k):
            z = (seed + (4 * stream + k + 1) * 0x9E3779B97F4A7C15) & _M64
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
            return z ^ (z >> 31)
        self.s = [mix(k) for k in range(4)]

    def next(self):
        s = self.s
        rot = lambda v, k: ((v << k) | (v >> (64 - k))) & _M64  # noqa: E731
        out = (rot((s[1] * 5) & _M64, 7) * 9) & _M64
        t = (s[1] << 17) & _M64
        s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t; s[3] = rot(s[3], 45)  # noqa: E702
        return out

    def below(self, n):
        while True:
            m = self.next() * n
            if (m & _M64) >= ((1 << 64) - n) % n:
                return m >> 64

    def uniform(self):
        return (self.next() >> 11) / 2.0 ** 53


def _reference_kmeans(x, k, n_iter, seed, init=None, n_redo=1):
    """Float64 Lloyd with faiss's random init and empty-cluster splits (brute-force distances)."""
    x = x.astype(np.float64)
    n = len(x)
    best = None
    for redo in range(n_redo):
        rng = _RefRNG(seed, redo)
        if init is None:
            perm = list(range(n))
            for i in range(k):
                j = i + rng.below(n - i)
                perm[i], perm[j] = perm[j], perm[i]
            c = x[perm[:k]].copy()
        else:
            c = init.astype(np.float64)
        splits = []
        for _ in range(n_iter):
            lab = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
            size = np.bincount(lab, minlength=k)
            for j in np.flatnonzero(size):  # centroids are float32 (means accumulated in float64)
                c[j] = np.float32(x[lab == j].mean(0))
            s = 0
            for e in range(k):
                if size[e]:
                    continue
                j = 0
                while not rng.uniform() < (size[j] - 1) / max(n - k, 1):
                    j = (j + 1) % k
                sign = np.where(np.arange(x.shape[1]) % 2 == 0, 1.0, -1.0) / 1024
                c[e], c[j] = np.float32(c[j] * (1 + sign)), np.float32(c[j] * (1 - sign))
                size[e] = size[j] // 2
                size[j] -= size[e]
                s += 1
            splits.append(s)
        inertia = ((x[:, None, :] - c[None]) ** 2).sum(-1).min(1).sum()
        if best is None or inertia < best[0]:
            best = (inertia, c, splits)
    return best


def _blobs():
    rng = np.random.default_rng(5)
    centers = rng.normal(0, 6, (6, 5))
    x = (centers[rng.integers(0, 6, 700)] + rng.normal(0, 1, (700, 5))).astype(np.float32)
    init = np.concatenate([x[:9], np.full((3, 5), 80, np.float32)])  # 3 far centroids: empty → split
    return x, init


KMEANS_JOB = """
    import numpy as np
    from mapet import distributed
    ctx = distributed.init()
    rng = np.random.default_rng(5)
    centers = rng.normal(0, 6, (6, 5))
    x = (centers[rng.integers(0, 6, 700)] + rng.normal(0, 1, (700, 5))).astype(np.float32)
    init = np.concatenate([x[:9], np.full((3, 5), 80, np.float32)])
    shard = x[:400] if ctx.rank == 0 else x[400:]   # uneven shards
    a = distributed.KMeans(12, n_iter=6, seed=11).fit(shard, init_centroids=init)
    b = distributed.KMeans(12, n_iter=6, seed=11, n_redo=2).fit(shard)
    one = distributed.KMeans(12, n_iter=1, seed=11).fit(shard, init_centroids=init)
    np.savez(f"km{ctx.rank}.npz", one=one.cluster_centers_, one_splits=one.history_[0]["splits"], a=a.cluster_centers_, a_in=a.inertia_, a_splits=[h["splits"] for h in a.history_],
             a_obj=a.obj, b=b.cluster_centers_, b_in=b.inertia_, labels=a.labels_)
"""


def test_distributed_kmeans_equals_single_process_on_concatenated_points(tmp_path):
    proc, _ = _run(KMEANS_JOB, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = np.load(tmp_path / "km0.npz"), np.load(tmp_path / "km1.npz")
    assert np.array_equal(r0["a"], r1["a"]) and np.array_equal(r0["b"], r1["b"])  # identical everywhere
    x, init = _blobs()
    # the single-process k-means on the concatenation
    one = mapet.KMeans(12, n_iter=6, seed=11).fit(x, init_centroids=init)
    np.testing.assert_allclose(r0["a"], one.cluster_centers_, rtol=1e-6, atol=1e-5)
    assert list(r0["a_splits"]) == [h["splits"] for h in one.history_]
    # Labels: ranks score their own shard (other GEMM shapes) against centroids equal to atol:
    # the same label wherever neither can move the nearest centroid (float32_bounds).
    sure = clear_of_ties(x, one.cluster_centers_, centroid_slack=1e-5 * np.sqrt(x.shape[1]))
    assert sure.mean() > 0.95
    ranks_labels = np.concatenate([r0["labels"], r1["labels"]])
    assert np.array_equal(ranks_labels[sure], one.labels_[sure])
    two = mapet.KMeans(12, n_iter=6, seed=11, n_redo=2).fit(x)
    np.testing.assert_allclose(r0["b"], two.cluster_centers_, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(float(r0["b_in"]), two.inertia_, rtol=1e-6)
    # and an independent float64 transcription. The iteration with the splits (the 3 far
    # centroids start empty) is compared alone: after it, split pairs sit ε apart and points on
    # their bisector are ties that float32 distances and float64 ones may break differently.
    _, c, splits = _reference_kmeans(x, 12, 1, 11, init=init)
    assert int(r0["one_splits"]) == splits[0] == 3 and r0["a_splits"][0] == 3
    np.testing.assert_allclose(r0["one"], c, rtol=0, atol=1e-5)
    inertia, c, splits = _reference_kmeans(x, 12, 6, 11, n_redo=2)
    np.testing.assert_allclose(r0["b"], c, rtol=0, atol=1e-4)


# ------------------------------------------------------------------ failures

FAIL_JOB = """
    import numpy as np
    from mapet import distributed
    from mapet.data import load_digits
    from mapet.train import finetune
    import mapet
    ctx = distributed.init()
    x, y = load_digits(16, "train")
    model = mapet.create_model("vit_tiny_patch16_224", num_classes=10, img_size=16, patch_size=4, embed_dim=24,
                               depth=2, num_heads=3)
    if ctx.rank == 1:
        calls = [0]
        step = model.train_step
        def failing(*a, **k):
            calls[0] += 1
            if calls[0] == 3:
                raise ValueError("corrupt batch on purpose")
            return step(*a, **k)
        model.train_step = failing
    finetune(model, (x[:256], y[:256]), epochs=3, batch_size=16)
"""


def test_a_failing_rank_ends_the_job_quickly_naming_the_rank(tmp_path):
    proc, seconds = _run(FAIL_JOB, tmp_path, timeout=60)
    assert proc.returncode != 0
    assert "mapet: rank 1 of 2 failed: ValueError: corrupt batch on purpose" in proc.stderr
    assert seconds < 30  # rank 0 was blocked in the all-reduce: the abort ended it


MISMATCH_JOB = """
    from mapet import distributed
    from mapet.data import load_digits
    from mapet.train import finetune
    ctx = distributed.init()
    x, y = load_digits(16, "train")
    finetune("vit_tiny_patch16_224", (x[:64], y[:64]), epochs=1, batch_size=16, lr=1e-3 * (1 + ctx.rank),
             img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3)
"""


def test_ranks_with_different_configs_stop_at_start_with_a_clear_error(tmp_path):
    proc, _ = _run(MISMATCH_JOB, tmp_path, timeout=60)
    assert proc.returncode != 0
    assert "MismatchError: ranks disagree on the run's configuration" in proc.stderr
    assert "mapet: rank 0 of 2 failed" in proc.stderr and "mapet: rank 1 of 2 failed" in proc.stderr


# ------------------------------------------------------------------ a single process stays MPI-free

def test_single_process_never_imports_mpi(tmp_path):
    code = """
        import sys, json
        import numpy as np
        import mapet
        from mapet import cli, distributed
        from mapet.train import evaluate, finetune
        from mapet.data import load_digits
        x, y = load_digits(16, "train")
        model, hist = finetune("vit_tiny_patch16_224", (x[:32], y[:32]), epochs=1, batch_size=16,
                               img_size=16, patch_size=4, embed_dim=24, depth=1, num_heads=3)
        evaluate(model, (x[:32], y[:32]))
        distributed.KMeans(4, n_iter=2).fit(x[:64].reshape(64, -1))
        assert cli.main(["finetune", "-o", "out", "--set", "epochs=1", "--set", "progress=false",
                         "--set", "model.img_size=16", "--set", "model.depth=1", "--set", "model.embed_dim=24"]) == 0
        assert distributed.context().world_size == 1
        assert "mpi4py" not in sys.modules, "a single process imported mpi4py"
        print("ok")
    """
    script = tmp_path / "single.py"
    script.write_text(textwrap.dedent(code))
    env = {k: v for k, v in os.environ.items() if k not in distributed._LAUNCH_VARS}
    env["PYTHONPATH"] = PYTHON_DIR
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_shard_spans_place_each_rank_inside_the_global_batch():
    # per-sample random streams (samplers) start at the rank's offset in the global batch
    ds = ArrayDataset(np.zeros((81, 1, 1, 1), np.float32), np.arange(81))
    spans = [[DataLoader(ds, 8).shard(r, 2).shard_span(b) for b in range(6)] for r in range(2)]
    assert spans[0][0] == (0, 16) and spans[1][0] == (8, 16)
    assert spans[0][5] == (0, 1) and spans[1][5] == (1, 1)  # the last global batch: 1 sample
    for b in range(6):
        parts = distributed.shard_batches(np.arange(81), 8, 0, 2)[b], distributed.shard_batches(np.arange(81), 8, 1, 2)[b]
        assert spans[1][b][0] == len(parts[0]) and spans[0][b][1] == len(parts[0]) + len(parts[1])


TOKENIZE_JOB = """
    import numpy as np
    import mapet
    from mapet import distributed
    from mapet.data import load_digits
    ctx = distributed.init()
    x = load_digits(16, "all")[0][:301]          # 301 rows: uneven shares (150 / 151)
    tok = mapet.PixelTokenizer(patch_size=4, n_tokens=16, n_iter=3, seed=0).fit(x[:200])
    cache = distributed.tokenize_to_cache(tok, x, "cache", batch_size=64)
    assert len(cache) == 301
    tok.save("tok-%d.safetensors" % ctx.rank)
"""


def test_tokenizing_across_ranks_writes_shards_with_one_manifest(tmp_path):
    from mapet.data import TokenCache, load_digits
    from mapet.tokenizers import PixelTokenizer
    proc, _ = _run(TOKENIZE_JOB, tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    files = sorted(os.listdir(tmp_path / "cache"))
    assert files == ["manifest.json", "tokens-00000-of-00002.npy", "tokens-00001-of-00002.npy"]
    # Both ranks fitted the same tokenizer; the joined shards equal one process encoding everything.
    tok = PixelTokenizer.load(str(tmp_path / "tok-0.safetensors"))
    assert np.array_equal(tok.centroids, PixelTokenizer.load(str(tmp_path / "tok-1.safetensors")).centroids)
    x = load_digits(16, "all")[0][:301]
    cache = TokenCache.open(str(tmp_path / "cache"), length=301, tokenizer=tok, n_patches=16, verify=True)
    # Each rank encoded its 151/150 images in batches of 64: other GEMM shapes than encoding the
    # 301 at once, so tokens agree wherever float32 cannot move the nearest centroid.
    patches = tok.patchify(x).reshape(-1, tok.centroids.shape[1])
    sure = clear_of_ties(patches, tok.centroids)
    assert sure.mean() > 0.95
    assert np.array_equal(np.asarray(cache.tokens).reshape(-1)[sure], tok.encode(x).reshape(-1)[sure])
    # the one contiguous rule of mapet.data.sharding (np.array_split): the first rank takes the extra row
    assert [s["stop"] - s["start"] for s in cache.manifest["shards"]] == [151, 150]


def test_cli_pretrain_runs_unchanged_under_mpiexec(tmp_path):
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR, HYDRA_LAUNCHER="fork")
    tiny = ["--set", "model.img_size=16", "--set", "model.patch_size=4", "--set", "model.embed_dim=24",
            "--set", "model.depth=2", "--set", "model.num_heads=3", "--set", "tokenizer.n_tokens=16",
            "--set", "tokenizer.n_iter=3"]
    subprocess.run([sys.executable, "-m", "mapet", "tokenize", *tiny, "-o", "tok"], cwd=tmp_path, env=env,
                   check=True, capture_output=True, timeout=120)
    r = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-m", "mapet", "pretrain", *tiny,
                        "--set", "tokens=tok/tokens", "--set", "epochs=1", "--set", "least_number=4", "-o", "pt"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(out) == 1  # only rank 0 prints
    assert json.loads(out[0])["steps"] == -(-1438 // (64 * 2))  # global batch = 2 ranks × 64
    assert os.path.exists(tmp_path / "pt" / "model.safetensors")

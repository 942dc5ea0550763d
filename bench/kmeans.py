"""k-means and nearest-centroid encoding: mapet vs faiss-cpu vs scikit-learn.

Each measurement runs in its own process in that library's fastest environment (mapet and
scikit-learn with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset; faiss, whose wheel bundles
OpenBLAS 0.3.15, with them set to the machine's values), libraries alternate, and the table shows
medians. All sides cluster the same synthetic data (Gaussian blobs, fixed seed) from the SAME
initial centroids (k distinct data points drawn with a fixed seed: faiss `train(x, init_centroids=)`,
scikit-learn `init=array, n_init=1`, mapet `fit(x, init_centroids=)`), run plain Lloyd for at most the
same number of iterations (faiss nredo=1 — faiss 1.15 stops early by its default early_stop_threshold;
scikit-learn algorithm="lloyd", tol=0 — it still stops once no label changes, a converged Lloyd run;
the iterations each side ran are printed; mapet always runs them all), and every side's final
centroids are scored by one evaluator (exact Σ min ‖x − c‖² in float64 over float32 distances).

    PY=.venv-bench/bin/python
    $PY bench/kmeans.py             # the issue's sizes (slow on 2 cores)
    $PY bench/kmeans.py --quick     # scaled-down sizes
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

FULL = {"fit_a": (100_000, 768, 1024, 20), "fit_b": (50_000, 768, 8192, 10), "encode": (1_000_000, 768, 8192, 0)}
QUICK = {"fit_a": (25_000, 768, 1024, 20), "fit_b": (32_768, 768, 4096, 10), "encode": (200_000, 768, 8192, 0)}


def make_data(n, d, seed=0, centers=None):
    rng = np.random.default_rng(seed)
    m = centers or max(16, n // 50)
    c = rng.standard_normal((m, d)).astype(np.float32)
    x = np.empty((n, d), np.float32)
    for lo in range(0, n, 65536):
        hi = min(n, lo + 65536)
        x[lo:hi] = c[rng.integers(0, m, hi - lo)] + 0.7 * rng.standard_normal((hi - lo, d), dtype=np.float32)
    return x


def initial_centroids(x, k, seed=1234):
    """k distinct data points, the same for every library."""
    idx = np.sort(np.random.default_rng(seed).choice(x.shape[0], size=k, replace=False))
    return np.ascontiguousarray(x[idx])


def worker(lib, task, n, d, k, iters, out):
    x = make_data(n, d)
    if task == "encode":
        cent = make_data(k, d, seed=1)
        if lib == "mapet":
            import mapet
            km = mapet.KMeans(k)
            km.cluster_centers_ = cent
            t = time.perf_counter(); _, I = km.assign(x); dt = time.perf_counter() - t
        elif lib == "faiss":
            import faiss
            index = faiss.IndexFlatL2(d); index.add(cent)
            t = time.perf_counter(); _, I = index.search(x, 1); dt = time.perf_counter() - t
        else:
            from sklearn.metrics import pairwise_distances_argmin
            t = time.perf_counter(); I = pairwise_distances_argmin(x, cent); dt = time.perf_counter() - t
        np.save(out, np.asarray(I).reshape(-1).astype(np.int32))
        return dt
    init = initial_centroids(x, k)
    if lib == "mapet":
        import mapet
        km = mapet.KMeans(k, n_iter=iters, seed=1234, max_points_per_centroid=1 << 20)
        t = time.perf_counter(); km.fit(x, init_centroids=init); dt = time.perf_counter() - t
        c, n_iter = km.cluster_centers_, km.n_iter_
    elif lib == "faiss":
        import faiss
        km = faiss.Kmeans(d, k, niter=iters, nredo=1, seed=1234, max_points_per_centroid=1 << 20)
        t = time.perf_counter(); km.train(x, init_centroids=init); dt = time.perf_counter() - t
        c, n_iter = km.centroids, len(km.obj)
    else:
        from sklearn.cluster import KMeans
        km = KMeans(k, init=init, n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd", random_state=1234)
        t = time.perf_counter(); km.fit(x); dt = time.perf_counter() - t
        c, n_iter = km.cluster_centers_.astype(np.float32), int(km.n_iter_)
    np.save(out, c)
    print(f"n_iter {n_iter}")
    return dt


def env_for(lib):
    e = dict(os.environ)
    if lib == "faiss":
        e.setdefault("OPENBLAS_CORETYPE", "Haswell")
    else:
        e.pop("OPENBLAS_CORETYPE", None); e.pop("OPENBLAS_L2_SIZE", None)
    return e


def run(lib, task, size, out):
    n, d, k, iters = size
    cmd = [sys.executable, __file__, "--worker", lib, task, str(n), str(d), str(k), str(iters), out]
    r = subprocess.run(cmd, env=env_for(lib), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{lib} {task} failed:\n{r.stderr[-2000:]}")
    lines = r.stdout.strip().splitlines()
    n_iter = next((int(l.split()[1]) for l in lines if l.startswith("n_iter")), 0)
    return float(lines[-1]), n_iter


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        lib, task, n, d, k, iters, out = sys.argv[2:9]
        print(worker(lib, task, int(n), int(d), int(k), int(iters), out))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--libs", default="mapet,faiss,sklearn")
    ap.add_argument("--tasks", default="fit_a,fit_b,encode")
    ap.add_argument("--encode-libs", default="mapet,faiss", help="scikit-learn has no BLAS k=1 search worth timing at 1M")
    a = ap.parse_args()
    sizes = QUICK if a.quick else FULL
    libs = a.libs.split(",")
    import mapet
    rows = []
    for task in a.tasks.split(","):
        libs = [l for l in a.libs.split(",") if task != "encode" or l in a.encode_libs.split(",")]
        size = sizes[task]
        n, d, k, iters = size
        times = {l: [] for l in libs}
        n_iters = {l: 0 for l in libs}
        results = {}
        for r in range(a.runs):
            for lib in (libs if r % 2 == 0 else libs[::-1]):
                out = os.path.join(tempfile.gettempdir(), f"bench_kmeans_{lib}_{task}.npy")
                dt, n_iters[lib] = run(lib, task, size, out)
                times[lib].append(dt)
                print(f"  {task} {lib} run {r}: {dt:.2f} s", flush=True)
                results[lib] = np.load(out)
        x = make_data(n, d)
        ev = mapet.KMeans(k)
        line = {}
        for lib in libs:
            if task == "encode":
                ev.cluster_centers_ = make_data(k, d, seed=1)
                agree = float((results[lib] == ev.predict(x)).mean()) if lib != "mapet" else 1.0
                line[lib] = (float(np.median(times[lib])), agree)
            else:
                ev.cluster_centers_ = np.ascontiguousarray(results[lib], np.float32)
                line[lib] = (float(np.median(times[lib])), float(ev.assign(x)[0].astype(np.float64).sum()))
        rows.append((task, size, line, times, n_iters))
    print(f"\nmedian of {a.runs} runs per library, alternating, 2 threads; objective = Σ min‖x−c‖² of the final centroids")
    for task, (n, d, k, iters), line, times, n_iters in rows:
        label = f"{task}: {n}×{d} → {k}" + (f", {iters} it" if iters else " (encode)")
        print(label)
        for lib, (t, v) in line.items():
            if task == "encode":
                extra = f"labels agreeing with mapet {v:.4%}"
            else:
                extra = f"{n_iters[lib]} it, objective {v:.6e}"
                if "mapet" in line and lib != "mapet":
                    extra += f" (mapet/{lib} objective {line['mapet'][1] / v:.5f})"
            ratio = f"  time mapet/{lib} = {line['mapet'][0] / t:.2f}×" if lib != "mapet" and "mapet" in line else ""
            print(f"  {lib:8s} {t:8.2f} s  (runs {', '.join(f'{s:.2f}' for s in times[lib])})  {extra}{ratio}")


if __name__ == "__main__":
    main()

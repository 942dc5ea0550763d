"""ViT-Tiny/16 training step (224 px, batch 32, 2 threads): mapet vs a PyTorch eager model of
the same architecture (bench/torch_models.py TorchViT), interleaved in one run, median of N.

Both sides do zero-grad + forward + cross-entropy + backward (no optimizer), with the MaPeT
recipe's layer scale (0.1) and drop path (0.1), global_pool='token'. Also prints mapet's
achieved GFLOP/s (analytic matmul FLOPs of the step) against the BLAS SGEMM peak measured in
the same run through mapet's own GEMM path (2 workers × single-threaded OpenBLAS).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv-bench/bin/python bench/vit_step.py
"""
import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import mapet  # noqa: E402


def step_flops(B=32, img=224, p=16, C=192, depth=12, mlp=4, K=1000, cin=3):
    """Matmul FLOPs of forward + backward (backward = 2× forward except the patch embedding,
    whose input gradient is not needed). Elementwise work is not counted."""
    n = (img // p) ** 2
    N = n + 1
    hidden = C * mlp
    patch = 2 * B * n * cin * p * p * C
    block = 2 * B * N * (C * C + 2 * C * C + C * C + 2 * C * hidden) + 2 * 2 * B * N * N * C
    head = 2 * B * C * K
    fwd = patch + depth * block + head
    return fwd + 2 * (depth * block + head) + patch


def gemm_peak(threads, reps=5):
    """GFLOP/s of mapet's SGEMM path on large square and on ViT-shaped products (best of each)."""
    rng = np.random.default_rng(0)
    out = {}
    for name, (m, k, n) in {"square 2048": (2048, 2048, 2048), "vit fc1 6304x192x768": (6304, 192, 768)}.items():
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((n, k)).astype(np.float32)
        c = np.empty((m, n), np.float32)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            mapet.ops.matmul(a, b, c, trans_b=True)
            best = min(best, time.perf_counter() - t)
        out[name] = 2 * m * n * k / best / 1e9
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    mapet.set_num_threads(args.threads)
    B = args.batch
    rng = np.random.default_rng(0)
    images = rng.standard_normal((B, 3, 224, 224)).astype(np.float32)
    labels = rng.integers(0, 1000, B)
    model = mapet.create_model("vit_tiny_patch16_224", init_values=0.1, drop_path_rate=0.1)

    def mapet_step():
        model.zero_grad()
        return model.train_step(images, labels)

    torch_step = None
    if not args.no_torch:
        import torch
        from torch_step import vit_step_fn
        torch_step = vit_step_fn(batch=B, threads=args.threads)
        print(f"torch {torch.__version__} (threads {torch.get_num_threads()})")
    print(f"mapet {mapet.__version__}, threads {mapet.get_num_threads()}, BLAS {mapet.blas_info()['corename']}")

    peak = gemm_peak(args.threads)
    for k, v in peak.items():
        print(f"SGEMM {k:24s}: {v:7.1f} GFLOP/s")

    mapet_step()  # warm-up: allocates the activation cache
    if torch_step:
        torch_step()
    tm, tt = [], []
    for _ in range(args.reps):
        t = time.perf_counter(); mapet_step(); tm.append(time.perf_counter() - t)
        if torch_step:
            t = time.perf_counter(); torch_step(); tt.append(time.perf_counter() - t)
    fl = step_flops(B=B)
    med = statistics.median(tm)
    print(f"ViT-Tiny/16 224px batch {B} train step ({fl / 1e9:.1f} GFLOP in matmuls), median of {args.reps}:")
    print(f"  mapet  : {med * 1e3:8.1f} ms  ({fl / med / 1e9:6.1f} GFLOP/s = "
          f"{100 * fl / med / 1e9 / peak['square 2048']:.0f}% of square SGEMM peak, "
          f"{100 * fl / med / 1e9 / peak['vit fc1 6304x192x768']:.0f}% of ViT-shaped SGEMM)")
    if tt:
        mt = statistics.median(tt)
        print(f"  torch  : {mt * 1e3:8.1f} ms  ({fl / mt / 1e9:6.1f} GFLOP/s)")
        print(f"  speed-up mapet vs torch eager: {mt / med:.2f}×")
    print("  mapet runs (ms):", " ".join(f"{x * 1e3:.0f}" for x in tm))
    if tt:
        print("  torch runs (ms):", " ".join(f"{x * 1e3:.0f}" for x in tt))


if __name__ == "__main__":
    main()

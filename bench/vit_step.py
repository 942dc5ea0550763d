"""ViT-Tiny/16 training step (224 px, batch 32, 2 threads): mapet vs timm's `vit_tiny_patch16_224`, in float32
and in bf16 mixed precision (mapet `precision="bf16"`, timm under `torch.autocast("cpu", dtype=torch.bfloat16)`),
all four interleaved in one run, medians of --reps.

Every side does zero-grad + forward + cross-entropy + backward (no optimizer), with the MaPeT recipe's layer
scale (0.1) and drop path (0.1), global_pool='token'; timm runs its fastest attention (fused SDPA, its default).
Also prints mapet's achieved GFLOP/s (analytic matmul FLOPs of the step) against the GEMM peak of the same
precision measured in the same run through mapet's own GEMM path, and a `mapet.profile()` table of one step.

Run from the project root (peers: bench/requirements.txt):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv-bench/bin/python bench/vit_step.py [--precision both]
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
from _common import print_profiles, ratio_line  # noqa: E402


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


def gemm_peak(precision, reps=5):
    """Best GFLOP/s of mapet's GEMM path (the given precision) on square and ViT-shaped products."""
    rng = np.random.default_rng(0)
    out = {}
    for name, (m, k, n) in {"square 2048": (2048, 2048, 2048), "vit fc1 6304x192x768": (6304, 192, 768)}.items():
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((n, k)).astype(np.float32)
        c = np.empty((m, n), np.float32)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            mapet.ops.matmul(a, b, c, trans_b=True, precision=precision)
            best = min(best, time.perf_counter() - t)
        out[name] = 2 * m * n * k / best / 1e9
    return out


def timm_step_fn(batch, threads, autocast, seed=0):
    import timm
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", init_values=0.1, drop_path_rate=0.1,
                              global_pool="token").train()
    images = torch.randn(batch, 3, 224, 224, generator=g)
    labels = torch.randint(0, 1000, (batch,), generator=g)

    def step():
        model.zero_grad(set_to_none=True)
        if autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(images), labels)
        else:
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        return loss.item()

    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    mapet.set_num_threads(args.threads)
    B = args.batch
    rng = np.random.default_rng(0)
    images = rng.standard_normal((B, 3, 224, 224)).astype(np.float32)
    labels = rng.integers(0, 1000, B)

    steps = {}
    for p in precisions:
        model = mapet.create_model("vit_tiny_patch16_224", init_values=0.1, drop_path_rate=0.1, precision=p)

        def mapet_step(model=model):
            model.zero_grad()
            return model.train_step(images, labels)

        steps[f"mapet {p}"] = mapet_step
    if not args.no_torch:
        import timm
        import torch
        for p in precisions:
            steps[f"timm {p}{' autocast' if p == 'bf16' else ''}"] = timm_step_fn(B, args.threads, p == "bf16")
        print(f"torch {torch.__version__}, timm {timm.__version__} (threads {torch.get_num_threads()})")
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"CPU {cpu}; mapet {mapet.__version__}, threads {mapet.get_num_threads()}, "
          f"BLAS {mapet.blas_info()['corename']}, bf16 {mapet.bf16_info()}")

    peaks = {p: gemm_peak(p) for p in precisions}
    for p, peak in peaks.items():
        for k, v in peak.items():
            print(f"mapet {p} GEMM {k:24s}: {v:7.1f} GFLOP/s")

    for fn in steps.values():
        fn()  # warm-up: allocations, first touch
    times = {k: [] for k in steps}
    for r in range(args.reps):
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]
        for k in order:
            t = time.perf_counter(); steps[k](); times[k].append(time.perf_counter() - t)
    fl = step_flops(B=B)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nViT-Tiny/16 224px batch {B} train step ({fl / 1e9:.1f} GFLOP in matmuls), median of {args.reps}:")
    for k, m in med.items():
        extra = ""
        if k.startswith("mapet"):
            peak = peaks[k.split()[1]]["square 2048"]
            extra = f" = {100 * fl / m / 1e9 / peak:.0f}% of mapet's square GEMM peak in this precision"
        print(f"  {k:20s}: {m * 1e3:8.1f} ms  ({fl / m / 1e9:6.1f} GFLOP/s{extra})   runs: "
              + " ".join(f"{x * 1e3:.0f}" for x in times[k]))
    if not args.no_torch:
        for p in precisions:
            t = [k for k in med if k.startswith("timm " + p)][0]
            print(ratio_line(t, "mapet " + p, times))
        if len(precisions) == 2:
            print(ratio_line("timm fp32", "mapet bf16", times))
        # The bound a target must respect: the step's matrix products alone, at mapet's GEMM peak.
        for p in precisions:
            t = [k for k in med if k.startswith("timm " + p)][0]
            floor = fl / peaks[p]["square 2048"] / 1e9
            print(f"  {p}: at 100% of the GEMM peak the step would take {floor * 1e3:.0f} ms = {med[t] / floor:.2f}x {t}")
    print_profiles(steps, precisions)


if __name__ == "__main__":
    main()

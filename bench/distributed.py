"""Data parallelism on one 2-core machine: 2 MPI ranks × 1 thread vs 1 process × 2 threads.

Two workloads, each with the same global work on both sides:
  * a ViT-Tiny/16 training step (224 px, global batch 2·B: one process does B·2 images, each
    rank B): forward + backward + gradient all-reduce (distributed side) + AdamW step;
  * a k-means iteration (n points, d dims, k centroids; each rank holds n/2 points):
    assignment + partial sums + all-reduce of [sums, counts, objective] + update.

Reports the median time of each side, the scaling efficiency (t_1proc×2threads / t_2ranks×1thread:
1.0 means data parallelism is as good as threading inside one process) and the share of the
distributed step spent in communication (the Allreduce calls, timed on rank 0). Rounds alternate
the two sides (the machine is shared and noisy); ≥ 5 rounds, medians.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 bench/distributed.py [--rounds 5]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

import numpy as np  # noqa: E402


def vit_steps(batch, steps, ctx=None, kind="vit"):
    """Median seconds per optimizer step and per gradient all-reduce (ViT-Tiny/16 or MaPeT-Tiny/16
    with 8192 tokens and least_number 50, 224 px)."""
    import mapet
    from mapet import distributed
    from mapet.optim import AdamW
    rng = np.random.default_rng(0 if ctx is None else ctx.rank)
    x = rng.random((batch, 3, 224, 224), dtype=np.float32)
    if kind == "mapet":
        model = mapet.create_model("mapet_tiny_patch16_224", seed=0)
        tokens = rng.integers(0, 8192, (batch, 196))
        perm = mapet.PermutationSampler(196, least_number=50, seed=0 if ctx is None else ctx.rank).sample(batch)
        model.train_step_args = (tokens, perm)
    else:
        model = mapet.create_model("vit_tiny_patch16_224", num_classes=1000, seed=0)
        model.train_step_args = (rng.integers(0, 1000, batch),)
    opt = AdamW(model, lr=1e-4, weight_decay=0.05)
    step_t, comm_t = [], []
    for i in range(steps + 1):  # the first step warms up
        t0 = time.perf_counter()
        opt.zero_grad()
        model.train_step(x, *model.train_step_args)
        tc = time.perf_counter()
        if ctx is not None:
            distributed.average_gradients(ctx, model.flat_grads, batch, total=batch * ctx.world_size)
        tc = time.perf_counter() - tc
        opt.step()
        if i:
            step_t.append(time.perf_counter() - t0)
            comm_t.append(tc)
    return statistics.median(step_t), statistics.median(comm_t), model.num_params if hasattr(model, "num_params") else 0


def kmeans_iters(x, k, iters, ctx=None):
    """Seconds per k-means iteration and seconds of all-reduce per iteration. One process uses
    ``mapet.KMeans`` (all in Swift), ranks ``mapet.distributed.KMeans``."""
    import mapet
    from mapet import distributed
    if ctx is None:
        km = mapet.KMeans(k, n_iter=iters, seed=0, max_points_per_centroid=10 ** 9, bounds=False)
        km.fit(x)
        return statistics.median(h["seconds"] for h in km.history_[1:]), 0.0, 0.0
    km = distributed.KMeans(k, n_iter=iters, seed=0, max_points_per_centroid=10 ** 9, ctx=ctx)
    t0 = time.perf_counter()
    km.fit(x)
    total = time.perf_counter() - t0
    return statistics.median(h["seconds"] for h in km.history_[1:]), km.comm_seconds / iters, total


def kmeans_data(n, d, rank=0, world=1):
    x = np.random.default_rng(1).standard_normal((n, d)).astype(np.float32)
    lo, hi = rank * n // world, (rank + 1) * n // world
    return np.ascontiguousarray(x[lo:hi])


def worker(args):
    """One rank of the distributed side: prints rank 0's measurements as JSON."""
    import mapet
    from mapet import distributed
    ctx = distributed.init()
    mapet.set_num_threads(1)
    step, comm, _ = vit_steps(args.batch, args.steps, ctx, args.model)
    x = kmeans_data(args.n, args.d, ctx.rank, ctx.world_size)
    kit, kcomm, _ = kmeans_iters(x, args.k, args.iters, ctx)
    times = ctx.allgather((step, comm, kit, kcomm))
    if ctx.is_main:
        print(json.dumps({"step": max(t[0] for t in times), "comm": times[0][1],
                          "kmeans": max(t[2] for t in times), "kcomm": times[0][3]}))


def single(args):
    import mapet
    mapet.set_num_threads(2)
    step, _, _ = vit_steps(2 * args.batch, args.steps, kind=args.model)
    kit, _, _ = kmeans_iters(kmeans_data(args.n, args.d), args.k, args.iters)
    return {"step": step, "kmeans": kit}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=8, help="images per rank (one process: 2×)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--d", type=int, default=48)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--model", choices=("vit", "mapet"), default="vit", help="ViT-Tiny or MaPeT-Tiny step")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = mpiexec if os.path.exists(mpiexec) else shutil.which("mpiexec")
    cmd = [mpiexec, "-n", "2", sys.executable, os.path.abspath(__file__), "--worker"] + \
          [f"--{a}={getattr(args, a)}" for a in ("batch", "steps", "n", "d", "k", "iters", "model")]
    one, two = [], []
    for r in range(args.rounds):
        one.append(single(args))
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        two.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"round {r}: 1×2 threads step {one[-1]['step']:.3f}s kmeans {one[-1]['kmeans']:.3f}s | "
              f"2 ranks×1 step {two[-1]['step']:.3f}s (allreduce {two[-1]['comm'] * 1e3:.1f} ms) "
              f"kmeans {two[-1]['kmeans']:.3f}s (allreduce {two[-1]['kcomm'] * 1e3:.2f} ms)", flush=True)
    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    print(f"\n{'MaPeT' if args.model == 'mapet' else 'ViT'}-Tiny/16 step, global batch {2 * args.batch}, 224 px (median of {args.rounds} rounds):")
    s1, s2, c2 = med(one, "step"), med(two, "step"), med(two, "comm")
    print(f"  1 process × 2 threads {s1:.3f} s | 2 ranks × 1 thread {s2:.3f} s | "
          f"scaling efficiency {s1 / s2:.2f} | communication {100 * c2 / s2:.1f} % of the step ({c2 * 1e3:.1f} ms)")
    print(f"k-means iteration, n={args.n} d={args.d} k={args.k}:")
    k1, k2, kc = med(one, "kmeans"), med(two, "kmeans"), med(two, "kcomm")
    print(f"  1 process × 2 threads {k1:.3f} s | 2 ranks × 1 thread {k2:.3f} s | "
          f"scaling efficiency {k1 / k2:.2f} | communication {100 * kc / k2:.1f} % of the iteration ({kc * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()

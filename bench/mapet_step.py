"""MaPeT-Tiny/16 train step: mapet (Swift) vs the PyTorch two-stream model with dense additive masks.

Setting (issue 4): 224 px, batch 16, 8192 visual tokens, least_number 50 (P = 147 predicted tokens),
layer scale 0.1, drop path 0.1, 2 threads. One step = zero grads, forward, mean cross-entropy over
the B×P predicted tokens, backward (no optimizer). Both sides get the same images, tokens and
permutations (drawn by mapet's sampler; PyTorch builds its dense masks from them outside the timed
step, as the reference does in its data loader). Runs are interleaved, median of --reps.
With --precision bf16/both, mapet runs `precision="bf16"` (bf16 GEMM inputs, fp32 accumulation, fp32
master weights) against the reference under torch.autocast("cpu", dtype=torch.bfloat16); PyTorch gets its
faster attention formulation per precision (dense-mask matmul+softmax or SDPA, probed first).

Before timing, the script copies mapet's weights into the PyTorch models (MaPeT, PIM, BEiT) by
state_dict name and checks that inference logits agree (a cross-check of names, order and maths).

Run from the project root (peers: bench/requirements.txt):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv-bench/bin/python bench/mapet_step.py [--precision both]
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
import torch  # noqa: E402

from vit_step import gemm_peak  # noqa: E402

import mapet  # noqa: E402
from _common import print_profiles, ratio_line  # noqa: E402
from mapet.pretrain_models import create_pretrain_model  # noqa: E402
from torch_models import TorchBEiT, TorchMaPeT, TorchPIM  # noqa: E402
from torch_step import RECIPE, mapet_step_fn, time_once  # noqa: E402


def cross_check(threads: int) -> None:
    """mapet weights → PyTorch models (strict load by name); compare eval logits on 2 images."""
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
    batch = mapet.PermutationSampler(196, 50, seed=0).sample(2)
    for name, cls in (("mapet", TorchMaPeT), ("pim", TorchPIM), ("beit", TorchBEiT)):
        m = create_pretrain_model(f"{name}_tiny_patch16_224", seed=1)
        # Perturb everything so that zero biases / unit norms do not hide a wrong name.
        for v in m.state_dict().values():
            v += rng.normal(0, 0.02, v.shape).astype(np.float32)
        t = cls(**RECIPE).eval()
        sd = m.state_dict()
        assert list(t.state_dict()) == list(sd), f"{name}: state_dict order differs"
        t.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
        with torch.no_grad():
            if name == "beit":
                mask = mapet.BlockMaskGenerator(14, 75, seed=0).sample(2)
                want = t(torch.from_numpy(x), torch.from_numpy(mask)).numpy()
                got = m(x, mask)
            else:
                want = t(torch.from_numpy(x), torch.from_numpy(batch.orders.copy())).numpy()
                got = m(x, batch)
        err = np.abs(got - want).max() / np.abs(want).max()
        print(f"  {name:5s}: same state_dict names and order; max |logit diff| / max |logit| = {err:.2e}")
        assert err < 1e-4


def step_flops(B=16, P=147, n=196, C=192, depth=12, mlp=4, V=8192, patch_dim=3 * 16 * 16, masked=True):
    """Matmul FLOPs of one MaPeT train step (forward + backward = 3× forward, except the patch
    embedding whose input gradient is not needed). Content stream: T = n + 1 + P rows per sample
    (tokens and auxiliary positional tokens); query stream: P rows; the last block's content
    stream only provides keys/values. Elementwise work is not counted. Attention: with `masked`,
    the products over the keys a row may attend (every row attends n + 1 of the T keys), what
    mapet computes up to block edges; else over all T keys, as the reference's dense masks do."""
    T, H = n + 1 + P, C * mlp
    keys = n + 1 if masked else T
    content = 2 * B * T * (C * C + 2 * C * C + C * C + 2 * C * H) + 4 * B * T * keys * C
    query = 2 * B * P * (C * C + C * C + 2 * C * H) + 4 * B * P * keys * C
    last = 2 * B * T * 2 * C * C + query
    fwd = (depth - 1) * (content + query) + last + 2 * B * P * C * V
    patch = 2 * B * n * patch_dim * C
    return 3 * fwd + 2 * patch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    args = ap.parse_args()
    mapet.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"CPU {cpu}; mapet {mapet.__version__} ({mapet.get_num_threads()} threads, BLAS "
          f"{mapet.blas_info()['corename']}, bf16 {mapet.bf16_info()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}")
    if not args.no_check:
        print("cross-check (mapet weights loaded into the PyTorch models, eval logits):")
        cross_check(args.threads)

    B = args.batch
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    sampler = mapet.PermutationSampler(196, 50, seed=0)
    batch = sampler.sample(B)
    orders = batch.orders.copy()
    # PyTorch in its fastest setting per precision: the reference formulation (matmul + softmax with
    # the dense additive mask) or F.scaled_dot_product_attention with that mask, whichever is faster here.
    steps = {}
    for p in precisions:
        best = None
        for sdpa in (False, True):
            fn = mapet_step_fn(batch=B, threads=args.threads, orders=orders, sdpa=sdpa, autocast=p == "bf16")
            fn()
            t = statistics.median(time_once(fn) for _ in range(3))
            print(f"  torch {p} {'sdpa' if sdpa else 'matmul+softmax'}: {t * 1e3:.0f} ms (3-run median, setting probe)")
            if best is None or t < best[0]:
                best = (t, sdpa, fn)
        steps[f"torch {p}{' autocast' if p == 'bf16' else ''} ({'sdpa' if best[1] else 'matmul+softmax'})"] = best[2]
    ref = next(iter(steps.values()))
    images, tokens = ref.images.numpy(), ref.tokens.numpy()
    for p in precisions:
        model = mapet.create_model("mapet_tiny_patch16_224", precision=p, **RECIPE)
        assert model.config["num_tokens"] == 8192 and model.config["least_number"] == 50

        def mapet_step(model=model) -> float:
            model.zero_grad()
            return model.train_step(images, tokens, batch)

        steps[f"mapet {p}"] = mapet_step
    print(f"MaPeT-Tiny/16 train step, 224 px, batch {B}, 8192 tokens, least_number 50 (P = {batch.num_predicted}), "
          f"recipe {RECIPE}")
    for k, fn in steps.items():
        print(f"  first loss {k}: {fn():.4f}")   # warm-up (allocations, first touch)
    times = {k: [] for k in steps}
    for r in range(args.reps):
        for k in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            times[k].append(time_once(steps[k]))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"medians of {args.reps} interleaved runs:")
    for k, m in med.items():
        print(f"  {k:40s}: {m * 1e3:8.1f} ms/step   runs: " + " ".join(f"{x * 1e3:.0f}" for x in times[k]))
    for p in precisions:
        t = [k for k in med if k.startswith("torch " + p)][0]
        print(ratio_line(t, "mapet " + p, times))
    fl = step_flops(B=B, P=batch.num_predicted)
    dense = step_flops(B=B, P=batch.num_predicted, masked=False)
    print(f"\nthe step is {fl / 1e9:.1f} GFLOP of matrix products counting only the attention scores a row may "
          f"attend ({dense / 1e9:.1f} GFLOP with the reference's dense masks); mapet's GEMM peak measured now:")
    for p in precisions:
        peak = gemm_peak(p)["square 2048"]
        m = med["mapet " + p]
        t = [k for k in med if k.startswith("torch " + p)][0]
        print(f"  {p}: peak {peak:.0f} GFLOP/s; mapet step {fl / m / 1e9:.0f} GFLOP/s = {100 * fl / m / 1e9 / peak:.0f}% of it; "
              f"at 100% of the peak the step would take {fl / peak / 1e6:.0f} ms = {med[t] / (fl / peak / 1e9):.2f}x {t}")
    print_profiles(steps, precisions)

if __name__ == "__main__":
    main()

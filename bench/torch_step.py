"""Timing of one PyTorch train step (forward, cross-entropy, backward; no optimizer) for the bench/ peers.

Benchmark-only (needs torch). Standalone:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv-bench/bin/python bench/torch_step.py

Importable by the mapet-vs-torch benchmarks, which interleave the two sides themselves:

    from torch_step import vit_step_fn, mapet_step_fn, time_once
    torch_vit = vit_step_fn()            # builds model + data once, returns a zero-arg callable
    for _ in range(reps): t_torch.append(time_once(torch_vit)); t_mapet.append(time_once(mapet_step))

MaPeT masks are built outside the timed step, as the reference builds them in its data loader
(the same orders can be handed to mapet through `orders`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_masks import random_orders  # noqa: E402
from torch_models import TorchMaPeT, TorchViT  # noqa: E402

RECIPE = dict(init_values=0.1, drop_path_rate=0.1)  # layer scale and drop path of the MaPeT recipes


def time_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn, reps: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(time_once(fn) for _ in range(reps))


def vit_step_fn(batch=32, img_size=224, num_classes=1000, threads=2, seed=0, sdpa=False, **model_kw):
    """ViT-Tiny/16 train step (global_pool='token', recipe layer scale + drop path unless overridden)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TorchViT(img_size=img_size, num_classes=num_classes, sdpa=sdpa, **{**RECIPE, **model_kw}).train()
    images = torch.randn(batch, 3, img_size, img_size, generator=g)
    labels = torch.randint(0, num_classes, (batch,), generator=g)

    def step():
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        return loss.item()

    step.model, step.images, step.labels = model, images, labels
    return step


def mapet_step_fn(batch=16, img_size=224, num_tokens=8192, least_number=50, threads=2, seed=0, sdpa=False,
                  orders=None, autocast=False, **model_kw):
    """MaPeT-Tiny/16 two-stream train step with dense additive masks (as the reference); `autocast`
    runs forward and loss under torch.autocast("cpu", dtype=torch.bfloat16)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TorchMaPeT(img_size=img_size, num_tokens=num_tokens, least_number=least_number, sdpa=sdpa,
                       **{**RECIPE, **model_kw}).train()
    n = model.num_patches
    images = torch.randn(batch, 3, img_size, img_size, generator=g)
    tokens = torch.randint(0, num_tokens, (batch, n), generator=g)
    orders = random_orders(batch, n + 1, g) if orders is None else torch.as_tensor(orders).long()
    mask_h, mask_g, predicted, _ = model.masks(orders)
    targets = torch.gather(tokens, 1, predicted - 1)   # visual token of patch p_j (patch p -> tokens[:, p-1])

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model.forward_masked(images, mask_h, mask_g, predicted)
            loss = F.cross_entropy(logits.reshape(-1, num_tokens), targets.reshape(-1))
        loss.backward()
        return loss.item()

    step.model, step.images, step.tokens, step.orders = model, images, tokens, orders
    return step


def main():
    ap = argparse.ArgumentParser(description="median PyTorch train-step times (2 threads)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sdpa", action="store_true", help="also time F.scaled_dot_product_attention variants")
    ap.add_argument("--only", choices=["vit", "mapet"], default=None)
    args = ap.parse_args()
    variants = [False, True] if args.sdpa else [False]
    print(f"torch {torch.__version__}, threads={args.threads}, reps={args.reps} (median), recipe {RECIPE}")
    for sdpa in variants:
        tag = "sdpa" if sdpa else "matmul+softmax (reference formulation)"
        if args.only in (None, "vit"):
            t = median_time(vit_step_fn(threads=args.threads, sdpa=sdpa), args.reps)
            print(f"TorchViT-Tiny/16   224px batch 32             [{tag}]: {t * 1e3:8.1f} ms/step")
        if args.only in (None, "mapet"):
            t = median_time(mapet_step_fn(threads=args.threads, sdpa=sdpa), args.reps)
            print(f"TorchMaPeT-Tiny/16 224px batch 16 K=8192 ln=50 [{tag}]: {t * 1e3:8.1f} ms/step")


if __name__ == "__main__":
    main()

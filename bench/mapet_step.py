"""MaPeT-Tiny/16 train step: mapet (Swift) vs the PyTorch two-stream model with dense additive masks.

Setting (issue 4): 224 px, batch 16, 8192 visual tokens, least_number 50 (P = 147 predicted tokens),
layer scale 0.1, drop path 0.1, 2 threads. One step = zero grads, forward, mean cross-entropy over
the B×P predicted tokens, backward (no optimizer). Both sides get the same images, tokens and
permutations (drawn by mapet's sampler; PyTorch builds its dense masks from them outside the timed
step, as the reference does in its data loader). Runs are interleaved, median of --reps.

Before timing, the script copies mapet's weights into the PyTorch models (MaPeT, PIM, BEiT) by
state_dict name and checks that inference logits agree (a cross-check of names, order and maths).

Run:  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv-bench/bin/python bench/mapet_step.py
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

import mapet  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()
    mapet.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    print(f"mapet {mapet.__version__} ({mapet.get_num_threads()} threads), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}")
    if not args.no_check:
        print("cross-check (mapet weights loaded into the PyTorch models, eval logits):")
        cross_check(args.threads)

    B = args.batch
    sampler = mapet.PermutationSampler(196, 50, seed=0)
    batch = sampler.sample(B)
    torch_step = mapet_step_fn(batch=B, threads=args.threads, orders=batch.orders.copy())
    images = torch_step.images.numpy()
    tokens = torch_step.tokens.numpy()
    model = create_pretrain_model("mapet_tiny_patch16_224", **RECIPE)
    assert model.config["num_tokens"] == 8192 and model.config["least_number"] == 50

    def mapet_step() -> float:
        model.zero_grad()
        return model.train_step(images, tokens, batch)

    print(f"MaPeT-Tiny/16 train step, 224 px, batch {B}, 8192 tokens, least_number 50 (P = {batch.num_predicted}), "
          f"recipe {RECIPE}")
    l_m, l_t = mapet_step(), torch_step()   # warm-up (allocations, first-touch)
    print(f"  first losses: mapet {l_m:.4f}, torch {l_t:.4f} (log 8192 = {np.log(8192):.4f}; different inits)")
    tm, tt = [], []
    for r in range(args.reps):
        tt.append(time_once(torch_step))
        tm.append(time_once(mapet_step))
        print(f"  run {r + 1}: torch {tt[-1] * 1e3:8.1f} ms   mapet {tm[-1] * 1e3:8.1f} ms")
    mt, mm = statistics.median(tt), statistics.median(tm)
    print(f"median: torch {mt * 1e3:.1f} ms/step, mapet {mm * 1e3:.1f} ms/step -> mapet is {mt / mm:.2f}x faster")


if __name__ == "__main__":
    main()

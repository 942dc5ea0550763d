"""CCViT-Tiny/16 and DTM-Tiny/16 train steps: mapet (Swift) vs the original PyTorch modules.

Needs torch + timm (the peer venv) and checkouts of Cakeyan/CCViT_Public and naver-ai/dtm (the
reference models are imported from them, as bench/verify_ccvit_dtm_reference.py does, which also
checks that both sides compute the same numbers):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv-bench/bin/python \
        bench/objectives_step.py /path/to/CCViT_Public /path/to/dtm

Setting: 224 px, batch 16, embed 192, depth 12, 3 heads, layer scale 0.1, drop path 0.1, 2 threads.
One step = zero grads, forward, loss, backward (no optimizer), float32 on both sides.
- CCViT: 75 block-masked + 20 centroid-replaced patches per image, vocab 8192, early_layers 9,
  2 pixel-head blocks; loss CE(centroid ids) + MSE(normalised pixels) on the 95 corrupted rows
  (corruption and targets prepared outside the timed step on both sides).
- DTM: 75 block-masked patches, student head to 512; teacher features a fixed random
  [16, 196, 512] array (teacher cost excluded on both sides); L = 2 schedules drawn by
  mapet.DTMSchedule (the same on both sides); the timed step includes the morphing of the targets
  (mapet: inside train_step; PyTorch: the reference's bm/merge.py loop as engine_for_dtm.py runs it)
  and the group-mean smooth-L1 loss.
mapet and PyTorch alternate rep by rep; medians of --reps. Both sides run with OPENBLAS_CORETYPE
and OPENBLAS_L2_SIZE unset (their faster setting here).

Measured 2026-11-24, quiet machine, torch 2.15, 2 threads, two runs (5 and 7 reps):
    CCViT-Tiny/16 step          mapet 1237 / 1222 ms, PyTorch 1354 / 1408 ms: 1.09× / 1.15× faster
    DTM-Tiny/16 step            mapet  912 /  919 ms, PyTorch  985 / 1141 ms: 1.08× / 1.24× faster
    DTM morphing alone (L = 2)  mapet   34 /   28 ms, PyTorch   65 /   60 ms: 1.93× / 2.13× faster
The steps are bound by the same matrix products on both sides (see the ViT and MaPeT sections of
the README for the SGEMM-peak arithmetic); the morphing is where mapet's own kernels win.
"""
import argparse
import os
import statistics
import sys
import time
import warnings
from functools import partial

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
import mapet  # noqa: E402

B, S, P, C, DEPTH, HEADS, V, EARLY, D = 16, 224, 16, 192, 12, 3, 8192, 9, 512
GRID = S // P
N = GRID * GRID


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ccvit_steps(root):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    sys.path.insert(0, root)
    import modeling_pretrain as mp
    rng = np.random.default_rng(0)
    clean = rng.random((B, 3, S, S)).astype(np.float32)
    centroids = rng.random((V, 3 * P * P)).astype(np.float32)
    ids = rng.integers(0, V, (B, N))
    mask = mapet.BlockMaskGenerator(GRID, 75, seed=1).sample(B)
    corrupted, replaced = mapet.ccvit_corrupt(clean, mask, ids, centroids, 20, seed=2)
    targets = mapet.ccvit_pixel_targets(clean, P)
    model = mapet.create_model("ccvit_tiny_patch16_224", num_tokens=V, early_layers=EARLY, init_values=0.1,
                               drop_path_rate=0.1)

    def mapet_step():
        model.zero_grad()
        model.train_step(corrupted, ids, targets, mask, replaced)

    ref = mp.VisionTransformerForMaskedImageModelingCLS(
        img_size=S, patch_size=P, vocab_size=V, embed_dim=C, depth=DEPTH, num_heads=HEADS, mlp_ratio=4,
        qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), init_values=0.1, drop_path_rate=0.1,
        early_layers=EARLY, head_layers=2, shared_lm_head=False).train()
    both = torch.from_numpy(mask | replaced)
    x, m = torch.from_numpy(corrupted), torch.from_numpy(mask)
    label1 = torch.from_numpy(ids).long()[both]
    label2 = torch.from_numpy(targets)[both]

    def torch_step():
        ref.zero_grad(set_to_none=True)
        logits, pixels = ref(x, bool_masked_pos=m, bool_replaced_pos=both)
        loss = F.cross_entropy(logits, label1) + F.mse_loss(pixels, label2)
        loss.backward()

    return mapet_step, torch_step


def dtm_steps(root):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    sys.path.insert(0, os.path.join(root, "models"))
    sys.path.insert(0, root)
    import modeling_dtm as md
    from bm.merge import bipartite_soft_matching, merge_source, merge_wavg
    rng = np.random.default_rng(3)
    images = rng.random((B, 3, S, S)).astype(np.float32)
    target = rng.standard_normal((B, N, D)).astype(np.float32)
    mask = mapet.BlockMaskGenerator(GRID, 75, seed=4).sample(B)
    model = mapet.create_model("dtm_tiny_patch16_224", output_dim=D, init_values=0.1, drop_path_rate=0.1)
    schedules = {"mapet": mapet.DTMSchedule(seed=5), "torch": mapet.DTMSchedule(seed=5)}

    def mapet_step():
        model.zero_grad()
        model.train_step(images, target, mask, schedules=schedules["mapet"].draw(N))

    ref = md.DTM(img_size=S, patch_size=P, embed_dim=C, depth=DEPTH, num_heads=HEADS, mlp_ratio=4, qkv_bias=True,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6), init_values=0.1, drop_path_rate=0.1,
                 output_dim=D).train()
    x, m, t = torch.from_numpy(images), torch.from_numpy(mask), torch.from_numpy(target)

    def torch_step():
        ref.zero_grad(set_to_none=True)
        out = ref(x, bool_masked_pos=m, return_all_tokens=True)
        loss = 0
        entries = schedules["torch"].draw(N)
        for e in entries:
            if e.r == 0:
                source = torch.eye(N)[None].expand(B, N, N)
            else:
                with torch.no_grad():
                    source, size, feats = None, None, t.clone()
                    for _ in range(e.iterations):
                        merge, _ = bipartite_soft_matching(feats, e.r, True, False)
                        source = merge_source(merge, feats, source)
                        feats, size = merge_wavg(merge, feats, size)
            denom = source.sum(-1).unsqueeze(-1) + 1e-6
            o = source.transpose(1, 2) @ (source @ out / denom)
            tt = source.transpose(1, 2) @ (source @ t / denom)
            loss = loss + F.smooth_l1_loss(o, tt, beta=2.0)
        (loss / len(entries)).backward()

    def mapet_morph():
        mapet.dtm_memberships(target, schedules["mapet"].draw(N))

    def torch_morph():
        with torch.no_grad():
            for e in schedules["torch"].draw(N):
                source, size, feats = None, None, t.clone()
                for _ in range(e.iterations if e.r else 0):
                    merge, _ = bipartite_soft_matching(feats, e.r, True, False)
                    source = merge_source(merge, feats, source)
                    feats, size = merge_wavg(merge, feats, size)

    return mapet_step, torch_step, mapet_morph, torch_morph


def race(name, mapet_fn, torch_fn, reps):
    mapet_fn(), torch_fn()  # warm-up (allocations, first-touch)
    tm, tt = [], []
    for _ in range(reps):
        tm.append(timed(mapet_fn))
        tt.append(timed(torch_fn))
    m, t = statistics.median(tm), statistics.median(tt)
    print(f"{name}: mapet {1e3 * m:.0f} ms, PyTorch {1e3 * t:.0f} ms (medians of {reps}); "
          f"PyTorch / mapet = {t / m:.2f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ccvit_root")
    ap.add_argument("dtm_root")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    import torch
    torch.set_num_threads(args.threads)
    mapet.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {B}, {S} px", flush=True)
    race("CCViT-Tiny/16 train step", *ccvit_steps(args.ccvit_root), args.reps)
    step_m, step_t, morph_m, morph_t = dtm_steps(args.dtm_root)
    race("DTM-Tiny/16 train step (incl. morphing)", step_m, step_t, args.reps)
    race("DTM morphing alone (L = 2, [16, 196, 512])", morph_m, morph_t, args.reps)


if __name__ == "__main__":
    main()

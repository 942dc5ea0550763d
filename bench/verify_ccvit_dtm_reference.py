"""Cross-check of mapet's CCViT and DTM against the original code (not part of the test run).

Needs torch + timm (the peer venv) and checkouts of Cakeyan/CCViT_Public and naver-ai/dtm:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv-bench/bin/python \
        bench/verify_ccvit_dtm_reference.py /path/to/CCViT_Public /path/to/dtm

mapet weights go into the reference modules through ``mapet.interop.to_beit_layout`` with
``load_state_dict(strict=True)`` (so the key sets must be equal), the references run in float64,
and the script checks:

1. CCViT (``VisionTransformerForMaskedImageModelingCLS``, ``shared_lm_head=False``): token
   logits and pixel-head outputs at the corrupted rows (``bool_replaced_pos`` = masked | replaced,
   as the reference engine passes it) equal ``mapet.CCViT(images, mask, replaced)``; the dual loss
   (cross-entropy on centroid ids + MSE on per-patch normalised pixels, 1:1) equals
   ``CCViT.train_step``. The reference engine builds its pixel labels with
   ``images.reshape(-1, h*h, 3*p*p)`` on [B, 3, H, W] images, which is not a patch layout (each row
   is 3·p·p consecutive values of one channel's raster); mapet follows ALGORITHMS.md §4 (per-patch vectors
   in (channel, row, col) order, the order the reference itself uses for its centroid ids). The
   script reports how far the two label layouts are apart.
2. DTM (``DTM`` of models/modeling_dtm.py): predictions ``forward(x, bool_masked_pos,
   return_all_tokens=True)`` equal ``mapet.DTM(images, mask)``; token morphing with the reference's
   ``bipartite_soft_matching(metric, r, class_token=True)`` + ``merge_source`` + ``merge_wavg``
   (as engines/engine_for_dtm.py calls them) yields the same groups as ``mapet.dtm_memberships``;
   the engine's loss (group means through the source matrices, smooth-L1 β = 2, mean over the L
   schedules) equals ``DTM.train_step``.

Measured 2026-11-24 (batch 2, float64 references, mapet float32), small (32 px, patch 8, depth 4)
and Tiny/16 at 224 px (depth 12, CCViT early_layers 9 and vocab 8192, DTM output_dim 512): key sets
equal (CCViT 103 / 223 keys, DTM 69 / 189), max relative error of token logits, pixel outputs
and DTM predictions ≤ 6.9e-7, CE / MSE / total loss within 2e-8 relative, DTM loss
within 7e-16 relative over 6 steps of drawn schedules (r up to 27, up to 14 rounds), and all 24
morphings per size give the same groups as bm/merge.py. The engine's label2 reshape differs from
per-patch targets by up to 3.6 (normalised units).
"""
import argparse
import os
import sys
import warnings
from functools import partial

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
import mapet  # noqa: E402
from mapet.interop import to_beit_layout  # noqa: E402

FAILURES = []


def check(name, err, tol):
    ok = err <= tol
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: {err:.3g} (tolerance {tol:g})")
    if not ok:
        FAILURES.append(name)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def randomize(model, seed):
    """Random weights that make every part matter (the key bias stays 0: the BEiT layout has none)."""
    rng = np.random.default_rng(seed)
    C = model.config["embed_dim"]
    for k, v in model.state_dict().items():
        scale = 0.3 if v.ndim > 1 else 0.1
        if k.endswith(".weight") and v.ndim == 2:
            scale = 1.0 / np.sqrt(v.shape[1])
        v[...] = rng.standard_normal(v.shape).astype(np.float32) * scale
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k.endswith("norm.weight"):
            v += 1
        if k.endswith("attn.kv.bias"):
            v[:C] = 0
    return model


def load_into(ref, model):
    import torch
    sd = {k: torch.from_numpy(np.array(v, dtype=np.float64)) for k, v in to_beit_layout(model.state_dict()).items()}
    own = set(ref.state_dict())
    print(f"  state_dict keys: reference {len(own)}, mapet (BEiT layout) {len(sd)}; "
          f"only in reference {sorted(own - set(sd))}, only in mapet {sorted(set(sd) - own)}")
    ref.double().load_state_dict(sd, strict=True)
    return ref.eval()


def block_masks(B, grid, count, seed):
    return mapet.BlockMaskGenerator(grid, count, min_num_patches=min(16, count), seed=seed).sample(B)


def verify_ccvit(root, size):
    import torch
    import torch.nn as nn
    sys.path.insert(0, root)
    import modeling_pretrain as mp
    S, p, C, depth, heads, early, V = size
    grid = S // p
    n = grid * grid
    print(f"CCViT img {S}, patch {p}, C {C}, depth {depth}, heads {heads}, early_layers {early}, vocab {V}")
    model = randomize(mapet.create_model("ccvit_tiny_patch16_224", img_size=S, patch_size=p, embed_dim=C, depth=depth,
                                         num_heads=heads, num_tokens=V, early_layers=early, drop_path_rate=0.0), 1)
    ref = mp.VisionTransformerForMaskedImageModelingCLS(
        img_size=S, patch_size=p, in_chans=3, vocab_size=V, embed_dim=C, depth=depth, num_heads=heads, mlp_ratio=4,
        qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), init_values=0.1, early_layers=early,
        head_layers=2, shared_lm_head=False)
    load_into(ref, model)
    rng = np.random.default_rng(2)
    B = 2
    clean = rng.random((B, 3, S, S)).astype(np.float32)
    centroids = rng.random((V, 3 * p * p)).astype(np.float32)
    patches = clean.reshape(B, 3, grid, p, grid, p).transpose(0, 2, 4, 1, 3, 5).reshape(B, n, -1)
    ids = ((patches[:, :, None, :] - centroids[None, None]) ** 2).sum(-1).argmin(-1)
    mask = block_masks(B, grid, int(round(n * 75 / 196)), 3)
    corrupted, replaced = mapet.ccvit_corrupt(clean, mask, ids, centroids, int(round(n * 20 / 196)), seed=4)
    both = mask | replaced
    with torch.no_grad():
        logits_ref, pixels_ref = ref(torch.from_numpy(corrupted).double(), bool_masked_pos=torch.from_numpy(mask),
                                     bool_replaced_pos=torch.from_numpy(both))
    logits, pixels = model(corrupted, mask, replaced)
    check("token logits at the corrupted rows (max rel)", rel(logits, logits_ref.numpy()), 1e-4)
    check("pixel-head outputs at the corrupted rows (max rel)", rel(pixels, pixels_ref.numpy()), 1e-4)

    # The engine's dual loss on the reference outputs.
    import torch.nn.functional as F
    targets = mapet.ccvit_pixel_targets(clean, p)
    ce = F.cross_entropy(logits_ref, torch.from_numpy(ids[both]).long()).item()
    mse = F.mse_loss(pixels_ref, torch.from_numpy(targets[both]).double()).item()
    loss = model.train_step(corrupted, ids, targets, mask, replaced)
    parts = model.last_losses
    check("CE on centroid ids (rel)", abs(parts["token_loss"] - ce) / ce, 1e-5)
    check("MSE on per-patch normalised pixels (rel)", abs(parts["pixel_loss"] - mse) / mse, 1e-5)
    check("total = CE + MSE (rel)", abs(loss - (ce + mse)) / (ce + mse), 1e-5)
    flat = torch.from_numpy(clean).double().reshape(-1, n, 3 * p * p)  # the engine's label2 reshape
    flat = (flat - flat.mean(-1, keepdim=True)) / (flat.var(-1, keepdim=True) + 1e-6) ** 0.5
    same = np.allclose(flat.numpy(), targets, atol=1e-5)
    print(f"  note: the engine's label2 reshape {'equals' if same else 'differs from'} the per-patch targets "
          f"(max |diff| {np.abs(flat.numpy() - targets).max():.3g}); mapet uses per-patch targets (ALGORITHMS.md §4)")
    sys.path.remove(root)


def reference_sources(merge_mod, feats, r, iterations):
    """The engine's morphing: `iterations` rounds of bipartite matching on the merged tokens."""
    import torch
    x = torch.from_numpy(feats).double()
    if r == 0:
        B, t, _ = x.shape
        return torch.eye(t, dtype=x.dtype)[None].expand(B, t, t)
    source, size = None, None
    for _ in range(iterations):
        merge, _ = merge_mod.bipartite_soft_matching(x, r, True, False)
        source = merge_mod.merge_source(merge, x, source)
        x, size = merge_mod.merge_wavg(merge, x, size)
    return source


def same_partition(groups, source):
    """mapet's group ids [n] vs a reference source matrix [G, n] (one-hot columns)."""
    ref_ids = np.asarray(source).argmax(0)
    pairs = set(zip(groups.tolist(), ref_ids.tolist()))
    return len(pairs) == len(set(groups.tolist())) == len(set(ref_ids.tolist()))


def verify_dtm(root, size):
    import torch
    import torch.nn as nn
    sys.path.insert(0, os.path.join(root, "models"))
    sys.path.insert(0, root)
    import modeling_dtm as md
    from bm import merge as merge_mod
    S, p, C, depth, heads, D = size
    grid = S // p
    n = grid * grid
    print(f"DTM img {S}, patch {p}, C {C}, depth {depth}, heads {heads}, output_dim {D}")
    model = randomize(mapet.create_model("dtm_tiny_patch16_224", img_size=S, patch_size=p, embed_dim=C, depth=depth,
                                         num_heads=heads, output_dim=D, drop_path_rate=0.0), 5)
    ref = md.DTM(img_size=S, patch_size=p, in_chans=3, embed_dim=C, depth=depth, num_heads=heads, mlp_ratio=4,
                 qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), init_values=0.1, output_dim=D)
    load_into(ref, model)
    rng = np.random.default_rng(6)
    B = 2
    x = rng.random((B, 3, S, S)).astype(np.float32)
    mask = block_masks(B, grid, int(round(n * 75 / 196)), 7)
    with torch.no_grad():
        pred_ref = ref(torch.from_numpy(x).double(), bool_masked_pos=torch.from_numpy(mask), return_all_tokens=True)
    pred = model(x, mask)
    check("student predictions at every patch (max rel)", rel(pred, pred_ref.numpy()), 1e-4)

    feats = rng.standard_normal((B, n, D)).astype(np.float32)
    schedule = mapet.DTMSchedule(seed=8)
    checked = mismatched = 0
    for step in range(6):
        entries = schedule.draw(n)
        members = mapet.dtm_memberships(feats, entries)
        sources = [reference_sources(merge_mod, feats, e.r, e.iterations) for e in entries]
        for l, src in enumerate(sources):
            for b in range(B):
                checked += 1
                mismatched += not same_partition(members[l, b], src[b].numpy())
        # The engine's loss with these sources.
        target = torch.from_numpy(feats).double()
        out = torch.from_numpy(pred.astype(np.float64))
        total = 0.0
        for src in sources:
            src = src.double()
            denom = src.sum(-1).unsqueeze(-1) + 1e-6
            o = src.transpose(1, 2) @ (src @ out / denom)
            t = src.transpose(1, 2) @ (src @ target / denom)
            total += torch.nn.functional.smooth_l1_loss(o, t, beta=2.0).item()
        ref_loss = total / len(sources)
        loss = model.train_step(x, feats, mask, memberships=members)
        model.zero_grad()
        if step < 3:
            print(f"  schedules {[(e.r, e.iterations) for e in entries]}: loss mapet {loss:.8f}, engine {ref_loss:.8f}")
        check(f"DTM loss, step {step} (rel)", abs(loss - ref_loss) / ref_loss, 1e-5)
    check(f"morphing groups differ from bm/merge.py ({checked} morphings)", mismatched, 0)
    sys.path.remove(root)
    sys.path.remove(os.path.join(root, "models"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ccvit_root")
    ap.add_argument("dtm_root")
    ap.add_argument("--small", action="store_true", help="only the small configurations")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    import torch
    torch.set_num_threads(2)
    sizes = [(32, 8, 48, 4, 3, 3, 16)] + ([] if args.small else [(224, 16, 192, 12, 3, 9, 8192)])
    for s in sizes:
        verify_ccvit(args.ccvit_root, s)
    sizes = [(32, 8, 48, 4, 3, 24)] + ([] if args.small else [(224, 16, 192, 12, 3, 512)])
    for s in sizes:
        verify_dtm(args.dtm_root, s)
    print("all checks passed" if not FAILURES else f"FAILED: {FAILURES}")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()

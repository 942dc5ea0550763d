"""CLIP ViT-B/16 feature extraction (224 px, batch 32, 2 threads): mapet vs open_clip, fp32 and bf16.

Four sides, interleaved in one process (one call of each per round), medians of --reps rounds:
  mapet fp32        model.forward_features(images)           (every token after ln_post)
  mapet bf16        the same model with precision="bf16"
  open_clip fp32    model.visual(images) under torch.inference_mode()
  open_clip bf16    the same under torch.autocast("cpu", dtype=torch.bfloat16)
Both sides run the same random ViT-B-16-quickgelu weights (mapet loads open_clip's state dict).
Targets (issue 16): mapet fp32 ≥ 1.5× open_clip fp32, mapet bf16 ≥ 1.3× open_clip bf16.

    env -u OPENBLAS_CORETYPE /path/to/peers/python bench/clip_features.py [--reps 5]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import open_clip  # noqa: E402

import mapet  # noqa: E402
from mapet.io import save_file  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mapet.set_num_threads(args.threads)
    torch.manual_seed(0)
    oc = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "clip.safetensors")
        save_file({k: v.detach().numpy() for k, v in oc.state_dict().items() if k.startswith("visual.")}, path)
        m = mapet.create_model("clip_vit_b16", pretrained=path)
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
    xt = torch.from_numpy(x)

    def mapet_fp32():
        m.precision = "fp32"
        return m.forward_features(x, batch_size=None)

    def mapet_bf16():
        m.precision = "bf16"
        return m.forward_features(x, batch_size=None)

    def oc_fp32():
        with torch.inference_mode():
            return oc.visual(xt)

    def oc_bf16():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return oc.visual(xt)

    sides = {"mapet fp32": mapet_fp32, "mapet bf16": mapet_bf16, "open_clip fp32": oc_fp32, "open_clip bf16": oc_bf16}
    for f in sides.values():  # warm-up (allocations, oneDNN kernels)
        f()
    times = {k: [] for k in sides}
    for r in range(args.reps):
        for k, f in sides.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"CLIP ViT-B/16 forward_features, 224 px, batch {args.batch}, {args.threads} threads, "
          f"median of {args.reps} interleaved rounds (torch {torch.__version__}, open_clip {open_clip.__version__}, "
          f"mapet bf16 kernel: {mapet.bf16_info()['kernel']})")
    for k, t in med.items():
        spread = f"[{min(times[k]):.2f}–{max(times[k]):.2f}]"
        print(f"  {k:15s} {t:7.3f} s {spread:>14s}  {args.batch / t:6.2f} images/s")
    r32 = med["open_clip fp32"] / med["mapet fp32"]
    r16 = med["open_clip bf16"] / med["mapet bf16"]
    print(f"  mapet fp32 / open_clip fp32: {r32:.2f}x (target ≥ 1.5x)")
    print(f"  mapet bf16 / open_clip bf16: {r16:.2f}x (target ≥ 1.3x)")


if __name__ == "__main__":
    main()

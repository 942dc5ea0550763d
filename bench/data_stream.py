"""Streaming ImageFolder data at 224 px: decode + augment throughput against the bf16 training
step at the same batch size, the two together, and peak memory over a whole 50k-image folder.

1. Generates a folder of synthetic JPEGs (``--images``, default 50 000; 100 classes; sizes
   between 200 and 400 px on a side, smooth random content so they compress like photos) unless
   it exists already.
2. Peak RSS (run first): one full pass of the loader over every image of the folder (no training),
   reported as ``ru_maxrss`` before and after; the decoded split would need images × 3 × 224² × 4 bytes.
3. ``--rounds`` interleaved rounds (medians reported), each measuring at batch ``--batch``:
   decode + augment alone — ``DataLoader(ImageFolder(mode="finetune"), workers=W)``: Pillow decode,
   RandomResizedCrop(0.08-1, 3/4-4/3) to 224, flip, and the same + RandAugment rand-m9-mstd0.5-inc1;
   the ViT-Tiny/16 bf16 ``train_step`` alone on a batch in memory (``create_model(...,
   precision="bf16")``, fp32 when the CPU has no AVX512-BF16); and the two together: the streaming
   loader (RandAugment view, prefetching) feeding that step, as a fine-tuning run does.

    python bench/data_stream.py --root stream-50k    # the folder is generated there (kept for reruns)
"""
import argparse
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

import numpy as np  # noqa: E402

import mapet  # noqa: E402
from mapet.data import DataLoader, ImageFolder  # noqa: E402


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_folder(root: str, count: int, classes: int = 100, seed: int = 0) -> None:
    from PIL import Image
    if os.path.isdir(root) and sum(len(f) for _, _, f in os.walk(root)) >= count:
        return
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    for i in range(count):
        folder = os.path.join(root, f"class{i % classes:03d}")
        os.makedirs(folder, exist_ok=True)
        h, w = rng.integers(200, 401, 2)
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((int(w), int(h)), Image.BILINEAR)
        img.save(os.path.join(folder, f"{i:06d}.jpg"), quality=85)
    print(f"generated {count} JPEGs in {root} in {time.perf_counter() - t:.0f} s", flush=True)


def decode_rate(root: str, workers: int, measure: int, batch: int, seed: int, randaugment=None) -> float:
    ds = ImageFolder(root, 224, mode="finetune", seed=seed, randaugment=randaugment)
    loader = DataLoader(ds, batch, seed=seed, prefetch=0, workers=workers)
    it = iter(loader)
    next(it)  # start-up (threads, first files) not counted
    t, n = time.perf_counter(), 0
    for images, _ in it:
        n += images.shape[0]
        if n >= measure:
            break
    rate = n / (time.perf_counter() - t)
    it.close()
    loader.close()
    return rate


def vit_bf16(batch: int):
    model = mapet.create_model("vit_tiny_patch16_224", num_classes=1000, init_values=0.1, drop_path_rate=0.1,
                               precision="bf16")
    return model


def step_rate(model, batch: int, reps: int) -> float:
    rng = np.random.default_rng(0)
    x = rng.random((batch, 3, 224, 224), dtype=np.float32)
    y = rng.integers(0, 1000, batch)
    times = []
    for _ in range(reps):
        model.zero_grad()
        t = time.perf_counter()
        model.train_step(x, y)
        times.append(time.perf_counter() - t)
    return batch / float(np.median(times))


def pipeline_rate(root: str, model, workers: int, batch: int, steps: int, seed: int) -> float:
    """The streaming loader (RandAugment view, prefetch 2) feeding the bf16 step: images/s trained."""
    ds = ImageFolder(root, 224, mode="finetune", seed=seed, randaugment="rand-m9-mstd0.5-inc1")
    loader = DataLoader(ds, batch, seed=seed, prefetch=2, workers=workers)
    it = iter(loader)
    images, labels = next(it)
    model.train_step(images, labels % 1000)  # start-up not counted
    t, n = time.perf_counter(), 0
    for _ in range(steps):
        images, labels = next(it)
        model.zero_grad()
        model.train_step(images, labels % 1000)
        n += images.shape[0]
    rate = n / (time.perf_counter() - t)
    it.close()
    loader.close()
    return rate


def full_pass(root: str, workers: int, batch: int = 64) -> None:
    ds = ImageFolder(root, 224, mode="finetune", seed=0)
    loader = DataLoader(ds, batch, seed=0, prefetch=2, workers=workers)
    before = rss_mib()
    t, n = time.perf_counter(), 0
    for images, _ in loader:
        n += images.shape[0]
    loader.close()
    whole = n * 3 * 224 * 224 * 4 / 2 ** 30
    print(f"full pass: {n} images in {time.perf_counter() - t:.0f} s ({workers} workers, batch {batch}); peak RSS "
          f"{before:.0f} MiB after the folder scan, {rss_mib():.0f} MiB after the pass (decoded in memory: {whole:.1f} GiB)",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="mapet-stream-bench")
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--measure", type=int, default=256, help="images decoded per round and view")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="training steps per round (step alone, and fed by the loader)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-full-pass", action="store_true")
    args = ap.parse_args()
    mapet.set_num_threads(args.threads)
    print(f"bf16: {mapet.bf16_info()}; threads {args.threads}; batch {args.batch}; decode workers {args.workers}",
          flush=True)
    make_folder(args.root, args.images)
    if not args.skip_full_pass:  # first: ru_maxrss is the process's peak so far
        full_pass(args.root, args.workers)
    model = vit_bf16(args.batch)
    step_rate(model, args.batch, 1)  # allocate the activations
    rows = {"decode + crop + flip": [], "decode + crop + flip + RandAugment": [], "ViT-Tiny/16 bf16 step alone": [],
            "loader (RandAugment) feeding the bf16 step": []}
    for r in range(args.rounds):
        rows["decode + crop + flip"].append(decode_rate(args.root, args.workers, args.measure, args.batch, seed=r))
        rows["ViT-Tiny/16 bf16 step alone"].append(step_rate(model, args.batch, args.steps))
        rows["decode + crop + flip + RandAugment"].append(
            decode_rate(args.root, args.workers, args.measure, args.batch, seed=r, randaugment="rand-m9-mstd0.5-inc1"))
        rows["loader (RandAugment) feeding the bf16 step"].append(
            pipeline_rate(args.root, model, args.workers, args.batch, args.steps, seed=r))
        print(f"round {r + 1}: " + "; ".join(f"{k} {v[-1]:.1f}" for k, v in rows.items()), flush=True)
    print(f"medians of {args.rounds} interleaved rounds, images/s at batch {args.batch}:")
    for k, v in rows.items():
        print(f"  {k}: {np.median(v):.1f} (range {min(v):.1f}-{max(v):.1f})")
    step = np.asarray(rows["ViT-Tiny/16 bf16 step alone"])
    ra = np.asarray(rows["decode + crop + flip + RandAugment"]) / step
    fed = np.asarray(rows["loader (RandAugment) feeding the bf16 step"]) / step
    print(f"  per-round ratios (medians): decode+RandAugment / step {np.median(ra):.1f}x "
          f"(range {ra.min():.1f}-{ra.max():.1f}); fed by the loader the step keeps {np.median(fed):.0%} of its speed "
          f"(range {fed.min():.0%}-{fed.max():.0%})")


if __name__ == "__main__":
    main()

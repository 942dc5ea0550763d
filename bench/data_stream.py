"""Streaming ImageFolder data at 224 px: decode + augment throughput against the training step,
and peak memory over a whole 50k-image folder.

1. Generates a folder of synthetic JPEGs (``--images``, default 50 000; 100 classes; sizes
   between 200 and 400 px on a side, smooth random content so they compress like photos) unless
   it exists already.
2. Decode + augment: ``DataLoader(ImageFolder(mode="finetune"), workers=W)`` — Pillow decode,
   RandomResizedCrop(0.08-1, 3/4-4/3) to 224, flip — images/s over ``--measure`` images, for each
   worker count in ``--workers``.
3. The consumer: a ViT-Tiny/16 ``train_step`` (forward + backward, batch 16, 224 px) in images/s,
   and a MaPeT-Tiny/16 step (8192 tokens), with the engine's default precision.
4. Peak RSS (run first): one full pass of the loader over every image of the folder (no training), reported
   as ``ru_maxrss`` before and after; the decoded split would need images × 3 × 224² × 4 bytes.

    python bench/data_stream.py --root /tmp/mapet-stream-50k
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


def decode_rate(root: str, workers: int, measure: int, batch: int = 64) -> float:
    ds = ImageFolder(root, 224, mode="finetune", seed=0)
    loader = DataLoader(ds, batch, seed=0, prefetch=2, workers=workers)
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


def step_rate(kind: str, reps: int = 3, batch: int = 16) -> float:
    rng = np.random.default_rng(0)
    x = rng.random((batch, 3, 224, 224), dtype=np.float32)
    if kind == "vit":
        model = mapet.create_model("vit_tiny_patch16_224", num_classes=1000, init_values=0.1, drop_path_rate=0.1)
        y = rng.integers(0, 1000, batch)
        run = lambda: model.train_step(x, y)  # noqa: E731
    else:
        model = mapet.create_model("mapet_tiny_patch16_224")
        tokens = rng.integers(0, 8192, (batch, 196))
        sampler = model.sampler(seed=0)
        run = lambda: model.train_step(x, tokens, sampler.sample(batch))  # noqa: E731
    run()
    times = []
    for _ in range(reps):
        model.zero_grad()
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return batch / float(np.median(times))


def full_pass(root: str, workers: int, batch: int = 64) -> None:
    ds = ImageFolder(root, 224, mode="finetune", seed=0)
    loader = DataLoader(ds, batch, seed=0, prefetch=2, workers=workers)
    before = rss_mib()
    t, n = time.perf_counter(), 0
    for images, _ in loader:
        n += images.shape[0]
    loader.close()
    whole = n * 3 * 224 * 224 * 4 / 2 ** 30
    print(f"full pass: {n} images in {time.perf_counter() - t:.0f} s ({workers} workers); peak RSS "
          f"{before:.0f} MiB after the folder scan, {rss_mib():.0f} MiB after the pass (decoded in memory: {whole:.1f} GiB)",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="mapet-stream-bench")
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--measure", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-full-pass", action="store_true")
    args = ap.parse_args()
    mapet.set_num_threads(args.threads)
    make_folder(args.root, args.images)
    if not args.skip_full_pass:  # first: ru_maxrss is the process's peak so far
        full_pass(args.root, max(args.workers))
    for w in args.workers:
        print(f"decode + RandomResizedCrop + flip to 224 px, {w} worker(s): {decode_rate(args.root, w, args.measure):.0f} "
              "images/s", flush=True)
    print(f"ViT-Tiny/16 train step, batch 16, {args.threads} threads: {step_rate('vit'):.1f} images/s", flush=True)
    print(f"MaPeT-Tiny/16 train step, batch 16, {args.threads} threads: {step_rate('mapet'):.1f} images/s", flush=True)


if __name__ == "__main__":
    main()

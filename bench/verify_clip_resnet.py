"""mapet's CLIP ModifiedResNet against open_clip's, through mapet's torch-free converter (developer-run).

Builds open_clip's ``RN50`` (or --model) with random weights — BatchNorm statistics, scales and
shifts randomised too, so the folding is exercised (CLIP initialises them to identity / zero) —
writes it with ``torch.save`` (zip format, full CLIP state dict) and, for the image tower, with
``torch.jit.trace(...).save`` (a TorchScript archive like OpenAI's ``.pt``), converts both files
with ``mapet.convert`` (which never imports torch), loads them with
``mapet.create_model("clip_rn50", pretrained=...)`` and compares on random images:

* ``encode_image`` (attention-pool embedding) with open_clip's ``model.encode_image``;
* ``forward_features`` (the layer-4 grid as [B, h·w, C]) with open_clip's stem → layer4.

Relative error = max |mapet − open_clip| / max |open_clip|; the check is ≤ 1e-5. With ``--time N``
it also times ``encode_image`` of both, interleaved in this process, and prints medians of N.

Run from the project root after ``python3 setup.py build_ext --inplace``, with torch and open_clip_torch
installed (bench/requirements.txt):

    .venv-bench/bin/python bench/verify_clip_resnet.py [--model RN50] [--batch 4] [--time 5]
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
from mapet.convert import convert  # noqa: E402

NAMES = {"RN50": "clip_rn50", "RN101": "clip_rn101", "RN50x4": "clip_rn50x4", "RN50x16": "clip_rn50x16",
         "RN50x64": "clip_rn50x64"}


def randomise_batchnorm(model: torch.nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=gen)
            m.bias.data = 0.1 * torch.randn(n, generator=gen)
            m.running_mean = 0.1 * torch.randn(n, generator=gen)
            m.running_var = 0.5 + torch.rand(n, generator=gen)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="RN50", choices=sorted(NAMES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time", type=int, default=0, metavar="N", help="also time encode_image, N interleaved runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mapet.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None).eval()
    randomise_batchnorm(model.visual, gen)
    size = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
    images = torch.randn(args.batch, 3, size, size, generator=gen)
    with torch.no_grad():
        ref_embed = model.encode_image(images).numpy()
        v = model.visual
        x = v.stem(images)
        x = v.layer4(v.layer3(v.layer2(v.layer1(x))))
        ref_grid = x.flatten(2).transpose(1, 2).numpy()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        full = os.path.join(tmp, "open_clip_model.bin")
        torch.save(model.state_dict(), full)
        script = os.path.join(tmp, "visual.pt")
        with torch.no_grad():
            torch.jit.trace(model.visual, images[:1]).save(script)
        for src in (full, script):
            dst = src + ".safetensors"
            report = convert(src, dst)
            print(f"{os.path.basename(src)}: {report['source_format']} file, {report['written']} tensors, "
                  f"skipped {len(report['skipped'])} ({'; '.join(report['skipped'][:3])}{' ...' if len(report['skipped']) > 3 else ''})")
            m = mapet.create_model(NAMES[args.model], pretrained=dst)
            embed, grid = m.encode_image(images.numpy()), m.forward_features(images.numpy())
            e, g = rel(embed, ref_embed), rel(grid, ref_grid)
            good = e <= 1e-5 and g <= 1e-5 and embed.shape == ref_embed.shape and grid.shape == ref_grid.shape
            ok &= good
            print(f"  encode_image {embed.shape}: rel err {e:.2e};  forward_features {grid.shape}: rel err {g:.2e}"
                  f"  -> {'OK' if good else 'FAIL'} (≤ 1e-5)")
        if args.time:
            x = images.numpy()
            t_ref, t_mapet = [], []
            for _ in range(args.time):
                t0 = time.perf_counter()
                with torch.no_grad():
                    model.encode_image(images)
                t_ref.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                m.encode_image(x)
                t_mapet.append(time.perf_counter() - t0)
            r, q = statistics.median(t_ref), statistics.median(t_mapet)
            print(f"encode_image, batch {args.batch}, {args.threads} threads, medians of {args.time} interleaved runs: "
                  f"open_clip {args.batch / r:.1f} img/s, mapet {args.batch / q:.1f} img/s ({r / q:.2f}×)")
    print("all OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

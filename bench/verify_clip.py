"""mapet's CLIP ViT tower against open_clip with random weights (developer-run; needs torch + open_clip_torch).

For ``ViT-B-16-quickgelu`` (OpenAI architecture) and ``ViT-B-16`` (exact GELU): build the open_clip
model with random weights (LayerNorm weights/biases perturbed so they matter), export its full state
dict (visual and text towers) to safetensors, load it with
``mapet.create_model("clip_vit_b16", pretrained=..., quick_gelu=...)`` and compare on CLIP-normalised
random images:

  encode_image         open_clip ``model.encode_image`` (unnormalised)
  forward_features     every token after ``visual.ln_post`` (a forward hook)      — k-CLIP features
  forward_features(proj=True)  those tokens @ ``visual.proj``                     — DTM targets

Pass: max |mapet − open_clip| / max |open_clip| ≤ 1e-5 for each output (fp32). Also reports bf16
(``precision="bf16"``) against open_clip fp32, for information.

    /path/to/peers/python bench/verify_clip.py [--batch 4]
"""
import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import open_clip  # noqa: E402

import mapet  # noqa: E402
from mapet.io import save_file  # noqa: E402

TOL = 1e-5


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def check(arch: str, quick: bool, batch: int, seed: int) -> bool:
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None).eval()
    with torch.no_grad():
        for name, p in model.visual.named_parameters():
            if "ln" in name:  # LayerNorms away from (1, 0)
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.02 * torch.randn_like(p))
    captured = {}
    model.visual.ln_post.register_forward_hook(lambda m, i, o: captured.__setitem__("tokens", o))
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        embed = model.encode_image(images)
        tokens = captured["tokens"]
        if tokens.shape[0] != batch:  # older open_clip: [N, B, C]
            tokens = tokens.permute(1, 0, 2)
        projected = tokens @ model.visual.proj
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "clip.safetensors")
        save_file({k: v.detach().numpy() for k, v in model.state_dict().items()}, path)
        m = mapet.create_model("clip_vit_b16", pretrained=path, quick_gelu=quick)
    x = images.numpy()
    ok = True
    for precision in ("fp32", "bf16"):
        m.precision = precision
        got = {"encode_image": m.encode_image(x), "forward_features": m.forward_features(x),
               "forward_features(proj=True)": m.forward_features(x, proj=True)}
        want = {"encode_image": embed.numpy(), "forward_features": tokens.numpy(),
                "forward_features(proj=True)": projected.numpy()}
        for k in got:
            assert got[k].shape == want[k].shape, (k, got[k].shape, want[k].shape)
            e = rel(got[k], want[k])
            verdict = ("ok" if e <= TOL else "FAIL") if precision == "fp32" else "(info)"
            ok &= e <= TOL or precision != "fp32"
            print(f"{arch:22s} {precision}  {k:28s} max rel err {e:.2e}  {verdict}")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    mapet.set_num_threads(2)
    print(f"open_clip {open_clip.__version__}, torch {torch.__version__}, mapet bf16: {mapet.bf16_info()}")
    ok = check("ViT-B-16-quickgelu", True, args.batch, args.seed)
    ok &= check("ViT-B-16", False, args.batch, args.seed + 10)
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

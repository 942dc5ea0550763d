"""``python -m mapet demo``: the whole workflow on the built-in digits, end to end, in minutes.

1. Fit the CCViT pixel tokenizer (k-means on 4×4 patches) and cache every image's tokens.
2. Pre-train a small ViT with MaPeT, the MIM (BEiT) baseline, CCViT and DTM, same budget. DTM
   needs a frozen teacher: here the MaPeT encoder pre-trained just before (the paper uses CLIP).
3. Linear-probe and fine-tune each, and a ViT trained from scratch with the same number of fine-tuning
   steps and its own recipe (``scratch.*``: the class-token head; see :mod:`mapet.study`).
4. Print and save a table like the paper's (method × top-1) as Markdown and JSON, and captioned
   figures (matplotlib): results bars, loss curves, MaPeT's masks, tokens, CCViT and DTM pictures.

The numbers are whatever comes out on this data and budget, with fixed seeds; the digits
(1438 train / 359 test images of 8×8 pixels, upsampled) are far from ImageNet, so read them
as a check that the pipeline works and what pre-training buys at this scale, nothing more.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
from typing import Any, Dict

import numpy as np

from .cli import command
from .commands import _DATA, _MODEL, OPTIONS, _datasets, run_finetune, run_linprobe, run_pretrain, tokenize_dataset
from .registry import get_method
from .study import FINETUNE_RECIPE, SCRATCH_RECIPE, STUDY_OPTIONS

log = logging.getLogger(__name__)

DEMO_DEFAULTS: Dict[str, Any] = {
    **_DATA, "seed": 0, "model": dict(_MODEL), "output_dir": "mapet-demo",
    "tokenizer": {"n_tokens": 256, "n_iter": 20, "path": None, "fit_images": 4096},
    "methods": ["mapet", "beit", "ccvit", "dtm"],
    "pretrain": {"epochs": 10, "batch_size": 64, "lr": 1.5e-3, "least_number": 16, "warmup_epochs": 1},
    "finetune": dict(FINETUNE_RECIPE),  # the study's: one recipe for every pre-trained row
    "scratch": dict(SCRATCH_RECIPE),  # the from-scratch row's own fine-tuning recipe, same steps
    "linprobe": {"epochs": 100, "lr": 0.1},
    "dtm": {"teacher": None},
}


def describe_data(cfg: Dict[str, Any]) -> str:
    """Which data a run used, in words (printed and saved with the results)."""
    train, val, classes = _datasets(cfg, int(cfg["model"]["img_size"]), "eval", what="demo")
    if cfg.get("data", "digits") == "digits":
        return f"digits {len(train)} train / {len(val)} test"
    held = f"val_data {cfg['val_data']}" if cfg.get("val_data") else f"val_split {cfg['val_split']} of it"
    return f"ImageFolder {cfg['data']}: {len(train)} train / {len(val)} held-out images ({held}), {len(classes)} classes"


def figure_images(cfg: Dict[str, Any], count: int) -> np.ndarray:
    """The first ``count`` held-out images of the configured data (the digits' test split, or the
    ImageFolder's val_data / val_split), float32 [count, 3, S, S] for the figures."""
    _, val, _ = _datasets(cfg, int(cfg["model"]["img_size"]), "eval", what="demo")
    count = min(count, len(val))
    return np.stack([np.asarray(val[i][0], np.float32) for i in range(count)])


def run_demo(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Run the demo per ``cfg`` (see ``DEMO_DEFAULTS``); returns the results table as a dict."""
    from . import viz

    t_start = time.perf_counter()
    out = cfg.get("output_dir") or "mapet-demo"
    os.makedirs(out, exist_ok=True)
    data_text = describe_data(cfg)  # also checks the data before any work
    print(f"data: {data_text}", flush=True)
    base = {k: v for k, v in cfg.items() if k not in ("pretrain", "finetune", "linprobe", "methods", "dtm", "scratch")}
    timings: Dict[str, float] = {}

    def stage(text: str) -> None:
        print(f"[{time.perf_counter() - t_start:5.0f} s] {text}", flush=True)

    stage("fitting the pixel tokenizer and caching the tokens of the training images")
    t = time.perf_counter()
    cache = tokenize_dataset(dict(base, output_dir=out))
    timings["tokenize"] = time.perf_counter() - t

    results: Dict[str, Dict[str, float]] = {}
    pre_curves: Dict[str, Any] = {}
    tune_curves: Dict[str, Any] = {}
    for method in cfg["methods"]:
        stage(f"pre-training with {method} for {cfg['pretrain']['epochs']} epochs")
        t = time.perf_counter()
        pcfg = copy.deepcopy(base)
        if cfg.get("dtm"):
            pcfg["dtm"] = dict(cfg["dtm"])
        pcfg.update(method=method, tokens=cache, output_dir=os.path.join(out, method))
        from .commands import PRETRAIN_DEFAULTS
        for k, v in PRETRAIN_DEFAULTS.items():
            pcfg.setdefault(k, v)
        pcfg.update(cfg["pretrain"])
        entry = get_method(method)
        for key in ("least_number", "num_masking_patches"):
            if key not in entry.reads:
                pcfg[key] = None  # the demo's one budget per option: each is read by its methods alone
        if method == "dtm" and not pcfg.get("dtm", {}).get("teacher"):
            if "mapet" not in cfg["methods"][:cfg["methods"].index("dtm")]:
                raise ValueError("demo: dtm needs a teacher: set dtm.teacher or list mapet before dtm in methods")
            pcfg["dtm"] = dict(pcfg.get("dtm", {}), teacher=os.path.join(out, "mapet", "model.safetensors"))
        _, history = run_pretrain(pcfg)
        pre_curves[method] = history["loss"]
        timings[f"pretrain {method}"] = time.perf_counter() - t
    for row, pretrained in [("scratch", None)] + [(m, os.path.join(out, m, "model.safetensors"))
                                                   for m in cfg["methods"]]:
        stage(f"linear probe and fine-tuning: {row}")
        t = time.perf_counter()
        lcfg = dict(base, pretrained=pretrained, pool="avg", **cfg["linprobe"])
        probe = run_linprobe(lcfg)
        from .commands import FINETUNE_DEFAULTS
        fcfg = copy.deepcopy(base)
        for k, v in FINETUNE_DEFAULTS.items():
            fcfg.setdefault(k, v)
        fcfg.update(cfg["finetune"], pretrained=pretrained, output_dir=os.path.join(out, f"finetune-{row}"))
        if pretrained is None:
            fcfg.update(cfg.get("scratch") or {})  # the from-scratch row's own recipe, same number of steps
        _, history, metrics = run_finetune(fcfg)
        tune_curves[row] = history["loss"]
        results[row] = {"linear_probe_top1": probe["val_top1"], "finetune_top1": metrics["top1"]}
        timings[f"transfer {row}"] = time.perf_counter() - t
    total = time.perf_counter() - t_start

    names = {m: get_method(m).title for m in cfg["methods"]}
    names["scratch"] = "from scratch (no pre-training)"
    if "dtm" in names and not cfg.get("dtm", {}).get("teacher"):
        names["dtm"] = "DTM (teacher: the MaPeT encoder)"
    lines = ["| method | linear probe top-1 | fine-tune top-1 |", "|---|---|---|"]
    for row, r in results.items():
        lines.append(f"| {names.get(row, row)} | {100 * r['linear_probe_top1']:.1f}% | {100 * r['finetune_top1']:.1f}% |")
    m = cfg["model"]
    budget = (f"ViT embed_dim {m['embed_dim']}, depth {m['depth']}, {m['num_heads']} heads, {m['img_size']} px, "
              f"patch {m['patch_size']}; tokenizer k={cfg['tokenizer']['n_tokens']}; pre-training "
              f"{cfg['pretrain']['epochs']} epochs per method; fine-tuning {cfg['finetune']['epochs']} epochs; "
              f"linear probe {cfg['linprobe']['epochs']} epochs; seed {cfg['seed']}; "
              f"{data_text}; wall time {total:.0f} s")
    table = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("# mapet demo: pre-training on " + ("the built-in digits" if cfg.get("data", "digits") == "digits"
                                                  else str(cfg["data"])) + "\n\n" + table + "\n\nBudget: " + budget + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"results": results, "timings_s": timings, "budget": budget}, f, indent=2)
    pre = {names.get(k, k): v for k, v in pre_curves.items()}
    tune = {names.get(k, k): v for k, v in tune_curves.items()}
    left = "pre-training (each method's own objective, log scale)"
    viz.plot_curves({left: pre, "fine-tuning (cross-entropy)": tune},
                    title="Training loss per optimizer step", logy=[left],
                    caption=f"Left: pre-training losses on the {len(cfg['methods'])} methods' own targets (token "
                            "cross-entropy for MaPeT/MIM, token + pixel loss for CCViT, smooth-L1 on teacher features "
                            "for DTM), so their levels are not comparable, only their trends. Right: fine-tuning "
                            "cross-entropy (label smoothing 0.1) of each pre-trained encoder and of a ViT from "
                            "scratch.", path=os.path.join(out, "curves.png"))
    viz.plot_bars({names.get(r, r): {"linear probe": v["linear_probe_top1"], "fine-tune": v["finetune_top1"]}
                   for r, v in results.items()}, title="Top-1 accuracy on the held-out split",
                  caption=f"Linear probe ({cfg['linprobe']['epochs']} epochs on frozen features) and fine-tuning "
                          f"({cfg['finetune']['epochs']} epochs) after {cfg['pretrain']['epochs']} pre-training "
                          "epochs per method; one seed — differences of a few points are within noise.",
                  path=os.path.join(out, "results.png"))
    if "mapet" in cfg["methods"]:
        pictures(cfg, out)
    if "ccvit" in cfg["methods"]:
        ccvit_picture(cfg, out)
    if "dtm" in cfg["methods"]:
        dtm_picture(cfg, out)
    print(table)
    print("\nBudget:", budget)
    outputs = ["results.md", "results.png", "results.json", "curves.png"]
    outputs += ["masks.png", "tokens.png"] if "mapet" in cfg["methods"] else []
    outputs += ["ccvit.png"] if "ccvit" in cfg["methods"] else []
    outputs += ["dtm.png"] if "dtm" in cfg["methods"] else []
    print(f"Outputs in {out}/ ({', '.join(outputs)})")
    return {"results": results, "timings": timings, "total_s": total}


def _picture_inputs(cfg: Dict[str, Any], out: str, method: str, count: int):
    """(held-out images, the run's PixelTokenizer, its ``method`` model, patch grid side) for a picture."""
    from .models import load
    from .tokenizers import PixelTokenizer

    images = figure_images(cfg, count)
    tokenizer = PixelTokenizer.load(os.path.join(out, "tokenizer.safetensors"))
    model = load(os.path.join(out, method, "model.safetensors"))
    return images, tokenizer, model, int(cfg["model"]["img_size"]) // int(cfg["model"]["patch_size"])


def pictures(cfg: Dict[str, Any], out: str, count: int = 8) -> None:
    """masks.png: one permutation's content and query masks, in patch order and sorted by the
    sampled order (:func:`mapet.viz.plot_masks`).
    tokens.png: captioned rows of (test images; their PixelTokenizer reconstruction; the context
    with the patches to predict greyed; the MaPeT prediction — context patches as seen, each
    predicted patch drawn as the centroid of the token MaPeT predicts for it)."""
    from . import viz
    from .sampling import PermutationSampler

    m = cfg["model"]
    images, tokenizer, model, grid = _picture_inputs(cfg, out, "mapet", count)
    count = len(images)  # a small held-out split may have fewer
    sampler = PermutationSampler(grid * grid, least_number=model.config["least_number"], seed=int(cfg["seed"]))
    batch = sampler.sample(count)
    viz.plot_masks(batch, 0, path=os.path.join(out, "masks.png"))
    tokens = tokenizer.encode(images)
    predicted = np.argmax(model(images, batch), axis=-1)  # [count, P] for the hidden positions
    shown = tokens.copy()
    hidden = np.asarray(batch.predicted) - 1  # token positions 1..n are patches 0..n-1
    np.put_along_axis(shown, hidden, predicted, axis=1)
    seen = tokenizer.patchify(images)
    guess = tokenizer.centroids[shown]
    mask = np.zeros(tokens.shape, bool)
    np.put_along_axis(mask, hidden, True, axis=1)
    mixed = np.where(mask[..., None], guess, seen)
    shown_hidden = tokenizer.patchify(images)
    shown_hidden[mask] = 0.5
    k = tokenizer.n_tokens
    viz.image_rows([("test digits", images),
                    (f"their tokens: each patch drawn as its centroid (k = {k})", tokenizer.decode(tokens)),
                    (f"the context: the {hidden.shape[1]} of {grid * grid} patches to predict greyed",
                     tokenizer.unpatchify(shown_hidden, (grid, grid))),
                    ("MaPeT's prediction: hidden patches drawn as the centroid of the predicted token",
                     tokenizer.unpatchify(mixed, (grid, grid)))],
                   title="What MaPeT predicts: visual tokens of the hidden patches",
                   caption=f"Test digits never seen in training. Row 2 is the best any token predictor can do "
                           f"(the CCViT pixel tokenizer's {k} centroids of {m['patch_size']}×{m['patch_size']} "
                           f"patches). Rows 3–4: for one sampled permutation per digit, the patches outside the "
                           f"context are hidden and MaPeT predicts each one's token from the context and the tokens "
                           f"before it in the order; the visible patches are shown as they are.",
                   path=os.path.join(out, "tokens.png"))


def ccvit_picture(cfg: Dict[str, Any], out: str, count: int = 8) -> None:
    """ccvit.png: captioned rows of (test images; CCViT's corrupted input — block-masked patches grey,
    replaced patches showing their centroid; the pixel head's reconstruction of every corrupted
    patch, de-normalised with the clean patch's own mean and spread, visible patches as seen)."""
    from . import viz
    from .objectives import ccvit_corrupt
    from .sampling import BlockMaskGenerator

    m = cfg["model"]
    images, tokenizer, model, grid = _picture_inputs(cfg, out, "ccvit", count)
    count = len(images)  # a small held-out split may have fewer
    n = grid * grid
    masked_count = int(round(n * 75 / 196))
    mask = BlockMaskGenerator(grid, masked_count, min_num_patches=min(16, masked_count), seed=int(cfg["seed"])).sample(count)
    tokens = tokenizer.encode(images)
    corrupted, replaced = ccvit_corrupt(images, mask, tokens, tokenizer.centroids, int(round(n * 20 / 196)),
                                        seed=int(cfg["seed"]))
    _, pixels = model(corrupted, mask, replaced)          # [M, C·p·p] at mask | replaced
    clean = tokenizer.patchify(images)
    mean = clean.mean(axis=-1, keepdims=True)
    std = np.sqrt(clean.var(axis=-1, ddof=1, keepdims=True) + 1e-6)
    chosen = mask | replaced
    recon = clean.copy()
    recon[chosen] = pixels * std[chosen] + mean[chosen]
    shown = tokenizer.patchify(corrupted)
    shown[mask] = 0.5
    viz.image_rows([("test digits", images),
                    (f"CCViT's input: {masked_count} patches block-masked (grey), "
                     f"{int(replaced[0].sum())} replaced by their centroid", tokenizer.unpatchify(shown, (grid, grid))),
                    ("pixel head's reconstruction of the corrupted patches",
                     np.clip(tokenizer.unpatchify(recon, (grid, grid)), 0, 1))],
                   title="What CCViT reconstructs: corrupted patches from the visible ones",
                   caption="Test digits. CCViT hides blocks of patches and swaps a few visible patches for their "
                           "k-means centroid; its token head predicts every corrupted patch's centroid id and its "
                           "pixel head the patch's normalised pixels, drawn here de-normalised with each clean "
                           "patch's own mean and spread (visible patches as seen).",
                   path=os.path.join(out, "ccvit.png"))


def dtm_picture(cfg: Dict[str, Any], out: str, count: int = 8) -> None:
    """dtm.png: captioned rows showing how DTM's morphing groups the teacher's patch features of test digits — rows for
    3, 6 and 9 rounds of n/16 merges (4 for the demo's 64 patches; merged groups coloured, singletons
    plain; colours repeat after seven groups)."""
    from . import viz
    from .objectives import morph_tokens
    from .train import teacher_features

    images = figure_images(cfg, count)
    count = len(images)  # a small held-out split may have fewer
    teacher = cfg.get("dtm", {}).get("teacher") or os.path.join(out, "mapet", "model.safetensors")
    if str(teacher).endswith(".npy"):
        return  # stored features belong to the training images
    feats = np.asarray(teacher_features(teacher)(images))[:, 1:]
    n = feats.shape[1]
    r = max(1, n // 16)
    rows = [(f"after {k} rounds: {n - k * r} groups of the {n} patches",
             viz.group_overlay(images, morph_tokens(feats, r=r, iterations=k).membership)) for k in (3, 6, 9)]
    viz.image_rows([("test digits", images)] + rows,
                   title="DTM's token morphing: patches whose teacher features agree are merged",
                   caption=f"Each round merges the {r} most similar pairs of token groups (bipartite matching on the "
                           f"teacher's patch features); patches of one merged group share a colour (colours repeat "
                           f"after seven groups), patches still alone stay plain. DTM regresses the teacher's features "
                           f"averaged over such groups.",
                   path=os.path.join(out, "dtm.png"))


@command("demo", "end-to-end demo on the built-in digits: tokenize, pre-train MaPeT, MIM, CCViT and DTM, "
                 "linear-probe and fine-tune against training from scratch (data=ROOT: on your ImageFolder)",
         defaults=DEMO_DEFAULTS,
         options=dict(OPTIONS, **{k: v for k, v in STUDY_OPTIONS.items() if k.startswith("scratch.")}))
def _demo(args, cfg) -> int:
    run_demo(cfg)
    return 0

"""The subcommands of ``python -m mapet``: tokenize, pretrain, finetune, linprobe, eval, demo.

Each command reads its options from the resolved config (defaults below, refined by ``-c FILE``
and ``--set key=value``; ``--list-options`` prints them all) and writes its outputs under
``-o/--output-dir``. Data is either the built-in digits (``data: digits``) or an ImageFolder
root (``data: /path/to/train``, with ``val_data`` for the held-out split or ``val_split`` to cut
one from ``data``). Folders are streamed: images are decoded and augmented by ``workers``
threads batch by batch, never held all at once. ``precision`` ("fp32" or "bf16", ``--set
precision=bf16``) sets the models' matrix-product precision; left at null, a run is fp32 and a
resumed run keeps the precision stored in its checkpoint.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import distributed
from .cli import command

log = logging.getLogger(__name__)


def _emit(result: Any) -> None:
    """Print a command's JSON result (rank 0 only under mpiexec)."""
    if distributed.context().is_main:
        print(json.dumps(result))


def _is_main() -> bool:
    return distributed.context().is_main

_MODEL = {"size": "tiny", "img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3}
# transfer commands: unset (None) model keys come from the pre-trained checkpoint, else from _MODEL
_MODEL_FROM_CHECKPOINT = {k: None for k in _MODEL}

_DATA = {"data": "digits", "val_data": None, "val_split": 0.0, "split_seed": 0, "on_error": "raise", "workers": 2,
         "progress": None}
_LOGS = {"tensorboard": False}

#: What each configuration key means (``--list-options``); dotted keys, or the last part of one.
OPTIONS: Dict[str, str] = {
    "data": "'digits' (built-in) or an ImageFolder root holding one folder per class (root/<class>/<image>)",
    "val_data": "ImageFolder root of the held-out split (same class folders as data)",
    "val_split": "share of data held out for validation when val_data is unset (stratified per class, 0: none)",
    "split_seed": "seed of the held-out split (digits and val_split)",
    "on_error": "unreadable images: 'raise' (stop, naming the file) or 'skip' (check every file first, drop bad ones)",
    "workers": "threads decoding and augmenting images (results do not depend on it)",
    "progress": "tqdm progress bars: null = where a person watches (a terminal or notebook; not under CI=true, only MPI rank 0), true = always, false = never",
    "precision": "matrix products in 'fp32' or 'bf16' (null: fp32, or a resumed run's stored precision)",
    "tensorboard": "also write TensorBoard event files (needs tensorboardX or torch); checkpoints/log.csv is always written",
    "seed": "seed of initialisation, data order, masks and augmentation",
    "method": "pre-training method: mapet, pim, mim (BEiT), ccvit or dtm",
    "model.size": "ViT size: tiny, small or base (embed_dim/depth/num_heads defaults)",
    "model.img_size": "image side in pixels",
    "model.patch_size": "patch side in pixels",
    "model.embed_dim": "token width",
    "model.depth": "transformer blocks",
    "model.num_heads": "attention heads",
    "tokenizer.n_tokens": "k-means centroids = visual-token vocabulary",
    "tokenizer.n_iter": "k-means iterations",
    "tokenizer.path": "an existing PixelTokenizer file to use instead of fitting one",
    "tokenizer.kind": "'pixel' (CCViT centroids of patch pixels) or 'kclip' (k-means on CLIP patch features; needs clip)",
    "tokenizer.sample_fraction": "kclip: share of each batch's patch features kept for k-means",
    "clip": "kclip: CLIP ViT weights with QuickGELU (.safetensors, OpenAI/open_clip layout); its patch grid must match the model's",
    "tokenizer.fit_images": "images (a seeded sample of data) the tokenizer is fitted on",
    "tokens": "a token cache directory (from 'tokenize'); unset: tokenize first",
    "least_number": "MaPeT/PIM context tokens (class token included); unset: 50/196 of the patches",
    "num_masking_patches": "MIM/CCViT/DTM block-masked patches per image; unset: 75/196 of the patches",
    "epochs": "passes over the training data",
    "batch_size": "images per step (per rank under mpiexec)",
    "lr": "peak learning rate (AdamW; SGD for the linear probe)",
    "weight_decay": "AdamW weight decay (not on norms, biases, tokens, pos_embed)",
    "warmup_epochs": "linear warm-up from warmup_start_lr before the cosine decay",
    "warmup_start_lr": "learning rate at the first step",
    "min_lr": "learning rate at the end of the cosine decay",
    "clip_grad": "global gradient-norm clip (null: off)",
    "accum_steps": "micro-batches per optimizer step",
    "checkpoint_every": "also checkpoint every N optimizer steps (0: at epoch ends only)",
    "init_values": "LayerScale init (null: no LayerScale); transfer: unset takes the checkpoint's",
    "drop_path_rate": "stochastic depth rate of the last block",
    "ccvit.num_replace": "CCViT: visible patches replaced by their centroid (unset: 20/196 of the patches)",
    "ccvit.token_weight": "CCViT: weight of the centroid-id loss",
    "ccvit.pixel_weight": "CCViT: weight of the pixel loss",
    "ccvit.early_layers": "CCViT: block whose patch tokens feed the pixel head (unset: 3/4 of depth)",
    "ccvit.head_layers": "CCViT: blocks of the pixel head",
    "dtm.teacher": "DTM: a model file whose trunk gives target features, a CLIP ViT .safetensors, or a .npy of precomputed features",
    "pretrained": "a pre-trained model file; its architecture (LayerScale included) is used for unset model keys",
    "layer_decay": "layer-wise learning-rate decay (1: off)",
    "label_smoothing": "cross-entropy label smoothing",
    "global_pool": "'avg' (mean of patch tokens, fc_norm) or 'token' (class token)",
    "augment": "fine-tuning view of ImageFolder data: 'crop_flip' (RandomResizedCrop 0.08-1 + flip), 'randaugment' "
               "(the same + RandAugment rand-m9-mstd0.5-inc1, the BEiT/MaPeT recipe) or 'none' (evaluation view)",
    "mixup": "Mixup's Beta alpha per batch (0: off; the BEiT/MaPeT recipe: 0.8); mixed batches train on soft targets",
    "cutmix": "CutMix's Beta alpha per batch (0: off; the BEiT/MaPeT recipe: 1.0)",
    "mixup_prob": "probability that a batch is mixed (when mixup or cutmix is on)",
    "mixup_switch_prob": "probability of CutMix rather than Mixup when both are on",
    "mean": "per-channel mean of the input normalisation (x - mean) / std of pixels in [0, 1], e.g. "
            "[0.485, 0.456, 0.406]; null: the checkpoint's (pixels in [0, 1] when it records none)",
    "std": "per-channel std of the input normalisation, e.g. [0.229, 0.224, 0.225]; null: the checkpoint's",
    "img_size": "image side the checkpoint expects; null: the checkpoint's (a different value is an error)",
    "validate_every_epoch": "evaluate val after every epoch and keep the best weights as best.safetensors",
    "pool": "linear probe features: 'avg' or 'token'",
    "checkpoint": "the model file to evaluate (model.safetensors of a finetune run)",
    "output_dir": "where outputs go (set with -o)",
    "methods": "demo: pre-training methods to compare, in order",
}


def _folder(cfg: Dict[str, Any], root: str, size: int, mode: str, randaugment: Optional[str] = None):
    from .data import ImageFolder
    return ImageFolder(root, size, mode=mode, seed=int(cfg.get("seed", 0)), on_error=cfg.get("on_error", "raise"),
                       randaugment=randaugment)


def _eval_view(folder):
    """The same files (skipped ones included) seen through the evaluation view."""
    view = copy.copy(folder)
    view.mode = "eval"
    return view


def _datasets(cfg: Dict[str, Any], size: int, mode: str = "eval", need_val: bool = True,
              what: str = "this command", randaugment: Optional[str] = None) -> Tuple[Any, Any, List[str]]:
    """(train dataset, held-out dataset or None, class names) of the configured data at ``size``
    pixels; ImageFolder data is streamed (``mode`` is the training view: eval, pretrain, finetune)."""
    from .data import ArrayDataset, check_same_classes, load_digits, split_dataset

    if cfg.get("on_error", "raise") not in ("raise", "skip"):
        raise ValueError(f"config: on_error must be 'raise' or 'skip', got {cfg['on_error']!r}")
    source = cfg.get("data")
    if source is None:
        raise ValueError(f"config: {what} needs data: 'digits' or an ImageFolder root (--set data=PATH)")
    if source == "digits":
        if cfg.get("val_data"):
            raise ValueError("config: val_data is for ImageFolder data; the digits come with their test split")
        seed = int(cfg.get("split_seed", 0))
        train = ArrayDataset(*load_digits(size, "train", seed=seed))
        val = ArrayDataset(*load_digits(size, "test", seed=seed)) if need_val else None
        return train, val, [str(c) for c in range(10)]
    if not os.path.isdir(str(source)):
        raise ValueError(f"config: data {source!r} is neither 'digits' nor a directory")
    full = _folder(cfg, source, size, mode, randaugment)
    classes = list(full.classes)
    val = None
    if cfg.get("val_data"):
        val = _folder(cfg, cfg["val_data"], size, "eval")
        check_same_classes(classes, val.classes, "val_data")
        train = full
    elif float(cfg.get("val_split") or 0) > 0:
        train, _ = split_dataset(full, float(cfg["val_split"]), int(cfg.get("split_seed", 0)))
        _, val = split_dataset(_eval_view(full), float(cfg["val_split"]), int(cfg.get("split_seed", 0)))
    else:
        train = full
    if need_val and val is None:
        raise ValueError(f"config: {what} needs held-out data: set val_data=ROOT (an ImageFolder with the same "
                         "class folders) or val_split=0.1 (a stratified share of data)")
    return train, val, classes


def _out(cfg: Dict[str, Any], *parts: str) -> str:
    base = cfg.get("output_dir") or "mapet-output"
    path = os.path.join(base, *parts)
    os.makedirs(os.path.dirname(path) if os.path.splitext(path)[1] else path, exist_ok=True)
    return path


def _model_keys(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The configured model keys that are set (not None), without ``size``."""
    return {k: v for k, v in cfg["model"].items() if k != "size" and v is not None}


def _size(cfg: Dict[str, Any]) -> str:
    return cfg["model"].get("size") or _MODEL["size"]


def _transfer_model(cfg: Dict[str, Any]) -> Tuple[Dict[str, Any], int]:
    """(model overrides, image size) for a transfer command: explicit keys, else the pre-trained
    checkpoint's architecture (``create_model`` reads it), else the built-in defaults."""
    keys = _model_keys(cfg)
    if cfg.get("init_values", None) is not None:
        keys["init_values"] = cfg["init_values"]
    if cfg.get("pretrained"):
        from .models import read_pretrained, trunk_config
        if not os.path.exists(str(cfg["pretrained"])):
            raise ValueError(f"config: pretrained {cfg['pretrained']!r} does not exist")
        trunk = trunk_config(*read_pretrained(cfg["pretrained"]))
        size = int(keys.get("img_size", trunk.get("img_size", _MODEL["img_size"])))
        return keys, size
    for k, v in _MODEL.items():
        if k != "size":
            keys.setdefault(k, v)
    keys.setdefault("init_values", 0.1)
    return keys, int(keys["img_size"])


# ------------------------------------------------------------------ tokenize

def _view_id(dataset) -> Optional[str]:
    view = getattr(dataset, "view_id", None)
    return f"{view}:n={len(dataset)}" if view else None


def tokenize_dataset(cfg: Dict[str, Any]) -> str:
    """Fit (or load) a PixelTokenizer on a seeded sample of the training images and stream the
    tokens of every training image into a token cache; returns the cache dir."""
    from .data import DataLoader, Subset, TokenCache
    from .tokenizers import PixelTokenizer

    if cfg["tokenizer"].get("kind", "pixel") == "kclip":  # k-CLIP through a CLIP tower (mapet.clip)
        from .clip.kclip import tokenize_dataset_kclip
        return tokenize_dataset_kclip(cfg)
    size = int(cfg["model"]["img_size"])
    train, _, _ = _datasets(cfg, size, "pretrain", need_val=False, what="tokenize")
    workers = int(cfg.get("workers", 0))
    tok_cfg = cfg["tokenizer"]
    path = tok_cfg.get("path")
    if path and os.path.exists(path):
        tokenizer = PixelTokenizer.load(path)
    else:
        n, cap = len(train), int(tok_cfg.get("fit_images") or 4096)
        rows = np.arange(n) if n <= cap else np.sort(np.random.default_rng(int(cfg.get("seed", 0))).choice(n, cap, replace=False))
        sample = Subset(train, rows)
        loader = DataLoader(sample, 256, shuffle=False, prefetch=1, workers=workers)
        images = np.concatenate([np.asarray(b[0], np.float32) for b in loader])
        loader.close()
        tokenizer = PixelTokenizer(patch_size=int(cfg["model"]["patch_size"]), n_tokens=int(tok_cfg["n_tokens"]),
                                   n_iter=int(tok_cfg.get("n_iter", 20)), seed=int(cfg.get("seed", 0)),
                                   progress=cfg.get("progress"))
        tokenizer.fit(images)
        del images
        if _is_main():
            tokenizer.save(_out(cfg, "tokenizer.safetensors"))
    cache = _out(cfg, "tokens")
    grid = size // int(cfg["model"]["patch_size"])
    if _is_main():  # every rank fitted the same tokenizer (same seed); one encodes and writes
        writer = TokenCache.create(cache, len(train), grid * grid, tokenizer.n_tokens, tokenizer,
                                   dataset=_view_id(train), grid=(grid, grid))
        loader = DataLoader(train, 256, shuffle=False, prefetch=1, workers=workers)
        start = 0
        for batch in loader:
            tokens = tokenizer.encode(np.asarray(batch[0], np.float32))
            writer.write(start, tokens)
            start += tokens.shape[0]
        loader.close()
        writer.close()
    distributed.context().barrier()
    log.info("tokenized %d images into %s", len(train), cache)
    return cache


TOKENIZE_DEFAULTS = dict(_DATA, seed=0, model=dict(_MODEL), clip=None,
                         tokenizer={"kind": "pixel", "n_tokens": 256, "n_iter": 20, "path": None, "fit_images": 4096,
                                    "sample_fraction": 0.1})


@command("tokenize", "fit a tokenizer (CCViT pixels, or k-CLIP: tokenizer=kclip clip=FILE) and cache the visual tokens of a dataset",
         defaults=TOKENIZE_DEFAULTS, options=OPTIONS)
def _tokenize(args, cfg) -> int:
    cache = tokenize_dataset(cfg)
    if _is_main():
        print(cache)
    return 0


# ------------------------------------------------------------------ pretrain

PRETRAIN_DEFAULTS = dict(
    _DATA, **_LOGS, seed=0, method="mapet", model=dict(_MODEL),
    tokenizer={"kind": "pixel", "n_tokens": 256, "n_iter": 20, "path": None, "fit_images": 4096,
               "sample_fraction": 0.1}, clip=None, tokens=None,
    least_number=None, num_masking_patches=None, epochs=10, batch_size=64, lr=1.5e-3, weight_decay=0.05,
    warmup_epochs=1, warmup_start_lr=1e-6, min_lr=1e-5, clip_grad=3.0, accum_steps=1, checkpoint_every=0,
    init_values=0.1, drop_path_rate=0.1,
    ccvit={"num_replace": None, "token_weight": 1.0, "pixel_weight": 1.0, "early_layers": None, "head_layers": 2},
    dtm={"teacher": None}, precision=None,
)


def _tokenizer_file(cfg: Dict[str, Any], cache_dir: str) -> str:
    """The PixelTokenizer file behind a token cache: ``tokenizer.path``, else next to the cache."""
    path = cfg["tokenizer"].get("path") or os.path.join(os.path.dirname(os.path.abspath(cache_dir)),
                                                        "tokenizer.safetensors")
    if not os.path.exists(path):
        raise ValueError(f"config: method ccvit needs the pixel tokenizer of the token cache {cache_dir} "
                         f"(set tokenizer.path); {path} does not exist")
    return path


def _check_method_keys(cfg: Dict[str, Any], method: str) -> None:
    """Options another method reads are an error rather than silently unused."""
    unused = []
    if method in ("mapet", "pim") and cfg.get("num_masking_patches") is not None:
        unused.append("num_masking_patches (MaPeT/PIM predict all but least_number tokens: set least_number)")
    if method not in ("mapet", "pim") and cfg.get("least_number") is not None:
        unused.append("least_number (MaPeT/PIM only; the masked methods use num_masking_patches)")
    for section in ("ccvit", "dtm"):
        if method != section and cfg.get(section) != PRETRAIN_DEFAULTS[section]:
            unused.append(f"{section}.* (method {section} only)")
    if unused:
        raise ValueError(f"config: method {method} does not use {'; '.join(unused)}")


def run_pretrain(cfg: Dict[str, Any]):
    """Pre-train per ``cfg``; returns (model, history). Writes checkpoints and ``model.safetensors``."""
    from .data import TokenCache
    from .train import _first_images, _check_method, pretrain

    method = _check_method(str(cfg["method"]))
    size = int(cfg["model"]["img_size"])
    train, _, _ = _datasets(cfg, size, "pretrain", need_val=False, what="pretrain")
    kind = "beit" if method == "mim" else method
    _check_method_keys(cfg, method)
    overrides = dict(_model_keys(cfg), init_values=cfg["init_values"], drop_path_rate=cfg["drop_path_rate"])
    extra: Dict[str, Any] = {}
    data = train
    if kind == "dtm":
        teacher = cfg.get("dtm", {}).get("teacher")
        if not teacher:
            raise ValueError("config: method dtm needs dtm.teacher, the path of a model file whose trunk gives "
                             "the target features (e.g. a pre-trained mapet model.safetensors), or of a .npy "
                             "file of precomputed features [images, patches (+1), d]")
        if not os.path.exists(str(teacher)):
            raise ValueError(f"config: dtm.teacher {teacher!r} does not exist")
        if str(teacher).endswith(".npy"):
            extra["teacher"] = np.load(teacher, mmap_mode="r")
            overrides["output_dim"] = int(extra["teacher"].shape[-1])
        else:
            from .train import teacher_features
            extra["teacher"] = teacher_features(teacher)
            overrides["output_dim"] = int(np.asarray(extra["teacher"](_first_images(train))).shape[-1])
    else:
        cache_dir = cfg.get("tokens") or tokenize_dataset(cfg)
        cache = TokenCache.open(cache_dir, length=len(train), dataset=_view_id(train))
        data = cache.attach(train)
        overrides["num_tokens"] = cache.n_tokens
    if kind in ("mapet", "pim") and cfg.get("least_number") is not None:
        overrides["least_number"] = int(cfg["least_number"])
    if kind == "ccvit":
        c = cfg.get("ccvit", {})
        extra.update(tokenizer=_tokenizer_file(cfg, cache_dir), num_replace=c.get("num_replace"),
                     token_weight=float(c.get("token_weight", 1.0)), pixel_weight=float(c.get("pixel_weight", 1.0)))
        if c.get("early_layers") is not None:
            overrides["early_layers"] = int(c["early_layers"])
        overrides["head_layers"] = int(c.get("head_layers", 2))
    from .models import create_model
    model = create_model(f"{kind}_{_size(cfg)}_patch16_224", seed=int(cfg["seed"]), **overrides)
    model, history = pretrain(method, model=model, data=data, epochs=int(cfg["epochs"]),
                              batch_size=int(cfg["batch_size"]), lr=float(cfg["lr"]),
                              weight_decay=float(cfg["weight_decay"]), warmup_epochs=float(cfg["warmup_epochs"]),
                              min_lr=float(cfg["min_lr"]), warmup_start_lr=float(cfg.get("warmup_start_lr", 1e-6)),
                              clip_grad=cfg["clip_grad"], accum_steps=int(cfg["accum_steps"]), seed=int(cfg["seed"]),
                              num_masking_patches=cfg.get("num_masking_patches"),
                              output_dir=_out(cfg, "checkpoints"), checkpoint_every=int(cfg["checkpoint_every"]),
                              progress=cfg.get("progress"), workers=int(cfg.get("workers", 0)),
                              tensorboard=bool(cfg.get("tensorboard", False)),
                              precision=cfg.get("precision"), **extra)
    if _is_main():
        from .data.data_config import IDENTITY
        model.data_config = IDENTITY  # pre-training sees pixels in [0, 1]: transfers must too
        model.save(_out(cfg, "model.safetensors"))
    return model, history


@command("pretrain", "pre-train a ViT with MaPeT, PIM, MIM or CCViT on cached visual tokens, or DTM from a "
                     "teacher model", defaults=PRETRAIN_DEFAULTS, options=OPTIONS)
def _pretrain(args, cfg) -> int:
    _, history = run_pretrain(cfg)
    _emit({"final_loss": history["loss"][-1], "steps": len(history["loss"])})
    return 0


# ------------------------------------------------------------------ transfer

#: Fine-tuning views of ImageFolder data: name → (ImageFolder mode, RandAugment spec).
AUGMENT = {"none": ("eval", None), "crop_flip": ("finetune", None),
           "randaugment": ("finetune", "rand-m9-mstd0.5-inc1")}

FINETUNE_DEFAULTS = dict(
    _DATA, **_LOGS, seed=0, model=dict(_MODEL_FROM_CHECKPOINT), pretrained=None, epochs=10, batch_size=64,
    lr=1e-3, weight_decay=0.05, layer_decay=0.75, warmup_epochs=1, warmup_start_lr=1e-6, min_lr=1e-6,
    label_smoothing=0.1, drop_path_rate=0.1, global_pool="avg", checkpoint_every=0, init_values=None,
    augment="crop_flip", validate_every_epoch=True, precision=None, mean=None, std=None,
    mixup=0.0, cutmix=0.0, mixup_prob=1.0, mixup_switch_prob=0.5,
)


def _write_eval_outputs(cfg: Dict[str, Any], metrics: Dict[str, Any], classes: List[str], name: str) -> None:
    """``<name>.json`` (top-1/top-5/loss and per-class accuracy by class name) and the confusion
    matrix as ``<name>-confusion.csv`` (rows: true class, columns: predicted) and as a figure,
    ``<name>-confusion.png``."""
    if not cfg.get("output_dir") or not _is_main():
        return
    per_class = {c: (None if np.isnan(a) else a) for c, a in zip(classes, metrics["per_class"])}
    with open(_out(cfg, f"{name}.json"), "w") as f:
        json.dump({"top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"],
                   "per_class_top1": per_class}, f, indent=2)
    with open(_out(cfg, f"{name}-confusion.csv"), "w") as f:
        f.write("true\\predicted," + ",".join(classes) + "\n")
        for c, row in zip(classes, metrics["confusion"]):
            f.write(c + "," + ",".join(str(int(v)) for v in row) + "\n")
    from . import viz
    viz.plot_confusion(metrics["confusion"], classes, title=f"Confusion matrix ({name})",
                       path=_out(cfg, f"{name}-confusion.png"))


def run_finetune(cfg: Dict[str, Any]):
    """Fine-tune per ``cfg``; returns (model, history, val metrics)."""
    from .models import create_model
    from .train import evaluate, finetune

    keys, size = _transfer_model(cfg)
    from .data.data_config import normalized, resolve
    _, norm = resolve(cfg.get("pretrained"), keys.get("img_size"), cfg.get("mean"), cfg.get("std"),
                      "the pre-trained checkpoint")
    augment = cfg.get("augment", "crop_flip")
    if augment not in AUGMENT:
        raise ValueError(f"config: augment must be one of {', '.join(AUGMENT)}, got {augment!r}")
    mode, rand = AUGMENT[augment]
    train, val, classes = _datasets(cfg, size, mode, what="finetune", randaugment=rand)
    train, val = normalized(train, norm), normalized(val, norm)
    model = create_model(f"vit_{_size(cfg)}_patch16_224", seed=int(cfg["seed"]), num_classes=len(classes),
                         pretrained=cfg.get("pretrained"), drop_path_rate=cfg["drop_path_rate"],
                         global_pool=cfg["global_pool"], **keys)
    model.data_config = norm  # recorded in model.safetensors / best.safetensors for eval and predict
    out = _out(cfg, "checkpoints")
    model, history = finetune(model, train, val=val, epochs=int(cfg["epochs"]), batch_size=int(cfg["batch_size"]),
                              lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]),
                              layer_decay=cfg["layer_decay"], warmup_epochs=float(cfg["warmup_epochs"]),
                              warmup_start_lr=float(cfg.get("warmup_start_lr", 1e-6)),
                              min_lr=float(cfg["min_lr"]), label_smoothing=float(cfg["label_smoothing"]),
                              seed=int(cfg["seed"]), output_dir=out, checkpoint_every=int(cfg["checkpoint_every"]),
                              progress=cfg.get("progress"), workers=int(cfg.get("workers", 0)),
                              validate_every_epoch=bool(cfg.get("validate_every_epoch", True)),
                              tensorboard=bool(cfg.get("tensorboard", False)), precision=cfg.get("precision"),
                              mixup=float(cfg["mixup"]), cutmix=float(cfg["cutmix"]),
                              mixup_prob=float(cfg["mixup_prob"]), mixup_switch_prob=float(cfg["mixup_switch_prob"]))
    if _is_main():
        model.save(_out(cfg, "model.safetensors"))
        with open(_out(cfg, "classes.json"), "w") as f:
            json.dump(classes, f)
    metrics = evaluate(model, val, workers=int(cfg.get("workers", 0)), confusion=True)
    _write_eval_outputs(cfg, metrics, classes, "val")
    return model, history, metrics


def _summary(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {k: metrics[k] for k in ("top1", "top5", "loss")}


@command("finetune", "fine-tune a ViT classifier (optionally from a pre-trained checkpoint)",
         defaults=FINETUNE_DEFAULTS, options=OPTIONS)
def _finetune(args, cfg) -> int:
    _, history, metrics = run_finetune(cfg)
    result = _summary(metrics)
    if history.get("best_val_top1") is not None:
        result["best_val_top1"] = history["best_val_top1"]
    _emit(result)
    return 0


LINPROBE_DEFAULTS = dict(_DATA, seed=0, model=dict(_MODEL_FROM_CHECKPOINT), pretrained=None, epochs=100,
                         lr=0.1, pool="avg", init_values=None, precision=None, mean=None, std=None)


def run_linprobe(cfg: Dict[str, Any]) -> Dict[str, float]:
    """Linear probe of a (pre-trained) backbone per ``cfg``."""
    from .models import create_model
    from .train import linear_probe

    keys, size = _transfer_model(cfg)
    from .data.data_config import normalized, resolve
    _, norm = resolve(cfg.get("pretrained"), keys.get("img_size"), cfg.get("mean"), cfg.get("std"),
                      "the pre-trained checkpoint")
    train, val, classes = _datasets(cfg, size, "eval", what="linprobe")
    train, val = normalized(train, norm), normalized(val, norm)
    model = create_model(f"vit_{_size(cfg)}_patch16_224", seed=int(cfg["seed"]), num_classes=len(classes),
                         pretrained=cfg.get("pretrained"), **keys)
    return linear_probe(model, train, val, epochs=int(cfg["epochs"]), lr=float(cfg["lr"]), pool=cfg["pool"],
                        seed=int(cfg["seed"]), workers=int(cfg.get("workers", 0)),
                        precision=cfg.get("precision"))


@command("linprobe", "linear probe: a linear classifier on frozen features", defaults=LINPROBE_DEFAULTS,
         options=OPTIONS)
def _linprobe(args, cfg) -> int:
    _emit(run_linprobe(cfg))
    return 0


EVAL_DEFAULTS = {"data": None, "split_seed": 0, "on_error": "raise", "workers": 2, "checkpoint": None,
                 "precision": None, "img_size": None, "mean": None, "std": None}


def run_eval(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Evaluate a saved classifier on ``data`` (digits: their test split; a folder: all of it) at
    the checkpoint's image size; class folders must match those it was fine-tuned on."""
    from .data import check_same_classes, load_digits
    from .models import VisionTransformer, load
    from .train import evaluate

    if not cfg.get("checkpoint"):
        raise ValueError("config: eval needs checkpoint=PATH (a model.safetensors of a finetune run)")
    if cfg.get("data") is None:
        raise ValueError("config: eval needs data=digits or data=ROOT (an ImageFolder of held-out images)")
    if not os.path.exists(str(cfg["checkpoint"])):
        raise ValueError(f"config: checkpoint {cfg['checkpoint']!r} does not exist")
    model = load(cfg["checkpoint"])
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"config: checkpoint {cfg['checkpoint']} is a pre-training model, not a classifier; "
                         "fine-tune it first (python -m mapet finetune --set pretrained=...)")
    from .data.data_config import normalized, resolve
    _, norm = resolve(cfg["checkpoint"], cfg.get("img_size"), cfg.get("mean"), cfg.get("std"))
    size, num_classes = int(model.config["img_size"]), int(model.config["num_classes"])
    if cfg["data"] == "digits":
        from .data import ArrayDataset
        data = ArrayDataset(*load_digits(size, "test", seed=int(cfg.get("split_seed", 0))))
        classes = [str(c) for c in range(10)]
    else:
        if not os.path.isdir(str(cfg["data"])):
            raise ValueError(f"config: data {cfg['data']!r} is neither 'digits' nor a directory")
        data = _folder(cfg, cfg["data"], size, "eval")
        classes = list(data.classes)
    saved = os.path.join(os.path.dirname(os.path.abspath(cfg["checkpoint"])), "classes.json")
    if os.path.exists(saved):
        with open(saved) as f:
            check_same_classes(json.load(f), classes, "data")
    elif len(classes) != num_classes:
        raise ValueError(f"data: {len(classes)} classes, but the checkpoint classifies {num_classes}")
    data = normalized(data, norm)
    metrics = evaluate(model, data, workers=int(cfg.get("workers", 0)), confusion=True,
                       precision=cfg.get("precision"))
    _write_eval_outputs(cfg, metrics, classes, "eval")
    return metrics


@command("eval", "top-1/top-5 accuracy of a saved classifier on held-out data (image size from the checkpoint)",
         defaults=EVAL_DEFAULTS, options=OPTIONS)
def _eval(args, cfg) -> int:
    _emit(_summary(run_eval(cfg)))
    return 0

"""The subcommands of ``python -m mapet``: tokenize, pretrain, finetune, linprobe, eval, demo.

Each command reads its options from the resolved config (defaults below, refined by ``-c FILE``
and ``--set key=value``) and writes its outputs under ``-o/--output-dir``. ``precision`` ("fp32"
or "bf16", ``--set precision=bf16``) sets the models' matrix-product precision; left at null, a
run is fp32 and a resumed run keeps the precision stored in its checkpoint. Data is either the
built-in digits (``data: digits``) or an ImageFolder root (``data: /path/to/train``, with
``val_data`` for the held-out split).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Tuple

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


def _load_split(cfg: Dict[str, Any], split: str) -> Tuple[np.ndarray, np.ndarray]:
    """(images, labels) of the configured dataset."""
    from .data import ImageFolder, load_digits

    source = cfg.get("data", "digits")
    size = int(cfg["model"]["img_size"])
    if source == "digits":
        return load_digits(size, split, seed=int(cfg.get("split_seed", 0)))
    root = source if split == "train" else cfg.get("val_data")
    if root is None:
        raise ValueError(f"config: 'val_data' (an ImageFolder root) is needed for the {split} split")
    folder = ImageFolder(root, size, mode="eval")
    images = np.stack([folder[i][0] for i in range(len(folder))]).astype(np.float32)
    return images, np.asarray(folder.targets, dtype=np.int64)


def _overrides(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in cfg["model"].items() if k != "size"}


def _out(cfg: Dict[str, Any], *parts: str) -> str:
    base = cfg.get("output_dir") or "mapet-output"
    path = os.path.join(base, *parts)
    os.makedirs(os.path.dirname(path) if os.path.splitext(path)[1] else path, exist_ok=True)
    return path


# ------------------------------------------------------------------ tokenize

def tokenize_dataset(cfg: Dict[str, Any]) -> str:
    """Fit (or load) a PixelTokenizer and cache the tokens of the training images; returns the cache dir."""
    from .data import TokenCache
    from .tokenizers import PixelTokenizer

    images, _ = _load_split(cfg, "train")
    tok_cfg = cfg["tokenizer"]
    path = tok_cfg.get("path")
    if path and os.path.exists(path):
        tokenizer = PixelTokenizer.load(path)
    else:
        tokenizer = PixelTokenizer(patch_size=int(cfg["model"]["patch_size"]), n_tokens=int(tok_cfg["n_tokens"]),
                                   n_iter=int(tok_cfg.get("n_iter", 20)), seed=int(cfg.get("seed", 0)))
        tokenizer.fit(images)
        if _is_main():
            tokenizer.save(_out(cfg, "tokenizer.safetensors"))
    tokens = tokenizer.encode(images)
    cache = _out(cfg, "tokens")
    grid = int(cfg["model"]["img_size"]) // int(cfg["model"]["patch_size"])
    if _is_main():  # every rank computed the same tokens (same seed); one writes them
        TokenCache.write(cache, tokens, n_tokens=tokenizer.n_tokens, tokenizer=tokenizer, grid=(grid, grid))
    distributed.context().barrier()
    log.info("tokenized %d images into %s", len(images), cache)
    return cache


TOKENIZE_DEFAULTS = {"data": "digits", "seed": 0, "model": dict(_MODEL),
                     "tokenizer": {"n_tokens": 256, "n_iter": 20, "path": None}}


@command("tokenize", "fit the CCViT pixel tokenizer and cache the visual tokens of a dataset",
         defaults=TOKENIZE_DEFAULTS)
def _tokenize(args, cfg) -> int:
    cache = tokenize_dataset(cfg)
    if _is_main():
        print(cache)
    return 0


# ------------------------------------------------------------------ pretrain

PRETRAIN_DEFAULTS = {
    "data": "digits", "seed": 0, "method": "mapet", "model": dict(_MODEL),
    "tokenizer": {"n_tokens": 256, "n_iter": 20, "path": None}, "tokens": None,
    "least_number": 16, "epochs": 10, "batch_size": 64, "lr": 1.5e-3, "weight_decay": 0.05,
    "warmup_epochs": 1, "min_lr": 1e-5, "clip_grad": 3.0, "accum_steps": 1, "checkpoint_every": 0,
    "init_values": 0.1, "drop_path_rate": 0.1,
    "ccvit": {"num_replace": None, "token_weight": 1.0, "pixel_weight": 1.0, "early_layers": None, "head_layers": 2},
    "dtm": {"teacher": None},
    "precision": None,
}


def _tokenizer_file(cfg: Dict[str, Any], cache_dir: str) -> str:
    """The PixelTokenizer file behind a token cache: ``tokenizer.path``, else next to the cache."""
    path = cfg["tokenizer"].get("path") or os.path.join(os.path.dirname(os.path.abspath(cache_dir)),
                                                        "tokenizer.safetensors")
    if not os.path.exists(path):
        raise ValueError(f"config: method ccvit needs the pixel tokenizer of the token cache {cache_dir} "
                         f"(set tokenizer.path); {path} does not exist")
    return path


def run_pretrain(cfg: Dict[str, Any]):
    """Pre-train per ``cfg``; returns (model, history). Writes checkpoints and ``model.safetensors``."""
    from .data import TokenCache
    from .train import pretrain

    images, _ = _load_split(cfg, "train")
    method = cfg["method"]
    kind = "beit" if method in ("mim", "beit") else method
    overrides = dict(_overrides(cfg), init_values=cfg["init_values"], drop_path_rate=cfg["drop_path_rate"])
    extra: Dict[str, Any] = {}
    tokens = None
    if kind == "dtm":
        teacher = cfg.get("dtm", {}).get("teacher")
        if not teacher:
            raise ValueError("config: method dtm needs dtm.teacher, the path of a model file whose trunk gives "
                             "the target features (e.g. a pre-trained mapet model.safetensors), or of a .npy "
                             "file of precomputed features [images, patches (+1), d]")
        if str(teacher).endswith(".npy"):
            extra["teacher"] = np.load(teacher, mmap_mode="r")
            overrides["output_dim"] = int(extra["teacher"].shape[-1])
        else:
            from .train import teacher_features
            extra["teacher"] = teacher_features(teacher)
            overrides["output_dim"] = int(np.asarray(extra["teacher"](images[:1])).shape[-1])
    else:
        cache_dir = cfg.get("tokens") or tokenize_dataset(cfg)
        tokens = np.asarray(TokenCache.open(cache_dir, length=len(images)).tokens)
        with open(os.path.join(cache_dir, "manifest.json")) as f:
            overrides["num_tokens"] = int(json.load(f)["n_tokens"])
    if kind in ("mapet", "pim"):
        overrides["least_number"] = int(cfg["least_number"])
    if kind == "ccvit":
        c = cfg.get("ccvit", {})
        extra.update(tokenizer=_tokenizer_file(cfg, cache_dir), num_replace=c.get("num_replace"),
                     token_weight=float(c.get("token_weight", 1.0)), pixel_weight=float(c.get("pixel_weight", 1.0)))
        if c.get("early_layers") is not None:
            overrides["early_layers"] = int(c["early_layers"])
        overrides["head_layers"] = int(c.get("head_layers", 2))
    from .models import create_model
    model = create_model(f"{kind}_{cfg['model']['size']}_patch16_224", seed=int(cfg["seed"]), **overrides)
    model, history = pretrain(method, model=model, data=images, tokens=tokens, epochs=int(cfg["epochs"]),
                              batch_size=int(cfg["batch_size"]), lr=float(cfg["lr"]),
                              weight_decay=float(cfg["weight_decay"]), warmup_epochs=float(cfg["warmup_epochs"]),
                              min_lr=float(cfg["min_lr"]), clip_grad=cfg["clip_grad"],
                              accum_steps=int(cfg["accum_steps"]), seed=int(cfg["seed"]),
                              output_dir=_out(cfg, "checkpoints"), checkpoint_every=int(cfg["checkpoint_every"]),
                              progress=bool(cfg.get("progress", True)), precision=cfg.get("precision"), **extra)
    if _is_main():
        model.save(_out(cfg, "model.safetensors"))
    return model, history


@command("pretrain", "pre-train a ViT with MaPeT, PIM, MIM or CCViT on cached visual tokens, or DTM from a "
                     "teacher model", defaults=PRETRAIN_DEFAULTS)
def _pretrain(args, cfg) -> int:
    _, history = run_pretrain(cfg)
    _emit({"final_loss": history["loss"][-1], "steps": len(history["loss"])})
    return 0


# ------------------------------------------------------------------ transfer

FINETUNE_DEFAULTS = {
    "data": "digits", "seed": 0, "model": dict(_MODEL), "pretrained": None, "epochs": 10, "batch_size": 64,
    "lr": 1e-3, "weight_decay": 0.05, "layer_decay": 0.75, "warmup_epochs": 1, "min_lr": 1e-6,
    "label_smoothing": 0.1, "drop_path_rate": 0.1, "global_pool": "avg", "checkpoint_every": 0,
    "init_values": 0.1, "precision": None,
}


def run_finetune(cfg: Dict[str, Any]):
    """Fine-tune per ``cfg``; returns (model, history, val metrics)."""
    from .models import create_model
    from .train import evaluate, finetune

    train = _load_split(cfg, "train")
    val = _load_split(cfg, "test")
    model = create_model(f"vit_{cfg['model']['size']}_patch16_224", seed=int(cfg["seed"]),
                         num_classes=int(train[1].max()) + 1, pretrained=cfg.get("pretrained"),
                         drop_path_rate=cfg["drop_path_rate"], global_pool=cfg["global_pool"],
                         init_values=cfg.get("init_values", 0.1), **_overrides(cfg))
    model, history = finetune(model, train, epochs=int(cfg["epochs"]), batch_size=int(cfg["batch_size"]),
                              lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]),
                              layer_decay=cfg["layer_decay"], warmup_epochs=float(cfg["warmup_epochs"]),
                              min_lr=float(cfg["min_lr"]), label_smoothing=float(cfg["label_smoothing"]),
                              seed=int(cfg["seed"]), output_dir=_out(cfg, "checkpoints"),
                              checkpoint_every=int(cfg["checkpoint_every"]),
                              progress=bool(cfg.get("progress", True)), precision=cfg.get("precision"))
    if _is_main():
        model.save(_out(cfg, "model.safetensors"))
    return model, history, evaluate(model, val)


@command("finetune", "fine-tune a ViT classifier (optionally from a pre-trained checkpoint)",
         defaults=FINETUNE_DEFAULTS)
def _finetune(args, cfg) -> int:
    _, _, metrics = run_finetune(cfg)
    _emit(metrics)
    return 0


LINPROBE_DEFAULTS = {"data": "digits", "seed": 0, "model": dict(_MODEL), "pretrained": None, "epochs": 100,
                     "lr": 0.1, "pool": "avg", "init_values": 0.1, "precision": None}


def run_linprobe(cfg: Dict[str, Any]) -> Dict[str, float]:
    """Linear probe of a (pre-trained) backbone per ``cfg``."""
    from .models import create_model
    from .train import linear_probe

    train, val = _load_split(cfg, "train"), _load_split(cfg, "test")
    model = create_model(f"vit_{cfg['model']['size']}_patch16_224", seed=int(cfg["seed"]), num_classes=int(train[1].max()) + 1,
                         pretrained=cfg.get("pretrained"), init_values=cfg.get("init_values", 0.1), **_overrides(cfg))
    return linear_probe(model, train, val, epochs=int(cfg["epochs"]), lr=float(cfg["lr"]), pool=cfg["pool"],
                        seed=int(cfg["seed"]), precision=cfg.get("precision"))


@command("linprobe", "linear probe: a linear classifier on frozen features", defaults=LINPROBE_DEFAULTS)
def _linprobe(args, cfg) -> int:
    _emit(run_linprobe(cfg))
    return 0


EVAL_DEFAULTS = {"data": "digits", "model": dict(_MODEL), "checkpoint": None, "precision": None}


@command("eval", "top-1 accuracy of a saved classifier on the held-out split", defaults=EVAL_DEFAULTS)
def _eval(args, cfg) -> int:
    from .models import load
    from .train import evaluate

    if not cfg.get("checkpoint"):
        raise SystemExit("python -m mapet eval: set --set checkpoint=PATH (a model.safetensors)")
    _emit(evaluate(load(cfg["checkpoint"]), _load_split(cfg, "test"), precision=cfg.get("precision")))
    return 0

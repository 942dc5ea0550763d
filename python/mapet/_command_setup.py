"""What the ``python -m mapet`` commands share: the data and model options, their meanings
(``--list-options``), building the datasets a config names, and tokenizing them into a cache."""
from __future__ import annotations

import copy
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import distributed

log = logging.getLogger("mapet.commands")


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
    "method": "pre-training method: mapet, pim, beit (alias mim), ccvit or dtm (the registry's methods)",
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

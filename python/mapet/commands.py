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

import json
import logging
import os
from typing import Any, Dict, List

import numpy as np

from . import distributed
from ._command_setup import (_DATA, _LOGS, _MODEL, _MODEL_FROM_CHECKPOINT, OPTIONS, _datasets,  # noqa: F401
                             _eval_view, _folder, _is_main, _model_keys, _out, _size, _transfer_model, _view_id,
                             tokenize_dataset)
from .cli import command
from ._pretrain_base import _DEFAULTS as MODEL_DEFAULTS
from .methods import CCVIT, PRETRAIN_RECIPE, Run
from .registry import SUFFIX, get_method, method_names

log = logging.getLogger(__name__)


def _emit(result: Any) -> None:
    """Print a command's JSON result (rank 0 only under mpiexec)."""
    if distributed.context().is_main:
        print(json.dumps(result))


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
    least_number=None, num_masking_patches=None, **PRETRAIN_RECIPE, checkpoint_every=0,
    init_values=MODEL_DEFAULTS["init_values"], drop_path_rate=MODEL_DEFAULTS["drop_path_rate"],
    # the method sections: each method's own options (the registry's), the CCViT model's pixel-head shape
    ccvit=dict({k: v for k, v in CCVIT.options.items() if k != "tokenizer"}, early_layers=None, head_layers=2),
    dtm={k: v for k, v in get_method("dtm").options.items()}, precision=None,
)


def _tokenizer_file(cfg: Dict[str, Any], cache_dir: str) -> str:
    """The PixelTokenizer file behind a token cache: ``tokenizer.path``, else next to the cache."""
    path = cfg["tokenizer"].get("path") or os.path.join(os.path.dirname(os.path.abspath(cache_dir)),
                                                        "tokenizer.safetensors")
    if not os.path.exists(path):
        raise ValueError(f"config: method ccvit needs the pixel tokenizer of the token cache {cache_dir} "
                         f"(set tokenizer.path); {path} does not exist")
    return path


_SHARED_KEYS = {"least_number": "the masked methods use num_masking_patches",
                "num_masking_patches": "MaPeT/PIM predict all but least_number tokens: set least_number"}


def _check_method_keys(cfg: Dict[str, Any], method: Any) -> None:
    """Options another method reads are an error rather than silently unused."""
    unused = [f"{key} ({why})" for key, why in _SHARED_KEYS.items()
              if key not in method.reads and cfg.get(key) is not None]
    for entry in map(get_method, method_names()):
        section = entry.section
        if section and section != method.section and cfg.get(section) != PRETRAIN_DEFAULTS[section]:
            unused.append(f"{section}.* (method {entry.name} only)")
    if unused:
        raise ValueError(f"config: method {cfg['method']} does not use {'; '.join(unused)}")


def _teacher(cfg: Dict[str, Any], train: Any) -> Any:
    """DTM's ``dtm.teacher``: precomputed features (a .npy file, memory-mapped) or a model file."""
    teacher = cfg.get("dtm", {}).get("teacher")
    if not teacher:
        raise ValueError("config: method dtm needs dtm.teacher, the path of a model file whose trunk gives "
                         "the target features (e.g. a pre-trained mapet model.safetensors), or of a .npy "
                         "file of precomputed features [images, patches (+1), d]")
    if not os.path.exists(str(teacher)):
        raise ValueError(f"config: dtm.teacher {teacher!r} does not exist")
    if str(teacher).endswith(".npy"):
        return np.load(teacher, mmap_mode="r")
    from .methods import teacher_features
    return teacher_features(teacher)


def run_pretrain(cfg: Dict[str, Any]):
    """Pre-train per ``cfg``; returns (model, history). Writes checkpoints and ``model.safetensors``."""
    from .data import TokenCache
    from .models import create_model
    from .train import pretrain

    method = get_method(str(cfg["method"]))
    size = int(cfg["model"]["img_size"])
    train, _, _ = _datasets(cfg, size, "pretrain", need_val=False, what="pretrain")
    _check_method_keys(cfg, method)
    overrides = dict(_model_keys(cfg), init_values=cfg["init_values"], drop_path_rate=cfg["drop_path_rate"])
    extra: Dict[str, Any] = {key: cfg[key] for key in method.reads if cfg.get(key) is not None}
    data = train
    if method.inputs == "teacher":
        extra["teacher"] = _teacher(cfg, train)
    else:
        cache_dir = cfg.get("tokens") or tokenize_dataset(cfg)
        cache = TokenCache.open(cache_dir, length=len(train), dataset=_view_id(train))
        data = cache.attach(train)
        overrides["num_tokens"] = cache.n_tokens
    if "least_number" in extra:
        overrides["least_number"] = int(extra.pop("least_number"))
    if method.name == "ccvit":
        c = cfg.get("ccvit", {})
        extra.update(tokenizer=_tokenizer_file(cfg, cache_dir), num_replace=c.get("num_replace"),
                     token_weight=float(c.get("token_weight", 1.0)), pixel_weight=float(c.get("pixel_weight", 1.0)))
        if c.get("early_layers") is not None:
            overrides["early_layers"] = int(c["early_layers"])
        overrides["head_layers"] = int(c.get("head_layers", 2))
    if method.model_config is not None:  # e.g. DTM's output_dim, the teacher's feature dimension
        overrides.update(method.model_config(Run(method, dict(extra), int(cfg["seed"])), train))
    model = create_model(f"{method.family}_{_size(cfg)}_{SUFFIX}", seed=int(cfg["seed"]), **overrides)
    model, history = pretrain(method.name, model=model, data=data, epochs=int(cfg["epochs"]),
                              batch_size=int(cfg["batch_size"]), lr=float(cfg["lr"]),
                              weight_decay=float(cfg["weight_decay"]), warmup_epochs=float(cfg["warmup_epochs"]),
                              min_lr=float(cfg["min_lr"]), warmup_start_lr=float(cfg.get("warmup_start_lr", 1e-6)),
                              clip_grad=cfg["clip_grad"], accum_steps=int(cfg["accum_steps"]), seed=int(cfg["seed"]),
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

"""Training runs: pre-training with any registered method, fine-tuning, and (re-exported from
:mod:`mapet.evaluation`) linear probing and evaluation.

The optimisation loop is :mod:`mapet.loop` (AdamW, warm-up + cosine, accumulation, clipping,
logging, atomic resumable checkpoints, data-parallel under ``mpiexec``); what one step of each
pre-training method draws and computes is its entry in :mod:`mapet.methods`
(:mod:`mapet.registry`).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import distributed
from .data import DataLoader
from .evaluation import _labels_of, evaluate, extract_features, linear_probe
from .loop import MetricsLog, _Loop, _make_optimizer
from .methods import PRETRAIN_RECIPE, Run, as_dataset, paired_dataset, teacher_features
from .registry import SUFFIX, get_method, method_names

__all__ = ["pretrain", "finetune", "linear_probe", "evaluate", "extract_features", "teacher_features",
           "MetricsLog", "PRETRAIN_METHODS"]

log = logging.getLogger(__name__)

#: The registered pre-training methods' canonical names ("mim" is an alias of "beit").
PRETRAIN_METHODS = method_names()

# ------------------------------------------------------------------ pre-training

def pretrain(method: str = "mapet", *, model: Any = "tiny", data: Any, tokens: Optional[np.ndarray] = None,
             epochs: int = PRETRAIN_RECIPE["epochs"], batch_size: int = PRETRAIN_RECIPE["batch_size"],
             lr: float = PRETRAIN_RECIPE["lr"], weight_decay: float = PRETRAIN_RECIPE["weight_decay"],
             warmup_epochs: float = PRETRAIN_RECIPE["warmup_epochs"], min_lr: float = PRETRAIN_RECIPE["min_lr"],
             warmup_start_lr: float = PRETRAIN_RECIPE["warmup_start_lr"], workers: int = 0,
             tensorboard: bool = False, clip_grad: Optional[float] = PRETRAIN_RECIPE["clip_grad"],
             accum_steps: int = PRETRAIN_RECIPE["accum_steps"], least_number: Optional[int] = None,
             num_masking_patches: Optional[int] = None, seed: int = 0, output_dir: Optional[str] = None,
             checkpoint_every: int = 0, log_every: int = 10, progress: Optional[bool] = None,
             stop_after: Optional[int] = None, tokenizer: Any = None, num_replace: Optional[int] = None,
             token_weight: float = 1.0, pixel_weight: float = 1.0, teacher: Any = None,
             precision: Optional[str] = None,
             **model_overrides) -> Tuple[Any, Dict[str, List[float]]]:
    """Pre-train a ViT with MaPeT, PIM, MIM (BEiT), CCViT or DTM.

    Args:
        method: a registered method (:mod:`mapet.methods`): "mapet", "pim", "beit" (alias "mim"),
            "ccvit" or "dtm".
        model: a model built by ``mapet.create_model`` for this method, or a size
            ("tiny" | "small" | "base") to build ``<method>_<size>_patch16_224`` with
            ``model_overrides`` (e.g. ``img_size=32, patch_size=4, depth=4``).
        data: images [n, 3, H, W] float32 in [0, 1], an (images, labels) tuple, or a dataset.
        tokens: visual tokens [n, num_patches] (any integer dtype), aligned with ``data``; when
            ``data`` is a dataset yielding (image, label, tokens) leave it None.
        epochs, batch_size, lr, weight_decay, warmup_epochs, min_lr, warmup_start_lr: the recipe
            (AdamW, linear warm-up then cosine; lr per optimizer step).
        workers: threads decoding images of a streaming dataset (e.g. ``ImageFolder``); results
            do not depend on it.
        tensorboard: with ``output_dir``, also write TensorBoard event files (``log.csv`` is
            always written there: step, epoch, loss, lr, images/s).
        clip_grad: global gradient-norm clip (None: off).
        accum_steps: micro-batches per optimizer step (effective batch = batch_size × accum_steps).
        least_number: MaPeT/PIM context size (default: the model's); num_masking_patches: MIM,
            CCViT and DTM block-mask size (default: 75/196 of the patches, rounded).
        seed: seeds the loader, the permutation sampler / mask generator / CCViT replacement /
            DTM schedules and the model's RNG.
        output_dir: where checkpoints go; a run with an existing ``last.safetensors`` resumes.
        stop_after: stop after this many optimizer steps in total (checkpointing first).
        progress: a tqdm bar with loss and img/s: None draws it in a terminal or notebook (not in
            CI, not on MPI ranks ≠ 0; :mod:`mapet.progress`), True always, False never.
        tokenizer: CCViT: the ``PixelTokenizer`` that made ``tokens`` (or its file, or its
            centroids [K, C·P·P]); the replaced patches take their centroid's pixels. With a
            ``PixelTokenizer`` and images in memory, ``tokens`` may be left out: they are encoded once.
        num_replace: CCViT: visible patches replaced per image (default 20/196 of the patches).
        token_weight, pixel_weight: CCViT loss weights (1 : 1).
        teacher: DTM: the frozen teacher (see :func:`teacher_features`), run on every batch; or
            its features precomputed once, an array [len(data), num_patches (+1), d] aligned with
            ``data`` (memory-mapped arrays work). ``tokens`` is unused. A model given by size gets
            ``output_dim`` from the teacher's feature dimension.
        precision: "fp32" or "bf16" for the model's matrix products (``model.precision``); None
            keeps the model's, or on resume the precision stored in the checkpoint.

    Returns:
        (model, history) with history {"loss": [...], "lr": [...]} per optimizer step.
    """
    from .models import create_model

    entry = get_method(method)
    method = entry.name
    given = {"least_number": least_number, "num_masking_patches": num_masking_patches, "tokenizer": tokenizer,
             "num_replace": num_replace, "token_weight": token_weight, "pixel_weight": pixel_weight,
             "teacher": teacher}
    run = Run(entry, {k: given[k] for k in (*entry.reads, *entry.options)}, seed)
    if isinstance(model, str):
        if entry.model_config is not None:
            for key, value in entry.model_config(run, data).items():
                model_overrides.setdefault(key, value)
        name = model if "_" in model else f"{entry.family}_{model}_{SUFFIX}"
        model = create_model(name, **model_overrides)
    if getattr(model, "_kind", None) != entry.family:
        raise ValueError(f"model: method {method!r} needs a {entry.family}_* model, got {type(model).__name__}"
                         f" ({getattr(model, '_kind', 'not a pre-training model')})")
    run.model = model
    dataset = (entry.prepare or paired_dataset)(run, data, tokens)
    loader = DataLoader(dataset, batch_size, shuffle=True, seed=seed, prefetch=1, workers=workers)
    step_fn = entry.wire(run)
    cfg, states = model.config, run.states
    optimizer = _make_optimizer(model, lr, weight_decay, clip_grad=clip_grad)
    loop = _Loop(model, optimizer, loader, step_fn, epochs=epochs, lr=lr, warmup_epochs=warmup_epochs,
                 min_lr=min_lr, warmup_start_lr=warmup_start_lr, accum_steps=accum_steps, output_dir=output_dir,
                 checkpoint_every=checkpoint_every, states=states, log_every=log_every, progress=progress,
                 desc=f"pretrain[{method}]", config={"method": method, "model": cfg}, seed=seed,
                 precision=precision, tensorboard=tensorboard)
    history = loop.run(stop_after=stop_after)
    return model, history


# ------------------------------------------------------------------ transfer

def finetune(model: Any, train: Any, *, val: Any = None, num_classes: Optional[int] = None,
             pretrained: Any = None, epochs: int = 10, batch_size: int = 64, lr: float = 1e-3,
             weight_decay: float = 0.05, layer_decay: Optional[float] = 0.75, warmup_epochs: float = 1.0,
             min_lr: float = 1e-6, warmup_start_lr: float = 1e-6, label_smoothing: float = 0.1,
             clip_grad: Optional[float] = None, accum_steps: int = 1, seed: int = 0,
             output_dir: Optional[str] = None, checkpoint_every: int = 0, log_every: int = 10,
             progress: Optional[bool] = None, stop_after: Optional[int] = None, precision: Optional[str] = None,
             workers: int = 0, validate_every_epoch: bool = False, tensorboard: bool = False,
             mixup: float = 0.0, cutmix: float = 0.0, mixup_prob: float = 1.0, mixup_switch_prob: float = 0.5,
             **model_overrides) -> Tuple[Any, Dict[str, List[float]]]:
    """Fine-tune a ViT classifier end to end (optionally from a pre-training checkpoint).

    Args:
        model: a ``mapet.create_model`` classifier, or a name such as ``"vit_tiny_patch16_224"``.
        train: (images, labels) or a dataset of (image, label).
        val: optional held-out (images, labels) or labelled dataset, evaluated after training
            (``history["val_top1"]``), or after every epoch with ``validate_every_epoch``: then
            ``history["val_top1"]`` has one entry per epoch, ``history["best_val_top1"]`` the best,
            and ``<output_dir>/best.safetensors`` (a ``mapet.load``-able model file) its weights.
        num_classes: classes (default: max label + 1 of ``train`` when given as arrays).
        pretrained: path or state_dict of a pre-trained model (matching keys are copied).
        layer_decay: BEiT layer-wise lr decay (None or 1.0: off); label_smoothing: CE smoothing.
        precision: "fp32" or "bf16" for the model's matrix products, training and the ``val``
            evaluation; None keeps the model's (on resume: the checkpoint's).
        workers: threads decoding images of a streaming dataset (``ImageFolder``).
        tensorboard: also write TensorBoard event files beside ``<output_dir>/log.csv``.
        mixup, cutmix, mixup_prob, mixup_switch_prob: per-batch Mixup / CutMix (timm's names;
            the BEiT/MaPeT recipe is 0.8, 1.0, 1.0, 0.5 = ``mapet.data.mixup.RECIPE``; 0, 0: off).
            Mixed batches train on soft targets with ``label_smoothing`` folded in; the draws
            follow (seed, epoch, batch), so resumed runs mix identically (:class:`mapet.data.mixup.Mixup`).
        Other arguments as in :func:`pretrain`.

    Returns:
        (model, history).
    """
    from .models import create_model

    dataset = as_dataset(train)
    if isinstance(model, str):
        if num_classes is None:
            num_classes = int(np.max(_labels_of(dataset))) + 1
        model = create_model(model, num_classes=num_classes, pretrained=pretrained, **model_overrides)
    loader = DataLoader(dataset, batch_size, shuffle=True, seed=seed, prefetch=1, workers=workers)
    from .data.mixup import make_mixup
    mixer = make_mixup(int(model.config["num_classes"]), mixup, cutmix, mixup_prob, mixup_switch_prob,
                       label_smoothing, seed)

    def step_fn(batch):
        images, labels = batch[0], batch[1]
        if mixer is not None:  # the loader has counted this batch: it is position - 1 of its epoch
            images, targets = mixer(images, labels, loader.epoch, loader.position - 1)
            return model.train_step(images, targets), images.shape[0]
        return model.train_step(images, labels, label_smoothing=label_smoothing), images.shape[0]

    optimizer = _make_optimizer(model, lr, weight_decay, clip_grad=clip_grad, layer_decay=layer_decay)
    loop: Optional[_Loop] = None

    def validate(epoch: int) -> None:
        # history lives in the checkpoint, so a resumed run keeps the earlier epochs' scores
        top1 = evaluate(model, val, workers=workers)["top1"]
        scores = loop.history.setdefault("val_top1", [])
        best = max(scores) if scores else -1.0
        scores.append(top1)
        log.info("finetune epoch %d: val top-1 %.4f (best %.4f)", epoch, top1, max(best, top1))
        if top1 > best and output_dir and distributed.context().is_main:
            model.save(os.path.join(output_dir, "best.safetensors"))

    every = validate_every_epoch and val is not None
    loop = _Loop(model, optimizer, loader, step_fn, epochs=epochs, lr=lr, warmup_epochs=warmup_epochs,
                 min_lr=min_lr, warmup_start_lr=warmup_start_lr, accum_steps=accum_steps, output_dir=output_dir,
                 checkpoint_every=checkpoint_every, log_every=log_every, progress=progress, desc="finetune",
                 config=dict({"model": model.config}, **({"mixup": mixer.config} if mixer else {})),
                 seed=seed, precision=precision,
                 epoch_end=validate if every else None, tensorboard=tensorboard)
    history = loop.run(stop_after=stop_after)
    if every:
        history["best_val_top1"] = max(history["val_top1"]) if history.get("val_top1") else None
    elif val is not None:
        history["val_top1"] = [evaluate(model, val, workers=workers)["top1"]]
    return model, history



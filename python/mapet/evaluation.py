"""Evaluation of trained models: frozen features, the linear probe, classification metrics.

Under ``mpiexec`` :func:`evaluate` gives every rank a contiguous share of the rows
(:func:`mapet.distributed.contiguous_shard`) and sums the counts, so every rank returns the metrics
of the whole set.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Optional

import numpy as np

from . import distributed
from .data import DataLoader
from .methods import _images_of


def _ordered_batches(data: Any, batch_size: int, workers: int = 0, rows: Optional[slice] = None):
    """(images, labels or None) in dataset order, ``batch_size`` at a time: arrays are sliced,
    datasets are streamed through a :class:`DataLoader` (bounded memory)."""
    if isinstance(data, (np.ndarray, tuple)):
        images = _images_of(data)
        labels = _labels_of(data) if isinstance(data, tuple) else None
        if rows is not None:
            images, labels = images[rows], (labels[rows] if labels is not None else None)
        for i in range(0, images.shape[0], batch_size):
            yield images[i:i + batch_size], (labels[i:i + batch_size] if labels is not None else None)
        return
    dataset = data
    if rows is not None:
        from .data import Subset
        dataset = Subset(data, np.arange(len(data))[rows])
    if len(dataset) == 0:
        return
    loader = DataLoader(dataset, batch_size, shuffle=False, prefetch=1, workers=workers)
    try:
        for batch in loader:
            yield np.asarray(batch[0], np.float32), (np.asarray(batch[1]) if len(batch) > 1 else None)
    finally:
        loader.close()


def _count(data: Any) -> int:
    return len(data[0]) if isinstance(data, tuple) else len(data)


def extract_features(model: Any, data: Any, batch_size: int = 256, pool: str = "avg", workers: int = 0) -> np.ndarray:
    """Frozen features for linear probing: the final-layer patch tokens averaged ("avg") or
    the class token ("token"), [n, C] float32. ``data``: images, (images, labels) or a dataset
    (streamed: only the [n, C] features are held)."""
    out = []
    for images, _ in _ordered_batches(data, batch_size, workers):
        f = model.forward_features(images)
        out.append(f[:, 1:].mean(axis=1) if pool == "avg" else f[:, 0])
    return np.concatenate(out).astype(np.float32)


@contextlib.contextmanager
def _running_at(model: Any, precision: Optional[str]):
    """Run ``model`` at ``precision`` inside the block (None: unchanged), then restore its own."""
    if precision is None:
        yield
        return
    own = model.precision
    model.precision = precision
    try:
        yield
    finally:
        model.precision = own


def _labels_of(data):
    if isinstance(data, tuple):
        return np.asarray(data[1]).astype(np.int64)
    from .data import dataset_targets
    return dataset_targets(data)


def linear_probe(model: Any, train: Any, val: Any = None, *, epochs: int = 100, lr: float = 0.1,
                 weight_decay: float = 0.0, batch_size: int = 256, pool: str = "avg",
                 seed: int = 0, precision: Optional[str] = None, workers: int = 0) -> Dict[str, float]:
    """Linear probing: a linear classifier on frozen, standardised features (as MAE/BEiT:
    a parameter-free BatchNorm on the features, then a linear layer trained with SGD+momentum
    and a cosine schedule on softmax cross-entropy).

    Args:
        model: any mapet model with ``forward_features`` (pre-trained or not).
        train, val: (images, labels) or labelled datasets (streamed once into features).
        epochs, lr, weight_decay, batch_size: the probe's recipe.
        pool: "avg" (mean of patch tokens) or "token" (class token).
        precision: "fp32" or "bf16" for the backbone's matrix products while features are
            extracted (the model's own setting is restored); None: the model's.

    Returns:
        {"train_top1", "val_top1"} (val only when given).
    """
    from .ops import matmul

    with _running_at(model, precision):
        ftr = extract_features(model, train, pool=pool, workers=workers)
        fva = extract_features(model, val, pool=pool, workers=workers) if val is not None else None
    ytr = _labels_of(train)
    mean, std = ftr.mean(0), ftr.std(0) + 1e-6
    ftr = (ftr - mean) / std
    k = int(ytr.max()) + 1
    d = ftr.shape[1]
    rng = np.random.default_rng(seed)
    w = np.zeros((k, d), np.float32)
    b = np.zeros(k, np.float32)
    mw, mb = np.zeros_like(w), np.zeros_like(b)
    steps_per_epoch = -(-len(ytr) // batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = rng.permutation(len(ytr))
        for s in range(steps_per_epoch):
            idx = order[s * batch_size:(s + 1) * batch_size]
            x, y = ftr[idx], ytr[idx]
            logits = matmul(x, w, trans_b=True) + b
            logits -= logits.max(1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(y)), y] -= 1.0
            p /= len(y)
            gw = matmul(p, x, trans_a=True) + weight_decay * w
            gb = p.sum(0)
            cur = 0.5 * lr * (1 + math.cos(math.pi * step / total))
            mw = 0.9 * mw + gw
            mb = 0.9 * mb + gb
            w -= cur * mw
            b -= cur * mb
            step += 1

    def top1(f, y):
        return float(np.mean(np.argmax(matmul(f, w, trans_b=True) + b, axis=1) == y))

    result = {"train_top1": top1(ftr, ytr)}
    if val is not None:
        fva = (fva - mean) / std
        result["val_top1"] = top1(fva, _labels_of(val))
    return result


def evaluate(model: Any, data: Any, batch_size: int = 256, workers: int = 0,
             confusion: bool = False, precision: Optional[str] = None) -> Dict[str, Any]:
    """Top-1 / top-5 accuracy and mean cross-entropy of a classifier.

    Args:
        model: a classifier (``model(images)`` → logits [B, classes]).
        data: (images, labels) or a labelled dataset (streamed in order, bounded memory).
        batch_size, workers: evaluation batch and decoding threads.
        confusion: also return ``per_class`` (accuracy of each true class; NaN for a class without
            images) and ``confusion`` (int64 [classes, classes], rows = true class, columns = predicted).
        precision: "fp32" / "bf16" runs the model's matrix products at that precision for this
            call (its own setting is restored); None: the model's.

    Returns:
        {"top1", "top5", "loss"} (+ "per_class", "confusion"); top-5 is top-k with k = min(5, classes).

    Under ``mpiexec`` every rank evaluates a contiguous share of the rows and the counts are
    summed, so every rank returns the same metrics of the whole set."""
    n = _count(data)
    ctx = distributed.context()
    share = distributed.contiguous_shard(n, ctx) if ctx.distributed else None
    classes = int(model.config["num_classes"]) if hasattr(model, "config") and "num_classes" in model.config else None
    correct, correct5, loss = 0, 0, 0.0
    matrix = np.zeros((classes, classes), np.int64) if classes else None
    with _running_at(model, precision):
        for images, y in _ordered_batches(data, batch_size, workers, rows=share):
            if y is None:
                raise ValueError("evaluate: data must carry labels ((images, labels) or a labelled dataset)")
            logits = np.asarray(model(images), dtype=np.float64)
            y = np.asarray(y, np.int64)
            if matrix is None:
                classes = logits.shape[1]
                matrix = np.zeros((classes, classes), np.int64)
            if y.size and (y.min() < 0 or y.max() >= logits.shape[1]):
                raise ValueError(f"evaluate: labels must lie in [0, {logits.shape[1]}) (the model's classes), "
                                 f"got {int(y.min())}..{int(y.max())}")
            pred = np.argmax(logits, 1)
            correct += int(np.sum(pred == y))
            k = min(5, logits.shape[1])
            top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
            correct5 += int(np.sum(np.any(top == y[:, None], axis=1)))
            np.add.at(matrix, (y, pred), 1)
            z = logits - logits.max(1, keepdims=True)
            loss += float(np.sum(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))
    if ctx.distributed:
        correct, correct5, loss = ctx.allreduce_(np.array([correct, correct5, loss], dtype=np.float64))
        correct, correct5 = int(round(correct)), int(round(correct5))
        if matrix is not None:
            matrix = np.rint(ctx.allreduce_(matrix.astype(np.float64))).astype(np.int64)
    out: Dict[str, Any] = {"top1": correct / n, "top5": correct5 / n, "loss": loss / n}
    if confusion:
        totals = matrix.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["per_class"] = (np.diag(matrix) / totals).tolist()
        out["confusion"] = matrix
    return out

"""Class predictions for image files with a fine-tuned checkpoint, seen exactly as the checkpoint
expects: its image size (evaluation view: shorter side to size/0.875, centre crop) and its input
normalisation (``mapet.data.data_config``), with the class names saved beside it
(``classes.json`` of a finetune run).

From the shell::

    python -m mapet predict --set checkpoint=run/ft/model.safetensors --set data=photos/new -o preds

writes ``preds/predictions.csv`` (path, predicted class, its probability, the top-k classes).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .cli import command



def list_images(source: str) -> List[str]:
    """The image files of ``source``: the file itself, or every image under the folder (sorted,
    any depth, hidden files skipped, symbolic-link cycles entered once)."""
    from .data.datasets import IMG_EXTENSIONS, _walk_files

    source = os.fspath(source)
    if os.path.isfile(source):
        return [source]
    if not os.path.isdir(source):
        raise ValueError(f"data: {source!r} is neither an image file nor a directory")
    files = [p for p in _walk_files(source) if p.lower().endswith(IMG_EXTENSIONS)]
    if not files:
        raise ValueError(f"data: no image files under {source} (extensions {', '.join(IMG_EXTENSIONS)})")
    return files


class ImageFiles:
    """Image files in the evaluation view at ``img_size`` (items: ``(image,)``); unreadable files
    raise ``ImageLoadError`` naming them, or are dropped with a warning with ``on_error="skip"``."""

    def __init__(self, paths: List[str], img_size: int, on_error: str = "raise") -> None:
        from .data.datasets import ImageLoadError, _open_rgb

        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error: expected 'raise' or 'skip', got {on_error!r}")
        self.paths, self.img_size = list(paths), int(img_size)
        if on_error == "skip":
            import warnings
            bad = []
            for p in self.paths:
                try:
                    _open_rgb(p)
                except ImageLoadError as e:
                    bad.append((p, str(e)))
            if bad:
                warnings.warn(f"predict: skipping {len(bad)} unreadable file(s): " + "; ".join(m for _, m in bad[:20]))
                dropped = {p for p, _ in bad}
                self.paths = [p for p in self.paths if p not in dropped]
            if not self.paths:
                raise ValueError("predict: no readable images left")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple:
        from .data.datasets import _open_rgb, eval_view
        return (eval_view(_open_rgb(self.paths[i]), self.img_size),)


def predict_files(checkpoint: str, source: Any, batch_size: int = 64, workers: int = 2, on_error: str = "raise",
                  img_size: Optional[int] = None, mean: Any = None, std: Any = None,
                  precision: Optional[str] = None) -> Tuple[List[str], np.ndarray, List[str]]:
    """Softmax probabilities of a saved classifier for image files.

    Args:
        checkpoint: a ``model.safetensors`` of a finetune run (a ``mapet.load``-able classifier).
        source: an image file, a folder (every image under it), or a list of files.
        batch_size, workers: images per forward pass, decoding threads.
        on_error: unreadable images: "raise" or "skip".
        img_size, mean, std: None takes the checkpoint's; a different value raises ValueError naming both.
        precision: "fp32"/"bf16" for this call; None: the model's.

    Returns:
        (paths, probabilities float32 [n, classes], class names — from ``classes.json`` beside the
        checkpoint, else "0", "1", ...).

    Example:
        >>> paths, probs, names = predict_files("run/ft/model.safetensors", "photos/new")
        >>> [names[i] for i in probs.argmax(1)]
    """
    from .data import DataLoader
    from .data.data_config import normalized, resolve
    from .models import VisionTransformer, load
    from .evaluation import _running_at

    if not checkpoint or not os.path.exists(str(checkpoint)):
        raise ValueError(f"checkpoint: {checkpoint!r} does not exist (a model.safetensors of a finetune run)")
    size, norm = resolve(str(checkpoint), img_size, mean, std)
    model = load(str(checkpoint))
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"checkpoint: {checkpoint} is a pre-training model, not a classifier; fine-tune it first")
    paths = list(source) if isinstance(source, (list, tuple)) else list_images(source)
    dataset = ImageFiles(paths, int(model.config["img_size"]), on_error)
    loader = DataLoader(normalized(dataset, norm), int(batch_size), shuffle=False, prefetch=1, workers=int(workers))
    out = []
    try:
        with _running_at(model, precision):
            for (images,) in loader:
                out.append(model.predict(images, batch_size=int(batch_size), probabilities=True))
    finally:
        loader.close()
    classes_file = os.path.join(os.path.dirname(os.path.abspath(str(checkpoint))), "classes.json")
    names = [str(i) for i in range(int(model.config["num_classes"]))]
    if os.path.exists(classes_file):
        with open(classes_file) as f:
            saved = json.load(f)
        if len(saved) == len(names):
            names = [str(c) for c in saved]
    return dataset.paths, np.concatenate(out), names


PREDICT_DEFAULTS: Dict[str, Any] = {"checkpoint": None, "data": None, "batch_size": 64, "workers": 2,
                                    "on_error": "raise", "topk": 5, "precision": None, "img_size": None,
                                    "mean": None, "std": None}

OPTIONS = {
    "checkpoint": "the classifier to use (model.safetensors of a finetune run; classes.json beside it names the classes)",
    "data": "an image file or a folder (every image under it, any depth)",
    "batch_size": "images per forward pass",
    "workers": "threads decoding images",
    "on_error": "unreadable images: 'raise' (stop, naming the file) or 'skip' (drop them with a warning)",
    "topk": "classes listed per image in predictions.csv",
    "precision": "matrix products in 'fp32' or 'bf16' (null: the checkpoint's)",
    "img_size": "image side; null: the checkpoint's (a different value is an error)",
    "mean": "input normalisation mean; null: the checkpoint's (a different value is an error)",
    "std": "input normalisation std; null: the checkpoint's (a different value is an error)",
    "output_dir": "where predictions.csv goes (set with -o; without it the CSV is printed)",
}


@command("predict", "predict the classes of image files with a fine-tuned checkpoint (its image size and "
                    "normalisation)", defaults=PREDICT_DEFAULTS, options=OPTIONS)
def _predict(args, cfg) -> int:
    import csv
    import io

    if not cfg.get("checkpoint"):
        raise ValueError("config: predict needs checkpoint=PATH (a model.safetensors of a finetune run)")
    if cfg.get("data") is None:
        raise ValueError("config: predict needs data=PATH (an image file or a folder of images)")
    topk = cfg["topk"]
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"config: topk must be a positive integer, got {topk!r}")
    paths, probs, names = predict_files(cfg["checkpoint"], cfg["data"], batch_size=cfg["batch_size"],
                                        workers=cfg["workers"], on_error=cfg["on_error"], img_size=cfg["img_size"],
                                        mean=cfg["mean"], std=cfg["std"], precision=cfg["precision"])
    k = min(int(topk), probs.shape[1])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "predicted", "probability", f"top{k}"])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    for path, p, top in zip(paths, probs, order):
        writer.writerow([path, names[top[0]], f"{p[top[0]]:.6f}", ";".join(names[j] for j in top)])
    out = cfg.get("output_dir")
    if out:
        os.makedirs(out, exist_ok=True)
        target = os.path.join(out, "predictions.csv")
        with open(target, "w") as f:
            f.write(buf.getvalue())
        print(json.dumps({"images": len(paths), "predictions": target}))
    else:
        print(buf.getvalue(), end="")
    return 0

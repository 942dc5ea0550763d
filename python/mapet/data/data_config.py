"""What a model expects of its input images, recorded in its checkpoint: the image size (the
model's ``img_size``) and the per-channel normalisation ``(x - mean) / std`` of pixels in [0, 1]
(timm's ``pretrained_cfg`` mean/std).

A model carries ``model.data_config = {"mean": [...], "std": [...]}``; ``model.save`` writes it into
the safetensors metadata (``"data"``) and ``mapet.load`` reads it back. Files without it (older
mapet files, reference checkpoints) mean pixels in [0, 1] unchanged: mean 0, std 1 — what mapet
has always fed its models. Fine-tuning, evaluation and prediction from the shell take both from
the checkpoint; a different value given on the command line is an error naming both.
"""
import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .datasets import DatasetView

#: Pixels in [0, 1] unchanged (mapet's default, and the meaning of a file that records nothing).
IDENTITY: Dict[str, List[float]] = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


def check_normalization(mean: Any, std: Any, channels: int = 3) -> Dict[str, List[float]]:
    """``{"mean", "std"}`` as lists of ``channels`` floats (std > 0), or ValueError naming the bad one."""
    out = {}
    for name, value in (("mean", mean), ("std", std)):
        ok = isinstance(value, (list, tuple)) and len(value) == channels and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        if not ok:
            raise ValueError(f"{name}: expected a list of {channels} finite numbers (one per channel, for pixels in "
                             f"[0, 1]), got {json.dumps(value) if _jsonable(value) else repr(value)}")
        out[name] = [float(v) for v in value]
    if any(s <= 0 for s in out["std"]):
        raise ValueError(f"std: expected positive values, got {out['std']}")
    return out


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def metadata_entry(model: Any) -> Dict[str, str]:
    """The safetensors metadata recording ``model.data_config`` (``{}`` when the model has none)."""
    dc = getattr(model, "data_config", None)
    if not dc:
        return {}
    return {"data": json.dumps(check_normalization(dc.get("mean"), dc.get("std"), len(dc.get("mean") or [])))}


def from_metadata(metadata: Mapping[str, str]) -> Optional[Dict[str, List[float]]]:
    """The ``data_config`` a file's metadata records, or None when it records none."""
    blob = metadata.get("data")
    if blob is None:
        return None
    try:
        dc = json.loads(blob)
        return check_normalization(dc["mean"], dc["std"], len(dc["mean"]))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"bad data config in the file's metadata ({e})") from None


def read_file_config(path: str) -> Tuple[Optional[int], Optional[Dict[str, List[float]]]]:
    """(image size, normalisation) recorded in a mapet model file, each None when not recorded;
    reads the header only."""
    import safetensors

    try:
        with safetensors.safe_open(os.fspath(path), framework="np") as f:
            metadata = f.metadata() or {}
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read its metadata ({e})") from None
    size = None
    if "config" in metadata:
        try:
            size = json.loads(metadata["config"]).get("img_size")
        except (ValueError, AttributeError):
            size = None
    try:
        return (int(size) if size is not None else None), from_metadata(metadata)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def resolve(path: Optional[str], img_size: Any = None, mean: Any = None, std: Any = None,
            what: str = "the checkpoint") -> Tuple[Optional[int], Dict[str, List[float]]]:
    """The image size and normalisation of a run that starts from the model file ``path``:
    given values must equal the recorded ones (ValueError naming both), unset ones are taken from
    the file; with nothing recorded or given, pixels in [0, 1] (:data:`IDENTITY`).

    Returns:
        (img_size or None when neither the file nor the caller says, {"mean", "std"}).
    """
    rec_size, rec_norm = read_file_config(path) if path else (None, None)
    if img_size is not None and rec_size is not None and int(img_size) != rec_size:
        raise ValueError(f"img_size: {int(img_size)} given, but {what} {path} was made for {rec_size}×{rec_size} "
                         "images; leave it unset to use the checkpoint's")
    given = None
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise ValueError(f"{'std' if mean is not None else 'mean'}: set both mean and std (a normalisation "
                             "is the pair), or neither to use the checkpoint's")
        given = check_normalization(mean, std)
    if given is not None and rec_norm is not None and not (
            np.allclose(given["mean"], rec_norm["mean"], rtol=0, atol=1e-9)
            and np.allclose(given["std"], rec_norm["std"], rtol=0, atol=1e-9)):
        raise ValueError(f"mean/std: {given['mean']} / {given['std']} given, but {what} {path} was trained on "
                         f"images normalised with mean {rec_norm['mean']} / std {rec_norm['std']}; leave them unset "
                         "to use the checkpoint's")
    size = int(img_size) if img_size is not None else rec_size
    return size, given or rec_norm or {k: list(v) for k, v in IDENTITY.items()}


def is_identity(norm: Mapping[str, Sequence[float]]) -> bool:
    return list(norm["mean"]) == [0.0] * len(norm["mean"]) and list(norm["std"]) == [1.0] * len(norm["std"])


class Normalized(DatasetView):
    """A dataset whose images (the first field of every item) are normalised per channel:
    ``(x - mean) / std``, float32. Everything else passes through.

    Example:
        >>> ds = Normalized(ImageFolder("photos/val", 224), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    """

    def __init__(self, dataset: Any, mean: Sequence[float], std: Sequence[float]) -> None:
        self.dataset = dataset
        self.mean = np.asarray(mean, np.float32).reshape(-1, 1, 1)
        self.scale = (1.0 / np.asarray(std, np.float32)).reshape(-1, 1, 1)
        for attr in ("classes", "img_size", "deterministic", "view_id", "targets", "labels", "images"):
            if attr in ("targets", "labels", "images"):
                continue  # properties below (``images`` would be the raw pixels: not exposed)
            if hasattr(dataset, attr):
                setattr(self, attr, getattr(dataset, attr))

    @property
    def targets(self) -> Any:
        from .datasets import dataset_targets
        return dataset_targets(self.dataset)

    def _norm(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float32) - self.mean) * self.scale).astype(np.float32)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        item = self.dataset[i]
        return (self._norm(item[0]),) + tuple(item[1:])

    def get_batch(self, indices: np.ndarray) -> tuple:
        if hasattr(self.dataset, "get_batch"):
            batch = tuple(self.dataset.get_batch(indices))
        else:
            from .loader import _collate
            batch = _collate([self.dataset[int(i)] for i in indices])
        return (self._norm(batch[0]),) + tuple(batch[1:])


def normalized(dataset: Any, norm: Optional[Mapping[str, Sequence[float]]]) -> Any:
    """``dataset`` itself when ``norm`` is None or the identity, else :class:`Normalized`."""
    if dataset is None or norm is None or is_identity(norm):
        return dataset
    return Normalized(dataset, norm["mean"], norm["std"])

"""Datasets: the built-in digits, NumPy arrays, and class-per-folder image trees.

A dataset is anything with ``__len__`` and ``__getitem__(i) -> tuple`` (image float32 [3, S, S]
in [0, 1] first, then label / extras). Optional: ``set_epoch(e)`` (re-draw augmentation) and
``get_batch(indices) -> tuple of stacked arrays`` (a fast path the loader uses when present).
"""
import logging
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .transforms import (center_crop_box, parse_randaugment, pil_filter, pil_to_chw, rand_augment,
                         random_resized_crop_params, resize_bilinear, sample_rng)

logger = logging.getLogger(__name__)

_DIGITS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.npz")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def digits_split(labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Stratified split: in every class, a seeded permutation; the first ``round(n·f)`` go to test.

    Returns (train_indices, test_indices), each sorted ascending.
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(len(idx) * test_fraction))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(img_size: int = 32, split: str = "train", seed: int = 0,
                test_fraction: float = 0.2) -> Tuple[np.ndarray, np.ndarray]:
    """The built-in real dataset: 1797 handwritten digits (UCI, via scikit-learn; CC BY 4.0).

    The 8×8 images (values 0..16) are scaled to [0, 1], upsampled to ``img_size`` with
    ``resize_bilinear`` (half-pixel centres, edges clamped) and repeated to 3 channels.
    The split is stratified per class and fixed by ``seed`` (default 0 is the canonical
    split: 1438 train / 359 test images). See ``mapet/data/README.md`` for provenance.

    Args:
        img_size: output side in pixels (e.g. 32 for patch 4 or 8; 224 for the standard ViT).
        split: "train", "test" or "all" (all 1797 in file order).
        seed: seed of the stratified split.
        test_fraction: share of each class held out for "test".

    Returns:
        (images, labels): float32 [n, 3, img_size, img_size] in [0, 1], int64 [n].

    Example:
        >>> x, y = load_digits(32, "test")
        >>> x.shape, y.shape
        ((359, 3, 32, 32), (359,))
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"load_digits: split must be 'train', 'test' or 'all', got {split!r}")
    if int(img_size) <= 0:
        raise ValueError(f"load_digits: img_size must be positive, got {img_size}")
    with np.load(_DIGITS_FILE) as f:
        images, labels = f["images"], f["labels"].astype(np.int64)
    if split != "all":
        train, test = digits_split(labels, test_fraction, seed)
        keep = train if split == "train" else test
        images, labels = images[keep], labels[keep]
    x = images.astype(np.float32) / np.float32(16.0)
    if img_size != 8:
        x = resize_bilinear(x, img_size, img_size)
    x = np.ascontiguousarray(np.repeat(x[:, None], 3, axis=1), dtype=np.float32)
    return x, labels


class ArrayDataset:
    """Images (and optional labels) already in memory as arrays.

    Args:
        images: [n, C, H, W] (made float32 contiguous once).
        labels: optional [n] integer labels; items are then ``(image, label)``, else ``(image,)``.

    Example:
        >>> ds = ArrayDataset(*load_digits(32))
        >>> img, label = ds[0]
    """

    def __init__(self, images: np.ndarray, labels: Optional[np.ndarray] = None):
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4:
            raise ValueError(f"ArrayDataset: images must be [n, C, H, W], got shape {images.shape}")
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (images.shape[0],):
                raise ValueError(f"ArrayDataset: labels must have shape ({images.shape[0]},), got {labels.shape}")
            if not np.issubdtype(labels.dtype, np.integer):
                raise TypeError(f"ArrayDataset: labels must be integers, got dtype {labels.dtype}")
            labels = labels.astype(np.int64)
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple:
        if self.labels is None:
            return (self.images[i],)
        return self.images[i], int(self.labels[i])

    def get_batch(self, indices: np.ndarray) -> tuple:
        if self.labels is None:
            return (self.images[indices],)
        return self.images[indices], self.labels[indices]


SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


def _walk_files(top: str) -> List[str]:
    """Every non-hidden file under ``top`` in sorted order, following symbolic links but entering
    each directory (identified by ``(st_dev, st_ino)``) once, so a link cycle ends the walk."""
    out: List[str] = []
    seen = set()
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            logger.debug("ImageFolder: %s was visited already (symbolic-link cycle); not entered again", folder)
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise ValueError(f"ImageFolder: cannot list {folder} ({e})") from None
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir():  # follows links
                subdirs.append(e.path)
            elif e.is_file():
                out.append(e.path)
        stack.extend(reversed(subdirs))  # depth-first, sorted
    return out


class DatasetView:
    """Base of datasets that wrap another one (``self.dataset``): epochs pass through, and items
    are decoded one by one (by the loader's workers) exactly when the wrapped dataset's are."""

    dataset: Any

    @property
    def decode_per_item(self) -> bool:
        """True when the wrapped dataset decodes item by item (the loader's workers then do it)."""
        return not hasattr(self.dataset, "get_batch") or getattr(self.dataset, "decode_per_item", False)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


class Subset(DatasetView):
    """The items ``indices`` of a dataset (e.g. a validation split cut from one folder).

    Example:
        >>> train, val = split_dataset(ImageFolder("photos", 224), 0.1, seed=0)
    """

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, np.asarray(indices, dtype=np.int64)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= len(dataset)):
            raise ValueError(f"Subset: indices must lie in [0, {len(dataset)})")
        for attr in ("classes", "img_size", "deterministic", "view_id"):
            if hasattr(dataset, attr):
                setattr(self, attr, getattr(dataset, attr))

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int) -> tuple:
        return self.dataset[int(self.indices[i])]

    @property
    def targets(self) -> List[int]:
        t = dataset_targets(self.dataset)
        return [int(t[i]) for i in self.indices]

    def get_batch(self, indices: np.ndarray) -> tuple:
        if hasattr(self.dataset, "get_batch"):
            return tuple(self.dataset.get_batch(self.indices[np.asarray(indices)]))
        from .loader import _collate
        return _collate([self[int(i)] for i in indices])


def dataset_targets(dataset) -> np.ndarray:
    """The integer labels of a labelled dataset (``targets`` or ``labels``), int64 [n]."""
    for attr in ("targets", "labels"):
        t = getattr(dataset, attr, None)
        if t is not None:
            return np.asarray(t, dtype=np.int64)
    raise ValueError(f"{type(dataset).__name__}: the dataset has no labels (no 'targets' or 'labels')")


def split_dataset(dataset, fraction: float, seed: int = 0) -> Tuple[Subset, Subset]:
    """Cut a held-out split from one labelled dataset, stratified per class and seeded
    (:func:`digits_split`); returns (train, held_out)."""
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"split_dataset: fraction must lie in (0, 1), got {fraction}")
    train, held = digits_split(dataset_targets(dataset), float(fraction), seed)
    if held.size == 0:
        raise ValueError(f"split_dataset: a fraction of {fraction} of {len(dataset)} images holds out nothing")
    return Subset(dataset, train), Subset(dataset, held)


def check_same_classes(train_classes: Sequence[str], other_classes: Sequence[str], what: str = "val_data") -> None:
    """Raise ValueError listing the difference when two splits do not have the same class folders
    (labels are indices into the sorted names, so any difference would mislabel the other split)."""
    a, b = list(train_classes), list(other_classes)
    if a == b:
        return
    only_train, only_other = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    parts = []
    if only_train:
        parts.append(f"only in the training data: {', '.join(only_train[:20])}")
    if only_other:
        parts.append(f"only in {what}: {', '.join(only_other[:20])}")
    raise ValueError(f"{what}: its classes differ from the training data's ({len(a)} vs {len(b)} classes; "
                     + "; ".join(parts) + "); the class folders must be the same in every split")


def eval_view(img, size: int, crop_pct: float = 0.875, interpolation: str = "bicubic") -> np.ndarray:
    """The evaluation view of an RGB Pillow image (timm/DeiT): resize the shorter side to
    ``int(size / crop_pct)``, centre-crop ``size``; float32 [3, size, size] in [0, 1]."""
    short = int(size / crop_pct)
    w, h = img.size
    if w <= h:
        nw, nh = short, int(short * h / w)
    else:
        nw, nh = int(short * w / h), short
    img = img.resize((nw, nh), pil_filter(interpolation))
    top, left, ch, cw = center_crop_box(nh, nw, size, size)
    return pil_to_chw(img.crop((left, top, left + cw, top + ch)))


class ImageLoadError(ValueError):
    """An image file could not be decoded; the message names the file."""


def _open_rgb(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # forces a full decode: truncated files fail here
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, MemoryError, Image.DecompressionBombError) as e:
        # DecompressionBombError: a header claiming more pixels than Pillow's limit (2× MAX_IMAGE_PIXELS)
        raise ImageLoadError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


class ImageFolder:
    """A class-per-folder image tree (``root/<class>/<image>``, as ImageNet), decoded by Pillow.

    Class indices follow the sorted folder names. Files whose extension is not an image
    extension (``IMG_EXTENSIONS``) are ignored with one warning listing them; hidden files are
    ignored silently. An empty class folder or a root without class folders raises ValueError.

    Views (``mode``), all seeded by (seed, epoch, index) so a resumed run sees the same pixels:
      - "eval": resize the shorter side to ``int(img_size / crop_pct)`` then centre-crop
        ``img_size`` (timm/DeiT evaluation; also the view for tokenizing classification data).
      - "pretrain": random-resized-crop with ``scale=(1, 1), ratio=(1, 1)`` by default, i.e. the
        largest centred square resized to ``img_size`` (the MaPeT reference pre-training setting).
        With these defaults the view is deterministic, so tokens cached once from this same view
        stay aligned with the pixels. With ``second_size`` the item also carries the *same*
        crop resized for the tokenizer (BEiT's "two pic" crop), so random crops (``scale`` < 1)
        stay aligned when the tokenizer runs on the fly.
      - "finetune": random-resized-crop ``scale=(0.08, 1)``, ``ratio=(3/4, 4/3)``, horizontal
        flip with probability 0.5, then ``randaugment`` when given (e.g. "rand-m9-mstd0.5-inc1",
        the BEiT/MaPeT fine-tuning recipe; see ``mapet.data.transforms.rand_augment``).

    Bad data: ``on_error="raise"`` (default) raises ``ImageLoadError`` naming the file when an
    unreadable image is loaded. ``on_error="skip"`` decodes every file once at construction,
    drops the unreadable ones with a warning naming them (their labels go with them, so no
    label is ever shifted) — a full pass over the data, so use it on trees you do not trust.

    Items: ``(image, label)``, or ``(image, tokenizer_image, label)`` with ``second_size``;
    images are float32 [3, S, S] in [0, 1].

    Example:
        >>> ds = ImageFolder("imagenet/val", 224, mode="eval")
        >>> img, label = ds[0]
    """

    def __init__(self, root: str, img_size: int = 224, mode: str = "eval", *,
                 scale: Optional[Sequence[float]] = None, ratio: Optional[Sequence[float]] = None,
                 hflip: Optional[float] = None, crop_pct: float = 0.875, interpolation: str = "bicubic",
                 second_size: Optional[int] = None, second_interpolation: str = "lanczos",
                 seed: int = 0, on_error: str = "raise", randaugment: Optional[str] = None):
        if mode not in ("eval", "pretrain", "finetune"):
            raise ValueError(f"ImageFolder: mode must be 'eval', 'pretrain' or 'finetune', got {mode!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"ImageFolder: on_error must be 'raise' or 'skip', got {on_error!r}")
        if second_size is not None and mode != "pretrain":
            raise ValueError("ImageFolder: second_size is only meaningful with mode='pretrain'")
        if randaugment is not None and mode != "finetune":
            raise ValueError("ImageFolder: randaugment is only meaningful with mode='finetune'")
        self.randaugment = randaugment
        self._rand = parse_randaugment(randaugment) if randaugment else None
        import PIL  # noqa: F401  (fail early with ImportError if Pillow is missing)

        self.root, self.img_size, self.mode = os.fspath(root), int(img_size), mode
        defaults = {"pretrain": ((1.0, 1.0), (1.0, 1.0), 0.0), "finetune": ((0.08, 1.0), (3 / 4, 4 / 3), 0.5),
                    "eval": (None, None, 0.0)}[mode]
        self.scale = tuple(scale) if scale is not None else defaults[0]
        self.ratio = tuple(ratio) if ratio is not None else defaults[1]
        self.hflip = float(hflip) if hflip is not None else defaults[2]
        self.crop_pct, self.interpolation = float(crop_pct), interpolation
        self.second_size, self.second_interpolation = second_size, second_interpolation
        pil_filter(interpolation), pil_filter(second_interpolation)  # validate names
        self.seed, self.epoch = int(seed), 0
        self.classes, self.class_to_idx, self.samples = self._scan()
        if on_error == "skip":
            bad = self.verify()
            if bad:
                warnings.warn(f"ImageFolder({self.root}): skipping {len(bad)} unreadable file(s): "
                              + "; ".join(msg for _, msg in bad[:20]) + (" ..." if len(bad) > 20 else ""))
                dropped = {p for p, _ in bad}
                self.samples = [s for s in self.samples if s[0] not in dropped]
            if not self.samples:
                raise ValueError(f"ImageFolder({self.root}): no readable images left")

    def _scan(self) -> Tuple[List[str], Dict[str, int], List[Tuple[str, int]]]:
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"ImageFolder: {self.root} is not a directory")
        classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise ValueError(f"ImageFolder: {self.root} has no class folders (expected root/<class>/<image>)")
        splits = [c for c in classes if c.lower() in SPLIT_NAMES]
        if "train" in [c.lower() for c in classes] and len(splits) >= 2:
            others = [c for c in splits if c.lower() != "train"]
            raise ValueError(f"ImageFolder: {self.root} looks like a dataset root, not a split: its folders "
                             f"{', '.join(splits)} would become classes; use {os.path.join(self.root, 'train')} "
                             f"for training and {os.path.join(self.root, others[0])} as the held-out split "
                             "(CLI: --set data=.../train --set val_data=.../val)")
        class_to_idx = {c: i for i, c in enumerate(classes)}
        samples, ignored = [], []
        for c in classes:
            folder = os.path.join(self.root, c)
            found = 0
            for path in _walk_files(folder):
                if os.path.basename(path).lower().endswith(IMG_EXTENSIONS):
                    samples.append((path, class_to_idx[c]))
                    found += 1
                else:
                    ignored.append(path)
            if found == 0:
                raise ValueError(f"ImageFolder: class folder {folder} contains no image files "
                                 f"(extensions {', '.join(IMG_EXTENSIONS)})")
        if ignored:
            warnings.warn(f"ImageFolder({self.root}): ignoring {len(ignored)} non-image file(s): "
                          + ", ".join(ignored[:10]) + (" ..." if len(ignored) > 10 else ""))
        logger.info("ImageFolder %s: %d images in %d classes", self.root, len(samples), len(classes))
        return classes, class_to_idx, samples

    @property
    def targets(self) -> List[int]:
        return [label for _, label in self.samples]

    @property
    def deterministic(self) -> bool:
        """True when the view does not depend on the seed (safe to pair with a token cache)."""
        if self.mode == "eval":
            return True
        return (self.scale[0] == self.scale[1] == 1.0 and self.ratio[0] == self.ratio[1] and self.hflip == 0.0
                and self._rand is None)

    @property
    def view_id(self) -> str:
        """A string naming the view (recorded in token-cache manifests)."""
        if self.mode == "eval":
            return f"eval:{self.img_size}:crop_pct={self.crop_pct}:{self.interpolation}"
        return (f"{self.mode}:{self.img_size}:scale={list(self.scale)}:ratio={list(self.ratio)}:"
                f"hflip={self.hflip}:{self.interpolation}" + (f":{self.randaugment}" if self._rand else ""))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def verify(self) -> List[Tuple[str, str]]:
        """Decode every file; returns [(path, error message)] for the unreadable ones."""
        bad = []
        for path, _ in self.samples:
            try:
                _open_rgb(path)
            except ImageLoadError as e:
                bad.append((path, str(e)))
        return bad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple:
        path, label = self.samples[i]
        img = _open_rgb(path)
        S = self.img_size
        resample = pil_filter(self.interpolation)
        if self.mode == "eval":
            return eval_view(img, S, self.crop_pct, self.interpolation), label
        rng = sample_rng(self.seed, self.epoch, i)
        w, h = img.size
        top, left, ch, cw = random_resized_crop_params(rng, h, w, self.scale, self.ratio)
        flip = self.hflip > 0 and rng.random() < self.hflip
        box = (left, top, left + cw, top + ch)
        out = img.resize((S, S), resample, box=box)
        if flip:
            out = out.transpose(0)  # Image.FLIP_LEFT_RIGHT
        if self._rand is not None:  # after crop and flip, as timm's transforms_imagenet_train
            n, m, mstd = self._rand
            out = rand_augment(out, rng, n, m, mstd)
        if self.second_size is None:
            return pil_to_chw(out), label
        second = img.resize((self.second_size, self.second_size), pil_filter(self.second_interpolation), box=box)
        if flip:
            second = second.transpose(0)
        return pil_to_chw(out), pil_to_chw(second), label

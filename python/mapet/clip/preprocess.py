"""CLIP's image preprocessing (OpenAI ``clip._transform``; ALGORITHMS.md §6) for arrays and image folders.

Resize the shorter side to ``size`` with Pillow's bicubic filter (the longer side becomes
``int(size · long / short)``, as torchvision's ``Resize``), centre-crop ``size × size`` (torchvision's
rounding), RGB in [0, 1], then ``(x − CLIP_MEAN) / CLIP_STD`` per channel.
"""
import os
from typing import Any, Sequence, Tuple

import numpy as np

from ..data.datasets import ImageFolder as _ImageFolder
from ..data.transforms import center_crop_box, pil_to_chw

CLIP_MEAN: Tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: Tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

__all__ = ["CLIP_MEAN", "CLIP_STD", "normalize", "preprocess", "ImageFolder"]


def _resized_size(w: int, h: int, size: int) -> Tuple[int, int]:
    """(new_w, new_h) with the shorter side = size (torchvision ``Resize(int)``)."""
    if w <= h:
        return size, int(size * h / w)
    return int(size * w / h), size


def normalize(images: Any) -> np.ndarray:
    """``(x − CLIP_MEAN) / CLIP_STD`` per channel of float images [B, 3, H, W] or [3, H, W] in [0, 1]."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"images: expected [B, 3, H, W] or [3, H, W], got shape {x.shape}")
    return ((x - np.asarray(CLIP_MEAN, np.float32).reshape(3, 1, 1))
            / np.asarray(CLIP_STD, np.float32).reshape(3, 1, 1)).astype(np.float32)


def _pil_resize_crop(img: Any, size: int) -> Any:
    from PIL import Image
    w, h = img.size
    nw, nh = _resized_size(w, h, size)
    img = img.resize((nw, nh), Image.BICUBIC)
    top, left, ch, cw = center_crop_box(nh, nw, size, size)
    return img.crop((left, top, left + cw, top + ch))


def _float_resize_crop(x: np.ndarray, size: int) -> np.ndarray:
    """[3, H, W] float → [3, size, size]: Pillow bicubic on each channel in mode "F" (no 8-bit rounding)."""
    from PIL import Image
    _, h, w = x.shape
    if (h, w) == (size, size):
        return x
    nw, nh = _resized_size(w, h, size)
    top, left, ch, cw = center_crop_box(nh, nw, size, size)
    out = np.empty((3, size, size), np.float32)
    for c in range(3):
        ch_img = Image.fromarray(np.ascontiguousarray(x[c], dtype=np.float32), mode="F")
        r = ch_img.resize((nw, nh), Image.BICUBIC)
        out[c] = np.asarray(r, dtype=np.float32)[top:top + ch, left:left + cw]
    return out


def preprocess(images: Any, size: int = 224, normalize_output: bool = True) -> np.ndarray:
    """CLIP-preprocess images for a tower of input size ``size``: float32 [B, 3, size, size].

    Args:
        images: a Pillow image or a list of them (converted to RGB; the exact OpenAI transform);
            uint8 [H, W, 3] / [B, H, W, 3] arrays (through Pillow RGB, as decoded files);
            float [3, H, W] / [B, 3, H, W] arrays in [0, 1] (mapet's datasets; resized per channel
            with Pillow's bicubic in float mode, so without 8-bit rounding; already at
            ``size × size`` they are only normalised). Grey [B, 1, H, W] floats are repeated to RGB.
        size: the tower's ``img_size``.
        normalize_output: apply CLIP's mean/std (False: [0, 1] pixels).

    Example:
        >>> import numpy as np
        >>> from mapet.clip import preprocess
        >>> preprocess(np.zeros((2, 3, 40, 60), np.float32), size=32).shape
        (2, 3, 32, 32)
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size: expected a positive int, got {size!r}")
    size = int(size)
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow is a dependency
        raise ImportError("mapet.clip.preprocess needs Pillow") from e
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
        out = np.stack([pil_to_chw(_pil_resize_crop(im.convert("RGB"), size)) for im in images])
    else:
        a = np.asarray(images)
        if a.dtype == np.uint8:
            if a.ndim == 3:
                a = a[None]
            if a.ndim != 4 or a.shape[-1] != 3:
                raise ValueError(f"images: expected uint8 [H, W, 3] or [B, H, W, 3], got shape {a.shape}")
            out = np.stack([pil_to_chw(_pil_resize_crop(Image.fromarray(im, "RGB"), size)) for im in a])
        elif a.dtype.kind == "f":
            if a.ndim == 3:
                a = a[None]
            if a.ndim != 4 or a.shape[1] not in (1, 3):
                raise ValueError(f"images: expected float [3, H, W] or [B, 3, H, W] in [0, 1], got shape {a.shape}")
            if a.shape[1] == 1:
                a = np.repeat(a, 3, axis=1)
            out = np.stack([_float_resize_crop(im, size) for im in a]) if len(a) else \
                np.zeros((0, 3, size, size), np.float32)
        else:
            raise TypeError(f"images: expected Pillow images, uint8 [B, H, W, 3] or float [B, 3, H, W] arrays, "
                            f"got dtype {a.dtype}")
    out = np.ascontiguousarray(out, dtype=np.float32)
    return normalize(out) if normalize_output else out


class ImageFolder(_ImageFolder):
    """A class-per-folder image tree preprocessed as CLIP: items ``(image, label)`` with image
    float32 [3, size, size], bicubic shorter-side resize, centre crop, CLIP mean/std.

    ``clip_preprocessed`` is True, so ``FeatureTokenizer.from_clip`` feeds the items to the tower
    unchanged.

    Example:
        >>> ds = ImageFolder("imagenet/val", size=224)
        >>> img, label = ds[0]
    """

    clip_preprocessed = True

    def __init__(self, root: str, size: int = 224, **kwargs: Any) -> None:
        super().__init__(os.fspath(root), size, mode="eval", crop_pct=1.0, interpolation="bicubic", **kwargs)

    def __getitem__(self, i: int) -> tuple:
        img, label = super().__getitem__(i)
        return normalize(img), label

"""Image geometry: NumPy bilinear resize, the random-resized-crop sampler, Pillow resizing.

Everything random takes an explicit ``np.random.Generator`` so a caller decides the seeding
(the datasets derive one generator per (seed, epoch, index); see ``sample_rng``).
"""
import math
from typing import Sequence, Tuple

import numpy as np

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one sample's augmentation: a pure function of (seed, epoch, index).

    Making augmentation a function of the sample rather than of a shared stream is what lets a
    prefetching loader (or a resumed run) reproduce exactly the same images in any order.
    """
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of the last two axes, half-pixel centres, edges clamped (no antialiasing).

    The source coordinate of output pixel ``o`` is ``(o + 0.5) * in / out - 0.5`` clamped to
    ``[0, in - 1]``: the convention of ``torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False)`` and of OpenCV's ``INTER_LINEAR``. Meant for upsampling (when shrinking
    by more than 2× it aliases, as those do).

    Args:
        x: array [..., H, W] (any float or integer dtype; computed in float32 unless float64).
        height, width: output size.

    Returns:
        Array [..., height, width], float32 (float64 if ``x`` is float64).

    Example:
        >>> resize_bilinear(np.eye(2, dtype=np.float32), 4, 4).shape
        (4, 4)
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"resize_bilinear: output size must be positive, got {height}x{width}")
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"resize_bilinear: expected an array [..., H, W], got shape {x.shape}")
    dtype = np.float64 if x.dtype == np.float64 else np.float32
    x = x.astype(dtype, copy=False)

    def axis(n_in: int, n_out: int):
        src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        src = np.clip(src, 0.0, n_in - 1)
        i0 = np.floor(src).astype(np.intp)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (src - i0).astype(dtype)

    r0, r1, wr = axis(x.shape[-2], height)
    c0, c1, wc = axis(x.shape[-1], width)
    rows = x[..., r0, :] * (1 - wr)[:, None] + x[..., r1, :] * wr[:, None]
    return rows[..., c0] * (1 - wc) + rows[..., c1] * wc


def random_resized_crop_params(rng: np.random.Generator, height: int, width: int,
                               scale: Sequence[float], ratio: Sequence[float]) -> Tuple[int, int, int, int]:
    """Sample a crop box (top, left, h, w) as torchvision's ``RandomResizedCrop.get_params``.

    Ten tries of area ~ U(scale)·H·W and aspect ~ log-U(ratio); if none fits, a centre crop
    with the aspect clamped into ``ratio``. ``scale=(1, 1), ratio=(1, 1)`` (the MaPeT
    pre-training setting) is deterministic: the largest centred square.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int, crop_h: int, crop_w: int) -> Tuple[int, int, int, int]:
    """(top, left, h, w) of a centred crop, rounding as torchvision's ``CenterCrop``."""
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return top, left, crop_h, crop_w


_PIL_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def pil_filter(name: str) -> int:
    """Pillow resampling constant for an interpolation name (nearest/bilinear/bicubic/lanczos/box/hamming)."""
    try:
        return _PIL_FILTERS[name]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}; expected one of {sorted(_PIL_FILTERS)}") from None


def pil_to_chw(img) -> np.ndarray:
    """An RGB Pillow image → float32 [3, H, W] in [0, 1]."""
    a = np.asarray(img, dtype=np.uint8)
    return np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32) * np.float32(1 / 255)


def normalize(images: np.ndarray, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
              std: Sequence[float] = IMAGENET_DEFAULT_STD) -> np.ndarray:
    """Per-channel ``(x - mean) / std`` for NCHW (or CHW) float images; returns float32."""
    x = np.asarray(images, dtype=np.float32)
    shape = (-1, 1, 1)
    return (x - np.asarray(mean, np.float32).reshape(shape)) / np.asarray(std, np.float32).reshape(shape)


# ------------------------------------------------------------------ RandAugment (timm "rand-m9-mstd0.5-inc1")

#: The fill of pixels a geometric op uncovers: timm's ImageNet mean as bytes.
_FILL = (124, 116, 104)
#: timm's ``_RAND_INCREASING_TRANSFORMS`` (stronger magnitude = stronger change for every op).
RAND_AUGMENT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def parse_randaugment(spec: str) -> Tuple[int, float, float]:
    """``"rand-m9-mstd0.5-inc1"`` (timm's notation; ``n`` ops, default 2) → (n, magnitude, magnitude std).

    Only the increasing op set (``inc1``) is provided."""
    parts = str(spec).split("-")
    if parts[0] != "rand":
        raise ValueError(f"randaugment: expected a spec like 'rand-m9-mstd0.5-inc1', got {spec!r}")
    n, m, mstd = 2, 9.0, 0.5
    for p in parts[1:]:
        try:
            if p.startswith("mstd"):
                mstd = float(p[4:])
            elif p.startswith("m"):
                m = float(p[1:])
            elif p.startswith("n"):
                n = int(p[1:])
            elif p.startswith("inc"):
                if p != "inc1":
                    raise ValueError
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"randaugment: cannot read {p!r} in {spec!r} (known: n<ops>, m<magnitude>, "
                             "mstd<std>, inc1)") from None
    if n < 0 or not 0 <= m <= 10 or mstd < 0:
        raise ValueError(f"randaugment: need n >= 0, 0 <= m <= 10, mstd >= 0; got {spec!r}")
    return n, m, mstd


def rand_augment_op(img, name: str, magnitude: float, sign: float):
    """One RandAugment op on an RGB Pillow image at ``magnitude`` in [0, 10] (``sign`` ±1 for the
    ops that go both ways), with timm's level mappings."""
    from PIL import Image, ImageEnhance, ImageOps

    f = magnitude / 10.0
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(sign * 30.0 * f, resample=Image.BILINEAR, fillcolor=_FILL)
    if name == "PosterizeIncreasing":
        # keep 4 - int(4f) bits: 0 at magnitude 10 (black, as ImageOps.posterize did before Pillow
        # began refusing 0 bits), so the lookup table is Pillow's own, written here for every bits in 0..8
        bits = 4 - int(f * 4)
        mask = ~(2 ** (8 - bits) - 1) & 0xFF
        return img.point([i & mask for i in range(256)] * len(img.getbands()))
    if name == "SolarizeIncreasing":
        return ImageOps.solarize(img, 256 - int(f * 256))
    if name == "SolarizeAdd":
        add = int(f * 110)
        lut = [min(255, i + add) if i < 128 else i for i in range(256)] * 3
        return img.point(lut)
    enhancers = {"ColorIncreasing": ImageEnhance.Color, "ContrastIncreasing": ImageEnhance.Contrast,
                 "BrightnessIncreasing": ImageEnhance.Brightness, "SharpnessIncreasing": ImageEnhance.Sharpness}
    if name in enhancers:
        return enhancers[name](img).enhance(max(0.1, 1.0 + sign * 0.9 * f))
    w, h = img.size
    affine = {"ShearX": (1, sign * 0.3 * f, 0, 0, 1, 0), "ShearY": (1, 0, 0, sign * 0.3 * f, 1, 0),
              "TranslateXRel": (1, 0, sign * 0.45 * f * w, 0, 1, 0),
              "TranslateYRel": (1, 0, 0, 0, 1, sign * 0.45 * f * h)}
    if name in affine:
        return img.transform(img.size, Image.AFFINE, affine[name], resample=Image.BILINEAR, fillcolor=_FILL)
    raise ValueError(f"rand_augment_op: unknown op {name!r}; known: {', '.join(RAND_AUGMENT_OPS)}")


def rand_augment(img, rng: np.random.Generator, n: int = 2, magnitude: float = 9.0, mstd: float = 0.5,
                 prob: float = 0.5):
    """RandAugment as timm's ``rand_augment_transform``: ``n`` ops drawn uniformly (with
    replacement), each applied with probability ``prob`` at a magnitude ~ N(magnitude, mstd)
    clipped to [0, 10], direction ±1 with equal odds. All draws come from ``rng``."""
    for _ in range(int(n)):
        name = RAND_AUGMENT_OPS[int(rng.integers(len(RAND_AUGMENT_OPS)))]
        apply = rng.random() < prob
        m = float(np.clip(rng.normal(magnitude, mstd), 0.0, 10.0)) if mstd > 0 else float(magnitude)
        sign = -1.0 if rng.random() < 0.5 else 1.0
        if apply:
            img = rand_augment_op(img, name, m, sign)
    return img

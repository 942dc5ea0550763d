"""Visual tokenizers built on k-means (ALGORITHMS.md §3).

``PixelTokenizer`` (CCViT): k-means on raw patch pixels in [0, 1], each patch flattened in
(channel, row, col) order; a patch's token is its nearest centroid, and since centroids are
pixels, ``decode`` turns tokens back into images (to see what the tokens keep).

``FeatureTokenizer`` (MaPeT's k-CLIP): k-means on patch features [B, n_patches, d] of any
frozen encoder (CLIP in the reference, or mapet's own ViT ``forward_features``).

Both accept one array or an iterable of batches (streamed, with a tqdm progress bar over the
batches and k-means when ``progress`` says so: see :mod:`mapet.progress`), and ``save(path)`` / ``load(path)`` a safetensors file
holding the centroids with the configuration as JSON in the metadata.
"""
import json
import logging
from typing import Any, Dict, Iterable, Optional, Tuple, Union

import numpy as np

from .io import build_from_config, load_file, save_file
from .kmeans import KMeans
from .progress import wrap

__all__ = ["PixelTokenizer", "FeatureTokenizer"]

logger = logging.getLogger(__name__)


def _batches(data: Any) -> Tuple[Iterable[Any], Optional[int]]:
    """(iterable of batches, number of batches or None) for one array or an iterable of arrays."""
    if hasattr(data, "shape") or isinstance(data, np.ndarray):
        return [data], 1
    if isinstance(data, (list, tuple)) and data and np.ndim(data[0]) == 0:
        return [np.asarray(data)], 1
    try:
        total = len(data)
    except TypeError:
        total = None
    return data, total


def _progress(it: Iterable[Any], total: Optional[int], progress: Optional[bool], desc: str) -> Iterable[Any]:
    if total == 1:  # one array: the k-means bars show its progress
        return it
    return wrap(it, total, desc, unit="batch", progress=progress)


def _real(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a float array, got dtype {a.dtype}")
    return a


class _Tokenizer:
    _kind = ""

    def __init__(self, n_tokens: int, n_iter: int, n_redo: int, max_points_per_centroid: int,
                 spherical: bool, init: str, seed: int, verbose: bool, progress: Optional[bool] = None) -> None:
        self.n_tokens = int(n_tokens)
        self.verbose = bool(verbose)
        self.progress = True if self.verbose and progress is None else progress
        self.kmeans = KMeans(n_tokens, n_iter=n_iter, n_redo=n_redo, spherical=spherical, init=init,
                             max_points_per_centroid=max_points_per_centroid, seed=seed, verbose=verbose,
                             progress=self.progress)

    @property
    def centroids(self) -> np.ndarray:
        """float32 [n_tokens, dim]: the codebook."""
        c = self.kmeans.cluster_centers_
        if c is None:
            raise RuntimeError(f"{self._kind}: call fit (or load) first")
        return c

    def _vectors(self, batch: Any) -> np.ndarray:  # [B, n, dim]
        raise NotImplementedError

    def _fit_vectors(self, data: Any) -> "_Tokenizer":
        it, total = _batches(data)
        parts = [self._vectors(b).reshape(-1, self._dim_of(b)) for b in
                 _progress(it, total, self.progress, f"{self._kind}: collecting")]
        if not parts:
            raise ValueError(f"{self._kind}.fit: got no batches")
        x = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        self.kmeans.fit(x)
        return self

    def _dim_of(self, batch: Any) -> int:
        return self._vectors_dim

    def _encode_vectors(self, data: Any) -> np.ndarray:
        it, total = _batches(data)
        out = []
        for b in _progress(it, total, self.progress, f"{self._kind}: encoding"):
            v = self._vectors(b)
            B, n, dim = v.shape
            out.append(self.kmeans.predict(v.reshape(B * n, dim)).reshape(B, n))
        if not out:
            raise ValueError(f"{self._kind}.encode: got no batches")
        return out[0] if len(out) == 1 else np.concatenate(out, axis=0)

    def _config(self) -> Dict[str, Any]:
        km = self.kmeans
        return dict(n_tokens=self.n_tokens, n_iter=km.n_iter, n_redo=km.n_redo,
                    max_points_per_centroid=km.max_points_per_centroid, spherical=km.spherical,
                    init=km.init, seed=km.seed)

    def save(self, path: str) -> None:
        """Write the centroids and the configuration (safetensors, config JSON in metadata)."""
        save_file({"centroids": self.centroids}, path,
                  metadata={"mapet_tokenizer": self._kind, "config": json.dumps(self._config())})

    @classmethod
    def load(cls, path: str) -> Any:
        """Read a tokenizer written by ``save``."""
        tensors, meta = load_file(path)
        if meta.get("mapet_tokenizer") != cls._kind:
            raise ValueError(f"{path}: expected a {cls._kind} file, found tokenizer kind "
                             f"{meta.get('mapet_tokenizer')!r}")
        if "config" not in meta:
            raise ValueError(f"{path}: bad tokenizer config in the metadata (no 'config' entry)")
        tok = build_from_config(path, meta["config"], cls, "tokenizer config in the metadata", wrap=ValueError)
        if set(tensors) != {"centroids"}:
            raise ValueError(f"{path}: expected one tensor 'centroids', found {sorted(tensors)}")
        c = tensors["centroids"]
        if c.dtype.kind != "f" or c.ndim != 2:
            raise ValueError(f"{path}: centroids must be a 2-d float array, got {c.dtype} {c.shape}")
        c = np.ascontiguousarray(c, dtype=np.float32)
        if c.shape[0] != tok.n_tokens:
            raise ValueError(f"{path}: centroids have {c.shape[0]} rows but the config says n_tokens={tok.n_tokens}")
        width = getattr(tok, "_vectors_dim", None)
        if width is not None and c.shape[1] != width:
            raise ValueError(f"{path}: centroids have width {c.shape[1]}, the config's patches have {width} values")
        if c.shape[1] < 1 or not np.all(np.isfinite(c)):
            raise ValueError(f"{path}: centroids must be finite with at least one column")
        tok.kmeans.cluster_centers_ = c
        tok._after_load(c)
        return tok

    def _after_load(self, c: np.ndarray) -> None:
        pass


class PixelTokenizer(_Tokenizer):
    """CCViT's centroid tokenizer: k-means on raw pixel patches.

    Args:
        patch_size: square patch side p; images [B, C, H, W] need H and W divisible by p.
        n_tokens: k (8192 in CCViT).
        n_iter, n_redo, max_points_per_centroid, spherical, init, seed, verbose, progress: as
            ``mapet.KMeans`` (``verbose`` also turns the progress bars on).
        in_chans: image channels C (3).

    Example:
        >>> import numpy as np, mapet
        >>> imgs = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
        >>> tok = mapet.PixelTokenizer(patch_size=8, n_tokens=16, n_iter=5).fit(imgs)
        >>> tok.encode(imgs).shape
        (4, 16)
    """
    _kind = "PixelTokenizer"

    def __init__(self, patch_size: int = 16, n_tokens: int = 8192, n_iter: int = 20, n_redo: int = 1,
                 max_points_per_centroid: int = 256, spherical: bool = False, init: str = "random",
                 seed: int = 0, verbose: bool = False, in_chans: int = 3, progress: Optional[bool] = None) -> None:
        if int(patch_size) < 1:
            raise ValueError(f"patch_size: expected ≥ 1, got {patch_size}")
        self.patch_size = int(patch_size)
        self.in_chans = int(in_chans)
        self._vectors_dim = self.in_chans * self.patch_size ** 2
        super().__init__(n_tokens, n_iter, n_redo, max_points_per_centroid, spherical, init, seed, verbose,
                         progress)

    def _config(self) -> Dict[str, Any]:
        return dict(super()._config(), patch_size=self.patch_size, in_chans=self.in_chans)

    def patchify(self, images: Any) -> np.ndarray:
        """[B, C, H, W] → float32 [B, (H/p)(W/p), C·p·p], patches row-major, each (channel, row, col)."""
        x = _real(images, "images")
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"images: expected [B, {self.in_chans}, H, W], got shape {x.shape}")
        B, C, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"images: H and W must be multiples of patch_size={p}, got {H}×{W}")
        x = x.reshape(B, C, H // p, p, W // p, p).transpose(0, 2, 4, 1, 3, 5)
        return np.ascontiguousarray(x.reshape(B, (H // p) * (W // p), C * p * p), dtype=np.float32)

    def unpatchify(self, patches: np.ndarray, grid: Optional[Tuple[int, int]] = None) -> np.ndarray:
        """Inverse of ``patchify``: [B, n, C·p·p] → [B, C, H, W] (grid (H/p, W/p), square by default)."""
        B, n, _ = patches.shape
        if grid is None:
            s = int(round(n ** 0.5))
            if s * s != n:
                raise ValueError(f"unpatchify: {n} patches are not a square grid; pass grid=(rows, cols)")
            grid = (s, s)
        gh, gw = grid
        if gh * gw != n:
            raise ValueError(f"grid: {gh}×{gw} ≠ {n} patches")
        p, C = self.patch_size, self.in_chans
        x = patches.reshape(B, gh, gw, C, p, p).transpose(0, 3, 1, 4, 2, 5)
        return np.ascontiguousarray(x.reshape(B, C, gh * p, gw * p))

    def _vectors(self, batch: Any) -> np.ndarray:
        return self.patchify(batch)

    def fit(self, images: Any) -> "PixelTokenizer":
        """k-means on the patches of images [B, C, H, W] in [0, 1] (or an iterable of such batches)."""
        return self._fit_vectors(images)

    def encode(self, images: Any) -> np.ndarray:
        """int32 [B, n_patches]: nearest centroid of each patch."""
        return self._encode_vectors(images)

    def decode(self, tokens: Any, grid: Optional[Tuple[int, int]] = None) -> np.ndarray:
        """Images [B, C, H, W] whose patches are the tokens' centroids."""
        t = np.asarray(tokens)
        if t.dtype.kind not in "iu":
            raise TypeError(f"tokens: expected an integer array, got dtype {t.dtype}")
        if t.ndim != 2:
            raise ValueError(f"tokens: expected [B, n_patches], got shape {t.shape}")
        c = self.centroids
        if t.size and (t.min() < 0 or t.max() >= c.shape[0]):
            raise ValueError(f"tokens: expected values in [0, {c.shape[0]}), got range [{t.min()}, {t.max()}]")
        return self.unpatchify(c[t], grid)


class FeatureTokenizer(_Tokenizer):
    """MaPeT's k-CLIP tokenizer: k-means on frozen-encoder patch features.

    Args:
        n_tokens: k (8192 in MaPeT).
        skip_tokens: leading tokens of each sequence to drop (1 for a ViT ``forward_features``
            output with a class token first).
        n_iter, n_redo, max_points_per_centroid, spherical, init, seed, verbose, progress: as ``mapet.KMeans``
            (the reference: 20 iterations, 5 restarts, 512 points per centroid).

    Example:
        >>> import numpy as np, mapet
        >>> f = np.random.default_rng(0).standard_normal((8, 49, 32)).astype(np.float32)
        >>> tok = mapet.FeatureTokenizer(n_tokens=16, n_iter=5).fit(f)
        >>> tok.encode(f).shape
        (8, 49)
    """
    _kind = "FeatureTokenizer"

    def __init__(self, n_tokens: int = 8192, n_iter: int = 20, n_redo: int = 1,
                 max_points_per_centroid: int = 256, spherical: bool = False, init: str = "random",
                 seed: int = 0, verbose: bool = False, skip_tokens: int = 0, progress: Optional[bool] = None) -> None:
        if int(skip_tokens) < 0:
            raise ValueError(f"skip_tokens: expected ≥ 0, got {skip_tokens}")
        self.skip_tokens = int(skip_tokens)
        super().__init__(n_tokens, n_iter, n_redo, max_points_per_centroid, spherical, init, seed, verbose,
                         progress)

    def _config(self) -> Dict[str, Any]:
        return dict(super()._config(), skip_tokens=self.skip_tokens)

    def _vectors(self, batch: Any) -> np.ndarray:
        f = _real(batch, "features")
        if f.ndim != 3:
            raise ValueError(f"features: expected [B, n_patches, d], got shape {f.shape}")
        f = f[:, self.skip_tokens:]
        d = self.kmeans.d
        if d is not None and f.shape[2] != d:
            raise ValueError(f"features: expected d = {d} (the fitted centroids'), got shape {f.shape}")
        return f

    def _dim_of(self, batch: Any) -> int:
        return np.shape(batch)[2]

    def fit(self, features: Any) -> "FeatureTokenizer":
        """k-means on features [B, n_patches, d] (or an iterable of such batches)."""
        return self._fit_vectors(features)

    def encode(self, features: Any) -> np.ndarray:
        """int32 [B, n_patches − skip_tokens]: nearest centroid of each patch feature."""
        return self._encode_vectors(features)

    @classmethod
    def from_clip(cls, model: Any, data: Any, k: int = 8192, **kwargs: Any) -> "FeatureTokenizer":
        """k-CLIP: fit on the patch features of a CLIP tower over ``data`` (a ``mapet.clip.CLIPTokenizer``,
        whose ``encode_images`` maps images to tokens). See :func:`mapet.clip.kclip.from_clip`."""
        from .clip.kclip import from_clip
        return from_clip(model, data, k=k, **kwargs)

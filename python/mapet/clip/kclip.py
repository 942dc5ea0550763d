"""k-CLIP: MaPeT's visual tokenizer (ALGORITHMS.md §3) end to end on a CLIP image tower.

``FeatureTokenizer.from_clip(model, data, k=8192)`` streams the data through the frozen tower,
keeps a random fraction of each batch's patch features (for a ViT tower every token after ``ln_post``
except the class token, for a ModifiedResNet tower — the reference's default RN50x64 — the layer-4
grid, as the reference's ``intermediate_features``), caps the kept set at
``k · max_points_per_centroid`` rows with reservoir sampling (so memory is bounded by the cap plus
one batch, and the sample stays uniform over everything seen), fits mapet's k-means on it, and
returns a ``CLIPTokenizer`` whose ``encode_images`` maps images to token ids [B, n_patches].

Also: the CLIP teacher of DTM (``clip_teacher``: images → ``forward_features(proj=True)``) and the
``tokenize`` command's k-CLIP path (``tokenize_dataset_kclip``).
"""
import json
import logging
import os
from typing import Any, Callable, Iterator, Optional

import numpy as np

from ..tokenizers import FeatureTokenizer, _progress
from .preprocess import preprocess as _preprocess
from .resnet import ModifiedResNet, _arch_from_state_dict, _read_weights
from .vit import CLIPVisionTransformer, config_from_state_dict, read_clip_state_dict

log = logging.getLogger(__name__)

__all__ = ["CLIPTokenizer", "from_clip", "load_clip", "is_clip_checkpoint", "clip_teacher", "image_batches"]


def is_clip_checkpoint(path: Any) -> bool:
    """True when ``path`` is a safetensors file holding a CLIP ViT image tower (``visual.conv1.weight`` /
    ``conv1.weight`` with ``class_embedding``); only the header is read."""
    try:
        with open(os.fspath(path), "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 1 << 28:
                return False
            keys = set(json.loads(f.read(n)))
    except (OSError, ValueError, TypeError):
        return False
    return any({p + "conv1.weight", p + "class_embedding"} <= keys for p in ("visual.", ""))


def load_clip(source: Any, quick_gelu: bool = True, precision: str = "fp32", **overrides: Any) -> Any:
    """A CLIP tower from a model (a ``CLIPVisionTransformer`` or ``ModifiedResNet``, returned as is), a
    safetensors path or a state dict; the geometry is read off the shapes (``overrides`` as
    ``mapet.create_model``'s). A ViT checkpoint gives a ViT tower; one with ``layer1…layer4`` and
    ``attnpool`` a ModifiedResNet."""
    if isinstance(source, (CLIPVisionTransformer, ModifiedResNet)):
        return source
    if not is_clip_checkpoint(source) and not (isinstance(source, dict) and any(
            k.endswith("class_embedding") for k in source)):
        weights = _read_weights(source)
        if any(k.endswith("attnpool.c_proj.weight") for k in weights):
            cfg = dict(_arch_from_state_dict(weights), **overrides)
            model = ModifiedResNet(precision=precision, **cfg)
            model.pretrained_report = model.load_state_dict(weights)
            return model
    tensors = read_clip_state_dict(source)
    cfg = dict(config_from_state_dict(tensors), **overrides)
    if "heads" not in cfg:
        raise ValueError(f"clip: width {cfg['width']} is not a multiple of 64; give heads= explicitly")
    model = CLIPVisionTransformer(quick_gelu=quick_gelu, precision=precision, **cfg)
    model.load_state_dict(tensors, strict=True)
    return model


def image_batches(data: Any, batch_size: int = 64) -> Iterator[np.ndarray]:
    """Float image batches [b, C, H, W] of ``data``: an array [N, C, H, W] (sliced), a dataset
    (``len`` + ``__getitem__`` returning ``image`` or ``(image, ...)``), or an iterable of batches
    (arrays or tuples whose first element is the images)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if hasattr(data, "shape"):
        a = np.asarray(data)
        if a.ndim != 4:
            raise ValueError(f"images: expected [N, C, H, W], got shape {a.shape}")
        for i in range(0, a.shape[0], batch_size):
            yield a[i:i + batch_size]
        return
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (list, tuple)):
        n = len(data)
        for i in range(0, n, batch_size):
            items = [data[j] for j in range(i, min(n, i + batch_size))]
            yield np.stack([np.asarray(it[0] if isinstance(it, tuple) else it, np.float32) for it in items])
        return
    for batch in data:
        yield np.asarray(batch[0] if isinstance(batch, tuple) else batch)


def _total_batches(data: Any, batch_size: int) -> Optional[int]:
    try:
        n = data.shape[0] if hasattr(data, "shape") else len(data)
    except TypeError:
        return None
    if hasattr(data, "shape") or (hasattr(data, "__getitem__") and not isinstance(data, (list, tuple))):
        return -(-n // batch_size)
    return n


class CLIPTokenizer(FeatureTokenizer):
    """A ``FeatureTokenizer`` on the ``ln_post`` patch tokens of a CLIP tower (k-CLIP).

    ``encode(features)`` takes tower outputs [B, 1 + n, width] (the class token is skipped);
    ``encode_images(images)`` runs the tower first. The file written by ``save`` is a
    ``FeatureTokenizer`` file (centroids + config); ``CLIPTokenizer.load(path, model)`` pairs it
    with its tower again.

    Args:
        model: the CLIP tower (``mapet.clip.CLIPVisionTransformer``).
        preprocess: apply CLIP's preprocessing to the images (``mapet.clip.preprocess``: resize to the
            tower's size when needed, CLIP mean/std); False for images that already are (e.g.
            ``mapet.clip.ImageFolder`` items); None decides per dataset (its ``clip_preprocessed``).
        batch_size: images per tower call.
        **kwargs: ``FeatureTokenizer``'s (n_tokens, n_iter, n_redo, max_points_per_centroid, ...).
    """

    def __init__(self, model: Any = None, preprocess: Optional[bool] = None,
                 batch_size: int = 64, **kwargs: Any) -> None:
        # A ViT tower's token 0 is its class token; a ResNet grid has none.
        kwargs.setdefault("skip_tokens", 0 if isinstance(model, ModifiedResNet) else 1)
        super().__init__(**kwargs)
        self.model = model
        self.preprocess = preprocess
        self.batch_size = int(batch_size)

    def _tower(self) -> Any:
        if self.model is None:
            raise RuntimeError("CLIPTokenizer: no CLIP tower (give model=, or load(path, model))")
        return self.model

    def clip_features(self, images: Any, preprocess: Optional[bool] = None) -> np.ndarray:
        """Tower features of one image batch: ViT tokens after ``ln_post`` [B, 1 + n, width], or a
        ResNet's layer-4 grid [B, n, C]."""
        m = self._tower()
        do = self.preprocess if preprocess is None else preprocess
        size = m.config["image_size"] if isinstance(m, ModifiedResNet) else m.config["img_size"]
        x = _preprocess(images, size) if do or do is None else images
        return m.forward_features(x, batch_size=self.batch_size)

    def encode_images(self, data: Any, preprocess: Optional[bool] = None) -> np.ndarray:
        """int32 [N, n_patches]: the token of every patch of every image of ``data`` (an array, a
        dataset or an iterable of batches, as ``from_clip``)."""
        do = _decide_preprocess(data, self.preprocess if preprocess is None else preprocess)
        out = [self.encode(self.clip_features(b, do)) for b in
               _progress(image_batches(data, self.batch_size), _total_batches(data, self.batch_size),
                         self.progress, "k-CLIP: encoding")]
        if not out:
            raise ValueError("CLIPTokenizer.encode_images: got no images")
        return np.concatenate(out) if len(out) > 1 else out[0]

    @classmethod
    def load(cls, path: str, model: Optional[CLIPVisionTransformer] = None) -> "CLIPTokenizer":  # type: ignore[override]
        """Read a tokenizer written by ``save`` and attach the tower ``model``."""
        tok = super().load(path)
        tok.model = model
        return tok


def _decide_preprocess(data: Any, preprocess: Optional[bool]) -> bool:
    if preprocess is None:
        return not getattr(data, "clip_preprocessed", False)
    return bool(preprocess)


class Reservoir:
    """A uniform sample of at most ``cap`` rows of a stream (Vitter's Algorithm R): rows are kept
    until ``cap`` is reached, then row number t (0-based over the stream) replaces a random kept
    row with probability cap / (t + 1). Memory: ``cap`` rows, allocated once the cap is reached.

    Example:
        >>> r = Reservoir(3, np.random.default_rng(0))
        >>> r.add(np.arange(10.0)[:, None]); r.sample().shape
        (3, 1)
    """

    def __init__(self, cap: int, rng: np.random.Generator) -> None:
        if int(cap) < 1:
            raise ValueError(f"cap: expected ≥ 1 rows, got {cap}")
        self.cap, self.rng = int(cap), rng
        self.seen = 0
        self._chunks: list = []
        self._full: Optional[np.ndarray] = None

    def add(self, rows: np.ndarray) -> None:
        """Offer rows [m, d] (in stream order)."""
        rows = np.asarray(rows, np.float32)
        if self._full is None:
            room = self.cap - self.seen
            self._chunks.append(np.array(rows[:room]))
            self.seen += min(room, rows.shape[0])
            rows = rows[room:]
            if self.seen < self.cap:
                return
            self._full = np.concatenate(self._chunks)
            self._chunks = []
        if rows.shape[0] == 0:
            return
        t = self.seen + np.arange(rows.shape[0])
        slot = np.minimum((self.rng.random(rows.shape[0]) * (t + 1)).astype(np.int64), t)
        for i in np.nonzero(slot < self.cap)[0]:  # in stream order, as the sequential algorithm
            self._full[slot[i]] = rows[i]
        self.seen += rows.shape[0]

    def sample(self) -> Optional[np.ndarray]:
        """The kept rows [min(cap, seen), d], or None before any row arrived."""
        if self._full is not None:
            return self._full
        return np.concatenate(self._chunks) if self._chunks else None


def from_clip(model: Any, data: Any, k: int = 8192, *, sample_fraction: float = 0.1,
              max_points_per_centroid: int = 256, batch_size: int = 64, n_iter: int = 20, n_redo: int = 1,
              spherical: bool = False, init: str = "random", seed: int = 0, preprocess: Optional[bool] = None,
              quick_gelu: bool = True, verbose: bool = False, progress: Optional[bool] = None) -> CLIPTokenizer:
    """Fit a k-CLIP tokenizer: k-means on a random sample of a CLIP tower's patch features over ``data``.

    Args:
        model: a ``CLIPVisionTransformer``, or a CLIP checkpoint (safetensors path or state dict;
            ``quick_gelu`` says its activation).
        data: images in [0, 1] (mapet's datasets) or CLIP-preprocessed ones (see ``preprocess``): an
            array [N, C, H, W], a dataset (items ``(image, ...)``) or an iterable of batches.
        k: number of tokens (centroids); 8192 in MaPeT.
        sample_fraction: share of each batch's patch features kept as k-means candidates.
        max_points_per_centroid: the sample is capped at ``k · max_points_per_centroid`` rows
            (reservoir sampling once full: bounded memory, uniform over all candidates seen).
        batch_size: images per tower call.
        n_iter, n_redo, spherical, init, seed, verbose, progress: as ``mapet.KMeans`` (``seed`` also
            drives the sampling).
        preprocess: CLIP preprocessing of the images; None: unless ``data.clip_preprocessed``.

    Returns:
        A fitted ``CLIPTokenizer`` (``encode_images(images)`` → int32 [B, n_patches]).

    Example:
        >>> import numpy as np, mapet
        >>> clip = mapet.create_model("clip_vit_b16", img_size=32, patch_size=8, width=64, layers=1, heads=2, output_dim=8)
        >>> imgs = np.random.default_rng(0).random((20, 3, 32, 32)).astype(np.float32)
        >>> tok = mapet.FeatureTokenizer.from_clip(clip, imgs, k=4, sample_fraction=0.5, n_iter=3)
        >>> tok.encode_images(imgs[:2]).shape
        (2, 16)
    """
    if not (0 < float(sample_fraction) <= 1):
        raise ValueError(f"sample_fraction: expected a value in (0, 1], got {sample_fraction!r}")
    model = load_clip(model, quick_gelu=quick_gelu)
    tok = CLIPTokenizer(model, preprocess=preprocess, batch_size=batch_size, n_tokens=k, n_iter=n_iter,
                        n_redo=n_redo, max_points_per_centroid=max_points_per_centroid, spherical=spherical,
                        init=init, seed=seed, verbose=verbose, progress=progress)
    reservoir = Reservoir(int(k) * int(max_points_per_centroid), np.random.default_rng([int(seed), 0x6B636C6970]))
    do = _decide_preprocess(data, preprocess)
    for images in _progress(image_batches(data, batch_size), _total_batches(data, batch_size), tok.progress,
                            "k-CLIP: features"):
        f = tok.clip_features(images, do)[:, tok.skip_tokens:]
        f = f.reshape(-1, f.shape[-1])
        reservoir.add(f[reservoir.rng.random(f.shape[0]) < sample_fraction])
    sample, seen, cap = reservoir.sample(), reservoir.seen, reservoir.cap
    if sample is None or sample.shape[0] == 0:
        raise ValueError("from_clip: no patch features were sampled (empty data, or sample_fraction too small)")
    log.info("k-CLIP: %d of %d sampled patch features (cap %d) for k=%d", sample.shape[0], seen, cap, k)
    tok.sampled_ = int(sample.shape[0])
    tok.candidates_ = int(seen)
    tok.kmeans.fit(sample)
    return tok


def clip_teacher(teacher: Any) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """DTM's CLIP teacher: images in [0, 1] → CLIP-preprocessed → ``forward_features(proj=True)``
    [B, 1 + n, output_dim] (ALGORITHMS.md §5: final tokens after ln_post and proj). None when ``teacher`` is
    neither a ``CLIPVisionTransformer`` nor a CLIP checkpoint file."""
    if not isinstance(teacher, CLIPVisionTransformer):
        if not ((isinstance(teacher, (str, bytes)) or hasattr(teacher, "__fspath__")) and is_clip_checkpoint(teacher)):
            return None
        teacher = load_clip(teacher)
    model = teacher

    def features(images: np.ndarray) -> np.ndarray:
        return model.forward_features(_preprocess(np.asarray(images, np.float32), model.config["img_size"]), proj=True)

    features.model = model  # type: ignore[attr-defined]
    return features


def tokenize_dataset_kclip(cfg: dict) -> str:
    """The ``tokenize`` command with ``tokenizer=kclip``: fit k-CLIP on the training data through the
    CLIP tower of ``clip`` (a safetensors file) and write the token cache; returns its directory."""
    from .. import distributed
    from .._command_setup import _datasets, _is_main, _out, _view_id
    from ..data import TokenCache

    path = cfg.get("clip")
    if not path or not os.path.exists(str(path)):
        raise ValueError(f"config: tokenizer=kclip needs clip=<CLIP weights .safetensors>, got {path!r}")
    size = int(cfg["model"]["img_size"])
    grid = size // int(cfg["model"]["patch_size"])
    model = load_clip(path, quick_gelu=True)  # OpenAI weights (open_clip's *-quickgelu); from Python for others
    if model.grid != grid:
        raise ValueError(f"config: the CLIP tower sees {model.grid}×{model.grid} patches but the model "
                         f"{grid}×{grid}; tokens must align with patches (set model.img_size/patch_size so that "
                         f"img_size / patch_size = {model.grid})")
    train, _, _ = _datasets(cfg, size, "pretrain", need_val=False, what="tokenize")
    tok_cfg = cfg["tokenizer"]
    tok = from_clip(model, train, k=int(tok_cfg["n_tokens"]), n_iter=int(tok_cfg.get("n_iter", 20)),
                    sample_fraction=float(tok_cfg.get("sample_fraction") or 0.1),
                    seed=int(cfg.get("seed", 0)), progress=cfg.get("progress"), preprocess=True)
    cache = _out(cfg, "tokens")
    if _is_main():
        tok.save(_out(cfg, "kclip.safetensors"))
        writer = TokenCache.create(cache, len(train), grid * grid, tok.n_tokens, tok, dataset=_view_id(train),
                                   grid=(grid, grid))
        start = 0
        for images in image_batches(train, 64):
            tokens = tok.encode_images(images)
            writer.write(start, tokens)
            start += tokens.shape[0]
        writer.close()
    distributed.context().barrier()
    log.info("k-CLIP tokenized %d images into %s", len(train), cache)
    return cache

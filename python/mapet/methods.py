"""The pre-training methods: what one training step of each draws, computes and checkpoints.

Each method is one :class:`mapet.registry.PretrainMethod` entry registered here; :func:`mapet.train.pretrain`
and ``python -m mapet pretrain`` only look the entry up. A step of

- **MaPeT / PIM** draws a permutation per image (:class:`mapet.PermutationSampler`, state ``sampler``)
  and predicts the visual tokens of the non-context positions;
- **BEiT (MIM)** draws a block mask per image (:class:`mapet.BlockMaskGenerator`, state ``masks``)
  and predicts the masked patches' tokens;
- **CCViT** draws a block mask and, per image, the visible patches replaced by their centroid's pixels
  (stream ``replace``), and predicts tokens and normalised pixels of the corrupted patches;
- **DTM** draws a block mask and one morphing schedule per step (stream ``schedules``) and regresses
  the morphed teacher features.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import numpy as np

from .data import ArrayDataset
from .data.datasets import DatasetView
from .registry import PretrainMethod, register_method


#: The pre-training recipe's defaults (AdamW, linear warm-up then cosine), shared by
#: :func:`mapet.train.pretrain` and ``python -m mapet pretrain``.
PRETRAIN_RECIPE: Dict[str, Any] = dict(epochs=10, batch_size=64, lr=1.5e-3, weight_decay=0.05, warmup_epochs=1,
                                       warmup_start_lr=1e-6, min_lr=1e-5, clip_grad=3.0, accum_steps=1)


def _images_of(data: Any) -> np.ndarray:
    """The images of arrays, a tuple (images, labels) or an in-memory dataset, as C-contiguous float32."""
    if isinstance(data, tuple):
        data = data[0]
    elif not isinstance(data, np.ndarray):
        data = data.images
    return np.ascontiguousarray(data, dtype=np.float32)


def as_dataset(data: Any, labels: Any = None) -> Any:
    """(images, labels) tuple, an array, or a dataset object → a dataset."""
    if isinstance(data, tuple):
        return ArrayDataset(*data)
    if isinstance(data, np.ndarray):
        return ArrayDataset(data, labels)
    return data


class _ImagesWithTokens:
    """Images [n, C, H, W] with their visual tokens [n, num_patches] (or, ``per_patch=False``, any
    per-image rows such as stored teacher features): items (image, tokens)."""

    def __init__(self, images: np.ndarray, tokens: Any, n_patches: int, per_patch: bool = True):
        if not per_patch:
            self.images, self.tokens = images, tokens
            return
        tokens = np.asarray(tokens)
        if not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"tokens: expected an integer array, got dtype {tokens.dtype}")
        if tokens.shape != (images.shape[0], n_patches):
            raise ValueError(f"tokens: expected shape ({images.shape[0]}, {n_patches}) (one token per patch of "
                             f"every image), got {tokens.shape}")
        self.images, self.tokens = images, tokens

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple:
        return self.images[i], self.tokens[i]

    def get_batch(self, indices: np.ndarray) -> tuple:
        return self.images[indices], np.ascontiguousarray(self.tokens[indices])


class _WithRows(DatasetView):
    """A dataset whose items gain one row of ``rows`` (e.g. precomputed teacher features) last."""

    def __init__(self, dataset: Any, rows: Any) -> None:
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        return tuple(self.dataset[i]) + (np.asarray(self.rows[i]),)

    def get_batch(self, indices: np.ndarray) -> tuple:
        return tuple(self.dataset.get_batch(indices)) + (np.asarray(self.rows[np.asarray(indices)]),)


def first_images(data: Any) -> np.ndarray:
    """The first image of arrays or a dataset, as a batch of one [1, C, H, W] float32."""
    if isinstance(data, (np.ndarray, tuple)):
        return _images_of(data)[:1]
    return np.ascontiguousarray(np.asarray(data[0][0], np.float32)[None])


class _SeededCount:
    """A seed and a count of draws, checkpointed as ``{"seed", <key>}``; a checkpoint written with
    another seed is refused (the stream would silently change)."""

    key = "drawn"  # the count's name in the checkpoint (kept per subclass: the checkpoint format)
    what = "draws"

    def __init__(self, seed: int) -> None:
        self.seed, self.drawn = int(seed), 0

    def state_dict(self) -> Dict[str, Any]:
        return {"seed": self.seed, self.key: self.drawn}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"{self.what}: checkpoint seed {state['seed']} differs from this run's seed {self.seed}")
        self.drawn = int(state[self.key])


class _StepSeeds(_SeededCount):
    """One derived seed per training step from (seed, step): a resumable stream for DTM's
    per-step morphing schedules. Every rank of a distributed run draws the same seed for the
    same global step, as one process would for the whole batch."""

    key, what = "steps_drawn", "step seeds"

    def next(self) -> int:
        s = np.random.SeedSequence([self.seed & ((1 << 64) - 1), 0xCC, self.drawn]).generate_state(1, np.uint64)[0]
        self.drawn += 1
        return int(s) >> 1  # a non-negative int64


class _SampleStreams(_SeededCount):
    """A seed and a count of samples drawn: image i of a batch uses random stream
    ``samples_drawn + i`` (CCViT's choice of replaced patches). Distributed runs point
    ``samples_drawn`` at the rank's offset in the global batch (``_Loop._align_streams``), so the
    ranks together draw what one process would."""

    key, what = "samples_drawn", "sample streams"

    def take(self, count: int) -> int:
        first, self.drawn = self.drawn, self.drawn + int(count)
        return first


def _centroids_of(tokenizer: Any) -> np.ndarray:
    """The centroid pixels [K, C·P·P] of a PixelTokenizer, a path to one, or an array."""
    if tokenizer is None:
        raise ValueError("pretrain(method='ccvit'): needs tokenizer= (the PixelTokenizer, its file, or its "
                         "centroids [K, C·P·P]) to replace patches by their centroid's pixels")
    if isinstance(tokenizer, (str, bytes)) or hasattr(tokenizer, "__fspath__"):
        from .tokenizers import PixelTokenizer
        tokenizer = PixelTokenizer.load(tokenizer)
    centroids = getattr(tokenizer, "centroids", tokenizer)
    c = np.asarray(centroids, dtype=np.float32)
    if c.ndim != 2:
        raise ValueError(f"tokenizer: expected centroids [K, C·P·P], got shape {c.shape}")
    return c


def teacher_features(teacher: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A function images → teacher features [B, n(+1), d] for DTM.

    Args:
        teacher: a callable (images → features), a model with ``forward_features`` (e.g. a
            ``mapet.VisionTransformer``), or the path of a mapet model file: a ViT, or a
            pre-training model (MaPeT, BEiT, …) whose trunk weights are loaded into a ViT of the
            same shape. Its features are those of the final norm, class token first (dropped by
            :meth:`mapet.DTM.train_step`). A CLIP ViT tower (``mapet.clip``) or CLIP checkpoint file
            gives its ``ln_post`` tokens through ``proj`` on CLIP-preprocessed images (ALGORITHMS.md §5).
    """
    from .clip.kclip import clip_teacher
    clip = clip_teacher(teacher)
    if clip is not None:
        return clip
    if isinstance(teacher, (str, bytes)) or hasattr(teacher, "__fspath__"):
        from .models import VisionTransformer, load, load_pretrained
        model = load(teacher)
        if not isinstance(model, VisionTransformer):
            keys = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
                    "qkv_bias", "init_values")
            vit = VisionTransformer(global_pool="token", drop_path_rate=0.0, **{k: model.config[k] for k in keys})
            report = load_pretrained(vit, model.state_dict())
            trunk_missing = [k for k in report["missing"] if not k.startswith("head.") and not k.startswith("fc_norm.")]
            if trunk_missing:
                raise ValueError(f"teacher: {teacher} does not hold a full ViT trunk (missing {trunk_missing})")
            model = vit
        teacher = model
    if hasattr(teacher, "forward_features"):
        return teacher.forward_features
    if callable(teacher):
        return teacher
    raise TypeError(f"teacher: expected a callable, a model with forward_features, or a model file path, "
                    f"got {type(teacher).__name__}")



# ------------------------------------------------------------------ one run's wiring

@dataclass
class Run:
    """What a method's hooks see: the model (once built), the pretrain options this method reads
    (``least_number``, ``num_masking_patches`` and its own), the seed, and ``states``, the generator
    states to checkpoint (name → object with ``state_dict``/``load_state_dict``)."""

    method: PretrainMethod
    options: Dict[str, Any]
    seed: int
    model: Any = None
    states: Dict[str, Any] = field(default_factory=dict)
    features: Optional[Callable[[np.ndarray], np.ndarray]] = None  # DTM: teacher run on every batch

    @property
    def config(self) -> Dict[str, Any]:
        return self.model.config

    @property
    def grid(self) -> int:
        return self.config["img_size"] // self.config["patch_size"]

    @property
    def n_patches(self) -> int:
        return self.grid * self.grid


def paired_dataset(run: Run, data: Any, tokens: Any) -> Any:
    """The default inputs: ``data`` with its ``tokens`` [n, num_patches] when given, else ``data`` as is
    (a dataset yielding (image, ..., tokens), e.g. a token cache attached to a dataset)."""
    if tokens is not None:
        return _ImagesWithTokens(_images_of(data), tokens, run.n_patches)
    return as_dataset(data)


def _block_masks(run: Run):
    """BEiT block masks of ``num_masking_patches`` (default 75/196 of the patches), state ``masks``."""
    from .sampling import BlockMaskGenerator
    count = run.options.get("num_masking_patches") or int(round(run.n_patches * 75 / 196))
    masks = BlockMaskGenerator(run.grid, count, min_num_patches=min(16, count), seed=run.seed)
    run.states["masks"] = masks
    return masks


def _wire_permutation(run: Run) -> Callable:
    from .sampling import PermutationSampler
    model = run.model
    sampler = PermutationSampler(run.n_patches, least_number=run.options.get("least_number") or run.config["least_number"],
                                 seed=run.seed)
    run.states["sampler"] = sampler

    def step_fn(batch):
        images, toks = batch[0], batch[-1]
        return model.train_step(images, toks, sampler.sample(images.shape[0])), images.shape[0]
    return step_fn


def _wire_beit(run: Run) -> Callable:
    model, masks = run.model, _block_masks(run)

    def step_fn(batch):
        images, toks = batch[0], batch[-1]
        return model.train_step(images, toks, masks.sample(images.shape[0])), images.shape[0]
    return step_fn


def _prepare_ccvit(run: Run, data: Any, tokens: Any) -> Any:
    tokenizer = run.options.get("tokenizer")
    if tokens is None and hasattr(tokenizer, "encode") and isinstance(data, (np.ndarray, tuple)):
        tokens = tokenizer.encode(_images_of(data))  # centroid ids of the clean patches, computed once
    return paired_dataset(run, data, tokens)


def _wire_ccvit(run: Run) -> Callable:
    from .objectives import ccvit_corrupt, ccvit_pixel_targets
    model, cfg, masks = run.model, run.config, _block_masks(run)
    centroids = _centroids_of(run.options.get("tokenizer"))
    patch = cfg["patch_size"]
    if centroids.shape[1] != cfg["in_chans"] * patch * patch or centroids.shape[0] != cfg["num_tokens"]:
        raise ValueError(f"tokenizer: {centroids.shape[0]} centroids of {centroids.shape[1]} values; the model "
                         f"needs {cfg['num_tokens']} of {cfg['in_chans'] * patch * patch} (in_chans·patch²)")
    num_replace = run.options.get("num_replace")
    replace = int(round(run.n_patches * 20 / 196)) if num_replace is None else int(num_replace)
    token_weight, pixel_weight = run.options["token_weight"], run.options["pixel_weight"]
    streams = _SampleStreams(run.seed)
    run.states["replace"] = streams

    def step_fn(batch):
        images, toks = np.asarray(batch[0], np.float32), batch[-1]
        mask = masks.sample(images.shape[0])
        corrupted, replaced = ccvit_corrupt(images, mask, toks, centroids, replace, seed=streams.seed,
                                            first_sample=streams.take(images.shape[0]), patch_size=patch)
        targets = ccvit_pixel_targets(images, patch)
        return model.train_step(corrupted, toks, targets, mask, replaced, token_weight=token_weight,
                                pixel_weight=pixel_weight), images.shape[0]
    return step_fn


def _stored_teacher(run: Run) -> bool:
    """DTM with features precomputed once (an array, one row per image) rather than a teacher model."""
    return isinstance(run.options.get("teacher"), np.ndarray)


def _dtm_model_config(run: Run, data: Any) -> Dict[str, Any]:
    teacher = run.options.get("teacher")
    if _stored_teacher(run):
        return {"output_dim": int(teacher.shape[-1])}
    run.features = teacher_features(teacher)
    return {"output_dim": int(np.asarray(run.features(first_images(data))).shape[-1])}


def _prepare_dtm(run: Run, data: Any, tokens: Any) -> Any:
    if not _stored_teacher(run):
        if run.features is None:
            run.features = teacher_features(run.options.get("teacher"))
        return as_dataset(data)
    teacher, n = run.options["teacher"], run.n_patches
    count = len(data[0]) if isinstance(data, tuple) else len(data)
    if teacher.ndim != 3 or teacher.shape[0] != count or teacher.shape[1] not in (n, n + 1):
        raise ValueError(f"teacher: precomputed features must be [{count}, {n} (or {n + 1} "
                         f"with a class token), d] (one row per image of data), got {teacher.shape}")
    if isinstance(data, (np.ndarray, tuple)):
        return _ImagesWithTokens(_images_of(data), teacher, n, per_patch=False)
    return _WithRows(data, teacher)  # a streaming dataset: each item gains its feature rows


def _wire_dtm(run: Run) -> Callable:
    from .objectives import DTMSchedule
    model, masks, features, n = run.model, _block_masks(run), run.features, run.n_patches
    seeds = _StepSeeds(run.seed)
    run.states["schedules"] = seeds

    def step_fn(batch):
        images = np.asarray(batch[0], np.float32)
        target = np.asarray(batch[-1] if features is None else features(images), np.float32)
        schedules = DTMSchedule(seeds.next()).draw(n)
        return model.train_step(images, target, masks.sample(images.shape[0]), schedules=schedules), images.shape[0]
    return step_fn


# ------------------------------------------------------------------ the registry entries

register_method(PretrainMethod("mapet", "MaPeT", family="mapet", inputs="tokens", wire=_wire_permutation,
                               reads=("least_number",)))
register_method(PretrainMethod("pim", "PIM", family="pim", inputs="tokens", wire=_wire_permutation,
                               reads=("least_number",)))
# "mim" (masked image modeling, the papers' name for the baseline) is kept as an alias
register_method(PretrainMethod("beit", "MIM (BEiT)", family="beit", inputs="tokens", wire=_wire_beit,
                               reads=("num_masking_patches",), aliases=("mim",)))
CCVIT = register_method(PretrainMethod("ccvit", "CCViT", family="ccvit", inputs="tokens", wire=_wire_ccvit,
                               prepare=_prepare_ccvit, reads=("num_masking_patches",), section="ccvit",
                               options={"tokenizer": None, "num_replace": None, "token_weight": 1.0,
                                        "pixel_weight": 1.0}))
register_method(PretrainMethod("dtm", "DTM", family="dtm", inputs="teacher", wire=_wire_dtm,
                               prepare=_prepare_dtm, model_config=_dtm_model_config,
                               reads=("num_masking_patches",), section="dtm", options={"teacher": None}))

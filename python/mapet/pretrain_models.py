"""Pre-training models on the Swift engine: MaPeT, its PIM and BEiT (MIM) baselines, CCViT, DTM.

``create_pretrain_model("mapet_tiny_patch16_224")`` builds the two-stream MaPeT model with
auxiliary positional tokens (ALGORITHMS.md §2), ``"pim_…"`` the same without them, ``"beit_…"`` the
BEiT masked-image-modeling baseline, ``"ccvit_…"`` CCViT (ALGORITHMS.md §4: token head and pixel
head) and ``"dtm_…"`` the DTM student (ALGORITHMS.md §5: a masked encoder regressing morphed teacher
features). Parameters live in one contiguous Swift block under the PyTorch reference names
(``mask_positional_token``, ``decoder`` / ``mask_token``, ``lm_head``, CCViT's
``cls_pt_layers`` / ``cls_pt_norm`` / ``cls_pt_lm_head`` and the timm ViT names), so
``state_dict()`` / ``grads()`` are zero-copy NumPy views and weights move to and from the
reference models unchanged.

Example:
    >>> import numpy as np, mapet
    >>> from mapet.pretrain_models import create_pretrain_model
    >>> m = create_pretrain_model("mapet_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
    ...                           num_tokens=16, least_number=5)
    >>> batch = m.sampler(seed=0).sample(2)
    >>> images = np.random.rand(2, 3, 32, 32).astype(np.float32)
    >>> m(images, batch).shape
    (2, 12, 16)
    >>> loss = m.train_step(images, np.zeros((2, 16), np.int64), batch)
"""
import logging
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ._native import _core
from ._convert import images as _images, outputs as _outputs
from ._pretrain_base import (FORMAT, LEAST_NUMBER_SHARE, _PretrainModel, _tokens,  # noqa: F401
                             default_least_number)
from .io import load_file, model_from_file
from ._convert import i32 as _i32
from .registry import model_family, register_model_family, split_model_name
from .sampling import PermutationBatch, PermutationSampler

__all__ = ["MaPeT", "BEiT", "CCViT", "DTM", "create_pretrain_model", "load_pretrain_model"]

log = logging.getLogger(__name__)

# the model families of this module (``mapet.registry`` holds them with the ViT's)
_PRETRAIN_FAMILIES = ("mapet", "pim", "beit", "ccvit", "dtm")


class MaPeT(_PretrainModel):
    """The MaPeT two-stream model (ALGORITHMS.md §2), or PIM with ``positional_tokens=False``.

    Args:
        positional_tokens: True for MaPeT (content stream carries the auxiliary positional tokens
            m_j = mask_positional_token + pos_embed[p_j]), False for PIM (XLNet-style).
        seed: initialisation and drop-path seed.
        **config: ``img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio,
            qkv_bias, init_values, drop_path_rate`` (timm names), ``num_tokens`` (visual-token
            vocabulary, 8192) and ``least_number`` (context size for ``sampler()``; default 50 at 196 patches, ≈ 25 %).
    """

    def __init__(self, positional_tokens: bool = True, seed: int = 0, **config: Any) -> None:
        self._kind = "mapet" if positional_tokens else "pim"
        super().__init__(seed, config)

    @property
    def positional_tokens(self) -> bool:
        return self._kind == "mapet"

    def sampler(self, seed: Optional[int] = None, upper_limit: Optional[int] = None) -> PermutationSampler:
        """A ``PermutationSampler`` for this model (its num_patches and least_number)."""
        return PermutationSampler(self.num_patches, self.config["least_number"], upper_limit=upper_limit, seed=seed)

    def _batch(self, batch: Any) -> PermutationBatch:
        # only the handle is taken here: the engine checks the batch against the model and the images
        if not isinstance(batch, PermutationBatch):
            raise TypeError(f"batch: expected a mapet.PermutationBatch, got {type(batch).__name__}")
        return batch

    def __call__(self, images: Any, batch: PermutationBatch) -> np.ndarray:
        """Logits [B, P, num_tokens] at the predicted positions ``batch.predicted`` (ascending);
        inference (no drop path).

        Args:
            images: [B, in_chans, img_size, img_size] floats.
            batch: a ``PermutationBatch`` of B permutations over num_patches + 1 tokens.
        """
        # the engine checks the images and the batch against the model, then sizes and allocates the logits
        return _outputs(_core.twostream_forward(self._handle, _images(images), self._batch(batch)._handle, None))

    def train_step(self, images: Any, tokens: Any, batch: PermutationBatch, return_logits: bool = False):
        """Forward, mean cross-entropy over the predicted tokens (those in ``batch.loss_mask``)
        against ``tokens[b, p_j − 1]``, backward; adds the gradients into ``grads()``.

        Args:
            images: [B, in_chans, img_size, img_size] floats.
            tokens: [B, num_patches] visual token of every patch, any integer dtype.
            batch: the permutations (``PermutationBatch``).
            return_logits: also return the training-mode logits [B, P, num_tokens].

        Returns:
            The loss (float), or (loss, logits).

        Raises:
            TypeError/ValueError naming the bad input; ValueError on a non-finite loss (gradients
            and the drop-path generator unchanged).
        """
        # True: the engine allocates the logits and returns (loss, logits)
        return _outputs(_core.twostream_train_step(self._handle, _images(images), _tokens(tokens),
                                                   self._batch(batch)._handle, True if return_logits else None))


class BEiT(_PretrainModel):
    """BEiT masked image modeling (the MIM baseline): masked patch embeddings are replaced by
    ``mask_token``; ``lm_head(norm(x))`` predicts their visual tokens.

    Args: as ``MaPeT`` (``least_number`` is kept in the config but unused).
    """

    _kind = "beit"

    def __init__(self, seed: int = 0, **config: Any) -> None:
        super().__init__(seed, config)

    def _mask(self, mask: Any) -> np.ndarray:
        return _flags(mask, self.num_patches, "mask")

    def __call__(self, images: Any, mask: Any) -> np.ndarray:
        """Logits [B, M, num_tokens] at the masked patches (ascending per sample; every sample must
        mask the same number M), inference.

        Args:
            images: [B, in_chans, img_size, img_size] floats.
            mask: bool [B, num_patches] (e.g. ``BlockMaskGenerator.sample(B)``), True = masked.
        """
        # the engine checks the mask (shape, equal counts) and sizes the logits from it
        return _outputs(_core.mim_forward(self._handle, _images(images), self._mask(mask), None))

    def train_step(self, images: Any, tokens: Any, mask: Any, return_logits: bool = False):
        """Forward, mean cross-entropy over all masked patches, backward (adds into ``grads()``).

        Args:
            images: [B, in_chans, img_size, img_size] floats.
            tokens: [B, num_patches] visual tokens, any integer dtype.
            mask: bool [B, num_patches], True = masked (counts may differ between samples).
            return_logits: also return the logits [total masked, num_tokens] (sample-major).

        Returns:
            The loss (float), or (loss, logits).
        """
        return _outputs(_core.mim_train_step(self._handle, _images(images), _tokens(tokens), self._mask(mask),
                                             True if return_logits else None))


def _flags(flags: Any, n: int, name: str) -> np.ndarray:
    """Per-patch flags (bool, or integers with non-zero = flagged) as int32 0/1, a [B, grid, grid]
    array read as [B, n]: a conversion only. A float array is refused, which ``!= 0`` would turn
    into flags; the engine checks the shape against the images and the model."""
    m = np.asarray(flags)
    if not (m.dtype == np.bool_ or np.issubdtype(m.dtype, np.integer)):
        raise TypeError(f"{name}: expected a bool (or 0/1 integer) array [B, num_patches], got dtype {m.dtype}")
    if m.ndim == 3 and m.shape[1] * m.shape[2] == n:
        m = m.reshape(m.shape[0], n)
    return np.ascontiguousarray(m != 0, dtype=np.int32)


class CCViT(_PretrainModel):
    """CCViT (ALGORITHMS.md §4): BEiT-style masked encoder with two heads on the corrupted patches.

    The images come in already corrupted (:func:`mapet.ccvit_corrupt`: a few visible patches
    replaced by their centroid's pixels); ``mask`` patches are swapped for ``mask_token``.
    On the corrupted positions (``mask | replaced``):

    - token head: ``lm_head(norm(x_L))`` → cross-entropy against the centroid ids;
    - pixel head: ``[x_L class row ; x_early patch rows]`` → ``cls_pt_layers`` (``head_layers``
      blocks) → ``cls_pt_norm`` → ``cls_pt_lm_head`` → in_chans·patch² values, MSE against
      the per-patch normalised clean pixels (:func:`mapet.ccvit_pixel_targets`).

    Args: as ``MaPeT``, plus ``early_layers`` (blocks before the pixel head reads the patch
    tokens; 9 for a 12-block model) and ``head_layers`` (2). ``num_tokens`` = number of centroids.
    """

    _kind = "ccvit"
    _extra = {"early_layers": 9, "head_layers": 2}

    def __init__(self, seed: int = 0, **config: Any) -> None:
        super().__init__(seed, config)
        #: {"loss", "token_loss", "pixel_loss"} of the last ``train_step``.
        self.last_losses: Dict[str, float] = {}

    @property
    def pixel_dim(self) -> int:
        """Values per patch of the pixel head: in_chans · patch_size²."""
        return self.config["in_chans"] * self.config["patch_size"] ** 2

    def _flags(self, mask: Any, replaced: Any) -> Tuple[np.ndarray, np.ndarray]:
        return _flags(mask, self.num_patches, "mask"), _flags(replaced, self.num_patches, "replaced")

    def __call__(self, images: Any, mask: Any, replaced: Any) -> Tuple[np.ndarray, np.ndarray]:
        """Inference: (token logits [M, num_tokens], pixels [M, in_chans·patch²]) at the M
        corrupted patches (``mask | replaced``; sample-major, patch ascending)."""
        x = _images(images)
        m, r = self._flags(mask, replaced)
        # the engine counts the corrupted patches and allocates both outputs
        return _outputs(_core.ccvit_forward(self._handle, x, m, r, None, None))

    def train_step(self, images: Any, tokens: Any, pixel_targets: Any, mask: Any, replaced: Any, *,
                   token_weight: float = 1.0, pixel_weight: float = 1.0, return_outputs: bool = False):
        """Forward, ``token_weight · CE + pixel_weight · MSE`` on the corrupted patches, backward
        (adds into ``grads()``).

        Args:
            images: [B, in_chans, img_size, img_size] corrupted images.
            tokens: [B, num_patches] centroid ids of the clean patches.
            pixel_targets: [B, num_patches, in_chans·patch²] per-patch normalised clean pixels.
            mask: bool [B, num_patches], block-masked patches.
            replaced: bool [B, num_patches], centroid-replaced patches.
            token_weight, pixel_weight: the loss weights (1 : 1 in the paper).
            return_outputs: also return (token logits [M, num_tokens], pixels [M, in_chans·patch²]).

        Returns:
            The weighted loss (float), or (loss, logits, pixels). The two parts are in
            ``last_losses``.
        """
        x = _images(images)
        m, r = self._flags(mask, replaced)
        t = _tokens(tokens)
        tg = np.asarray(pixel_targets)
        if not np.issubdtype(tg.dtype, np.floating):
            raise TypeError(f"pixel_targets: expected a float array [B, num_patches, {self.pixel_dim}], got dtype {tg.dtype}")
        tg = np.asarray(tg, dtype=np.float32, order="C")  # a 0-d array stays 0-d for the engine's message
        want = True if return_outputs else None  # True: the engine allocates them and returns them after the losses
        loss, ce, mse, *outputs = _outputs(_core.ccvit_train_step(self._handle, x, t, tg, m, r, token_weight,
                                                                  pixel_weight, want, want))
        self.last_losses = {"loss": loss, "token_loss": ce, "pixel_loss": mse}
        return (loss, *outputs) if return_outputs else loss


class DTM(_PretrainModel):
    """The DTM student (ALGORITHMS.md §5): a BEiT-style masked encoder whose ``lm_head`` maps every
    patch token to the teacher's dimension ``output_dim``; trained with the group-mean
    smooth-L1 loss under dynamic token morphing of the teacher features
    (:func:`mapet.dtm_memberships`, :func:`mapet.ops.dtm_loss`).

    Args: as ``BEiT`` plus ``output_dim`` (the teacher feature dimension, 512 for CLIP ViT-B/16);
    ``num_tokens`` is unused.
    """

    _kind = "dtm"
    _extra = {"output_dim": 512}

    def __init__(self, seed: int = 0, **config: Any) -> None:
        super().__init__(seed, config)

    def __call__(self, images: Any, mask: Any = None) -> np.ndarray:
        """Predictions [B, num_patches, output_dim] at every patch (inference); ``mask`` (bool
        [B, num_patches]) swaps patches for ``mask_token``, None = nothing masked."""
        m = None if mask is None else _flags(mask, self.num_patches, "mask")  # None: the engine masks nothing
        return _outputs(_core.dtm_forward(self._handle, _images(images), m, None))

    def train_step(self, images: Any, target: Any, mask: Any, memberships: Any = None, *,
                   schedules: Optional[Sequence[Any]] = None, beta: float = 2.0, return_pred: bool = False):
        """Forward, DTM loss, backward (adds into ``grads()``).

        Args:
            images: [B, in_chans, img_size, img_size] floats.
            target: teacher features [B, num_patches, output_dim] (or [B, 1 + num_patches, …]
                with a class token first, which is dropped).
            mask: bool [B, num_patches], block-masked patches of the student's input.
            memberships: [L, B, num_patches] group ids (:func:`mapet.dtm_memberships`), or None
                to compute them from ``target`` under ``schedules``.
            schedules: the step's morphing schedules (``DTMSchedule.draw``), with memberships=None.
            beta: smooth-L1 transition point (2).
            return_pred: also return the predictions [B, num_patches, output_dim].

        Returns:
            The loss (float), or (loss, pred).
        """
        x = _images(images)
        n = self.num_patches
        t = np.asarray(target)
        if not np.issubdtype(t.dtype, np.floating):
            raise TypeError(f"target: expected float teacher features [B, {n}, {self.config['output_dim']}], got dtype {t.dtype}")
        if t.ndim == 3 and t.shape[1] == n + 1:
            t = t[:, 1:]
        t = np.asarray(t, dtype=np.float32, order="C")  # a 0-d array stays 0-d for the engine's message
        m = _flags(mask, n, "mask")
        if memberships is None:
            if schedules is None:
                raise ValueError("train_step: give memberships or schedules (e.g. DTMSchedule(seed).draw(num_patches))")
            # the engine checks the target, then morphs it under the schedules (as dtm_memberships does)
            mem: Any = ([int(s.r) for s in schedules], [int(s.iterations) for s in schedules])
        else:
            mem = np.asarray(memberships)
            if mem.dtype == np.bool_ or not np.issubdtype(mem.dtype, np.integer):
                raise TypeError(f"memberships: expected integer group ids [L, B, num_patches], got dtype {mem.dtype}")
            mem = _i32(mem[None] if mem.ndim == 2 else mem, "memberships")
        return _outputs(_core.dtm_train_step(self._handle, x, m, t, mem, float(beta), True if return_pred else None))


def _ccvit_config(config: Dict[str, Any]) -> Dict[str, Any]:
    if "early_layers" not in config:  # the pixel head reads the tokens after 3/4 of the blocks (9 of 12)
        config["early_layers"] = max(1, (3 * int(config.get("depth", 12))) // 4)
    return config


@register_model_family("mapet", "MaPeT")
def _mapet(seed: int = 0, **config: Any) -> "MaPeT":
    return MaPeT(positional_tokens=True, seed=seed, **config)


@register_model_family("pim", "PIM")
def _pim(seed: int = 0, **config: Any) -> "MaPeT":
    return MaPeT(positional_tokens=False, seed=seed, **config)


register_model_family("beit", "BEiT (MIM)")(BEiT)
register_model_family("ccvit", "CCViT", configure=_ccvit_config)(CCViT)
register_model_family("dtm", "DTM")(DTM)


def create_pretrain_model(name: str, seed: int = 0, **overrides: Any) -> "_PretrainModel":
    """Build a pre-training model by name.

    Args:
        name: ``<kind>_{tiny,small,base}_patch16_224`` with kind ``mapet`` (MaPeT), ``pim`` (PIM),
            ``beit`` (MIM), ``ccvit`` (CCViT) or ``dtm`` (DTM student): a model family of
            :mod:`mapet.registry`.
        seed: initialisation / drop-path seed (fixed default: creation is reproducible).
        **overrides: ``img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio,
            qkv_bias, init_values, drop_path_rate, num_tokens, least_number``; CCViT also
            ``early_layers`` (default 3/4 of depth: 9 of 12), ``head_layers``; DTM ``output_dim``.
            Defaults follow the paper's recipe: num_tokens 8192, least_number 50 at 196 patches
            (round(n·50/196) for n patches; a warning when < 4 tokens are left to predict), init_values 0.1,
            drop_path_rate 0.1.

    Example:
        >>> from mapet.pretrain_models import create_pretrain_model
        >>> create_pretrain_model("beit_small_patch16_224").config["embed_dim"]
        384
        >>> create_pretrain_model("ccvit_tiny_patch16_224", depth=4).config["early_layers"]
        3
    """
    family, size = split_model_name(name)
    if family.name not in _PRETRAIN_FAMILIES:
        raise ValueError(f"create_pretrain_model: {name!r} is not a pre-training model; available: "
                         f"{[n for f in _PRETRAIN_FAMILIES for n in model_family(f).names()]}")
    return family.create(size, seed=seed, **overrides)


def load_pretrain_model(path: str) -> "_PretrainModel":
    """Load a model written by ``save(path)`` (weights and config, strict names)."""
    tensors, metadata = load_file(path)
    kind = metadata.get("model")
    if metadata.get("format") != FORMAT or "config" not in metadata or kind not in _PRETRAIN_FAMILIES:
        raise ValueError(f"{path}: not a mapet pre-training model file (format={metadata.get('format')!r}, model={kind!r})")
    return model_from_file(path, tensors, metadata, lambda **config: model_family(kind).build(seed=0, **config))

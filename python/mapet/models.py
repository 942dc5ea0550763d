"""Vision Transformer classifier (timm names and layout) on the Swift engine.

``create_model("vit_tiny_patch16_224", num_classes=10, global_pool="avg")`` builds a ViT whose
parameters live in one contiguous Swift block; ``state_dict()`` and ``grads()`` are zero-copy
NumPy views under the timm / reference names, so weights move to and from PyTorch unchanged
and a distributed engine can all-reduce ``flat_grads`` in place.
"""
import json
import logging
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ._convert import batches as _batches, images as _images, indices, outputs as _outputs
from ._native import _core
from ._params import ParameterBlock
from .io import load_file, model_from_file, save_file
from .registry import TRUNK_DEFAULTS, named_models, register_model_family, split_model_name

log = logging.getLogger(__name__)

FORMAT = "mapet"

_DEFAULTS: Dict[str, Any] = dict(TRUNK_DEFAULTS, num_classes=1000, global_pool="token", init_values=None,
                                 drop_path_rate=0.0)

class VisionTransformer(ParameterBlock):
    """A ViT classifier (ALGORITHMS.md §1; timm ``VisionTransformer`` names).

    Args:
        img_size, patch_size, in_chans: input geometry (square images, side divisible by patch).
        num_classes: classifier outputs.
        global_pool: ``'token'`` (``norm`` → CLS → head) or ``'avg'`` (mean of patch tokens →
            ``fc_norm`` → head).
        embed_dim, depth, num_heads, mlp_ratio: transformer size.
        qkv_bias: biases on ``attn.q`` and ``attn.kv``.
        init_values: layer-scale init (``ls1.gamma``/``ls2.gamma``); None disables layer scale.
        drop_path_rate: stochastic depth, rising linearly 0 → rate over the blocks (training only).
        seed: initialisation and drop-path seed.
        precision: "fp32" or "bf16" (autocast-style mixed precision of every matrix product,
            see ``precision``).

    Example:
        >>> import numpy as np, mapet
        >>> m = mapet.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=2)
        >>> m(np.zeros((2, 3, 32, 32), np.float32)).shape
        (2, 10)
    """

    _precision_ops = (_core.vit_precision, _core.vit_set_precision)

    def __init__(self, *, seed: int = 0, precision: str = "fp32", **config: Any) -> None:
        unknown = sorted(set(config) - set(_DEFAULTS))
        if unknown:
            raise TypeError(f"VisionTransformer: unknown option(s) {unknown}; known: {sorted(_DEFAULTS)}")
        cfg = dict(_DEFAULTS, **config)
        cfg["init_values"] = None if cfg["init_values"] is None else float(cfg["init_values"])
        cfg["mlp_ratio"] = float(cfg["mlp_ratio"])
        cfg["drop_path_rate"] = float(cfg["drop_path_rate"])
        cfg["qkv_bias"] = bool(cfg["qkv_bias"])
        # the engine checks every value (types, ranges, the model's size); the config crosses as one dict
        self._handle = _core.vit_create(dict(cfg, seed=int(seed)))
        self.config: Dict[str, Any] = cfg
        self.seed = int(seed)
        self._bind(_core.vit_table(self._handle), *_core.vit_blocks(self._handle))
        self.precision = precision

    def zero_grad(self) -> None:
        """Clear the gradient block."""
        _core.vit_zero_grad(self._handle)

    def reseed(self, seed: int, stream: int = 0) -> None:
        """Restart the drop-path generator on ``stream`` of ``seed`` (training loops pass the
        micro-batch number, so a resumed run draws exactly the masks it would have drawn)."""
        _core.vit_reseed(self._handle, int(seed), int(stream))

    # ------------------------------------------------------------------ compute

    def _check(self, images: Any) -> np.ndarray:
        return _images(images)

    def __call__(self, images: Any) -> np.ndarray:
        """Logits [B, num_classes] for images [B, in_chans, img_size, img_size] (inference: no drop path)."""
        # the engine sizes and allocates the logits
        return _outputs(_core.vit_forward(self._handle, self._check(images), None, False))

    def predict(self, images: Any, batch_size: int = 256, probabilities: bool = False) -> np.ndarray:
        """Class indices int64 [B] (or softmax probabilities float32 [B, num_classes]) of images
        [B, in_chans, img_size, img_size], computed ``batch_size`` images at a time.

        Example:
            >>> import numpy as np, mapet
            >>> m = mapet.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1, num_classes=3)
            >>> m.predict(np.zeros((2, 3, 16, 16), np.float32)).shape
            (2,)
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        out = []
        for chunk in _batches(self._check(images), int(batch_size)):
            logits = self(chunk)
            if probabilities:
                z = np.exp(logits - logits.max(axis=1, keepdims=True))
                out.append((z / z.sum(axis=1, keepdims=True)).astype(np.float32))
            else:
                out.append(np.argmax(logits, axis=1).astype(np.int64))
        if not out:
            return np.zeros((0, self.config["num_classes"]) if probabilities else (0,),
                            np.float32 if probabilities else np.int64)
        return np.concatenate(out)

    def forward_features(self, images: Any) -> np.ndarray:
        """Final tokens [B, 1 + num_patches, embed_dim] (after ``norm`` for 'token' pooling, as timm)."""
        return _outputs(_core.vit_forward(self._handle, self._check(images), None, True))

    def train_step(self, images: Any, labels: Any, label_smoothing: float = 0.0,
                   return_logits: bool = False):
        """Forward, mean cross-entropy and backward; adds the gradients into ``grads()``.

        Args:
            images: [B, in_chans, img_size, img_size] floats.
            labels: [B] class indices, any integer dtype; or soft targets, floats [B, num_classes]
                whose rows are distributions (mixup/cutmix, :class:`mapet.data.mixup.Mixup`):
                the loss is then the soft-target cross-entropy −Σ q·log softmax (timm
                SoftTargetCrossEntropy), with any label smoothing already in the targets.
            label_smoothing: ε of the smoothed targets (timm LabelSmoothingCrossEntropy; hard labels only).
            return_logits: also return the training-mode logits [B, num_classes].

        Returns:
            The loss (float), or (loss, logits).

        Raises:
            TypeError/ValueError naming the bad input; on a non-finite loss ValueError and the
            gradients are unchanged.
        """
        x = self._check(images)
        logits = True if return_logits else None  # True: the engine allocates them and returns (loss, logits)
        soft = np.asarray(labels)
        if soft.ndim == 2 and np.issubdtype(soft.dtype, np.floating):  # soft targets (mixup/cutmix)
            if label_smoothing:
                raise ValueError("label_smoothing: soft targets carry their smoothing; expected 0, "
                                 f"got {label_smoothing}")
            return _outputs(_core.vit_train_step_soft(self._handle, x, np.ascontiguousarray(soft, np.float32), logits))
        y = indices(labels, "labels", "class indices")  # the engine checks the shape [B] and the range
        return _outputs(_core.vit_train_step(self._handle, x, y, float(label_smoothing), logits))

    def release_activations(self) -> None:
        """Free the cached training activations (re-allocated by the next ``train_step``)."""
        _core.vit_release(self._handle)

    # ------------------------------------------------------------------ files

    def save(self, path: str, optimizer: Optional["AdamW"] = None) -> None:  # noqa: F821
        """Write a safetensors file: weights by name, config in the metadata (and the AdamW state);
        ``data_config`` (input normalisation, see ``mapet.data.data_config``) when set."""
        tensors: Dict[str, np.ndarray] = dict(self._params)
        metadata = {"format": FORMAT, "model": "vit", "config": json.dumps(self.config)}
        from .data.data_config import metadata_entry
        metadata.update(metadata_entry(self))  # the input normalisation, when the model records one
        if optimizer is not None:
            state = optimizer.state_dict()
            for name, v in state.pop("exp_avg").items():
                tensors["optimizer.exp_avg." + name] = v
            for name, v in state.pop("exp_avg_sq").items():
                tensors["optimizer.exp_avg_sq." + name] = v
            metadata["optimizer"] = json.dumps(state)
        save_file(tensors, path, metadata)

    def __repr__(self) -> str:
        c = self.config
        return (f"VisionTransformer(embed_dim={c['embed_dim']}, depth={c['depth']}, num_heads={c['num_heads']}, "
                f"img_size={c['img_size']}, patch_size={c['patch_size']}, num_classes={c['num_classes']}, "
                f"global_pool={c['global_pool']!r}, params={self.num_params})")


register_model_family("vit", "ViT")(VisionTransformer)


def create_model(name: str, seed: int = 0, pretrained: Any = None, precision: str = "fp32", **overrides: Any) -> Any:
    """Build a model by timm name with timm-named overrides.

    Args:
        name: ``<family>_{tiny,small,base}_patch16_224`` of a family in :mod:`mapet.registry`:
            ``vit`` (classifier), or a pre-training model ``mapet`` / ``pim`` / ``beit`` / ``ccvit`` /
            ``dtm`` (see ``mapet.pretrain_models``); or a model registered by its full name, the
            frozen CLIP towers ``clip_vit_b16`` / ``clip_vit_b32`` / ``clip_vit_l14`` and
            ``clip_rn50`` / ``clip_rn101`` / ``clip_rn50x4`` / ``clip_rn50x16`` / ``clip_rn50x64`` (see ``mapet.clip``).
        seed: initialisation / drop-path seed.
        pretrained: a path to a safetensors file (``model.save`` output, or any reference
            checkpoint, including the BEiT / CCViT / DTM layout with fused ``attn.qkv``, see
            ``mapet.interop``) or a state_dict (name → array). The trunk architecture
            (``img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
            init_values``) is taken from the checkpoint's recorded config (or, for a bare state
            dict, read off the tensor shapes) unless given in ``overrides``. Every trunk tensor
            (``cls_token``, ``pos_embed``, ``patch_embed.*``, ``blocks.*``) must load: one that
            does not fit raises ValueError naming it. Only heads and decoders (``head``,
            ``fc_norm``, ``norm``, ``decoder``, ``lm_head``, ``cls_pt_*``, mask tokens) may be
            skipped; they are reported in ``model.pretrained_report`` and one log line.
        precision: "fp32" or "bf16": precision of the model's matrix products (``model.precision``;
            bf16 = inputs rounded to bfloat16, fp32 accumulation, everything else fp32).
        **overrides: ``img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio,
            num_classes, global_pool, init_values, drop_path_rate, qkv_bias``.

    Example:
        >>> import mapet
        >>> mapet.create_model("vit_small_patch16_224", num_classes=100).config["embed_dim"]
        384
        >>> mapet.create_model("vit_tiny_patch16_224", depth=2, precision="bf16").precision
        'bf16'
    """
    named = named_models(name)
    if named is not None:  # a model with its own name and loading (the CLIP towers)
        return named.create(name, seed=seed, pretrained=pretrained, precision=precision, **overrides)
    source = None
    if pretrained is not None:
        tensors, recorded = read_pretrained(pretrained)
        source = tensors
        for key, value in trunk_config(tensors, recorded).items():
            overrides.setdefault(key, value)
    family, size = split_model_name(name)
    model = family.create(size, seed=seed, **overrides)
    model.precision = precision
    if source is not None:
        model.pretrained_report = load_pretrained(model, source)
    return model


# The trunk: what a pre-trained model hands to the fine-tuned one. Anything else (classifier,
# final norms, decoders, token heads, CCViT's pixel head, mask tokens) belongs to one task.
_TRUNK = re.compile(r"^(cls_token|pos_embed|patch_embed\.|blocks\.)")
TRUNK_CONFIG = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
                "qkv_bias", "init_values")


def is_trunk_key(name: str) -> bool:
    """True for the tensors a transfer must keep: ``cls_token``, ``pos_embed``, ``patch_embed.*``, ``blocks.*``."""
    return bool(_TRUNK.match(name))


def read_pretrained(source: Any) -> Tuple[Dict[str, np.ndarray], Optional[Dict[str, Any]]]:
    """(tensors in mapet names without optimizer state, the recorded model config or None) of a
    pre-trained file or state dict."""
    recorded = None
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        tensors, metadata = load_file(source)
        if metadata.get("format") == FORMAT and "config" in metadata:
            recorded = json.loads(metadata["config"])
    else:
        tensors = dict(source)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}
    from .interop import from_beit_layout, is_beit_layout
    if is_beit_layout(tensors):  # BEiT / CCViT / DTM reference checkpoint: fused qkv, gamma_1/2
        tensors = from_beit_layout(tensors)
    return tensors, recorded


def trunk_config(tensors: Dict[str, Any], recorded: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The trunk architecture of a checkpoint: its recorded config where present, otherwise what
    the tensor shapes say (``num_heads`` cannot be read off shapes and is then left out)."""
    out: Dict[str, Any] = {}
    if recorded:
        out.update({k: recorded[k] for k in TRUNK_CONFIG if k in recorded})
    shape = {k: tuple(np.shape(v)) for k, v in tensors.items()}
    proj = shape.get("patch_embed.proj.weight")
    if proj is not None and len(proj) == 4:
        out.setdefault("embed_dim", proj[0])
        out.setdefault("in_chans", proj[1])
        out.setdefault("patch_size", proj[2])
        pos = shape.get("pos_embed")
        if pos is not None and len(pos) == 3:
            side = int(round((pos[1] - 1) ** 0.5))
            if side * side == pos[1] - 1:
                out.setdefault("img_size", side * proj[2])
    blocks = {int(m.group(1)) for k in tensors for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    if blocks:
        out.setdefault("depth", max(blocks) + 1)
        fc1 = shape.get("blocks.0.mlp.fc1.weight")
        if fc1 is not None and len(fc1) == 2 and fc1[1]:
            out.setdefault("mlp_ratio", fc1[0] / fc1[1])
        out.setdefault("qkv_bias", "blocks.0.attn.q.bias" in tensors)
        if "init_values" not in out:  # the value only seeds gamma, which the checkpoint then overwrites
            out["init_values"] = 0.1 if "blocks.0.ls1.gamma" in tensors else None
    return {k: (int(v) if isinstance(v, (np.integer,)) else v) for k, v in out.items()}


def load_pretrained(model: Any, source: Any, strict_trunk: bool = True) -> Dict[str, List[str]]:
    """Copy every parameter of ``source`` (path or state_dict) whose name and shape match.

    Args:
        model: the model to fill.
        source: a safetensors path or a state dict (mapet or BEiT reference layout).
        strict_trunk: raise if a trunk tensor of ``source`` (``is_trunk_key``) finds no
            place of its shape in ``model`` — the fine-tuned network would not be the pre-trained one.

    Returns:
        {"loaded": [...], "skipped": [...] (heads/decoders in the source the model does not have),
        "missing": [...] (model parameters left at their initialisation)}.

    Raises:
        ValueError: a trunk tensor would be dropped (names, shapes, and the config to change).
    """
    tensors, _ = read_pretrained(source)
    own = model.state_dict()
    staged, skipped, dropped = {}, [], []
    for k, v in tensors.items():
        if k in own and tuple(np.shape(v)) == own[k].shape:
            v = np.asarray(v)
            if v.dtype.kind not in "fiu":
                raise TypeError(f"pretrained: {k} has dtype {v.dtype}, expected a numeric array")
            v = v.astype(np.float32)
            if not np.all(np.isfinite(v)):
                raise ValueError(f"pretrained: {k} holds NaN or inf (or values beyond float32); the model is unchanged")
            staged[k] = v
        elif is_trunk_key(k):
            dropped.append(f"{k} {list(np.shape(v))}" + (f" (model: {list(own[k].shape)})" if k in own else
                                                         " (not in the model)"))
        else:
            skipped.append(k)
    if dropped and strict_trunk:
        raise ValueError(f"pretrained: {len(dropped)} trunk tensor(s) of the checkpoint do not fit the model "
                         f"and would be dropped: {', '.join(dropped[:8])}{' ...' if len(dropped) > 8 else ''}; "
                         "build the model with the checkpoint's architecture (leave img_size, patch_size, "
                         "embed_dim, depth, init_values ... unset to take them from the checkpoint)")
    for k, v in staged.items():  # all checked: copy in, all or nothing
        own[k][...] = v
    loaded = list(staged)
    skipped += [d.split(" ")[0] for d in dropped]
    missing = [k for k in own if k not in set(loaded)]
    log.info("pretrained: loaded %d tensors; skipped %s; left at init %s", len(loaded), skipped, missing)
    return {"loaded": loaded, "skipped": skipped, "missing": missing}


def load(path: str) -> VisionTransformer:
    """Load a model written by ``model.save(path)`` (weights and config; strict names).

    The optimizer state, if saved, is restored with ``AdamW.load(path)``.
    """
    tensors, metadata = load_file(path)
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise ValueError(f"{path}: not a mapet model file (metadata format={metadata.get('format')!r})")
    kind = metadata.get("model", "vit")
    if kind != "vit":
        from .pretrain_models import load_pretrain_model
        return load_pretrain_model(path)
    return model_from_file(path, {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}, metadata,
                           VisionTransformer)

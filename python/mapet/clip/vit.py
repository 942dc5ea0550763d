"""The CLIP ViT image tower (OpenAI / open_clip ``visual.*``; ALGORITHMS.md §6) on the Swift engine.

``mapet.create_model("clip_vit_b16", pretrained="ViT-B-16.safetensors")`` reads a full CLIP
state dict (``visual.*`` keys; the text tower is ignored) or the visual part alone, and gives a
frozen tower:

- ``encode_image(images)`` → [B, output_dim], equal to open_clip's ``encode_image`` (unnormalised);
- ``forward_features(images)`` → [B, 1 + N, width], every token after ``ln_post`` (the k-CLIP
  features, as the MaPeT reference's ``intermediate_features``);
- ``forward_features(images, proj=True)`` → [B, 1 + N, output_dim], the tokens through ``proj``
  (DTM's targets).

Images are CLIP-preprocessed float32 [B, 3, S, S] (``mapet.clip.preprocess``).
"""
import logging
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from .._convert import batches as _batches, images as images_f32, outputs as _outputs, seed_bits
from .._native import _core
from .._params import ParameterBlock
from ..io import load_file
from ..registry import register_named_models

log = logging.getLogger(__name__)

#: The published towers: OpenAI's ViT-B/32, ViT-B/16, ViT-L/14 at 224 px (open_clip ViT-*-quickgelu).
ARCHS: Dict[str, Dict[str, Any]] = {
    "clip_vit_b32": dict(img_size=224, patch_size=32, width=768, layers=12, heads=12, output_dim=512),
    "clip_vit_b16": dict(img_size=224, patch_size=16, width=768, layers=12, heads=12, output_dim=512),
    "clip_vit_l14": dict(img_size=224, patch_size=14, width=1024, layers=24, heads=16, output_dim=768),
}

_CONFIG_KEYS = ("img_size", "patch_size", "width", "layers", "heads", "mlp_ratio", "output_dim", "quick_gelu")


def read_clip_state_dict(source: Any) -> Dict[str, np.ndarray]:
    """The image tower's tensors of a CLIP checkpoint, under the tower's own names.

    Args:
        source: a safetensors path or a mapping name → array: a full OpenAI / open_clip CLIP state
            dict (``visual.*`` is kept with the prefix removed, the text tower and ``logit_scale``
            are dropped) or the visual part alone (names such as ``conv1.weight``).

    Returns:
        name → array (``conv1.weight``, ``class_embedding``, ``transformer.resblocks.0.ln_1.weight``, ...).
    """
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        tensors, _ = load_file(source)
    elif isinstance(source, Mapping):
        tensors = dict(source)
    else:
        raise TypeError(f"pretrained: expected a safetensors path or a mapping name -> array, "
                        f"got {type(source).__name__}")
    if any(k.startswith("visual.") for k in tensors):
        return {k[len("visual."):]: v for k, v in tensors.items() if k.startswith("visual.")}
    return dict(tensors)


def config_from_state_dict(tensors: Mapping[str, Any]) -> Dict[str, Any]:
    """The tower's geometry read off the tensor shapes (``heads`` = width / 64, as OpenAI's
    ``build_model``, when width is a multiple of 64; ``quick_gelu`` cannot be read off shapes).

    Raises:
        ValueError: ``conv1.weight`` or ``positional_embedding`` missing or not a square grid.
    """
    shape = {k: tuple(np.shape(v)) for k, v in tensors.items()}
    conv, pos, proj = shape.get("conv1.weight"), shape.get("positional_embedding"), shape.get("proj")
    if conv is None or len(conv) != 4 or pos is None or len(pos) != 2:
        raise ValueError("pretrained: not a CLIP ViT image tower (expected conv1.weight [width, 3, p, p] and "
                         f"positional_embedding [1 + N, width]; found {sorted(shape)[:8]} ...)")
    width, patch = conv[0], conv[2]
    side = int(round((pos[0] - 1) ** 0.5))
    if side * side != pos[0] - 1:
        raise ValueError(f"pretrained: positional_embedding {list(pos)} is not 1 + a square grid of tokens")
    layers = 1 + max([int(m.group(1)) for k in tensors for m in [re.match(r"transformer\.resblocks\.(\d+)\.", k)] if m],
                     default=-1)
    out: Dict[str, Any] = dict(img_size=side * patch, patch_size=patch, width=width, layers=layers)
    if width % 64 == 0:  # every published tower has 64-wide heads
        out["heads"] = width // 64
    fc = shape.get("transformer.resblocks.0.mlp.c_fc.weight")
    if fc is not None and len(fc) == 2:
        out["mlp_ratio"] = fc[0] / fc[1]
    if proj is not None and len(proj) == 2:
        out["output_dim"] = proj[1]
    return {k: (int(v) if isinstance(v, np.integer) else v) for k, v in out.items()}


class CLIPVisionTransformer(ParameterBlock):
    """A frozen CLIP ViT image tower (ALGORITHMS.md §6; OpenAI ``VisionTransformer`` names, without ``visual.``).

    Args:
        img_size, patch_size: input geometry (square images, side divisible by the patch).
        width, layers, heads, mlp_ratio: transformer size.
        output_dim: width of ``proj`` (the joint embedding).
        quick_gelu: MLP nonlinearity x·σ(1.702x) (OpenAI's weights and open_clip's ``*-quickgelu``);
            False for exact GELU (open_clip's LAION-trained ``ViT-*`` configs).
        seed: initialisation seed (OpenAI's init; real use loads weights over it).
        precision: "fp32" or "bf16" (inputs of every matrix product rounded to bfloat16, fp32
            accumulation; LayerNorm, softmax and the activation stay fp32).

    Example:
        >>> import numpy as np, mapet
        >>> m = mapet.create_model("clip_vit_b16", img_size=32, patch_size=8, width=64, layers=2, heads=2, output_dim=16)
        >>> m.forward_features(np.zeros((2, 3, 32, 32), np.float32)).shape
        (2, 17, 64)
        >>> m.encode_image(np.zeros((2, 3, 32, 32), np.float32)).shape
        (2, 16)
    """

    _precision_ops = (_core.clip_vit_precision, _core.clip_vit_set_precision)
    _kind = "clip_vit"

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, width: int = 768, layers: int = 12,
                 heads: int = 12, mlp_ratio: float = 4.0, output_dim: int = 512, quick_gelu: bool = True,
                 seed: int = 0, precision: str = "fp32") -> None:
        cfg = dict(img_size=img_size, patch_size=patch_size, width=width, layers=layers, heads=heads,
                   mlp_ratio=float(mlp_ratio), output_dim=output_dim, quick_gelu=bool(quick_gelu))
        # the engine checks every value (types, ranges, the tower's size); the config crosses as one dict
        self._handle = _core.clip_vit_create(dict(
            {k: v for k, v in cfg.items() if k != "quick_gelu"},
            activation="quick_gelu" if cfg["quick_gelu"] else "gelu", seed=seed_bits(seed)))
        for key in ("img_size", "patch_size", "width", "layers", "heads", "output_dim"):
            cfg[key] = int(cfg[key])  # accepted: stored as plain Python numbers (written to files as JSON)
        self.config: Dict[str, Any] = cfg
        self.seed = int(seed)
        self._table = _core.clip_vit_table(self._handle)
        self.flat_params = np.asarray(_core.clip_vit_params(self._handle))
        self._params = self._views(self.flat_params)
        self.precision = precision

    # A frozen tower: no gradient block.
    def grads(self):  # type: ignore[override]
        """Not available: the CLIP tower is frozen (inference only)."""
        raise TypeError("CLIPVisionTransformer is a frozen feature extractor: it has no gradients")

    grads_flat = grads

    @property
    def sequence_length(self) -> int:
        """Tokens per sequence: the patches and the class token."""
        return (self.config["img_size"] // self.config["patch_size"]) ** 2 + 1

    @property
    def num_tokens(self) -> int:
        """Former name of ``sequence_length`` (as ``PermutationBatch.num_tokens``)."""
        return self.sequence_length

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.config["img_size"] // self.config["patch_size"]

    def _run(self, images: Any, tokens: bool, projected: bool, embedding: bool,
             batch_size: Optional[int]) -> Tuple[Optional[np.ndarray], ...]:
        x = images_f32(images)
        c = self.config
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                       or batch_size < 1):
            raise ValueError(f"batch_size: expected a positive int or None, got {batch_size!r}")
        # True: the engine sizes and allocates that output from the checked images
        want = [True if w else None for w in (tokens, projected, embedding)]
        parts = [_outputs(_core.clip_vit_forward(self._handle, chunk, *want)) for chunk in _batches(x, batch_size)]
        if len(parts) == 1:
            return parts[0]
        shapes = ((self.sequence_length, c["width"]), (self.sequence_length, c["output_dim"]), (c["output_dim"],))
        return tuple(None if w is None else np.concatenate([q[k] for q in parts]) if parts
                     else np.zeros((0, *shapes[k]), np.float32) for k, w in enumerate(want))

    def forward_features(self, images: Any, proj: bool = False, batch_size: Optional[int] = 64) -> np.ndarray:
        """Every token after ``ln_post``: float32 [B, 1 + N, width] (k-CLIP features; token 0 is the
        class token), or with ``proj=True`` those tokens through ``proj``: [B, 1 + N, output_dim]
        (DTM targets).

        Args:
            images: CLIP-preprocessed float [B, 3, img_size, img_size].
            proj: project the tokens with ``proj``.
            batch_size: images per engine call (bounds the activation memory); None = all at once.
        """
        t, p, _ = self._run(images, not proj, bool(proj), False, batch_size)
        return p if proj else t

    def encode_image(self, images: Any, batch_size: Optional[int] = 64) -> np.ndarray:
        """The image embedding ``ln_post(x)[:, 0] @ proj``: float32 [B, output_dim] (unnormalised, as
        open_clip's ``encode_image``)."""
        return self._run(images, False, False, True, batch_size)[2]

    __call__ = encode_image

    def load_clip_state_dict(self, source: Any) -> Dict[str, Any]:
        """Load a CLIP checkpoint (path or mapping; full CLIP or visual part) into the tower.

        Every tower tensor must be present with the model's shape; unknown ``visual.*`` tensors
        raise (they would mean a different architecture).

        Returns:
            {"loaded": [names], "ignored": number of non-visual tensors in the source}.
        """
        if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
            source, _ = load_file(source)
        total = len(source)
        visual = read_clip_state_dict(source)
        self.load_state_dict(visual, strict=True)
        return {"loaded": list(visual), "ignored": total - len(visual)}

    def __repr__(self) -> str:
        c = self.config
        return (f"CLIPVisionTransformer(width={c['width']}, layers={c['layers']}, heads={c['heads']}, "
                f"img_size={c['img_size']}, patch_size={c['patch_size']}, output_dim={c['output_dim']}, "
                f"quick_gelu={c['quick_gelu']}, params={self.num_params})")


@register_named_models("clip_vit", "CLIP ViT image tower", tuple(ARCHS))
def create_clip_vit(name: str, pretrained: Any = None, quick_gelu: bool = True, seed: int = 0,
                    precision: str = "fp32", **overrides: Any) -> CLIPVisionTransformer:
    """A CLIP ViT tower by name (``clip_vit_b16``, ``clip_vit_b32``, ``clip_vit_l14``).

    Args:
        name: one of ``ARCHS``.
        pretrained: a safetensors path or state dict (OpenAI / open_clip layout, full or visual
            part); the geometry (image size, patch, width, layers, output_dim) is read off its shapes
            unless given in ``overrides``.
        quick_gelu: True for OpenAI weights (QuickGELU), False for open_clip's LAION ones (GELU).
        seed, precision: as ``CLIPVisionTransformer``.
        **overrides: ``img_size, patch_size, width, layers, heads, mlp_ratio, output_dim``.

    Example:
        >>> import mapet
        >>> mapet.create_model("clip_vit_b32", layers=1).config["patch_size"]
        32
    """
    if name not in ARCHS:
        raise ValueError(f"create_model: unknown CLIP tower {name!r}; available: {sorted(ARCHS)}")
    unknown = sorted(set(overrides) - set(_CONFIG_KEYS))
    if unknown:
        raise TypeError(f"{name}: unknown option(s) {unknown}; known: {sorted(set(_CONFIG_KEYS) - {'quick_gelu'})}")
    cfg = dict(ARCHS[name])
    tensors = None
    if pretrained is not None:
        tensors = read_clip_state_dict(pretrained)
        found = config_from_state_dict(tensors)
        if "heads" not in found and "heads" not in overrides:
            raise ValueError(f"pretrained: width {found['width']} is not a multiple of 64, so the number of "
                             "heads cannot be read off the checkpoint; pass heads=")
        cfg.update(found)
    cfg.update(overrides)
    model = CLIPVisionTransformer(quick_gelu=quick_gelu, seed=seed, precision=precision, **cfg)
    if tensors is not None:
        model.load_state_dict(tensors, strict=True)
        log.info("%s: loaded %d tensors", name, len(tensors))
    return model

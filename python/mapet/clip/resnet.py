"""CLIP's ModifiedResNet image towers (RN50, RN101, RN50x4/x16/x64) on the Swift engine, frozen.

Radford et al. 2021 (OpenAI ``clip/model.py``, open_clip ``modified_resnet.py``), ALGORITHMS.md §6: a stem
of three 3×3 convolutions (the first with stride 2), each followed by BatchNorm and ReLU, then a
2×2 average pool; four stages of bottlenecks (1×1, 3×3, 1×1 convolutions, expansion 4) that
downsample by average pooling *before* the last 1×1 convolution (anti-aliasing; no strided
convolution after the stem), with an avgpool → 1×1 conv → BN shortcut; ReLU after each BN and after
the residual sum. The layer-4 grid is what k-CLIP clusters; ``attnpool`` (one multi-head
attention whose query is the grid's mean, plus a positional embedding) gives the image embedding.

Inference only: BatchNorm (running statistics, eps 1e-5) is folded into the preceding
convolution when weights are loaded (in float64, then stored as float32), so every conv runs as
one im2col + GEMM call of the engine with its bias, shortcut add and ReLU fused
(:func:`mapet.ops.conv2d`). Parameters keep CLIP's names (``conv1.weight``, ``bn1.running_mean``,
``layer1.0.downsample.0.weight``, ``attnpool.q_proj.weight``...); ``load_state_dict`` also takes a
whole CLIP state dict (``visual.*``; the text tower is ignored).

Example:
    >>> import numpy as np, mapet
    >>> m = mapet.create_model("clip_rn50", layers=(1, 1, 1, 1), width=8, output_dim=16, image_size=64)
    >>> x = np.zeros((2, 3, 64, 64), np.float32)
    >>> m.forward_features(x).shape, m.encode_image(x).shape
    ((2, 4, 256), (2, 16))
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .._convert import images as images_f32
from .._native import _core
from ..io import load_file
from ..registry import register_named_models

__all__ = ["ModifiedResNet", "create_clip_resnet", "fold_batchnorm", "ARCHS"]

log = logging.getLogger(__name__)

#: the published towers: (layers, width, output_dim, image_size); heads = width·32 / 64
ARCHS: Dict[str, Dict[str, Any]] = {
    "clip_rn50": dict(layers=(3, 4, 6, 3), width=64, output_dim=1024, image_size=224),
    "clip_rn101": dict(layers=(3, 4, 23, 3), width=64, output_dim=512, image_size=224),
    "clip_rn50x4": dict(layers=(4, 6, 10, 6), width=80, output_dim=640, image_size=288),
    "clip_rn50x16": dict(layers=(6, 8, 18, 8), width=96, output_dim=768, image_size=384),
    "clip_rn50x64": dict(layers=(3, 15, 36, 10), width=128, output_dim=1024, image_size=448),
}
BN_EPS = 1e-5


def fold_batchnorm(weight: np.ndarray, gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray,
                   eps: float = BN_EPS) -> Tuple[np.ndarray, np.ndarray]:
    """(weight', bias') with conv(x, weight') + bias' = BN(conv(x, weight)) for BN in eval mode.

    ``scale = gamma / sqrt(var + eps)``; ``weight' = weight · scale`` per output channel;
    ``bias' = beta − mean · scale``. Computed in float64, returned as float32.
    """
    scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    w = np.asarray(weight, np.float64) * scale.reshape((-1,) + (1,) * (np.ndim(weight) - 1))
    b = np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * scale
    return np.ascontiguousarray(w, np.float32), np.ascontiguousarray(b, np.float32)


class _Conv:
    """One folded convolution: weight, bias, stride, padding."""

    __slots__ = ("conv", "bn", "stride", "padding", "weight", "bias")

    def __init__(self, conv: str, bn: str, stride: int = 1, padding: int = 0) -> None:
        self.conv, self.bn, self.stride, self.padding = conv, bn, stride, padding
        self.weight = self.bias = None


class ModifiedResNet:
    """CLIP's ModifiedResNet image tower (frozen; CLIP parameter names).

    Args:
        layers: bottlenecks per stage, e.g. (3, 4, 6, 3) for RN50.
        output_dim: embedding size of ``attnpool`` (``c_proj`` outputs).
        heads: attention heads of ``attnpool`` (default width·32 / 64, as CLIP).
        image_size: input side the positional embedding is made for (grid side image_size / 32).
        width: stem width (stages have width, 2·width, 4·width, 8·width planes; 4× out).
        seed: initialisation of the random weights (replaced by ``load_state_dict``).
        precision: ``"fp32"`` or ``"bf16"`` (convolution GEMM inputs rounded to bfloat16).
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), output_dim: int = 1024, heads: Optional[int] = None,
                 image_size: int = 224, width: int = 64, seed: int = 0, precision: str = "fp32") -> None:
        layers = tuple(int(n) for n in layers)
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers: expected four positive block counts, got {layers}")
        for name, v in (("output_dim", output_dim), ("image_size", image_size), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if width % 2:
            raise ValueError(f"width: expected an even number (the stem starts with width/2 channels), got {width}")
        if image_size % 32:
            raise ValueError(f"image_size: expected a multiple of 32 (the tower downsamples 32×), got {image_size}")
        embed = width * 32
        heads = embed // 64 if heads is None else int(heads)
        if heads < 1 or embed % heads:
            raise ValueError(f"heads: expected a divisor of the layer-4 width {embed}, got {heads}")
        self.config: Dict[str, Any] = dict(layers=list(layers), output_dim=int(output_dim), heads=heads,
                                           image_size=int(image_size), width=int(width))
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision: expected 'fp32' or 'bf16', got {precision!r}")
        self.precision = precision
        self._plan()
        self._params = self._init_params(int(seed))
        self._fold()

    # ------------------------------------------------------------------ structure

    def _plan(self) -> None:
        w = self.config["width"]
        self._stem = [_Conv("conv1", "bn1", 2, 1), _Conv("conv2", "bn2", 1, 1), _Conv("conv3", "bn3", 1, 1)]
        self._blocks: List[Dict[str, Any]] = []
        inplanes = w
        for stage, (n, planes) in enumerate(zip(self.config["layers"], (w, 2 * w, 4 * w, 8 * w))):
            for j in range(n):
                stride = 2 if stage > 0 and j == 0 else 1
                p = f"layer{stage + 1}.{j}."
                block = dict(stride=stride, inplanes=inplanes, planes=planes,
                             conv1=_Conv(p + "conv1", p + "bn1"), conv2=_Conv(p + "conv2", p + "bn2", 1, 1),
                             conv3=_Conv(p + "conv3", p + "bn3"),
                             downsample=(_Conv(p + "downsample.0", p + "downsample.1")
                                         if stride > 1 or inplanes != planes * 4 else None))
                self._blocks.append(block)
                inplanes = planes * 4

    def _shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Every parameter and buffer name → shape (CLIP's ``visual`` state dict, no num_batches_tracked)."""
        c = self.config
        w, embed, side = c["width"], c["width"] * 32, c["image_size"] // 32
        shapes: Dict[str, Tuple[int, ...]] = {}

        def conv_bn(conv: str, bn: str, cout: int, cin: int, k: int) -> None:
            shapes[conv + ".weight"] = (cout, cin, k, k)
            for s in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{bn}.{s}"] = (cout,)

        conv_bn("conv1", "bn1", w // 2, 3, 3)
        conv_bn("conv2", "bn2", w // 2, w // 2, 3)
        conv_bn("conv3", "bn3", w, w // 2, 3)
        for b in self._blocks:
            cin, planes = b["inplanes"], b["planes"]
            conv_bn(b["conv1"].conv, b["conv1"].bn, planes, cin, 1)
            conv_bn(b["conv2"].conv, b["conv2"].bn, planes, planes, 3)
            conv_bn(b["conv3"].conv, b["conv3"].bn, planes * 4, planes, 1)
            if b["downsample"] is not None:
                conv_bn(b["downsample"].conv, b["downsample"].bn, planes * 4, cin, 1)
        shapes["attnpool.positional_embedding"] = (side * side + 1, embed)
        for proj in ("q_proj", "k_proj", "v_proj"):
            shapes[f"attnpool.{proj}.weight"] = (embed, embed)
            shapes[f"attnpool.{proj}.bias"] = (embed,)
        shapes["attnpool.c_proj.weight"] = (c["output_dim"], embed)
        shapes["attnpool.c_proj.bias"] = (c["output_dim"],)
        return shapes

    def _init_params(self, seed: int) -> Dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        out = {}
        for name, shape in self._shapes().items():
            if name.endswith("running_var") or (name.endswith(".weight") and len(shape) == 1):
                v = np.ones(shape)
            elif name.endswith("running_mean") or name.endswith(".bias"):
                v = np.zeros(shape)
            elif len(shape) == 4:  # He init of a conv followed by ReLU
                v = rng.standard_normal(shape) * math.sqrt(2.0 / (shape[1] * shape[2] * shape[3]))
            else:
                v = rng.standard_normal(shape) * shape[-1] ** -0.5
            out[name] = v.astype(np.float32)
        return out

    def _fold(self) -> None:
        p = self._params
        for conv in self._stem + [c for b in self._blocks for c in (b["conv1"], b["conv2"], b["conv3"], b["downsample"])
                                  if c is not None]:
            conv.weight, conv.bias = fold_batchnorm(p[conv.conv + ".weight"], p[conv.bn + ".weight"], p[conv.bn + ".bias"],
                                                    p[conv.bn + ".running_mean"], p[conv.bn + ".running_var"])
        a = "attnpool."
        self._pool = {k: np.ascontiguousarray(p[a + k], np.float32) for k in (
            "positional_embedding", "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
            "v_proj.weight", "v_proj.bias", "c_proj.weight", "c_proj.bias")}

    # ------------------------------------------------------------------ weights

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Copies of the parameters and BatchNorm statistics under CLIP's (``visual``-relative) names."""
        return {k: v.copy() for k, v in self._params.items()}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Dict[str, List[str]]:
        """Load CLIP weights (names with or without ``visual.``; text-tower keys ignored) and refold BN.

        Args:
            state_dict: name → array. ``num_batches_tracked`` entries are ignored.
            strict: every tensor of the tower must be present.

        Returns:
            {"loaded": [...], "skipped": [...] (keys that are not tower tensors), "missing": [...]}.

        Raises:
            ValueError: a shape differs from this architecture's (name, both shapes), a value is
                not finite, or (strict) a tower tensor is missing. The model is unchanged then.
        """
        shapes = self._shapes()
        has_visual = any(k.startswith("visual.") for k in state_dict)
        staged, skipped = {}, []
        for key, value in state_dict.items():
            name = key[len("visual."):] if has_visual and key.startswith("visual.") else key
            if has_visual and not key.startswith("visual."):
                skipped.append(key)
                continue
            if name not in shapes:
                if not name.endswith("num_batches_tracked"):
                    skipped.append(key)
                continue
            a = np.asarray(value)
            if a.dtype.kind not in "fiu":
                raise TypeError(f"{key}: expected a numeric array, got dtype {a.dtype}")
            if tuple(a.shape) != shapes[name]:
                raise ValueError(f"{key}: shape {list(a.shape)} does not fit this tower ({list(shapes[name])}); "
                                 f"build the model with the checkpoint's architecture ({self.config})")
            a = a.astype(np.float32)
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{key}: holds NaN or inf; the model is unchanged")
            staged[name] = a
        missing = [k for k in shapes if k not in staged]
        if missing and strict:
            raise ValueError(f"{len(missing)} tensor(s) of the tower are missing, e.g. {missing[:5]}; the model is unchanged")
        self._params.update(staged)
        self._fold()
        return {"loaded": sorted(staged), "skipped": skipped, "missing": missing}

    # ------------------------------------------------------------------ compute

    def _conv(self, x: np.ndarray, c: _Conv, relu: bool = True, residual: Optional[np.ndarray] = None) -> np.ndarray:
        # the engine sizes and allocates the output
        return np.asarray(_core.conv2d_forward(None, x, c.weight, c.bias, residual, relu, c.stride, c.padding,
                                               self.precision))

    @staticmethod
    def _pool2d(x: np.ndarray, s: int) -> np.ndarray:
        return x if s == 1 else np.asarray(_core.avg_pool2d_forward(None, x, s))

    def _check(self, images: Any) -> np.ndarray:
        """Float images as the engine reads them, with the tower's own rules (RGB, sides ≥ 32): this
        tower is composed in Python from conv kernels, so these are its only image checks."""
        a = images_f32(images)
        if a.ndim != 4 or a.shape[1] != 3:
            raise ValueError(f"images: expected shape [B, 3, H, W], got {a.shape}")
        if a.shape[2] < 32 or a.shape[3] < 32:
            raise ValueError(f"images: expected sides of at least 32 pixels (the tower downsamples 32×), got {a.shape[2:]}")
        return a

    def _layer4(self, x: np.ndarray) -> np.ndarray:
        """[B, 3, H, W] → the layer-4 map [B, 32·width, H/32, W/32] (floors as PyTorch)."""
        for c in self._stem:
            x = self._conv(x, c)
        x = self._pool2d(x, 2)
        for b in self._blocks:
            out = self._conv(x, b["conv1"])
            out = self._conv(out, b["conv2"])
            out = self._pool2d(out, b["stride"])
            identity = x if b["downsample"] is None else self._conv(self._pool2d(x, b["stride"]), b["downsample"],
                                                                    relu=False)
            x = self._conv(out, b["conv3"], relu=True, residual=identity)
        return x

    def _batches(self, images: Any, batch_size: int):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        x = self._check(images)
        for i in range(0, x.shape[0], int(batch_size)):
            yield x[i:i + int(batch_size)]

    @property
    def grid(self) -> int:
        """Side of the layer-4 grid at ``image_size`` (the tower downsamples 32×)."""
        return self.config["image_size"] // 32

    def forward_features(self, images: Any, batch_size: int = 32) -> np.ndarray:
        """The layer-4 grid as tokens: [B, (H/32)·(W/32), 32·width], row-major grid order
        (k-CLIP's features; ``[B, C, h, w]`` read as ``[B, h·w, C]``).

        Args:
            images: [B, 3, H, W] float, CLIP-normalised (``mapet.clip.preprocess``).
            batch_size: images per engine pass (bounds the activation memory).
        """
        out = [self._layer4(x) for x in self._batches(images, batch_size)]
        if not out:
            return np.zeros((0, 0, self.config["width"] * 32), np.float32)
        grid = np.concatenate(out)
        return np.ascontiguousarray(grid.reshape(grid.shape[0], grid.shape[1], -1).transpose(0, 2, 1))

    def encode_image(self, images: Any, batch_size: int = 32) -> np.ndarray:
        """Image embeddings [B, output_dim] (``attnpool`` output, unnormalised, as CLIP's ``encode_image``).

        The input side must be ``image_size`` (the positional embedding is learnt for its grid).
        """
        side = self.config["image_size"] // 32
        out = []
        for x in self._batches(images, batch_size):
            grid = self._layer4(x)
            if grid.shape[2:] != (side, side):
                raise ValueError(f"images: the attention pool is made for {self.config['image_size']}-pixel images "
                                 f"(a {side}×{side} grid), got a {grid.shape[2]}×{grid.shape[3]} grid from {x.shape[2:]}")
            out.append(self._attnpool(grid))
        return np.concatenate(out) if out else np.zeros((0, self.config["output_dim"]), np.float32)

    __call__ = encode_image

    def _attnpool(self, grid: np.ndarray) -> np.ndarray:
        """CLIP's AttentionPool2d: tokens = [mean ; grid] + pos; one attention with the mean as query."""
        B, C = grid.shape[:2]
        p = self._pool
        tokens = grid.reshape(B, C, -1).transpose(0, 2, 1)
        tokens = np.concatenate([tokens.mean(axis=1, keepdims=True, dtype=np.float32), tokens], axis=1)
        tokens = np.ascontiguousarray(tokens + p["positional_embedding"][None], np.float32)
        T = tokens.shape[1]
        flat = tokens.reshape(B * T, C)
        q = np.empty((B, C), np.float32)
        _core.linear_forward(q, np.ascontiguousarray(tokens[:, 0]), p["q_proj.weight"], p["q_proj.bias"])
        k = np.empty((B * T, C), np.float32)
        v = np.empty((B * T, C), np.float32)
        _core.linear_forward(k, flat, p["k_proj.weight"], p["k_proj.bias"])
        _core.linear_forward(v, flat, p["v_proj.weight"], p["v_proj.bias"])
        heads = self.config["heads"]
        att = np.empty((B, 1, C), np.float32)
        probs = np.empty((B, heads, 1, T), np.float32)
        _core.attention_forward(att, probs, q.reshape(B, 1, C), k.reshape(B, T, C), v.reshape(B, T, C), heads, None)
        out = np.empty((B, self.config["output_dim"]), np.float32)
        _core.linear_forward(out, att.reshape(B, C), p["c_proj.weight"], p["c_proj.bias"])
        return out

    def __repr__(self) -> str:
        c = self.config
        return (f"ModifiedResNet(layers={tuple(c['layers'])}, width={c['width']}, output_dim={c['output_dim']}, "
                f"heads={c['heads']}, image_size={c['image_size']})")


def _arch_from_state_dict(sd: Mapping[str, Any]) -> Dict[str, Any]:
    """(layers, width, output_dim, image_size) read off the shapes of a CLIP ResNet state dict."""
    pre = "visual." if any(k.startswith("visual.") for k in sd) else ""
    try:
        width = int(np.shape(sd[pre + "conv1.weight"])[0]) * 2
        layers = tuple(len({k.split(".")[2 if pre else 1] for k in sd if k.startswith(f"{pre}layer{i}.")})
                       for i in (1, 2, 3, 4))
        output_dim = int(np.shape(sd[pre + "attnpool.c_proj.weight"])[0])
        side = int(round((np.shape(sd[pre + "attnpool.positional_embedding"])[0] - 1) ** 0.5))
    except KeyError as e:
        raise ValueError(f"not a CLIP ModifiedResNet state dict: no {e.args[0]}") from None
    return dict(layers=layers, width=width, output_dim=output_dim, image_size=side * 32)


def _read_weights(source: Any) -> Dict[str, np.ndarray]:
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if path.endswith(".safetensors"):
        return load_file(path)[0]
    from ..convert import read_checkpoint  # a PyTorch file: read without torch, nothing executed

    return read_checkpoint(path, layout="clip")[0]


@register_named_models("clip_rn", "CLIP ModifiedResNet image tower", tuple(ARCHS))
def create_clip_resnet(name: str, seed: int = 0, pretrained: Any = None, precision: str = "fp32",
                       **overrides: Any) -> ModifiedResNet:
    """``mapet.create_model("clip_rn50" | "clip_rn101" | "clip_rn50x4" | "clip_rn50x16" | "clip_rn50x64")``.

    Args:
        name: one of :data:`ARCHS`.
        pretrained: CLIP weights: a safetensors file (``python -m mapet convert``), a PyTorch file
            (OpenAI ``RN50.pt`` TorchScript, open_clip ``.bin``; read without torch) or a state dict.
            Its shapes must match the named architecture.
        **overrides: ``layers, width, output_dim, heads, image_size`` (e.g. a tiny tower for tests).
    """
    if name not in ARCHS:
        raise ValueError(f"create_model: unknown CLIP ResNet {name!r}; available: {sorted(ARCHS)}")
    unknown = sorted(set(overrides) - {"layers", "width", "output_dim", "heads", "image_size"})
    if unknown:
        raise TypeError(f"{name}: unknown option(s) {unknown}; known: layers, width, output_dim, heads, image_size")
    config = dict(ARCHS[name], **overrides)
    weights = None
    if pretrained is not None:
        weights = _read_weights(pretrained)
        found = _arch_from_state_dict(weights)
        differs = {k: (config[k], v) for k, v in found.items() if tuple(np.atleast_1d(config[k])) != tuple(np.atleast_1d(v))}
        if differs:
            raise ValueError(f"pretrained: the checkpoint is not a {name} tower: " + ", ".join(
                f"{k} {v[1]} (expected {v[0]})" for k, v in differs.items()))
    model = ModifiedResNet(seed=seed, precision=precision, **config)
    if weights is not None:
        model.pretrained_report = model.load_state_dict(weights)
        log.info("%s: loaded %d tensors; skipped %d", name, len(model.pretrained_report["loaded"]),
                 len(model.pretrained_report["skipped"]))
    return model

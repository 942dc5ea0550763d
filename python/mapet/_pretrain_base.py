"""What every pre-training model shares: the parameter block, gradients, the drop-path generator,
files, and the recipe's model defaults. The models themselves are in :mod:`mapet.pretrain_models`."""
import json
import logging
import warnings
from typing import Any, Dict, Mapping

import numpy as np

from ._convert import indices, seed_bits
from ._native import _core
from ._params import ParameterBlock
from .io import save_file
from .registry import TRUNK_DEFAULTS

log = logging.getLogger("mapet.pretrain_models")

FORMAT = "mapet"
_RNG = "xoshiro256**"
_U64 = (1 << 64) - 1

#: The recipe's model defaults of every pre-training kind (each class adds its ``_extra``); the engine has none.
_DEFAULTS: Dict[str, Any] = dict(TRUNK_DEFAULTS, init_values=0.1, drop_path_rate=0.1, num_tokens=8192, least_number=None)

#: The paper's context share: least_number 50 of 196 patches (≈ 25 %).
LEAST_NUMBER_SHARE = 50 / 196


def default_least_number(num_patches: int) -> int:
    """The paper's proportion of context tokens for ``num_patches`` patches: round(n·50/196), ≥ 1 (50 at 196)."""
    return max(1, int(round(int(num_patches) * LEAST_NUMBER_SHARE)))


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= (1 << 63) else v


def _tokens(tokens: Any) -> np.ndarray:
    """Visual tokens as int32 for the engine, which checks their shape and range against the model."""
    return indices(tokens, "tokens", "visual tokens [B, num_patches]")


class _PretrainModel(ParameterBlock):
    """Parameters, gradients, files and the drop-path generator (shared by every pre-training model)."""

    _precision_ops = (_core.pretrain_precision, _core.pretrain_set_precision)

    _kind = ""
    #: Options of this kind beyond ``_DEFAULTS`` (name → default).
    _extra: Dict[str, Any] = {}

    def __init__(self, seed: int, config: Dict[str, Any]) -> None:
        defaults = dict(_DEFAULTS, **self._extra)
        unknown = sorted(set(config) - set(defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown option(s) {unknown}; known: {sorted(defaults)}")
        cfg = dict(defaults, **config)
        if cfg["least_number"] is None and all(isinstance(cfg[k], (int, np.integer)) for k in ("img_size", "patch_size")):
            # capped at the engine's limit: models that large are refused for their memory anyway
            cfg["least_number"] = min(default_least_number((int(cfg["img_size"]) // max(1, int(cfg["patch_size"]))) ** 2),
                                      1 << 30)
        # the engine checks every value (types, ranges, the model's size); the config crosses as one dict
        self._handle = _core.pretrain_create(dict(
            {k: cfg[k] for k in _DEFAULTS}, kind=self._kind, seed=seed_bits(seed), output_dim=cfg.get("output_dim"),
            early_layers=cfg.get("early_layers"), head_layers=cfg.get("head_layers")))
        # accepted: stored as plain Python numbers (the config is written to files as JSON)
        for key in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "num_tokens",
                    "least_number", *self._extra):
            cfg[key] = int(cfg[key])
        cfg["mlp_ratio"] = float(cfg["mlp_ratio"])
        cfg["init_values"] = None if cfg["init_values"] is None else float(cfg["init_values"])
        cfg["drop_path_rate"] = float(cfg["drop_path_rate"])
        cfg["qkv_bias"] = bool(cfg["qkv_bias"])
        self.config: Dict[str, Any] = cfg
        self.seed = int(seed)
        predicted = (cfg["img_size"] // cfg["patch_size"]) ** 2 + 1 - cfg["least_number"]
        if self._kind in ("mapet", "pim") and predicted < 4:
            warnings.warn(f"least_number={cfg['least_number']} leaves {predicted} predicted token(s) per image "
                          f"({(cfg['img_size'] // cfg['patch_size']) ** 2} patches); the paper predicts ≈ 75 % "
                          f"(least_number ≈ {default_least_number((cfg['img_size'] // cfg['patch_size']) ** 2)})",
                          stacklevel=3)
        self._bind(_core.pretrain_table(self._handle), *_core.pretrain_blocks(self._handle))

    @property
    def num_patches(self) -> int:
        return (self.config["img_size"] // self.config["patch_size"]) ** 2

    def zero_grad(self) -> None:
        """Clear the gradient block."""
        _core.pretrain_zero_grad(self._handle)

    # ------------------------------------------------------------------ drop-path generator

    def set_seed(self, seed: int) -> None:
        """Restart the drop-path generator from ``seed`` (as at creation with that seed)."""
        _core.pretrain_set_seed(self._handle, seed_bits(seed))

    def reseed(self, seed: int, stream: int = 0) -> None:
        """Restart the drop-path generator on a stream derived from (``seed``, ``stream``);
        training loops pass the micro-batch number so a resumed run draws the same masks."""
        derived = int(np.random.SeedSequence([int(seed) & _U64, int(stream)]).generate_state(1, np.uint64)[0])
        self.set_seed(derived)

    def rng_state(self) -> Dict[str, Any]:
        """The drop-path generator's state (JSON-able); ``set_rng_state`` resumes training bitwise."""
        return {"generator": _RNG, "state": [w & _U64 for w in _core.pretrain_rng_state(self._handle)]}

    def set_rng_state(self, state: Mapping[str, Any]) -> None:
        """Restore a state from ``rng_state()``.

        Raises:
            ValueError: not a state of this generator, or words outside [0, 2**64) / all zero.
        """
        if not isinstance(state, Mapping) or state.get("generator") != _RNG or len(state.get("state", ())) != 4:
            raise ValueError(f"state: expected {{'generator': {_RNG!r}, 'state': [4 ints]}} from rng_state(), got {state!r}")
        words = []
        for w in state["state"]:
            if isinstance(w, (bool, np.bool_)) or not isinstance(w, (int, np.integer)) or not 0 <= int(w) <= _U64:
                raise ValueError(f"state: expected words in [0, 2**64), got {w!r}")
            words.append(_signed(int(w)))
        _core.pretrain_set_rng_state(self._handle, *words)

    def release_activations(self) -> None:
        """Free the cached activations (re-allocated by the next call)."""
        _core.pretrain_release(self._handle)

    # ------------------------------------------------------------------ files

    def save(self, path: str) -> None:
        """Write a safetensors file: weights by reference name, metadata
        ``{"format": "mapet", "model": kind, "config": json}``."""
        from .data.data_config import metadata_entry
        save_file(dict(self._params), path,
                  {"format": FORMAT, "model": self._kind, "config": json.dumps(self.config), **metadata_entry(self)})

    def __repr__(self) -> str:
        c = self.config
        return (f"{type(self).__name__}(kind={self._kind!r}, embed_dim={c['embed_dim']}, depth={c['depth']}, "
                f"num_heads={c['num_heads']}, img_size={c['img_size']}, patch_size={c['patch_size']}, "
                f"num_tokens={c['num_tokens']}, params={self.num_params})")

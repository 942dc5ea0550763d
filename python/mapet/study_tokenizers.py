"""The visual tokenizers a study's runs predict (``tokenizers`` in :mod:`mapet.study`): each writes, for one
seed, the token cache of the training images.

- ``pixel``: the CCViT pixel k-means tokenizer (``tokenizer.*`` sets its vocabulary);
- ``kclip``: k-CLIP, k-means on the patch features of a CLIP ViT tower (the MaPeT paper's tokenizer): a
  small random tower on the model's patch grid seeded by the study seed (``kclip.width/layers/output_dim``),
  or the CLIP weights file ``kclip.clip``.

Another tokenizer plugs in with :func:`register_tokenizer`.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict

from ._command_setup import _DATA, tokenize_dataset
from .io import atomic_write

#: k-CLIP's tower when no weights are given (``kclip.clip``): a random CLIP ViT on the model's patch
#: grid, small enough for the digits (width 64 gives one head, as CLIP reads heads off the width).
KCLIP_DEFAULTS: Dict[str, Any] = {"clip": None, "width": 64, "layers": 2, "output_dim": 32, "sample_fraction": 0.1}

# name -> (cfg, seed, directory) -> token cache directory
_TOKENIZERS: Dict[str, Callable[[Dict[str, Any], int, str], str]] = {}


def register_tokenizer(name: str, make_cache: Callable[[Dict[str, Any], int, str], str]) -> None:
    """Make ``name`` usable in a study's ``tokenizers``.

    Args:
        name: the name in the config (e.g. ``"clip"``).
        make_cache: ``(study config, seed, directory) -> token cache directory``: fits the tokenizer
            with that seed and writes the tokens of every training image (a ``mapet.data.TokenCache``)
            under ``directory``; it must return the same cache when called again after an interruption.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_tokenizer: name: expected a non-empty str, got {name!r}")
    if not callable(make_cache):
        raise TypeError(f"register_tokenizer: make_cache: expected a callable, got {type(make_cache).__name__}")
    _TOKENIZERS[name] = make_cache


def _pixel_cache(cfg: Dict[str, Any], seed: int, directory: str) -> str:
    """The CCViT pixel k-means tokenizer fitted with ``seed``, and its token cache, under ``directory``."""
    done = os.path.join(directory, "tokens.done")
    cache = os.path.join(directory, "tokens")
    if os.path.exists(done):
        return cache
    tcfg = {k: v for k, v in cfg.items() if k in _DATA}
    tcfg.update(seed=seed, model=dict(cfg["model"]), output_dir=directory,
                tokenizer=dict(cfg["tokenizer"], path=None))
    cache = tokenize_dataset(tcfg)
    atomic_write(done, lambda f: f.write(b"ok\n"))
    return cache


register_tokenizer("pixel", _pixel_cache)


def _kclip_cache(cfg: Dict[str, Any], seed: int, directory: str) -> str:
    """k-CLIP (k-means on CLIP ViT patch features, :func:`mapet.FeatureTokenizer.from_clip`) fitted with
    ``seed``, and its token cache, under ``directory``. The tower is ``kclip.clip`` (a CLIP weights file)
    or a random CLIP ViT seeded by ``seed``, written to ``directory/clip.safetensors``."""
    from .clip import CLIPVisionTransformer
    from .io import save_file

    done = os.path.join(directory, "tokens.done")
    cache = os.path.join(directory, "tokens")
    if os.path.exists(done):
        return cache
    k, m = cfg["kclip"], cfg["model"]
    path = k.get("clip")
    if not path:
        width = int(k["width"])
        tower = CLIPVisionTransformer(img_size=int(m["img_size"]), patch_size=int(m["patch_size"]), width=width,
                                      layers=int(k["layers"]), heads=max(1, width // 64),
                                      output_dim=int(k["output_dim"]), seed=seed)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "clip.safetensors")
        save_file({"visual." + n: v for n, v in tower.state_dict().items()}, path)
    tcfg = {key: v for key, v in cfg.items() if key in _DATA}
    tcfg.update(seed=seed, model=dict(m), output_dir=directory, clip=path,
                tokenizer=dict(cfg["tokenizer"], kind="kclip", path=None, sample_fraction=float(k["sample_fraction"])))
    cache = tokenize_dataset(tcfg)
    atomic_write(done, lambda f: f.write(b"ok\n"))
    return cache


register_tokenizer("kclip", _kclip_cache)

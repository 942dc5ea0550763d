"""One registry of model families and pre-training methods (after timm's ``register_model``).

A **model family** (``vit``, ``mapet``, ``pim``, ``beit``, ``ccvit``, ``dtm``) owns its builder and
its size presets; ``create_model("<family>_<size>_patch16_224", **overrides)`` only looks it up.
**Named models** (the frozen CLIP towers ``clip_vit_b16``, ``clip_rn50``, ...) are registered by
their full names with a builder that also loads their weights; ``create_model`` looks them up first.
A **pre-training method** owns everything :func:`mapet.train.pretrain` and ``python -m mapet
pretrain`` need to know about it: the model family it trains, its options with their defaults,
whether a step reads visual tokens or a teacher's features, and the wiring of one training step
(what is drawn per step, what the loss takes, which generator states are checkpointed).

Families register in the module that defines their model (:mod:`mapet.models`,
:mod:`mapet.pretrain_models`), methods in :mod:`mapet.methods`; nothing else branches on a
method's name. Adding a method is one :func:`register_method` entry plus its Swift model (see
the README's developer section).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

#: Size presets shared by every family (ViT-Ti/S/B, timm's ``vit_{tiny,small,base}_patch16_224``).
SIZES: Dict[str, Dict[str, Any]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}
#: The trunk options every ViT-shaped family starts from (ViT-Ti/16 at 224 px). With each family's own
#: (``mapet.models._DEFAULTS``, ``mapet._pretrain_base._DEFAULTS`` and the ``_extra`` of its class), these
#: are the only defaults: the engine has none and refuses a config without every value.
TRUNK_DEFAULTS: Dict[str, Any] = dict(img_size=224, patch_size=16, in_chans=3, **SIZES["tiny"], mlp_ratio=4.0,
                                      qkv_bias=True)
#: The one patch/resolution suffix of registered names (``img_size``/``patch_size`` are overrides).
SUFFIX = "patch16_224"

# the modules whose import registers the built-in entries
_REGISTERING = (".models", ".pretrain_models", ".methods", ".clip.vit", ".clip.resnet")


@dataclass(frozen=True)
class ModelFamily:
    """``build(seed=..., **config)`` makes a model; ``configure(config)`` fills config values that
    follow from others (e.g. CCViT's ``early_layers`` from ``depth``) before it is called."""

    name: str
    title: str
    build: Callable[..., Any]
    sizes: Dict[str, Dict[str, Any]] = field(default_factory=lambda: SIZES)
    configure: Callable[[Dict[str, Any]], Dict[str, Any]] = lambda config: config

    def names(self) -> List[str]:
        """The registered model names of this family."""
        return [f"{self.name}_{size}_{SUFFIX}" for size in self.sizes]

    def create(self, size: str, seed: int = 0, **overrides: Any) -> Any:
        """The model of preset ``size`` with ``overrides``."""
        return self.build(seed=seed, **self.configure(dict(self.sizes[size], **overrides)))


@dataclass(frozen=True)
class PretrainMethod:
    """A pre-training method.

    Attributes:
        name: canonical name (``pretrain(method=name)``, the CLI's ``method=``).
        title: how people write it (logs, plots).
        family: the :class:`ModelFamily` it trains (``<family>_<size>_patch16_224``).
        inputs: ``"tokens"`` (one visual token per patch, from a tokenizer or cache) or ``"teacher"``
            (a frozen teacher's features).
        options: keyword arguments of :func:`mapet.train.pretrain` only this method reads, with
            their defaults (the CLI's ``<name>.*`` section when ``section`` is set).
        wire: ``wire(run) -> step_fn``: given a :class:`mapet.methods.Run`, registers the
            generator states to checkpoint in ``run.states`` and returns ``step_fn(batch) ->
            (loss, samples)``.
        prepare: ``prepare(run, data, tokens) -> dataset`` or None (the default pairing of
            images with ``tokens``).
        model_config: ``model_config(run, data) -> overrides`` or None: model options that follow
            from the inputs (DTM's ``output_dim`` from the teacher), for a model built by size.
        reads: the shared pretrain options it reads (``least_number`` or ``num_masking_patches``).
        section: the CLI config section holding ``options`` (None: none).
        aliases: other accepted names.
    """

    name: str
    title: str
    family: str
    inputs: str
    wire: Callable[[Any], Callable]
    options: Dict[str, Any] = field(default_factory=dict)
    prepare: Any = None
    model_config: Any = None
    reads: Tuple[str, ...] = ()
    section: Any = None
    aliases: Tuple[str, ...] = ()


@dataclass(frozen=True)
class NamedModels:
    """Models with names of their own and their own loading (the CLIP towers): ``create(name,
    seed=..., pretrained=..., precision=..., **overrides)`` builds model ``name`` of ``models``."""

    family: str
    title: str
    models: Tuple[str, ...]
    create: Callable[..., Any]


_FAMILIES: Dict[str, ModelFamily] = {}
_NAMED: Dict[str, NamedModels] = {}  # model name -> its entry
_METHODS: Dict[str, PretrainMethod] = {}
_ALIASES: Dict[str, str] = {}


def register_model_family(name: str, title: str, sizes: Dict[str, Dict[str, Any]] = SIZES,
                          configure: Callable[[Dict[str, Any]], Dict[str, Any]] = lambda config: config):
    """Decorator registering ``build(seed=..., **config)`` as model family ``name``.

    Example:
        >>> @register_model_family("beit", "BEiT (MIM)")          # doctest: +SKIP
        ... def _beit(seed=0, **config): return BEiT(seed=seed, **config)
    """
    def register(build: Callable[..., Any]) -> Callable[..., Any]:
        if name in _FAMILIES:
            raise ValueError(f"model family {name!r} is already registered")
        _FAMILIES[name] = ModelFamily(name, title, build, sizes, configure)
        return build
    return register


def register_named_models(family: str, title: str, models: Tuple[str, ...]):
    """Decorator registering ``create(name, seed=..., pretrained=..., precision=..., **overrides)``
    as the builder of the models named in ``models`` (each name must be new)."""
    def register(create: Callable[..., Any]) -> Callable[..., Any]:
        entry = NamedModels(family, title, tuple(models), create)
        for name in entry.models:
            if name in _NAMED:
                raise ValueError(f"model {name!r} is already registered")
            _NAMED[name] = entry
        return create
    return register


def named_models(name: str) -> Optional[NamedModels]:
    """The entry registering model ``name`` by its full name, or None."""
    _load()
    return _NAMED.get(str(name))


def register_method(method: PretrainMethod) -> PretrainMethod:
    """Register a pre-training method (its name and aliases must be new)."""
    for key in (method.name, *method.aliases):
        if key in _METHODS or key in _ALIASES:
            raise ValueError(f"pre-training method {key!r} is already registered")
    _METHODS[method.name] = method
    for alias in method.aliases:
        _ALIASES[alias] = method.name
    return method


def _load() -> None:
    for module in _REGISTERING:
        importlib.import_module(module, __package__)


def model_family(name: str) -> ModelFamily:
    """The family registered as ``name``."""
    _load()
    return _FAMILIES[name]


def split_model_name(name: str) -> Tuple[ModelFamily, str]:
    """``"<family>_<size>_patch16_224"`` → (family, size); ValueError listing the names otherwise."""
    _load()
    family, _, rest = str(name).partition("_")
    size, _, tail = rest.partition("_")
    entry = _FAMILIES.get(family)
    if entry is None or size not in entry.sizes or tail != SUFFIX:
        raise ValueError(f"create_model: unknown model {name!r}; available: {model_names()}")
    return entry, size


def model_names() -> List[str]:
    """Every registered model name."""
    _load()
    return [n for family in _FAMILIES.values() for n in family.names()] + list(_NAMED)


def get_method(name: str) -> PretrainMethod:
    """The method registered as ``name`` or one of its aliases (case-insensitive)."""
    _load()
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in _METHODS:
        raise ValueError(f"method must be one of {method_names()} (aliases: {sorted(_ALIASES)}), got {name!r}")
    return _METHODS[key]


def method_names() -> Tuple[str, ...]:
    """Canonical names of the registered methods, in registration order."""
    _load()
    return tuple(_METHODS)

"""Run configuration: JSON/YAML files, ``key.sub=value`` overrides, the resolved copy on disk.

A config is a nested dict. ``load_config`` merges, in order: ``defaults``, the file, then the
overrides; ``save_resolved_config`` writes the result as ``config.json`` beside a run's outputs
so any run can be repeated from its directory.
"""
import copy
import json
import os
from typing import Any, Dict, Iterable, Mapping, Optional

from .io import atomic_write

RESOLVED = "config.json"


def _read_file(path: str) -> Dict[str, Any]:
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".yaml", ".yml"):
        raise ValueError(f"{path}: unknown config format {ext!r}; use .json, .yaml or .yml")
    with open(path) as f:
        text = f.read()
    if ext in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ImportError(f"{path}: reading YAML configs needs PyYAML (pip install pyyaml); "
                              "or write the config as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML ({e})") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level of a config must be a mapping, got {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """An override's value: JSON if it parses (numbers, true/false/null, lists, objects, quoted
    strings), ``True``/``False``/``None`` in any case, else the raw string."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null", "~"):
        return None
    return text


def merge(base: Dict[str, Any], update: Mapping[str, Any]) -> Dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base`` (dicts merge, anything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_override(cfg: Dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override in place (creating intermediate mappings)."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"config override {item!r}: expected key=value (dots for nested keys, e.g. optim.lr=1e-3)")
    node = cfg
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            raise ValueError(f"config override {item!r}: {'.'.join(parts[:i + 1])} is a "
                             f"{type(nxt).__name__}, not a mapping")
        node = nxt
    node[parts[-1]] = parse_value(value)


def load_config(path: Optional[str] = None, overrides: Iterable[str] = (),
                defaults: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Resolve a configuration.

    Args:
        path: a .json, .yaml or .yml file (YAML needs PyYAML), or None.
        overrides: ``"key=value"`` strings applied last, dotted keys for nesting
            (``"optim.lr=1e-3"``, ``"model.name=mapet_tiny_patch16_224"``, ``"tags=[1,2]"``).
        defaults: values the file and overrides refine.

    Returns:
        The merged nested dict (a fresh copy).

    Example:
        >>> cfg = load_config("pretrain.yaml", ["epochs=5", "optim.lr=1e-3"], defaults={"epochs": 300})
    """
    cfg: Dict[str, Any] = copy.deepcopy(dict(defaults or {}))
    if path is not None:
        cfg = merge(cfg, _read_file(os.fspath(path)))
    for item in overrides:
        apply_override(cfg, item)
    return cfg


def save_resolved_config(directory: str, cfg: Mapping[str, Any], name: str = RESOLVED) -> str:
    """Write ``cfg`` as pretty JSON to ``<directory>/config.json`` (atomically); returns the path."""
    path = os.path.join(os.fspath(directory), name)
    try:
        blob = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    except TypeError as e:
        raise TypeError(f"save_resolved_config: the config is not JSON-serialisable ({e})") from None
    atomic_write(path, lambda f: f.write(blob.encode()))
    return path

"""Run configuration: JSON/YAML files, ``key.sub=value`` overrides, the resolved copy on disk.

A config is a nested dict. ``load_config`` merges, in order: ``defaults``, the file, then the
overrides; ``save_resolved_config`` writes the result as ``config.json`` beside a run's outputs
so any run can be repeated from its directory.
"""
import copy
import difflib
import json
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

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
    """Apply one ``dotted.key=value`` override in place (creating intermediate mappings); a word
    given to a group that has a ``kind`` sets that kind (``tokenizer=kclip`` = ``tokenizer.kind=kclip``)."""
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
    parsed = parse_value(value)
    if isinstance(node.get(parts[-1]), dict) and "kind" in node[parts[-1]] and isinstance(parsed, str):
        node[parts[-1]]["kind"] = parsed  # a word for a group with a kind picks it: tokenizer=kclip
        return
    node[parts[-1]] = parsed


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


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}, "c": 2}`` → ``{"a.b": 1, "c": 2}`` (empty mappings stay as leaves)."""
    out: Dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _kind(value: Any) -> Optional[str]:
    if isinstance(value, bool):
        return "a boolean (true/false)"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return None


def check_keys(cfg: Mapping[str, Any], defaults: Mapping[str, Any], where: str = "config") -> None:
    """Raise ValueError for a key ``defaults`` does not have (naming the closest valid key), or a
    value whose type cannot be what the default's is (a word for a number, a number for a list ...).

    ``None`` defaults accept anything; integers are accepted where a number is expected.

    Example:
        >>> check_keys({"epochz": 3}, {"epochs": 10})
        Traceback (most recent call last):
        ValueError: config: unknown option 'epochz'; did you mean 'epochs'?
    """
    valid = flatten(defaults)
    prefixes = {k.rsplit(".", 1)[0] for k in valid if "." in k}
    for key, value in flatten(cfg).items():
        if key in valid:
            want = valid[key]
            if want is None or value is None:
                continue
            ok = {bool: lambda v: isinstance(v, bool),
                  int: lambda v: isinstance(v, int) and not isinstance(v, bool),
                  float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                  str: lambda v: isinstance(v, str),
                  list: lambda v: isinstance(v, list)}.get(type(want), lambda v: True)(value)
            if not ok:
                raise ValueError(f"{where}: option {key!r} expects {_kind(want)} (default {json.dumps(want)}), "
                                 f"got {json.dumps(value)}")
            continue
        if key in prefixes:
            raise ValueError(f"{where}: option {key!r} is a group; set its members "
                             f"({', '.join(k for k in valid if k.startswith(key + '.'))})")
        if any(key.startswith(k + ".") for k in valid):
            parent = next(k for k in valid if key.startswith(k + "."))
            raise ValueError(f"{where}: option {parent!r} is not a group, so {key!r} does not exist")
        close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
        if not close:  # a misspelt member of a group: compare the last part
            leaf = key.rsplit(".", 1)[-1]
            close = [k for k in valid if k.rsplit(".", 1)[-1] in difflib.get_close_matches(
                leaf, [v.rsplit(".", 1)[-1] for v in valid], n=1, cutoff=0.6)][:1]
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{where}: unknown option {key!r}{hint}")


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Iterable[str] = ()) -> List[str]:
    """Human-readable ``key: old → new`` lines for every dotted key whose value differs."""
    a, b = flatten(old), flatten(new)
    skip = set(ignore)
    out = []
    for key in sorted(set(a) | set(b)):
        if key in skip or key.split(".")[0] in skip:
            continue
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            out.append(f"{key}: {json.dumps(a.get(key, '<unset>'))} → {json.dumps(b.get(key, '<unset>'))}")
    return out


def option_table(defaults: Mapping[str, Any], meanings: Mapping[str, str]) -> List[Tuple[str, str, str]]:
    """(dotted key, default as JSON, meaning) for every option; a meaning is looked up by the
    full key, then by its last part (``pretrain.epochs`` → ``epochs``)."""
    rows = []
    for key, value in flatten(defaults).items():
        meaning = meanings.get(key) or meanings.get(key.rsplit(".", 1)[-1], "")
        rows.append((key, json.dumps(value), meaning))
    return rows

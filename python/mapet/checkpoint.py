"""Training checkpoints: weights, optimizer moments and run state in one safetensors file.

A checkpoint groups tensors (``{"model": {...}, "optimizer.exp_avg": {...}, ...}``) and stores
each as ``"<group>/<name>"``; the run state (epoch, step, loader and RNG states, config) is JSON
in the metadata under ``"mapet.state"``. The file is written to a temporary file beside the
destination, fsynced, then renamed over it (``mapet.io.save_file``), so a crash or a kill at any
moment leaves either the previous complete checkpoint or the new complete one — never a torn
file. Keep one ``last.safetensors`` per run and resume from it.
"""
import glob
import json
import logging
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from .io import load_file, save_file

logger = logging.getLogger(__name__)

LAST = "last.safetensors"
_KIND = "mapet-checkpoint"


def _encode(obj: Any) -> Any:
    """JSON-safe copy of ``obj``: NumPy scalars → Python, arrays → tagged lists, tuples → lists."""
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise TypeError(f"checkpoint state: dict keys must be strings, got {bad[:3]}")
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    raise TypeError(f"checkpoint state: cannot store a {type(obj).__name__} ({obj!r:.60}) as JSON")


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            dtype = np.dtype(obj.get("dtype"))  # TypeError on anything that names no dtype
            if dtype.kind not in "biufcUS":   # never object (or void/datetime) arrays from a file
                raise ValueError(f"array of dtype {dtype} in the state (only numbers and strings)")
            return np.array(obj["__ndarray__"], dtype=dtype).reshape(obj["shape"])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def rng_state(rng: np.random.Generator) -> Dict[str, Any]:
    """The full state of a NumPy Generator, storable in a checkpoint's ``state``."""
    return rng.bit_generator.state


def restore_rng(state: Mapping[str, Any]) -> np.random.Generator:
    """A Generator continuing exactly where the one given to ``rng_state`` was."""
    bit_generator = getattr(np.random, state["bit_generator"])()
    bit_generator.state = dict(state)
    return np.random.Generator(bit_generator)


def save_checkpoint(path: str, tensors_by_group: Mapping[str, Mapping[str, np.ndarray]],
                    state: Optional[Mapping[str, Any]] = None) -> str:
    """Write a checkpoint atomically (temp file + fsync + rename).

    Args:
        path: the destination file (e.g. ``run_dir/last.safetensors``) or a directory, in which
            case ``<dir>/last.safetensors`` is written.
        tensors_by_group: group name → {tensor name → array}; group names may not contain "/".
            E.g. ``{"model": model.state_dict(), "optimizer.exp_avg": m, "optimizer.exp_avg_sq": v}``.
        state: JSON-able run state (NumPy scalars/arrays allowed): epoch, step, loader state,
            RNG states (``rng_state``), config, metrics.

    Returns:
        The path written.

    Example:
        >>> save_checkpoint(run_dir, {"model": weights, "optimizer.exp_avg": m},
        ...                 {"epoch": 3, "step": 1200, "loader": loader.state_dict()})
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, LAST)
    flat: Dict[str, np.ndarray] = {}
    for group, tensors in tensors_by_group.items():
        if not isinstance(group, str) or not group or "/" in group:
            raise ValueError(f"save_checkpoint: group names must be non-empty strings without '/', got {group!r}")
        for name, value in tensors.items():
            flat[f"{group}/{name}"] = np.asarray(value)
    metadata = {"format": _KIND, "mapet.groups": json.dumps(list(tensors_by_group)),
                "mapet.state": json.dumps(_encode(dict(state or {})), separators=(",", ":"))}
    # a previous writer killed mid-write leaves its temporary file behind; this run owns the path
    for stale in glob.glob(os.path.join(os.path.dirname(os.path.abspath(path)),
                                        ".tmp-" + glob.escape(os.path.basename(path)) + "-*")):
        try:
            os.unlink(stale)
        except OSError:
            pass
    save_file(flat, path, metadata)
    logger.debug("checkpoint written: %s (%d tensors)", path, len(flat))
    return path


def load_checkpoint(path: str) -> Tuple[Dict[str, Dict[str, np.ndarray]], Dict[str, Any]]:
    """Read a checkpoint written by ``save_checkpoint``.

    Args:
        path: the file, or a run directory (reads ``<dir>/last.safetensors``).

    Returns:
        (tensors_by_group, state), as given to ``save_checkpoint`` (arrays own their memory).

    Raises:
        FileNotFoundError: no checkpoint there.
        ValueError: the file is not a mapet checkpoint or is corrupt (the message names it).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, LAST)
    tensors, metadata = load_file(path)
    if metadata.get("format") != _KIND:
        raise ValueError(f"{path}: not a mapet checkpoint (metadata format={metadata.get('format')!r})")
    try:
        groups = json.loads(metadata["mapet.groups"])
        state = _decode(json.loads(metadata["mapet.state"]))
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: corrupt checkpoint metadata ({type(e).__name__}: {e})") from None
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups) or not isinstance(state, dict):
        raise ValueError(f"{path}: corrupt checkpoint metadata (groups must be a list of names, state an object)")
    out: Dict[str, Dict[str, np.ndarray]] = {g: {} for g in groups}
    for key, value in tensors.items():
        group, _, name = key.partition("/")
        out.setdefault(group, {})[name] = value
    return out, state


def find_checkpoint(run_dir: str) -> Optional[str]:
    """``<run_dir>/last.safetensors`` if it exists, else None (the resume entry point)."""
    path = os.path.join(os.fspath(run_dir), LAST)
    return path if os.path.isfile(path) else None

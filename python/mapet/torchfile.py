"""PyTorch checkpoint files read without PyTorch, and without running any code from the file.

A ``torch.save`` file is a pickle, and unpickling runs whatever callable the file names — a
checkpoint from the internet can run ``os.system``. This reader unpickles with an allow-list:
every global the pickle names is looked up in a table of *data-only* stand-ins written here
(``torch._utils._rebuild_tensor_v2`` becomes "make a NumPy array from these bytes",
``argparse.Namespace`` a plain attribute holder, ...). Nothing the file names is ever imported
or called; any other global raises :class:`UnsafePickleError` naming it, before anything runs.

Formats:
    * the zip format of ``torch.save`` (PyTorch ≥ 1.6): ``<root>/data.pkl`` and one record
      ``<root>/data/<key>`` per storage;
    * TorchScript archives (``torch.jit.save``; OpenAI's CLIP ``.pt`` files): the same layout plus
      ``constants.pkl`` and ``code/``; the pickled module tree is walked and its tensors returned
      under their attribute paths (``visual.conv1.weight``), i.e. the module's ``state_dict``;
    * the legacy format (PyTorch < 1.6): magic number, protocol and system-info pickles, the
      object pickle, the storage keys, then each storage's raw bytes.

Tensors come back as C-contiguous NumPy arrays (bfloat16 widened to float32, exactly).

Example:
    >>> from mapet.torchfile import load_torch_file   # doctest: +SKIP
    >>> sd = load_torch_file("open_clip_pytorch_model.bin")   # doctest: +SKIP
    >>> sd["visual.conv1.weight"].shape   # doctest: +SKIP
    (64, 3, 7, 7)
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import re
import zipfile
from typing import Any, Dict

import numpy as np

from ._torch_pickle import (PickledNamespace, ScriptObject, UnknownGlobal, UnsafePickleError, _is_int,
                            _materialize, _PendingTensor, _Storage, _storage_array, _Unpickler, _unpickle)

__all__ = ["load_torch_file", "torch_file_format", "UnsafePickleError", "PickledNamespace", "ScriptObject",
           "UnknownGlobal"]

_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

def torch_file_format(path: str) -> str:
    """``"zip"`` (torch.save ≥ 1.6), ``"torchscript"`` (torch.jit.save) or ``"legacy"``."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            root = _zip_root(zf, path)
            names = set(zf.namelist())
        return "torchscript" if f"{root}/constants.pkl" in names or any(
            n.startswith(f"{root}/code/") for n in names) else "zip"
    return "legacy"


def _zip_root(zf: zipfile.ZipFile, path: str) -> str:
    roots = [n[: -len("/data.pkl")] for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(roots) != 1:
        raise ValueError(f"{path}: a zip file but not a PyTorch checkpoint (expected one <root>/data.pkl, "
                         f"found {len(roots)})")
    return roots[0]


def load_torch_file(path: str, stub_unknown: bool = False) -> Any:
    """The object saved in a PyTorch file, tensors as NumPy arrays, without executing its code.

    Args:
        path: a ``torch.save`` file (zip or legacy format) or a TorchScript archive.
        stub_unknown: instead of refusing the file, stand an inert :class:`UnknownGlobal` in for
            each global outside the allow-list (still nothing is imported or called; objects of
            those classes are simply not reconstructed).

    Returns:
        The saved object (dicts, OrderedDicts, lists, numbers, strings, arrays; ``argparse``
        namespaces as :class:`PickledNamespace`). For a TorchScript archive: the module's
        state dict, ``{"visual.conv1.weight": array, ...}``.

    Raises:
        UnsafePickleError: the file names a global outside the allow-list (nothing ran;
            not raised with ``stub_unknown``).
        ValueError: the file is not a PyTorch checkpoint, or is corrupt or truncated.
        FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path, stub_unknown)
        return _load_legacy(path, stub_unknown)
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _load_zip(path: str, stub_unknown: bool = False) -> Any:
    with zipfile.ZipFile(path) as zf:
        root = _zip_root(zf, path)
        names = set(zf.namelist())
        byteorder = zf.read(f"{root}/byteorder").decode().strip() if f"{root}/byteorder" in names else "little"
        if byteorder != "little":
            raise ValueError(f"storages in {byteorder}-endian byte order are not supported")
        cache: Dict[str, _Storage] = {}

        def storage(key: str, dtype: str, numel: int, view: Any) -> _Storage:
            if key not in cache:
                record = f"{root}/data/{key}"
                if record not in names:
                    raise ValueError(f"storage {key!r} has no record {record}")
                size = zf.getinfo(record).file_size
                itemsize = 2 if dtype == "bf16" else np.dtype(dtype).itemsize
                if size < numel * itemsize:
                    raise ValueError(f"record {record} holds {size} bytes, the storage needs {numel * itemsize}")
                s = _Storage(key, dtype, numel)
                s.array = _storage_array(zf.read(record), dtype, numel, record)
                cache[key] = s
            return cache[key]

        obj = _unpickle(zf.read(f"{root}/data.pkl"), storage, stub_unknown)
        scripted = f"{root}/constants.pkl" in names or any(n.startswith(f"{root}/code/") for n in names)
        if scripted:
            if not isinstance(obj, ScriptObject):
                raise ValueError("a TorchScript archive whose data.pkl holds no module")
            return _script_state_dict(obj, _script_members(zf, root))
    return obj


_MODULE_CLASS = re.compile(r"^class (\w+)\(Module\):\n\s+__parameters__ = \[([^\]]*)\]\n\s+__buffers__ = \[([^\]]*)\]",
                           re.MULTILINE)


def _script_members(zf: zipfile.ZipFile, root: str) -> Dict[str, set]:
    """Qualified class name → its parameter and buffer names, read (as text, never run) from the
    ``__parameters__`` / ``__buffers__`` lines of the archive's ``code/`` files."""
    members: Dict[str, set] = {}
    for name in zf.namelist():
        if not (name.startswith(f"{root}/code/") and name.endswith(".py")):
            continue
        module = name[len(f"{root}/code/"): -len(".py")].replace("/", ".")
        try:
            text = zf.read(name).decode("utf-8", "replace")
        except (zipfile.BadZipFile, OSError):
            continue
        for m in _MODULE_CLASS.finditer(text):
            listed = re.findall(r'"([^"]*)"', m.group(2) + m.group(3))
            members[f"{module}.{m.group(1)}"] = set(listed)
    return members


def _script_state_dict(module: ScriptObject, members: Dict[str, set]) -> Dict[str, np.ndarray]:
    """The parameters and buffers of a TorchScript module tree under their dotted attribute paths
    (its ``state_dict``); for a class the code does not describe, every tensor attribute."""
    out: Dict[str, np.ndarray] = collections.OrderedDict()
    seen = set()

    def walk(obj: Any, prefix: str) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        state = getattr(obj, "state", None)
        if not isinstance(state, dict):
            return
        listed = members.get(obj.type_name)
        for name, value in state.items():
            if not isinstance(name, str):
                continue
            if isinstance(value, np.ndarray):
                if listed is None or name in listed:
                    out[prefix + name] = value
            elif isinstance(value, ScriptObject):
                walk(value, prefix + name + ".")

    walk(module, "")
    return out


def _load_legacy(path: str, stub_unknown: bool = False) -> Any:
    with open(path, "rb") as f:
        data = f.read()
    stream = io.BytesIO(data)

    def no_storage(*_: Any) -> Any:
        raise ValueError("storage reference outside the object pickle")

    def next_pickle(storage=no_storage, stub: bool = False) -> Any:
        try:  # one pickle after the other from one stream: the position after STOP is exact
            return _Unpickler(stream, storage, stub).load()
        except (UnsafePickleError, ValueError):
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, KeyError,
                RecursionError, MemoryError, OverflowError) as e:
            raise ValueError(f"not a PyTorch checkpoint, or corrupt ({type(e).__name__}: {e})") from None

    if next_pickle() != _MAGIC:
        raise ValueError("not a PyTorch checkpoint (no zip archive and no legacy magic number)")
    if next_pickle() != _LEGACY_PROTOCOL:
        raise ValueError("unsupported legacy protocol version")
    info = next_pickle()
    if not isinstance(info, dict) or not info.get("little_endian", True):
        raise ValueError("legacy checkpoint written on a big-endian machine is not supported")
    storages: Dict[str, _Storage] = {}
    views = []

    def storage(key: str, dtype: str, numel: int, view: Any) -> _Storage:
        if key not in storages:
            storages[key] = _Storage(key, dtype, numel)
        root = storages[key]
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
                and _is_int(view[1]) and _is_int(view[2]) and view[1] >= 0 and view[2] >= 0):
            raise ValueError(f"bad storage view {view!r:.80}")
        v = _Storage(view[0], dtype, view[2])
        views.append((v, root, view[1]))
        return v

    obj = next_pickle(storage, stub_unknown)
    keys = next_pickle()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError("bad storage key list")
    for key in keys:
        if key not in storages:
            raise ValueError(f"storage {key!r} listed but never used")
        s = storages[key]
        head = stream.read(8)
        if len(head) < 8:
            raise ValueError("truncated storage data")
        numel = int.from_bytes(head, "little")
        itemsize = 2 if s.dtype == "bf16" else np.dtype(s.dtype).itemsize
        raw = stream.read(numel * itemsize)
        if numel < s.numel or len(raw) < numel * itemsize:
            raise ValueError(f"truncated storage {key!r}")
        s.array = _storage_array(raw, s.dtype, s.numel, f"storage {key!r}")
    for v, root, offset in views:
        if root.array is None or offset + v.numel > root.numel:
            raise ValueError(f"storage view {v.key!r} outside its storage")
        v.array = root.array[offset: offset + v.numel]
    missing = [k for k, s in storages.items() if s.array is None]
    if missing:
        raise ValueError(f"storages {missing[:5]} have no data")
    return _resolve(obj, {})


def _resolve(obj: Any, memo: Dict[int, Any]) -> Any:
    """`obj` with every pending tensor replaced by its array (containers rebuilt; cycles kept)."""
    if isinstance(obj, _PendingTensor):
        return _materialize(obj)
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, dict):
        memo[id(obj)] = obj
        for k in list(obj):
            obj[k] = _resolve(obj[k], memo)
    elif isinstance(obj, list):
        memo[id(obj)] = obj
        obj[:] = [_resolve(v, memo) for v in obj]
    elif isinstance(obj, tuple):
        memo[id(obj)] = obj
        new = tuple(_resolve(v, memo) for v in obj)
        memo[id(obj)] = new
        return new
    elif isinstance(obj, (PickledNamespace, ScriptObject, UnknownGlobal)):
        memo[id(obj)] = obj
        for k, v in list(vars(obj).items()):
            setattr(obj, k, _resolve(v, memo))
    return obj

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
from typing import Any, Dict, Optional, Tuple

import numpy as np

__all__ = ["load_torch_file", "torch_file_format", "UnsafePickleError", "PickledNamespace", "ScriptObject",
           "UnknownGlobal"]

_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": "bf16",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?", "UntypedStorage": "u1",
}


class UnsafePickleError(ValueError):
    """The pickle names a global that is not on the allow-list (nothing was executed)."""


class PickledNamespace:
    """Stand-in for ``argparse.Namespace`` (training arguments saved in checkpoints): attributes only."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update({str(k): v for k, v in state.items()})

    def __repr__(self) -> str:
        return "Namespace(" + ", ".join(f"{k}={v!r}" for k, v in sorted(self.__dict__.items())) + ")"


class ScriptObject:
    """Stand-in for a TorchScript object (``__torch__.*`` class): its type name and attributes."""

    type_name = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"ScriptObject({self.type_name})"


class UnknownGlobal:
    """Inert stand-in for a global outside the allow-list, made only with ``stub_unknown=True``:
    it records the global's name and whatever the pickle passes to it; nothing is imported or called.
    (E.g. training arguments saved as a ``munch.Munch``: the weights load, the arguments do not.)"""

    type_name = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"UnknownGlobal({self.type_name})"


_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """One storage: dtype and element count; its bytes are attached once they are read."""

    def __init__(self, key: str, dtype: str, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel
        self.array: Optional[np.ndarray] = None


class _PendingTensor:
    """A tensor whose storage bytes come later in the file (legacy format)."""

    def __init__(self, storage: _Storage, offset: int, size: Tuple[int, ...], stride: Tuple[int, ...]) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _DType:
    """Stand-in for ``numpy.dtype`` inside pickled NumPy scalars; numeric kinds only."""

    def __init__(self, name: Any, align: Any = False, copy: Any = True) -> None:
        if not isinstance(name, str):
            raise UnsafePickleError(f"numpy.dtype: expected a dtype name, got {type(name).__name__}")
        try:
            dt = np.dtype(name)
        except TypeError:
            raise UnsafePickleError(f"numpy.dtype: unknown dtype {name!r}") from None
        if dt.kind not in "biufc":
            raise UnsafePickleError(f"numpy.dtype: only numeric dtypes are read, got {name!r}")
        self.dtype = dt

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.dtype = self.dtype.newbyteorder(state[1] if state[1] != "|" else "=")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> Any:
    if not isinstance(storage, _Storage):
        raise ValueError(f"_rebuild_tensor_v2: expected a storage, got {type(storage).__name__}")
    if isinstance(size, list):
        size = tuple(size)
    if isinstance(stride, list):
        stride = tuple(stride)
    if not (_is_int(offset) and isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and all(_is_int(v) and v >= 0 for v in size + stride) and offset >= 0):
        raise ValueError(f"_rebuild_tensor_v2: bad geometry offset={offset!r} size={size!r} stride={stride!r}")
    if all(n > 0 for n in size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            raise ValueError(f"tensor of size {list(size)} (stride {list(stride)}, offset {offset}) reaches element "
                             f"{last} of a storage of {storage.numel}")
    pending = _PendingTensor(storage, offset, size, stride)
    return _materialize(pending) if storage.array is not None else pending


def _materialize(t: _PendingTensor) -> np.ndarray:
    data = t.storage.array
    bf16 = t.storage.dtype == "bf16"
    if any(n == 0 for n in t.size):
        out = np.zeros(t.size, np.uint16 if bf16 else data.dtype)
    else:
        view = np.lib.stride_tricks.as_strided(data[t.offset:], shape=t.size,
                                               strides=tuple(s * data.itemsize for s in t.stride), writeable=False)
        out = np.array(view, order="C")
    if bf16:  # bfloat16 = the upper half of a float32: widening is exact
        out = (out.astype(np.uint32) << 16).view(np.float32)
    if out.dtype.byteorder == ">" or (out.dtype.byteorder == "=" and not np.little_endian):
        out = out.astype(out.dtype.newbyteorder("="))
    return out


def _rebuild_parameter(data: Any, requires_grad: Any = None, backward_hooks: Any = None, *state: Any) -> Any:
    return data


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, _DType) or not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("numpy scalar: expected a numeric dtype and its bytes")
    if len(data) != dtype.dtype.itemsize:
        raise ValueError(f"numpy scalar: {len(data)} bytes for a {dtype.dtype}")
    return np.frombuffer(bytes(data), dtype.dtype)[0]


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # protocol-2 pickles write bytes as _codecs.encode(str, 'latin1')
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafePickleError(f"_codecs.encode: only str → bytes in latin1/utf-8, got encoding {encoding!r}")
    return text.encode(encoding)


def _as_list(x: Any) -> list:
    if not isinstance(x, (list, tuple)):
        raise ValueError(f"torch.jit._pickle: expected a list, got {type(x).__name__}")
    return list(x)


def _restore_type_tag(value: Any, type_str: Any = None) -> Any:
    return value


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("argparse", "Namespace"): PickledNamespace,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _DType,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch.jit._pickle", "build_intlist"): _as_list,
    ("torch.jit._pickle", "build_doublelist"): _as_list,
    ("torch.jit._pickle", "build_boollist"): _as_list,
    ("torch.jit._pickle", "build_tensorlist"): _as_list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
}
_SCRIPT_NAME = re.compile(r"^__torch__(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class _Unpickler(pickle.Unpickler):
    """An unpickler that resolves globals from `_ALLOWED` only and storages through `storage`."""

    def __init__(self, stream: io.BytesIO, storage, stub_unknown: bool = False) -> None:
        super().__init__(stream)
        self._storage = storage
        self._stub = stub_unknown
        self._script_types: Dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if _SCRIPT_NAME.match(module) and name.isidentifier():
            qualified = f"{module}.{name}"
            if qualified not in self._script_types:
                self._script_types[qualified] = type("ScriptObject", (ScriptObject,), {"type_name": qualified})
            return self._script_types[qualified]
        if self._stub and _DOTTED.match(module) and _DOTTED.match(name):
            qualified = f"{module}.{name}"
            if qualified not in self._script_types:
                self._script_types[qualified] = type("UnknownGlobal", (UnknownGlobal,), {"type_name": qualified})
            return self._script_types[qualified]
        raise UnsafePickleError(f"refused to load global {module}.{name}: not a tensor, storage or plain container "
                                "(this reader never imports or calls anything a checkpoint names; with "
                                "stub_unknown=True / --stub-unknown such objects are skipped instead)")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise ValueError(f"unsupported persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not _is_int(numel) or numel < 0:
            raise ValueError(f"bad storage reference {pid!r:.80}")
        view = pid[5] if len(pid) == 6 else None
        return self._storage(key, storage_type.dtype, numel, view)


def _unpickle(data: bytes, storage, stub_unknown: bool = False) -> Any:
    try:
        return _Unpickler(io.BytesIO(data), storage, stub_unknown).load()
    except (UnsafePickleError, ValueError):
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, KeyError,
            RecursionError, MemoryError, OverflowError) as e:
        raise ValueError(f"corrupt or unsupported pickle ({type(e).__name__}: {e})") from None


def _storage_array(raw: bytes, dtype: str, numel: int, where: str) -> np.ndarray:
    np_dtype = np.dtype("<u2" if dtype == "bf16" else dtype)
    need = numel * np_dtype.itemsize
    if len(raw) < need:
        raise ValueError(f"{where}: {len(raw)} bytes for a storage of {numel} × {np_dtype.itemsize} bytes")
    return np.frombuffer(raw, np_dtype, count=numel)


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

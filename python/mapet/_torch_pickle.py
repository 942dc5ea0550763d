"""The allow-list unpickler behind :mod:`mapet.torchfile` (its public names are re-exported
there): data-only stand-ins for the globals a PyTorch pickle may name, the pending tensors they
build, and the storages those tensors read. Nothing a file names is imported or called."""
from __future__ import annotations

import collections
import io
import pickle
import re
from typing import Any, Dict, Optional, Tuple

import numpy as np

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

"""PyTorch checkpoint files written by hand (pickle opcodes + zipfile), without torch.

The pickles are emitted opcode by opcode, as ``torch.save`` writes them (protocol 2): a tensor is
``torch._utils._rebuild_tensor_v2(<persistent storage id>, offset, size, stride, False,
OrderedDict())`` and its storage a persistent id ``('storage', torch.FloatStorage, key, 'cpu',
numel)``. The same emitter writes hostile pickles (``os.system`` calls) for the refusal tests.
"""
import pickle
import struct
import zipfile
from typing import Any, Dict, Optional, Sequence

import numpy as np

MAGIC = 0x1950A86A20F9469CFC6C

STORAGE_NAMES = {np.dtype("float32"): "FloatStorage", np.dtype("float64"): "DoubleStorage",
                 np.dtype("float16"): "HalfStorage", np.dtype("int64"): "LongStorage",
                 np.dtype("int32"): "IntStorage", np.dtype("int16"): "ShortStorage", np.dtype("int8"): "CharStorage",
                 np.dtype("uint8"): "ByteStorage", np.dtype("bool"): "BoolStorage"}


class Storage:
    """A storage: its key, torch storage class name and raw little-endian bytes."""

    def __init__(self, key: str, data: np.ndarray, bf16: bool = False) -> None:
        self.key = key
        self.bf16 = bf16
        flat = np.ascontiguousarray(data).reshape(-1)
        if bf16:  # data given as float32: keep its upper 16 bits (truncation; the test knows)
            flat = (flat.astype(np.float32).view(np.uint32) >> 16).astype("<u2")
            self.type_name = "BFloat16Storage"
        else:
            self.type_name = STORAGE_NAMES[flat.dtype]
            flat = flat.astype(flat.dtype.newbyteorder("<"))
        self.numel = flat.size
        self.bytes = flat.tobytes()


class Tensor:
    """A view of a storage: offset, size and stride in elements."""

    def __init__(self, storage: Storage, size: Sequence[int], stride: Optional[Sequence[int]] = None, offset: int = 0):
        self.storage, self.size, self.offset = storage, tuple(size), offset
        if stride is None:
            stride, acc = [], 1
            for n in reversed(self.size):
                stride.insert(0, acc)
                acc *= n
        self.stride = tuple(stride)


class Obj:
    """An instance made by NEWOBJ of a global class, then BUILD with ``state``."""

    def __init__(self, module: str, name: str, state: Any) -> None:
        self.module, self.name, self.state = module, name, state


class Call:
    """``module.name(*args)`` through REDUCE (how a hostile pickle runs code)."""

    def __init__(self, module: str, name: str, args: tuple) -> None:
        self.module, self.name, self.args = module, name, args


class OrderedDict(dict):
    """Emitted as ``collections.OrderedDict()`` + SETITEMS."""


class Emitter:
    def __init__(self, legacy: bool = False) -> None:
        self.out = bytearray(b"\x80\x02")
        self.legacy = legacy
        self.storages: Dict[str, Storage] = {}

    def glob(self, module: str, name: str) -> None:
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def dump(self, obj: Any) -> "Emitter":
        o = self.out
        if obj is None:
            o += b"N"
        elif obj is True:
            o += b"\x88"
        elif obj is False:
            o += b"\x89"
        elif isinstance(obj, int):
            if 0 <= obj < 2 ** 31:
                o += b"J" + struct.pack("<i", obj)
            else:
                b = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
                o += b"\x8a" + bytes([len(b)]) + b
        elif isinstance(obj, float):
            o += b"G" + struct.pack(">d", obj)
        elif isinstance(obj, str):
            b = obj.encode()
            o += b"X" + struct.pack("<I", len(b)) + b
        elif isinstance(obj, tuple):
            o += b"("
            for v in obj:
                self.dump(v)
            o += b"t"
        elif isinstance(obj, list):
            o += b"]("
            for v in obj:
                self.dump(v)
            o += b"e"
        elif isinstance(obj, dict):
            if isinstance(obj, OrderedDict):  # collections.OrderedDict() called, then filled like a dict
                self.glob("collections", "OrderedDict")
                o += b")R("
            else:
                o += b"}("
            for k, v in obj.items():
                self.dump(k)
                self.dump(v)
            o += b"u"
        elif isinstance(obj, Tensor):
            s = obj.storage
            self.storages[s.key] = s
            self.glob("torch._utils", "_rebuild_tensor_v2")
            o += b"("
            o += b"("                       # persistent id tuple
            self.dump("storage")
            self.glob("torch", s.type_name)
            self.dump(s.key)
            self.dump("cpu")
            self.dump(s.numel)
            if self.legacy:
                o += b"N"                   # view_metadata
            o += b"tQ"                      # TUPLE, BINPERSID
            self.dump(obj.offset)
            self.dump(obj.size)
            self.dump(obj.stride)
            o += b"\x89"
            self.dump(OrderedDict())
            o += b"tR"
        elif isinstance(obj, Obj):
            self.glob(obj.module, obj.name)
            o += b")\x81"                   # EMPTY_TUPLE, NEWOBJ
            self.dump(obj.state)
            o += b"b"                       # BUILD
        elif isinstance(obj, Call):
            self.glob(obj.module, obj.name)
            self.dump(tuple(obj.args))
            o += b"R"
        else:
            raise TypeError(type(obj))
        return self

    def finish(self) -> bytes:
        return bytes(self.out + b".")


def write_zip(path: str, obj: Any, root: str = "archive", extra: Optional[Dict[str, bytes]] = None,
              truncate: Optional[str] = None) -> None:
    """A ``torch.save`` zip file: <root>/data.pkl, <root>/data/<key>, version and byteorder."""
    e = Emitter()
    data = e.dump(obj).finish()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{root}/data.pkl", data)
        zf.writestr(f"{root}/byteorder", "little")
        for key, s in e.storages.items():
            zf.writestr(f"{root}/data/{key}", s.bytes[: len(s.bytes) // 2] if key == truncate else s.bytes)
        zf.writestr(f"{root}/version", "3\n")
        for name, blob in (extra or {}).items():
            zf.writestr(f"{root}/{name}", blob)


def write_legacy(path: str, obj: Any) -> None:
    """A pre-1.6 ``torch.save`` file: magic, protocol, sys info, object, keys, raw storages."""
    e = Emitter(legacy=True)
    data = e.dump(obj).finish()
    keys = sorted(e.storages)
    with open(path, "wb") as f:
        f.write(pickle.dumps(MAGIC, protocol=2))
        f.write(pickle.dumps(1001, protocol=2))
        f.write(pickle.dumps({"protocol_version": 1001, "little_endian": True,
                              "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2))
        f.write(data)
        f.write(pickle.dumps(keys, protocol=2))
        for k in keys:
            s = e.storages[k]
            f.write(struct.pack("<q", s.numel))
            f.write(s.bytes)


def write_torchscript(path: str, module: Obj, code: Dict[str, str], root: str = "model") -> None:
    """A ``torch.jit.save`` archive: data.pkl holding the module tree, constants.pkl, code/ files."""
    write_zip(path, module, root=root, extra=dict({"constants.pkl": pickle.dumps((), protocol=2)},
                                                 **{f"code/{k}": v.encode() for k, v in code.items()}))


def tensors(state: Dict[str, np.ndarray], prefix: str = "s") -> Dict[str, Tensor]:
    """Each array as a contiguous tensor on its own storage."""
    return OrderedDict((k, Tensor(Storage(f"{prefix}{i}", v), v.shape)) for i, (k, v) in enumerate(state.items()))

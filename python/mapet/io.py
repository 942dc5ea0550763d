"""safetensors files, written atomically, read zero-copy-friendly.

The format (https://github.com/huggingface/safetensors): 8-byte little-endian header size,
a JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}``, then the raw little-endian tensor bytes. Files written here load in the
``safetensors`` package (``safetensors.numpy.load_file`` / ``torch`` variants) and back.
"""
import json
import os
import struct
import tempfile
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def atomic_write(path: str, write) -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, fsync, then rename.

    A failure (or a kill) at any point leaves any previous file at ``path`` untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_file(tensors: Mapping[str, np.ndarray], path: str,
              metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write ``tensors`` to ``path`` in safetensors format, atomically.

    Args:
        tensors: name → array (any of the safetensors dtypes; made contiguous).
        path: destination file.
        metadata: optional str → str map stored as ``__metadata__``.
    """
    header: Dict[str, object] = {}
    arrays = []
    offset = 0
    for name in tensors:  # keep the caller's order
        a = np.ascontiguousarray(tensors[name])
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        kind = _NAMES.get(np.dtype(a.dtype.str.replace(">", "<")))
        if kind is None:
            raise TypeError(f"save_file: tensor {name!r} has unsupported dtype {a.dtype}")
        header[name] = {"dtype": kind, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        arrays.append(a)
        offset += a.nbytes
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"save_file: metadata must map str to str; offending keys {bad}")
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section

    def write(f):
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(memoryview(a).cast("B"))

    atomic_write(path, write)


def load_file(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Read a safetensors file.

    Returns:
        (tensors, metadata): name → NumPy array (owning its memory), and the metadata map.

    Raises:
        ValueError: the file is truncated or not safetensors (the message names the file).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: not a safetensors file (only {len(raw)} bytes)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise ValueError(f"{path}: not a safetensors file or truncated (header of {n} bytes)")
    try:
        header = json.loads(raw[8:8 + n])
    except ValueError as e:
        raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    base = 8 + n
    metadata = header.pop("__metadata__", {}) or {}
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        if base + end > len(raw) or begin > end:
            raise ValueError(f"{path}: truncated (tensor {name!r} ends past the file)")
        a = np.frombuffer(raw, dtype=dtype, count=(end - begin) // np.dtype(dtype).itemsize, offset=base + begin)
        out[name] = a.reshape(info["shape"]).copy()
    return out, dict(metadata)

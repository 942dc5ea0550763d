"""safetensors files through the ``safetensors`` package, written atomically.

Reading and writing go through the Rust implementation of the format (``safetensors.safe_open``
and ``safetensors.numpy.save``), which rejects every malformed file (bad header length or JSON,
overlapping, out-of-bounds or negative offsets, duplicate keys, bad shapes, trailing bytes,
non-string metadata); here its errors become ``ValueError`` naming the file, and writes go to a
temporary file that is fsynced and renamed over the destination.
"""
import json
import os
import tempfile
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np
import safetensors
import safetensors.numpy

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
        tensors: name → array (any of the safetensors dtypes; made contiguous little-endian).
        path: destination file.
        metadata: optional str → str map stored as ``__metadata__``.

    Raises:
        TypeError: a name or metadata entry is not a str, or a dtype safetensors cannot hold.
    """
    arrays = {}
    for name in tensors:
        if not isinstance(name, str):
            raise TypeError(f"save_file: tensor names must be str, got {name!r}")
        a = np.ascontiguousarray(tensors[name])
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        if _NAMES.get(np.dtype(a.dtype.str.replace(">", "<"))) is None:
            raise TypeError(f"save_file: tensor {name!r} has unsupported dtype {a.dtype}")
        arrays[name] = a
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"save_file: metadata must map str to str; offending keys {bad}")
    blob = _sorted_metadata(safetensors.numpy.save(arrays, metadata=dict(metadata) if metadata else None))
    atomic_write(path, lambda f: f.write(blob))


def _sorted_metadata(blob: bytes) -> bytes:
    """The package's file with its ``__metadata__`` entries in sorted order.

    safetensors keeps the metadata in a hash map, so the same weights and metadata would be
    written in a different byte order on each run; sorting the entries makes equal content equal
    bytes (checksums, byte-wise comparisons of runs). The header keeps its length and alignment
    padding and the tensor entries their order and offsets: only the metadata entries move.
    """
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", None)
    if not meta:
        return blob
    text = json.dumps({"__metadata__": dict(sorted(meta.items())), **header},
                      separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # never for the package's own compact JSON; keep its bytes if so
        return blob
    return blob[:8] + text + b" " * (n - len(text)) + blob[8 + n:]


def load_file(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Read a safetensors file.

    Returns:
        (tensors, metadata): name → NumPy array (owning its memory, numeric dtype), and the
        metadata map (str → str).

    Raises:
        FileNotFoundError: no such file. ValueError: the file is not valid safetensors or holds a
        dtype NumPy cannot represent (the message names the file and the problem).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file")
        raise ValueError(f"{path}: not a regular file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise ValueError(f"{path}: not a safetensors file (only {size} bytes)")
    n = int.from_bytes(head, "little")
    if n > size - 8:
        raise ValueError(f"{path}: truncated or not a safetensors file (header of {n} bytes, file of {size})")
    try:
        with safetensors.safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
            names = f.offset_keys() if hasattr(f, "offset_keys") else f.keys()
            out = {}
            for name in names:
                a = f.get_tensor(name)
                if a.dtype.kind not in "biuf":
                    raise ValueError(f"tensor {name!r} has dtype {a.dtype}")
                out[name] = np.array(a, copy=True)
    except (safetensors.SafetensorError, ValueError, TypeError, OverflowError) as e:
        what = "truncated, or bytes no tensor covers" if "not fully covered" in str(e) else "not a valid safetensors file"
        raise ValueError(f"{path}: {what} ({e})") from None
    return out, dict(metadata)


def build_from_config(path: str, text: str, build: Callable[..., Any], what: str, wrap: Optional[type] = None) -> Any:
    """``build(**config)`` for the JSON object ``text`` read from the file ``path``. A bad config raises
    naming the file and ``what``: as ``wrap`` when given, else as the error's own type."""
    try:
        config = json.loads(text)
        if not isinstance(config, dict):
            raise TypeError(f"expected an object, got {type(config).__name__}")
        return build(**config)
    except (ValueError, TypeError, MemoryError) as e:
        if wrap is not None:
            raise wrap(f"{path}: bad {what} ({type(e).__name__}: {e})") from None
        raise type(e)(f"{path}: bad {what} ({e})") from None


def model_from_file(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str],
                    build: Callable[..., Any]) -> Any:
    """The model of a mapet model file: ``build(**config)`` from the JSON config in its metadata (a bad
    config raises naming the file), its weights (``load_state_dict``, strict names) and its input
    normalisation (``data_config``)."""
    model = build_from_config(path, metadata["config"], build, "model config")
    model.load_state_dict(tensors)
    from .data.data_config import from_metadata
    model.data_config = from_metadata(metadata)
    return model

"""Token caches: a dataset's visual tokens computed once, stored as an .npy array + JSON manifest.

Layout of a cache directory::

    tokens.npy      int16 [n, P] when n_tokens <= 32767, else int32 (memory-mapped on read)
    manifest.json   {"format": "mapet-token-cache", "version": 1, "complete": true, "length": n,
                     "n_patches": P, "grid": [gh, gw] | null, "n_tokens": K, "dtype": "int16",
                     "tokenizer": "<fingerprint>", "dataset": "<id>" | null, "sha256": "..."}

The manifest is written last and atomically, so a tokenization killed midway leaves a cache
that ``TokenCache.open`` rejects instead of one that silently holds zeros.
"""
import hashlib
import json
import os
from typing import Any, Optional, Sequence

import numpy as np

from ..io import atomic_write
from .datasets import DatasetView
from .sharding import contiguous_part

MANIFEST, TOKENS = "manifest.json", "tokens.npy"
_FORMAT, _VERSION = "mapet-token-cache", 1


def _check_manifest(m: dict, mpath: str) -> None:
    """Types and ranges of the manifest's fields; shard files must be plain names inside the cache."""
    def count(key, where=m, label=None):
        v = where.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise TokenCacheError(f"{mpath}: {label or key} must be an int ≥ 0, got {v!r}")
    for key in ("length", "n_patches", "n_tokens"):
        count(key)
    if not isinstance(m.get("dtype"), str) or m["dtype"] not in ("int16", "int32", "int64", "uint16", "uint8"):
        raise TokenCacheError(f"{mpath}: dtype must name an integer dtype, got {m.get('dtype')!r}")
    shards = m.get("shards")
    if shards is None:
        return
    if not isinstance(shards, list):
        raise TokenCacheError(f"{mpath}: shards must be a list, got {type(shards).__name__}")
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            raise TokenCacheError(f"{mpath}: shards[{i}] must be an object, got {shard!r}")
        name = shard.get("file")
        if (not isinstance(name, str) or not name or name in (".", "..") or os.path.basename(name) != name
                or "/" in name or "\\" in name or os.path.isabs(name)):
            raise TokenCacheError(f"{mpath}: shards[{i}].file must be a file name inside the cache directory, got {name!r}")
        count("start", shard, f"shards[{i}].start")
        count("stop", shard, f"shards[{i}].stop")
        if shard["stop"] < shard["start"]:
            raise TokenCacheError(f"{mpath}: shards[{i}] stops ({shard['stop']}) before it starts ({shard['start']})")


class TokenCacheError(ValueError):
    """A token cache is missing, incomplete, corrupt or does not match what the caller expects."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable identity for a tokenizer: sha256 over its class name and centroids.

    Accepts a string (returned unchanged — a name you manage yourself), a NumPy array of
    centroids, or any object with ``cluster_centers_`` / ``centroids`` (mapet.KMeans,
    PixelTokenizer, FeatureTokenizer, ...).
    """
    if isinstance(tokenizer, str):
        return tokenizer
    if isinstance(tokenizer, np.ndarray):
        name, centers = "ndarray", tokenizer
    else:
        centers = None
        for attr in ("cluster_centers_", "centroids"):
            centers = getattr(tokenizer, attr, None)
            if centers is not None:
                break
        if centers is None:
            raise TypeError(f"tokenizer_fingerprint: {type(tokenizer).__name__} has no cluster_centers_ / "
                            "centroids; pass a string identity instead")
        name = type(tokenizer).__name__
    c = np.ascontiguousarray(centers)
    h = hashlib.sha256(f"{name}:{c.dtype.str}:{list(c.shape)}:".encode())
    h.update(memoryview(c).cast("B"))
    return f"{name}-sha256:{h.hexdigest()}"


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class TokenCacheWriter:
    """Fills a cache batch by batch (``write(start, tokens)``); ``close()`` validates and seals it."""

    def __init__(self, directory: str, length: int, n_patches: int, n_tokens: int, tokenizer: Any,
                 dataset: Optional[str] = None, grid: Optional[Sequence[int]] = None):
        if length <= 0 or n_patches <= 0 or n_tokens <= 0:
            raise ValueError(f"TokenCache: length, n_patches, n_tokens must be positive, "
                             f"got {length}, {n_patches}, {n_tokens}")
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        manifest = os.path.join(self.directory, MANIFEST)
        if os.path.exists(manifest):
            os.unlink(manifest)  # the directory is being rewritten: it is not a valid cache until close()
        self.dtype = np.dtype(np.int16 if n_tokens <= np.iinfo(np.int16).max else np.int32)
        self.length, self.n_patches, self.n_tokens = int(length), int(n_patches), int(n_tokens)
        self.tokenizer, self.dataset = tokenizer_fingerprint(tokenizer), dataset
        self.grid = list(grid) if grid is not None else None
        self.path = os.path.join(self.directory, TOKENS)
        self._array = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype,
                                                shape=(self.length, self.n_patches))
        self._written = np.zeros(self.length, dtype=bool)

    def write(self, start: int, tokens: np.ndarray) -> None:
        """Store ``tokens`` [b, n_patches] (any integer dtype) for samples ``start .. start+b-1``."""
        t = np.asarray(tokens)
        if not np.issubdtype(t.dtype, np.integer):
            raise TypeError(f"TokenCache.write: tokens must be integers, got dtype {t.dtype}")
        if t.ndim != 2 or t.shape[1] != self.n_patches:
            raise ValueError(f"TokenCache.write: expected tokens [b, {self.n_patches}], got shape {t.shape}")
        if start < 0 or start + t.shape[0] > self.length:
            raise ValueError(f"TokenCache.write: rows {start}..{start + t.shape[0] - 1} outside 0..{self.length - 1}")
        if t.size and (t.min() < 0 or t.max() >= self.n_tokens):
            raise ValueError(f"TokenCache.write: token ids must lie in [0, {self.n_tokens}), "
                             f"got range [{t.min()}, {t.max()}]")
        self._array[start:start + t.shape[0]] = t
        self._written[start:start + t.shape[0]] = True

    def close(self) -> "TokenCache":
        """Check every row was written, flush, write the manifest atomically; returns the opened cache."""
        missing = np.flatnonzero(~self._written)
        if missing.size:
            raise TokenCacheError(f"{self.path}: {missing.size} of {self.length} rows were never written "
                                  f"(first {missing[:5].tolist()}); the cache is not sealed")
        self._array.flush()
        del self._array
        manifest = {"format": _FORMAT, "version": _VERSION, "complete": True, "length": self.length,
                    "n_patches": self.n_patches, "grid": self.grid, "n_tokens": self.n_tokens,
                    "dtype": self.dtype.name, "tokenizer": self.tokenizer, "dataset": self.dataset,
                    "sha256": _sha256_file(self.path)}
        blob = json.dumps(manifest, indent=2).encode()
        atomic_write(os.path.join(self.directory, MANIFEST), lambda f: f.write(blob))
        return TokenCache.open(self.directory)


class TokenCache:
    """A sealed token cache: ``tokens`` [n, P] (memory-mapped), ``len``, indexing, ``manifest``.

    Example:
        >>> TokenCache.write("cache/digits", tok.encode(images), n_tokens=512, tokenizer=tok)
        >>> cache = TokenCache.open("cache/digits", length=len(ds), tokenizer=tok)
        >>> tokens = cache[batch_indices]     # int16/int32 [b, P]
    """

    def __init__(self, directory: str, manifest: dict, tokens: np.ndarray):
        self.directory, self.manifest, self.tokens = directory, manifest, tokens

    @staticmethod
    def create(directory: str, length: int, n_patches: int, n_tokens: int, tokenizer: Any,
               dataset: Optional[str] = None, grid: Optional[Sequence[int]] = None) -> TokenCacheWriter:
        """Start a cache to be filled batch by batch (for datasets too large to tokenize at once)."""
        return TokenCacheWriter(directory, length, n_patches, n_tokens, tokenizer, dataset, grid)

    @staticmethod
    def write(directory: str, tokens: np.ndarray, n_tokens: int, tokenizer: Any,
              dataset: Optional[str] = None, grid: Optional[Sequence[int]] = None) -> "TokenCache":
        """Write a whole [n, P] token array at once; returns the opened cache."""
        t = np.asarray(tokens)
        if t.ndim != 2:
            raise ValueError(f"TokenCache.write: expected tokens [n, P], got shape {t.shape}")
        w = TokenCacheWriter(directory, t.shape[0], t.shape[1], n_tokens, tokenizer, dataset, grid)
        w.write(0, t)
        return w.close()

    @staticmethod
    def write_sharded(tokenizer: Any, images: Any, directory: str, ctx: Any = None, batch_size: int = 256,
                      dataset: Optional[str] = None, grid: Optional[Sequence[int]] = None) -> "TokenCache":
        """Tokenize a dataset spread over MPI ranks into one cache: every rank encodes its contiguous
        share of the rows (:func:`mapet.data.sharding.contiguous_part`) into its own shard file
        ``tokens-RRRRR-of-WWWWW.npy``, then rank 0 writes the one manifest that lists the shards
        (written last, atomically).

        Args:
            tokenizer: a fitted tokenizer with ``encode`` and ``n_tokens`` (e.g. PixelTokenizer); every
                rank must hold the same one (fit with the same seed, or load the same file).
            images: the whole dataset as seen by every rank (an array or a memmap; each rank reads only
                its rows).
            directory: the cache directory (on a file system all ranks see).
            ctx: the :class:`mapet.distributed.Context` (default: the current one).
            batch_size: images encoded per call.

        Returns:
            The opened cache (on every rank).
        """
        if ctx is None:
            from ..distributed import context
            ctx = context()
        n = len(images)
        rows = contiguous_part(n, ctx.rank, ctx.world_size)
        lo, hi = rows.start, rows.stop
        dtype = np.dtype(np.int16 if tokenizer.n_tokens <= np.iinfo(np.int16).max else np.int32)
        parts = [np.asarray(tokenizer.encode(images[i:min(i + batch_size, hi)])) for i in range(lo, hi, batch_size)]
        n_patches = int(parts[0].shape[1]) if parts else 0
        mine = np.concatenate(parts).astype(dtype) if parts else np.zeros((0, n_patches), dtype)
        name = f"tokens-{ctx.rank:05d}-of-{ctx.world_size:05d}.npy"
        os.makedirs(directory, exist_ok=True)
        if ctx.is_main and os.path.exists(os.path.join(directory, MANIFEST)):
            os.unlink(os.path.join(directory, MANIFEST))  # not a valid cache until the new manifest lands
        atomic_write(os.path.join(directory, name), lambda f: np.save(f, mine, allow_pickle=False))
        shards = ctx.allgather({"file": name, "start": lo, "stop": hi, "n_patches": int(mine.shape[1]),
                                "sha256": _sha256_file(os.path.join(directory, name))})
        if ctx.is_main:
            n_patches = max(s.pop("n_patches") for s in shards)
            manifest = {"format": _FORMAT, "version": _VERSION, "complete": True, "length": n,
                        "n_patches": n_patches, "grid": list(grid) if grid is not None else None,
                        "n_tokens": int(tokenizer.n_tokens), "dtype": dtype.name,
                        "tokenizer": tokenizer_fingerprint(tokenizer), "dataset": dataset, "shards": shards}
            blob = json.dumps(manifest, indent=2).encode()
            atomic_write(os.path.join(directory, MANIFEST), lambda f: f.write(blob))
        ctx.barrier()
        return TokenCache.open(directory)

    @staticmethod
    def open(directory: str, *, length: Optional[int] = None, tokenizer: Any = None,
             n_patches: Optional[int] = None, n_tokens: Optional[int] = None,
             dataset: Optional[str] = None, verify: bool = False, mmap: bool = True) -> "TokenCache":
        """Open and validate a cache; every ``expected`` argument given is checked against the manifest.

        Args:
            directory: the cache directory.
            length: expected number of samples (the dataset's ``len``).
            tokenizer: expected tokenizer (object, centroid array or string; see ``tokenizer_fingerprint``).
            n_patches, n_tokens, dataset: expected tokens per image, vocabulary size, dataset id.
            verify: also recompute the sha256 of tokens.npy (reads the whole file).
            mmap: memory-map tokens.npy (else load it into memory).

        Raises:
            TokenCacheError: naming the file and the mismatch.
        """
        directory = os.fspath(directory)
        mpath, tpath = os.path.join(directory, MANIFEST), os.path.join(directory, TOKENS)
        if not os.path.exists(mpath):
            hint = " (tokens.npy exists: the tokenization did not finish)" if os.path.exists(tpath) else ""
            raise TokenCacheError(f"{mpath}: no token-cache manifest{hint}")
        try:
            with open(mpath) as f:
                m = json.load(f)
        except ValueError as e:
            raise TokenCacheError(f"{mpath}: corrupt manifest ({e})") from None
        if not isinstance(m, dict) or m.get("format") != _FORMAT or not m.get("complete"):
            raise TokenCacheError(f"{mpath}: not a complete mapet token cache")
        _check_manifest(m, mpath)
        if m.get("shards"):
            # Written by several ranks (TokenCache.write_sharded): one file per rank,
            # rows [start, stop) each, joined here in order.
            parts = []
            for shard in m["shards"]:
                spath = os.path.join(directory, shard["file"])
                try:
                    part = np.load(spath, mmap_mode="r" if mmap else None, allow_pickle=False)
                except (OSError, ValueError) as e:
                    raise TokenCacheError(f"{spath}: cannot read token shard ({e})") from None
                if part.shape != (shard["stop"] - shard["start"], m["n_patches"]):
                    raise TokenCacheError(f"{spath}: holds {part.shape}, manifest says rows "
                                          f"{shard['start']}..{shard['stop']} of {m['n_patches']} tokens")
                if verify and _sha256_file(spath) != shard.get("sha256"):
                    raise TokenCacheError(f"{spath}: checksum differs from the manifest (file modified or corrupt)")
                parts.append(part)
            if [s["start"] for s in m["shards"]] != [0] + [s["stop"] for s in m["shards"][:-1]]:
                raise TokenCacheError(f"{mpath}: shards do not tile the rows 0..{m['length']} in order")
            tokens, tpath, verify = np.concatenate(parts), mpath, False
        else:
            try:
                tokens = np.load(tpath, mmap_mode="r" if mmap else None, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise TokenCacheError(f"{tpath}: cannot read tokens ({e})") from None
        want_shape = (m["length"], m["n_patches"])
        if tokens.shape != want_shape or tokens.dtype.name != m["dtype"]:
            raise TokenCacheError(f"{tpath}: holds {tokens.dtype.name} {tokens.shape}, manifest says "
                                  f"{m['dtype']} {want_shape}")
        checks = [("length", length, m["length"]), ("n_patches", n_patches, m["n_patches"]),
                  ("n_tokens", n_tokens, m["n_tokens"]), ("dataset", dataset, m.get("dataset"))]
        if tokenizer is not None:
            checks.append(("tokenizer", tokenizer_fingerprint(tokenizer), m["tokenizer"]))
        for key, want, have in checks:
            if want is not None and want != have:
                raise TokenCacheError(f"{mpath}: {key} mismatch — the cache has {have!r}, expected {want!r}")
        if verify and _sha256_file(tpath) != m.get("sha256"):
            raise TokenCacheError(f"{tpath}: checksum differs from the manifest (file modified or corrupt)")
        return TokenCache(directory, m, tokens)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        return np.asarray(self.tokens[index])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def n_patches(self) -> int:
        return int(self.manifest["n_patches"])

    def attach(self, dataset) -> "TokenDataset":
        """Wrap ``dataset`` so each item gains its tokens last: ``(image, label, tokens)``."""
        return TokenDataset(dataset, self)


class TokenDataset(DatasetView):
    """A dataset whose items are the wrapped dataset's item followed by the sample's cached tokens."""

    def __init__(self, dataset, cache: TokenCache):
        if len(dataset) != len(cache):
            raise TokenCacheError(f"{os.path.join(cache.directory, MANIFEST)}: the cache holds {len(cache)} "
                                  f"samples but the dataset has {len(dataset)}")
        deterministic = getattr(dataset, "deterministic", True)
        if not deterministic:
            raise ValueError("TokenDataset: the dataset's view is random (random crops/flips), so cached "
                             "tokens would not match its pixels; use a deterministic view (e.g. "
                             "ImageFolder(mode='pretrain') with the default scale/ratio) or tokenize on the fly")
        self.dataset, self.cache = dataset, cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        return tuple(self.dataset[i]) + (self.cache[i],)

    @property
    def targets(self):
        return getattr(self.dataset, "targets", None)

    def get_batch(self, indices: np.ndarray) -> tuple:
        if hasattr(self.dataset, "get_batch"):
            head = tuple(self.dataset.get_batch(indices))
        else:
            from .loader import _collate
            head = _collate([self.dataset[int(i)] for i in indices])
        return head + (self.cache[indices],)

"""Permutations and masks for MaPeT pre-training, and BEiT block masks for MIM.

``PermutationSampler`` draws, for every image, a random order of the patches (the class token
always first). The first ``least_number`` tokens of the order form the *context*; the others
are *predicted*, each from the tokens that precede it in the order plus the auxiliary
positional tokens of the ones that follow (ALGORITHMS.md §2). A ``PermutationBatch`` holds the orders,
their ranks and the predicted positions; attention asks the Swift may-attend rules
(``TwoStreamContentMask`` / ``TwoStreamQueryMask``) for every pair, in O(1) from the ranks,
so training never builds dense masks. ``content_mask(i)`` / ``query_mask(i)`` evaluate the
same rules densely for one sample, for inspection, plotting and tests.

Randomness: xoshiro256** seeded through SplitMix64; sample number ``s`` of a sampler uses its
own stream (outputs 4s..4s+3 of SplitMix64(seed) as the xoshiro256** state), so results depend
on the seed and the number of samples drawn before, never on ``mapet.set_num_threads``. The
patch order is a Fisher–Yates shuffle of 1..n (for i = n−1 down to 1 swap slots i and
``below(i+1)``, Lemire's unbiased bounded integers). The state is ``(seed, samples_drawn)``:
``state_dict()`` / ``load_state_dict()`` resume a run exactly.
"""
import secrets
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from ._convert import seed_bits
from ._native import _core

__all__ = ["PermutationSampler", "PermutationBatch", "BlockMaskGenerator"]

_GENERATOR = "xoshiro256**/splitmix64-streams/v1"
_U64 = (1 << 64) - 1


def _seed_bits(seed: Optional[int], name: str = "seed") -> Tuple[int, int]:
    """(seed as given or drawn from the OS, its signed 64-bit pattern for the engine)."""
    if seed is None:
        seed = secrets.randbits(63)
    return int(seed), seed_bits(seed, name)


def _unsigned(bits: int) -> int:
    return bits & _U64


def _int_arg(value: Any, name: str, minimum: Optional[int] = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int ≥ {minimum}, got {value}")
    return value


class PermutationBatch:
    """A batch of MaPeT permutations (from ``PermutationSampler.sample`` or ``from_orders``).

    Sequence positions: 0 = class token, 1..n = patches, N = n + 1; P = N − least_number.

    Attributes:
        batch_size, sequence_length (N), least_number, num_predicted (P), upper_limit: the sizes.
        orders: int64 [B, N], ``orders[b, k]`` = the token at permutation index k (``orders[:, 0] == 0``).
        ranks: int64 [B, N], the inverse: ``ranks[b, orders[b, k]] == k``.
        predicted: int64 [B, P], the predicted token positions of each sample, ascending.
        predicted_ranks: int64 [B, P], ``ranks`` at ``predicted``.
        context: bool [B, N], True for tokens ranked below ``least_number`` (class token included).
        loss_mask: bool [B, P], True for predicted tokens that count in the loss: those ranked at
            most ``upper_limit`` (all of them when ``upper_limit`` is None), as in the reference.
        loss_weights: float32 [B, P], ``loss_mask / loss_mask.sum()``: the loss is
            ``sum(loss_weights * cross_entropy)``, the mean over the counted tokens.

    The arrays are read-only views of the engine's tables (the masks are computed from them).
    """

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        B, N, L, P, upper = _core.perm_batch_info(handle)
        self.batch_size, self.sequence_length, self.least_number, self.num_predicted = B, N, L, P
        self.upper_limit: Optional[int] = upper
        orders, ranks, predicted, predicted_ranks = _core.perm_batch_arrays(handle)
        self.orders = np.asarray(orders)
        self.ranks = np.asarray(ranks)
        self.predicted = np.asarray(predicted)
        self.predicted_ranks = np.asarray(predicted_ranks)

    @classmethod
    def from_orders(cls, orders: np.ndarray, least_number: int,
                    upper_limit: Optional[int] = None) -> "PermutationBatch":
        """A batch from given orders, validated.

        Args:
            orders: integer array [B, N]: each row a permutation of 0..N−1 with the class token
                0 first (the order in which tokens are revealed).
            least_number: context size L, 1 ≤ L ≤ N − 1 (the class token counts).
            upper_limit: None, or the largest rank whose predicted token counts in the loss (≥ L).

        Returns:
            The ``PermutationBatch``.

        Raises:
            TypeError: orders is not an integer array.
            ValueError: wrong shape, or a row that is not a permutation with 0 first (the message
                names the first bad row).

        Example:
            >>> import numpy as np, mapet
            >>> b = mapet.PermutationBatch.from_orders(np.array([[0, 3, 1, 2, 4]]), least_number=2)
            >>> b.predicted.tolist(), b.ranks.tolist()
            ([[1, 2, 4]], [[0, 2, 3, 1, 4]])
        """
        arr = np.asarray(orders)
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"orders: expected an integer array [B, N], got dtype {arr.dtype}")
        if arr.ndim != 2:
            raise ValueError(f"orders: expected a 2-d array [B, N], got shape {arr.shape}")
        if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise ValueError("orders: values exceed int64")
        arr = np.ascontiguousarray(arr, dtype=np.int64)
        least_number = _int_arg(least_number, "least_number")
        if upper_limit is not None:
            upper_limit = _int_arg(upper_limit, "upper_limit")
        return cls(_core.perm_batch_from_orders(arr, least_number, upper_limit))

    def __len__(self) -> int:
        return self.batch_size

    @property
    def num_tokens(self) -> int:
        """Deprecated name of ``sequence_length`` (``num_tokens`` is the vocabulary in model configs)."""
        return self.sequence_length

    def __repr__(self) -> str:
        return (f"PermutationBatch(batch_size={self.batch_size}, sequence_length={self.sequence_length}, "
                f"least_number={self.least_number}, num_predicted={self.num_predicted}, "
                f"upper_limit={self.upper_limit})")

    @property
    def context(self) -> np.ndarray:
        return self.ranks < self.least_number

    @property
    def loss_mask(self) -> np.ndarray:
        if self.upper_limit is None:
            return np.ones(self.predicted.shape, dtype=bool)
        return self.predicted_ranks <= self.upper_limit

    @property
    def loss_weights(self) -> np.ndarray:
        m = self.loss_mask
        return (m / max(int(m.sum()), 1)).astype(np.float32)

    def _mask(self, stream: str, i: int, positional_tokens: bool) -> np.ndarray:
        i = _int_arg(i, "i")
        if i < 0:
            i += self.batch_size
        N, P = self.sequence_length, self.num_predicted
        keys = N + P if positional_tokens else N
        rows = keys if stream == "content" else P
        out = np.empty((rows, keys), dtype=np.int32)
        _core.perm_batch_mask(self._handle, stream, i, bool(positional_tokens), out)
        return out.astype(bool)

    def content_mask(self, i: int, positional_tokens: bool = True) -> np.ndarray:
        """The content-stream mask of sample ``i`` (True = may attend).

        Rows and columns: the N tokens, then (with ``positional_tokens``) the auxiliary
        positional tokens m_0..m_{P−1} of the predicted tokens in ascending order.
        ``positional_tokens=False`` gives the PIM (XLNet-style) mask [N, N].

        Args:
            i: sample index (negative counts from the end).
            positional_tokens: MaPeT (True, [N+P, N+P]) or PIM (False, [N, N]).

        Returns:
            bool array [rows, columns].
        """
        return self._mask("content", i, positional_tokens)

    def query_mask(self, i: int, positional_tokens: bool = True) -> np.ndarray:
        """The query-stream mask of sample ``i`` (True = may attend).

        Row j is predicted token ``predicted[i, j]``; columns as in ``content_mask``
        ([P, N+P] for MaPeT, [P, N] for PIM).
        """
        return self._mask("query", i, positional_tokens)

    def _any_allowed(self, stream: str, i: int, queries: range, keys: range,
                     positional_tokens: bool = True) -> bool:
        """The rule's block test (used by attention to skip key blocks); for tests."""
        return _core.perm_batch_mask_any(self._handle, stream, int(i), bool(positional_tokens),
                                         queries.start, queries.stop, keys.start, keys.stop)


class PermutationSampler:
    """Seeded random permutations for MaPeT pre-training.

    Args:
        num_patches: n, patches per image (196 for 224 px / 16); N = n + 1 with the class token.
        least_number: context size L (class token included), 1 ≤ L ≤ N − 1; P = N − L tokens
            are predicted per image. Default 50 as in the paper.
        upper_limit: None, or the largest rank whose predicted token counts in the loss
            (the reference's ``upper_limit``; ranks count the class token as 0).
        seed: int in [0, 2**64), or None to draw one from the OS (then readable as ``.seed``).

    Example:
        >>> import mapet
        >>> s = mapet.PermutationSampler(196, least_number=50, seed=0)
        >>> b = s.sample(8)
        >>> b.orders.shape, b.predicted.shape, b.content_mask(0).shape, b.query_mask(0).shape
        ((8, 197), (8, 147), (344, 344), (147, 344))
    """

    def __init__(self, num_patches: int, least_number: int = 50, upper_limit: Optional[int] = None,
                 seed: Optional[int] = None) -> None:
        self.num_patches = _int_arg(num_patches, "num_patches", minimum=1)
        self.least_number = _int_arg(least_number, "least_number")
        self.upper_limit = None if upper_limit is None else _int_arg(upper_limit, "upper_limit")
        self.seed, bits = _seed_bits(seed)
        self._handle = _core.perm_sampler_new(self.num_patches, self.least_number, self.upper_limit, bits)

    @property
    def sequence_length(self) -> int:
        """Tokens per sequence: the patches and the class token."""
        return self.num_patches + 1

    #: Deprecated name of :attr:`sequence_length` (``num_tokens`` is the vocabulary in model configs).
    num_tokens = sequence_length

    @property
    def num_predicted(self) -> int:
        return self.sequence_length - self.least_number

    @property
    def samples_drawn(self) -> int:
        return _unsigned(_core.perm_sampler_state(self._handle)[1])

    def sample(self, batch_size: int) -> PermutationBatch:
        """Draw the next ``batch_size`` permutations.

        Args:
            batch_size: B ≥ 1.

        Returns:
            A ``PermutationBatch``.
        """
        return PermutationBatch(_core.perm_sampler_sample(self._handle, _int_arg(batch_size, "batch_size", 1)))

    def state_dict(self) -> Dict[str, Any]:
        """The sampler's configuration and position (plain ints and strings, JSON-able)."""
        seed, drawn = _core.perm_sampler_state(self._handle)
        return {"generator": _GENERATOR, "num_patches": self.num_patches, "least_number": self.least_number,
                "upper_limit": self.upper_limit, "seed": _unsigned(seed), "samples_drawn": _unsigned(drawn)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from ``state_dict()``: the next batches repeat those the saved sampler would draw.

        Raises:
            ValueError: the state comes from another generator or a sampler of another configuration.
        """
        _check_state(state, _GENERATOR, {"num_patches": self.num_patches, "least_number": self.least_number,
                                         "upper_limit": self.upper_limit})
        seed, seed_bits = _seed_bits(state["seed"], "state['seed']")
        _, drawn_bits = _seed_bits(state["samples_drawn"], "state['samples_drawn']")
        _core.perm_sampler_set_state(self._handle, seed_bits, drawn_bits)
        self.seed = seed

    def __repr__(self) -> str:
        return (f"PermutationSampler(num_patches={self.num_patches}, least_number={self.least_number}, "
                f"upper_limit={self.upper_limit}, seed={self.seed})")


def _check_state(state: Dict[str, Any], generator: str, config: Dict[str, Any]) -> None:
    if not isinstance(state, dict):
        raise TypeError(f"state: expected a dict from state_dict(), got {type(state).__name__}")
    missing = [k for k in ("generator", "seed", "samples_drawn", *config) if k not in state]
    if missing:
        raise ValueError(f"state: missing keys {missing}")
    if state["generator"] != generator:
        raise ValueError(f"state: generator {state['generator']!r} differs from {generator!r}")
    for k, v in config.items():
        saved = state[k]
        if isinstance(v, (list, tuple)):
            saved, v = list(saved), list(v)
        if saved != v:
            raise ValueError(f"state: {k} is {saved!r} in the state but {v!r} in this sampler")


class BlockMaskGenerator:
    """Block-wise masking of BEiT (MIM baseline), seeded, with an exact count (BEiT v2).

    Blocks of area ~ U(min_num_patches, remaining budget) and log-uniform aspect ratio in
    [min_aspect, max_aspect] are placed at random until ``num_masking_patches`` cells are masked
    or a round of 10 tries adds nothing; with ``exact`` the shortfall is then masked cell by cell
    at random. Randomness as for ``PermutationSampler`` (one stream per mask).

    Args:
        input_size: grid side g (or (height, width)); 14 for 224 px / 16.
        num_masking_patches: target count t (75 of 196 in BEiT).
        min_num_patches: smallest block area drawn (16).
        max_num_patches: largest number of cells one block may add (None: t).
        min_aspect: smallest aspect ratio (0.3); max_aspect None means 1 / min_aspect.
        exact: fill to exactly t masked cells.
        seed: int in [0, 2**64) or None (OS entropy).

    Example:
        >>> import mapet
        >>> g = mapet.BlockMaskGenerator(14, 75, seed=0)
        >>> int(g().sum()), g.sample(4).shape
        (75, (4, 196))
    """

    def __init__(self, input_size: Union[int, Tuple[int, int]] = 14, num_masking_patches: int = 75,
                 min_num_patches: int = 16, max_num_patches: Optional[int] = None, min_aspect: float = 0.3,
                 max_aspect: Optional[float] = None, exact: bool = True, seed: Optional[int] = None) -> None:
        if isinstance(input_size, (tuple, list)):
            if len(input_size) != 2:
                raise ValueError(f"input_size: expected an int or (height, width), got {input_size!r}")
            h, w = (_int_arg(v, "input_size", 1) for v in input_size)
        else:
            h = w = _int_arg(input_size, "input_size", 1)
        self.height, self.width = h, w
        self.num_masking_patches = _int_arg(num_masking_patches, "num_masking_patches", 0)
        self.min_num_patches = _int_arg(min_num_patches, "min_num_patches", 1)
        self.max_num_patches = (self.num_masking_patches if max_num_patches is None
                                else _int_arg(max_num_patches, "max_num_patches", 1))
        self.min_aspect = float(min_aspect)
        if not self.min_aspect > 0 or not np.isfinite(self.min_aspect):
            raise ValueError(f"min_aspect: expected a finite number > 0, got {min_aspect!r}")
        self.max_aspect = float(max_aspect) if max_aspect is not None else 1.0 / self.min_aspect
        self.exact = bool(exact)
        self.seed, bits = _seed_bits(seed)
        self._handle = _core.block_sampler_new(
            h, w, self.num_masking_patches, self.min_num_patches, max(self.max_num_patches, 1),
            self.min_aspect, self.max_aspect, self.exact, bits)

    def _config(self) -> Dict[str, Any]:
        return {"input_size": [self.height, self.width], "num_masking_patches": self.num_masking_patches,
                "min_num_patches": self.min_num_patches, "max_num_patches": self.max_num_patches,
                "min_aspect": self.min_aspect, "max_aspect": self.max_aspect, "exact": self.exact}

    def __call__(self) -> np.ndarray:
        """The next mask, bool [height, width] (True = masked)."""
        return self.sample(1)[0].reshape(self.height, self.width)

    def sample(self, batch_size: int) -> np.ndarray:
        """The next ``batch_size`` masks, bool [B, height·width] (True = masked)."""
        out = np.empty((_int_arg(batch_size, "batch_size", 1), self.height * self.width), dtype=np.int32)
        _core.block_sampler_sample(self._handle, out)
        return out.astype(bool)

    def sample_with_blocks(self) -> Tuple[np.ndarray, List[Tuple[int, int, int, int, int]]]:
        """The next mask and its accepted blocks ``(top, left, height, width, budget)``.

        ``budget`` is the most cells the block was allowed to add. Consumes one mask of the
        stream, like ``__call__`` (same result for the same state).
        """
        out = np.empty(self.height * self.width, dtype=np.int32)
        blocks = _core.block_sampler_sample_blocks(self._handle, out)
        return out.astype(bool).reshape(self.height, self.width), blocks

    @property
    def samples_drawn(self) -> int:
        return _unsigned(_core.block_sampler_state(self._handle)[1])

    def state_dict(self) -> Dict[str, Any]:
        """Configuration and position (JSON-able)."""
        seed, drawn = _core.block_sampler_state(self._handle)
        return {"generator": _GENERATOR, **self._config(), "seed": _unsigned(seed), "samples_drawn": _unsigned(drawn)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from ``state_dict()`` (same configuration required)."""
        _check_state(state, _GENERATOR, self._config())
        seed, seed_bits = _seed_bits(state["seed"], "state['seed']")
        _, drawn_bits = _seed_bits(state["samples_drawn"], "state['samples_drawn']")
        _core.block_sampler_set_state(self._handle, seed_bits, drawn_bits)
        self.seed = seed

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"BlockMaskGenerator({cfg}, seed={self.seed})"

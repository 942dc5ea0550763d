"""What every mapet model shares: one contiguous parameter block and one gradient block, cut by
a size table into named zero-copy views (reference names, reference order)."""
import logging
from collections import OrderedDict
from typing import Any, Callable, List, Mapping, Tuple

import numpy as np

from ._runtime import set_precision

log = logging.getLogger("mapet.models")


class ParameterBlock:
    """Mixin: call ``_bind(table, params, grads)`` once the Swift model exists.

    ``table`` is [(name, shape, offset)]; ``params`` / ``grads`` are the Swift-owned 1-d blocks.
    """

    _table: List[Tuple[str, Tuple[int, ...], int]]
    #: The engine's (get, set) of this kind of model's precision.
    _precision_ops: Tuple[Callable, Callable]

    @property
    def precision(self) -> str:
        """Precision of every matrix product, forward and backward: "fp32", or "bf16" (inputs
        rounded to bfloat16, fp32 accumulation; weights, gradients, optimizer state, norms,
        softmax, GELU and losses stay fp32, as ``torch.autocast``). Settable at any time; files
        stay fp32 and load into a model of either precision.

        Raises:
            ValueError: not "fp32" or "bf16".
        """
        return self._precision_ops[0](self._handle)

    @precision.setter
    def precision(self, value: str) -> None:
        set_precision(self._precision_ops[1], self._handle, value)

    def _bind(self, table, params, grads) -> None:
        self._table = table
        self.flat_params: np.ndarray = np.asarray(params)
        """The whole parameter block (1-d float32, zero-copy)."""
        self.flat_grads: np.ndarray = np.asarray(grads)
        """The whole gradient block (1-d float32, zero-copy; all-reduce this in place)."""
        self._params = self._views(self.flat_params)
        self._grads = self._views(self.flat_grads)

    def _views(self, flat: np.ndarray) -> "OrderedDict[str, np.ndarray]":
        out: "OrderedDict[str, np.ndarray]" = OrderedDict()
        for name, shape, offset in self._table:
            count = int(np.prod(shape)) if shape else 1
            out[name] = flat[offset:offset + count].reshape(shape)
        return out

    @property
    def parameter_table(self) -> List[Tuple[str, Tuple[int, ...], int]]:
        """Ordered (name, shape, offset) of every parameter inside ``flat_params`` / ``flat_grads``."""
        return list(self._table)

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(s)) for _, s, _ in self._table)

    def summary(self) -> str:
        """Configuration, parameter count, precision and the parameters' shapes, as text."""
        from ._summary import summary
        return summary(self)

    def _repr_html_(self) -> str:
        """The summary as an HTML table: what a notebook shows for a model."""
        from ._summary import to_html
        return to_html(self)

    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Parameters under the reference names, in reference order: zero-copy views (writes change the model)."""
        return OrderedDict(self._params)

    def grads(self) -> "OrderedDict[str, np.ndarray]":
        """Accumulated gradients under the parameter names: zero-copy views."""
        return OrderedDict(self._grads)

    def params_flat(self) -> np.ndarray:
        """The whole parameter block as one 1-d float32 zero-copy view."""
        return self.flat_params

    def grads_flat(self) -> np.ndarray:
        """The whole gradient block as one 1-d float32 zero-copy view (same layout as ``params_flat``)."""
        return self.flat_grads

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Copy weights in by name (e.g. a reference PyTorch state_dict converted with ``.numpy()``).

        Args:
            state: name → array.
            strict: require exactly the model's names; otherwise missing and unexpected names are
                skipped (shapes must still match).

        Raises:
            KeyError: names differ (strict), listing the missing and unexpected ones.
            ValueError: a shape differs or a value is not finite; the model is left unchanged.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected a mapping name -> array, got {type(state).__name__}")
        missing = [n for n in self._params if n not in state]
        unexpected = sorted(set(state) - set(self._params))
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}; unexpected keys {unexpected}")
        staged = {}
        for name, target in self._params.items():
            if name not in state:
                continue
            value = np.asarray(state[name])
            if value.dtype.kind not in "fiu":
                raise TypeError(f"load_state_dict: {name} has dtype {value.dtype}, expected a numeric array")
            if value.shape != target.shape:
                raise ValueError(f"load_state_dict: {name} has shape {tuple(value.shape)}, the model expects {target.shape}")
            value = value.astype(np.float32, copy=False)
            if not np.all(np.isfinite(value)):
                raise ValueError(f"load_state_dict: {name} contains non-finite values")
            staged[name] = value
        for name, value in staged.items():
            self._params[name][...] = value
        if missing or unexpected:
            log.info("load_state_dict: skipped missing %s, unexpected %s", missing, unexpected)

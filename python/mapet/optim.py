"""AdamW with decoupled weight decay, layer-wise lr decay and global-norm clipping (Swift).

The update is torch.optim.AdamW's; moments live in two contiguous Swift blocks laid out like
the model's parameter block. Parameters excluded from weight decay follow the MaPeT/BEiT
recipe: every 1-D tensor (biases, norms, layer scales), ``pos_embed`` and ``cls_token``.
"""
import json
import threading
from collections import OrderedDict
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

import numpy as np

from ._native import _core
from .io import load_file
from .schedules import layer_decay_scales, no_weight_decay


class AdamW:
    """AdamW over every parameter of ``model``.

    Args:
        model: a mapet model (``parameter_table``, ``flat_params``, ``flat_grads``).
        lr: learning rate (change per step with ``step(lr=...)``).
        betas: (β1, β2).
        eps: denominator term.
        weight_decay: decoupled decay for ≥2-D weights (not 1-D params, pos_embed, cls_token).
        layer_decay: BEiT layer-wise lr decay factor (float), or a dict name → lr scale.
        clip_grad: global gradient-norm limit applied before each update (None = off).
        skip_weight_decay: extra parameter names to exclude from weight decay.

    Example:
        >>> import numpy as np, mapet
        >>> m = mapet.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=4, depth=1)
        >>> opt = mapet.AdamW(m, lr=1e-3)
        >>> loss = m.train_step(np.random.rand(2, 3, 32, 32), [0, 1]); norm = opt.step(); opt.zero_grad()
    """

    def __init__(self, model: Any, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.05,
                 layer_decay: Union[None, float, Mapping[str, float]] = None,
                 clip_grad: Optional[float] = None, skip_weight_decay: Iterable[str] = ()) -> None:
        if not (lr >= 0 and np.isfinite(lr)):
            raise ValueError(f"lr: expected a finite value ≥ 0, got {lr}")
        b1, b2 = (float(b) for b in betas)
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas: expected values in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"eps: expected a positive value, got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay: expected a value ≥ 0, got {weight_decay}")
        if clip_grad is not None and not clip_grad > 0:
            raise ValueError(f"clip_grad: expected a positive max norm or None, got {clip_grad}")
        self.model = model
        table = model.parameter_table
        names = [n for n, _, _ in table]
        if layer_decay is None:
            scales = {n: 1.0 for n in names}
        elif isinstance(layer_decay, Mapping):
            unknown = sorted(set(layer_decay) - set(names))
            if unknown:
                raise KeyError(f"layer_decay: unknown parameter names {unknown}")
            scales = {n: float(layer_decay.get(n, 1.0)) for n in names}
        else:
            scales = layer_decay_scales(names, int(model.config["depth"]), float(layer_decay))
        skip = set(skip_weight_decay)
        self.lr_scales: Dict[str, float] = scales
        self.decay: Dict[str, bool] = {n: not (no_weight_decay(n, s) or n in skip) for n, s, _ in table}
        segments = [(off, int(np.prod(s)) if s else 1, self.decay[n], scales[n]) for n, s, off in table]
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), (b1, b2), float(eps), float(weight_decay)
        self.clip_grad = None if clip_grad is None else float(clip_grad)
        self._handle = _core.adamw_create(model.flat_params.size, segments, self.lr, b1, b2, self.eps, self.weight_decay)
        m, v, _ = _core.adamw_moments(self._handle)
        self._m, self._v = np.asarray(m), np.asarray(v)
        self._table = table
        self._step = 0
        # The engine serialises calls on one optimizer; this lock does the same for the Python-side
        # state (step count, hyper-parameters) that a step reads and writes.
        self._lock = threading.RLock()

    @property
    def step_count(self) -> int:
        """Updates done so far (the t of the bias corrections)."""
        return self._step

    def _configure(self) -> None:
        _core.adamw_configure(self._handle, self.lr, self.betas[0], self.betas[1], self.eps, self.weight_decay, self._step)

    def _set_hyper(self, lr: float, betas: Tuple[float, float], eps: float, weight_decay: float, step: int) -> None:
        """Hands the values to the engine (which checks them in float32 and raises before changing
        anything), then keeps them here: a refused value leaves the optimizer as it was."""
        _core.adamw_configure(self._handle, lr, betas[0], betas[1], eps, weight_decay, step)
        self.lr, self.betas, self.eps, self.weight_decay, self._step = lr, betas, eps, weight_decay, step

    def step(self, lr: Optional[float] = None) -> float:
        """One update from the model's accumulated gradients.

        Args:
            lr: new learning rate (kept for later steps); None keeps the current one.

        Returns:
            The global gradient norm before clipping.

        Raises:
            ValueError: the gradient norm is not finite (parameters unchanged).
        """
        if lr is not None and not (lr >= 0 and np.isfinite(lr)):
            raise ValueError(f"lr: expected a finite value ≥ 0, got {lr}")
        with self._lock:
            if lr is not None:
                self._set_hyper(float(lr), self.betas, self.eps, self.weight_decay, self._step)
            self._configure()
            norm = _core.adamw_step(self._handle, self.model.flat_params, self.model.flat_grads, self.clip_grad)
            self._step += 1
            return norm

    def zero_grad(self) -> None:
        """Clear the model's gradients."""
        self.model.zero_grad()

    def _views(self, flat: np.ndarray) -> "OrderedDict[str, np.ndarray]":
        return OrderedDict((n, flat[o:o + (int(np.prod(s)) if s else 1)].reshape(s)) for n, s, o in self._table)

    def state_dict(self) -> Dict[str, Any]:
        """step, hyper-parameters and the moments (zero-copy views by parameter name)."""
        return {"step": self._step, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "clip_grad": self.clip_grad,
                "exp_avg": self._views(self._m), "exp_avg_sq": self._views(self._v)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` output: all or nothing.

        Names, shapes, finiteness of the moments, the step and the hyper-parameters (in float32)
        are all checked before anything changes; on any error the optimizer is left as it was.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected a mapping (AdamW.state_dict()), got {type(state).__name__}")
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key not in state:
                raise KeyError(f"load_state_dict: state has no '{key}'")
        views_m, views_v = self._views(self._m), self._views(self._v)
        new = {}
        for label in ("exp_avg", "exp_avg_sq"):
            src = state[label]
            if not isinstance(src, Mapping):
                raise TypeError(f"load_state_dict: {label} must map parameter names to arrays, got {type(src).__name__}")
            missing, extra = sorted(set(views_m) - set(src)), sorted(set(src) - set(views_m))
            if missing or extra:
                raise KeyError(f"load_state_dict: {label} missing {missing}, unexpected {extra}")
            for n, dst in views_m.items():
                a = np.asarray(src[n])
                if a.dtype.kind not in "fiu":
                    raise TypeError(f"load_state_dict: {label}.{n} has dtype {a.dtype}, expected a float array")
                if a.shape != dst.shape:
                    raise ValueError(f"load_state_dict: {label}.{n} has shape {a.shape}, expected {dst.shape}")
                a = a.astype(np.float32)
                if not np.all(np.isfinite(a)):
                    raise ValueError(f"load_state_dict: {label}.{n} holds NaN or inf")
                if label == "exp_avg_sq" and np.any(a < 0):
                    raise ValueError(f"load_state_dict: {label}.{n} holds negative values (a second moment is ≥ 0)")
                new[label, n] = a
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"load_state_dict: step must be an int ≥ 0, got {step!r}")
        try:
            betas = tuple(float(b) for b in state.get("betas", self.betas))
            lr, eps = float(state.get("lr", self.lr)), float(state.get("eps", self.eps))
            wd = float(state.get("weight_decay", self.weight_decay))
        except (TypeError, ValueError) as e:
            raise ValueError(f"load_state_dict: bad hyper-parameter ({e})") from None
        if len(betas) != 2:
            raise ValueError(f"load_state_dict: betas must hold two values, got {betas}")
        clip = state.get("clip_grad", self.clip_grad)
        if clip is not None:
            clip = float(clip)
            if not (np.isfinite(np.float32(clip)) and clip > 0):
                raise ValueError(f"load_state_dict: clip_grad must be None or a positive float32, got {clip}")
        with self._lock:
            self._set_hyper(lr, betas, eps, wd, int(step))   # raises (nothing changed) if the engine refuses a value
            self.clip_grad = clip
            for n in views_m:
                views_m[n][...] = new["exp_avg", n]
                views_v[n][...] = new["exp_avg_sq", n]

    def load(self, path: str) -> None:
        """Restore the optimizer state stored by ``model.save(path, optimizer=...)``."""
        tensors, metadata = load_file(path)
        if "optimizer" not in metadata:
            raise ValueError(f"{path}: holds no optimizer state")
        state = json.loads(metadata["optimizer"])
        state["exp_avg"] = {k[len("optimizer.exp_avg."):]: t for k, t in tensors.items() if k.startswith("optimizer.exp_avg.")}
        state["exp_avg_sq"] = {k[len("optimizer.exp_avg_sq."):]: t for k, t in tensors.items() if k.startswith("optimizer.exp_avg_sq.")}
        self.load_state_dict(state)

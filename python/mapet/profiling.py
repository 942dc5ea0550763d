"""Where a step's time goes: ``with mapet.profile() as prof: ...`` then ``print(prof)``.

The engine times its kernel entry points by class while a profile runs (matrix products, attention,
norms, elementwise work, losses, the optimizer); the extension also times its calls as a whole and
their GIL-released part. The report splits the wall time of the ``with`` block into:

- the kernel classes (native work, measured at each kernel's entry point);
- ``engine other``: native work outside those kernels (embedding gathers, sampling, copies);
- ``boundary``: extension calls outside their native part (argument checks, conversions);
- ``python``: everything outside extension calls (the facade, NumPy, the training loop).

Times are summed over calls; if several Python threads call the engine at once, the native
classes can add up to more than the wall time. One profile runs at a time (the accounting is
process-wide).
"""
import threading
import time
from typing import Dict, List, Optional, Tuple

from ._native import _core

KERNEL_CLASSES = ("gemm", "attention", "norms", "elementwise", "loss", "optimizer")
_active = threading.Lock()


class Profile:
    """Times per kernel class of the code run inside ``with mapet.profile()`` (see the module docstring).

    Attributes:
        wall: seconds the ``with`` block took.
        rows: ``[(name, seconds, calls)]``: the kernel classes, then ``engine other``, ``boundary``
            and ``python`` (calls 0 where not counted).
    """

    def __init__(self) -> None:
        self.wall = 0.0
        self.rows: List[Tuple[str, float, int]] = []
        self._t0: Optional[float] = None

    def __enter__(self) -> "Profile":
        if not _active.acquire(blocking=False):
            raise RuntimeError("mapet.profile(): another profile is running (the accounting is process-wide)")
        _core.profile_reset(True)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        snap = {name: (ns * 1e-9, calls) for name, ns, calls in _core.profile_snapshot()}
        _core.profile_reset(False)
        _active.release()
        kernels = [(name, *snap[name]) for name in KERNEL_CLASSES]
        native, _ = snap["native"]
        ext, ext_calls = snap["extension_call"]
        other = max(0.0, native - sum(s for _, s, _ in kernels))
        self.rows = kernels + [("engine other", other, 0), ("boundary", max(0.0, ext - native), ext_calls),
                               ("python", max(0.0, self.wall - ext), 0)]

    def as_dict(self) -> Dict[str, float]:
        """Seconds per row name, plus ``wall``."""
        return dict({name: s for name, s, _ in self.rows}, wall=self.wall)

    def table(self) -> str:
        """The report as a text table: seconds, share of the wall time, calls."""
        lines = [f"{'class':14s} {'seconds':>9s} {'share':>7s} {'calls':>8s}"]
        for name, s, calls in self.rows:
            share = 100 * s / self.wall if self.wall > 0 else 0.0
            lines.append(f"{name:14s} {s:9.4f} {share:6.1f}% {calls if calls else '':>8}")
        lines.append(f"{'wall':14s} {self.wall:9.4f} {100.0:6.1f}%")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{n}</td><td>{s:.4f}</td><td>{100 * s / self.wall if self.wall else 0:.1f}%</td></tr>"
                       for n, s, _ in self.rows)
        return (f"<table><tr><th>class</th><th>seconds</th><th>share</th></tr>{rows}"
                f"<tr><td><b>wall</b></td><td>{self.wall:.4f}</td><td>100%</td></tr></table>")


def profile() -> Profile:
    """A context manager that reports where the time of the steps run inside it goes.

    Example:
        >>> import numpy as np, mapet
        >>> model = mapet.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3)
        >>> x = np.zeros((2, 3, 32, 32), np.float32)
        >>> with mapet.profile() as prof:
        ...     _ = model.train_step(x, np.array([0, 1]))
        >>> sorted(prof.as_dict())[:3]
        ['attention', 'boundary', 'elementwise']
    """
    return Profile()

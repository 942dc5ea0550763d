"""Progress bars (tqdm) where a person is watching, silence everywhere else.

One rule for every long stage (pre-training, fine-tuning, tokenization, k-means): ``progress=None``
(the default) draws a bar when the process writes to a terminal or runs in a Jupyter kernel, and
stays quiet when stderr is not a terminal (logs, pipes, pytest) or the environment says CI
(``CI=true``); ``True`` draws one regardless, ``False`` never. Under ``mpiexec`` only rank 0
draws. In a notebook the bar is tqdm's widget when ipywidgets is installed, text otherwise.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Optional

__all__ = ["enabled", "bar"]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _in_notebook() -> bool:
    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def enabled(progress: Optional[bool] = None) -> bool:
    """Whether a bar is drawn for ``progress`` (None: automatic, see the module docstring)."""
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress: expected None, True or False, got {progress!r}")
    if progress is False:
        return False
    from . import distributed
    if not distributed.context().is_main:
        return False
    if progress is True:
        return True
    return not _in_ci() and (_stderr_is_terminal() or _in_notebook())


def _tqdm_class():
    if _in_notebook():
        try:
            import ipywidgets  # noqa: F401  (tqdm.notebook needs it; without it tqdm warns and prints text)
            from tqdm.notebook import tqdm
            return tqdm
        except ImportError:
            pass
    from tqdm import tqdm
    return tqdm


def bar(total: Optional[int] = None, desc: str = "", *, iterable: Optional[Iterable[Any]] = None,
        initial: int = 0, unit: str = "it", progress: Optional[bool] = None, leave: bool = True) -> Any:
    """A tqdm bar if :func:`enabled` (``progress``), else None.

    Args:
        total: expected updates (None: unknown); desc: the bar's label; iterable: wrap it.
        initial: updates already done (a resumed run); unit: what one update counts.
        progress: None (automatic), True or False.
        leave: keep the finished bar (its last loss, throughput, time) on screen.

    Returns:
        The tqdm object (``update``, ``set_postfix``, ``close``; iterate it when ``iterable`` was
        given), or None when no bar is drawn.
    """
    if not enabled(progress):
        return None
    return _tqdm_class()(iterable, total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                         dynamic_ncols=True)


def wrap(iterable: Iterable[Any], total: Optional[int] = None, desc: str = "", *, unit: str = "it",
         progress: Optional[bool] = None) -> Iterable[Any]:
    """``iterable`` itself, or wrapped in a bar when one is drawn."""
    b = bar(total, desc, iterable=iterable, unit=unit, progress=progress)
    return iterable if b is None else b

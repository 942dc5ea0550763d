"""Thread control, build information and the matrix-product precision switch."""
import logging
from typing import Callable, Dict

log = logging.getLogger(__name__)

from ._native import _core

PRECISIONS = ("fp32", "bf16")
_fallback_logged = False


def set_num_threads(n: int) -> None:
    """Set the number of worker threads mapet's Swift kernels use.

    mapet runs OpenBLAS single-threaded and parallelises over row blocks, batch × heads
    and point chunks itself, so this is the one knob. NumPy's own BLAS is a separate pool:
    keep ``mapet threads + NumPy threads`` at most the core count when both run at once.

    Args:
        n: number of threads, ≥ 1.

    Example:
        >>> import mapet
        >>> mapet.set_num_threads(2)
        >>> mapet.get_num_threads()
        2
    """
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    """Return the number of worker threads mapet's kernels use."""
    return _core.get_num_threads()


def blas_info() -> Dict[str, object]:
    """Describe the BLAS mapet calls: OpenBLAS build config, detected core, its thread count."""
    config, core, threads = _core.blas_info()
    return {"config": config, "corename": core, "blas_threads": threads}


def bf16_info() -> Dict[str, bool]:
    """Whether bf16 matrix products run: ``native`` (the CPU's bf16 kernel is available) and
    ``active`` (native and not disabled with the environment variable ``MAPET_BF16=off``, read
    once at start). When not active, models set to ``precision="bf16"`` compute in fp32.

    Example:
        >>> import mapet
        >>> sorted(mapet.bf16_info())
        ['active', 'native']
    """
    native, active = _core.bf16_status()
    return {"native": bool(native), "active": bool(active)}


def set_precision(setter: Callable, handle, precision: str) -> None:
    """Set a model's matrix-product precision through ``setter(handle, precision)`` (the engine
    checks the value: ValueError/TypeError naming ``precision``). Requesting "bf16" where it
    does not run logs one line per process and the model computes in fp32."""
    global _fallback_logged
    setter(handle, precision)
    if precision == "bf16" and not _fallback_logged and not _core.bf16_status()[1]:
        _fallback_logged = True
        reason = ("MAPET_BF16=off" if _core.bf16_status()[0] else "this CPU has no bf16 kernel")
        log.warning("precision='bf16' requested but bf16 matrix products are not active (%s): running in fp32",
                    reason)

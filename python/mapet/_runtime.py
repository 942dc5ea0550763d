"""Thread control and build information."""
import logging
from typing import Callable, Dict

from ._native import _core

log = logging.getLogger("mapet")
_bf16_fallback_logged = False


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


def bf16_info() -> Dict[str, object]:
    """Describe the bf16 GEMM behind ``precision="bf16"``.

    Returns:
        ``{"native": bool, "active": bool, "kernel": str}``: whether the CPU has AVX512-BF16,
        whether the kernel is in use (native and not switched off with the environment
        variable ``MAPET_BF16=off``, read once at first use), and the kernel's name
        (``"fp32 (sgemm fallback)"`` when inactive: bf16 products are then computed in float32).

    Example:
        >>> import mapet
        >>> sorted(mapet.bf16_info())
        ['active', 'kernel', 'native']
    """
    native, active, kernel = _core.bf16_info()
    return {"native": bool(native), "active": bool(active), "kernel": kernel}


def warn_if_bf16_inactive(what: str) -> None:
    """Log once per process that ``what`` asked for bf16 but products run in fp32, and why."""
    global _bf16_fallback_logged
    native, active, _ = _core.bf16_info()
    if active or _bf16_fallback_logged:
        return
    _bf16_fallback_logged = True
    reason = "switched off by MAPET_BF16=off" if native else "this CPU lacks avx512_bf16"
    log.warning("bf16 is unavailable (%s): %s, running in fp32", reason, what)


def set_precision(setter: Callable, handle: object, precision: str) -> None:
    """Set a model's matrix-product precision through ``setter(handle, precision)`` (the engine
    checks the value: ValueError/TypeError naming ``precision``); a bf16 request where bf16 does
    not run logs one line per process and the model computes in fp32."""
    setter(handle, precision)
    if precision == "bf16":
        warn_if_bf16_inactive("precision='bf16'")

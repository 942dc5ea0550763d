"""The bitwise guarantees hold whichever OpenBLAS kernel runs.

OpenBLAS picks its GEMM micro-kernel from the CPU, or from OPENBLAS_CORETYPE; kernels differ in
FMA order, so a test that compares floats bitwise can pass with one and fail with another when
the code does not guarantee the equality. The tests marked `bitwise` are rerun here in fresh
interpreters under each kernel this CPU can execute (read from /proc/cpuinfo; a kernel the CPU
lacks is never forced), so a machine-specific pass cannot hide.
"""
import os
import subprocess
import sys

import pytest

from cpu_flags import cpu_flags

HERE = os.path.dirname(os.path.abspath(__file__))


def _kernels() -> list:
    """OPENBLAS_CORETYPE values this CPU runs ('' = unset: OpenBLAS's own choice)."""
    flags = cpu_flags()
    kernels = [""]
    if {"avx2", "fma"} <= flags:
        kernels.append("Haswell")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        kernels.append("SkylakeX")
    return kernels


def _env(kernel: str) -> dict:
    env = dict(os.environ)
    env.pop("OPENBLAS_L2_SIZE", None)
    if kernel:
        env["OPENBLAS_CORETYPE"] = kernel
    else:
        env.pop("OPENBLAS_CORETYPE", None)
    return env


@pytest.mark.parametrize("kernel", _kernels(), ids=lambda k: k or "unset")
def test_bitwise_tests_pass_under_kernel(kernel):
    env = _env(kernel)
    probe = subprocess.run([sys.executable, "-c", "import mapet; print(mapet.blas_info()['corename'])"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    if kernel:
        assert probe.stdout.strip() == kernel  # the kernel was really selected
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "bitwise", "-p", "no:cacheprovider", HERE],
                         env=env, capture_output=True, text=True, timeout=900, cwd=HERE)
    tail = "\n".join(run.stdout.splitlines()[-25:])
    assert run.returncode == 0, f"OPENBLAS_CORETYPE={kernel or 'unset'}:\n{tail}\n{run.stderr[-2000:]}"
    assert " passed" in tail and "deselected" in tail

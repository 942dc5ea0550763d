"""Builds the Swift extension `mapet._core` with SwiftPM and places it in the package.

Environment:
    MAPET_TARGET_CPU  CPU the Swift kernels are compiled for (default ``haswell``: AVX2+FMA).
    MAPET_BUILD_DIR   SwiftPM scratch directory (default ``.build`` in the source tree).
"""
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class SwiftBuild(build_ext):
    """Runs `swift build -c release --product MaPeTCore` and copies the library."""

    def build_extension(self, ext: Extension) -> None:
        import scipy_openblas32

        env = dict(os.environ)
        env["MAPET_PYTHON_INCLUDE"] = sysconfig.get_paths()["include"]
        env["MAPET_OPENBLAS_LIB"] = scipy_openblas32.get_lib_dir()
        env["PYTHON"] = sys.executable
        scratch = env.get("MAPET_BUILD_DIR", os.path.join(ROOT, ".build"))
        cmd = ["swift", "build", "-c", "release", "--product", "MaPeTCore",
               "--scratch-path", scratch, "--manifest-cache", "none"]
        self.announce(" ".join(cmd), level=2)
        subprocess.check_call(cmd, cwd=ROOT, env=env)
        src = os.path.join(scratch, "release", "libMaPeTCore.so")
        dst = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = dst + ".tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


setup(
    ext_modules=[Extension("mapet._core", sources=[])],
    cmdclass={"build_ext": SwiftBuild},
)

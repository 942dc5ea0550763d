#!/usr/bin/env bash
# Developer loop without installing: build the extension in release mode and drop it into
# python/mapet so that `PYTHONPATH=python python -m pytest tests` tests this tree.
# Usage: scripts/dev-build.sh [scratch-dir]   (default .build)
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=${1:-.build}
suffix=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
swift build -c release --product MaPeTCore --scratch-path "$scratch"
cp "$scratch/release/libMaPeTCore.so" "python/mapet/_core$suffix.tmp"
mv "python/mapet/_core$suffix.tmp" "python/mapet/_core$suffix"

#!/usr/bin/env bash
# Installs the NVRTC shared library (the nvidia-cuda-nvrtc-cu12 wheel) into .nvrtc/
# (git-ignored) unless it is already there, and prints the folder holding
# libnvrtc.so.12 (for LD_LIBRARY_PATH: cudarc dlopens it by name at run time).
# `pip install --target` needs no virtual environment and leaves the system Python alone.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${QAQ_NVRTC_VERSION:-12.8.93}"
DEST=.nvrtc
LIB="$DEST/nvidia/cuda_nvrtc/lib"
STAMP="$DEST/.version"
if [[ ! -e "$LIB/libnvrtc.so.12" || "$(cat "$STAMP" 2>/dev/null)" != "$VERSION" ]]; then
    rm -rf "$DEST"
    python3 -m pip install --disable-pip-version-check --no-warn-script-location --root-user-action=ignore --quiet \
        --no-deps --target "$DEST" "nvidia-cuda-nvrtc-cu12==$VERSION" >&2
    echo "$VERSION" > "$STAMP"
fi
[[ -e "$LIB/libnvrtc.so.12" ]] || { echo "install-nvrtc: $LIB/libnvrtc.so.12 missing after install" >&2; exit 1; }
echo "$PWD/$LIB"

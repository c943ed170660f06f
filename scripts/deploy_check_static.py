#!/usr/bin/env python3
"""Static checks of deploy/ artifacts that need no engine (run by scripts/deploy-check.sh
inside its venv, which has PyYAML).

  deploy_check_static.py compose deploy/docker-compose.yml
      services coordinator, worker-1, worker-2, prometheus, grafana exist; every bind-mount
      source and build Dockerfile exists; Prometheus' scrape targets are compose services on
      the ports their commands listen on.
  deploy_check_static.py grafana deploy/grafana
      provisioning files parse and point where compose mounts the dashboard; the dashboard
      JSON has a uid, unique panel ids, and a Prometheus datasource on every query.
  deploy_check_static.py dockerfiles deploy/Dockerfile deploy/Dockerfile.cuda
      multi-stage; every COPY source exists in the build context (the repository root) or
      names a stage; the CUDA variant runs on a CUDA base; no model copied in; a
      <Dockerfile>.dockerignore excludes target/.
  deploy_check_static.py manifests RENDERED.yaml CASE
      the rendered Helm chart holds the objects the chart promises (per CASE), among them
      the replicated coordinators: replicas, the headless Service the workers register
      through, the coordinator PodDisruptionBudget, readiness on qaq.v1.Generation and
      anti-affinity.
"""

import json
import os
import re
import sys

import yaml

errors = []


def err(msg):
    errors.append(msg)


def check_compose(path):
    base = os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        doc = yaml.safe_load(f)
    services = doc.get("services", {})
    for s in ("coordinator", "worker-1", "worker-2", "prometheus", "grafana"):
        if s not in services:
            err(f"compose: service {s} missing")

    def expand(v):
        return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: os.environ.get(m.group(1), m.group(2) or ""), v)

    for name, svc in services.items():
        b = svc.get("build")
        if b:
            ctx = os.path.join(base, expand(b.get("context", ".")))
            df = os.path.join(ctx, b.get("dockerfile", "Dockerfile"))
            if not os.path.isfile(df):
                err(f"compose: {name}: Dockerfile {df} not found")
        if not svc.get("image"):
            err(f"compose: {name}: no image")
        for v in svc.get("volumes", []):
            src = expand(v.split(":")[0]) if isinstance(v, str) else v.get("source", "")
            if src.startswith((".", "/")):
                full = os.path.normpath(os.path.join(base, src))
                # the models folder may be empty or absent until the `model` service fetches
                if not os.path.exists(full) and not full.endswith("models"):
                    err(f"compose: {name}: mount source {src} ({full}) does not exist")

    # Prometheus' targets are the compose services, on the ports they listen on.
    with open(os.path.join(base, "prometheus", "prometheus.yml")) as f:
        prom = yaml.safe_load(f)
    for job in prom.get("scrape_configs", []):
        for sc in job.get("static_configs", []):
            for t in sc.get("targets", []):
                host, port = t.rsplit(":", 1)
                svc = services.get(host)
                if svc is None:
                    err(f"prometheus.yml: target {t} is not a compose service")
                    continue
                cmd = " ".join(svc.get("command", []) if isinstance(svc.get("command"), list) else [svc.get("command", "")])
                if f"--metrics-listen 0.0.0.0:{port}" not in cmd:
                    err(f"prometheus.yml: target {t}: service {host} does not listen for metrics on {port}")


def check_grafana(folder):
    ds_dir = os.path.join(folder, "provisioning", "datasources")
    db_dir = os.path.join(folder, "provisioning", "dashboards")
    ds = [yaml.safe_load(open(os.path.join(ds_dir, f))) for f in sorted(os.listdir(ds_dir))]
    if not any(d.get("type") == "prometheus" for doc in ds for d in doc.get("datasources", [])):
        err("grafana: no Prometheus data source provisioned")
    provs = [yaml.safe_load(open(os.path.join(db_dir, f))) for f in sorted(os.listdir(db_dir))]
    paths = [p.get("options", {}).get("path") for doc in provs for p in doc.get("providers", [])]
    compose = yaml.safe_load(open(os.path.join(os.path.dirname(folder.rstrip("/")), "docker-compose.yml")))
    mounts = [v for v in compose["services"]["grafana"].get("volumes", []) if isinstance(v, str)]
    if not any(any(m.split(":")[1].startswith(p + "/") for m in mounts) for p in paths if p):
        err(f"grafana: dashboard provider paths {paths} not mounted by docker-compose.yml")
    with open(os.path.join(folder, "qaq-dashboard.json")) as f:
        dash = json.load(f)
    if not dash.get("uid") or not dash.get("title"):
        err("grafana: dashboard has no uid/title")
    ids = []
    n_targets = 0

    def walk(panels):
        nonlocal n_targets
        for p in panels:
            ids.append(p.get("id"))
            for t in p.get("targets", []):
                n_targets += 1
                dsrc = t.get("datasource") or p.get("datasource") or {}
                if dsrc.get("type") != "prometheus":
                    err(f"grafana: panel '{p.get('title')}' query {t.get('refId')} has no Prometheus datasource")
                if not t.get("expr"):
                    err(f"grafana: panel '{p.get('title')}' query {t.get('refId')} has no expr")
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    if len(ids) != len(set(ids)):
        err("grafana: duplicate panel ids")
    titles = {p.get("title") for p in dash["panels"] if p.get("type") == "row"}
    for row in ("Cluster overview", "KV memory", "QAQ", "Per worker"):
        if row not in titles:
            err(f"grafana: row '{row}' missing")
    if n_targets == 0:
        err("grafana: no queries")


def check_manifests(path, case):
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    kinds = {}
    for d in docs:
        kinds.setdefault(d["kind"], []).append(d)
    for k in ("Deployment", "StatefulSet", "Service", "PodDisruptionBudget", "ServiceAccount"):
        if k not in kinds:
            err(f"helm[{case}]: no {k}")
    sts = kinds.get("StatefulSet", [{}])[0]
    headless = {s["metadata"]["name"]: s for s in kinds.get("Service", []) if s["spec"].get("clusterIP") == "None"}
    if not headless:
        err(f"helm[{case}]: no headless Service")
    elif sts.get("spec", {}).get("serviceName") not in headless:
        err(f"helm[{case}]: StatefulSet serviceName is not a headless Service")
    check_coordinator_ha(kinds, headless, sts, case)
    pods = [d["spec"]["template"]["spec"] for d in kinds.get("Deployment", []) + kinds.get("StatefulSet", [])]
    for spec in pods:
        for c in spec["containers"]:
            for probe in ("readinessProbe", "livenessProbe"):
                if "grpc" not in c.get(probe, {}):
                    err(f"helm[{case}]: container {c['name']} has no gRPC {probe}")
            if not c.get("resources", {}).get("requests"):
                err(f"helm[{case}]: container {c['name']} has no resource requests")
    wc = sts.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [{}])[0]
    gpu = wc.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    if case == "cpu":
        if gpu is not None:
            err(f"helm[{case}]: CPU mode still asks for nvidia.com/gpu")
    elif str(gpu) != "1":
        err(f"helm[{case}]: worker does not ask for nvidia.com/gpu: 1 (got {gpu})")
    secrets = {s["metadata"]["name"] for s in kinds.get("Secret", [])}
    if case == "gpu-monitoring":
        if "ServiceMonitor" not in kinds:
            err(f"helm[{case}]: serviceMonitor.enabled=true but no ServiceMonitor")
        if len(secrets) < 2:
            err(f"helm[{case}]: expected Secrets for the API keys and the registration secret, got {secrets}")
    # kubernetes-validate has no schema for the prometheus-operator CRD: check it here.
    for sm in kinds.get("ServiceMonitor", []):
        spec = sm.get("spec", {})
        if not spec.get("selector", {}).get("matchLabels"):
            err(f"helm[{case}]: ServiceMonitor {sm['metadata']['name']} has no selector")
        ports = {p["name"] for s in kinds.get("Service", []) for p in s["spec"]["ports"]}
        for ep in spec.get("endpoints", []):
            if ep.get("port") not in ports:
                err(f"helm[{case}]: ServiceMonitor endpoint port {ep.get('port')} is no Service port")
        jobs = [r.get("replacement") for ep in spec.get("endpoints", []) for r in ep.get("relabelings", [])
                if r.get("targetLabel") == "job"]
        if not jobs or jobs[0] not in ("qaq-coordinator", "qaq-worker"):
            err(f"helm[{case}]: ServiceMonitor {sm['metadata']['name']} does not set job to qaq-coordinator/qaq-worker")
    if case == "default" and "ServiceMonitor" in kinds:
        err(f"helm[{case}]: ServiceMonitor rendered although disabled")


# Coordinator replicas each case renders (deploy-check.sh's helm_case names and --sets).
COORDINATOR_REPLICAS = {"coordinator-single": 1, "coordinator-3-hard": 3}


def selects(match_labels, labels):
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


def check_coordinator_ha(kinds, headless, sts, case):
    """No single point of failure: replicated coordinators, each known to every worker."""
    want = COORDINATOR_REPLICAS.get(case, 2)  # the chart's default is 2
    deps = [d for d in kinds.get("Deployment", []) if d["metadata"]["name"].endswith("-coordinator")]
    if len(deps) != 1:
        err(f"helm[{case}]: expected one coordinator Deployment, got {len(deps)}")
        return
    dep = deps[0]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    if dep["spec"].get("replicas") != want:
        err(f"helm[{case}]: coordinator Deployment has {dep['spec'].get('replicas')} replicas, expected {want}")
    if dep["spec"].get("strategy", {}).get("type") == "Recreate":
        err(f"helm[{case}]: coordinator Deployment uses Recreate (every replica down at once on upgrade)")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    if c.get("readinessProbe", {}).get("grpc", {}).get("service") != "qaq.v1.Generation":
        err(f"helm[{case}]: coordinator readiness probe does not check service qaq.v1.Generation")
    if c.get("livenessProbe", {}).get("grpc", {}).get("service", "") != "":
        err(f"helm[{case}]: coordinator liveness probe must check the server (service \"\"), not a service")

    # The headless Service the workers register through.
    name = dep["metadata"]["name"] + "-headless"
    hs = headless.get(name)
    if hs is None:
        err(f"helm[{case}]: no headless Service {name} (clusterIP None)")
    else:
        if hs["spec"].get("publishNotReadyAddresses") is not True:
            err(f"helm[{case}]: {name} lacks publishNotReadyAddresses: true (workers must reach unready coordinators)")
        if not selects(hs["spec"].get("selector"), pod_labels):
            err(f"helm[{case}]: {name} does not select the coordinator pods")
        ports = {p["name"]: p for p in hs["spec"]["ports"]}
        if "metrics" in ports:
            err(f"helm[{case}]: {name} exposes metrics (a ServiceMonitor would scrape each coordinator twice)")
        grpc = ports.get("grpc", {}).get("port")
        wc = sts.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [{}])[0]
        env = {e["name"]: e.get("value") for e in wc.get("env", [])}
        expect = f"{name}.{hs['metadata']['namespace']}.svc:{grpc}"
        if env.get("QAQ_COORDINATOR") != expect:
            err(f"helm[{case}]: workers' QAQ_COORDINATOR is {env.get('QAQ_COORDINATOR')!r}, expected {expect!r}")
    clients = [s for s in kinds.get("Service", []) if s["metadata"]["name"] == dep["metadata"]["name"]]
    if not clients or clients[0]["spec"].get("clusterIP") == "None":
        err(f"helm[{case}]: the client Service {dep['metadata']['name']} is missing or headless")

    # PodDisruptionBudgets: one for the coordinators when replicated, none selecting both.
    pdbs = kinds.get("PodDisruptionBudget", [])
    cpdbs = [p for p in pdbs if selects(p["spec"]["selector"].get("matchLabels"), pod_labels)]
    if want > 1:
        if len(cpdbs) != 1:
            err(f"helm[{case}]: expected one PodDisruptionBudget for the coordinators, got {len(cpdbs)}")
        elif "minAvailable" in cpdbs[0]["spec"] or cpdbs[0]["spec"].get("maxUnavailable") != 1:
            err(f"helm[{case}]: coordinator PDB should be maxUnavailable: 1, got {cpdbs[0]['spec']}")
        elif case == "kube-1.25":
            if "unhealthyPodEvictionPolicy" in cpdbs[0]["spec"]:
                err(f"helm[{case}]: coordinator PDB has unhealthyPodEvictionPolicy, unknown before Kubernetes 1.27")
        elif cpdbs[0]["spec"].get("unhealthyPodEvictionPolicy") != "AlwaysAllow":
            err(f"helm[{case}]: coordinator PDB must let unready replicas be evicted (unhealthyPodEvictionPolicy)")
    elif cpdbs:
        err(f"helm[{case}]: a coordinator PodDisruptionBudget is rendered for a single replica")
    wlabels = sts.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})
    for p in cpdbs:
        if selects(p["spec"]["selector"].get("matchLabels"), wlabels):
            err(f"helm[{case}]: PDB {p['metadata']['name']} selects coordinators and workers")

    # Replicas spread over nodes: soft by default, required with podAntiAffinity=hard.
    anti = dep["spec"]["template"]["spec"].get("affinity", {}).get("podAntiAffinity", {})
    kind = "required" if case == "coordinator-3-hard" else "preferred"
    terms = anti.get(f"{kind}DuringSchedulingIgnoredDuringExecution", [])
    terms = [t.get("podAffinityTerm", t) for t in terms]
    if not any(t.get("topologyKey") == "kubernetes.io/hostname"
               and selects(t.get("labelSelector", {}).get("matchLabels"), pod_labels) for t in terms):
        err(f"helm[{case}]: coordinator pods have no {kind} anti-affinity on kubernetes.io/hostname")


def check_dockerfiles(*paths):
    root = os.path.dirname(os.path.dirname(os.path.abspath(paths[0])))  # context: the repository root
    for path in paths:
        with open(path) as f:
            text = re.sub(r"\\\n", " ", f.read())
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        stages = [ln for ln in lines if ln.upper().startswith("FROM ")]
        if len(stages) < 2:
            err(f"{path}: not multi-stage ({len(stages)} FROM)")
        names = {m.group(1) for ln in stages for m in [re.search(r"\bAS\s+(\S+)", ln, re.I)] if m}
        for ln in lines:
            if not ln.upper().startswith("COPY "):
                continue
            args = ln.split()[1:]
            src_from = [a for a in args if a.startswith("--from=")]
            srcs = [a for a in args if not a.startswith("--")][:-1]
            if src_from:
                if src_from[0].split("=", 1)[1] not in names:
                    err(f"{path}: COPY --from an unknown stage: {ln}")
                continue
            for s in srcs:
                if s != "." and not os.path.exists(os.path.join(root, s)):
                    err(f"{path}: COPY source {s} does not exist")
                if s == "deploy/docker-entrypoint.sh" and not os.access(os.path.join(root, s), os.X_OK):
                    err(f"{path}: {s} is not executable")
        if "--features cuda" in text and "cuda" not in stages[-1].lower() and "CUDA_RUNTIME_IMAGE" not in stages[-1]:
            err(f"{path}: cuda build without a CUDA runtime base")
        ignore = path + ".dockerignore"
        if not os.path.exists(ignore) or "target/" not in open(ignore).read():
            err(f"{path}: {ignore} missing or does not exclude target/")
        if re.search(r"\.(gguf|safetensors)\b", " ".join(ln for ln in lines if ln.upper().startswith(("COPY", "ADD")))):
            err(f"{path}: a model is baked into the image")


def main():
    what, *args = sys.argv[1:]
    {"compose": check_compose, "grafana": check_grafana, "manifests": check_manifests,
     "dockerfiles": check_dockerfiles}[what](*args)
    for e in errors:
        print("  " + e, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Helper of scripts/deploy-check.sh (Python 3 standard library only).

  deploy_check.py names --dashboard D.json [--rules-from-prom URL]
      print the metric names the dashboard's queries use (and, with a running
      Prometheus that loaded the alert rules, the names the rules use).
  deploy_check.py e2e --prom URL --dashboard D.json [--rules R.yml] [--wait S]
      against a Prometheus server that scrapes a live qaq cluster and loaded
      deploy/prometheus/alerts.yml:
        1. every metric name used by a dashboard query or an alert rule has at
           least one series (a histogram counts through _bucket/_sum/_count);
        2. every dashboard query (Grafana variables substituted) is valid PromQL;
        3. every alert rule evaluates without error.
      Exits 1 listing what is missing.

The alert rules are read back from Prometheus' /api/v1/rules, i.e. parsed by
Prometheus itself from the file, so the names can never drift from the file.
"""

import argparse
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

# PromQL words that look like identifiers but are not metric names.
KEYWORDS = {
    # aggregation operators
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
    # modifiers and binary operators
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "and", "or", "unless", "atan2", "start", "end", "inf", "nan",
}
# Clauses whose parenthesised lists hold label names, not metrics.
LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.I)
IDENT = re.compile(r"(?<![\w.$:])([A-Za-z_:][A-Za-z0-9_:]*)")


def grafana_substitute(expr):
    """Replaces Grafana's variables so the expression is plain PromQL."""
    subs = {
        "__rate_interval": "15s", "__interval": "5s", "__range": "5m",
        "__range_s": "300", "__interval_ms": "5000",
    }

    def repl(m):
        name = m.group(1) or m.group(2)
        name = name.split(":")[0]
        return subs.get(name, ".*")

    return re.sub(r"\$\{([^}]+)\}|\$(\w+)", repl, expr)


def metric_names(expr):
    """Metric names used by a PromQL expression (a small lexer, not a parser)."""
    s = grafana_substitute(expr)
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', s)  # strings
    s = re.sub(r"#[^\n]*", "", s)                   # comments
    s = re.sub(r"\{[^{}]*\}", "", s)                 # label matchers
    s = re.sub(r"\[[^\[\]]*\]", "", s)               # range / subquery selectors
    s = LABEL_LIST.sub(" ", s)
    names = set()
    for m in IDENT.finditer(s):
        word = m.group(1)
        rest = s[m.end():]
        if word.lower() in KEYWORDS:
            continue
        if re.match(r"\s*\(", rest):                 # a function call
            continue
        if re.fullmatch(r"[0-9a-fA-Fx.eE+-]+", word) and not word[0].isalpha():
            continue
        names.add(base_name(word))
    return names


def base_name(name):
    """A histogram's series name reduced to the histogram's name."""
    return re.sub(r"_(bucket|sum|count)$", "", name)


def dashboard_queries(path):
    """(where, expr) for every Prometheus query of a Grafana dashboard JSON,
    including template variables (label_values(metric, label) and friends)."""
    with open(path, encoding="utf-8") as f:
        dash = json.load(f)
    out = []

    def walk(node, where):
        if isinstance(node, dict):
            title = node.get("title") or node.get("name") or where
            if isinstance(node.get("expr"), str) and node["expr"].strip():
                out.append((f"panel '{title}'", node["expr"]))
            for k, v in node.items():
                if k != "templating":
                    walk(v, title)
        elif isinstance(node, list):
            for v in node:
                walk(v, where)

    walk(dash.get("panels", []), "dashboard")
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var.get("query")
        if isinstance(q, dict):
            q = q.get("query", "")
        m = re.match(r"\s*(label_values|query_result)\s*\((.*)\)\s*$", q or "", re.S)
        if m:
            inner = m.group(2)
            if m.group(1) == "label_values":
                inner = inner.rsplit(",", 1)[0] if "," in inner else inner
            out.append((f"variable '{var.get('name')}'", inner))
    return out


def get(url, params=None, timeout=10):
    if params:
        url += "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:  # Prometheus answers 400/422 with a JSON body
        try:
            return json.load(e)
        except Exception:
            return {"status": "error", "error": f"HTTP {e.code}"}


def rule_queries(prom):
    """(where, expr) for every rule Prometheus loaded."""
    data = get(prom + "/api/v1/rules")
    out = []
    for g in data.get("data", {}).get("groups", []):
        for r in g.get("rules", []):
            out.append((f"rule '{r.get('name')}' ({g.get('file', '')})", r["query"]))
    return out


def rule_health(prom):
    bad = []
    for g in get(prom + "/api/v1/rules").get("data", {}).get("groups", []):
        for r in g.get("rules", []):
            if r.get("health") not in ("ok", "unknown") or r.get("lastError"):
                bad.append(f"{r.get('name')}: health={r.get('health')} {r.get('lastError', '')}")
    return bad


def present(name, have):
    return any(n in have for n in (name, name + "_bucket", name + "_sum", name + "_count"))


def cmd_names(args):
    queries = dashboard_queries(args.dashboard)
    if args.rules_from_prom:
        queries += rule_queries(args.rules_from_prom)
    names = sorted(set().union(*(metric_names(e) for _, e in queries)))
    print("\n".join(names))


def cmd_e2e(args):
    prom = args.prom.rstrip("/")
    dash_q = dashboard_queries(args.dashboard)
    rules_q = rule_queries(prom)
    if args.rules:
        with open(args.rules, encoding="utf-8") as f:
            n_file = len(re.findall(r"(?m)^\s*-\s*(alert|record)\s*:", f.read()))
        if n_file != len(rules_q):
            print(f"deploy-check: Prometheus loaded {len(rules_q)} rules, {args.rules} has {n_file}", file=sys.stderr)
            return 1
    if not rules_q:
        print("deploy-check: Prometheus loaded no alert rules (rule_files?)", file=sys.stderr)
        return 1
    used = {}
    for where, expr in dash_q + rules_q:
        for n in metric_names(expr):
            used.setdefault(n, []).append(where)
    print(f"deploy-check: {len(dash_q)} dashboard queries and {len(rules_q)} alert rules use "
          f"{len(used)} metric names")

    deadline = time.monotonic() + args.wait
    while True:
        have = set(get(prom + "/api/v1/label/__name__/values").get("data", []))
        missing = sorted(n for n in used if not present(n, have))
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)

    failed = 0
    if missing:
        failed += 1
        print(f"FAIL: {len(missing)} of {len(used)} metric names have no series in Prometheus:")
        for n in missing:
            users = sorted(set(used[n]))
            print(f"  {n}    (used by {len(users)}: {'; '.join(users[:3])}{' ...' if len(users) > 3 else ''})")
    else:
        print(f"ok: all {len(used)} metric names have series")
    present_names = sorted(n for n in used if n not in missing)
    print("  present: " + " ".join(present_names))

    bad_q = []
    empty = []
    for where, expr in dash_q:
        r = get(prom + "/api/v1/query", {"query": grafana_substitute(expr)})
        if r.get("status") != "success":
            bad_q.append(f"{where}: {r.get('errorType', '')} {r.get('error', '')}\n      {expr}")
        elif not r.get("data", {}).get("result"):
            empty.append(where)
    if bad_q:
        failed += 1
        print(f"FAIL: {len(bad_q)} dashboard queries are not valid PromQL:")
        for b in bad_q:
            print("  " + b)
    else:
        print(f"ok: all {len(dash_q)} dashboard queries are valid PromQL")
    if empty:
        print(f"note: {len(empty)} queries returned no data right now: {', '.join(sorted(set(empty)))}")

    bad_r = rule_health(prom)
    if bad_r:
        failed += 1
        print("FAIL: alert rules that do not evaluate:")
        for b in bad_r:
            print("  " + b)
    else:
        print(f"ok: all {len(rules_q)} alert rules evaluate")
    return 1 if failed else 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    n = sub.add_parser("names")
    n.add_argument("--dashboard", required=True)
    n.add_argument("--rules-from-prom")
    e = sub.add_parser("e2e")
    e.add_argument("--prom", required=True)
    e.add_argument("--dashboard", required=True)
    e.add_argument("--rules", help="the rules file Prometheus was given (its rule count is checked)")
    e.add_argument("--wait", type=float, default=15.0, help="seconds to wait for late series")
    a = p.parse_args()
    if a.cmd == "names":
        return cmd_names(a) or 0
    return cmd_e2e(a)


if __name__ == "__main__":
    sys.exit(main())

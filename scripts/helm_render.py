#!/usr/bin/env python3
"""A stand-in for `helm template`, used by scripts/deploy-check.sh because the helm
binary cannot be installed from the package registries this project reaches (it is a
Go program published on GitHub and get.helm.sh; no PyPI, npm or Debian package ships it).

    helm_render.py CHART [--release NAME] [--namespace NS] [--kube-version V] [--set a.b=c]... [-f values.yaml]...

It does what `helm template` does for this chart: merges values.yaml, -f files and --set
(helm's syntax: a.b=c, a.list[0]=x; true/false/integers/null typed), validates the result
against values.schema.json (jsonschema), renders every templates/*.yaml with Go
text/template semantics and the Sprig/Helm functions the chart uses, checks each document
parses as YAML, and prints the stream. --kube-version sets .Capabilities.KubeVersion
(default v1.31.0) and must meet Chart.yaml's kubeVersion, as with helm template. It
implements a subset of Go templates: actions with {{- -}} trimming, comments, pipelines,
parenthesised calls, variables ($x := / =), if/else if/else, with/else, range (lists and
maps, with $i, $v :=), define/include/template.
An unknown function or a field of a nil value is an error (as in helm). Needs PyYAML and
jsonschema.
"""

import argparse
import base64
import copy
import hashlib
import json
import os
import re
import sys

import yaml


class TemplateError(Exception):
    pass


# ------------------------------------------------------------------ lexing / parsing

ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)


def split_actions(src):
    """[(kind, text)] with kind 'text' or 'action', whitespace trimming applied."""
    out = []
    pos = 0
    trim_next = False
    for m in ACTION.finditer(src):
        text = src[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text))
        body = m.group(2).strip()
        if not (body.startswith("/*") and body.endswith("*/")):
            out.append(("action", body))
        trim_next = bool(m.group(3))
        pos = m.end()
    text = src[pos:]
    out.append(("text", text.lstrip() if trim_next else text))
    return out


TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<num>-?\d+(?:\.\d+)?)
  | (?P<decl>:=)
  | (?P<assign>=)
  | (?P<pipe>\|)
  | (?P<lp>\()
  | (?P<rp>\))
  | (?P<comma>,)
  | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)
  | (?P<field>(?:\.[A-Za-z0-9_]+)+|\.)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
""", re.X)


def tokenize(s):
    toks = []
    pos = 0
    while pos < len(s):
        m = TOKEN.match(s, pos)
        if not m:
            raise TemplateError(f"cannot parse {s[pos:]!r} in {{{{ {s} }}}}")
        kind = m.lastgroup
        if kind != "ws":
            toks.append((kind, m.group()))
        pos = m.end()
    return toks


class Parser:
    def __init__(self, toks, src):
        self.t = toks
        self.i = 0
        self.src = src

    def peek(self):
        return self.t[self.i] if self.i < len(self.t) else (None, None)

    def take(self, kind=None):
        tok = self.peek()
        if kind and tok[0] != kind:
            raise TemplateError(f"expected {kind} in {{{{ {self.src} }}}}, got {tok}")
        self.i += 1
        return tok

    def pipeline(self, stop=None):
        decl = None
        # $a := ..., $a, $b := ... (range), $a = ...
        j = self.i
        names = []
        while j < len(self.t) and self.t[j][0] == "var":
            names.append(self.t[j][1])
            j += 1
            if j < len(self.t) and self.t[j][0] == "comma":
                j += 1
                continue
            break
        if names and j < len(self.t) and self.t[j][0] in ("decl", "assign"):
            decl = (self.t[j][0], names)
            self.i = j + 1
        cmds = [self.command(stop)]
        while self.peek()[0] == "pipe":
            self.take()
            cmds.append(self.command(stop))
        return ("pipeline", decl, cmds)

    def command(self, stop):
        args = []
        while True:
            kind, val = self.peek()
            if kind is None or kind in ("pipe", "rp") or kind == stop:
                break
            args.append(self.operand())
        if not args:
            raise TemplateError(f"empty command in {{{{ {self.src} }}}}")
        return args

    def operand(self):
        kind, val = self.take()
        if kind == "lp":
            p = self.pipeline()
            self.take("rp")
            return ("sub", p)
        if kind == "str":
            return ("lit", json.loads(val))
        if kind == "raw":
            return ("lit", val[1:-1])
        if kind == "num":
            return ("lit", float(val) if "." in val else int(val))
        if kind == "field":
            return ("field", [p for p in val.split(".") if p])
        if kind == "var":
            name, *path = val.split(".")
            return ("var", name, path)
        if kind == "ident":
            if val in ("true", "false"):
                return ("lit", val == "true")
            if val == "nil":
                return ("lit", None)
            return ("func", val)
        raise TemplateError(f"unexpected {val!r} in {{{{ {self.src} }}}}")


def parse_action(body):
    p = Parser(tokenize(body), body)
    pl = p.pipeline()
    if p.i != len(p.t):
        raise TemplateError(f"trailing tokens in {{{{ {body} }}}}")
    return pl


def build_tree(parts, defines):
    """Nested node lists from the flat text/action list."""
    stack = [("root", [], None)]
    for kind, text in parts:
        body = stack[-1][1]
        if kind == "text":
            if text:
                body.append(("text", text))
            continue
        word = text.split(None, 1)[0] if text else ""
        rest = text[len(word):].strip()
        if word in ("if", "with", "range"):
            node = {"kind": word, "branches": [(parse_action(rest), [])], "else": None}
            body.append(("block", node))
            stack.append((word, node["branches"][0][1], node))
        elif word == "define":
            name = json.loads(rest)
            node = {"kind": "define", "name": name, "body": []}
            stack.append(("define", node["body"], node))
        elif word == "else":
            _, _, node = stack.pop()
            if node is None or node["kind"] == "define":
                raise TemplateError("else without if/with/range")
            if rest.startswith("if ") and node["kind"] == "if":
                node["branches"].append((parse_action(rest[3:]), []))
                stack.append(("if", node["branches"][-1][1], node))
            elif rest.startswith("with ") and node["kind"] == "with":
                node["branches"].append((parse_action(rest[5:]), []))
                stack.append(("with", node["branches"][-1][1], node))
            else:
                node["else"] = []
                stack.append(("else", node["else"], node))
        elif word == "end":
            _, _, node = stack.pop()
            if node is None:
                raise TemplateError("end without a block")
            if node["kind"] == "define":
                defines[node["name"]] = node["body"]
        elif word == "template":
            m = re.match(r'("(?:[^"\\]|\\.)*")\s*(.*)$', rest, re.S)
            body.append(("template", json.loads(m.group(1)), parse_action(m.group(2)) if m.group(2) else None))
        elif word in ("block", "break", "continue"):
            raise TemplateError(f"{{{{ {word} }}}} is not supported by this renderer")
        else:
            body.append(("action", parse_action(text)))
    if len(stack) != 1:
        raise TemplateError(f"unclosed {stack[-1][0]}")
    return stack[0][1]


# ------------------------------------------------------------------ evaluation

def truthy(v):
    """Go templates' truth: false, 0, nil and empty strings, lists and maps are false."""
    if v is None or isinstance(v, bool):
        return bool(v)
    if isinstance(v, (int, float)):
        return v != 0
    if isinstance(v, (str, list, dict, tuple)):
        return len(v) > 0
    return True


def go_str(v):
    if v is None:
        return "<no value>"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e21:
        return str(int(v))
    if isinstance(v, dict):
        return "map[" + " ".join(f"{k}:{go_str(x)}" for k, x in sorted(v.items())) + "]"
    if isinstance(v, list):
        return "[" + " ".join(go_str(x) for x in v) + "]"
    return str(v)


def to_yaml(v):
    if v is None:
        return "null"
    s = yaml.safe_dump(v, default_flow_style=False, sort_keys=True, allow_unicode=True, width=1 << 20)
    if s.endswith("...\n"):
        s = s[:-4]
    return s.rstrip("\n")


def indent(n, s):
    pad = " " * int(n)
    return "\n".join(pad + line for line in str(s).split("\n"))


SEMVER = re.compile(r"^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")


def semver(v):
    m = SEMVER.match(str(v).strip())
    if not m:
        raise TemplateError(f"semverCompare: {v!r} is not a version")
    major, minor, patch, pre = m.groups()
    return (int(major), int(minor or 0), int(patch or 0)), pre


def semver_compare(constraint, version):
    """Sprig's semverCompare for AND-ed (comma or space separated) `OP VERSION` terms, with
    Masterminds' rule that a prerelease version only meets constraints that name one
    (">=1.27-0" admits 1.29.1-gke.1, ">=1.27" does not)."""
    ver, vpre = semver(version)

    def key(core, pre):  # a release sorts after its prereleases
        return core + ((1, "") if pre is None else (0, pre))

    terms = re.findall(r"(>=|<=|!=|=|>|<)?\s*(v?\d[0-9A-Za-z.+-]*)", constraint)
    if not terms:
        raise TemplateError(f"semverCompare: cannot parse {constraint!r}")
    for op, c in terms:
        core, pre = semver(c)
        if vpre is not None and pre is None:
            return False
        a, b = key(ver, vpre), key(core, pre)
        if not {"": a == b, "=": a == b, "!=": a != b, ">": a > b, "<": a < b,
                ">=": a >= b, "<=": a <= b}[op]:
            return False
    return True


def printf(fmt, *args):
    args = list(args)
    out = []
    i = 0
    for m in re.finditer(r"%(-?\d*)([svdqt%])|[^%]+|%", fmt):
        if m.group() == "%%":
            out.append("%")
        elif m.group(2):
            a = args[i] if i < len(args) else None
            i += 1
            verb = m.group(2)
            s = json.dumps(go_str(a)) if verb == "q" else go_str(a)
            out.append(s)
        else:
            out.append(m.group())
    return "".join(out)


class Renderer:
    def __init__(self, defines, funcs_extra=None):
        self.defines = defines
        self.funcs = {
            "include": lambda name, data: self.include(name, data),
            "toYaml": to_yaml,
            "toJson": lambda v: json.dumps(v, separators=(",", ":"), sort_keys=True),
            "nindent": lambda n, s: "\n" + indent(n, s),
            "indent": indent,
            "quote": lambda *v: " ".join(json.dumps("" if x is None else go_str(x)) for x in v),
            "squote": lambda *v: " ".join("'" + ("" if x is None else go_str(x)) + "'" for x in v),
            "default": lambda d, v=None: v if truthy(v) else d,
            "required": self.required,
            "fail": self.fail,
            "printf": printf,
            "print": lambda *v: "".join(go_str(x) for x in v),
            "trunc": lambda n, s: s[:n] if n >= 0 else s[n:],
            "trimSuffix": lambda suf, s: s[: -len(suf)] if suf and s.endswith(suf) else s,
            "trimPrefix": lambda pre, s: s[len(pre):] if pre and s.startswith(pre) else s,
            "trim": lambda s: s.strip(),
            "replace": lambda old, new, s: s.replace(old, new),
            "lower": lambda s: s.lower(),
            "upper": lambda s: s.upper(),
            "contains": lambda sub, s: sub in s,
            "hasPrefix": lambda pre, s: s.startswith(pre),
            "b64enc": lambda s: base64.b64encode(go_str(s).encode()).decode(),
            "sha256sum": lambda s: hashlib.sha256(go_str(s).encode()).hexdigest(),
            "toString": go_str,
            "int": lambda v: int(float(v)) if v not in (None, "") else 0,
            "int64": lambda v: int(float(v)) if v not in (None, "") else 0,
            "list": lambda *v: list(v),
            "dict": lambda *kv: {kv[i]: kv[i + 1] for i in range(0, len(kv), 2)},
            "hasKey": lambda d, k: isinstance(d, dict) and k in d,
            "empty": lambda v: not truthy(v),
            "join": lambda sep, v: sep.join(go_str(x) for x in (v or [])),
            "eq": lambda a, *b: any(a == x for x in b),
            "ne": lambda a, b: a != b,
            "lt": lambda a, b: a < b,
            "le": lambda a, b: a <= b,
            "gt": lambda a, b: a > b,
            "ge": lambda a, b: a >= b,
            "not": lambda v: not truthy(v),
            "and": self.f_and,
            "or": self.f_or,
            "len": lambda v: len(v or []),
            "index": self.f_index,
            "ternary": lambda a, b, c: a if truthy(c) else b,
            "add": lambda *v: sum(int(x) for x in v),
            "sub": lambda a, b: int(a) - int(b),
            "mul": lambda *v: __import__("math").prod(int(x) for x in v),
            "div": lambda a, b: int(a) // int(b),
            "max": lambda *v: max(int(x) for x in v),
            "semverCompare": semver_compare,
            "kindIs": lambda k, v: {"map": dict, "slice": list, "string": str, "bool": bool}.get(k, type(None)) is type(v),
        }

    @staticmethod
    def f_and(*v):
        for x in v:
            if not truthy(x):
                return x
        return v[-1]

    @staticmethod
    def f_or(*v):
        for x in v:
            if truthy(x):
                return x
        return v[-1]

    @staticmethod
    def f_index(v, *keys):
        for k in keys:
            v = v[k] if isinstance(v, list) else (v or {}).get(k)
        return v

    @staticmethod
    def required(msg, v=None):
        if not truthy(v) and v is not False and v != 0:
            raise TemplateError(f"required: {msg}")
        return v

    @staticmethod
    def fail(msg):
        raise TemplateError(f"fail: {msg}")

    def include(self, name, data):
        if name not in self.defines:
            raise TemplateError(f'include: no template "{name}"')
        return self.exec(self.defines[name], data, [{"$": data}])

    # ---- evaluation of pipelines
    @staticmethod
    def walk(v, path, what):
        for p in path:
            if v is None:
                raise TemplateError(f"nil pointer evaluating {what}.{p}")
            if isinstance(v, dict):
                v = v.get(p)
            else:
                raise TemplateError(f"can't evaluate field {p} in {type(v).__name__} ({what})")
        return v

    def lookup_var(self, name, scopes):
        for s in reversed(scopes):
            if name in s:
                return s
        raise TemplateError(f"undefined variable {name}")

    def operand(self, op, dot, scopes):
        kind = op[0]
        if kind == "lit":
            return op[1]
        if kind == "field":
            return self.walk(dot, op[1], "." + ".".join(op[1]))
        if kind == "var":
            return self.walk(self.lookup_var(op[1], scopes)[op[1]], op[2], op[1])
        if kind == "sub":
            return self.pipeline(op[1], dot, scopes)
        if kind == "func":
            return self.call(op[1], [], dot, scopes)
        raise TemplateError(f"bad operand {op}")

    def call(self, name, args, dot, scopes, piped=None, has_piped=False):
        f = self.funcs.get(name)
        if f is None:
            raise TemplateError(f'function "{name}" not defined')
        vals = [self.operand(a, dot, scopes) for a in args]
        if has_piped:
            vals.append(piped)
        try:
            return f(*vals)
        except TemplateError:
            raise
        except Exception as e:
            raise TemplateError(f"{name}: {e}") from e

    def pipeline(self, pl, dot, scopes):
        _, decl, cmds = pl
        val = None
        has = False
        for cmd in cmds:
            head = cmd[0]
            if head[0] == "func":
                val = self.call(head[1], cmd[1:], dot, scopes, val, has)
            else:
                if len(cmd) > 1 or has:
                    raise TemplateError(f"can't give arguments to a non-function {head}")
                val = self.operand(head, dot, scopes)
            has = True
        if decl and decl[0] == "decl" and len(decl[1]) == 1:
            scopes[-1][decl[1][0]] = val
        elif decl and decl[0] == "assign":
            self.lookup_var(decl[1][0], scopes)[decl[1][0]] = val
        return val

    def exec(self, nodes, dot, scopes):
        out = []
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "action":
                v = self.pipeline(node[1], dot, scopes)
                if node[1][1] is None:  # a declaration prints nothing
                    out.append(go_str(v))
            elif kind == "template":
                data = self.pipeline(node[2], dot, scopes) if node[2] else None
                out.append(self.include(node[1], data))
            elif kind == "block":
                out.append(self.block(node[1], dot, scopes))
        return "".join(out)

    def block(self, b, dot, scopes):
        k = b["kind"]
        if k == "range":
            pl = b["branches"][0][0]
            body = b["branches"][0][1]
            _, decl, cmds = pl
            coll = self.pipeline(("pipeline", None, cmds), dot, scopes)
            items = []
            if isinstance(coll, dict):
                items = sorted(coll.items())
            elif isinstance(coll, (list, tuple)):
                items = list(enumerate(coll))
            elif isinstance(coll, int):
                items = [(i, i) for i in range(coll)]
            elif coll is not None:
                raise TemplateError(f"range can't iterate over {coll!r}")
            if not items:
                return self.exec(b["else"], dot, scopes + [{}]) if b["else"] is not None else ""
            out = []
            for key, val in items:
                scope = {}
                if decl:
                    names = decl[1]
                    if len(names) == 1:
                        scope[names[0]] = val
                    else:
                        scope[names[0]], scope[names[1]] = key, val
                out.append(self.exec(body, val, scopes + [scope]))
            return "".join(out)
        for pl, body in b["branches"]:
            scope = {}
            v = self.pipeline(pl, dot, scopes + [scope])
            if truthy(v):
                return self.exec(body, v if k == "with" else dot, scopes + [scope])
        if b["else"] is not None:
            return self.exec(b["else"], dot, scopes + [{}])
        return ""


# ------------------------------------------------------------------ values

def merge(base, over):
    for k, v in over.items():
        if v is None:
            base.pop(k, None)
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def typed(s):
    if s in ("true", "false"):
        return s == "true"
    if s == "null":
        return None
    if re.fullmatch(r"-?\d+", s):
        return int(s)
    return s


def set_value(values, expr):
    """helm --set a.b=c / a.list[0]=x (one assignment; commas not split)."""
    key, _, raw = expr.partition("=")
    parts = re.findall(r"([^.\[\]]+)|\[(\d+)\]", key)
    cur = values
    steps = []
    for name, idx in parts:
        steps.append(int(idx) if idx else name)
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        nxt = steps[i + 1] if not last else None
        if isinstance(step, int):
            while len(cur) <= step:
                cur.append(None)
            if last:
                cur[step] = typed(raw)
            else:
                if not isinstance(cur[step], (dict, list)):
                    cur[step] = [] if isinstance(nxt, int) else {}
                cur = cur[step]
        else:
            if last:
                v = typed(raw)
                if v is None:
                    cur.pop(step, None)
                else:
                    cur[step] = v
            else:
                if not isinstance(cur.get(step), (dict, list)):
                    cur[step] = [] if isinstance(nxt, int) else {}
                cur = cur[step]


def render_chart(chart, release, namespace, sets, files, kube_version="v1.31.0"):
    with open(os.path.join(chart, "Chart.yaml")) as f:
        meta = yaml.safe_load(f)
    if meta.get("kubeVersion") and not semver_compare(meta["kubeVersion"], kube_version):
        raise TemplateError(f"chart requires kubeVersion: {meta['kubeVersion']} which is incompatible "
                            f"with Kubernetes {kube_version}")
    with open(os.path.join(chart, "values.yaml")) as f:
        values = yaml.safe_load(f) or {}
    for fn in files:
        with open(fn) as f:
            merge(values, yaml.safe_load(f) or {})
    for s in sets:
        set_value(values, s)
    schema_path = os.path.join(chart, "values.schema.json")
    if os.path.exists(schema_path):
        import jsonschema
        with open(schema_path) as f:
            schema = json.load(f)
        errs = sorted(jsonschema.Draft7Validator(schema).iter_errors(values), key=lambda e: list(e.path))
        if errs:
            raise TemplateError("values don't meet the specifications of the schema:\n" + "\n".join(
                f"  - {'.'.join(str(p) for p in e.path) or '(root)'}: {e.message}" for e in errs))
    top = {
        "Values": values,
        "Release": {"Name": release, "Namespace": namespace, "Service": "Helm", "IsInstall": True,
                    "IsUpgrade": False, "Revision": 1},
        "Chart": {"Name": meta["name"], "Version": meta["version"], "AppVersion": meta.get("appVersion", "")},
        "Capabilities": {"KubeVersion": {"Version": kube_version}},
    }
    tdir = os.path.join(chart, "templates")
    names = sorted(n for n in os.listdir(tdir) if n.endswith((".yaml", ".yml", ".tpl", ".txt")))
    defines = {}
    trees = {}
    for n in names:
        with open(os.path.join(tdir, n)) as f:
            try:
                trees[n] = build_tree(split_actions(f.read()), defines)
            except TemplateError as e:
                raise TemplateError(f"templates/{n}: {e}") from e
    r = Renderer(defines)
    docs = []
    for n in names:
        if n.startswith("_") or not n.endswith((".yaml", ".yml")):
            continue
        try:
            text = r.exec(trees[n], top, [{"$": top}])
        except TemplateError as e:
            raise TemplateError(f"templates/{n}: {e}") from e
        for doc in re.split(r"(?m)^---\s*$", text):
            if not doc.strip() or all(not ln.strip() or ln.lstrip().startswith("#") for ln in doc.splitlines()):
                continue
            try:
                obj = yaml.safe_load(doc)
            except yaml.YAMLError as e:
                raise TemplateError(f"templates/{n}: rendered YAML does not parse: {e}\n{doc}") from e
            if not isinstance(obj, dict) or "kind" not in obj or "apiVersion" not in obj:
                raise TemplateError(f"templates/{n}: a document without apiVersion/kind:\n{doc}")
            docs.append(f"# Source: {meta['name']}/templates/{n}\n{doc.strip(chr(10))}\n")
    return "---\n" + "---\n".join(docs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("chart")
    ap.add_argument("--release", default="release-name")
    ap.add_argument("--namespace", default="default")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("-f", "--values", action="append", default=[])
    ap.add_argument("--kube-version", default="v1.31.0")
    a = ap.parse_args()
    kube_version = a.kube_version if a.kube_version.startswith("v") else "v" + a.kube_version
    try:
        sys.stdout.write(render_chart(a.chart, a.release, a.namespace, a.set, a.values, kube_version))
    except TemplateError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

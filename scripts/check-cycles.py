#!/usr/bin/env python3
"""Import cycles among the modules of each crate.

A module may use its ancestors (`super::`) and its descendants freely; between any
other two modules the `use` edges must form no cycle. Test modules (declared under
`#[cfg(test)]`) may use anything: they are not part of the structure. Edges are lifted to the
children of the two modules' nearest common ancestor, so `a::x -> b::y` and
`b::z -> a` make the cycle `a <-> b` (two siblings of the crate root), whatever
files they come from.

Usage: scripts/check-cycles.py [CRATE_SRC_DIR ...]   (default: every crate's src/)
Exit status 1 when a cycle exists; each is printed with the edges that make it.
"""

import os
import re
import sys
from collections import defaultdict

DEFAULT = ["proto/src", "kernels/src", "worker/src", "worker/cli/src", "coordinator/src"]

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
MOD_DECL = re.compile(
    r"((?:#\[[^\]]*\]\s*)*)(?:pub(?:\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*;"
)


def strip_comments(src):
    src = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
    src = re.sub(r"//[^\n]*", "", src)
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', src)


def modules(src_dir, tests=None):
    """Module path (tuple) -> file, following `mod x;` declarations from lib.rs/main.rs;
    `tests` (a set), when given, receives the modules declared under `#[cfg(test)]`."""
    found = {}
    roots = [f for f in ("lib.rs", "main.rs") if os.path.exists(os.path.join(src_dir, f))]

    def walk(path, mod, file_dir, is_mod_rs):
        found[mod] = path
        text = open(path, encoding="utf-8").read()
        # Decls keep their #[path]; strings must survive, so only comments are removed.
        text = re.sub(r"//[^\n]*", "", text)
        for m in MOD_DECL.finditer(text):
            attrs, name = m.group(1), m.group(2)
            path_attr = re.search(r'#\[path\s*=\s*"([^"]+)"\]', attrs)
            explicit = path_attr.group(1) if path_attr else None
            if tests is not None and re.search(r"#\[cfg\(test\)\]", attrs):
                tests.add(mod + (name,))
            base = file_dir if is_mod_rs else os.path.join(file_dir, os.path.splitext(os.path.basename(path))[0])
            if explicit:
                child = os.path.join(os.path.dirname(path), explicit)
                walk(child, mod + (name,), os.path.dirname(child), os.path.basename(child) == "mod.rs")
                continue
            flat, nested = os.path.join(base, name + ".rs"), os.path.join(base, name, "mod.rs")
            if os.path.exists(flat):
                walk(flat, mod + (name,), base, False)
            elif os.path.exists(nested):
                walk(nested, mod + (name,), os.path.join(base, name), True)

    for r in roots:
        walk(os.path.join(src_dir, r), (), src_dir, True)
    return found


def expand(tree):
    """Expands a use tree (`a::{b, c::{d, e}}`) into paths."""
    tree = tree.strip()
    depth, start = 0, None
    for i, ch in enumerate(tree):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                prefix = tree[:start].rstrip(":").strip()
                inner, parts, d, cur = tree[start + 1 : i], [], 0, ""
                for c in inner:
                    if c == "," and d == 0:
                        parts.append(cur)
                        cur = ""
                        continue
                    d += c == "{"
                    d -= c == "}"
                    cur += c
                parts.append(cur)
                out = []
                for p in parts:
                    p = p.strip()
                    if not p:
                        continue
                    for e in expand(p):
                        out.append(prefix + ("::" + e if prefix and e != "self" else ""))
                return out
    return [tree.split(" as ")[0].strip()]


def references(text):
    """Paths starting with crate/super/self that the file names."""
    refs = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        refs.extend(expand(m.group(1)))
    for m in re.finditer(r"\b((?:crate|super|self)(?:::" + IDENT + r")+)", text):
        refs.append(m.group(1))
    return [r for r in refs if r.split("::")[0] in ("crate", "super", "self")]


def resolve(path, here, known):
    parts = path.split("::")
    if parts[0] == "crate":
        base, rest = (), parts[1:]
    else:
        base = here
        rest = parts
        while rest and rest[0] in ("super", "self"):
            if rest[0] == "super":
                base = base[:-1]
            rest = rest[1:]
    mod = base
    for p in rest:
        if mod + (p,) in known:
            mod = mod + (p,)
        else:
            break
    return mod


def cycles(src_dir):
    tests = set()
    known = modules(src_dir, tests)
    edges = defaultdict(set)  # parent -> {(a, b)}
    why = defaultdict(list)
    for mod, path in known.items():
        if any(mod[: i + 1] in tests for i in range(len(mod))):
            continue
        text = strip_comments(open(path, encoding="utf-8").read())
        for ref in references(text):
            target = resolve(ref, mod, known)
            n = 0
            while n < min(len(mod), len(target)) and mod[n] == target[n]:
                n += 1
            if n == len(mod) or n == len(target):
                continue  # an ancestor or a descendant
            parent, a, b = mod[:n], mod[n], target[n]
            edges[parent].add((a, b))
            why[(parent, a, b)].append(f"{os.path.relpath(path)}: {ref}")
    found = []
    for parent, es in edges.items():
        graph = defaultdict(set)
        for a, b in es:
            graph[a].add(b)
        for comp in scc(graph):
            if len(comp) > 1:
                inner = sorted((a, b) for a, b in es if a in comp and b in comp)
                found.append((parent, sorted(comp), [(a, b, why[(parent, a, b)][0]) for a, b in inner]))
    return found


def scc(graph):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    nodes = set(graph) | {b for bs in graph.values() for b in bs}

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def main():
    root = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    dirs = sys.argv[1:] or [os.path.join(root, d) for d in DEFAULT]
    bad = 0
    for d in dirs:
        n = len(modules(d))
        found = cycles(d)
        print(f"{os.path.relpath(d, root)}: {n} modules, {len(found)} import cycle(s)")
        for parent, comp, inner in found:
            bad += 1
            where = "::".join(parent) or "crate root"
            print(f"  cycle under {where}: {' <-> '.join(comp)}")
            for a, b, example in inner:
                print(f"    {a} -> {b}   ({example})")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

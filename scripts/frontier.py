#!/usr/bin/env python3
"""The perplexity frontier at 8k: real-bytes ratio against Δ perplexity, qaq's policies
beside llama.cpp's KV cache types, scored the same way (the second half of each window).

Reads
  - qaq's measurements: `results.jsonl` files of `qaq-worker eval --tasks ppl
    --ppl-score second-half` (rows of task `ppl-half@<ctx>`; ratio = fp16 bytes / real
    bytes the cache holds; PPL = exp(sum NLL / sum scored tokens) over the windows);
  - llama.cpp's: the `ppl-<type>-<rot|norot|none>.log` files of
    `scripts/peer-llamacpp.sh --ppl-frontier` ("Final estimate: PPL = X"; ratio = 16 /
    bits per value of the type).
Writes a markdown table (stdout or --table), an SVG plot (--svg), and the
frontier-dominance check of issue 17: at each ratio r from 3x to 8x where some point
lies, the best QAQ policy at ratio >= r against the best uniform / KIVI / llama.cpp
point at ratio >= r.

Usage: scripts/frontier.py --qaq R.jsonl [--qaq ...] --llama DIR [--ctx 8192]
                           [--llama-point TYPE,rot|norot,PPL[,NOTE] ...]
                           [--svg OUT.svg] [--table OUT.md]
No dependencies beyond the standard library.
"""

import argparse
import glob
import json
import math
import os
import re
import sys

BITS = {"f16": 16.0, "q8_0": 8.5, "q5_1": 6.0, "q5_0": 5.5, "q4_1": 5.0, "q4_0": 4.5, "iq4_nl": 4.5}


def family(policy):
    """The family a qaq policy string belongs to, and whether it rotates."""
    rot = policy.endswith("+rot")
    base = policy.split(":")[0].split("+")[0]
    name = {"fp16": "fp16", "uniform": "uniform", "kivi": "KIVI"}.get(base, "QAQ")
    return name, rot


def qaq_points(paths, ctx):
    acc = {}
    for p in paths:
        for line in open(p):
            r = json.loads(line)
            if r.get("task") != f"ppl-half@{ctx}" or r["outcome"].get("kind") != "ppl":
                continue
            a = acc.setdefault(r["policy"], {"nll": 0.0, "tok": 0, "real": 0, "fp16": 0, "items": set()})
            if r["item"] in a["items"]:
                continue
            a["items"].add(r["item"])
            a["nll"] += r["outcome"]["nll"]
            a["tok"] += r["outcome"]["tokens"]
            a["real"] += r["kv"]["real"]
            a["fp16"] += r["kv"]["fp16"]
    windows = {len(a["items"]) for a in acc.values()}
    if len(windows) > 1:
        sys.exit(f"frontier: policies were measured over different numbers of windows: {sorted(windows)}")
    pts = []
    for pol, a in acc.items():
        fam, rot = family(pol)
        pts.append(dict(side="qaq", label=f"`{pol}`", family=fam, rot=rot, ratio=a["fp16"] / a["real"],
                        ppl=math.exp(a["nll"] / a["tok"])))
    return pts, (windows.pop() if windows else 0)


def llama_points(folder):
    pts = []
    for p in sorted(glob.glob(os.path.join(folder, "ppl-*.log"))):
        m = re.match(r"ppl-(.+)-(rot|norot|none)\.log$", os.path.basename(p))
        if not m:
            continue
        est = re.search(r"Final estimate: PPL = ([0-9.]+)", open(p, errors="replace").read())
        if not est:
            continue
        t, rot = m.group(1), m.group(2)
        label = {"rot": f"llama.cpp {t}, rotation", "norot": f"llama.cpp {t}, rotation off"}.get(rot, f"llama.cpp {t}")
        pts.append(dict(side="llama", label=label, family="llama.cpp", rot=rot == "rot", ratio=16.0 / BITS[t],
                        ppl=float(est.group(1)), type=t))
    return pts


def with_deltas(pts, base):
    for p in pts:
        p["delta"] = 100.0 * (p["ppl"] / base - 1.0)
    return pts


def table(pts):
    out = ["| cache | side | ratio | PPL | Δ vs own fp16/f16 |", "|---|---|---|---|---|"]
    for p in sorted(pts, key=lambda p: (p["ratio"], p["delta"])):
        d = "—" if p["family"] in ("fp16",) or p.get("type") == "f16" else f"{p['delta']:+.2f}%"
        out.append(f"| {p['label']} | {p['side']} | {p['ratio']:.2f}× | {p['ppl']:.3f} | {d} |")
    return "\n".join(out)


def dominance(pts):
    """Lines: at each ratio in [3, 8] where a point lies, the best QAQ point at that ratio
    or higher against the best other point (uniform, KIVI, llama.cpp) there."""
    qaq = [p for p in pts if p["family"] == "QAQ"]
    other = [p for p in pts if p["family"] in ("uniform", "KIVI", "llama.cpp") and p.get("type") != "f16"]
    lines, fails = [], 0
    for r in sorted({p["ratio"] for p in qaq + other if 3.0 <= p["ratio"] <= 8.0}):
        bq = min((p for p in qaq if p["ratio"] >= r), key=lambda p: p["delta"], default=None)
        bo = min((p for p in other if p["ratio"] >= r), key=lambda p: p["delta"], default=None)
        if bo is None:
            continue
        ok = bq is not None and bq["delta"] < bo["delta"]
        fails += not ok
        best = f"{bq['label']} {bq['delta']:+.2f}%" if bq else "none measured"
        lines.append(f"| {r:.2f}× | {best} | {bo['label']} {bo['delta']:+.2f}% | {'QAQ' if ok else '**not QAQ**'} |")
    head = ["| from ratio | best QAQ at ≥ that ratio | best uniform / KIVI / llama.cpp at ≥ that ratio | lower Δ |",
            "|---|---|---|---|"]
    return head + lines, fails


COLORS = {"fp16": "#000000", "uniform": "#1f77b4", "KIVI": "#2ca02c", "QAQ": "#d62728", "llama.cpp": "#9467bd"}


def svg(pts, path, ctx, windows):
    w, h, ml, mr, mt, mb = 760, 480, 70, 200, 40, 55
    # y: Δ on an asinh scale (linear near 0, logarithmic beyond a few percent).
    x0, x1, y0, y1 = 1.0, 7.0, -1.0, 50.0
    t = lambda d: math.asinh(d / 0.5)
    X = lambda r: ml + (r - x0) / (x1 - x0) * (w - ml - mr)
    Y = lambda d: mt + (t(y1) - t(min(max(d, y0), y1))) / (t(y1) - t(y0)) * (h - mt - mb)
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
         f'<rect width="{w}" height="{h}" fill="white"/>',
         f'<text x="{ml}" y="22" font-size="14">Perplexity at {ctx} (WikiText-2, {windows} windows, second half '
         f'scored) against real KV bytes</text>']
    for r in range(1, 8):
        s.append(f'<line x1="{X(r)}" y1="{mt}" x2="{X(r)}" y2="{h - mb}" stroke="#ddd"/>')
        s.append(f'<text x="{X(r)}" y="{h - mb + 16}" text-anchor="middle">{r}×</text>')
    for d in (-1, 0, 0.5, 1, 2, 5, 10, 20, 50):
        s.append(f'<line x1="{ml}" y1="{Y(d)}" x2="{w - mr}" y2="{Y(d)}" stroke="{"#999" if d == 0 else "#ddd"}"/>')
        s.append(f'<text x="{ml - 6}" y="{Y(d) + 4}" text-anchor="end">{d:+g}%</text>')
    s.append(f'<text x="{(ml + w - mr) / 2}" y="{h - 12}" text-anchor="middle">ratio = fp16 bytes / real bytes held '
             f'(llama.cpp: 16 / bits per value)</text>')
    s.append(f'<text x="16" y="{(mt + h - mb) / 2}" text-anchor="middle" '
             f'transform="rotate(-90 16 {(mt + h - mb) / 2})">Δ perplexity vs the side\'s own fp16/f16 cache</text>')
    for p in sorted(pts, key=lambda p: p["ratio"]):
        if p.get("type") == "f16" or p["family"] == "fp16":
            continue
        cx, cy, c = X(min(p["ratio"], x1)), Y(p["delta"]), COLORS[p["family"]]
        fill = c if p["rot"] else "white"
        title = f'{p["label"].strip("`")}: {p["ratio"]:.2f}x, {p["delta"]:+.2f}%'
        if p["family"] == "llama.cpp":
            shape = f'<rect x="{cx - 5}" y="{cy - 5}" width="10" height="10" fill="{fill}" stroke="{c}" stroke-width="2">'
            s.append(shape + f"<title>{title}</title></rect>")
        else:
            s.append(f'<circle cx="{cx}" cy="{cy}" r="5" fill="{fill}" stroke="{c}" stroke-width="2">'
                     f"<title>{title}</title></circle>")

    ly = mt + 10
    for fam in ("uniform", "KIVI", "QAQ", "llama.cpp"):
        c = COLORS[fam]
        if fam == "llama.cpp":
            s.append(f'<rect x="{w - mr + 15}" y="{ly - 5}" width="10" height="10" fill="{c}"/>')
        else:
            s.append(f'<circle cx="{w - mr + 20}" cy="{ly}" r="5" fill="{c}" stroke="{c}" stroke-width="2"/>')
        s.append(f'<text x="{w - mr + 32}" y="{ly + 4}">{fam}</text>')
        ly += 20
    s.append(f'<text x="{w - mr + 14}" y="{ly + 10}">filled: rotated (+rot /</text>')
    s.append(f'<text x="{w - mr + 14}" y="{ly + 26}">llama.cpp Hadamard),</text>')
    s.append(f'<text x="{w - mr + 14}" y="{ly + 42}">open: not rotated;</text>')
    s.append(f'<text x="{w - mr + 14}" y="{ly + 58}">Δ on an asinh scale;</text>')
    s.append(f'<text x="{w - mr + 14}" y="{ly + 74}">hover a point for its</text>')
    s.append(f'<text x="{w - mr + 14}" y="{ly + 90}">policy and values.</text>')
    s.append("</svg>")
    open(path, "w").write("\n".join(s) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qaq", action="append", required=True, help="qaq results.jsonl (repeatable)")
    ap.add_argument("--llama", required=True, help="folder of llama-perplexity logs (--ppl-frontier)")
    ap.add_argument("--llama-point", action="append", default=[], metavar="TYPE,rot|norot,PPL[,NOTE]",
                    help="a llama.cpp measurement taken elsewhere with the same build and flags (repeatable)")
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--svg")
    ap.add_argument("--table")
    a = ap.parse_args()
    q, windows = qaq_points(a.qaq, a.ctx)
    l = llama_points(a.llama)
    for spec in a.llama_point:
        t, rot, ppl, *note = spec.split(",")
        label = f"llama.cpp {t}, {'rotation' if rot == 'rot' else 'rotation off'}" + (f" ({note[0]})" if note else "")
        l.append(dict(side="llama", label=label, family="llama.cpp", rot=rot == "rot", ratio=16.0 / BITS[t],
                      ppl=float(ppl), type=t))
    qf = [p for p in q if p["family"] == "fp16"]
    lf = [p for p in l if p.get("type") == "f16"]
    if not qf or not lf:
        sys.exit("frontier: both an fp16 qaq row and llama.cpp's f16 log are needed (the deltas' bases)")
    pts = with_deltas(q, qf[0]["ppl"]) + with_deltas(l, lf[0]["ppl"])
    dom, fails = dominance(pts)
    text = "\n".join([table(pts), "", *dom, "",
                      f"QAQ has the lower Δ at {len(dom) - 2 - fails} of {len(dom) - 2} ratios from 3× to 8×."])
    if a.table:
        open(a.table, "w").write(text + "\n")
    print(text)
    if a.svg:
        svg(pts, a.svg, a.ctx, windows)


if __name__ == "__main__":
    main()

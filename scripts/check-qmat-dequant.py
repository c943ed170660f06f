#!/usr/bin/env python3
"""Compares qaq-kernels' dequantization with the Python `gguf` package's (an independent
implementation of ggml's block layouts), on the files written by the ignored kernels test
`qmat::tests_gguf::dump_for_an_independent_dequantizer`:

    QAQ_QMAT_DUMP=/tmp/qmat cargo test --release -p qaq-kernels --lib -- --ignored dump_for
    python3 scripts/check-qmat-dequant.py /tmp/qmat        # needs `pip install gguf numpy`

For each tensor: raw GGUF bytes (NAME.bin) and qaq's dequantization (NAME.f32). Prints the
number of values that differ in their bits and the largest difference; exits 1 on any.
"""

import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, dequantize

d = Path(sys.argv[1])
bad = 0
for line in (d / "index.txt").read_text().splitlines():
    name, ty, rows, cols = line.split()
    rows, cols = int(rows), int(cols)
    qtype = GGMLQuantizationType(int(ty))
    raw = np.frombuffer((d / f"{name}.bin").read_bytes(), dtype=np.uint8).reshape(rows, -1)
    ours = np.frombuffer((d / f"{name}.f32").read_bytes(), dtype=np.float32).reshape(rows, cols)
    if qtype == GGMLQuantizationType.F32:
        theirs = raw.view(np.float32)
    elif qtype == GGMLQuantizationType.F16:
        theirs = raw.view(np.float16).astype(np.float32)
    else:
        theirs = dequantize(raw, qtype).astype(np.float32).reshape(rows, cols)
    differ = int(np.sum(ours.view(np.uint32) != theirs.view(np.uint32)))
    maxdiff = float(np.max(np.abs(ours.astype(np.float64) - theirs.astype(np.float64))))
    scale = float(np.max(np.abs(theirs)))
    print(f"{name:28s} {qtype.name:5s} {rows}x{cols}: {differ} values differ in bits, max |diff| {maxdiff:.3g} (max |value| {scale:.3g})")
    bad += differ
sys.exit(1 if bad else 0)

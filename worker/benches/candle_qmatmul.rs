//! The dependency issue 16 asked to evaluate before writing our own: candle-core's
//! quantized matmul (`QMatMul`, what candle-transformers' `quantized_llama` runs) against
//! the kernels' `qmat::linear`, on the default model's real matrices (layer 0's seven and
//! the tied Q8_0 head), at m = 1 (decode), 8 (a batch) and 512 (a prefill chunk), with
//! the tokens/s one forward pass's matmuls bound (30 layers × the seven, plus the head at
//! m = 1 and 8; a prefill chunk's head meets one row, left out at 512). Side by side in one process, fastest of repeated runs, both on every core
//! (candle on rayon's pool, qmat on the kernels' pool). Also whether each keeps a row's
//! result independent of the batch (row `i` of an m = 8 product bit-identical to the same
//! row alone), which greedy decoding, preemption and migration rely on.
//!
//! `cargo bench -p qaq-worker --bench candle_qmatmul` (model: `QAQ_MODEL`, default the
//! default model). Prints `SUMMARY` lines.

use std::time::Instant;

use candle_core::quantized::{QMatMul, gguf_file};
use candle_core::{Device, Module, Tensor};
use qaq_kernels::qmat::{self, QMatrix};

fn fastest(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    let path = std::env::var("QAQ_MODEL").unwrap_or_else(|_| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    let mut f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e} (make model)", path.display()));
    let c = gguf_file::Content::read(&mut f).unwrap();
    let names = [
        "blk.0.attn_q.weight",
        "blk.0.attn_k.weight",
        "blk.0.attn_v.weight",
        "blk.0.attn_output.weight",
        "blk.0.ffn_gate.weight",
        "blk.0.ffn_up.weight",
        "blk.0.ffn_down.weight",
        "token_embd.weight",
    ];
    // Seconds per forward pass's matmuls at each m: [candle, qmat].
    let mut pass = [[0f64; 2]; 3];
    let ms = [1usize, 8, 512];
    for name in names {
        let q = c.tensor(&mut f, name, &Device::Cpu).unwrap();
        let (rows, cols) = q.shape().dims2().unwrap();
        let ours =
            QMatrix::new(qaq_worker::model::loader::format(q.dtype()).unwrap(), rows, cols, q.data().unwrap().into_owned())
                .unwrap();
        let theirs = QMatMul::from_qtensor(q).unwrap();
        let head = name.starts_with("token");
        for (mi, &m) in ms.iter().enumerate() {
            // The head meets one row per sequence: m rows at decode, one row of a prefill.
            if head && m == 512 {
                continue;
            }
            let x: Vec<f32> = (0..m * cols).map(|i| ((i * 7919 % 1000) as f32 / 250.0 - 2.0).sin()).collect();
            let xt = Tensor::from_slice(&x, (m, cols), &Device::Cpu).unwrap();
            let mut out = vec![0f32; m * rows];
            let reps = if m == 512 { 5 } else { 50 };
            let tc = fastest(reps, || {
                std::hint::black_box(theirs.forward(&xt).unwrap());
            });
            let tq = fastest(reps, || qmat::linear(&ours, &x, m, &mut out).unwrap());
            let per_pass = if head { 1.0 } else { 30.0 };
            pass[mi][0] += tc * per_pass;
            pass[mi][1] += tq * per_pass;
            let mut same = (true, true);
            if m == 8 {
                let cb = theirs.forward(&xt).unwrap().to_vec2::<f32>().unwrap();
                for i in 0..m {
                    let row = Tensor::from_slice(&x[i * cols..(i + 1) * cols], (1, cols), &Device::Cpu).unwrap();
                    let alone = theirs.forward(&row).unwrap().to_vec2::<f32>().unwrap();
                    same.0 &= alone[0] == cb[i];
                    let mut o1 = vec![0f32; rows];
                    qmat::linear(&ours, &x[i * cols..(i + 1) * cols], 1, &mut o1).unwrap();
                    same.1 &= o1[..] == out[i * rows..(i + 1) * rows];
                }
            }
            println!(
                "SUMMARY {name:<26} {:?} {rows}x{cols} m={m:<3} candle {:8.1} us  qmat {:8.1} us  qmat/candle speed {:5.2}x{}",
                ours.format(),
                tc * 1e6,
                tq * 1e6,
                tc / tq,
                if m == 8 { format!("  batched == alone: candle {} qmat {}", same.0, same.1) } else { String::new() }
            );
        }
    }
    for (mi, &m) in ms.iter().enumerate() {
        let [tc, tq] = pass[mi];
        // Tokens per second the matmuls alone allow: m rows per pass.
        println!(
            "SUMMARY forward-pass matmuls m={m:<3}: candle {:7.2} ms ({:7.1} tok/s)  qmat {:7.2} ms ({:7.1} tok/s)  speed {:5.2}x",
            tc * 1e3,
            m as f64 / tc,
            tq * 1e3,
            m as f64 / tq,
            tc / tq
        );
    }
}

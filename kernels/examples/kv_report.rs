//! KV report: compression and attention error of QAQ settings on one prompt's real KV.
//!
//! Usage: `cargo run --release -p qaq-kernels --example kv_report -- DUMP [N_LAST]`
//!
//! Dump format (all little-endian):
//! * header: 8 bytes magic `QAQKVD01`, then five u32: n_layers, n_kv_heads, n_q_heads,
//!   head_dim, n_tokens;
//! * K: f32 `[layer][token][kv_head * head_dim]` (post-RoPE);
//! * V: f32 `[layer][token][kv_head * head_dim]`;
//! * Q: f32 `[layer][token][q_head * head_dim]` (post-RoPE, unscaled).
//!
//! For each policy the prompt is appended, the prefill attention of the last
//! `window` prompt rows feeds the windows (exactly what the engine does), one
//! `end_step` re-quantizes, and then the queries of the last `N_LAST` positions (default
//! 8) attend causally over the quantized cache; their outputs are compared with exact
//! fp32 attention (relative L2 error over all layers, heads and rows).

use qaq_kernels::cache::new_cache;
use qaq_kernels::{CacheConfig, KvPolicy};
use std::process::ExitCode;

fn read_u32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn f32s(b: &[u8], off: usize, n: usize) -> Option<Vec<f32>> {
    let s = b.get(off..off + 4 * n)?;
    Some(s.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

struct Dump {
    cfg: CacheConfig,
    t: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    q: Vec<f32>,
}

fn parse(b: &[u8]) -> Result<Dump, String> {
    if b.get(..8) != Some(b"QAQKVD01") {
        return Err("bad magic (expected QAQKVD01)".into());
    }
    let h: Vec<usize> =
        (0..5).map(|i| read_u32(b, 8 + 4 * i).map(|v| v as usize)).collect::<Option<_>>().ok_or("short header")?;
    let cfg = CacheConfig { n_layers: h[0], n_kv_heads: h[1], n_q_heads: h[2], head_dim: h[3] };
    let t = h[4];
    let kv = cfg.n_layers * t * cfg.n_kv_heads * cfg.head_dim;
    let qn = cfg.n_layers * t * cfg.n_q_heads * cfg.head_dim;
    let k = f32s(b, 28, kv).ok_or("short K")?;
    let v = f32s(b, 28 + 4 * kv, kv).ok_or("short V")?;
    let q = f32s(b, 28 + 8 * kv, qn).ok_or("short Q")?;
    Ok(Dump { cfg, t, k, v, q })
}

/// Exact causal attention of the rows `t - n .. t` of one layer, fp32.
fn exact(d: &Dump, layer: usize, n: usize) -> Vec<f32> {
    let c = &d.cfg;
    let (hd, g, row, qrow) = (c.head_dim, c.group(), c.n_kv_heads * c.head_dim, c.n_q_heads * c.head_dim);
    let kl = &d.k[layer * d.t * row..(layer + 1) * d.t * row];
    let vl = &d.v[layer * d.t * row..(layer + 1) * d.t * row];
    let mut out = vec![0f32; n * qrow];
    for r in 0..n {
        let p = d.t - n + r;
        let q = &d.q[(layer * d.t + p) * qrow..(layer * d.t + p + 1) * qrow];
        for qh in 0..c.n_q_heads {
            let kvh = qh / g;
            let qv = &q[qh * hd..(qh + 1) * hd];
            let sc: Vec<f64> = (0..=p)
                .map(|t| (0..hd).map(|i| (qv[i] * kl[t * row + kvh * hd + i]) as f64).sum::<f64>() / (hd as f64).sqrt())
                .collect();
            let mx = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = sc.iter().map(|s| (s - mx).exp()).collect();
            let z: f64 = e.iter().sum();
            for i in 0..hd {
                let acc: f64 = (0..=p).map(|t| e[t] * vl[t * row + kvh * hd + i] as f64).sum();
                out[r * qrow + qh * hd + i] = (acc / z) as f32;
            }
        }
    }
    out
}

fn run(d: &Dump, policy: &str, n_last: usize, reference: &[Vec<f32>]) -> Result<(), String> {
    let pol: KvPolicy = policy.parse().map_err(|e| format!("{e}"))?;
    let mut cache = new_cache(d.cfg, pol).map_err(|e| e.to_string())?;
    let c = &d.cfg;
    let (row, qrow) = (c.n_kv_heads * c.head_dim, c.n_q_heads * c.head_dim);
    let window = match pol {
        KvPolicy::Qaq(p) => p.window,
        _ => 1,
    }
    .min(d.t);
    for l in 0..c.n_layers {
        let k = &d.k[l * d.t * row..(l + 1) * d.t * row];
        let v = &d.v[l * d.t * row..(l + 1) * d.t * row];
        cache.append(l, k, v).map_err(|e| e.to_string())?;
        let q = &d.q[(l * d.t + d.t - window) * qrow..(l * d.t + d.t) * qrow];
        cache.attend_rows(l, q, window).map_err(|e| e.to_string())?;
    }
    cache.end_step().map_err(|e| e.to_string())?;
    let st = cache.stats();
    let (mut num, mut den) = (0f64, 0f64);
    for (l, want) in reference.iter().enumerate() {
        let q = &d.q[(l * d.t + d.t - n_last) * qrow..(l * d.t + d.t) * qrow];
        let got = if n_last == 1 {
            cache.attend(l, q).map_err(|e| e.to_string())?.output
        } else {
            cache.attend_rows(l, q, n_last).map_err(|e| e.to_string())?
        };
        for (a, b) in got.iter().zip(want) {
            num += ((a - b) as f64).powi(2);
            den += (*b as f64).powi(2);
        }
    }
    println!(
        "{policy:<40} K bits {:5.2}  V bits {:5.2}  real ratio {:5.2}x  paper-style ratio {:5.2}x  attn rel err {:.3e}",
        st.k.avg_bits(),
        st.v.avg_bits(),
        st.compression_ratio(),
        st.paper_style_ratio(),
        (num / den.max(1e-30)).sqrt()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: kv_report DUMP [N_LAST]");
        return ExitCode::from(2);
    };
    let n_last: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cannot read {path}: {e}");
            return ExitCode::from(1);
        }
    };
    let d = match parse(&bytes) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{path}: {e}");
            return ExitCode::from(1);
        }
    };
    let n_last = n_last.clamp(1, d.t);
    println!(
        "{} layers, {} KV heads, {} q heads, head_dim {}, {} tokens; error over the last {n_last} queries",
        d.cfg.n_layers, d.cfg.n_kv_heads, d.cfg.n_q_heads, d.cfg.head_dim, d.t
    );
    let reference: Vec<Vec<f32>> = (0..d.cfg.n_layers).map(|l| exact(&d, l, n_last)).collect();
    let policies = [
        "fp16",
        "uniform:4",
        "qaq:sigma_s=0.003,sigma_x=0.003",
        "qaq:sigma_s=0.01,sigma_x=0.01",
        "qaq:sigma_s=0.03,sigma_x=0.03",
    ];
    for p in policies.iter().map(|s| s.to_string()).chain(args.iter().skip(3).cloned()) {
        if let Err(e) = run(&d, &p, n_last, &reference) {
            eprintln!("{p}: {e}");
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}

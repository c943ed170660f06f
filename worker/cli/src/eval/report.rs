//! Aggregation of the stored results into one row per (task, policy), and
//! the outputs: `eval.json`, `eval.md` (tables) and `eval.svg` (compression
//! ratio vs score, one series per method family).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::store::{KvBytes, Outcome, Record};

/// One (task, policy) result.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub task: String,
    pub policy: String,
    pub items: usize,
    /// The task's headline metric: accuracy (multiple choice: the paper's
    /// mean per-token log-probability), perplexity, or exact match.
    pub metric: &'static str,
    pub score: f64,
    /// Score minus the fp16 score (same items).
    pub delta_vs_fp16: f64,
    /// Multiple choice: fraction of items whose prediction equals fp16's.
    pub agreement: Option<f64>,
    /// Multiple choice: accuracy with lm-eval's length normalisation (log-prob / characters).
    pub acc_norm: Option<f64>,
    /// Multiple choice: accuracy by unnormalised log-probability.
    pub acc_sum: Option<f64>,
    /// Half-width of the 95% interval of an accuracy.
    pub ci95: Option<f64>,
    pub real_ratio: f64,
    pub paper_ratio: f64,
    pub k_bits: f64,
    pub v_bits: f64,
    pub requant_up: u64,
    pub requant_down: u64,
}

fn argmax(xs: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in xs.enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// Predictions of an MC outcome: (per token, per character, sum).
fn predictions(o: &Outcome) -> Option<(usize, usize, usize, usize)> {
    let Outcome::Mc { sum_lp, tokens, chars, label } = o else { return None };
    let tok = argmax(sum_lp.iter().zip(tokens).map(|(s, &n)| s / n.max(1) as f64));
    let chr = argmax(sum_lp.iter().zip(chars).map(|(s, &n)| s / n.max(1) as f64));
    let sum = argmax(sum_lp.iter().copied());
    Some((tok, chr, sum, *label))
}

/// Aggregates `records` of one task (`items`: the sampled item ids, in order)
/// for each policy; items without an fp16 result are left out of every row,
/// so all rows of a task cover the same items.
pub fn aggregate(
    task: &str,
    items: &[String],
    policies: &[String],
    get: impl Fn(&str, &str) -> Option<Record>,
) -> Vec<Row> {
    let fp16: BTreeMap<&str, Record> = items.iter().filter_map(|i| get(i, "fp16").map(|r| (i.as_str(), r))).collect();
    let mut rows = Vec::new();
    let mut fp16_score = None;
    for p in std::iter::once(&"fp16".to_string()).chain(policies.iter().filter(|p| *p != "fp16")) {
        let recs: Vec<(Record, &Record)> = fp16.iter().filter_map(|(i, f)| get(i, p).map(|r| (r, f))).collect();
        if recs.is_empty() {
            continue;
        }
        let mut kv = KvBytes::default();
        recs.iter().for_each(|(r, _)| kv.add(&r.kv));
        let n = recs.len() as f64;
        let (metric, score, agreement, acc_norm, acc_sum, ci95) = match &recs[0].0.outcome {
            Outcome::Mc { .. } => {
                let (mut tok, mut chr, mut sum, mut agree) = (0.0, 0.0, 0.0, 0.0);
                for (r, f) in &recs {
                    let (Some((t, c, s, label)), Some((ft, ..))) = (predictions(&r.outcome), predictions(&f.outcome))
                    else {
                        continue;
                    };
                    tok += (t == label) as u8 as f64;
                    chr += (c == label) as u8 as f64;
                    sum += (s == label) as u8 as f64;
                    agree += (t == ft) as u8 as f64;
                }
                let acc = tok / n;
                let ci = 1.96 * (acc * (1.0 - acc) / n).sqrt();
                ("accuracy", acc, Some(agree / n), Some(chr / n), Some(sum / n), Some(ci))
            }
            Outcome::Ppl { .. } => {
                let (mut nll, mut toks) = (0.0, 0u64);
                for (r, _) in &recs {
                    if let Outcome::Ppl { nll: a, tokens } = r.outcome {
                        nll += a;
                        toks += tokens;
                    }
                }
                ("perplexity", (nll / toks.max(1) as f64).exp(), None, None, None, None)
            }
            Outcome::Retrieval { .. } => {
                let ok =
                    recs.iter().filter(|(r, _)| matches!(r.outcome, Outcome::Retrieval { correct: true, .. })).count();
                let acc = ok as f64 / n;
                ("exact match", acc, None, None, None, Some(1.96 * (acc * (1.0 - acc) / n).sqrt()))
            }
        };
        let base = *fp16_score.get_or_insert(score);
        rows.push(Row {
            task: task.to_string(),
            policy: p.clone(),
            items: recs.len(),
            metric,
            score,
            delta_vs_fp16: score - base,
            agreement,
            acc_norm,
            acc_sum,
            ci95,
            real_ratio: kv.ratio(),
            paper_ratio: kv.paper_ratio(),
            k_bits: kv.k_bits(),
            v_bits: kv.v_bits(),
            requant_up: kv.up,
            requant_down: kv.down,
        });
    }
    rows
}

fn opt(x: Option<f64>, scale: f64, prec: usize) -> String {
    x.map_or("–".into(), |v| format!("{:.*}", prec, v * scale))
}

/// The Markdown tables, one per task.
pub fn markdown(rows: &[Row], header: &str) -> String {
    let mut s = String::from(header);
    let mut tasks: Vec<&str> = rows.iter().map(|r| r.task.as_str()).collect();
    tasks.dedup();
    for task in tasks {
        let rs: Vec<&Row> = rows.iter().filter(|r| r.task == task).collect();
        let metric = rs[0].metric;
        let _ = writeln!(s, "\n### {task} ({} items, {metric})\n", rs[0].items);
        let pct = metric != "perplexity";
        let _ = writeln!(
            s,
            "| policy | {metric} | Δ vs fp16 | agreement | acc_norm | acc (sum) | real ratio | paper-style ratio | K bits | V bits | re-quant up / down |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
        for r in rs {
            let (scale, prec) = if pct { (100.0, 1) } else { (1.0, 3) };
            let score = match r.ci95 {
                Some(ci) => format!("{:.1} ± {:.1}", r.score * 100.0, ci * 100.0),
                None => format!("{:.*}", prec, r.score * scale),
            };
            let delta = if pct {
                format!("{:+.1}", r.delta_vs_fp16 * 100.0)
            } else {
                format!("{:+.2}%", r.delta_vs_fp16 / (r.score - r.delta_vs_fp16) * 100.0)
            };
            let _ = writeln!(
                s,
                "| `{}` | {score} | {delta} | {} | {} | {} | {:.2}× | {:.2}× | {:.2} | {:.2} | {} / {} |",
                r.policy,
                opt(r.agreement, 1.0, 3),
                opt(r.acc_norm, 100.0, 1),
                opt(r.acc_sum, 100.0, 1),
                r.real_ratio,
                r.paper_ratio,
                r.k_bits,
                r.v_bits,
                r.requant_up,
                r.requant_down
            );
        }
    }
    s
}

/// The method family of a policy label (one plot series each).
pub fn family(policy: &str) -> &'static str {
    let p = policy.to_ascii_lowercase();
    if p.ends_with("+rot") {
        return if p.starts_with("uniform") {
            "uniform, rotated (+rot)"
        } else if p.starts_with("kivi") {
            "KIVI, rotated (+rot)"
        } else {
            "QAQ, rotated (+rot)"
        };
    }
    if p == "fp16" {
        "fp16"
    } else if p.starts_with("uniform-k") {
        "K-only uniform"
    } else if p.starts_with("uniform-v") {
        "V-only uniform"
    } else if p.starts_with("uniform") {
        "uniform (1% outliers)"
    } else if p.starts_with("kivi") {
        "KIVI"
    } else if p.starts_with("qaq-ref") {
        "QAQ (reference code)"
    } else if p.starts_with("qaq-tuned") {
        "qaq-tuned and variants"
    } else if matches!(p.parse::<qaq_kernels::KvPolicy>(), Ok(qaq_kernels::KvPolicy::Qaq(q)) if q.k_scale > 0.0) {
        "QAQ + key channel scaling"
    } else if p.starts_with("qaq") {
        let keys: Vec<&str> = p.split_once(':').map_or(vec![], |(_, r)| r.split(',').collect());
        let other: Vec<&&str> =
            keys.iter().filter(|k| !k.starts_with("sigma_s=") && !k.starts_with("sigma_x=")).collect();
        match other.as_slice() {
            [] => "QAQ (σ sweep)",
            [k] if **k == "bmin=1" => "QAQ bmin=1 (σ sweep)",
            _ => "QAQ ablations",
        }
    } else {
        "other"
    }
}

const COLORS: [(&str, &str); 14] = [
    ("fp16", "#000000"),
    ("uniform (1% outliers)", "#1f77b4"),
    ("K-only uniform", "#ff7f0e"),
    ("V-only uniform", "#9467bd"),
    ("KIVI", "#2ca02c"),
    ("QAQ (σ sweep)", "#d62728"),
    ("QAQ bmin=1 (σ sweep)", "#ff9896"),
    ("QAQ ablations", "#e377c2"),
    ("QAQ (reference code)", "#8c564b"),
    ("QAQ + key channel scaling", "#17becf"),
    ("qaq-tuned and variants", "#bcbd22"),
    ("uniform, rotated (+rot)", "#393b79"),
    ("KIVI, rotated (+rot)", "#637939"),
    ("QAQ, rotated (+rot)", "#843c39"),
];

fn color(f: &str) -> &'static str {
    COLORS.iter().find(|(n, _)| *n == f).map_or("#7f7f7f", |(_, c)| c)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The plot: one panel per task, x = real-bytes compression ratio, y = the
/// task's metric; points labelled, families joined in ratio order.
pub fn svg(rows: &[Row]) -> String {
    let mut tasks: Vec<&str> = rows.iter().map(|r| r.task.as_str()).collect();
    tasks.dedup();
    let (pw, ph, cols) = (460.0, 340.0, 2usize);
    let nrows = tasks.len().div_ceil(cols).max(1);
    let (w, h) = (pw * cols as f64, ph * nrows as f64 + 40.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"10\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (ti, task) in tasks.iter().enumerate() {
        let rs: Vec<&Row> = rows.iter().filter(|r| r.task == *task).collect();
        let (ox, oy) = ((ti % cols) as f64 * pw, (ti / cols) as f64 * ph);
        let (l, r, t, b) = (ox + 55.0, ox + pw - 15.0, oy + 30.0, oy + ph - 40.0);
        let xmax = rs.iter().map(|r| r.real_ratio).fold(1.0, f64::max).ceil() + 0.5;
        let (mut ymin, mut ymax) = rs.iter().fold((f64::MAX, f64::MIN), |(a, b), r| (a.min(r.score), b.max(r.score)));
        let pad = ((ymax - ymin) * 0.1).max(1e-3);
        ymin -= pad;
        ymax += pad;
        if rs[0].metric != "perplexity" {
            (ymin, ymax) = (ymin.max(0.0), ymax.min(1.0));
        }
        let px = |x: f64| l + (x - 1.0) / (xmax - 1.0) * (r - l);
        let py = |y: f64| b - (y - ymin) / (ymax - ymin) * (b - t);
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" font-size=\"13\" font-weight=\"bold\">{} ({} items, {})</text>",
            l,
            oy + 18.0,
            esc(task),
            rs[0].items,
            rs[0].metric
        );
        let _ = writeln!(
            s,
            "<rect x=\"{l}\" y=\"{t}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#999\"/>",
            r - l,
            b - t
        );
        for k in 0..=4 {
            let y = ymin + (ymax - ymin) * k as f64 / 4.0;
            let lab = if rs[0].metric == "perplexity" { format!("{y:.2}") } else { format!("{:.1}", y * 100.0) };
            let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{lab}</text>", l - 4.0, py(y) + 3.0);
        }
        let mut x = 1.0;
        while x <= xmax {
            let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x}×</text>", px(x), b + 13.0);
            x += if xmax > 12.0 { 2.0 } else { 1.0 };
        }
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">compression ratio (real bytes, fp16 = 1×)</text>",
            (l + r) / 2.0,
            b + 28.0
        );
        let mut fams: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
        for row in &rs {
            fams.entry(family(&row.policy)).or_default().push(row);
        }
        for (f, mut pts) in fams {
            pts.sort_by(|a, b| a.real_ratio.total_cmp(&b.real_ratio));
            let c = color(f);
            if pts.len() > 1 && f != "QAQ ablations" {
                let path: Vec<String> =
                    pts.iter().map(|p| format!("{:.1},{:.1}", px(p.real_ratio), py(p.score))).collect();
                let _ = writeln!(
                    s,
                    "<polyline points=\"{}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"1.2\"/>",
                    path.join(" ")
                );
            }
            for p in pts {
                let (x, y) = (px(p.real_ratio), py(p.score));
                let _ = writeln!(
                    s,
                    "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{c}\"><title>{}</title></circle>",
                    esc(&p.policy)
                );
                let short = p.policy.replace("sigma_s=", "σs=").replace("sigma_x=", "σx=");
                let _ = writeln!(
                    s,
                    "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"7\" fill=\"{c}\">{}</text>",
                    x + 4.0,
                    y - 3.0,
                    esc(&short)
                );
            }
        }
    }
    // Legend.
    let ly = h - 18.0;
    let mut lx = 10.0;
    for (f, c) in COLORS {
        let _ = writeln!(
            s,
            "<circle cx=\"{lx}\" cy=\"{}\" r=\"4\" fill=\"{c}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            ly,
            lx + 7.0,
            ly + 3.0,
            esc(f)
        );
        lx += 14.0 + 6.2 * f.chars().count() as f64;
    }
    s.push_str("</svg>\n");
    s
}

/// Writes `eval.json`, `eval.md` and `eval.svg` into `dir`.
pub fn write(dir: &Path, rows: &[Row], meta: &serde_json::Value, header: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let json = serde_json::json!({ "meta": meta, "rows": rows });
    std::fs::write(dir.join("eval.json"), serde_json::to_string_pretty(&json)?)?;
    std::fs::write(dir.join("eval.md"), markdown(rows, header))?;
    std::fs::write(dir.join("eval.svg"), svg(rows))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mc(sum_lp: Vec<f64>, label: usize, real: u64) -> Record {
        Record {
            task: "t".into(),
            item: String::new(),
            policy: String::new(),
            params: String::new(),
            outcome: Outcome::Mc { tokens: vec![1; sum_lp.len()], chars: vec![1; sum_lp.len()], sum_lp, label },
            kv: KvBytes {
                real,
                fp16: 400,
                k_groups: 1,
                k_width_sum: 16,
                v_groups: 1,
                v_width_sum: 16,
                ..Default::default()
            },
        }
    }

    #[test]
    fn aggregates_accuracy_agreement_and_ratio_over_common_items() {
        let items: Vec<String> = (0..4).map(|i| i.to_string()).collect();
        let pols = vec!["fp16".to_string(), "q".to_string()];
        let get = |item: &str, p: &str| -> Option<Record> {
            let i: usize = item.parse().unwrap();
            match p {
                // fp16 right on items 0, 1, 2; q right on 0 and 3; item 3 has no q result... no: all have.
                "fp16" => Some(mc(if i < 3 { vec![0.0, -1.0] } else { vec![-1.0, 0.0] }, 0, 400)),
                "q" if i == 2 => None,
                "q" => Some(mc(if i == 0 || i == 3 { vec![0.0, -1.0] } else { vec![-1.0, 0.0] }, 0, 100)),
                _ => None,
            }
        };
        let rows = aggregate("t", &items, &pols, get);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].items, rows[0].score), (4, 0.75));
        // q covers items 0, 1, 3: right on 0 and 3; agrees with fp16 on 0 only.
        assert_eq!(rows[1].items, 3);
        assert!((rows[1].score - 2.0 / 3.0).abs() < 1e-12);
        assert!((rows[1].agreement.unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(rows[1].real_ratio, 4.0);
        assert!((rows[1].delta_vs_fp16 - (2.0 / 3.0 - 0.75)).abs() < 1e-12);
        let md = markdown(&rows, "# r\n");
        assert!(md.contains("| `q` |") && md.contains("4.00×"), "{md}");
        let svg = svg(&rows);
        assert!(svg.starts_with("<svg") && svg.contains("<circle") && svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn families_split_the_policies() {
        assert_eq!(family("qaq:sigma_s=0.03,sigma_x=0.03"), "QAQ (σ sweep)");
        assert_eq!(family("qaq"), "QAQ (σ sweep)");
        assert_eq!(family("qaq:window=1"), "QAQ ablations");
        assert_eq!(family("qaq:sigma_s=0.001,sigma_x=0.03,bmin=1"), "QAQ bmin=1 (σ sweep)");
        assert_eq!(family("qaq:bmin=1,alpha=0"), "QAQ ablations");
        assert_eq!(family("qaq-tuned"), "qaq-tuned and variants");
        assert_eq!(family("uniform:4:noout+rot"), "uniform, rotated (+rot)");
        assert_eq!(family("qaq-tuned:alpha=0+rot"), "QAQ, rotated (+rot)");
        assert_eq!(family("kivi+rot"), "KIVI, rotated (+rot)");
        assert_eq!(family("qaq-tuned:kscale=0,ktmax=1024"), "qaq-tuned and variants");
        assert_eq!(family("qaq:sigma_s=0.001,kscale=0"), "QAQ ablations");
        assert_eq!(family("qaq:sigma_s=0.001,kscale=0.5"), "QAQ + key channel scaling");
        assert_eq!(family("uniform:4"), "uniform (1% outliers)");
        assert_eq!(family("uniform-k:2"), "K-only uniform");
        assert_eq!(family("kivi"), "KIVI");
    }
}

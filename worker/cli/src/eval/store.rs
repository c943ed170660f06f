//! Per-(task, item, policy) results, appended to a JSON-lines file as they
//! are measured, so an interrupted evaluation resumes where it stopped and a
//! larger `--limit` only measures the new items.
//!
//! A result is stored under its policy's label (`qaq-tuned`, `uniform:4`) together with
//! the parameters that label parsed to when it was measured ([`Record::params`]). A
//! preset whose parameters change later does not silently re-mean its stored rows: a
//! stored result counts for a label only if its parameters are the label's current ones
//! (results written before the parameters were recorded count as they are).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use qaq_worker::kv::{PolicyChoice, SeqCache};

/// What a cache really stored (summable over caches). Widths count raw fp16
/// groups as 16 bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KvBytes {
    /// Real bytes: codes, metadata, outlier values and indices, padding.
    pub real: u64,
    /// The same keys and values in fp16.
    pub fp16: u64,
    /// Paper-style bits (codes + 32-bit metadata + 16 bits per outlier).
    pub paper_bits: f64,
    pub k_groups: u64,
    pub k_width_sum: u64,
    pub v_groups: u64,
    pub v_width_sum: u64,
    /// Re-quantizations up (from the host backup) and down.
    pub up: u64,
    pub down: u64,
}

impl KvBytes {
    pub fn of(c: &SeqCache) -> Self {
        let s = c.stats();
        let n = s.counters;
        KvBytes {
            real: s.bytes_used() as u64,
            fp16: s.fp16_equivalent_bytes() as u64,
            paper_bits: s.k.paper_bits + s.v.paper_bits,
            k_groups: s.k.groups as u64,
            k_width_sum: s.k.width_sum as u64,
            v_groups: s.v.groups as u64,
            v_width_sum: s.v.width_sum as u64,
            up: n.k_up + n.v_up,
            down: n.k_down + n.v_down,
        }
    }
    pub fn add(&mut self, o: &KvBytes) {
        self.real += o.real;
        self.fp16 += o.fp16;
        self.paper_bits += o.paper_bits;
        self.k_groups += o.k_groups;
        self.k_width_sum += o.k_width_sum;
        self.v_groups += o.v_groups;
        self.v_width_sum += o.v_width_sum;
        self.up += o.up;
        self.down += o.down;
    }
    /// fp16 bytes / real bytes.
    pub fn ratio(&self) -> f64 {
        self.fp16 as f64 / self.real.max(1) as f64
    }
    /// fp16 bytes / paper-style bytes.
    pub fn paper_ratio(&self) -> f64 {
        self.fp16 as f64 * 8.0 / self.paper_bits.max(1.0)
    }
    pub fn k_bits(&self) -> f64 {
        self.k_width_sum as f64 / self.k_groups.max(1) as f64
    }
    pub fn v_bits(&self) -> f64 {
        self.v_width_sum as f64 / self.v_groups.max(1) as f64
    }
}

/// The measured outcome of one item under one policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// Multiple choice: per choice, the summed log-probability, its tokens and
    /// its characters; the gold label.
    Mc { sum_lp: Vec<f64>, tokens: Vec<u32>, chars: Vec<u32>, label: usize },
    /// Perplexity window: summed NLL over `tokens` predictions.
    Ppl { nll: f64, tokens: u64 },
    /// Retrieval: the generated text and whether it matched.
    Retrieval { correct: bool, output: String },
}

/// One line of the results file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// `hellaswag`, `piqa`, ..., `ppl@8192`, `kv@4096`.
    pub task: String,
    pub item: String,
    pub policy: String,
    /// The parameters `policy` parsed to when this was measured ([`params_of`]); empty
    /// in results written before they were recorded.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub params: String,
    pub outcome: Outcome,
    pub kv: KvBytes,
}

/// The parameters of a policy as stored with its results (the parsed policy's `Debug`
/// form: every field, so any change of a preset's meaning shows).
pub fn params_of(p: &PolicyChoice) -> String {
    format!("{:?}", p.policy)
}

/// The results file, loaded, and appended to.
pub struct Store {
    path: PathBuf,
    map: HashMap<(String, String, String), Record>,
    file: std::fs::File,
}

impl Store {
    /// Opens (creating if missing) `path` for measuring `policies`; a line that does
    /// not parse (an interrupted write) is ignored with a warning, and so is a result
    /// of one of `policies`' labels measured under other parameters (it is measured
    /// again).
    pub fn open(path: &Path, policies: &[PolicyChoice]) -> anyhow::Result<Self> {
        let current: HashMap<&str, String> = policies.iter().map(|p| (p.label.as_str(), params_of(p))).collect();
        let mut stale: HashMap<String, usize> = HashMap::new();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        }
        let mut map = HashMap::new();
        if path.exists() {
            let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                match serde_json::from_str::<Record>(line) {
                    Ok(r) if !r.params.is_empty() && current.get(r.policy.as_str()).is_some_and(|c| *c != r.params) => {
                        *stale.entry(r.policy).or_default() += 1;
                    }
                    Ok(r) => {
                        map.insert((r.task.clone(), r.item.clone(), r.policy.clone()), r);
                    }
                    Err(e) => tracing::warn!("{}:{}: skipped unreadable result ({e})", path.display(), i + 1),
                }
            }
        }
        for (label, n) in stale {
            tracing::warn!(
                "{}: {n} results of {label:?} were measured under other parameters than {label:?} has now; \
                 ignored (relabel them to keep them)",
                path.display()
            );
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        // An interrupted write leaves a line without its newline: end it.
        let len = file.metadata()?.len();
        if len > 0 && std::fs::read(path)?.last() != Some(&b'\n') {
            writeln!(file)?;
        }
        Ok(Self { path: path.to_path_buf(), map, file })
    }

    pub fn get(&self, task: &str, item: &str, policy: &str) -> Option<&Record> {
        self.map.get(&(task.to_string(), item.to_string(), policy.to_string()))
    }

    /// Policies (of `policies`) with no result yet for this item.
    pub fn missing<'a>(&self, task: &str, item: &str, policies: &'a [String]) -> Vec<&'a String> {
        policies.iter().filter(|p| self.get(task, item, p).is_none()).collect()
    }

    /// Appends and flushes one record.
    pub fn put(&mut self, r: Record) -> anyhow::Result<()> {
        let line = serde_json::to_string(&r)?;
        writeln!(self.file, "{line}").map_err(|e| anyhow::anyhow!("{}: {e}", self.path.display()))?;
        self.file.flush()?;
        self.map.insert((r.task.clone(), r.item.clone(), r.policy.clone()), r);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_reopen_and_bad_lines_are_skipped() {
        let dir = std::env::temp_dir().join(format!("qaq-eval-store-{}", std::process::id()));
        let path = dir.join("r.jsonl");
        let _ = std::fs::remove_file(&path);
        let qaq = PolicyChoice::parse("qaq").unwrap();
        let rec = Record {
            task: "piqa".into(),
            item: "7".into(),
            policy: "qaq".into(),
            params: params_of(&qaq),
            outcome: Outcome::Mc { sum_lp: vec![-1.5, -2.0], tokens: vec![3, 4], chars: vec![10, 12], label: 0 },
            kv: KvBytes { real: 10, fp16: 40, ..Default::default() },
        };
        {
            let mut s = Store::open(&path, std::slice::from_ref(&qaq)).unwrap();
            assert!(s.get("piqa", "7", "qaq").is_none());
            s.put(rec.clone()).unwrap();
        }
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"task\": trunc").unwrap();
        let mut s = Store::open(&path, std::slice::from_ref(&qaq)).unwrap();
        assert_eq!(s.get("piqa", "7", "qaq"), Some(&rec));
        let other = Record { item: "8".into(), ..rec.clone() };
        s.put(other.clone()).unwrap();
        drop(s);
        let s = Store::open(&path, &[]).unwrap();
        assert_eq!(s.get("piqa", "8", "qaq"), Some(&other));
        let pols = vec!["qaq".to_string(), "fp16".to_string()];
        assert_eq!(s.missing("piqa", "7", &pols), vec![&pols[1]]);
        assert_eq!(rec.kv.ratio(), 4.0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn results_of_a_label_whose_parameters_changed_are_measured_again() {
        let dir = std::env::temp_dir().join(format!("qaq-eval-store-params-{}", std::process::id()));
        let path = dir.join("r.jsonl");
        let _ = std::fs::remove_file(&path);
        let old = PolicyChoice::parse("qaq:sigma_s=0.01").unwrap();
        let rec = |item: &str, params: String| Record {
            task: "piqa".into(),
            item: item.into(),
            policy: "preset".into(),
            params,
            outcome: Outcome::Ppl { nll: 1.0, tokens: 1 },
            kv: KvBytes::default(),
        };
        {
            let mut s = Store::open(&path, &[]).unwrap();
            s.put(rec("1", params_of(&old))).unwrap();
            s.put(rec("2", String::new())).unwrap();
        }
        // "preset" now means other parameters: its measured row no longer counts, the
        // legacy row without parameters still does.
        let now = PolicyChoice { label: "preset".into(), ..PolicyChoice::parse("qaq:sigma_s=0.02").unwrap() };
        let s = Store::open(&path, std::slice::from_ref(&now)).unwrap();
        assert!(s.get("piqa", "1", "preset").is_none());
        assert!(s.get("piqa", "2", "preset").is_some());
        let same = PolicyChoice { label: "preset".into(), ..old };
        assert!(Store::open(&path, &[same]).unwrap().get("piqa", "1", "preset").is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

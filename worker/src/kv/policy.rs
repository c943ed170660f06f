//! KV policies as a request or the worker's flags name them: the parsed policy with its
//! label, the QAQ overrides of flags and requests, and the byte figures the engine's
//! budgets are planned with (worst case per fed token, host backup per token).

use std::str::FromStr;

use qaq_kernels::{CacheConfig, KvPolicy, cache};

use crate::model::KvShape;

/// A KV policy with the label it is reported under.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyChoice {
    pub policy: KvPolicy,
    /// The `--kv-policy` string it came from (with overrides applied).
    pub label: String,
}

impl PolicyChoice {
    /// Parses a `--kv-policy` string; the error lists the accepted forms.
    pub fn parse(s: &str) -> Result<Self, String> {
        KvPolicy::from_str(s).map(|policy| Self { policy, label: s.trim().to_string() }).map_err(|e| e.to_string())
    }

    /// Whether the policy keeps fp16 backups in the host tier (QAQ does).
    pub fn uses_host_backups(&self) -> bool {
        matches!(self.policy, KvPolicy::Qaq(_))
    }
}

/// Overrides of the QAQ hyper-parameters (flags or a request's `kv_policy`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QaqOverrides {
    pub sigma_s: Option<f64>,
    pub sigma_x: Option<f64>,
    pub outlier_ratio: Option<f64>,
    pub window: Option<usize>,
    pub min_bits: Option<u8>,
    pub max_bits: Option<u8>,
    pub every: Option<u32>,
}

impl QaqOverrides {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Applies the overrides; `what` prefixes error messages (a flag or field family).
    pub fn apply(&self, choice: PolicyChoice, what: &str) -> Result<PolicyChoice, String> {
        if self.is_empty() {
            return Ok(choice);
        }
        let KvPolicy::Qaq(mut p) = choice.policy else {
            return Err(format!(
                "{what}: sigma/outlier/window/bits settings apply to the qaq policy only, not {:?}",
                choice.label
            ));
        };
        let mut label = choice.label;
        let mut note = |k: &str, v: String| {
            label.push_str(if label.contains(':') { "," } else { ":" });
            label.push_str(&format!("{k}={v}"));
        };
        if let Some(v) = self.sigma_s {
            p.sigma_s = v;
            note("sigma_s", v.to_string());
        }
        if let Some(v) = self.sigma_x {
            p.sigma_x = v;
            note("sigma_x", v.to_string());
        }
        if let Some(v) = self.outlier_ratio {
            p.quant.outliers.alpha = v;
            note("alpha", v.to_string());
        }
        if let Some(v) = self.window {
            p.window = v;
            note("window", v.to_string());
        }
        if let Some(v) = self.min_bits {
            p.b_min = v;
            note("bmin", v.to_string());
        }
        if let Some(v) = self.max_bits {
            p.b_max = v;
            note("bmax", v.to_string());
        }
        if let Some(v) = self.every {
            p.every = v;
            note("every", v.to_string());
        }
        p.validate().map_err(|e| format!("{what}: {e}"))?;
        Ok(PolicyChoice { policy: KvPolicy::Qaq(p), label })
    }
}

/// Cache configuration of a model shape.
pub fn cache_config(shape: &KvShape) -> CacheConfig {
    CacheConfig {
        n_layers: shape.n_layers,
        n_kv_heads: shape.n_kv_heads,
        n_q_heads: shape.n_heads,
        head_dim: shape.head_dim,
    }
}

/// Device-tier bytes per token right after append (new tokens are stored at
/// the policy's widest setting), measured on the real implementation: the
/// worst case the budget planner reserves for tokens fed in a step.
pub fn worst_bytes_per_token(shape: &KvShape, policy: &KvPolicy) -> Result<usize, String> {
    const PROBE: usize = 64;
    let mut c = cache::new_cache(cache_config(shape), *policy).map_err(|e| e.to_string())?;
    let row = shape.kv_width();
    // Deterministic, varied values (ranges and outliers like real keys).
    let rows: Vec<f32> = (0..PROBE * row).map(|i| ((i * 7919 % 1000) as f32 / 100.0 - 5.0).sin() * 3.0).collect();
    for layer in 0..shape.n_layers {
        c.append(layer, &rows, &rows).map_err(|e| e.to_string())?;
    }
    Ok(c.bytes_used().div_ceil(PROBE))
}

/// Backup bytes per token in the host tier (fp16 K and V rows, all layers).
pub fn backup_bytes_per_token(shape: &KvShape) -> usize {
    2 * 2 * shape.n_layers * shape.kv_width()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: KvShape = KvShape { n_layers: 2, n_heads: 4, n_kv_heads: 2, head_dim: 64 };

    #[test]
    fn parses_policies_and_applies_overrides() {
        assert!(PolicyChoice::parse("qaq").unwrap().uses_host_backups());
        assert!(!PolicyChoice::parse("fp16").unwrap().uses_host_backups());
        let e = PolicyChoice::parse("bogus").unwrap_err();
        assert!(e.contains("uniform:N"), "{e}");
        let o = QaqOverrides { sigma_x: Some(0.5), max_bits: Some(4), ..Default::default() };
        let c = o.apply(PolicyChoice::parse("qaq").unwrap(), "kv_policy").unwrap();
        assert_eq!(c.label, "qaq:sigma_x=0.5,bmax=4");
        let KvPolicy::Qaq(p) = c.policy else { panic!() };
        assert_eq!((p.sigma_x, p.b_max), (0.5, 4));
        let e = o.apply(PolicyChoice::parse("fp16").unwrap(), "kv_policy").unwrap_err();
        assert!(e.contains("qaq policy only"), "{e}");
        let bad = QaqOverrides { min_bits: Some(6), max_bits: Some(2), ..Default::default() };
        assert!(bad.apply(PolicyChoice::parse("qaq").unwrap(), "kv_policy").is_err());
    }

    #[test]
    fn worst_case_bytes_per_token_order_the_policies() {
        let fp16 = worst_bytes_per_token(&SHAPE, &PolicyChoice::parse("fp16").unwrap().policy).unwrap();
        let u4 = worst_bytes_per_token(&SHAPE, &PolicyChoice::parse("uniform:4").unwrap().policy).unwrap();
        let qaq = worst_bytes_per_token(&SHAPE, &PolicyChoice::parse("qaq").unwrap().policy).unwrap();
        // fp16: 2 layers x 2 heads x 64 values x 2 (K, V) x 2 bytes.
        assert!(fp16 >= 1024, "{fp16}");
        assert!(u4 < fp16 / 2, "{u4} vs {fp16}");
        // New QAQ tokens sit at b_max = 8 bits until re-quantized.
        assert!(qaq > u4 && qaq < fp16, "{qaq}");
        assert_eq!(backup_bytes_per_token(&SHAPE), 1024);
    }
}

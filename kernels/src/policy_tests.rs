//! Unit tests of `policy` (kept beside it, in their own file for size).
use super::*;

#[test]
fn ceil_log2_is_bit_exact_with_libm() {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let check = |v: f64| {
        let (a, b) = (ceil_log2(v), v.log2().ceil());
        assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{v:e}: {a} vs {b}");
    };
    for e in -1074..=1023 {
        let p = 2f64.powi(e);
        for v in [p, p * (1.0 + 1e-12), p * (1.0 - 1e-12), p * (1.0 + 2e-12), p * (1.0 - 2e-12), -p] {
            check(v);
            check(f64::from_bits(v.to_bits() + 1));
            check(f64::from_bits(v.to_bits().saturating_sub(1)));
        }
    }
    for _ in 0..200_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        check(f64::from_bits(x));
        check((x >> 11) as f64 / (1u64 << 40) as f64);
    }
    for v in [0.0, -0.0, f64::INFINITY, f64::NEG_INFINITY, f64::NAN, f64::MIN_POSITIVE, f64::MAX] {
        check(v);
    }
}

/// [`bits_near`] from the products the caches use agrees with [`bits`] wherever it
/// answers: random and adversarial (near powers of two) ranges, attentions and
/// steps, both formulas, every clamp; and it answers almost everywhere.
#[test]
fn bits_near_is_bits_without_the_division() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut answered, mut total) = (0u64, 0u64);
    for i in 0..400_000 {
        let u = |v: u64| (v >> 11) as f64 / (1u64 << 53) as f64;
        let (r, a, num) = ((u(next()) * 40.0) as f32, u(next()) as f32, 1e-4 + u(next()) * 0.5);
        // Every fourth case: an attention that puts `r * a / num` on a power of two,
        // give or take an ulp.
        let a = if i % 4 == 0 && r > 0.0 {
            let target = 2f64.powi((next() % 20) as i32 - 6);
            let a0 = (target * num / r as f64) as f32;
            f32::from_bits((a0.to_bits() as i64 + (next() % 3) as i64 - 1) as u32)
        } else {
            a
        };
        let (r, a) = (r as f64, a as f64);
        for formula in [BitFormula::Paper, BitFormula::Reference] {
            for (b_min, b_max) in [(0, 8), (1, 8), (2, 4)] {
                total += 1;
                let exact = bits(r, value_step_from(num, 1, a), formula, b_min, b_max);
                if let Some(b) = bits_near(r * a * (1.0 / num), formula, b_min, b_max) {
                    answered += 1;
                    assert_eq!(b, exact, "r {r} a {a} num {num} {formula:?}");
                }
                let ek = 0.05 + u(next());
                if let Some(b) = bits_near(r * (1.0 / ek), formula, b_min, b_max) {
                    assert_eq!(b, bits(r, ek, formula, b_min, b_max), "r {r} e {ek} {formula:?}");
                }
            }
        }
    }
    assert!(answered as f64 > 0.7 * total as f64, "{answered} of {total}");
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 5e-5
}

#[test]
fn section_11_key_vectors() {
    // (T, eps, E_K, B(r=4), B(r=8)) with the reference formula and q_norm = 300.
    let rows = [
        (2usize, 1.0, 0.2965, 3, 4),
        (10, 1.0, 0.4345, 3, 4),
        (100, 1.0, 0.6073, 3, 3),
        (100, 3.0, 0.6758, 2, 3),
        (100, 30.0, 0.8006, 2, 3),
        (500, 10.0, 0.8255, 2, 3),
    ];
    for (t, eps, e, b4, b8) in rows {
        let ek = key_step(t, 300.0, eps);
        assert!(close(ek, e), "T {t} eps {eps}: {ek}");
        assert_eq!(raw_bits(4.0, ek, BitFormula::Reference), b4, "T {t} eps {eps} r 4");
        assert_eq!(raw_bits(8.0, ek, BitFormula::Reference), b8, "T {t} eps {eps} r 8");
    }
    assert!((4.0 / (2.0 * key_step(100, 300.0, 1.0)) + 1.0).log2() - 2.102 < 1e-3);
    assert!(key_step(1, 300.0, 1.0).is_infinite());
}

#[test]
fn section_11_value_vectors() {
    let rows = [(100usize, 1.0, 1.0, 0.3464, 2, 3), (100, 1.0, 0.5, 0.6928, 1, 2), (100, 1.0, 0.01, 34.64, 1, 1)];
    for (t, eps, a, e, b1, b4) in rows {
        let ev = value_step(t, a, eps);
        assert!((ev - e).abs() < 5e-3, "{ev}");
        assert_eq!(raw_bits(1.0, ev, BitFormula::Reference), b1);
        assert_eq!(raw_bits(4.0, ev, BitFormula::Reference), b4);
    }
}

#[test]
fn paper_formula_and_clamp() {
    // Paper: ceil(log2(r/E)); r/E = 4/0.3464 = 11.5 -> 4 bits; reference gives 3.
    let e = value_step(100, 1.0, 1.0);
    assert_eq!(raw_bits(4.0, e, BitFormula::Paper), 4);
    assert_eq!(bits(4.0, e, BitFormula::Paper, 0, 3), 3);
    assert_eq!(bits(0.0, e, BitFormula::Paper, 1, 8), 1, "r = 0 -> b_min");
    assert_eq!(bits(1.0, value_step(100, 0.0, 1.0), BitFormula::Paper, 0, 8), 0, "a = 0");
    assert_eq!(bits(f64::NAN, 1.0, BitFormula::Reference, 2, 8), 2);
    assert_eq!(bits(1e30, 1e-30, BitFormula::Paper, 0, 8), 8);
    // Paper vs reference: more attention -> more value bits.
    assert!(
        raw_bits(2.0, value_step(1000, 0.5, 0.01), BitFormula::Paper)
            > raw_bits(2.0, value_step(1000, 0.01, 0.01), BitFormula::Paper)
    );
}

#[test]
fn qnorm_percentile() {
    let mut q = QNormTracker::default();
    assert_eq!(q.percentile(0.9), None);
    for i in 1..=1000 {
        q.observe(i as f64);
    }
    q.observe(f64::NAN);
    assert_eq!(q.count(), 1000);
    let p = q.percentile(0.9).unwrap();
    assert!((900.0..=900.0 * 1.045).contains(&p), "{p}");
}

#[test]
fn windows_ring() {
    let mut w = Windows::new(3);
    w.grow(2);
    w.push(0, 0.5);
    w.push(0, 0.1);
    assert!(!w.full(0));
    w.push(0, 0.2);
    assert!(w.full(0));
    assert_eq!(w.max(0), 0.5);
    w.push(0, 0.05); // evicts 0.5
    assert_eq!(w.max(0), 0.2);
    assert_eq!(w.max(1), 0.0);
}

#[test]
fn rotation_is_a_suffix_of_every_quantizing_policy() {
    for base in ["uniform:3", "uniform-k:4", "kivi", "kivi:16:64:2", "qaq", "qaq-tuned:sinks=2", "qaq-ref"] {
        let plain = base.parse::<KvPolicy>().unwrap();
        let rot = format!("{base}+rot").parse::<KvPolicy>().unwrap();
        assert!(!plain.rotated() && rot.rotated(), "{base}");
        assert_eq!(rot, plain.with_rotation(), "{base}");
        assert_ne!(format!("{plain:?}"), format!("{rot:?}"), "snapshots tell them apart");
    }
    let e = "fp16+rot".parse::<KvPolicy>().unwrap_err().to_string();
    assert!(e.contains("fp16 quantizes nothing"), "{e}");
    assert!("uniform:3+rot+rot".parse::<KvPolicy>().is_err());
    assert!("uniform:3 +rot".parse::<KvPolicy>().is_err());
}

#[test]
fn policy_strings() {
    assert_eq!("fp16".parse::<KvPolicy>().unwrap(), KvPolicy::Fp16);
    assert_eq!(
        "uniform:4".parse::<KvPolicy>().unwrap(),
        KvPolicy::Uniform(UniformSpec { k_bits: Some(4), v_bits: Some(4), outliers: true, ..Default::default() })
    );
    assert!(matches!(
        "uniform:2:noout".parse::<KvPolicy>().unwrap(),
        KvPolicy::Uniform(UniformSpec { outliers: false, .. })
    ));
    assert!(matches!("uniform-k:2".parse::<KvPolicy>().unwrap(), KvPolicy::Uniform(UniformSpec { v_bits: None, .. })));
    assert_eq!(
        "uniform:4/3:noout+rot".parse::<KvPolicy>().unwrap(),
        KvPolicy::Uniform(UniformSpec {
            k_bits: Some(4),
            v_bits: Some(3),
            outliers: false,
            rotate: true,
            ..Default::default()
        })
    );
    assert_eq!(
        "uniform:4/3:sinks=4:noout:recent=64+rot".parse::<KvPolicy>().unwrap(),
        KvPolicy::Uniform(UniformSpec {
            k_bits: Some(4),
            v_bits: Some(3),
            outliers: false,
            rotate: true,
            recent: 64,
            sinks: 4
        })
    );
    for bad in [
        "uniform:4:recent",
        "uniform:4:recent=-1",
        "uniform:4:recent=2000000",
        "uniform:4:noout:foo",
        "uniform:4:sink=4",
    ] {
        let e = bad.parse::<KvPolicy>().unwrap_err().to_string();
        assert!(
            e.contains(bad) && (e.contains("recent=N") || e.contains("at most") || e.contains("integer")),
            "{bad}: {e}"
        );
    }
    // Without the fp16 windows the Debug form (which stored results and snapshots match
    // on) is the one it was before they existed.
    assert_eq!(
        format!("{:?}", "uniform:4/3:noout+rot".parse::<KvPolicy>().unwrap()),
        "Uniform(UniformSpec { k_bits: Some(4), v_bits: Some(3), outliers: false, rotate: true })"
    );
    assert!(format!("{:?}", "uniform:4:recent=8".parse::<KvPolicy>().unwrap()).contains("recent: 8, sinks: 0"));
    assert!("uniform:4/9".parse::<KvPolicy>().is_err() && "uniform:/3".parse::<KvPolicy>().is_err());
    assert_eq!("kivi".parse::<KvPolicy>().unwrap(), KvPolicy::Kivi(KiviSpec::default()));
    assert_eq!(
        "kivi:16:64".parse::<KvPolicy>().unwrap(),
        KvPolicy::Kivi(KiviSpec { bits: 2, group: 16, residual: 64, rotate: false })
    );
    let KvPolicy::Qaq(p) = "qaq:sigma_x=0.5,formula=code,qnorm=p95,bmax=4".parse::<KvPolicy>().unwrap() else {
        panic!("not qaq")
    };
    assert_eq!((p.sigma_x, p.formula, p.qnorm, p.b_max), (0.5, BitFormula::Reference, QNorm::Percentile(0.95), 4));
    assert_eq!("qaq".parse::<KvPolicy>().unwrap(), KvPolicy::Qaq(QaqParams::default()));
    assert_eq!("qaq-tuned".parse::<KvPolicy>().unwrap(), KvPolicy::Qaq(QaqParams::tuned()));
    assert_eq!(
        "qaq-tuned".parse::<KvPolicy>().unwrap(),
        "qaq:sigma_s=0.001,sigma_x=0.03,bmin=1,kscale=1,kt=512,ktmax=2048,kwin=0".parse::<KvPolicy>().unwrap()
    );
    let KvPolicy::Qaq(t) = "qaq-tuned:sinks=2".parse::<KvPolicy>().unwrap() else { panic!("not qaq") };
    assert_eq!((t.sinks, t.k_scale), (2, 1.0));
    let KvPolicy::Qaq(p) = "qaq:kscale=0.5,sinks=4,valpha=0,kt=512".parse::<KvPolicy>().unwrap() else {
        panic!("not qaq")
    };
    assert_eq!((p.k_scale, p.sinks, p.v_alpha, p.k_t), (0.5, 4, Some(0.0), 512));
    assert_eq!(p.value_quant().outliers.alpha, 0.0);
    assert_eq!(p.quant.outliers.alpha, 0.01);
    let q = 0.7;
    assert_eq!(p.key_step_for(1000, q), key_step(1000, q, p.sigma_s), "above the floor: the paper's bound");
    assert_eq!(p.key_step_for(100, q), key_step(512, q, p.sigma_s), "below it: the bound at T = kt");
    assert!(p.key_step_for(1, q).is_infinite());
    let KvPolicy::Qaq(c) = "qaq-tuned:ktmax=2048".parse::<KvPolicy>().unwrap() else { panic!("not qaq") };
    assert_eq!(c.key_step_for(8192, q), key_step(2048, q, c.sigma_s), "above the ceiling: the bound at T = ktmax");
    assert_eq!(c.key_step_for(1000, q), key_step(1000, q, c.sigma_s));
    assert_eq!(c.key_step_for(100, q), key_step(512, q, c.sigma_s));
    assert!(p.k_window);
    assert_eq!(
        "qaq-tuned:kwin=1,ktmax=0".parse::<KvPolicy>().unwrap(),
        "qaq:sigma_s=0.001,sigma_x=0.03,bmin=1,kscale=1,kt=512".parse::<KvPolicy>().unwrap(),
        "stop 11's qaq-tuned (the label of its stored results)"
    );
    assert_eq!(
        "qaq-tuned:ktmax=1024".parse::<KvPolicy>().unwrap(),
        "qaq:sigma_s=0.001,sigma_x=0.03,bmin=1,kscale=1,kt=512,ktmax=1024,kwin=0".parse::<KvPolicy>().unwrap(),
        "stop 12's qaq-tuned (the label of its stored results)"
    );
    let KvPolicy::Qaq(p) = "qaq:kwin=0".parse::<KvPolicy>().unwrap() else { panic!("not qaq") };
    assert!(!p.k_window);
    for bad in [
        "qaq:kscale=2",
        "qaq:kscale=-1",
        "qaq:valpha=0.6",
        "qaq:kt=1",
        "qaq:sinks=x",
        "qaq:kwin=2",
        "qaq-tuned:ktmax=100",
    ] {
        assert!(bad.parse::<KvPolicy>().is_err(), "{bad}");
    }
    for bad in ["", "uniform:9", "uniform", "qaq:bmin=5,bmax=3", "qaq:foo=1", "kivi:0:1", "int8"] {
        let e = bad.parse::<KvPolicy>().unwrap_err();
        assert!(e.to_string().contains("uniform:N"), "{bad}: {e}");
    }
}

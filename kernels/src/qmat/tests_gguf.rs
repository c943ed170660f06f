//! Real weights: tensors of the default model's GGUF (`models/`, or the file named by
//! `QAQ_TEST_GGUF`; skipped when absent), read by a minimal GGUF parser, multiplied
//! against the f64 reference and checked for batch independence. The ignored
//! `dump_for_an_independent_dequantizer` writes tensors and their dequantization for
//! `scripts/check-qmat-dequant.py` (Python `gguf`), an independent check of the block
//! layouts.

use super::tests::check_against_f64;
use super::*;
use crate::testutil::{Rng, activations};
use std::path::PathBuf;

/// One tensor of a GGUF file.
pub(crate) struct Tensor {
    pub(crate) name: String,
    pub(crate) dims: Vec<u64>,
    pub(crate) ty: u32,
    /// Absolute offset of its bytes in the file.
    pub(crate) start: usize,
}

struct Reader<'a> {
    b: &'a [u8],
    p: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.b[self.p..self.p + n];
        self.p += n;
        s
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn string(&mut self) -> String {
        let n = self.u64() as usize;
        String::from_utf8_lossy(self.take(n)).into_owned()
    }
    /// Skips a metadata value of type `t`; returns it when it is a u32.
    fn value(&mut self, t: u32) -> Option<u32> {
        match t {
            0 | 1 | 7 => drop(self.take(1)),
            2 | 3 => drop(self.take(2)),
            4 | 5 => return Some(self.u32()),
            6 => drop(self.take(4)),
            8 => drop(self.string()),
            9 => {
                let (et, n) = (self.u32(), self.u64());
                for _ in 0..n {
                    self.value(et);
                }
            }
            10..=12 => drop(self.take(8)),
            _ => panic!("unknown GGUF metadata type {t}"),
        }
        None
    }
}

/// The tensors of a GGUF file (version 2 or 3).
pub(crate) fn parse(b: &[u8]) -> Vec<Tensor> {
    let mut r = Reader { b, p: 0 };
    assert_eq!(r.take(4), b"GGUF");
    let version = r.u32();
    assert!(version >= 2, "GGUF version {version}");
    let (nt, nkv) = (r.u64(), r.u64());
    let mut align = 32u64;
    for _ in 0..nkv {
        let key = r.string();
        let t = r.u32();
        if let Some(v) = r.value(t)
            && key == "general.alignment"
        {
            align = v as u64;
        }
    }
    let infos: Vec<(String, Vec<u64>, u32, u64)> = (0..nt)
        .map(|_| {
            let name = r.string();
            let nd = r.u32();
            let dims = (0..nd).map(|_| r.u64()).collect();
            (name, dims, r.u32(), r.u64())
        })
        .collect();
    let data = (r.p as u64).div_ceil(align) * align;
    infos.into_iter().map(|(name, dims, ty, off)| Tensor { name, dims, ty, start: (data + off) as usize }).collect()
}

/// The model file, if present.
pub(crate) fn model_file() -> Option<Vec<u8>> {
    let path = std::env::var_os("QAQ_TEST_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    match std::fs::read(&path) {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!("skipping the real-GGUF checks: {}: {e}", path.display());
            None
        }
    }
}

/// The first `max_rows` rows of tensor `t` as a [`QMatrix`].
pub(crate) fn matrix(file: &[u8], t: &Tensor, max_rows: usize) -> Result<QMatrix> {
    let f = QFormat::from_ggml_type(t.ty)?;
    let cols = t.dims[0] as usize;
    let rows = (t.dims[1..].iter().product::<u64>() as usize).min(max_rows);
    let n = rows * f.row_bytes(cols)?;
    QMatrix::new(f, rows, cols, file[t.start..t.start + n].to_vec())
}

#[test]
fn real_tensors_multiply_within_bounds_and_batch_independently() {
    let Some(file) = model_file() else { return };
    let tensors = parse(&file);
    let mut rng = Rng(12);
    let names = [
        "token_embd.weight",
        "blk.0.attn_q.weight",
        "blk.0.attn_k.weight",
        "blk.7.ffn_down.weight",
        "blk.29.ffn_up.weight",
    ];
    for name in names {
        let t = tensors.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("{name} missing"));
        let w = matrix(&file, t, 640).unwrap();
        let k = w.cols();
        let m = 5;
        let x = activations(m * k, &mut rng);
        let mut out = vec![f32::NAN; m * w.rows()];
        linear(&w, &x, m, &mut out).unwrap();
        check_against_f64(&w, &x, m, &out);
        for i in 0..m {
            let mut one = vec![0f32; w.rows()];
            linear(&w, &x[i * k..][..k], 1, &mut one).unwrap();
            assert_eq!(one, out[i * w.rows()..][..w.rows()], "{name} row {i}");
        }
        let all = w.dequantize();
        assert!(all.iter().all(|v| v.is_finite()), "{name}");
    }
}

#[test]
fn the_default_model_has_the_expected_formats() {
    let Some(file) = model_file() else { return };
    let tensors = parse(&file);
    let embd = tensors.iter().find(|t| t.name == "token_embd.weight").unwrap();
    assert_eq!((QFormat::from_ggml_type(embd.ty).unwrap(), embd.dims.clone()), (QFormat::Q8_0, vec![576, 49152]));
    let q41 = tensors.iter().filter(|t| t.ty == QFormat::Q4_1.ggml_type()).count();
    assert_eq!(q41, 210);
    assert!(tensors.iter().all(|t| QFormat::from_ggml_type(t.ty).is_ok()));
}

/// Writes, into `QAQ_QMAT_DUMP` (a directory), tensors as raw GGUF bytes with their
/// dequantization (raw f32), for `scripts/check-qmat-dequant.py`: rows of the model's
/// tensors, and every quantized format written by the reference quantizers.
#[test]
#[ignore = "writes files for a one-off comparison with Python's gguf package"]
fn dump_for_an_independent_dequantizer() {
    let dir = PathBuf::from(std::env::var_os("QAQ_QMAT_DUMP").expect("set QAQ_QMAT_DUMP to a directory"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut mats: Vec<(String, QMatrix)> = Vec::new();
    if let Some(file) = model_file() {
        let tensors = parse(&file);
        for name in ["token_embd.weight", "blk.0.attn_q.weight", "blk.12.ffn_down.weight"] {
            let t = tensors.iter().find(|t| t.name == name).unwrap();
            mats.push((name.to_string(), matrix(&file, t, 256).unwrap()));
        }
    }
    let mut rng = Rng(13);
    for f in QFormat::ALL {
        let v: Vec<f32> = (0..8 * 512).map(|_| rng.f()).collect();
        mats.push((format!("ref.{}", f.name()), QMatrix::from_f32(f, 8, 512, &v).unwrap()));
        let raw = crate::testutil::random_blocks(f, 8, 512, &mut rng);
        mats.push((format!("random.{}", f.name()), QMatrix::new(f, 8, 512, raw).unwrap()));
    }
    let mut index = String::new();
    for (name, w) in &mats {
        std::fs::write(dir.join(format!("{name}.bin")), w.data()).unwrap();
        let deq: Vec<u8> = w.dequantize().iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(dir.join(format!("{name}.f32")), deq).unwrap();
        index.push_str(&format!("{name} {} {} {}\n", w.format().ggml_type(), w.rows(), w.cols()));
    }
    std::fs::write(dir.join("index.txt"), index).unwrap();
}

//! The CUDA C sources, embedded at build time, and their run-time compilation to PTX
//! with NVRTC (dynamically loaded by cudarc: `libnvrtc.so.12` must be on the loader's
//! path, e.g. through `LD_LIBRARY_PATH`; `make test` installs it, see
//! `scripts/install-nvrtc.sh`).

use crate::error::{KernelError, Result};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

/// Text prepended to every module: typedefs, f16 conversions, the packed-stream reader.
pub const COMMON: &str = include_str!("common.cuh");

/// One CUDA C module and the kernels (`extern "C"` entry points) it defines.
#[derive(Clone, Copy, Debug)]
pub struct KernelModule {
    /// Module name (also the NVRTC program name).
    pub name: &'static str,
    /// The `.cu` text, without [`COMMON`].
    pub source: &'static str,
    /// Entry points the host loads from it.
    pub kernels: &'static [&'static str],
}

/// Quantize + pack, dequantize, the metadata writes of a cache mirror.
pub const QUANT: KernelModule = KernelModule {
    name: "qaq_quant.cu",
    source: include_str!("quant.cu"),
    kernels: &["qaq_quantize", "qaq_dequantize", "qaq_kv_scatter"],
};

/// Decode-step attention over packed (or dense f16) K/V of one KV head.
pub const ATTENTION: KernelModule = KernelModule {
    name: "qaq_attention.cu",
    source: include_str!("attention.cu"),
    kernels: &["qaq_attn_split_packed", "qaq_attn_split_f16", "qaq_attn_combine", "qaq_attn_probs"],
};

/// RMSNorm, RoPE, SiLU gating, embedding gather, softmax and argmax, f16 casts of GEMM
/// operands, residual and bias additions.
pub const OPS: KernelModule = KernelModule {
    name: "qaq_ops.cu",
    source: include_str!("ops.cu"),
    kernels: &[
        "qaq_rmsnorm",
        "qaq_rope",
        "qaq_silu_mul",
        "qaq_embed_f16",
        "qaq_softmax_rows",
        "qaq_argmax_rows",
        "qaq_f32_to_f16",
        "qaq_add",
        "qaq_add_bias",
        "qaq_unrotate_heads",
    ],
};

/// Every module.
pub const MODULES: [KernelModule; 3] = [QUANT, ATTENTION, OPS];

impl KernelModule {
    /// The full program text handed to NVRTC.
    pub fn program(&self) -> String {
        format!("{COMMON}\n#line 1 \"{}\"\n{}", self.name, self.source)
    }
}

/// Whether the NVRTC shared library can be loaded.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC options: IEEE division and square root, no contraction of `a * b + c` into
/// FMA and no flush-to-zero, so the quantizer's arithmetic matches the CPU reference
/// exactly.
pub fn compile_options(name: &str) -> CompileOptions {
    CompileOptions {
        ftz: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        fmad: Some(false),
        name: Some(name.to_string()),
        options: vec!["--std=c++17".to_string()],
        ..Default::default()
    }
}

/// Compiles one module to PTX. Errors (never panics) when NVRTC is missing, and
/// carries NVRTC's log when the source does not compile.
pub fn compile(module: &KernelModule) -> Result<Ptx> {
    compile_text(module.name, &module.program())
}

/// [`compile`] of arbitrary program text (tests feed it broken sources).
pub fn compile_text(name: &str, program: &str) -> Result<Ptx> {
    if !nvrtc_available() {
        return Err(KernelError::Device(
            "the NVRTC library (libnvrtc.so.12) was not found: install the nvidia-cuda-nvrtc-cu12 wheel \
             (scripts/install-nvrtc.sh) and put its lib folder on LD_LIBRARY_PATH"
                .to_string(),
        ));
    }
    cudarc::nvrtc::compile_ptx_with_opts(program, compile_options(name)).map_err(|e| {
        let detail = match &e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => other.to_string(),
        };
        KernelError::Device(format!("NVRTC failed to compile {name}: {detail}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The PTX check of `make test`: every module compiles and defines every kernel the
    /// host loads. Fails (does not skip) when NVRTC is missing.
    #[test]
    fn nvrtc_compiles_every_kernel_source() {
        assert!(
            nvrtc_available(),
            "NVRTC is required for this test: run scripts/install-nvrtc.sh and set LD_LIBRARY_PATH (make test does both)"
        );
        for m in MODULES {
            let ptx = compile(&m).unwrap_or_else(|e| panic!("{e}"));
            let text = ptx.to_src();
            for k in m.kernels {
                assert!(text.contains(&format!(".entry {k}(")), "{}: no entry point {k} in the PTX", m.name);
            }
        }
    }

    #[test]
    fn nvrtc_reports_a_broken_source_with_its_log() {
        assert!(nvrtc_available(), "NVRTC is required for this test (see nvrtc_compiles_every_kernel_source)");
        let broken = format!("{COMMON}\nextern \"C\" __global__ void k(float* x) {{ x[0] = undefined_name; }}");
        let err = compile_text("broken.cu", &broken).unwrap_err().to_string();
        assert!(err.contains("broken.cu") && err.contains("undefined_name"), "{err}");
    }

    #[test]
    fn every_module_has_distinct_kernel_names() {
        let mut all: Vec<&str> = MODULES.iter().flat_map(|m| m.kernels.iter().copied()).collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
        for m in MODULES {
            for k in m.kernels {
                assert!(m.source.contains(&format!("void {k}(")), "{k} not defined in {}", m.name);
            }
        }
    }
}

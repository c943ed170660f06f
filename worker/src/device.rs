//! `--device`: which device a worker runs on (`cpu`, or `cuda:N` in a build with the
//! `cuda` feature), parsed in the configuration's second stage and checked against the
//! machine before the model is loaded.

use std::path::Path;

use crate::error::ServeError;
use crate::model::{self, LoadedModel};

/// The accepted forms, for error messages.
pub const DEVICE_SYNTAX: &str = "cpu | cuda:N (N = the GPU's ordinal, e.g. cuda:0)";

/// A worker's device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    /// The CPU (the f32 forward pass, CPU QAQ kernels).
    #[default]
    Cpu,
    /// NVIDIA GPU `N`.
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Device {
    /// Parses `cpu` or `cuda:N`; the error names the flag and the accepted forms.
    pub fn parse(s: &str) -> Result<Device, ServeError> {
        let t = s.trim();
        if t == "cpu" {
            return Ok(Device::Cpu);
        }
        if let Some(n) = t.strip_prefix("cuda:")
            && !n.is_empty()
            && n.bytes().all(|b| b.is_ascii_digit())
            && let Ok(n) = n.parse::<usize>()
            && n < 1024
        {
            return Ok(Device::Cuda(n));
        }
        Err(ServeError::Device(format!("--device: {s:?} is not a device; accepted forms: {DEVICE_SYNTAX}")))
    }

    /// Checks that this worker can run on the device, before anything is loaded. The CPU
    /// always can. `cuda:N` needs a build with the `cuda` feature, a CUDA driver and GPU
    /// `N`; the kernels are compiled and the weights uploaded by [`Device::load_model`].
    pub fn check(&self) -> Result<(), ServeError> {
        match *self {
            Device::Cpu => Ok(()),
            Device::Cuda(n) => check_cuda(n),
        }
    }

    /// Loads the model at `path` and puts its forward pass on this device. On a GPU the
    /// weights are uploaded as f16 and the dense layers run there; decode attention runs
    /// over each cache's device tier (see `model::gpu`).
    pub fn load_model(&self, path: &Path) -> Result<LoadedModel, ServeError> {
        self.check()?;
        let mut m =
            model::load_model(path).map_err(|source| ServeError::Model { path: path.display().to_string(), source })?;
        if let Device::Cuda(n) = *self {
            place_cuda(n, &mut m)?;
        }
        Ok(m)
    }
}

#[cfg(not(feature = "cuda"))]
fn check_cuda(n: usize) -> Result<(), ServeError> {
    Err(ServeError::Device(format!(
        "--device cuda:{n}: this qaq-worker was built without the `cuda` feature; \
         rebuild with `cargo build --release --features cuda`, or use --device cpu"
    )))
}

#[cfg(not(feature = "cuda"))]
fn place_cuda(n: usize, _: &mut LoadedModel) -> Result<(), ServeError> {
    check_cuda(n)
}

#[cfg(feature = "cuda")]
fn check_cuda(n: usize) -> Result<(), ServeError> {
    qaq_kernels::cuda::probe(n).map_err(|e| ServeError::Device(format!("--device cuda:{n}: {e}")))
}

#[cfg(feature = "cuda")]
fn place_cuda(n: usize, m: &mut LoadedModel) -> Result<(), ServeError> {
    let started = std::time::Instant::now();
    let name = m.model.use_gpu(n).map_err(|e| ServeError::Device(format!("--device cuda:{n}: {e}")))?;
    tracing::info!(device = %format!("cuda:{n}"), gpu = %name, secs = started.elapsed().as_secs_f32(), "weights on the GPU");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_accepted_forms() {
        assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
        assert_eq!(Device::parse("cuda:0").unwrap(), Device::Cuda(0));
        assert_eq!(Device::parse(" cuda:3 ").unwrap(), Device::Cuda(3));
        assert_eq!(Device::default().to_string(), "cpu");
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn rejects_other_strings_naming_the_flag_and_the_forms() {
        for bad in ["", "gpu", "cuda", "cuda:", "cuda:-1", "cuda:x", "cuda:+1", "CPU", "cuda:0:1", "cuda:99999"] {
            let e = Device::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("--device:") && e.contains(DEVICE_SYNTAX), "{bad:?}: {e}");
        }
    }

    #[test]
    fn cpu_is_always_usable_and_cuda_is_a_clear_error_here() {
        Device::Cpu.check().unwrap();
        let e = Device::Cuda(0).check().unwrap_err().to_string();
        assert!(e.starts_with("--device cuda:0: "), "{e}");
        #[cfg(not(feature = "cuda"))]
        assert!(e.contains("built without the `cuda` feature"), "{e}");
        #[cfg(feature = "cuda")]
        assert!(e.contains("driver library (libcuda.so.1) could not be loaded") || e.contains("device(s)"), "{e}");
    }
}

//! The crate's error type.

/// Errors returned by the QAQ kernels. Nothing in this crate panics on user input.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum KernelError {
    /// An input value was NaN, infinite, or too large for f16.
    #[error("non-finite or out-of-f16-range value in {what}")]
    NonFinite {
        /// Which input carried the value.
        what: &'static str,
    },
    /// A slice had the wrong length.
    #[error("{what}: expected a length of {expected}, got {got}")]
    Shape {
        /// Which input.
        what: &'static str,
        /// Expected length (or unit length, for "multiple of").
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// A configuration value was invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A layer index was out of range.
    #[error("layer {layer} out of range (the cache has {n_layers} layers)")]
    Layer {
        /// Requested layer.
        layer: usize,
        /// Number of layers.
        n_layers: usize,
    },
    /// The GPU path (feature `cuda`) failed: no driver or NVRTC library, a failed
    /// compilation, allocation, copy or launch, or an error a kernel raised.
    #[error("CUDA: {0}")]
    Device(String),
    /// A policy string did not parse.
    #[error("invalid KV policy {input:?}: {reason}; accepted forms: {accepted}")]
    Policy {
        /// The string given.
        input: String,
        /// What was wrong.
        reason: String,
        /// The accepted syntax.
        accepted: &'static str,
    },
}

/// Result alias.
pub type Result<T> = std::result::Result<T, KernelError>;

//! A sequence's device tier on a GPU worker: its packed groups mirrored in device memory
//! (`qaq_kernels::cuda::DeviceKv`), made at the sequence's first decode row on the GPU,
//! where every later decode row attends. The host cache stays the reference: it decides
//! every width, encodes and holds the backups; the mirror copies up what changed before a
//! layer attends. A build without the `cuda` feature has no device, so its tier is never
//! made.

use qaq_kernels::PolicyCache;

use crate::model::{DeviceCall, KvError};

/// Not made yet; refused (the KIVI baseline's per-channel keys: attention stays on the
/// host); or the mirror.
#[derive(Debug, Default)]
pub(super) enum Tier {
    #[default]
    None,
    #[cfg(feature = "cuda")]
    Refused,
    #[cfg(feature = "cuda")]
    Mirror(qaq_kernels::cuda::DeviceKv),
}

impl Tier {
    /// Bytes of the mirror's allocations (free room and garbage included), if there is one.
    pub fn bytes(&self) -> Option<usize> {
        match self {
            #[cfg(feature = "cuda")]
            Tier::Mirror(m) => Some(m.bytes()),
            _ => None,
        }
    }

    /// Bytes copied up to the mirror so far, if there is one.
    pub fn uploaded_bytes(&self) -> Option<u64> {
        match self {
            #[cfg(feature = "cuda")]
            Tier::Mirror(m) => Some(m.uploaded_bytes()),
            _ => None,
        }
    }

    /// Frees the mirror (a preempted sequence gives its device memory back); the next
    /// decode row on the GPU makes it again. A refusal stands.
    pub fn release(&mut self) {
        #[cfg(feature = "cuda")]
        if let Tier::Mirror(_) = self {
            *self = Tier::None;
        }
    }

    /// Attends one decode row of `layer` over the mirror of `cache`, making the mirror on
    /// first use; `Ok(false)` when the cache cannot have one (`label` names its policy in
    /// the log).
    pub fn attend(
        &mut self,
        call: &mut DeviceCall<'_>,
        cache: &mut dyn PolicyCache,
        label: &str,
        layer: usize,
        q: &[f32],
    ) -> Result<bool, KvError> {
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (cache, label, layer, q);
            call.unreachable()
        }
        #[cfg(feature = "cuda")]
        {
            if let Tier::None = self {
                *self = match qaq_kernels::cuda::DeviceKv::new(cache) {
                    Ok(m) => Tier::Mirror(m),
                    Err(e) => {
                        tracing::debug!(policy = %label, reason = %e, "no device KV tier; attention stays on the host");
                        Tier::Refused
                    }
                };
            }
            let Tier::Mirror(m) = self else { return Ok(false) };
            m.attend(call.gpu, cache, layer, q, &mut call.out).map_err(|e| KvError::Other(e.to_string()))?;
            Ok(true)
        }
    }
}

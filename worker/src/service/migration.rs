//! KV migration between workers, both sides of `Worker.ExportKv`.
//!
//! - Puller ([`Migration::migrate`]): a resubmitted request that names its previous worker
//!   (`kv_source_address`) has its parked KV cache pulled from there, checked and restored
//!   instead of prefilled again; any failure falls back to the prefill.
//! - Exporter ([`Migration::export`]): this worker's parked caches, streamed in chunks of
//!   [`KV_CHUNK_BYTES`], or sent device to device over NCCL between GPU workers of one node
//!   ([`crate::nccl`]).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use metrics::counter;
use qaq_proto::v1::worker_client::WorkerClient;
use qaq_proto::v1::{ExportKvRequest, KvChunk, NcclOffer};
use tonic::Status;

use crate::engine::park::Parked;
use crate::engine::{Budgets, Job};
use crate::error::MigrationError;
use crate::kv::{PolicyChoice, SeqCache};
use crate::metrics::{self as m, MigrationOutcome};
use crate::model::{KvCache, LoadedModel};
use crate::nccl;
use crate::tls::TlsConfig;

/// Bytes per Worker.ExportKv message.
pub const KV_CHUNK_BYTES: usize = 1 << 20;
/// How long pulling a migrated request's KV cache may take before the worker prefills.
const KV_PULL_TIMEOUT: Duration = Duration::from_secs(60);

/// The stream of one `Worker.ExportKv` answer.
pub type ExportStream = Pin<Box<dyn Stream<Item = Result<KvChunk, Status>> + Send>>;

/// What both sides of a migration need of this worker.
#[derive(Clone, Debug)]
pub struct Migration {
    pub model: Arc<LoadedModel>,
    /// For dialing other workers.
    pub tls: Arc<TlsConfig>,
    /// The node this worker runs on (NCCL only between workers of one node).
    pub node: String,
    /// The KV budgets: a cache larger than both could not run here.
    pub budgets: Budgets,
}

/// A KV cache pulled from a request's previous worker.
#[derive(Debug)]
struct PulledKv {
    tokens: Vec<u32>,
    policy: String,
    bytes: Vec<u8>,
}

fn protocol(msg: impl Into<String>) -> MigrationError {
    MigrationError::Protocol(msg.into())
}

/// The cache `pulled` from a request's previous worker, restored, when it is of the
/// request's policy and holds a strict prefix of its tokens (`all`: prompt, then resumed).
fn restore_kv(
    model: &LoadedModel,
    policy: &PolicyChoice,
    all: &[u32],
    pulled: PulledKv,
) -> Result<SeqCache, MigrationError> {
    if pulled.policy != policy.label {
        return Err(protocol(format!("its policy {:?} is not the request's {:?}", pulled.policy, policy.label)));
    }
    let n = pulled.tokens.len();
    if n == 0 || n >= all.len() || pulled.tokens[..] != all[..n] {
        return Err(protocol(format!("its {n} tokens are not a strict prefix of the request's {} tokens", all.len())));
    }
    let kv = SeqCache::restore(&model.model.kv_shape(), policy, &pulled.bytes)
        .map_err(|e| MigrationError::Restore(e.to_string()))?;
    if kv.len() != n {
        return Err(MigrationError::Restore(format!("it holds {} tokens, announced {n}", kv.len())));
    }
    Ok(kv)
}

impl Migration {
    /// Pulls request `id`'s parked KV cache from the worker at `addr`.
    async fn pull(&self, addr: &str, id: &str) -> Result<PulledKv, MigrationError> {
        let endpoint = self.tls.peer_endpoint(addr).map_err(|e| protocol(format!("{addr}: {e}")))?;
        let channel = endpoint.connect_timeout(Duration::from_secs(5)).connect().await?;
        let mut client = WorkerClient::new(channel).max_decoding_message_size(2 * KV_CHUNK_BYTES);
        let offer = nccl::offer(&self.model, &self.node);
        let mut stream =
            client.export_kv(ExportKvRequest { request_id: id.to_string(), nccl: offer }).await?.into_inner();
        let first = stream.message().await?.ok_or_else(|| protocol("the stream ended before its first chunk"))?;
        let cap = self.budgets.device.saturating_add(self.budgets.host);
        if first.total_bytes > cap {
            return Err(protocol(format!("{} bytes exceed the KV budgets ({cap} bytes)", first.total_bytes)));
        }
        let total = first.total_bytes as usize;
        if !first.nccl_id.is_empty() {
            // Device to device: the exporter's stream ends once its send completed.
            if !first.data.is_empty() {
                return Err(protocol("an NCCL answer carries no data chunks"));
            }
            let bytes = nccl::recv(&self.model, first.nccl_id, total).await?;
            while let Some(c) = stream.message().await? {
                if !c.data.is_empty() {
                    return Err(protocol("data chunks after an NCCL transfer"));
                }
            }
            tracing::info!(id, bytes = total, "KV cache received over NCCL");
            return Ok(PulledKv { tokens: first.token_ids, policy: first.kv_policy, bytes });
        }
        let mut bytes = Vec::with_capacity(total);
        bytes.extend_from_slice(&first.data);
        while let Some(c) = stream.message().await? {
            if bytes.len() + c.data.len() > total {
                return Err(protocol(format!("more than the announced {total} bytes")));
            }
            bytes.extend_from_slice(&c.data);
        }
        if bytes.len() != total {
            return Err(protocol(format!("{} of the announced {total} bytes arrived", bytes.len())));
        }
        Ok(PulledKv { tokens: first.token_ids, policy: first.kv_policy, bytes })
    }

    /// A migrated job with the KV cache pulled from its previous worker at `source`, or
    /// as it is (to be prefilled) when the pull or the restore fails.
    pub async fn migrate(&self, mut job: Job, source: &str) -> Job {
        let pulled = match tokio::time::timeout(KV_PULL_TIMEOUT, self.pull(source, &job.id)).await {
            Ok(r) => r,
            Err(_) => Err(MigrationError::Timeout(KV_PULL_TIMEOUT)),
        };
        let bytes = pulled.as_ref().map_or(0, |p| p.bytes.len() as u64);
        let (model, policy) = (self.model.clone(), job.policy.clone());
        let all: Vec<u32> = job.prompt.iter().chain(&job.resume).copied().collect();
        // Restoring a long context's cache is CPU work: off the async threads.
        let restored = tokio::task::spawn_blocking(move || pulled.and_then(|p| restore_kv(&model, &policy, &all, p)))
            .await
            .unwrap_or_else(|e| Err(MigrationError::Restore(format!("the restore task failed: {e}"))));
        match restored {
            Ok(kv) => {
                job.kv = Some(kv);
                tracing::info!(id = %job.id, from = %source, bytes, "KV cache migrated in");
                MigrationOutcome::Transferred.count("in");
                counter!(m::KV_MIGRATION_BYTES_TOTAL, "direction" => "in").increment(bytes);
            }
            Err(e) => {
                tracing::warn!(id = %job.id, from = %source, error = %e, "KV cache not migrated: prefilling instead");
                MigrationOutcome::Prefilled.count("in");
            }
        }
        job
    }

    /// The answer to `Worker.ExportKv` for a parked cache `p` (request `id`), over NCCL
    /// when the puller's `offer` allows it, otherwise in gRPC chunks.
    pub fn export(&self, id: String, p: Parked, offer: Option<&NcclOffer>) -> ExportStream {
        MigrationOutcome::Transferred.count("out");
        counter!(m::KV_MIGRATION_BYTES_TOTAL, "direction" => "out").increment(p.bytes.len() as u64);
        if nccl::accepts(offer, &self.node, nccl::usable(&self.model)) {
            match nccl::new_id() {
                Ok(nccl_id) => return self.export_nccl(id, p, nccl_id),
                Err(e) => tracing::warn!(error = %e, "no NCCL id: sending the KV cache over gRPC"),
            }
        }
        let mut chunks: Vec<KvChunk> =
            p.bytes.chunks(KV_CHUNK_BYTES).map(|c| KvChunk { data: c.to_vec(), ..Default::default() }).collect();
        if chunks.is_empty() {
            chunks.push(KvChunk::default());
        }
        chunks[0].total_bytes = p.bytes.len() as u64;
        chunks[0].token_ids = p.tokens;
        chunks[0].kv_policy = p.policy;
        Box::pin(futures::stream::iter(chunks.into_iter().map(Ok)))
    }

    /// One chunk announcing the NCCL transfer; the stream ends when the send completed
    /// (or with an internal status if it failed).
    fn export_nccl(&self, id: String, p: Parked, nccl_id: Vec<u8>) -> ExportStream {
        let first = KvChunk {
            data: Vec::new(),
            total_bytes: p.bytes.len() as u64,
            token_ids: p.tokens,
            kv_policy: p.policy,
            nccl_id: nccl_id.clone(),
        };
        let model = self.model.clone();
        let sent = async move {
            let sent = tokio::time::timeout(KV_PULL_TIMEOUT, nccl::send(&model, nccl_id, p.bytes))
                .await
                .unwrap_or(Err(MigrationError::Timeout(KV_PULL_TIMEOUT)));
            let e = sent.err()?;
            tracing::warn!(id = %id, error = %e, "NCCL send of a parked KV cache failed");
            Some(Err(Status::internal(format!("NCCL send failed: {e}"))))
        };
        Box::pin(
            futures::stream::once(async move { Ok(first) })
                .chain(futures::stream::once(sent).filter_map(|x| async move { x })),
        )
    }
}

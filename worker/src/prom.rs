//! The worker's Prometheus recorder (histogram buckets per metric); the
//! `/metrics` endpoint itself is `qaq_proto::metrics_http`.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::metrics::{BATCH_BUCKETS, BATCH_SIZE, BITS_BUCKETS, KV_BITS, LATENCY_BUCKETS};

/// Installs the global recorder with histogram buckets for the worker's metrics.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &BATCH_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(KV_BITS.into()), &BITS_BUCKETS)?
        .install_recorder()?;
    crate::metrics::describe();
    Ok(handle)
}

//! The worker's Prometheus recorder (histogram buckets per metric); the
//! `/metrics` endpoint itself is `qaq_proto::metrics_http`.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::ServeError;
use crate::metrics::{BATCH_BUCKETS, BATCH_SIZE, BITS_BUCKETS, KV_BITS, LATENCY_BUCKETS};

/// Installs the global recorder with histogram buckets for the worker's metrics.
pub fn install_recorder() -> Result<PrometheusHandle, ServeError> {
    let err = |e: &dyn std::fmt::Display| ServeError::Metrics(e.to_string());
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &BATCH_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(KV_BITS.into()), &BITS_BUCKETS))
        .map_err(|e| err(&e))?
        .install_recorder()
        .map_err(|e| err(&e))?;
    crate::metrics::describe();
    Ok(handle)
}

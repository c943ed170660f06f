//! The worker's Prometheus recorder (histogram buckets per metric); the
//! `/metrics` endpoint itself is `qaq_proto::metrics_http`.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::metrics::{BATCH_BUCKETS, BATCH_SIZE, LATENCY_BUCKETS};

/// Installs the global recorder with histogram buckets for the worker's metrics.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &BATCH_BUCKETS)?
        .set_buckets(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 16.0])?
        .install_recorder()?;
    crate::metrics::describe();
    Ok(handle)
}

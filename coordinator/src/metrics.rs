//! Metric names (the only place they are spelled), their descriptions, the
//! histogram buckets, and the Prometheus recorder the binary installs.
//!
//! The library only calls the `metrics` macros: without an installed recorder
//! (unit and in-process tests) they are no-ops.

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Gauge: requests streaming tokens (first token received), label [`LABEL_PROTOCOL`].
pub const REQUESTS_RUNNING: &str = "qaq_coordinator_requests_running";
/// Gauge: requests admitted and placed, not yet streaming their first token,
/// label [`LABEL_PROTOCOL`].
pub const REQUESTS_WAITING: &str = "qaq_coordinator_requests_waiting";
/// Counter: finished requests, labels [`LABEL_OUTCOME`] and [`LABEL_PROTOCOL`].
pub const REQUESTS_TOTAL: &str = "qaq_coordinator_requests_total";
/// Counter: tokens streamed to clients.
pub const GENERATED_TOKENS_TOTAL: &str = "qaq_coordinator_generated_tokens_total";
/// Histogram: seconds from receiving a request to streaming its first token,
/// label [`LABEL_PROTOCOL`].
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "qaq_coordinator_time_to_first_token_seconds";
/// Histogram: seconds between consecutive tokens of a stream.
pub const INTER_TOKEN_LATENCY_SECONDS: &str = "qaq_coordinator_inter_token_latency_seconds";
/// Histogram: seconds from receiving a request to its end (any outcome),
/// label [`LABEL_PROTOCOL`].
pub const REQUEST_DURATION_SECONDS: &str = "qaq_coordinator_request_duration_seconds";
/// Gauge: registered workers, label [`LABEL_STATE`].
pub const WORKERS: &str = "qaq_coordinator_workers";
/// Gauge: requests in the admission queue, waiting for a worker slot.
pub const QUEUE_DEPTH: &str = "qaq_coordinator_queue_depth";
/// Counter: requests resubmitted to another worker after streaming tokens
/// (mid-stream failover: prompt plus the tokens generated so far).
pub const MIGRATIONS_TOTAL: &str = "qaq_coordinator_migrations_total";
/// Counter: resubmissions of a request after its worker failed (before or
/// after its first token; migrations included).
pub const RETRIES_TOTAL: &str = "qaq_coordinator_retries_total";
/// Counter: requests or registrations refused, label [`LABEL_REASON`].
pub const REJECTIONS_TOTAL: &str = "qaq_coordinator_rejections_total";

/// Label of [`REQUESTS_TOTAL`]: see [`Outcome`].
pub const LABEL_OUTCOME: &str = "outcome";
/// Label of the request metrics ([`REQUESTS_TOTAL`], [`REQUESTS_RUNNING`],
/// [`REQUESTS_WAITING`], [`TIME_TO_FIRST_TOKEN_SECONDS`],
/// [`REQUEST_DURATION_SECONDS`]): the front the request came in through, see [`Protocol`].
pub const LABEL_PROTOCOL: &str = "protocol";
/// Label of [`WORKERS`]: `up`, `draining` or `down`.
pub const LABEL_STATE: &str = "state";
/// Values of [`LABEL_STATE`].
pub const STATES: [&str; 3] = ["up", "draining", "down"];
/// Label of [`REJECTIONS_TOTAL`]: see [`Rejection`].
pub const LABEL_REASON: &str = "reason";

/// Why a request or a registration was refused, the values of [`LABEL_REASON`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The admission queue was full (RESOURCE_EXHAUSTED).
    QueueFull,
    /// A queued request's deadline passed before a worker slot freed.
    QueueTimeout,
    /// No or an unknown API key (UNAUTHENTICATED).
    Unauthenticated,
    /// A worker presented no or a wrong registration secret.
    BadSecret,
    /// The coordinator is shutting down.
    ShuttingDown,
}

impl Rejection {
    /// Every value, for initialising the series at 0.
    pub const ALL: [Rejection; 5] =
        [Self::QueueFull, Self::QueueTimeout, Self::Unauthenticated, Self::BadSecret, Self::ShuttingDown];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::QueueTimeout => "queue_timeout",
            Self::Unauthenticated => "unauthenticated",
            Self::BadSecret => "bad_secret",
            Self::ShuttingDown => "shutting_down",
        }
    }

    /// Counts one rejection.
    pub fn count(self) {
        metrics::counter!(REJECTIONS_TOTAL, LABEL_REASON => self.as_str()).increment(1);
    }
}

/// The front a request came in through, the values of [`LABEL_PROTOCOL`]:
/// one request path, two wire formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `qaq.v1.Generation` over gRPC.
    Grpc,
    /// The OpenAI-compatible HTTP API (`--http-listen`).
    Http,
}

impl Protocol {
    /// Every value, for initialising the series at 0.
    pub const ALL: [Protocol; 2] = [Self::Grpc, Self::Http];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Http => "http",
        }
    }
}

/// How a request ended, the values of [`LABEL_OUTCOME`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Finished with a final message (length, stop, eos, context).
    Ok,
    /// A worker or transport error.
    Error,
    /// Aborted by the client (Abort RPC or disconnect).
    Aborted,
    /// The client's deadline passed.
    Deadline,
    /// Rejected as invalid (bad field, unknown model, duplicate id).
    Invalid,
    /// No live worker could take it (or its retry budget ran out).
    Unavailable,
    /// Refused by admission (queue full, shutting down).
    Rejected,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error => "error",
            Self::Aborted => "aborted",
            Self::Deadline => "deadline",
            Self::Invalid => "invalid",
            Self::Unavailable => "unavailable",
            Self::Rejected => "rejected",
        }
    }

    /// Every value, for initialising the series at 0.
    pub const ALL: [Outcome; 7] =
        [Self::Ok, Self::Error, Self::Aborted, Self::Deadline, Self::Invalid, Self::Unavailable, Self::Rejected];
}

/// Buckets of [`TIME_TO_FIRST_TOKEN_SECONDS`].
pub const TTFT_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Buckets of [`INTER_TOKEN_LATENCY_SECONDS`].
pub const ITL_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0];
/// Buckets of [`REQUEST_DURATION_SECONDS`].
pub const DURATION_BUCKETS: &[f64] =
    &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// Registers the descriptions of every metric with the current recorder.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(REQUESTS_RUNNING, Unit::Count, "Requests streaming tokens through the coordinator.");
    describe_gauge!(REQUESTS_WAITING, Unit::Count, "Requests placed on a worker, waiting for their first token.");
    describe_counter!(REQUESTS_TOTAL, Unit::Count, "Finished requests by outcome.");
    describe_counter!(GENERATED_TOKENS_TOTAL, Unit::Count, "Tokens streamed to clients.");
    describe_histogram!(TIME_TO_FIRST_TOKEN_SECONDS, Unit::Seconds, "Time from request to first token.");
    describe_histogram!(INTER_TOKEN_LATENCY_SECONDS, Unit::Seconds, "Time between consecutive tokens.");
    describe_histogram!(REQUEST_DURATION_SECONDS, Unit::Seconds, "Time from request to its end.");
    describe_gauge!(WORKERS, Unit::Count, "Registered workers by state.");
    describe_gauge!(QUEUE_DEPTH, Unit::Count, "Requests in the admission queue.");
    describe_counter!(MIGRATIONS_TOTAL, Unit::Count, "Requests moved to another worker mid-stream.");
    describe_counter!(RETRIES_TOTAL, Unit::Count, "Resubmissions after a worker failure.");
    describe_counter!(REJECTIONS_TOTAL, Unit::Count, "Requests or registrations refused, by reason.");
}

/// Gives every counter, every label value, every gauge and every histogram a
/// series from startup (dashboards query series that must exist before the
/// first event).
pub fn initialise() {
    for p in Protocol::ALL {
        let p = p.as_str();
        for o in Outcome::ALL {
            metrics::counter!(REQUESTS_TOTAL, LABEL_OUTCOME => o.as_str(), LABEL_PROTOCOL => p).absolute(0);
        }
        for n in [REQUESTS_RUNNING, REQUESTS_WAITING] {
            metrics::gauge!(n, LABEL_PROTOCOL => p).set(0.0);
        }
        for n in [TIME_TO_FIRST_TOKEN_SECONDS, REQUEST_DURATION_SECONDS] {
            // Registering the histogram is enough for the exporter to render it.
            let _ = metrics::histogram!(n, LABEL_PROTOCOL => p);
        }
    }
    for r in Rejection::ALL {
        metrics::counter!(REJECTIONS_TOTAL, LABEL_REASON => r.as_str()).absolute(0);
    }
    for n in [GENERATED_TOKENS_TOTAL, MIGRATIONS_TOTAL, RETRIES_TOTAL] {
        metrics::counter!(n).absolute(0);
    }
    metrics::gauge!(QUEUE_DEPTH).set(0.0);
    for s in STATES {
        metrics::gauge!(WORKERS, LABEL_STATE => s).set(0.0);
    }
    let _ = metrics::histogram!(INTER_TOKEN_LATENCY_SECONDS);
}

/// A Prometheus recorder with real (bucketed) histograms for every histogram
/// above. Not installed: the caller decides (`metrics::set_global_recorder`).
pub fn prometheus_builder() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(TIME_TO_FIRST_TOKEN_SECONDS.into()), TTFT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(INTER_TOKEN_LATENCY_SECONDS.into()), ITL_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION_SECONDS.into()), DURATION_BUCKETS)
}

/// Builds the Prometheus recorder, installs it as the process-wide recorder
/// and describes the metrics. Call once, from a binary.
pub fn install_prometheus() -> Result<PrometheusHandle, BuildError> {
    let handle = prometheus_builder()?.install_recorder()?;
    describe();
    initialise();
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_convention() {
        for n in [
            REQUESTS_RUNNING,
            REQUESTS_WAITING,
            REQUESTS_TOTAL,
            GENERATED_TOKENS_TOTAL,
            TIME_TO_FIRST_TOKEN_SECONDS,
            INTER_TOKEN_LATENCY_SECONDS,
            REQUEST_DURATION_SECONDS,
            WORKERS,
            QUEUE_DEPTH,
            MIGRATIONS_TOTAL,
            RETRIES_TOTAL,
            REJECTIONS_TOTAL,
        ] {
            assert!(n.starts_with("qaq_coordinator_"), "{n}");
            let counter = [REQUESTS_TOTAL, GENERATED_TOKENS_TOTAL, MIGRATIONS_TOTAL, RETRIES_TOTAL, REJECTIONS_TOTAL]
                .contains(&n);
            assert_eq!(n.ends_with("_total"), counter, "{n}: _total only on counters");
        }
    }

    #[test]
    fn histograms_render_as_buckets() {
        let recorder = prometheus_builder().unwrap().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe();
            let http = Protocol::Http.as_str();
            metrics::histogram!(TIME_TO_FIRST_TOKEN_SECONDS, LABEL_PROTOCOL => http).record(0.2);
            metrics::histogram!(INTER_TOKEN_LATENCY_SECONDS).record(0.02);
            metrics::histogram!(REQUEST_DURATION_SECONDS, LABEL_PROTOCOL => http).record(3.0);
            metrics::counter!(REQUESTS_TOTAL, LABEL_OUTCOME => Outcome::Ok.as_str(), LABEL_PROTOCOL => http)
                .increment(1);
        });
        let text = handle.render();
        for n in [TIME_TO_FIRST_TOKEN_SECONDS, REQUEST_DURATION_SECONDS] {
            assert!(text.contains(&format!("# TYPE {n} histogram")), "{n} not a histogram:\n{text}");
            assert!(text.contains(&format!("{n}_bucket{{protocol=\"http\",le=\"+Inf\"}} 1")), "{n}:\n{text}");
        }
        let n = INTER_TOKEN_LATENCY_SECONDS;
        assert!(text.contains(&format!("{n}_bucket{{le=\"+Inf\"}} 1")), "{n}:\n{text}");
        assert!(
            text.contains("qaq_coordinator_time_to_first_token_seconds_bucket{protocol=\"http\",le=\"0.25\"} 1"),
            "{text}"
        );
        assert!(text.contains("qaq_coordinator_requests_total{outcome=\"ok\",protocol=\"http\"} 1"), "{text}");
    }

    #[test]
    fn every_series_exists_from_startup() {
        let recorder = prometheus_builder().unwrap().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe();
            initialise();
        });
        let text = handle.render();
        for p in Protocol::ALL {
            let p = p.as_str();
            for o in Outcome::ALL {
                let line = format!("{REQUESTS_TOTAL}{{{LABEL_OUTCOME}=\"{}\",{LABEL_PROTOCOL}=\"{p}\"}} 0", o.as_str());
                assert!(text.contains(&line), "{line}:\n{text}");
            }
            for n in [REQUESTS_RUNNING, REQUESTS_WAITING] {
                assert!(text.contains(&format!("\n{n}{{{LABEL_PROTOCOL}=\"{p}\"}} 0")), "{n} {p}:\n{text}");
            }
            for n in [TIME_TO_FIRST_TOKEN_SECONDS, REQUEST_DURATION_SECONDS] {
                let line = format!("{n}_bucket{{{LABEL_PROTOCOL}=\"{p}\",le=\"+Inf\"}} 0");
                assert!(text.contains(&line), "{line}:\n{text}");
            }
        }
        for r in Rejection::ALL {
            let line = format!("{REJECTIONS_TOTAL}{{{LABEL_REASON}=\"{}\"}} 0", r.as_str());
            assert!(text.contains(&line), "{line}:\n{text}");
        }
        for s in STATES {
            assert!(text.contains(&format!("{WORKERS}{{{LABEL_STATE}=\"{s}\"}} 0")), "{s}:\n{text}");
        }
        for n in [GENERATED_TOKENS_TOTAL, MIGRATIONS_TOTAL, RETRIES_TOTAL, QUEUE_DEPTH] {
            assert!(text.contains(&format!("\n{n} 0")), "{n}:\n{text}");
        }
        for n in [TIME_TO_FIRST_TOKEN_SECONDS, INTER_TOKEN_LATENCY_SECONDS, REQUEST_DURATION_SECONDS] {
            assert!(text.contains(&format!("# TYPE {n} histogram")), "{n} not a histogram:\n{text}");
        }
        let n = INTER_TOKEN_LATENCY_SECONDS;
        assert!(text.contains(&format!("{n}_bucket{{le=\"+Inf\"}} 0")), "{n}:\n{text}");
    }
}

//! Names of the worker's Prometheus metrics (one place, so dashboards and
//! alert rules can be checked against them) and their descriptions.

/// Sequences in the running batch (gauge).
pub const REQUESTS_RUNNING: &str = "qaq_worker_requests_running";
/// Requests waiting for a batch slot (gauge).
pub const REQUESTS_WAITING: &str = "qaq_worker_requests_waiting";
/// Requests finished, by `outcome` (counter).
pub const REQUESTS_TOTAL: &str = "qaq_worker_requests_total";
/// Tokens generated (counter).
pub const GENERATED_TOKENS_TOTAL: &str = "qaq_worker_generated_tokens_total";
/// Prompt tokens prefilled (counter).
pub const PROMPT_TOKENS_TOTAL: &str = "qaq_worker_prompt_tokens_total";
/// Time from a request's arrival to its first generated token (histogram).
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "qaq_worker_time_to_first_token_seconds";
/// Time between two generated tokens of a sequence (histogram).
pub const INTER_TOKEN_LATENCY_SECONDS: &str = "qaq_worker_inter_token_latency_seconds";
/// Duration of one engine step (forward pass of the batch) (histogram).
pub const STEP_DURATION_SECONDS: &str = "qaq_worker_step_duration_seconds";
/// Sequences in each engine step (histogram).
pub const BATCH_SIZE: &str = "qaq_worker_batch_size";
/// GPU workers: the GPU's memory, label `state` (used|total), as the driver reports it
/// (used: by every process on the device) (gauge).
pub const GPU_MEMORY_BYTES: &str = "qaq_worker_gpu_memory_bytes";
/// Bytes the KV caches hold in the device tier (gauge).
pub const KV_DEVICE_BYTES: &str = "qaq_worker_kv_device_bytes";
/// Bytes the same tokens would take in an fp16 cache (gauge).
pub const KV_FP16_EQUIVALENT_BYTES: &str = "qaq_worker_kv_fp16_equivalent_bytes";

/// Bytes of fp16 backups (and swapped-out caches) in the host tier (gauge).
pub const KV_HOST_BACKUP_BYTES: &str = "qaq_worker_kv_host_backup_bytes";
/// Device-tier budget (gauge).
pub const KV_DEVICE_BUDGET_BYTES: &str = "qaq_worker_kv_device_budget_bytes";
/// Host-tier budget (gauge).
pub const KV_HOST_BUDGET_BYTES: &str = "qaq_worker_kv_host_budget_bytes";
/// Device-tier usage, 0..1 (gauge).
pub const KV_USAGE_RATIO: &str = "qaq_worker_kv_usage_ratio";
/// Widths of the cached groups of finished sequences, label `kind` (histogram).
pub const KV_BITS: &str = "qaq_worker_kv_bits";
/// Groups re-quantized, labels `direction` (up|down) and `kind` (key|value) (counter).
pub const KV_REQUANTIZATIONS_TOTAL: &str = "qaq_worker_kv_requantizations_total";
/// Upward moves refused because the backup was evicted (counter).
pub const KV_REQUANTIZATIONS_BLOCKED_TOTAL: &str = "qaq_worker_kv_requantizations_blocked_total";
/// Bytes moved between tiers, label `direction` (to_host|to_device) (counter).
pub const KV_HOST_TRANSFER_BYTES_TOTAL: &str = "qaq_worker_kv_host_transfer_bytes_total";
/// Token backups evicted from the host tier (counter).
pub const KV_BACKUP_EVICTIONS_TOTAL: &str = "qaq_worker_kv_backup_evictions_total";
/// Sequences preempted (moved out of the device tier) (counter).
pub const PREEMPTIONS_TOTAL: &str = "qaq_worker_preemptions_total";

/// Requests migrated with their KV cache, labels `direction` (out: parked and pulled
/// from here; in: restored here) and `outcome` ([`MigrationOutcome`]) (counter).
pub const KV_MIGRATIONS_TOTAL: &str = "qaq_worker_kv_migrations_total";
/// Snapshot bytes of migrated KV caches, label `direction` (out|in) (counter).
pub const KV_MIGRATION_BYTES_TOTAL: &str = "qaq_worker_kv_migration_bytes_total";
/// Bytes of KV caches parked for their next worker to pull (gauge).
pub const KV_PARKED_BYTES: &str = "qaq_worker_kv_parked_bytes";
/// Coordinator addresses this worker is registered with (`state="registered"`) or
/// failing to reach or register with (`state="unreachable"`) (gauge).
pub const COORDINATORS: &str = "qaq_worker_coordinators";
/// The `state` label values of [`COORDINATORS`].
pub const COORDINATOR_STATES: [&str; 2] = ["registered", "unreachable"];

/// The `outcome` label of [`KV_MIGRATIONS_TOTAL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationOutcome {
    /// The cache moved (either direction).
    Transferred,
    /// Incoming: the pull or the restore failed; the tokens were prefilled instead.
    Prefilled,
    /// Outgoing: parked, never pulled.
    Expired,
}

impl MigrationOutcome {
    /// The outcomes each direction can have (`out`: parked here; `in`: restored here).
    pub const BY_DIRECTION: [(&'static str, [Self; 2]); 2] =
        [("out", [Self::Transferred, Self::Expired]), ("in", [Self::Transferred, Self::Prefilled])];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Transferred => "transferred",
            Self::Prefilled => "prefilled",
            Self::Expired => "expired",
        }
    }

    /// Counts `n` migrations of `direction` (`in` or `out`) with this outcome.
    pub fn count_n(self, direction: &'static str, n: u64) {
        metrics::counter!(KV_MIGRATIONS_TOTAL, "direction" => direction, "outcome" => self.label()).increment(n);
    }

    /// Counts one migration.
    pub fn count(self, direction: &'static str) {
        self.count_n(direction, 1);
    }
}

/// Outcome labels of REQUESTS_TOTAL.
pub const OUTCOMES: [&str; 4] = ["ok", "aborted", "error", "rejected"];

/// Latency buckets (seconds) shared by the latency histograms.
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Buckets of the batch-size histogram.
pub const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Buckets of the bit-width histogram (one per width 0..=8, 16 = fp16).
pub const BITS_BUCKETS: [f64; 10] = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 16.0];

/// Registers descriptions with the installed recorder and creates every
/// counter series at zero, so dashboards see them before the first event.
pub fn describe() {
    use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(KV_HOST_BACKUP_BYTES, Unit::Bytes, "Bytes of fp16 backups and swapped-out caches in the host tier");
    describe_gauge!(KV_DEVICE_BUDGET_BYTES, Unit::Bytes, "Device-tier KV budget");
    describe_gauge!(KV_HOST_BUDGET_BYTES, Unit::Bytes, "Host-tier KV budget");
    describe_gauge!(KV_USAGE_RATIO, "Device-tier KV usage (0..1)");
    describe_histogram!(KV_BITS, "Bit widths of cached groups of finished sequences");
    describe_counter!(KV_REQUANTIZATIONS_TOTAL, "Groups re-quantized, by direction and kind");
    describe_counter!(KV_REQUANTIZATIONS_BLOCKED_TOTAL, "Upward re-quantizations refused (backup evicted)");
    describe_counter!(KV_HOST_TRANSFER_BYTES_TOTAL, Unit::Bytes, "Bytes moved between the tiers");
    describe_counter!(KV_BACKUP_EVICTIONS_TOTAL, "Token backups evicted from the host tier");
    describe_counter!(PREEMPTIONS_TOTAL, "Sequences preempted out of the device tier");
    for direction in ["up", "down"] {
        for kind in ["key", "value"] {
            counter!(KV_REQUANTIZATIONS_TOTAL, "direction" => direction, "kind" => kind).absolute(0);
        }
    }
    for direction in ["to_host", "to_device"] {
        counter!(KV_HOST_TRANSFER_BYTES_TOTAL, "direction" => direction).absolute(0);
    }
    for outcome in OUTCOMES {
        counter!(REQUESTS_TOTAL, "outcome" => outcome).absolute(0);
    }
    describe_counter!(KV_MIGRATIONS_TOTAL, "Requests migrated with their KV cache, by direction and outcome");
    describe_counter!(KV_MIGRATION_BYTES_TOTAL, Unit::Bytes, "Snapshot bytes of migrated KV caches, by direction");
    describe_gauge!(KV_PARKED_BYTES, Unit::Bytes, "Bytes of KV caches parked for their next worker");
    for (direction, outcomes) in MigrationOutcome::BY_DIRECTION {
        counter!(KV_MIGRATION_BYTES_TOTAL, "direction" => direction).absolute(0);
        for outcome in outcomes {
            counter!(KV_MIGRATIONS_TOTAL, "direction" => direction, "outcome" => outcome.label()).absolute(0);
        }
    }
    for c in [
        KV_BACKUP_EVICTIONS_TOTAL,
        PREEMPTIONS_TOTAL,
        KV_REQUANTIZATIONS_BLOCKED_TOTAL,
        GENERATED_TOKENS_TOTAL,
        PROMPT_TOKENS_TOTAL,
    ] {
        counter!(c).absolute(0);
    }
    describe_gauge!(
        COORDINATORS,
        "Coordinator addresses this worker is registered with, or failing to reach (a name that does not resolve counts as one)"
    );
    for state in COORDINATOR_STATES {
        metrics::gauge!(COORDINATORS, "state" => state).set(0.0);
    }
    describe_gauge!(REQUESTS_RUNNING, "Sequences in the running batch");
    describe_gauge!(REQUESTS_WAITING, "Requests waiting for a batch slot");
    describe_counter!(REQUESTS_TOTAL, "Requests finished, by outcome");
    describe_counter!(GENERATED_TOKENS_TOTAL, "Tokens generated");
    describe_counter!(PROMPT_TOKENS_TOTAL, "Prompt tokens prefilled");
    describe_histogram!(TIME_TO_FIRST_TOKEN_SECONDS, Unit::Seconds, "Arrival to first generated token");
    describe_histogram!(INTER_TOKEN_LATENCY_SECONDS, Unit::Seconds, "Time between generated tokens");
    describe_histogram!(STEP_DURATION_SECONDS, Unit::Seconds, "Duration of one engine step");
    describe_histogram!(BATCH_SIZE, "Sequences per engine step");
    describe_gauge!(KV_DEVICE_BYTES, Unit::Bytes, "Bytes held by KV caches in the device tier");
    describe_gauge!(GPU_MEMORY_BYTES, Unit::Bytes, "GPU memory used (all processes) and total, from the driver");
    describe_gauge!(KV_FP16_EQUIVALENT_BYTES, Unit::Bytes, "Bytes the cached tokens would take in fp16");
}

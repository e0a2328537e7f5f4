//! The metrics endpoint: what is exposed ([`Sources`] → a registry built per scrape) and the
//! HTTP side ([`http`]). The data path never sees this module: it bumps its own per-queue
//! counters ([`thinblk_vhost::stats`]); a scrape copies them and encodes the copy.

pub mod http;

use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use fastmetrics::encoder::{EncodeMetric, MetricEncoder};
use fastmetrics::format::text::{self, TextProfile};
use fastmetrics::raw::bucket::Bucket;
use fastmetrics::raw::{MetricLabelSet, MetricType, TypedMetric};
use fastmetrics::registry::{Registry, Unit};
use thinblk_vhost::stats::{ErrorClass, QueueSnapshot, StatOp, LATENCY_BOUNDS_NS};
use thinblk_vhost::{DeviceStats, Disk, ParkHub};

use crate::fault::FaultState;
use crate::thin::control::{ThinStats, EXTENSION_BOUNDS_S};
use crate::thin::monitor::DriveState;

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// `--metrics` is not `HOST:PORT` with a loopback or other IP host, or `unix:PATH`.
    #[error("bad metrics address {0:?}: expected 127.0.0.1:PORT, [::1]:PORT or unix:PATH")]
    BadAddress(String),
    /// The encoder refused the registry (a bug: names are fixed).
    #[error("encoding metrics failed: {0}")]
    Encode(String),
    /// Binding or serving failed.
    #[error("metrics endpoint: {0}")]
    Io(#[from] std::io::Error),
}

/// The exposition format of one scrape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Prometheus text format 0.0.4 (the default).
    Prometheus,
    /// OpenMetrics text 1.0.0.
    OpenMetrics,
    /// OpenMetrics text 0.0.1.
    OpenMetrics001,
}

impl Profile {
    /// The profile an `Accept` header asks for: OpenMetrics when it is offered with a
    /// weight at least that of the Prometheus text format, else the Prometheus text format.
    pub fn negotiate(accept: Option<&str>) -> Profile {
        let Some(accept) = accept else { return Profile::Prometheus };
        let mut best: Option<(f32, Profile)> = None;
        let mut plain = 0.0f32;
        for item in accept.split(',') {
            let mut parts = item.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let mut q = 1.0f32;
            let mut version = None;
            for p in parts {
                if let Some((k, v)) = p.split_once('=') {
                    match k.trim().to_ascii_lowercase().as_str() {
                        "q" => q = v.trim().parse().unwrap_or(0.0),
                        "version" => version = Some(v.trim().to_string()),
                        _ => {}
                    }
                }
            }
            if media == "application/openmetrics-text" && q > 0.0 {
                let profile = match version.as_deref() {
                    Some("0.0.1") => Profile::OpenMetrics001,
                    None | Some("1.0.0") => Profile::OpenMetrics,
                    Some(_) => continue,
                };
                if best.map(|(bq, _)| q > bq).unwrap_or(true) {
                    best = Some((q, profile));
                }
            } else if media == "text/plain" || media == "*/*" || media == "text/*" {
                plain = plain.max(q);
            }
        }
        match best {
            Some((q, p)) if q >= plain => p,
            _ => Profile::Prometheus,
        }
    }

    /// The `Content-Type` of a response in this profile.
    pub fn content_type(self) -> &'static str {
        match self {
            Profile::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Profile::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Profile::OpenMetrics001 => "application/openmetrics-text; version=0.0.1; charset=utf-8",
        }
    }

    fn text_profile(self) -> TextProfile {
        match self {
            Profile::Prometheus => TextProfile::PrometheusV0_0_4,
            Profile::OpenMetrics => TextProfile::OpenMetricsV1_0_0 { escaping_scheme: Default::default() },
            Profile::OpenMetrics001 => TextProfile::OpenMetricsV0_0_1,
        }
    }

    fn open_metrics(self) -> bool {
        self != Profile::Prometheus
    }
}

/// Everything a scrape reads. Each source is read with atomics or a short lock no data-path
/// thread takes.
pub struct Sources {
    /// The `disk` label (the serial the guest sees).
    pub disk: String,
    /// When the daemon started.
    pub started: Instant,
    /// Per-queue request statistics.
    pub device: Arc<DeviceStats>,
    /// The served image (allocation, cache counters, capacity).
    pub image: Arc<dyn Disk>,
    /// Parked-IO counters.
    pub hub: Arc<ParkHub>,
    /// Error-policy counters.
    pub faults: Arc<FaultState>,
    /// Thin-volume state (None without `--thin`).
    pub thin: Option<Arc<Mutex<ThinStats>>>,
    /// The image's handover around live migration.
    pub handover: Option<Arc<crate::handover::Handover>>,
    /// Chain operations (snapshots).
    pub chain: Option<Arc<crate::chain::ChainStats>>,
    /// Jobs (live merges).
    pub jobs: Option<Arc<crate::chain::job::JobStats>>,
}

type Labels = Vec<(&'static str, String)>;

/// One sample's value.
enum Value {
    Counter(u64),
    CounterF(f64),
    Gauge(i64),
    GaugeF(f64),
    Histogram { buckets: Vec<Bucket>, count: u64, sum: f64 },
}

impl EncodeMetric for Value {
    fn encode(&self, e: &mut dyn MetricEncoder) -> fastmetrics::error::Result<()> {
        match self {
            Value::Counter(v) => e.encode_counter(v, None, None),
            Value::CounterF(v) => e.encode_counter(v, None, None),
            Value::Gauge(v) => e.encode_gauge(v),
            Value::GaugeF(v) => e.encode_gauge(v),
            Value::Histogram { buckets, count, sum } => e.encode_histogram(buckets, None, *count, *sum, None),
        }
    }
}

/// The metric-type markers a family is registered with.
struct CounterType;
struct GaugeType;
struct HistogramType;

impl TypedMetric for CounterType {
    const TYPE: MetricType = MetricType::Counter;
}
impl TypedMetric for GaugeType {
    const TYPE: MetricType = MetricType::Gauge;
}
impl TypedMetric for HistogramType {
    const TYPE: MetricType = MetricType::Histogram;
}

/// A metric family whose samples were copied at scrape time.
struct Family<K> {
    samples: Vec<(Labels, Value)>,
    kind: PhantomData<fn() -> K>,
}

impl<K> Family<K> {
    fn new() -> Self {
        Family { samples: Vec::new(), kind: PhantomData }
    }

    fn push(&mut self, labels: Labels, value: Value) {
        self.samples.push((labels, value));
    }
}

impl<K: TypedMetric> TypedMetric for Family<K> {
    const TYPE: MetricType = K::TYPE;
}

impl<K> MetricLabelSet for Family<K> {
    type LabelSet = ();
}

impl<K: 'static> EncodeMetric for Family<K> {
    fn encode(&self, e: &mut dyn MetricEncoder) -> fastmetrics::error::Result<()> {
        for (labels, value) in &self.samples {
            e.encode(labels, value)?;
        }
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// Registers families under their Prometheus names, whatever the profile.
struct Builder {
    registry: Registry,
    open_metrics: bool,
    error: Option<String>,
}

impl Builder {
    fn note<T>(&mut self, name: &str, r: fastmetrics::error::Result<T>) {
        if let Err(e) = r {
            self.error.get_or_insert_with(|| format!("{name}: {e}"));
        }
    }

    /// A counter named `base_total` in the Prometheus format (`base` + the suffix the
    /// OpenMetrics encoder appends).
    fn counter(&mut self, base: &'static str, help: &'static str, f: Family<CounterType>) {
        let name = if self.open_metrics { base.to_string() } else { format!("{base}_total") };
        let r = self.registry.register(name, help, f).map(|_| ());
        self.note(base, r);
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, f: Family<GaugeType>) {
        let r = self.registry.register(name, help, f).map(|_| ());
        self.note(name, r);
    }

    /// A histogram in seconds (`name` carries the `_seconds` suffix).
    fn histogram(&mut self, name: &'static str, help: &'static str, f: Family<HistogramType>) {
        let base = name.trim_end_matches("_seconds");
        let r = self.registry.register_with_unit(base, help, Unit::Seconds, f).map(|_| ());
        self.note(name, r);
    }
}

fn buckets(bounds: impl Iterator<Item = f64>, counts: &[u64]) -> Vec<Bucket> {
    bounds.chain(std::iter::once(f64::INFINITY)).zip(counts).map(|(b, &c)| Bucket::new(b, c)).collect()
}

fn gauge_i(v: u64) -> Value {
    Value::Gauge(i64::try_from(v).unwrap_or(i64::MAX))
}

impl Sources {
    /// Encodes every series in `profile`.
    pub fn render(&self, profile: Profile) -> Result<String, MetricsError> {
        let registry = Registry::builder()
            .with_namespace("thinblk")
            .build()
            .map_err(|e| MetricsError::Encode(e.to_string()))?;
        let mut b = Builder { registry, open_metrics: profile.open_metrics(), error: None };
        let queues = self.device.snapshot();
        self.data_path(&mut b, &queues);
        self.parking(&mut b, &queues);
        self.image_and_volume(&mut b);
        self.process(&mut b);
        if let Some(e) = b.error {
            return Err(MetricsError::Encode(e));
        }
        let mut out = String::with_capacity(64 * 1024);
        text::encode(&mut out, &b.registry, profile.text_profile()).map_err(|e| MetricsError::Encode(e.to_string()))?;
        Ok(out)
    }

    fn disk(&self) -> Labels {
        vec![("disk", self.disk.clone())]
    }

    /// A family of one sample labelled with the disk.
    fn one<K>(&self, v: Value) -> Family<K> {
        let mut f = Family::new();
        f.push(self.disk(), v);
        f
    }

    fn data_path(&self, b: &mut Builder, queues: &[QueueSnapshot]) {
        let mut requests = Family::new();
        let mut bytes = Family::new();
        let mut errors = Family::new();
        let mut latency = Family::new();
        let mut inflight = Family::new();
        for (q, snap) in queues.iter().enumerate() {
            let queue = |op: Option<StatOp>| {
                let mut l = vec![("disk", self.disk.clone()), ("queue", q.to_string())];
                if let Some(op) = op {
                    l.push(("op", op.name().to_string()));
                }
                l
            };
            inflight.push(queue(None), gauge_i(snap.inflight));
            for (op, s) in StatOp::ALL.iter().zip(&snap.ops) {
                requests.push(queue(Some(*op)), Value::Counter(s.requests));
                if !matches!(op, StatOp::GetId | StatOp::Invalid | StatOp::Flush) {
                    bytes.push(queue(Some(*op)), Value::Counter(s.bytes));
                }
                for (class, n) in ErrorClass::ALL.iter().zip(&s.errors) {
                    let mut l = queue(Some(*op));
                    l.push(("class", class.name().to_string()));
                    errors.push(l, Value::Counter(*n));
                }
                let bounds = LATENCY_BOUNDS_NS.iter().map(|&ns| ns as f64 / 1e9);
                latency.push(
                    queue(Some(*op)),
                    Value::Histogram { buckets: buckets(bounds, &s.buckets), count: s.requests, sum: s.latency_ns as f64 / 1e9 },
                );
            }
        }
        b.counter("requests", "Requests completed, by queue and operation (errors included).", requests);
        b.counter("request_bytes", "Bytes of requests completed successfully: data read or written, ranges discarded or zeroed.", bytes);
        b.counter("request_errors", "Requests completed with an error, by error class.", errors);
        b.histogram("request_duration_seconds", "Time from taking a request off the ring to completing it (parked time included).", latency);
        b.gauge("inflight_requests", "Requests taken off the ring and not yet completed (parked ones included).", inflight);
    }

    fn parking(&self, b: &mut Builder, snaps: &[QueueSnapshot]) {
        let mut parked = Family::new();
        for (q, s) in snaps.iter().enumerate() {
            parked.push(vec![("disk", self.disk.clone()), ("queue", q.to_string())], gauge_i(s.parked));
        }
        let (connections, recoveries, resubmitted, first_io) = self.device.restarts();
        b.counter("frontend_connections", "Frontend connections accepted (a QEMU reconnect after a daemon restart counts in the new daemon).", self.one(Value::Counter(connections)));
        b.counter("inflight_recoveries", "Queue starts that found requests of a previous daemon or connection in the inflight region.", self.one(Value::Counter(recoveries)));
        b.counter("resubmitted_requests", "Requests resubmitted from the inflight region after a restart or reconnect.", self.one(Value::Counter(resubmitted)));
        b.gauge("connect_to_first_io_seconds", "Seconds from the last frontend connection to its first request.", self.one(Value::GaugeF(first_io)));
        b.gauge("parked_requests", "Requests parked now, waiting for storage to recover or the volume to grow.", parked);
        b.counter("parks", "Times a request was parked (a retry that parks again counts again).", self.one(Value::Counter(self.hub.parked_total())));
        b.counter("park_retries", "Times parked requests were retried (volume grown, retry timer, or cont).", self.one(Value::Counter(self.hub.resumes())));
        let stints: f64 = snaps.iter().map(|s| s.parked_seconds).sum();
        b.counter("parked_seconds", "Seconds requests spent parked, summed over requests (counted when a stint ends).", self.one(Value::CounterF(stints)));
        let oldest = snaps.iter().map(|s| s.oldest_parked_seconds).fold(0.0, f64::max);
        b.gauge("parked_oldest_seconds", "Age of the oldest request parked now (0 when none is).", self.one(Value::GaugeF(oldest)));
        let c = self.faults.counters();
        b.counter("storage_errors", "Requests the storage failed (each attempt counts), before the error policy.", self.one(Value::Counter(c.errors)));
        let mut actions = Family::new();
        for (action, n) in [("report", c.reported), ("ignore", c.ignored), ("park", c.parked)] {
            let mut l = self.disk();
            l.push(("action", action.to_string()));
            actions.push(l, Value::Counter(n));
        }
        b.counter("storage_error_actions", "What the error policy did with storage failures.", actions);
    }

    fn image_and_volume(&self, b: &mut Builder) {
        b.gauge("capacity_bytes", "The disk's virtual size.", self.one(gauge_i(self.image.capacity())));
        if let Some(h) = &self.handover {
            let s = h.status();
            b.gauge("image_active", "1 while this daemon owns the image (0: an incoming migration before its switch-over, or a source after it).", self.one(Value::Gauge(i64::from(s.active))));
            b.counter("image_activations", "Times this daemon took the image (a migration's destination at its switch-over, or a source whose migration failed).", self.one(Value::Counter(s.activations)));
            b.counter("image_handovers", "Times this daemon handed the image over at a migration's switch-over.", self.one(Value::Counter(s.handovers)));
            b.counter("image_handover_failures", "Activations or handovers that failed (the image then stays where it was).", self.one(Value::Counter(s.failures)));
        }
        if let Some(c) = &self.chain {
            use std::sync::atomic::Ordering::Relaxed;
            b.gauge("chain_depth", "Images in the chain served (the top included).", self.one(gauge_i(self.image.chain().len() as u64)));
            b.counter("snapshots", "Online snapshots taken (a new top).", self.one(Value::Counter(c.snapshots.load(Relaxed))));
            b.counter("snapshot_failures", "Snapshots refused or failed (the chain left as it was).", self.one(Value::Counter(c.snapshot_failures.load(Relaxed))));
            b.gauge("snapshot_last_pause_seconds", "How long the last snapshot held guest writes.", self.one(Value::GaugeF(c.last_pause_us.load(Relaxed) as f64 / 1e6)));
        }
        if let Some(j) = &self.jobs {
            use std::sync::atomic::Ordering::Relaxed;
            b.gauge("jobs_running", "Chain jobs (live merges) running now.", self.one(gauge_i(j.running.load(Relaxed))));
            b.counter("job_copied_bytes", "Bytes chain jobs copied (into merge bases).", self.one(Value::Counter(j.bytes.load(Relaxed))));
            let mut ended = Family::new();
            for (outcome, n) in [("completed", &j.completed), ("cancelled", &j.cancelled), ("failed", &j.failed)] {
                let mut l = self.disk();
                l.push(("outcome", outcome.to_string()));
                ended.push(l, Value::Counter(n.load(Relaxed)));
            }
            b.counter("jobs_concluded", "Chain jobs that ended, by outcome (failed and cancelled ones leave the chain as it was).", ended);
        }
        if let Some(a) = self.image.allocation() {
            b.gauge("allocation_bytes", "One past the last host byte the qcow2 image uses (metadata included).", self.one(gauge_i(a)));
        }
        if let Some((hits, misses)) = self.image.cache_stats() {
            b.counter("l2_cache_hits", "qcow2 L2 table lookups served from the cache.", self.one(Value::Counter(hits)));
            b.counter("l2_cache_misses", "qcow2 L2 tables read from the image into the cache.", self.one(Value::Counter(misses)));
        }
        let Some(thin) = &self.thin else { return };
        let s = thin.lock().map(|s| s.clone()).unwrap_or_default();
        b.gauge("volume_physical_bytes", "The thin volume's size (the LV's size as last refreshed).", self.one(gauge_i(s.physical)));
        b.gauge("write_threshold_bytes", "The armed write threshold (0 when none is armed).", self.one(gauge_i(s.threshold.unwrap_or(0))));
        b.gauge("volume_max_size_bytes", "The largest size the volume is extended to.", self.one(gauge_i(s.max_size)));
        let mut state = Family::new();
        for name in DriveState::NAMES {
            let mut l = self.disk();
            l.push(("state", name.to_string()));
            state.push(l, Value::Gauge(i64::from(s.state_name == name)));
        }
        b.gauge("thin_state", "The thin volume's extension state: 1 for the current one.", state);
        b.counter("extension_requests", "Extension requests sent to the SPM (re-sends included).", self.one(Value::Counter(s.requests)));
        b.counter("extensions_completed", "Extensions that grew the volume.", self.one(Value::Counter(s.completed)));
        b.counter("extension_failures", "SPM replies that left the volume too small.", self.one(Value::Counter(s.failed)));
        let count = s.duration_buckets.iter().sum();
        let bounds = EXTENSION_BOUNDS_S.iter().copied();
        b.histogram(
            "extension_duration_seconds",
            "Time from the first extension request to the refreshed, grown volume.",
            self.one(Value::Histogram { buckets: buckets(bounds, &s.duration_buckets), count, sum: s.duration_sum }),
        );
        b.gauge("mailbox_slots_in_use", "Mailbox slots holding our requests.", self.one(gauge_i(s.slots_in_use)));
        b.gauge("mailbox_queued_requests", "Extension requests waiting for a free mailbox slot.", self.one(gauge_i(s.queued)));
        b.counter("mailbox_write_errors", "Writes of this host's mailbox block that failed (each attempt; retried at the next poll).", self.one(Value::Counter(s.mailbox_write_errors)));
        b.counter("mailbox_slots_reclaimed", "Stale slots of this host's mailbox block this process freed (markers and requests of gone processes).", self.one(Value::Counter(s.mailbox_slots_reclaimed)));
        b.gauge("allocation_rate_bytes_per_second", "The allocation rate rate-aware sizing sees (average over a few seconds; 0 with --spec-sizing).", self.one(Value::GaugeF(s.rate_bps)));
        b.gauge("extension_round_trip_seconds", "The extension round trip rate-aware sizing assumes (0 with --spec-sizing).", self.one(Value::GaugeF(s.round_trip_s)));
    }

    fn process(&self, b: &mut Builder) {
        let mut up = Family::new();
        up.push(Vec::new(), Value::GaugeF(self.started.elapsed().as_secs_f64()));
        b.gauge("uptime_seconds", "Seconds since the daemon started.", up);
        let mut info = Family::new();
        info.push(
            vec![("version", env!("CARGO_PKG_VERSION").to_string()), ("profile", if cfg!(debug_assertions) { "debug" } else { "release" }.to_string())],
            Value::Gauge(1),
        );
        b.gauge("build_info", "The daemon's version and build profile (always 1).", info);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        assert_eq!(Profile::negotiate(None), Profile::Prometheus);
        assert_eq!(Profile::negotiate(Some("text/plain")), Profile::Prometheus);
        assert_eq!(Profile::negotiate(Some("*/*")), Profile::Prometheus);
        assert_eq!(Profile::negotiate(Some("application/openmetrics-text")), Profile::OpenMetrics);
        // What Prometheus 2.x sends.
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Profile::negotiate(Some(prom)), Profile::OpenMetrics);
        assert_eq!(Profile::negotiate(Some("application/openmetrics-text; version=0.0.1")), Profile::OpenMetrics001);
        assert_eq!(Profile::negotiate(Some("text/plain;q=1, application/openmetrics-text;q=0.5")), Profile::Prometheus);
        assert_eq!(Profile::negotiate(Some("application/openmetrics-text;version=9.9")), Profile::Prometheus);
        assert_eq!(Profile::negotiate(Some("application/openmetrics-text;q=0")), Profile::Prometheus);
        assert_eq!(Profile::negotiate(Some(";;,,=;q=x")), Profile::Prometheus);
    }
}

//! Request statistics of the data path: per queue, per operation.
//!
//! Each [`QueueStats`] is written by one worker at a time (the worker's mutex serialises
//! them), so an update is a relaxed load and store on a cache line no other writer touches:
//! no lock, no atomic read-modify-write. The metrics thread reads with relaxed loads; a
//! scrape may see one request's counters half-updated, never torn values.
//! The stats outlive frontend connections: workers come and go, the counters stay.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::request::RequestType;

/// The operations requests are counted under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatOp {
    /// VIRTIO_BLK_T_IN.
    Read,
    /// VIRTIO_BLK_T_OUT.
    Write,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
    /// VIRTIO_BLK_T_GET_ID.
    GetId,
    /// A chain that was not a valid request (its type may be unknown).
    Invalid,
}

impl StatOp {
    /// Every operation, in label order.
    pub const ALL: [StatOp; 7] =
        [StatOp::Read, StatOp::Write, StatOp::Flush, StatOp::Discard, StatOp::WriteZeroes, StatOp::GetId, StatOp::Invalid];

    /// The `op` label value.
    pub fn name(self) -> &'static str {
        match self {
            StatOp::Read => "read",
            StatOp::Write => "write",
            StatOp::Flush => "flush",
            StatOp::Discard => "discard",
            StatOp::WriteZeroes => "write_zeroes",
            StatOp::GetId => "get_id",
            StatOp::Invalid => "invalid",
        }
    }

    /// The operation a parsed request counts under.
    pub fn of(kind: RequestType) -> StatOp {
        match kind {
            RequestType::Read => StatOp::Read,
            RequestType::Write => StatOp::Write,
            RequestType::Flush => StatOp::Flush,
            RequestType::Discard => StatOp::Discard,
            RequestType::WriteZeroes => StatOp::WriteZeroes,
            RequestType::GetId => StatOp::GetId,
        }
    }
}

pub use crate::error::ErrorClass;

/// Upper bounds of the latency buckets in nanoseconds: 10 µs to 10 s (a last, unbounded
/// bucket follows).
pub const LATENCY_BOUNDS_NS: [u64; 19] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

const BUCKETS: usize = LATENCY_BOUNDS_NS.len() + 1;

/// Adds `n` to a counter only one thread writes at a time.
#[inline]
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// Counters of one operation on one queue.
#[derive(Default)]
struct OpStats {
    requests: AtomicU64,
    bytes: AtomicU64,
    errors: [AtomicU64; ErrorClass::ALL.len()],
    /// Per-bucket (not cumulative) latency counts.
    buckets: [AtomicU64; BUCKETS],
    latency_ns: AtomicU64,
}

/// One queue's statistics (kept across frontend connections).
pub struct QueueStats {
    epoch: Instant,
    ops: [OpStats; StatOp::ALL.len()],
    inflight: AtomicU64,
    parked: AtomicU64,
    parked_ns: AtomicU64,
    /// Nanoseconds since `epoch` at which the oldest request parked now was first parked,
    /// plus one; 0 when none is parked.
    oldest_parked: AtomicU64,
}

/// A plain copy of one operation's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpSnapshot {
    /// Requests completed (successes and errors).
    pub requests: u64,
    /// Bytes of requests completed successfully (data of reads and writes, ranges of
    /// discards and write-zeroes).
    pub bytes: u64,
    /// Errors by [`ErrorClass::ALL`] index.
    pub errors: [u64; ErrorClass::ALL.len()],
    /// Latency counts per bucket of [`LATENCY_BOUNDS_NS`], then the unbounded one.
    pub buckets: [u64; BUCKETS],
    /// Sum of latencies in nanoseconds.
    pub latency_ns: u64,
}

/// A plain copy of one queue's statistics.
#[derive(Clone, Debug, Default)]
pub struct QueueSnapshot {
    /// Per operation, in [`StatOp::ALL`] order.
    pub ops: Vec<OpSnapshot>,
    /// Requests taken from the ring and not yet completed (parked ones included).
    pub inflight: u64,
    /// Requests parked now.
    pub parked: u64,
    /// Seconds requests spent parked, summed over requests (stints that ended).
    pub parked_seconds: f64,
    /// Age in seconds of the oldest request parked now (0 if none).
    pub oldest_parked_seconds: f64,
}

impl QueueStats {
    fn new(epoch: Instant) -> QueueStats {
        QueueStats {
            epoch,
            ops: Default::default(),
            inflight: AtomicU64::new(0),
            parked: AtomicU64::new(0),
            parked_ns: AtomicU64::new(0),
            oldest_parked: AtomicU64::new(0),
        }
    }

    /// Records a completed request that started at `started`.
    #[inline]
    pub fn record(&self, op: StatOp, started: Instant, bytes: u64, error: Option<ErrorClass>) {
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let s = &self.ops[op as usize];
        bump(&s.requests, 1);
        match error {
            None => bump(&s.bytes, bytes),
            Some(c) => bump(&s.errors[c as usize], 1),
        }
        let b = LATENCY_BOUNDS_NS.iter().position(|&bound| ns <= bound).unwrap_or(LATENCY_BOUNDS_NS.len());
        bump(&s.buckets[b], 1);
        bump(&s.latency_ns, ns);
    }

    /// A request was taken from the ring.
    #[inline]
    pub(crate) fn started(&self) {
        bump(&self.inflight, 1);
    }

    /// A request left (completed, or dropped at a disconnect).
    #[inline]
    pub(crate) fn retired(&self) {
        self.inflight.store(self.inflight.load(Ordering::Relaxed).saturating_sub(1), Ordering::Relaxed);
    }

    /// Requests left the parked list after `stints` nanoseconds parked in all; `parked`
    /// are still parked, the oldest of them first parked at `oldest`.
    pub(crate) fn set_parked(&self, parked: usize, stints_ns: u64, oldest: Option<Instant>) {
        bump(&self.parked_ns, stints_ns);
        self.parked.store(parked as u64, Ordering::Relaxed);
        let mark = oldest.map(|t| u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX - 1) + 1);
        self.oldest_parked.store(mark.unwrap_or(0), Ordering::Relaxed);
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> QueueSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let ops = self
            .ops
            .iter()
            .map(|s| OpSnapshot {
                requests: load(&s.requests),
                bytes: load(&s.bytes),
                errors: std::array::from_fn(|i| load(&s.errors[i])),
                buckets: std::array::from_fn(|i| load(&s.buckets[i])),
                latency_ns: load(&s.latency_ns),
            })
            .collect();
        let oldest = load(&self.oldest_parked);
        let oldest_parked_seconds = if oldest == 0 {
            0.0
        } else {
            let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
            now.saturating_sub(oldest - 1) as f64 / 1e9
        };
        QueueSnapshot {
            ops,
            inflight: load(&self.inflight),
            parked: load(&self.parked),
            parked_seconds: load(&self.parked_ns) as f64 / 1e9,
            oldest_parked_seconds,
        }
    }
}

/// The statistics of every queue of a device.
pub struct DeviceStats {
    queues: Vec<Arc<QueueStats>>,
    /// Frontend connections accepted.
    connections: std::sync::atomic::AtomicU64,
    /// Queue starts that recovered a used inflight region (a restart or reconnect seen).
    recoveries: std::sync::atomic::AtomicU64,
    /// Requests resubmitted from recovered inflight regions.
    resubmitted: std::sync::atomic::AtomicU64,
    /// Nanoseconds from the last connection to its first request (0: none yet).
    first_io_ns: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for DeviceStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceStats").field("queues", &self.queues.len()).finish()
    }
}

impl DeviceStats {
    /// A frontend connected.
    pub fn connected(&self) {
        self.connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A queue started on a used inflight region, resubmitting `n` requests.
    pub fn recovered(&self, n: usize) {
        self.recoveries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.resubmitted.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// The first request of the current connection arrived `d` after it connected.
    pub fn first_io(&self, d: std::time::Duration) {
        self.first_io_ns.store(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), std::sync::atomic::Ordering::Relaxed);
    }

    /// (connections, recoveries, resubmitted requests, seconds from the last connection to
    /// its first request).
    pub fn restarts(&self) -> (u64, u64, u64, f64) {
        let o = std::sync::atomic::Ordering::Relaxed;
        (self.connections.load(o), self.recoveries.load(o), self.resubmitted.load(o), self.first_io_ns.load(o) as f64 / 1e9)
    }

    /// Statistics for `num_queues` queues, all zero.
    pub fn new(num_queues: usize) -> Arc<DeviceStats> {
        let epoch = Instant::now();
        Arc::new(DeviceStats {
            queues: (0..num_queues).map(|_| Arc::new(QueueStats::new(epoch))).collect(),
            connections: Default::default(),
            recoveries: Default::default(),
            resubmitted: Default::default(),
            first_io_ns: Default::default(),
        })
    }

    /// Queue `q`'s statistics.
    pub fn queue(&self, q: usize) -> Option<Arc<QueueStats>> {
        self.queues.get(q).cloned()
    }

    /// A copy of every queue's counters, in queue order.
    pub fn snapshot(&self) -> Vec<QueueSnapshot> {
        self.queues.iter().map(|q| q.snapshot()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn records_counts_bytes_errors_and_buckets() {
        let d = DeviceStats::new(2);
        let q = d.queue(1).unwrap();
        let t = Instant::now();
        q.record(StatOp::Read, t, 4096, None);
        q.record(StatOp::Read, t, 4096, Some(ErrorClass::Io));
        q.record(StatOp::Write, t - Duration::from_secs(20), 512, None);
        let s = d.snapshot();
        assert_eq!(s[0].ops[0], OpSnapshot::default());
        let r = &s[1].ops[StatOp::Read as usize];
        assert_eq!((r.requests, r.bytes), (2, 4096), "bytes count successes only");
        assert_eq!(r.errors[ErrorClass::Io as usize], 1);
        assert_eq!(r.buckets.iter().sum::<u64>(), 2);
        let w = &s[1].ops[StatOp::Write as usize];
        assert_eq!(w.buckets[LATENCY_BOUNDS_NS.len()], 1, "20 s lands in the unbounded bucket");
        assert!(w.latency_ns >= 20_000_000_000);
    }

    #[test]
    fn inflight_and_parked_gauges() {
        let d = DeviceStats::new(1);
        let q = d.queue(0).unwrap();
        q.started();
        q.started();
        q.retired();
        q.retired();
        q.retired();
        assert_eq!(q.snapshot().inflight, 0, "never below zero");
        let since = Instant::now();
        q.set_parked(2, 0, Some(since));
        std::thread::sleep(Duration::from_millis(50));
        let s = q.snapshot();
        assert_eq!(s.parked, 2);
        assert!(s.oldest_parked_seconds >= 0.05 && s.oldest_parked_seconds < 60.0, "{}", s.oldest_parked_seconds);
        q.set_parked(0, 1_500_000_000, None);
        let s = q.snapshot();
        assert_eq!((s.parked, s.oldest_parked_seconds), (0, 0.0));
        assert!((s.parked_seconds - 1.5).abs() < 1e-9);
    }

    #[test]
    fn errno_classes() {
        assert_eq!(ErrorClass::of_errno(libc::ENOSPC), ErrorClass::NoSpace);
        assert_eq!(ErrorClass::of_errno(libc::ENOTCONN), ErrorClass::Link);
        assert_eq!(ErrorClass::of_errno(libc::EFAULT), ErrorClass::GuestMemory);
        assert_eq!(ErrorClass::of_errno(libc::EIO), ErrorClass::Io);
    }
}

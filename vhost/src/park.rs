//! Parked requests: a request that cannot go on yet (the thin volume is full, or the storage
//! failed and the error policy says wait) is held, with its descriptor chain and guest
//! mapping, instead of being completed. Whoever clears the cause (the thin-volume control
//! thread, the retry timer, an operator's `cont`) calls [`ParkHub::resume`]; every worker then
//! retries its parked requests. The hub outlives device instances (one per connection).
//!
//! What a failed request becomes is the [`FaultPolicy`]'s decision (werror/rerror).

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Which error policy a request falls under: reads follow `rerror`; writes, flushes,
/// discards and write-zeroes follow `werror`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    /// A read.
    Read,
    /// A write, flush, discard or write-zeroes.
    Write,
}

/// Why a request was parked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParkCause {
    /// The format refused an allocation ending at `needed` past the volume size `limit`.
    VolumeFull {
        /// Where the allocation would end (bytes).
        needed: u64,
        /// The volume size it passes (bytes).
        limit: u64,
    },
    /// Host IO failed with `errno` and the policy parked it (ENOSPC included: a write that
    /// stopped short at the volume's end counts as ENOSPC).
    Failed {
        /// Read or write policy.
        op: FaultOp,
        /// The error.
        errno: i32,
    },
    /// The disk is frozen (`ctl freeze`, for a backup): writes wait for the thaw.
    Frozen,
}

impl ParkCause {
    /// Whether more space would cure it (a thin volume should grow).
    pub fn is_no_space(&self) -> bool {
        matches!(self, ParkCause::VolumeFull { .. } | ParkCause::Failed { errno: libc::ENOSPC, .. })
    }
}

/// What to do with a request whose host IO failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// Complete it with VIRTIO_BLK_S_IOERR.
    Report,
    /// Complete it as a success (the data is lost; logged loudly).
    Ignore,
    /// Hold it until the hub resumes the workers.
    Park,
}

/// The error policy (werror / rerror): called on worker threads, so quick and non-blocking.
pub trait FaultPolicy: Send + Sync {
    /// A request of kind `op` failed with `errno`: what now.
    fn on_error(&self, op: FaultOp, errno: i32) -> FaultAction;
    /// A request completed successfully (resets retry timeouts).
    fn on_success(&self);
    /// Where the first-failure instant outlives this process (the frontend's inflight
    /// region), or None when the connection that had one ends. The policy adopts an instant
    /// it finds there and keeps it current.
    fn carry(&self, _clock: Option<crate::inflight::FailureClock>) {}
}

/// Until a policy is installed: every failure is reported.
struct DefaultPolicy;

impl FaultPolicy for DefaultPolicy {
    fn on_error(&self, _op: FaultOp, _errno: i32) -> FaultAction {
        FaultAction::Report
    }
    fn on_success(&self) {}
}

/// Told whenever a request is parked (called on a worker thread: be quick, never block).
pub trait ParkListener: Send + Sync {
    /// A request of queue `queue` was parked for `cause`.
    fn parked(&self, queue: usize, cause: ParkCause);
}

/// Shared between the workers (which park) and the side that resumes them.
pub struct ParkHub {
    wake: Vec<EventFd>,
    parked: AtomicUsize,
    total: AtomicU64,
    resumes: AtomicU64,
    listener: RwLock<Option<Arc<dyn ParkListener>>>,
    policy: std::sync::OnceLock<Arc<dyn FaultPolicy>>,
    /// Frozen: writes are held (parked) as they arrive; reads flow.
    frozen: std::sync::atomic::AtomicBool,
    /// Chain changes holding writes now ([`ParkHub::hold`]).
    holds: std::sync::atomic::AtomicUsize,
    /// Write requests (write, discard, write-zeroes) at the storage now, over all queues.
    writes: AtomicUsize,
    /// Bumped at every freeze (a timeout thaws only the freeze it was armed for).
    freezes: AtomicU64,
}

impl fmt::Debug for ParkHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParkHub").field("queues", &self.wake.len()).field("parked", &self.parked()).finish()
    }
}

impl ParkHub {
    /// A hub for `num_queues` workers.
    pub fn new(num_queues: usize) -> io::Result<Arc<ParkHub>> {
        let wake = (0..num_queues).map(|_| EventFd::new(EFD_NONBLOCK)).collect::<io::Result<Vec<_>>>()?;
        Ok(Arc::new(ParkHub { wake, parked: AtomicUsize::new(0), total: AtomicU64::new(0), resumes: AtomicU64::new(0),
            listener: RwLock::new(None),
            policy: std::sync::OnceLock::new(),
            frozen: std::sync::atomic::AtomicBool::new(false),
            holds: std::sync::atomic::AtomicUsize::new(0),
            writes: AtomicUsize::new(0),
            freezes: AtomicU64::new(0),
        }))
    }

    /// Installs the listener; without one, nothing is parked (ENOSPC is reported).
    pub fn set_listener(&self, listener: Arc<dyn ParkListener>) {
        if let Ok(mut l) = self.listener.write() {
            *l = Some(listener);
        }
    }

    /// Whether a listener is installed (a thin volume can cure a full volume).
    pub fn enabled(&self) -> bool {
        self.listener.read().map(|l| l.is_some()).unwrap_or(false)
    }

    /// Installs the error policy (once, before serving; it may change its own settings at
    /// run time). Lock-free to consult afterwards.
    pub fn set_policy(&self, policy: Arc<dyn FaultPolicy>) {
        let _ = self.policy.set(policy);
    }

    /// The policy's decision for a failed request (without a policy installed: report).
    pub fn on_error(&self, op: FaultOp, errno: i32) -> FaultAction {
        match self.policy.get() {
            Some(p) => p.on_error(op, errno),
            None => DefaultPolicy.on_error(op, errno),
        }
    }

    /// A request succeeded.
    pub fn on_success(&self) {
        if let Some(p) = self.policy.get() {
            p.on_success();
        }
    }

    /// Hands the policy the first-failure clock of the connection's inflight region (None:
    /// the connection ended).
    pub fn carry_failure_clock(&self, clock: Option<crate::inflight::FailureClock>) {
        if let Some(p) = self.policy.get() {
            p.carry(clock);
        }
    }

    /// Wakes every worker to retry its parked requests.
    pub fn resume(&self) {
        self.resumes.fetch_add(1, Ordering::SeqCst);
        for w in &self.wake {
            if let Err(e) = w.write(1) {
                tracing::error!(error = %e, "waking a worker to resume parked IO failed");
            }
        }
    }

    /// Whether writes are held (a freeze, or a chain change's hold).
    pub fn frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst) || self.holds.load(Ordering::SeqCst) > 0
    }

    /// Holds new writes for a chain change (a snapshot's switch, a pivot) and waits (at most
    /// `limit`) until none is at the storage. Independent of `freeze`: a `thaw` or a freeze's
    /// timeout does not release it, only [`ParkHub::release`] does.
    pub fn hold(&self, limit: std::time::Duration) -> Result<(), String> {
        self.holds.fetch_add(1, Ordering::SeqCst);
        self.drain_writes(limit).inspect_err(|_| self.release())
    }

    /// Waits (at most `limit`) until no write is at the storage; the error says how many
    /// were still there. New writes must already be held (by a hold or a freeze).
    fn drain_writes(&self, limit: std::time::Duration) -> Result<(), String> {
        let deadline = std::time::Instant::now() + limit;
        while self.writes_in_flight() > 0 {
            if std::time::Instant::now() >= deadline {
                let left = self.writes_in_flight();
                return Err(format!("{left} writes still at the storage after {} ms", limit.as_millis()));
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        Ok(())
    }

    /// Ends one [`ParkHub::hold`]; held writes resume unless something else holds them.
    pub fn release(&self) {
        let before = self.holds.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| Some(h.saturating_sub(1))).unwrap_or(0);
        if before == 1 && !self.frozen.load(Ordering::SeqCst) {
            self.resume();
        }
    }

    /// A write request went to the storage.
    pub(crate) fn write_begin(&self) {
        self.writes.fetch_add(1, Ordering::SeqCst);
    }

    /// A write request left the storage (completed, failed or parked).
    pub(crate) fn write_end(&self) {
        let _ = self.writes.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| Some(w.saturating_sub(1)));
    }

    /// Write requests at the storage now.
    pub fn writes_in_flight(&self) -> usize {
        self.writes.load(Ordering::SeqCst)
    }

    /// Holds new writes and waits (at most `limit`) until none is at the storage; returns the
    /// freeze's number, or an error (the freeze is undone) if writes did not drain in time.
    pub fn freeze(&self, limit: std::time::Duration) -> Result<u64, String> {
        let n = self.freezes.fetch_add(1, Ordering::SeqCst) + 1;
        self.frozen.store(true, Ordering::SeqCst);
        self.drain_writes(limit).inspect_err(|_| self.thaw())?;
        Ok(n)
    }

    /// Releases held writes (they are retried now), unless a chain change holds them.
    pub fn thaw(&self) {
        if self.frozen.swap(false, Ordering::SeqCst) && self.holds.load(Ordering::SeqCst) == 0 {
            tracing::info!("disk thawed: held writes resume");
            self.resume();
        }
    }

    /// Thaws if freeze number `n` is still the current one (a freeze's timeout).
    pub fn thaw_if(&self, n: u64) -> bool {
        if self.freezes.load(Ordering::SeqCst) == n && self.frozen.load(Ordering::SeqCst) {
            self.thaw();
            return true;
        }
        false
    }

    /// Requests parked now.
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::SeqCst)
    }

    /// Requests parked since start (each parking counts).
    pub fn parked_total(&self) -> u64 {
        self.total.load(Ordering::SeqCst)
    }

    /// How many times the workers were told to resume.
    pub fn resumes(&self) -> u64 {
        self.resumes.load(Ordering::SeqCst)
    }

    /// The eventfd worker `queue` listens on.
    pub(crate) fn wake_fd(&self, queue: usize) -> Option<RawFd> {
        self.wake.get(queue).map(|w| w.as_raw_fd())
    }

    /// Consumes queue `queue`'s wake-up.
    pub(crate) fn ack(&self, queue: usize) {
        if let Some(w) = self.wake.get(queue) {
            let _ = w.read();
        }
    }

    pub(crate) fn on_park(&self, queue: usize, cause: ParkCause) {
        self.parked.fetch_add(1, Ordering::SeqCst);
        self.total.fetch_add(1, Ordering::SeqCst);
        let listener = self.listener.read().ok().and_then(|l| l.clone());
        if let Some(l) = listener {
            l.parked(queue, cause);
        }
    }

    pub(crate) fn on_unpark(&self, n: usize) {
        let _ = self.parked.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| Some(v.saturating_sub(n)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Rec(Mutex<Vec<(usize, ParkCause)>>);
    impl ParkListener for Rec {
        fn parked(&self, queue: usize, cause: ParkCause) {
            self.0.lock().unwrap().push((queue, cause));
        }
    }

    #[test]
    fn counts_notifies_and_wakes_every_queue() {
        let hub = ParkHub::new(2).unwrap();
        assert!(!hub.enabled());
        let rec = Arc::new(Rec(Mutex::new(Vec::new())));
        hub.set_listener(rec.clone());
        assert!(hub.enabled());
        hub.on_park(1, ParkCause::Failed { op: FaultOp::Write, errno: libc::ENOSPC });
        hub.on_park(0, ParkCause::VolumeFull { needed: 2, limit: 1 });
        assert_eq!((hub.parked(), hub.parked_total()), (2, 2));
        hub.on_unpark(2);
        assert_eq!((hub.parked(), hub.parked_total()), (0, 2));
        assert_eq!(rec.0.lock().unwrap().len(), 2);
        hub.resume();
        for q in 0..2 {
            assert_eq!(hub.wake[q].read().unwrap(), 1);
        }
    }

    #[test]
    fn a_hold_or_freeze_that_cannot_drain_in_time_lets_writes_go_again() {
        let hub = ParkHub::new(1).unwrap();
        let limit = std::time::Duration::from_millis(5);
        hub.write_begin();
        let e = hub.freeze(limit).unwrap_err();
        assert!(e.starts_with("1 writes still at the storage"), "{e}");
        assert!(!hub.frozen(), "a freeze that timed out is undone");
        assert!(hub.hold(limit).is_err());
        assert!(!hub.frozen(), "a hold that timed out is released");
        // A freeze's timeout does not release a hold that drained.
        hub.write_end();
        hub.hold(limit).unwrap();
        hub.write_begin();
        assert!(hub.freeze(limit).is_err());
        assert!(hub.frozen(), "the hold still holds writes");
        hub.write_end();
        hub.release();
        assert!(!hub.frozen());
        assert_eq!(hub.freeze(limit).unwrap(), 3);
        assert!(hub.frozen());
    }
}

//! What every worker of a device reads: the image, the fixed geometry, the guest memory
//! (swapped by the session as the frontend changes its memory table) and the flags the
//! frontend or the daemon set.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, RwLock};

use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::config::BlkGeometry;
use crate::image::Disk;
use crate::park::ParkHub;
use crate::request::{Limits, ID_LEN};
use crate::stats::QueueStats;

/// Guest memory as we map it: every region logs the writes made through it into the
/// session's dirty log ([`crate::guest_write`]).
pub type Mem = GuestMemoryMmap<crate::guest_write::LogBitmap>;
/// The shared, swappable guest memory handle.
pub type AtomicMem = GuestMemoryAtomic<Mem>;

/// What every worker reads: the image, the limits, the guest memory, the cache mode.
pub struct Context {
    /// The image format serving this disk.
    pub image: Arc<dyn Disk>,
    /// Fixed device properties.
    pub geometry: BlkGeometry,
    /// GET_ID payload, NUL padded.
    pub serial: [u8; ID_LEN],
    /// Write-back cache enabled (the guest may clear it through the config space).
    pub writeback: AtomicBool,
    /// VIRTIO_RING_F_EVENT_IDX negotiated.
    pub event_idx: AtomicBool,
    /// Set at shutdown: no new chains are popped.
    pub stopping: AtomicBool,
    /// Parked requests' hub.
    pub park: Arc<ParkHub>,
    pub(crate) mem: RwLock<Option<AtomicMem>>,
    /// When the frontend connected, until its first request arrives.
    pub(crate) connected_at: std::sync::Mutex<Option<std::time::Instant>>,
    /// Set at a connection, cleared by its first request (keeps the lock off the data path).
    pub(crate) awaiting_first_io: AtomicBool,
    /// The frontend holds an inflight region: what is left uncompleted at a stop is
    /// resubmitted by the next daemon.
    pub(crate) inflight_tracked: AtomicBool,
    /// Statistics kept across connections (None: not kept).
    pub(crate) stats: Option<Arc<crate::stats::DeviceStats>>,
    /// Closed while an earlier connection's requests are still at the storage.
    pub(crate) gate: Gate,
    /// How long stops wait (parked grace, storage).
    pub(crate) limits: StopLimits,
}

/// Holds a new connection's queues while requests of earlier connections, which their stops
/// gave up on, are still at the storage: nothing is resubmitted or popped before they end, so
/// a resubmitted or newer write never lands before a stale one. Open by default. It holds only
/// the earlier devices' request counts (a `reap-stale` thread owns the devices).
#[derive(Default)]
pub struct Gate {
    closed: AtomicBool,
    /// The request counts of the earlier connections' queues still to reach zero.
    behind: std::sync::Mutex<Vec<Arc<InHand>>>,
}

impl Gate {
    /// Closes the gate until every count in `behind` is zero.
    pub fn close_until(&self, behind: Vec<Arc<InHand>>) {
        let mut b = self.behind.lock().unwrap_or_else(|e| e.into_inner());
        b.extend(behind);
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The counts still waited for (empty when open): a gated device hands them on to the
    /// next connection's, so a gate never opens before an older one would have.
    pub fn waiting_for(&self) -> Vec<Arc<InHand>> {
        if self.open() {
            return Vec::new();
        }
        self.behind.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether requests may run (one atomic load while open).
    pub fn open(&self) -> bool {
        if !self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return true;
        }
        let mut b = self.behind.lock().unwrap_or_else(|e| e.into_inner());
        b.retain(|c| c.get() > 0);
        if b.is_empty() {
            self.closed.store(false, std::sync::atomic::Ordering::SeqCst);
            tracing::info!("the previous connections' requests have ended: serving");
            return true;
        }
        false
    }
}

impl Context {
    /// A context for in-process worker tests: `image`, guest memory `mem`, hub `park`.
    #[cfg(test)]
    pub(crate) fn for_test(image: Arc<dyn Disk>, mem: AtomicMem, park: Arc<ParkHub>) -> Context {
        let capacity = image.capacity();
        Context {
            image,
            geometry: BlkGeometry {
                capacity_bytes: capacity,
                logical_block_size: 512,
                physical_block_size: 512,
                num_queues: 1,
                queue_size: 16,
                read_only: false,
            },
            serial: [0; ID_LEN],
            writeback: AtomicBool::new(true),
            event_idx: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            park,
            mem: RwLock::new(Some(mem)),
            connected_at: std::sync::Mutex::new(None),
            awaiting_first_io: AtomicBool::new(false),
            inflight_tracked: AtomicBool::new(false),
            stats: None,
            gate: Gate::default(),
            limits: StopLimits::default(),
        }
    }

    /// The current guest memory, pinned for as long as the returned Arc lives.
    pub fn memory(&self) -> Option<Arc<Mem>> {
        let guard = self.mem.read().ok()?;
        guard.as_ref().map(|m| m.memory().into_inner())
    }

    /// The first request since the frontend connected arrived: logged and counted once.
    pub fn note_first_io(&self) {
        if !self.awaiting_first_io.load(std::sync::atomic::Ordering::Relaxed)
            || !self.awaiting_first_io.swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let Ok(mut at) = self.connected_at.lock() else { return };
        if let Some(t) = at.take() {
            let d = t.elapsed();
            tracing::info!(ms = d.as_millis() as u64, "first request since the frontend connected");
            if let Some(s) = &self.stats {
                s.first_io(d);
            }
        }
    }

    /// Validation limits for requests.
    pub fn limits(&self) -> Limits {
        Limits {
            capacity: self.geometry.capacity_bytes,
            logical_block_size: self.geometry.logical_block_size,
            seg_max: self.geometry.seg_max(),
            max_bytes: self.geometry.max_request_bytes(),
            read_only: self.geometry.read_only,
        }
    }
}

/// How long parked requests keep being retried once the frontend stops a queue or the daemon
/// stops, before they are completed with an IO error (default of [`StopLimits`]).
pub const PARKED_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a stop waits, after the grace, for requests still at the storage (a retry in
/// flight completes, and is reported). Storage that hangs past this leaves them in flight:
/// the stop answers anyway, logged, rather than hang the frontend, and fences them (default
/// of [`StopLimits`]).
pub const STOP_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a stop (GET_VRING_BASE, a disconnect, SIGTERM) waits before it gives up on what
/// storage has not answered. A stop never waits longer than `parked_grace + limit` (plus the
/// final flush at exit); what it gives up on is fenced (`InHand::fence`).
#[derive(Clone, Copy, Debug)]
pub struct StopLimits {
    /// Parked requests keep being retried this long, then are completed with an IO error.
    pub parked_grace: std::time::Duration,
    /// Requests at the storage (and a queue thread inside a metadata read or write) are
    /// waited for this long after the grace.
    pub limit: std::time::Duration,
}

impl Default for StopLimits {
    fn default() -> StopLimits {
        StopLimits { parked_grace: PARKED_GRACE, limit: STOP_LIMIT }
    }
}

/// The requests in a queue's hands (popped, not yet completed), shared between its worker and
/// the stop paths. ("Inflight" elsewhere names the frontend's SHMFD region: `crate::inflight`.)
#[derive(Default)]
pub struct InHand {
    count: Mutex<usize>,
    idle: Condvar,
    /// Threads in [`InHand::wait_idle_for`] (changed under `count`'s lock): the last
    /// completion notifies only if one waits (a notification is a futex call even with no
    /// waiter, once per completion batch on the hot path otherwise).
    waiters: std::sync::atomic::AtomicUsize,
    /// A stop gave up waiting for the requests in hand ([`InHand::fence`]): they are
    /// released without a word to the guest when they end, and nothing new is taken until
    /// the last of them has. Cleared when the count reaches zero.
    stale: std::sync::atomic::AtomicBool,
    /// Mirrors the count for the metrics thread (which takes no lock of the data path).
    stats: Option<Arc<QueueStats>>,
}

impl InHand {
    /// An empty count mirrored into `stats` (None: not kept).
    pub(crate) fn with_stats(stats: Option<Arc<QueueStats>>) -> InHand {
        InHand { stats, ..Default::default() }
    }

    pub(crate) fn add(&self) {
        if let Ok(mut c) = self.count.lock() {
            *c += 1;
            if let Some(s) = &self.stats {
                s.started();
            }
        }
    }

    pub(crate) fn done(&self) {
        if let Ok(mut c) = self.count.lock() {
            *c = c.saturating_sub(1);
            if let Some(s) = &self.stats {
                s.retired();
            }
            if *c == 0 {
                self.stale.store(false, Ordering::SeqCst);
                if self.waiters.load(Ordering::Relaxed) > 0 {
                    self.idle.notify_all();
                }
            }
        }
    }

    /// Marks every request in hand stale (a stop answered without them): each is released
    /// silently when its host IO ends (no status byte, no used element: the ring it came
    /// from is stopped and may be reconfigured), and the queue takes nothing new, neither a
    /// resubmission nor a chain, until the last has ended: a resubmitted or newer write never
    /// overtakes one still at the storage. True if any was in hand.
    pub fn fence(&self) -> bool {
        let Ok(c) = self.count.lock() else { return false };
        if *c > 0 {
            self.stale.store(true, Ordering::SeqCst);
        }
        *c > 0
    }

    /// Whether the requests in hand are stale (see [`InHand::fence`]).
    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::SeqCst)
    }

    /// Requests popped from the ring and not yet completed.
    pub fn get(&self) -> usize {
        self.count.lock().map(|c| *c).unwrap_or(0)
    }

    /// Waits up to `limit` for no request to be in flight; true if none is.
    pub fn wait_idle_for(&self, queue: usize, limit: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let Ok(mut c) = self.count.lock() else { return true };
        // Counted under the lock `done` notifies under: no notification is missed.
        self.waiters.fetch_add(1, Ordering::Relaxed);
        let idle = loop {
            if *c == 0 {
                break true;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                tracing::warn!(queue, inflight = *c, "still waiting for in-flight IO");
                break false;
            }
            match self.idle.wait_timeout(c, left) {
                Ok((guard, _)) => c = guard,
                Err(_) => {
                    self.waiters.fetch_sub(1, Ordering::Relaxed);
                    return true;
                }
            }
        };
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        drop(c);
        idle
    }
}

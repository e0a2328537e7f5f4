//! What every worker of a device reads: the image, the fixed geometry, the guest memory
//! (swapped by the session as the frontend changes its memory table) and the flags the
//! frontend or the daemon set.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};

use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::config::BlkGeometry;
use crate::image::Disk;
use crate::park::ParkHub;
use crate::request::{Limits, ID_LEN};

/// Guest memory as we map it (no dirty-page log).
pub type Mem = GuestMemoryMmap<()>;
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

/// Holds a new connection's queues while requests of the previous connection, which its stop
/// gave up on, are still at the storage: nothing is resubmitted or popped before they end, so
/// a resubmitted or newer write never lands before a stale one. Open by default.
#[derive(Default)]
pub struct Gate {
    closed: AtomicBool,
    /// True once the previous connection's requests have all ended.
    behind: std::sync::Mutex<Option<Box<dyn Fn() -> bool + Send + Sync>>>,
}

impl Gate {
    /// Closes the gate until `ended()` says the earlier requests have all ended.
    pub fn close_until(&self, ended: Box<dyn Fn() -> bool + Send + Sync>) {
        if let Ok(mut b) = self.behind.lock() {
            *b = Some(ended);
            self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Whether requests may run (one atomic load while open).
    pub fn open(&self) -> bool {
        if !self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return true;
        }
        let Ok(mut b) = self.behind.lock() else { return false };
        if b.as_ref().is_none_or(|ended| ended()) {
            *b = None;
            self.closed.store(false, std::sync::atomic::Ordering::SeqCst);
            tracing::info!("the previous connection's requests have ended: serving");
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

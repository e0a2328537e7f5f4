//! The vhost-user-blk device: feature negotiation, config space, and one worker per queue.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};


use crate::config::{config_slice, BlkGeometry, WRITEBACK_OFFSET};
use crate::error::DeviceError;
use crate::image::Disk;
use crate::park::ParkHub;
use crate::request::ID_LEN;
use crate::stats::DeviceStats;
use crate::vring::Vring;
use crate::context::{AtomicMem, Context};
use crate::worker::{InflightCount, Worker};

/// Settings of one device instance.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// Number of request queues (one worker thread and ring each).
    pub num_queues: u16,
    /// Descriptors per queue.
    pub queue_size: u16,
    /// Logical block size: 512 or 4096.
    pub logical_block_size: u32,
    /// Refuse writes and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// Serial returned by GET_ID (truncated to 20 bytes).
    pub serial: String,
    /// Where requests that must wait are parked and resumed from (kept across connections);
    /// `None`: a hub of the device's own, with no listener (nothing is parked).
    pub park: Option<Arc<ParkHub>>,
    /// Request statistics to keep (kept across connections); `None`: none are kept and the
    /// data path reads no clock.
    pub stats: Option<Arc<DeviceStats>>,
    /// The seccomp filter each queue thread installs first (None: no filter).
    pub seccomp: Option<Arc<crate::seccomp::QueueFilter>>,
}

struct Inner {
    ctx: Context,
    seccomp: Option<Arc<crate::seccomp::QueueFilter>>,
    workers: Vec<Mutex<Worker>>,
    inflight: Vec<Arc<InflightCount>>,
}

/// The vhost-user-blk device. Cheap to clone; each queue thread holds a clone.
#[derive(Clone)]
pub struct BlkDevice {
    inner: Arc<Inner>,
}

/// How long parked requests keep being retried once the frontend stops a queue or the daemon
/// stops, before they are completed with an IO error.
pub const PARKED_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// How long `stop_vring` waits, after the grace, for requests still at the storage (a retry
/// in flight completes, and is reported). Storage that hangs past this leaves them in flight;
/// the stop answers anyway, logged, rather than hang the frontend.
pub const STOP_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

impl BlkDevice {
    /// Builds a device over `image`, creating one worker (and io_uring) per queue.
    pub fn new(image: Arc<dyn Disk>, cfg: &DeviceConfig) -> Result<BlkDevice, DeviceError> {
        let lbs = cfg.logical_block_size;
        let capacity = image.capacity() / u64::from(lbs) * u64::from(lbs);
        let geometry = BlkGeometry {
            capacity_bytes: capacity,
            logical_block_size: lbs,
            physical_block_size: image.physical_block_size().max(lbs),
            num_queues: cfg.num_queues,
            queue_size: cfg.queue_size,
            read_only: cfg.read_only,
        };
        let mut serial = [0u8; ID_LEN];
        let bytes = cfg.serial.as_bytes();
        let n = bytes.len().min(ID_LEN);
        serial[..n].copy_from_slice(&bytes[..n]);
        let files = image.files();
        let ring_entries = u32::from(cfg.queue_size).next_power_of_two().max(8) * 2;
        let mut workers = Vec::new();
        let mut inflight = Vec::new();
        for q in 0..cfg.num_queues as usize {
            let stats = cfg.stats.as_ref().and_then(|s| s.queue(q));
            let w = Worker::new(q, ring_entries, &files, stats).map_err(DeviceError::Ring)?;
            inflight.push(w.inflight());
            workers.push(Mutex::new(w));
        }
        let park = match &cfg.park {
            Some(hub) => hub.clone(),
            None => ParkHub::new(cfg.num_queues as usize).map_err(DeviceError::Ring)?,
        };
        let ctx = Context {
            park,
            image,
            geometry,
            serial,
            writeback: AtomicBool::new(true),
            event_idx: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            mem: RwLock::new(None),
            connected_at: Mutex::new(None),
            awaiting_first_io: AtomicBool::new(false),
            inflight_tracked: AtomicBool::new(false),
            stats: cfg.stats.clone(),
        };
        Ok(BlkDevice { inner: Arc::new(Inner { ctx, seccomp: cfg.seccomp.clone(), workers, inflight }) })
    }

    /// The device's fixed properties.
    pub fn geometry(&self) -> &BlkGeometry {
        &self.inner.ctx.geometry
    }

    /// Waits (at most [`STOP_LIMIT`] in all) for the host IO of every queue; `publish`
    /// completes requests to the guest. False if storage left IO in flight.
    pub fn drain(&self, publish: bool) -> bool {
        let deadline = std::time::Instant::now() + STOP_LIMIT;
        let mut idle = true;
        for w in &self.inner.workers {
            if let Ok(mut w) = w.lock() {
                match w.drain(&self.inner.ctx, publish, deadline) {
                    Ok(done) => idle &= done,
                    Err(e) => {
                        idle = false;
                        tracing::error!(error = %e, "draining a queue failed");
                    }
                }
            }
        }
        idle
    }

    /// Stops taking new requests, waits for in-flight ones and completes them to the guest.
    /// Parked requests keep being retried for [`PARKED_GRACE`]; those still parked then are
    /// completed with an IO error (never as success).
    ///
    /// When the frontend holds an inflight region, parked requests are not failed: they stay
    /// marked in it, uncompleted, and the next daemon resubmits them (an upgrade in place).
    pub fn quiesce(&self) {
        // A frozen disk thaws: what it held is finished, not failed.
        self.inner.ctx.park.thaw();
        self.inner.ctx.stopping.store(true, Ordering::SeqCst);
        self.drain(true);
        if self.inner.ctx.inflight_tracked.load(Ordering::SeqCst) {
            let parked: usize = self.inner.workers.iter().filter_map(|w| w.lock().ok().map(|w| w.parked())).sum();
            if parked > 0 {
                tracing::info!(parked, "stopping: parked requests stay in the frontend's inflight region for the next daemon");
            }
            for w in &self.inner.workers {
                if let Ok(mut w) = w.lock() {
                    w.drop_parked(&self.inner.ctx);
                }
            }
            self.drain(true);
            return;
        }
        // Parked requests count as in flight, and so do their retries: wait for all of them.
        let deadline = std::time::Instant::now() + PARKED_GRACE;
        while self.inflight() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        for w in &self.inner.workers {
            if let Ok(mut w) = w.lock() {
                w.fail_parked(&self.inner.ctx);
            }
        }
        self.drain(true);
    }

    /// The hub parked requests wait in.
    pub fn park_hub(&self) -> Arc<ParkHub> {
        self.inner.ctx.park.clone()
    }

    /// Requests popped and not yet completed, over all queues.
    pub fn inflight(&self) -> usize {
        self.inner.inflight.iter().map(|c| c.get()).sum()
    }
}


impl BlkDevice {
    /// The seccomp filter for queue threads.
    pub fn seccomp(&self) -> Option<Arc<crate::seccomp::QueueFilter>> {
        self.inner.seccomp.clone()
    }

    /// Number of request queues.
    pub fn num_queues(&self) -> usize {
        self.inner.workers.len()
    }

    /// Most descriptors a ring may have.
    pub fn max_queue_size(&self) -> u16 {
        self.inner.ctx.geometry.queue_size
    }

    /// The virtio feature bits offered.
    pub fn features(&self) -> u64 {
        self.inner.ctx.geometry.features()
    }

    /// Records whether VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub fn set_event_idx(&self, enabled: bool) {
        self.inner.ctx.event_idx.store(enabled, Ordering::Relaxed);
    }

    /// `size` bytes of the config space from `offset` (the caller checked the range).
    pub fn config(&self, offset: u32, size: u32) -> Vec<u8> {
        let ctx = &self.inner.ctx;
        let bytes = ctx.geometry.config_bytes(ctx.writeback.load(Ordering::Relaxed));
        config_slice(&bytes, offset, size)
    }

    /// Writes the config space: only the write-back byte is writable.
    pub fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        if offset != WRITEBACK_OFFSET || buf.len() != 1 || buf[0] > 1 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "only the writeback byte (0 or 1) is writable"));
        }
        let wb = buf[0] != 0;
        tracing::info!(writeback = wb, "guest set the write cache mode");
        self.inner.ctx.writeback.store(wb, Ordering::Relaxed);
        Ok(())
    }

    /// Installs the guest memory the workers read (swapped by the session as regions change).
    pub fn update_memory(&self, mem: AtomicMem) {
        match self.inner.ctx.mem.write() {
            Ok(mut slot) => *slot = Some(mem),
            Err(e) => *e.into_inner() = Some(mem),
        }
    }

    /// A frontend connected to this device: counted, and its first request timed.
    pub fn mark_connected(&self) {
        if let Ok(mut at) = self.inner.ctx.connected_at.lock() {
            *at = Some(std::time::Instant::now());
        }
        self.inner.ctx.awaiting_first_io.store(true, Ordering::Release);
        if let Some(s) = &self.inner.ctx.stats {
            s.connected();
        }
    }

    /// The frontend set up an inflight region (INFLIGHT_SHMFD) for this connection.
    pub fn set_inflight_tracked(&self) {
        self.inner.ctx.inflight_tracked.store(true, Ordering::SeqCst);
    }

    /// Queue `q` started on a used inflight region and resubmits `n` requests.
    pub fn count_recovery(&self, q: usize, n: usize) {
        tracing::info!(queue = q, resubmitted = n, "restart recovered from the inflight region");
        if let Some(s) = &self.inner.ctx.stats {
            s.recovered(n);
        }
    }

    /// The io_uring completion eventfd of queue `q`.
    pub fn completion_fd(&self, q: usize) -> Option<RawFd> {
        self.inner.workers.get(q).and_then(|w| w.lock().ok().map(|w| w.completion_fd()))
    }

    /// Waits, in bounded time, until queue `q` has nothing in flight (the frontend stopped it).
    pub fn stop_vring(&self, q: usize) {
        // The frontend stops the ring (VM stop, migration): held writes go on.
        self.inner.ctx.park.thaw();
        if let Some(c) = self.inner.inflight.get(q) {
            // Parked requests keep being retried for a grace period; what is still parked
            // then is completed with an IO error, so the frontend is never blocked forever.
            if !c.wait_idle_for(q, PARKED_GRACE) {
                if let Some(w) = self.inner.workers.get(q) {
                    if let Ok(mut w) = w.lock() {
                        w.fail_parked(&self.inner.ctx);
                    }
                }
            }
            if !c.wait_idle_for(q, STOP_LIMIT) {
                tracing::error!(queue = q, inflight = c.get(),
                    "storage does not answer: stop answered with requests still at the storage (should it answer later, they complete into a ring the frontend has stopped)");
                return;
            }
        }
        tracing::info!(queue = q, "queue stopped with no IO in flight");
    }

    fn worker(&self, q: usize) -> io::Result<std::sync::MutexGuard<'_, Worker>> {
        let w = self.inner.workers.get(q).ok_or_else(|| io::Error::other("no such queue"))?;
        w.lock().map_err(|_| io::Error::other("worker lock poisoned"))
    }

    /// The frontend kicked queue `q`.
    pub fn on_kick(&self, q: usize, vring: &Vring) -> io::Result<()> {
        self.worker(q)?.on_kick(&self.inner.ctx, vring)
    }

    /// Queue `q`'s io_uring has completions.
    pub fn on_completion(&self, q: usize, vring: &Vring) -> io::Result<()> {
        let mut w = self.worker(q)?;
        w.on_completion(&self.inner.ctx)?;
        // Completions free ring space; pick up anything the guest queued meanwhile.
        w.on_kick(&self.inner.ctx, vring)
    }

    /// The park hub woke queue `q` to retry its parked requests.
    pub fn on_resume(&self, q: usize) -> io::Result<()> {
        self.inner.ctx.park.ack(q);
        self.worker(q)?.on_resume(&self.inner.ctx)
    }
}

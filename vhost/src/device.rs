//! The vhost-user-blk device: feature negotiation, config space, and one worker per queue.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, TryLockError};
use std::time::Instant;


use crate::config::{config_slice, BlkGeometry, WRITEBACK_OFFSET};
use crate::error::DeviceError;
use crate::image::Disk;
use crate::park::ParkHub;
use crate::request::ID_LEN;
use crate::stats::DeviceStats;
use crate::vring::Vring;
use crate::context::{AtomicMem, Context};
use crate::worker::{InHand, Worker};

/// Settings of one device instance.
#[derive(Clone)]
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
    /// How long stops wait.
    pub stop: StopLimits,
    /// Takes and hands over the image around live migration (None: always active).
    pub ownership: Option<Arc<dyn crate::ownership::Ownership>>,
    /// Polling mode: the longest a queue thread busy-polls its ring and completion queue
    /// before it sleeps (adaptive up to this; zero: never, the default).
    pub poll: std::time::Duration,
}

struct Inner {
    ctx: Context,
    ownership: Arc<dyn crate::ownership::Ownership>,
    seccomp: Option<Arc<crate::seccomp::QueueFilter>>,
    workers: Vec<Mutex<Worker>>,
    in_hand: Vec<Arc<InHand>>,
    /// Polling mode's busy-poll time (zero: off).
    poll: std::time::Duration,
}

/// The vhost-user-blk device. Cheap to clone; each queue thread holds a clone.
#[derive(Clone)]
pub struct BlkDevice {
    inner: Arc<Inner>,
}

pub use crate::context::{StopLimits, PARKED_GRACE, STOP_LIMIT};

/// How long a file table change waits for a queue's thread (inside a storage call).
const FILES_CHANGE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl crate::image::FileListener for Inner {
    fn files_changed(&self, table: &[RawFd]) -> io::Result<()> {
        let deadline = Instant::now() + FILES_CHANGE_WAIT;
        for (q, w) in self.workers.iter().enumerate() {
            let mut g = loop {
                match w.try_lock() {
                    Ok(g) => break g,
                    Err(TryLockError::Poisoned(e)) => break e.into_inner(),
                    Err(TryLockError::WouldBlock) if Instant::now() >= deadline => {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, format!("queue {q} is inside a storage call")));
                    }
                    Err(TryLockError::WouldBlock) => std::thread::sleep(std::time::Duration::from_millis(1)),
                }
            };
            g.set_files(table).map_err(|e| io::Error::new(e.kind(), format!("queue {q}: registering the image's files: {e}")))?;
        }
        Ok(())
    }
}

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
        let slots = image.file_slots();
        let ring_entries = u32::from(cfg.queue_size).next_power_of_two().max(8) * 2;
        let mut workers = Vec::new();
        let mut in_hand = Vec::new();
        for q in 0..cfg.num_queues as usize {
            let stats = cfg.stats.as_ref().and_then(|s| s.queue(q));
            let mut w = Worker::new(q, ring_entries, &files, slots, stats).map_err(DeviceError::Ring)?;
            w.set_polling(!cfg.poll.is_zero());
            in_hand.push(w.in_hand());
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
            gate: crate::context::Gate::default(),
            limits: cfg.stop,
        };
        let ownership = cfg.ownership.clone().unwrap_or_else(|| Arc::new(crate::ownership::AlwaysActive));
        let inner = Arc::new(Inner { ctx, ownership, seccomp: cfg.seccomp.clone(), workers, in_hand, poll: cfg.poll });
        // From here on every change of the image's file table (a snapshot's new top) reaches
        // these rings before any extent names it; a change made since `files()` was read is
        // registered now.
        let weak: std::sync::Weak<Inner> = Arc::downgrade(&inner);
        inner.ctx.image.listen_files(weak).map_err(DeviceError::Ring)?;
        Ok(BlkDevice { inner })
    }

    /// The device's fixed properties.
    pub fn geometry(&self) -> &BlkGeometry {
        &self.inner.ctx.geometry
    }

    /// Waits (at most the stop limit in all) for the host IO of every queue; `publish`
    /// completes requests to the guest. False if storage left IO in flight, or a queue's
    /// thread stayed inside a storage call.
    pub fn drain(&self, publish: bool) -> bool {
        self.drain_until(publish, Instant::now() + self.inner.ctx.limits.limit)
    }

    fn drain_until(&self, publish: bool, deadline: Instant) -> bool {
        let mut idle = true;
        for q in 0..self.inner.workers.len() {
            let Some(mut w) = self.lock_within(q, deadline) else {
                idle = false;
                continue;
            };
            match w.drain(&self.inner.ctx, publish, deadline) {
                Ok(done) => idle &= done,
                Err(e) => {
                    idle = false;
                    tracing::error!(error = %e, "draining a queue failed");
                }
            }
        }
        idle
    }

    /// Queue `q`'s worker, waited for until `deadline` at most: its thread holds it across
    /// a metadata read or write, which hung storage may never answer. `None`: the stop gives
    /// up on that queue (logged).
    fn lock_within(&self, q: usize, deadline: Instant) -> Option<MutexGuard<'_, Worker>> {
        let w = self.inner.workers.get(q)?;
        loop {
            match w.try_lock() {
                Ok(g) => return Some(g),
                Err(TryLockError::Poisoned(e)) => return Some(e.into_inner()),
                Err(TryLockError::WouldBlock) if Instant::now() >= deadline => {
                    tracing::error!(queue = q, "storage does not answer: the queue's thread is inside a metadata read or write; the stop gives up on it");
                    return None;
                }
                Err(TryLockError::WouldBlock) => std::thread::sleep(std::time::Duration::from_millis(2)),
            }
        }
    }

    /// Fences every queue's requests still in hand (see [`InHand::fence`]); true if
    /// any was.
    pub fn fence(&self) -> bool {
        self.inner.in_hand.iter().fold(false, |any, c| c.fence() | any)
    }

    /// Holds this device's queues until `previous` has no request in hand (its stop gave up
    /// on requests still at the storage), nor any connection `previous` itself waited for:
    /// see [`crate::context::Gate`].
    pub fn serve_after(&self, previous: &BlkDevice) {
        let mut behind: Vec<_> = previous.inner.in_hand.clone();
        behind.extend(previous.inner.ctx.gate.waiting_for());
        self.inner.ctx.gate.close_until(behind);
    }

    /// Whether the queues wait for a previous connection's requests (queue threads then
    /// look again periodically).
    pub fn gated(&self) -> bool {
        !self.inner.ctx.gate.open()
    }

    /// The stop limits this device was built with.
    pub fn stop_limits(&self) -> StopLimits {
        self.inner.ctx.limits
    }

    /// Stops taking new requests, waits for in-flight ones and completes them to the guest.
    /// Parked requests keep being retried for the parked grace; those still parked then are
    /// completed with an IO error (never as success).
    ///
    /// When the frontend holds an inflight region, parked requests are not failed: they stay
    /// marked in it, uncompleted, and the next daemon resubmits them (an upgrade in place).
    ///
    /// Bounded: at most grace + limit. What storage has not answered by then is fenced and
    /// left in flight (never completed to the guest; the inflight region, if any, keeps it).
    pub fn quiesce(&self) {
        // A frozen disk thaws: what it held is finished, not failed.
        self.inner.ctx.park.thaw();
        self.inner.ctx.stopping.store(true, Ordering::SeqCst);
        let limits = self.inner.ctx.limits;
        let start = Instant::now();
        let end = start + limits.parked_grace + limits.limit;
        let n = self.inner.workers.len();
        let idle = if self.inner.ctx.inflight_tracked.load(Ordering::SeqCst) {
            let mut parked = 0;
            for q in 0..n {
                if let Some(mut w) = self.lock_within(q, start + limits.limit) {
                    parked += w.parked();
                    w.drop_parked(&self.inner.ctx);
                }
            }
            if parked > 0 {
                tracing::info!(parked, "stopping: parked requests stay in the frontend's inflight region for the next daemon");
            }
            self.drain_until(true, start + limits.limit)
        } else {
            // Parked requests count as in flight, and so do their retries: wait for all of them.
            let grace = start + limits.parked_grace;
            while self.in_hand() > 0 && Instant::now() < grace {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            for q in 0..n {
                if let Some(mut w) = self.lock_within(q, end) {
                    w.fail_parked(&self.inner.ctx);
                }
            }
            self.drain_until(true, end)
        };
        if !idle && self.fence() {
            tracing::error!(inflight = self.in_hand(), "stopping with requests still at the storage: fenced (never completed to the guest)");
        }
    }

    /// The hub parked requests wait in.
    pub fn park_hub(&self) -> Arc<ParkHub> {
        self.inner.ctx.park.clone()
    }

    /// Requests popped and not yet completed, over all queues.
    pub fn in_hand(&self) -> usize {
        self.inner.in_hand.iter().map(|c| c.get()).sum()
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

    /// The virtio feature bits offered (the device's, and dirty logging for migration).
    pub fn features(&self) -> u64 {
        self.inner.ctx.geometry.features() | crate::protocol::message::F_LOG_ALL
    }

    /// Who may write the image (see [`crate::ownership`]).
    pub fn ownership(&self) -> &Arc<dyn crate::ownership::Ownership> {
        &self.inner.ownership
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

    /// Has queue `q`'s io_uring wait on the queue thread's event set `fd` as well.
    pub fn watch_events(&self, q: usize, fd: RawFd) -> io::Result<()> {
        self.worker(q)?.watch_events(fd)
    }

    /// Polling mode's longest busy-poll (zero: off).
    pub fn poll_max(&self) -> std::time::Duration {
        self.inner.poll
    }

    /// The queue thread's one blocking point: submits what queue `q`'s worker queued and
    /// waits, without the worker's lock, until its ring has a completion or the thread's
    /// event set is ready (or `limit` passed).
    ///
    /// In polling mode, the ring and completion queue are looked at for up to `poll` first
    /// (the queue thread's adaptive window, possibly zero); if something is ready the wait
    /// does not block. Kicks are asked for again before any sleep.
    pub fn wait(&self, q: usize, limit: Option<std::time::Duration>, poll: std::time::Duration) -> io::Result<()> {
        let ready = !self.inner.poll.is_zero()
            && ((!poll.is_zero() && self.poll_for_work(q, poll)?) || self.worker(q)?.before_sleep(&self.inner.ctx));
        let prepared = self.worker(q)?.prepare_wait();
        let waiter = prepared.ok_or_else(|| io::Error::new(io::ErrorKind::Unsupported, "queue engine cannot be waited on"))?;
        // The worker (and its ring) lives as long as the device, which the caller holds.
        waiter.wait(!ready, limit)
    }

    /// Busy-polls queue `q` for up to `limit`: true as soon as it has work. The worker's
    /// lock is taken per look (uncontended, no system call) and released in between.
    fn poll_for_work(&self, q: usize, limit: std::time::Duration) -> io::Result<bool> {
        let start = Instant::now();
        // What is queued goes to the kernel first: its completions are what we poll for.
        let prepared = self.worker(q)?.prepare_wait();
        if let Some(waiter) = prepared {
            waiter.wait(false, None)?;
        }
        loop {
            if self.worker(q)?.has_work(&self.inner.ctx) {
                return Ok(true);
            }
            if start.elapsed() >= limit {
                return Ok(false);
            }
            std::hint::spin_loop();
        }
    }

    /// Waits, in bounded time (grace + limit), until queue `q` has nothing in flight (the
    /// frontend stopped it). Storage that does not answer by then leaves requests at the
    /// storage: they are fenced (never completed into the ring, which the frontend may now
    /// reconfigure; the queue takes nothing new until they ended), and the stop answers.
    /// tests/restart.rs `a_stop_gives_up_on_hung_storage_and_no_write_overtakes_the_stale_one`.
    pub fn stop_vring(&self, q: usize) {
        // The frontend stops the ring (VM stop, migration): held writes go on.
        self.inner.ctx.park.thaw();
        let limits = self.inner.ctx.limits;
        let end = Instant::now() + limits.parked_grace + limits.limit;
        if let Some(c) = self.inner.in_hand.get(q) {
            // Parked requests keep being retried for a grace period; what is still parked
            // then is completed with an IO error, so the frontend is never blocked forever.
            if !c.wait_idle_for(q, limits.parked_grace) {
                if let Some(mut w) = self.lock_within(q, end) {
                    w.fail_parked(&self.inner.ctx);
                }
            }
            if !c.wait_idle_for(q, end.saturating_duration_since(Instant::now())) && c.fence() {
                tracing::error!(queue = q, inflight = c.get(),
                    "storage does not answer: the stop answers with requests still at the storage; they are fenced: never completed into the ring, resubmitted from the inflight region once they ended, and the queue takes nothing new before");
                return;
            }
        }
        tracing::info!(queue = q, "queue stopped with no IO in flight");
    }

    fn worker(&self, q: usize) -> io::Result<std::sync::MutexGuard<'_, Worker>> {
        let w = self.inner.workers.get(q).ok_or_else(|| io::Error::other("no such queue"))?;
        w.lock().map_err(|_| io::Error::other("worker lock poisoned"))
    }

    /// The frontend kicked queue `q`. Called on queue `q`'s thread only: the pass submits
    /// the requests it starts, whose completions then run as that thread's task work.
    pub fn on_kick(&self, q: usize, vring: &Vring) -> io::Result<()> {
        self.worker(q)?.on_kick(&self.inner.ctx, vring)
    }

    /// Queue `q`'s wait returned: completes what ended, with one notification for the
    /// batch. True if the queue thread's event set is ready.
    pub fn on_completion(&self, q: usize) -> io::Result<bool> {
        self.worker(q)?.on_completion(&self.inner.ctx)
    }

    /// The park hub woke queue `q` to retry its parked requests.
    pub fn on_resume(&self, q: usize) -> io::Result<()> {
        self.inner.ctx.park.ack(q);
        self.worker(q)?.on_resume(&self.inner.ctx)
    }
}

//! One worker per virtqueue: pops chains, parses requests, asks the image format where the
//! data lives, queues host IO on the worker's own io_uring straight into guest memory, and
//! completes requests as the ring reports back.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};

use crate::bounce::{copy_range_from_guest, copy_range_to_guest, AlignedBuf, BouncePool, Staged, CHUNK, POOL_CHUNKS};
use crate::device::Context;
use crate::error::{error_class, virtio_status, ImageError, Outcome};
use crate::image::{Extent, HostZero, Target, WriteTicket, ZeroMode, ZeroRequest};
use crate::park::{FaultAction, FaultOp, ParkCause};
use crate::request::{parse, Request, RequestType, Segment, ID_LEN};
use crate::stats::{QueueStats, StatOp};
use crate::engine::{Engine, HostOp};
use crate::uring::Ring;

/// Guest memory as the vhost-user backend maps it (no dirty-page log).
pub type Mem = GuestMemoryMmap<()>;
/// The shared, swappable guest memory handle.
pub type AtomicMem = GuestMemoryAtomic<Mem>;
pub use crate::vring::Vring;

/// Size of the zero buffer used when a host cannot zero a range itself.
const ZERO_CHUNK: usize = 1 << 20;

/// In-flight accounting shared between a queue's worker and `stop_vring`.
#[derive(Default)]
pub struct InflightCount {
    count: Mutex<usize>,
    idle: Condvar,
    /// Mirrors the count for the metrics thread (which takes no lock of the data path).
    stats: Option<Arc<QueueStats>>,
}

impl InflightCount {
    fn add(&self) {
        if let Ok(mut c) = self.count.lock() {
            *c += 1;
            if let Some(s) = &self.stats {
                s.started();
            }
        }
    }

    fn done(&self) {
        if let Ok(mut c) = self.count.lock() {
            *c = c.saturating_sub(1);
            if let Some(s) = &self.stats {
                s.retired();
            }
            if *c == 0 {
                self.idle.notify_all();
            }
        }
    }

    /// Requests popped from the ring and not yet completed.
    pub fn get(&self) -> usize {
        self.count.lock().map(|c| *c).unwrap_or(0)
    }

    /// Waits up to `limit` for no request to be in flight; true if none is.
    pub fn wait_idle_for(&self, queue: usize, limit: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let Ok(mut c) = self.count.lock() else { return true };
        while *c > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                tracing::warn!(queue, inflight = *c, "still waiting for in-flight IO");
                return false;
            }
            match self.idle.wait_timeout(c, left) {
                Ok((guard, _)) => c = guard,
                Err(_) => return true,
            }
        }
        true
    }
}

/// A request between submission and completion.
struct Pending {
    head: u16,
    status: GuestAddress,
    req: Request,
    /// Host ops still outstanding.
    ops: u32,
    /// First errno seen.
    errno: Option<i32>,
    /// Data staged through a bounce chunk instead of guest memory (unaligned buffers).
    staged: Option<Staged>,
    /// Keeps the guest mapping alive while the kernel may access it.
    mem: Arc<Mem>,
    /// Allocations to report to the format when the host IO has ended.
    tickets: Vec<WriteTicket>,
    clock: Clock,
    /// Further FLUSH requests served by this one's sync (head, status address).
    joined: Vec<(u16, GuestAddress)>,
}

/// A request waiting (with its chain and guest mapping) until the hub resumes it.
struct Parked {
    head: u16,
    status: GuestAddress,
    req: Request,
    mem: Arc<Mem>,
    clock: Clock,
    /// When this stint in the parked list began (statistics only).
    entered: Option<Instant>,
}

/// A request waiting for a bounce chunk (the pool was empty when it arrived).
struct Starved {
    head: u16,
    status: GuestAddress,
    req: Request,
    mem: Arc<Mem>,
    clock: Clock,
}

/// Most iovecs one host op carries (the kernel's UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// When a request arrived and when it was first parked (set only while statistics are kept).
#[derive(Clone, Copy, Debug, Default)]
struct Clock {
    started: Option<Instant>,
    parked_since: Option<Instant>,
}

/// What a completion counts as in the statistics.
#[derive(Clone, Copy)]
struct Rec {
    op: StatOp,
    started: Option<Instant>,
    bytes: u64,
}

impl Rec {
    fn of(req: &Request, clock: Clock) -> Rec {
        // Without statistics (no start time) nothing is recorded: skip the range sum.
        let bytes = if clock.started.is_some() { request_bytes(req) } else { 0 };
        Rec { op: StatOp::of(req.kind), started: clock.started, bytes }
    }
}

/// The bytes a request moves: its data, or the ranges it discards or zeroes.
fn request_bytes(req: &Request) -> u64 {
    match req.kind {
        RequestType::Read | RequestType::Write => req.data_len,
        RequestType::Discard | RequestType::WriteZeroes => req.ranges.iter().map(|r| r.len).sum(),
        RequestType::Flush | RequestType::GetId => 0,
    }
}

/// What kind of host op an in-flight ring entry is, for completion handling.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Read,
    Write { dsync: bool },
    Sync,
    Zero { mode: ZeroMode, len: u64 },
}

/// One ring entry in flight.
struct Op {
    slot: usize,
    kind: OpKind,
    file: u32,
    offset: u64,
    /// Remaining iovecs (read/write); their addresses stay valid until completion.
    iov: Vec<libc::iovec>,
}

// SAFETY: the raw pointers in `iov` point into guest memory or bounce buffers owned by the
// same `Pending`; they are only dereferenced by the kernel and by this worker.
unsafe impl Send for Op {}

/// A tiny slab: stable indices for user_data.
struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Slab<T> {
    fn new() -> Self {
        Slab { items: Vec::new(), free: Vec::new() }
    }
    fn insert(&mut self, v: T) -> usize {
        if let Some(i) = self.free.pop() {
            self.items[i] = Some(v);
            i
        } else {
            self.items.push(Some(v));
            self.items.len() - 1
        }
    }
    fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.items.get_mut(i).and_then(|v| v.as_mut())
    }
    fn remove(&mut self, i: usize) -> Option<T> {
        let v = self.items.get_mut(i)?.take();
        if v.is_some() {
            self.free.push(i);
        }
        v
    }
    fn len(&self) -> usize {
        self.items.len() - self.free.len()
    }
}

/// The per-queue worker.
pub struct Worker {
    queue: usize,
    ring: Box<dyn Engine>,
    pending: Slab<Pending>,
    ops: Slab<Op>,
    inflight: Arc<InflightCount>,
    vring: Option<Vring>,
    zero: Option<AlignedBuf>,
    needs_signal: bool,
    extents: Vec<Extent>,
    zeros: Vec<HostZero>,
    /// A FLUSH queued in the current kick batch that later FLUSHes may join, as long as no
    /// request completes in between on this queue and the format's metadata epoch has not
    /// moved (another queue linked a completed write) since its write-back: (slot, epoch).
    flush_batch: Option<(usize, u64)>,
    /// Requests rejected so far (for rate-limited logging).
    rejected: u64,
    /// Requests waiting for the hub to resume them (still counted in flight).
    parked: std::collections::VecDeque<Parked>,
    /// Request statistics (None: not kept, and no clock is read).
    stats: Option<Arc<QueueStats>>,
    /// The queue (or the daemon) is stopping and its grace for parked IO is over: a request
    /// that would park is reported instead, so a stop always ends. Cleared when the queue
    /// serves again.
    final_stop: bool,
    /// Host ops in flight (kernel and backlog) beyond which no chain is popped.
    op_cap: usize,
    /// Bounce chunks for unaligned guest buffers.
    pool: BouncePool,
    /// Requests waiting for a bounce chunk, in arrival order (counted in flight).
    starved: std::collections::VecDeque<Starved>,
}

impl Worker {
    /// Creates the worker for `queue` with its own ring over `files`, counting requests in
    /// `stats` if given.
    pub fn new(queue: usize, ring_entries: u32, files: &[std::os::fd::RawFd], stats: Option<Arc<QueueStats>>) -> io::Result<Worker> {
        let ring = Box::new(Ring::new(ring_entries, files)?);
        Ok(Worker::with_engine(queue, ring, ring_entries as usize * 4, stats))
    }

    /// A worker over any engine, popping no chain while `op_cap` host ops are in flight.
    pub fn with_engine(queue: usize, ring: Box<dyn Engine>, op_cap: usize, stats: Option<Arc<QueueStats>>) -> Worker {
        Worker {
            queue,
            ring,
            pending: Slab::new(),
            ops: Slab::new(),
            inflight: Arc::new(InflightCount { stats: stats.clone(), ..Default::default() }),
            vring: None,
            zero: None,
            needs_signal: false,
            extents: Vec::new(),
            zeros: Vec::new(),
            flush_batch: None,
            rejected: 0,
            parked: std::collections::VecDeque::new(),
            stats,
            final_stop: false,
            op_cap,
            pool: BouncePool::new(POOL_CHUNKS),
            starved: std::collections::VecDeque::new(),
        }
    }

    /// Back-pressure: host ops in flight are at their cap, so no new chain is popped until
    /// completions free room (the completion handler pops again).
    fn throttled(&self) -> bool {
        self.ring.in_flight() >= self.op_cap
    }

    /// The ring's completion eventfd, to register with the vring epoll loop.
    pub fn completion_fd(&self) -> std::os::fd::RawFd {
        self.ring.eventfd()
    }

    /// The in-flight counter `stop_vring` waits on.
    pub fn inflight(&self) -> Arc<InflightCount> {
        self.inflight.clone()
    }

    /// Handles a kick: processes every available chain of `vring`.
    pub fn on_kick(&mut self, ctx: &Context, vring: &Vring) -> io::Result<()> {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        let event_idx = ctx.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            let stopping = ctx.stopping.load(Ordering::SeqCst);
            // The memory map is fetched per chain: the frontend may add a region (acked)
            // and use it in its next request while this loop is still running.
            while let Some((chain, mem)) = self.pop(ctx, vring, stopping) {
                let clock = Clock { started: self.stats.as_ref().map(|_| Instant::now()), parked_since: None };
                let parsed = parse(chain, &ctx.limits());
                match (parsed.request, parsed.status) {
                    (Ok(req), Some(status))
                        if req.kind == RequestType::Flush && self.join_flush(ctx.image.metadata_epoch(), parsed.head, status) => {}
                    (Ok(req), Some(status)) => self.start(ctx, &mem, parsed.head, status, req, clock),
                    (Err(e), status) => {
                        self.rejected += 1;
                        // Rate-limited: a guest must not be able to flood the log.
                        if self.rejected <= 10 || self.rejected % 1000 == 0 {
                            let regions = if matches!(e, crate::error::RequestError::OutsideMemory { .. }) {
                                use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
                                mem.iter()
                                    .map(|r| format!("{:#x}+{:#x}", r.start_addr().0, r.len()))
                                    .collect::<Vec<_>>()
                                    .join(",")
                            } else {
                                String::new()
                            };
                            tracing::warn!(queue = self.queue, error = %e, total = self.rejected, regions, "rejected request");
                        } else {
                            tracing::debug!(queue = self.queue, error = %e, "rejected request");
                        }
                        let outcome = Outcome::Invalid(e);
                        let rec = Rec { op: StatOp::Invalid, started: clock.started, bytes: 0 };
                        self.finish_sync(vring, &mem, parsed.head, status, &outcome, 0, rec);
                    }
                    (Ok(req), None) => self.finish_sync(vring, &mem, parsed.head, None, &Outcome::Ok, 0, Rec::of(&req, clock)),
                }
            }
            if self.throttled() {
                // Chains stay in the ring; the completions that free room pop them.
                break;
            }
            if !event_idx || !vring.enable_notification().unwrap_or(false) {
                break;
            }
        }
        self.flush_batch = None;
        self.unstarve(ctx);
        self.ring.submit()?;
        self.signal(vring);
        Ok(())
    }

    /// Lets a FLUSH share the sync of one queued earlier in this batch; false if none can.
    /// `epoch` is the format's metadata epoch now: if it moved since the earlier FLUSH wrote
    /// metadata back, a write completed meanwhile (on any queue) may not be covered.
    fn join_flush(&mut self, epoch: u64, head: u16, status: GuestAddress) -> bool {
        let Some((slot, at)) = self.flush_batch else { return false };
        if at != epoch {
            return false;
        }
        let Some(p) = self.pending.get_mut(slot) else { return false };
        if p.req.kind != RequestType::Flush {
            return false;
        }
        p.joined.push((head, status));
        tracing::trace!(queue = self.queue, joined = p.joined.len(), "FLUSH joined a queued FLUSH");
        true
    }

    /// Handles the ring's completion eventfd.
    pub fn on_completion(&mut self, ctx: &Context) -> io::Result<()> {
        self.ring.ack_eventfd();
        self.reap(ctx, true)?;
        self.unstarve(ctx);
        self.ring.submit()?;
        if let Some(v) = self.vring.clone() {
            self.signal(&v);
        }
        Ok(())
    }

    /// Waits for every in-flight host op; `publish` says whether to complete requests to
    /// the guest (false after a disconnect: the frontend re-submits what it saw unfinished).
    ///
    /// Waits at most until `deadline`: storage that does not answer leaves ops in flight
    /// (`Ok(false)`); such a worker, once dropped, leaks their buffers rather than free memory
    /// the kernel may still write.
    pub fn drain(&mut self, ctx: &Context, publish: bool, deadline: Instant) -> io::Result<bool> {
        loop {
            if publish {
                self.unstarve(ctx);
            }
            if self.ops.len() == 0 {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.ring.submit_and_wait_one_for(left)? {
                tracing::error!(queue = self.queue, ops = self.ops.len(), "storage does not answer: host IO still in flight after the drain limit");
                return Ok(false);
            }
            self.reap(ctx, publish)?;
        }
        if !publish {
            self.drop_parked(ctx);
            let n = self.starved.len();
            if n > 0 {
                tracing::warn!(queue = self.queue, requests = n, "IO waiting for a bounce buffer dropped uncompleted (never acknowledged to the guest)");
                self.starved.clear();
                (0..n).for_each(|_| self.inflight.done());
            }
        }
        if publish {
            if let Some(v) = self.vring.clone() {
                self.signal(&v);
            }
        }
        Ok(true)
    }

    fn pop(&mut self, ctx: &Context, vring: &Vring, stopping: bool) -> Option<(virtio_queue::DescriptorChain<Arc<Mem>>, Arc<Mem>)> {
        self.pop_with(|| ctx.memory(), vring, stopping)
    }

    /// Pops the next chain. The avail index is read first; the memory table the chain is
    /// checked against is taken only *after* it. A frontend adds a region (and waits for
    /// our acknowledgement) before publishing a chain that uses it, so once the index shows
    /// the chain, the table taken next has the region (a table taken before the index was read
    /// could be older than the chain: the rare "outside guest memory" EIO).
    fn pop_with(
        &mut self,
        memory: impl Fn() -> Option<Arc<Mem>>,
        vring: &Vring,
        stopping: bool,
    ) -> Option<(virtio_queue::DescriptorChain<Arc<Mem>>, Arc<Mem>)> {
        if self.throttled() {
            return None;
        }
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() || stopping {
            return None;
        }
        let queue = state.get_queue_mut();
        {
            let probe = memory()?;
            let avail = queue.avail_idx(probe.as_ref(), Ordering::Acquire).ok()?;
            if avail.0 == queue.next_avail() {
                return None;
            }
        }
        let mem = memory()?;
        let chain = queue.pop_descriptor_chain(mem.clone())?;
        // Counted while the vring lock is held, so stop_vring never misses it.
        self.inflight.add();
        // Serving again: requests may park again.
        self.final_stop = false;
        Some((chain, mem))
    }

    fn start(&mut self, ctx: &Context, mem: &Arc<Mem>, head: u16, status: GuestAddress, req: Request, clock: Clock) {
        let rec = Rec::of(&req, clock);
        let result = match req.kind {
            RequestType::GetId => {
                let n = (req.data_len as usize).min(ID_LEN);
                let ok = copy_to_guest(mem, &req.segments, &ctx.serial[..n]).is_ok();
                let out = if ok { Outcome::Ok } else { Outcome::HostIo(libc::EFAULT) };
                let vring = self.vring.clone();
                if let Some(v) = vring {
                    self.finish_sync(&v, mem, head, Some(status), &out, n as u32, rec);
                }
                return;
            }
            _ if req.data_len == 0 && matches!(req.kind, RequestType::Read | RequestType::Write) => {
                if let Some(v) = self.vring.clone() {
                    self.finish_sync(&v, mem, head, Some(status), &Outcome::Ok, 0, rec);
                }
                return;
            }
            _ => self.submit_request(ctx, mem, head, status, req, clock),
        };
        if let Err((slot, outcome)) = result {
            self.submit_failed(ctx, mem, head, status, slot, outcome, rec);
        }
    }

    /// A request could not be submitted (whole or in part): park it, or complete it.
    #[allow(clippy::too_many_arguments)]
    fn submit_failed(&mut self, ctx: &Context, mem: &Arc<Mem>, head: u16, status: GuestAddress, slot: Option<usize>, outcome: Outcome, rec: Rec) {
        let Some(slot) = slot else {
            if let Some(v) = self.vring.clone() {
                self.finish_sync(&v, mem, head, Some(status), &outcome, 0, rec);
            }
            return;
        };
        if let Some(p) = self.pending.get_mut(slot) {
            if p.ops > 0 {
                // Some ops are queued: the request completes (through the policy) with them.
                let errno = match &outcome {
                    Outcome::HostIo(e) => *e,
                    Outcome::Image(ImageError::Io(e)) => e.raw_os_error().unwrap_or(libc::EIO),
                    _ => libc::EIO,
                };
                p.errno.get_or_insert(errno);
                return;
            }
        }
        let Some(mut p) = self.pending.remove(slot) else { return };
        let op = if p.req.kind == RequestType::Read { FaultOp::Read } else { FaultOp::Write };
        let decision = match &outcome {
            Outcome::Image(ImageError::NoSpace { needed, limit }) if ctx.park.enabled() => {
                Some(ParkCause::VolumeFull { needed: *needed, limit: *limit })
            }
            // Metadata IO of the format failed (e.g. an L2 table read): a storage fault.
            Outcome::Image(ImageError::Io(e)) => {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                match ctx.park.on_error(op, errno) {
                    FaultAction::Park => Some(ParkCause::Failed { op, errno }),
                    FaultAction::Ignore => {
                        tracing::error!(queue = self.queue, kind = ?p.req.kind, offset = p.req.offset, errno,
                            "request FAILED and the error policy is ignore: completed as success, data lost");
                        self.release_tickets(ctx, &mut p);
                        if let Some(v) = self.vring.clone() {
                            self.finish_sync(&v, mem, head, Some(status), &Outcome::Ok, 0, rec);
                        }
                        return;
                    }
                    FaultAction::Report => None,
                }
            }
            _ => None,
        };
        match decision {
            Some(cause) => self.park(ctx, p, cause),
            None => {
                self.release_tickets(ctx, &mut p);
                if let Some(v) = self.vring.clone() {
                    self.finish_sync(&v, mem, head, Some(status), &outcome, 0, rec);
                }
            }
        }
    }

    /// Tells the format that a request's allocations will not be written.
    fn release_tickets(&self, ctx: &Context, p: &mut Pending) {
        for ticket in p.tickets.drain(..) {
            if let Err(e) = ctx.image.write_done(ticket, false) {
                tracing::error!(queue = self.queue, error = %e, "releasing an allocation failed");
            }
        }
    }

    /// Builds and queues the host ops of a request.
    fn submit_request(
        &mut self,
        ctx: &Context,
        mem: &Arc<Mem>,
        head: u16,
        status: GuestAddress,
        req: Request,
        clock: Clock,
    ) -> Result<(), (Option<usize>, Outcome)> {
        let image = &ctx.image;
        let align = image.io_alignment().max(1) as usize;
        if matches!(req.kind, RequestType::Read | RequestType::Write)
            && needs_bounce(mem, &req.segments, align)
            && !self.pool.available()
        {
            // Waits for a chunk; completions that return one start it.
            self.starved.push_back(Starved { head, status, req, mem: mem.clone(), clock });
            return Ok(());
        }
        let ranges = if matches!(req.kind, RequestType::Discard | RequestType::WriteZeroes) { req.ranges.clone() } else { Vec::new() };
        let (kind, offset, data_len) = (req.kind, req.offset, req.data_len);
        let slot = self.pending.insert(Pending {
            head,
            status,
            req,
            ops: 0,
            errno: None,
            staged: None,
            mem: mem.clone(),
            tickets: Vec::new(),
            joined: Vec::new(),
            clock,
        });
        let fail = |slot: usize, e: ImageError| (Some(slot), Outcome::Image(e));
        match kind {
            RequestType::Read | RequestType::Write => {
                let write = kind == RequestType::Write;
                self.extents.clear();
                let mut extents = std::mem::take(&mut self.extents);
                let mapped = if write {
                    image.map_write(offset, data_len, &mut extents).map(Some)
                } else {
                    image.map_read(offset, data_len, &mut extents).map(|_| None)
                };
                match mapped {
                    Err(e) => {
                        self.extents = extents;
                        return Err(fail(slot, e));
                    }
                    Ok(Some(ticket)) => {
                        if let Some(p) = self.pending.get_mut(slot) {
                            p.tickets.push(ticket);
                        }
                    }
                    Ok(None) => {}
                }
                let r = self.queue_rw(ctx, mem, slot, write, &extents, align);
                self.extents = extents;
                r.map_err(|e| (Some(slot), Outcome::HostIo(e.raw_os_error().unwrap_or(libc::EIO))))?;
            }
            RequestType::Flush => {
                // The epoch is read before the write-back: a change racing with it makes a
                // later FLUSH write back again rather than join.
                let epoch = image.metadata_epoch();
                image.prepare_flush().map_err(|e| fail(slot, e))?;
                self.flush_batch = Some((slot, epoch));
                for file in 0..image.files().len() as u32 {
                    self.queue_op(slot, Op { slot, kind: OpKind::Sync, file, offset: 0, iov: Vec::new() })
                        .map_err(|e| (Some(slot), Outcome::HostIo(e.raw_os_error().unwrap_or(libc::EIO))))?;
                }
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                let mut zeros = std::mem::take(&mut self.zeros);
                zeros.clear();
                for r in &ranges {
                    let zr = if kind == RequestType::Discard {
                        ZeroRequest::Discard
                    } else {
                        ZeroRequest::WriteZeroes { may_unmap: r.unmap }
                    };
                    match image.map_zero(r.offset, r.len, zr, &mut zeros) {
                        Err(e) => {
                            self.zeros = zeros;
                            return Err(fail(slot, e));
                        }
                        Ok(ticket) => {
                            if let Some(p) = self.pending.get_mut(slot) {
                                p.tickets.push(ticket);
                            }
                        }
                    }
                }
                for z in &zeros {
                    if z.mode == ZeroMode::WriteZeroes {
                        if let Err(e) = self.queue_zero_writes(slot, z.file, z.offset, z.len) {
                            self.zeros = zeros;
                            return Err((Some(slot), Outcome::HostIo(e.raw_os_error().unwrap_or(libc::EIO))));
                        }
                        continue;
                    }
                    let op = Op { slot, kind: OpKind::Zero { mode: z.mode, len: z.len }, file: z.file, offset: z.offset, iov: Vec::new() };
                    if let Err(e) = self.queue_op(slot, op) {
                        self.zeros = zeros;
                        return Err((Some(slot), Outcome::HostIo(e.raw_os_error().unwrap_or(libc::EIO))));
                    }
                }
                self.zeros = zeros;
            }
            RequestType::GetId => {}
        }
        if self.pending.get_mut(slot).map(|p| p.ops == 0).unwrap_or(false) {
            // Nothing to do on the host (e.g. a read of an unallocated range).
            self.complete(ctx, slot, true);
        }
        Ok(())
    }

    fn queue_rw(
        &mut self,
        ctx: &Context,
        mem: &Arc<Mem>,
        slot: usize,
        write: bool,
        extents: &[Extent],
        align: usize,
    ) -> io::Result<()> {
        let Some(p) = self.pending.get_mut(slot) else { return Err(io::Error::from_raw_os_error(libc::EIO)) };
        let iovs = host_iovecs(mem, &p.req.segments)?;
        let dsync = write && !ctx.writeback.load(Ordering::Relaxed);
        if !aligned_for(&iovs, align) {
            let chunk = self.pool.take()?.ok_or_else(|| io::Error::from_raw_os_error(libc::ENOBUFS))?;
            p.staged = Some(Staged { chunk, extents: extents.to_vec(), write, dsync, pos: 0, len: 0 });
            return self.next_chunk(slot);
        }
        let dsync = write && !ctx.writeback.load(Ordering::Relaxed);
        for ext in extents {
            let sub = sub_iovecs(&iovs, ext.req_off, ext.len);
            match &ext.target {
                Target::Host { file, offset } => {
                    let kind = if write { OpKind::Write { dsync } } else { OpKind::Read };
                    // A request over many memory regions may exceed what one op can carry.
                    let mut at = *offset;
                    for part in sub.chunks(IOV_MAX) {
                        let bytes: u64 = part.iter().map(|v| v.iov_len as u64).sum();
                        self.queue_op(slot, Op { slot, kind, file: *file, offset: at, iov: part.to_vec() })?;
                        at += bytes;
                    }
                }
                Target::Bytes { data, offset } if !write => {
                    let mut src = data.get(*offset..).unwrap_or(&[]);
                    for v in &sub {
                        let n = v.iov_len.min(src.len());
                        // SAFETY: the iovec covers guest memory (or the bounce buffer) lent to
                        // us for writing, kept mapped through `mem`; `src` has at least n bytes.
                        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), v.iov_base.cast::<u8>(), n) };
                        src = &src[n..];
                    }
                }
                Target::Zero if !write => {
                    for v in &sub {
                        // SAFETY: each iovec covers guest memory (or the bounce buffer) that
                        // the request lent us for writing and that stays mapped through `mem`.
                        unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
                    }
                }
                Target::Zero | Target::Bytes { .. } => return Err(io::Error::from_raw_os_error(libc::EIO)),
            }
        }
        Ok(())
    }

    /// Moves a staged request on by one chunk: hands the finished chunk of a read to the
    /// guest, fills the next one (from the guest for a write, from zero or inline extents for
    /// a read) and queues its host ops. Returns with no op queued when the request is done.
    fn next_chunk(&mut self, slot: usize) -> io::Result<()> {
        loop {
            let Some(p) = self.pending.get_mut(slot) else { return Err(io::Error::from_raw_os_error(libc::EIO)) };
            let Some(mut st) = p.staged.take() else { return Ok(()) };
            let r = stage_next(p, &mut st);
            let base = st.chunk.ptr();
            let (write, dsync, pos, len) = (st.write, st.dsync, st.pos, st.len);
            let mut ops = Vec::new();
            if r.is_ok() && len > 0 {
                for ext in &st.extents {
                    let s = ext.req_off.max(pos);
                    let e = (ext.req_off + ext.len).min(pos + len);
                    if s >= e {
                        continue;
                    }
                    let within = (s - pos) as usize;
                    let n = (e - s) as usize;
                    match &ext.target {
                        Target::Host { file, offset } => {
                            let kind = if write { OpKind::Write { dsync } } else { OpKind::Read };
                            // SAFETY: within + n <= len <= CHUNK: inside the chunk.
                            let at = unsafe { base.add(within) };
                            let iov = vec![libc::iovec { iov_base: at.cast(), iov_len: n }];
                            ops.push(Op { slot, kind, file: *file, offset: offset + (s - ext.req_off), iov });
                        }
                        Target::Bytes { data, offset } if !write => {
                            let from = offset + (s - ext.req_off) as usize;
                            let dst = &mut st.chunk.as_mut_slice()[within..within + n];
                            let src = data.get(from..).unwrap_or(&[]);
                            let k = src.len().min(n);
                            dst[..k].copy_from_slice(&src[..k]);
                            dst[k..].fill(0);
                        }
                        Target::Zero if !write => st.chunk.as_mut_slice()[within..within + n].fill(0),
                        Target::Zero | Target::Bytes { .. } => return Err(io::Error::from_raw_os_error(libc::EIO)),
                    }
                }
            }
            if let Some(p) = self.pending.get_mut(slot) {
                p.staged = Some(st);
            }
            r?;
            if len == 0 {
                return Ok(());
            }
            let issued = !ops.is_empty();
            for op in ops {
                self.queue_op(slot, op)?;
            }
            if issued {
                return Ok(());
            }
        }
    }

    fn queue_op(&mut self, slot: usize, op: Op) -> io::Result<()> {
        let host = match op.kind {
            OpKind::Read => HostOp::Readv { file: op.file, iov: op.iov.as_ptr(), iov_len: op.iov.len() as u32, offset: op.offset },
            OpKind::Write { dsync } => HostOp::Writev {
                file: op.file,
                iov: op.iov.as_ptr(),
                iov_len: op.iov.len() as u32,
                offset: op.offset,
                dsync,
            },
            OpKind::Sync => HostOp::Fdatasync { file: op.file },
            OpKind::Zero { mode, len } => {
                let m = match mode {
                    ZeroMode::PunchHole => libc::FALLOC_FL_PUNCH_HOLE,
                    ZeroMode::ZeroRange | ZeroMode::WriteZeroes => libc::FALLOC_FL_ZERO_RANGE,
                };
                HostOp::Fallocate { file: op.file, offset: op.offset, len, mode: m | libc::FALLOC_FL_KEEP_SIZE }
            }
        };
        let id = self.ops.insert(op);
        // SAFETY: the iovec array lives in `self.ops[id]` (heap storage that does not move) and
        // points into guest memory kept mapped by the request's `Pending::mem`, or into its
        // bounce buffer; both live until this op's completion is reaped.
        unsafe { self.ring.push(host, id as u64) };
        if let Some(p) = self.pending.get_mut(slot) {
            p.ops += 1;
        }
        Ok(())
    }

    fn reap(&mut self, ctx: &Context, publish: bool) -> io::Result<()> {
        while let Some((id, res)) = self.ring.pop() {
            let Some(mut op) = self.ops.remove(id as usize) else { continue };
            let slot = op.slot;
            let outcome = self.op_result(&mut op, res);
            match outcome {
                OpResult::Resubmit => {
                    // The ended op is replaced by its continuation before it is counted off,
                    // so the request cannot complete in between.
                    if let Err(e) = self.queue_op(slot, op) {
                        self.op_failed(slot, e.raw_os_error().unwrap_or(libc::EIO));
                    }
                    self.op_finished(ctx, slot, publish);
                }
                OpResult::Done => self.op_finished(ctx, slot, publish),
                OpResult::Failed(errno) => {
                    self.op_failed(slot, errno);
                    self.op_finished(ctx, slot, publish);
                }
                OpResult::FallbackWriteZeroes { offset, len } => {
                    let r = self.queue_zero_writes(slot, op.file, offset, len);
                    if let Err(e) = r {
                        self.op_failed(slot, e.raw_os_error().unwrap_or(libc::EIO));
                    }
                    self.op_finished(ctx, slot, publish);
                }
            }
        }
        Ok(())
    }

    /// Decides what a completion means for its op (advancing it on a short transfer).
    fn op_result(&mut self, op: &mut Op, res: i32) -> OpResult {
        if res == -libc::EINTR || res == -libc::EAGAIN {
            return OpResult::Resubmit;
        }
        match op.kind {
            OpKind::Read | OpKind::Write { .. } => {
                if res < 0 {
                    return OpResult::Failed(-res);
                }
                let want: usize = op.iov.iter().map(|v| v.iov_len).sum();
                let got = res as usize;
                if got >= want {
                    return OpResult::Done;
                }
                if got == 0 {
                    // A write that stops at the volume's end ran out of space; a read that
                    // does means the image is shorter than its declared capacity.
                    let errno = if matches!(op.kind, OpKind::Write { .. }) { libc::ENOSPC } else { libc::EIO };
                    return OpResult::Failed(errno);
                }
                advance_iovecs(&mut op.iov, got);
                op.offset += got as u64;
                OpResult::Resubmit
            }
            OpKind::Sync => if res < 0 { OpResult::Failed(-res) } else { OpResult::Done },
            OpKind::Zero { mode, len } => {
                if res >= 0 {
                    return OpResult::Done;
                }
                let unsupported = res == -libc::EOPNOTSUPP || res == -libc::EINVAL || res == -libc::ENODEV;
                match (unsupported, mode) {
                    // Deallocation is not possible here: zero in place instead.
                    (true, ZeroMode::PunchHole) => {
                        op.kind = OpKind::Zero { mode: ZeroMode::ZeroRange, len };
                        OpResult::Resubmit
                    }
                    (true, ZeroMode::ZeroRange | ZeroMode::WriteZeroes) => {
                        OpResult::FallbackWriteZeroes { offset: op.offset, len }
                    }
                    _ => OpResult::Failed(-res),
                }
            }
        }
    }

    /// Zeroes a host range by writing a zero buffer, for storage with no zeroing primitive.
    fn queue_zero_writes(&mut self, slot: usize, file: u32, offset: u64, len: u64) -> io::Result<()> {
        if self.zero.is_none() {
            self.zero = Some(AlignedBuf::zeroed(ZERO_CHUNK, 4096)?);
        }
        let base = self.zero.as_ref().map(|z| z.ptr()).unwrap_or(std::ptr::null_mut());
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK as u64) as usize;
            let iov = vec![libc::iovec { iov_base: base.cast(), iov_len: n }];
            self.queue_op(slot, Op { slot, kind: OpKind::Write { dsync: false }, file, offset: offset + done, iov })?;
            done += n as u64;
        }
        Ok(())
    }

    fn op_failed(&mut self, slot: usize, errno: i32) {
        if let Some(p) = self.pending.get_mut(slot) {
            p.errno.get_or_insert(errno);
        }
    }

    fn op_finished(&mut self, ctx: &Context, slot: usize, publish: bool) {
        let (done, staged) = match self.pending.get_mut(slot) {
            Some(p) => {
                p.ops = p.ops.saturating_sub(1);
                (p.ops == 0, p.staged.is_some() && p.errno.is_none())
            }
            None => (false, false),
        };
        if done && staged {
            // A staged request moves on to its next chunk, if it has one.
            if let Err(e) = self.next_chunk(slot) {
                self.op_failed(slot, e.raw_os_error().unwrap_or(libc::EIO));
            }
            if self.pending.get_mut(slot).map(|p| p.ops > 0).unwrap_or(false) {
                return;
            }
        }
        if done {
            self.complete(ctx, slot, publish);
        }
    }

    /// Completes a request whose host ops have all ended.
    /// Starts requests that waited for a bounce chunk, while chunks are available. Called
    /// from the entry points (kick, completion, resume, drain), never from inside a
    /// completion, so a chain of instant completions cannot recurse.
    fn unstarve(&mut self, ctx: &Context) {
        while self.pool.available() {
            let Some(r) = self.starved.pop_front() else { return };
            self.start(ctx, &r.mem, r.head, r.status, r.req, r.clock);
        }
    }

    fn complete(&mut self, ctx: &Context, slot: usize, publish: bool) {
        let Some(mut p) = self.pending.remove(slot) else { return };
        // The chunk goes back to the pool (its data, if any, was handed over already).
        p.staged = None;
        let mut errno = p.errno;
        for ticket in p.tickets.drain(..) {
            if let Err(e) = ctx.image.write_done(ticket, errno.is_none()) {
                tracing::error!(queue = self.queue, error = %e, "metadata update after write failed");
                errno.get_or_insert(libc::EIO);
            }
        }
        let op = if p.req.kind == RequestType::Read { FaultOp::Read } else { FaultOp::Write };
        let mut ignored = false;
        match errno {
            None => ctx.park.on_success(),
            // EFAULT is the guest's memory, not the storage: never retried.
            Some(e) if publish && e != libc::EFAULT => match ctx.park.on_error(op, e) {
                FaultAction::Park => {
                    // Held until resumed (retry timer, `cont`, or the thin volume grown). Any
                    // new clusters were released above: the retry maps the request afresh.
                    self.park(ctx, p, ParkCause::Failed { op, errno: e });
                    return;
                }
                FaultAction::Ignore => {
                    tracing::error!(queue = self.queue, kind = ?p.req.kind, offset = p.req.offset, errno = e,
                        "request FAILED and the error policy is ignore: completed as success, data lost");
                    ignored = true;
                }
                FaultAction::Report => {}
            },
            Some(_) => {}
        }
        if ignored {
            errno = None;
        }
        if errno.is_none()
            && matches!(p.req.kind, RequestType::Write | RequestType::Discard | RequestType::WriteZeroes)
            && !ctx.writeback.load(Ordering::Relaxed)
        {
            // Write-through: the metadata that makes this write reachable is durable too.
            if let Err(e) = ctx.image.prepare_flush() {
                tracing::error!(queue = self.queue, error = %e, "write-through metadata flush failed");
                errno = Some(libc::EIO);
            }
        }
        let outcome = match errno {
            None => Outcome::Ok,
            Some(e) => {
                tracing::warn!(queue = self.queue, kind = ?p.req.kind, offset = p.req.offset, errno = e, "request failed");
                Outcome::HostIo(e)
            }
        };
        let data = if p.req.kind == RequestType::Read && errno.is_none() { p.req.data_len as u32 } else { 0 };
        let vring = if publish { self.vring.clone() } else { None };
        let rec = Rec::of(&p.req, p.clock);
        for (head, status) in std::iter::once((p.head, p.status)).chain(p.joined.iter().copied()) {
            match &vring {
                Some(v) => self.finish_sync(v, &p.mem, head, Some(status), &outcome, data, rec),
                None => {
                    self.flush_batch = None;
                    self.inflight.done();
                }
            }
        }
    }

    /// Holds a request (and FLUSHes joined to it) until the hub resumes this worker; after
    /// the stop grace ([`Worker::final_stop`]), reports it with an IO error instead.
    fn park(&mut self, ctx: &Context, mut p: Pending, cause: ParkCause) {
        self.release_tickets(ctx, &mut p);
        if self.final_stop {
            tracing::error!(queue = self.queue, ?cause, kind = ?p.req.kind, offset = p.req.offset,
                "queue stopping: request reported with an IO error instead of parked again");
            let rec = Rec::of(&p.req, p.clock);
            let heads: Vec<_> = std::iter::once((p.head, p.status)).chain(p.joined.drain(..)).collect();
            match self.vring.clone() {
                Some(v) => {
                    for (head, status) in heads {
                        self.finish_sync(&v, &p.mem, head, Some(status), &Outcome::HostIo(libc::EIO), 0, rec);
                    }
                    self.signal(&v);
                }
                None => heads.iter().for_each(|_| self.inflight.done()),
            }
            return;
        }
        if self.parked.is_empty() {
            tracing::info!(queue = self.queue, ?cause, kind = ?p.req.kind, offset = p.req.offset, "parking IO until resumed");
        }
        let flush = Request { kind: RequestType::Flush, offset: 0, segments: Vec::new(), data_len: 0, ranges: Vec::new() };
        let entered = self.stats.as_ref().map(|_| Instant::now());
        let mut clock = p.clock;
        if clock.parked_since.is_none() {
            clock.parked_since = entered;
        }
        for (head, status) in p.joined.drain(..) {
            self.parked.push_back(Parked { head, status, req: flush.clone(), mem: p.mem.clone(), clock, entered });
            ctx.park.on_park(self.queue, cause);
        }
        self.parked.push_back(Parked { head: p.head, status: p.status, req: p.req, mem: p.mem, clock, entered });
        ctx.park.on_park(self.queue, cause);
        self.publish_parked(0);
    }

    /// Updates the parked gauges after requests whose stints add up to `stints_ns` left.
    fn publish_parked(&self, stints_ns: u64) {
        if let Some(s) = &self.stats {
            let oldest = self.parked.iter().filter_map(|r| r.clock.parked_since).min();
            s.set_parked(self.parked.len(), stints_ns, oldest);
        }
    }

    /// Takes every parked request out of the list, accounting for the time they spent in it.
    fn take_parked(&mut self) -> std::collections::VecDeque<Parked> {
        let parked = std::mem::take(&mut self.parked);
        if self.stats.is_some() {
            let now = Instant::now();
            let ns: u128 = parked.iter().filter_map(|r| r.entered).map(|t| now.saturating_duration_since(t).as_nanos()).sum();
            self.publish_parked(u64::try_from(ns).unwrap_or(u64::MAX));
        }
        parked
    }

    /// The hub says the cause may have cleared: retries every parked request (each may park
    /// again).
    pub fn on_resume(&mut self, ctx: &Context) -> io::Result<()> {
        if self.parked.is_empty() {
            return Ok(());
        }
        let parked = self.take_parked();
        ctx.park.on_unpark(parked.len());
        tracing::info!(queue = self.queue, requests = parked.len(), "retrying parked IO");
        for r in parked {
            self.start(ctx, &r.mem, r.head, r.status, r.req, r.clock);
        }
        self.unstarve(ctx);
        self.ring.submit()?;
        if let Some(v) = self.vring.clone() {
            self.signal(&v);
        }
        Ok(())
    }

    /// Requests parked on this queue.
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// Completes every parked request with an IO error (the frontend stops the queue, or the
    /// daemon stops, and the cause did not clear in time), and reports rather than parks
    /// whatever fails from now until the queue serves again. Nothing is completed as success.
    pub fn fail_parked(&mut self, ctx: &Context) {
        self.final_stop = true;
        let n = self.parked.len();
        if n == 0 {
            return;
        }
        tracing::error!(queue = self.queue, requests = n, "parked IO completed with an IO error: the queue or the daemon is stopping");
        let parked = self.take_parked();
        ctx.park.on_unpark(n);
        if let Some(v) = self.vring.clone() {
            for r in parked {
                let rec = Rec::of(&r.req, r.clock);
                self.finish_sync(&v, &r.mem, r.head, Some(r.status), &Outcome::HostIo(libc::EIO), 0, rec);
            }
            self.signal(&v);
        } else {
            for _ in 0..n {
                self.inflight.done();
            }
        }
    }

    /// Forgets parked requests without completing them (the frontend is gone, or the daemon
    /// stops): none was acknowledged, so nothing acknowledged is lost.
    pub fn drop_parked(&mut self, ctx: &Context) {
        let n = self.parked.len();
        if n > 0 {
            tracing::warn!(queue = self.queue, requests = n, "parked IO dropped uncompleted (never acknowledged to the guest)");
            for _ in 0..n {
                self.inflight.done();
            }
            self.take_parked();
            ctx.park.on_unpark(n);
        }
    }

    /// Writes the status byte, returns the chain to the guest and counts the request.
    #[allow(clippy::too_many_arguments)]
    fn finish_sync(
        &mut self,
        vring: &Vring,
        mem: &Arc<Mem>,
        head: u16,
        status: Option<GuestAddress>,
        outcome: &Outcome,
        data_len: u32,
        rec: Rec,
    ) {
        if let (Some(s), Some(t)) = (&self.stats, rec.started) {
            s.record(rec.op, t, rec.bytes, error_class(outcome));
        }
        let mut used = 0;
        if let Some(addr) = status {
            if mem.write_obj(virtio_status(outcome), addr).is_ok() {
                used = data_len.saturating_add(1);
            }
        }
        if let Err(e) = vring.add_used(head, used) {
            tracing::error!(queue = self.queue, error = ?e, "could not add to the used ring");
        }
        // A completion the guest can see: a later FLUSH may have to cover it.
        self.flush_batch = None;
        self.needs_signal = true;
        self.inflight.done();
    }

    fn signal(&mut self, vring: &Vring) {
        if !self.needs_signal {
            return;
        }
        self.needs_signal = false;
        if vring.needs_notification().unwrap_or(true) {
            if let Err(e) = vring.signal_used_queue() {
                tracing::debug!(queue = self.queue, error = %e, "could not signal the guest");
            }
        }
    }
}

impl Drop for Worker {
    /// A worker dropped with host ops in flight (storage that never answered a drain) must
    /// not free what the kernel may still read or write: the requests' buffers, bounce
    /// chunks, iovec arrays and guest mappings are leaked instead, and said so.
    fn drop(&mut self) {
        let in_flight = self.ring.in_flight();
        if self.ops.len() == 0 && in_flight == 0 {
            return;
        }
        tracing::error!(queue = self.queue, ops = self.ops.len(), in_flight,
            "worker dropped with host IO in flight: its buffers are leaked, not freed");
        std::mem::forget(std::mem::replace(&mut self.ops, Slab::new()));
        std::mem::forget(std::mem::replace(&mut self.pending, Slab::new()));
        std::mem::forget(self.zero.take());
    }
}

enum OpResult {
    Done,
    Resubmit,
    Failed(i32),
    FallbackWriteZeroes { offset: u64, len: u64 },
}

/// Whether every iovec meets the storage's O_DIRECT alignment (address and length).
fn aligned_for(iovs: &[libc::iovec], align: usize) -> bool {
    iovs.iter().all(|v| (v.iov_base as usize) % align == 0 && v.iov_len % align == 0)
}

/// Whether a request's guest buffers must be staged through a bounce chunk.
fn needs_bounce(mem: &Mem, segments: &[Segment], align: usize) -> bool {
    match host_iovecs(mem, segments) {
        Ok(iovs) => !aligned_for(&iovs, align),
        // Unreachable memory fails later, with its own error; it needs no chunk.
        Err(_) => false,
    }
}

/// Advances a staged request's chunk: hands a finished read chunk to the guest, then
/// selects the next range and, for a write, fills it from the guest. `st.len` is 0 when
/// the request has no bytes left.
fn stage_next(p: &Pending, st: &mut Staged) -> io::Result<()> {
    if st.len > 0 && !st.write {
        copy_range_to_guest(&p.mem, &p.req.segments, st.pos, &st.chunk.as_slice()[..st.len as usize])?;
    }
    st.pos += st.len;
    st.len = p.req.data_len.saturating_sub(st.pos).min(CHUNK as u64);
    if st.len > 0 && st.write {
        let n = st.len as usize;
        copy_range_from_guest(&p.mem, &p.req.segments, st.pos, &mut st.chunk.as_mut_slice()[..n])?;
    }
    Ok(())
}

/// Translates guest segments into host iovecs (a segment may span memory regions).
fn host_iovecs(mem: &Mem, segments: &[Segment]) -> io::Result<Vec<libc::iovec>> {
    let mut out = Vec::with_capacity(segments.len());
    for s in segments {
        for slice in mem.get_slices(s.addr, s.len as usize) {
            let slice = slice.map_err(|_| io::Error::from_raw_os_error(libc::EFAULT))?;
            out.push(libc::iovec { iov_base: slice.ptr_guard_mut().as_ptr().cast(), iov_len: slice.len() });
        }
    }
    Ok(out)
}

/// The iovecs covering bytes `[off, off + len)` of the concatenation of `iovs`.
fn sub_iovecs(iovs: &[libc::iovec], off: u64, len: u64) -> Vec<libc::iovec> {
    let mut out = Vec::new();
    let mut skip = off as usize;
    let mut want = len as usize;
    for v in iovs {
        if want == 0 {
            break;
        }
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - skip).min(want);
        // SAFETY: `skip < iov_len`, so the pointer stays inside the same buffer.
        let base = unsafe { v.iov_base.cast::<u8>().add(skip) };
        out.push(libc::iovec { iov_base: base.cast(), iov_len: n });
        want -= n;
        skip = 0;
    }
    out
}

/// Drops the first `n` bytes of an iovec list (after a short transfer).
fn advance_iovecs(iov: &mut Vec<libc::iovec>, mut n: usize) {
    let mut first = 0;
    while first < iov.len() && n >= iov[first].iov_len {
        n -= iov[first].iov_len;
        first += 1;
    }
    iov.drain(..first);
    if let Some(v) = iov.first_mut() {
        // SAFETY: `n < iov_len` here, so the pointer stays inside the same buffer.
        v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
        v.iov_len -= n;
    }
}

fn copy_to_guest(mem: &Mem, segments: &[Segment], mut data: &[u8]) -> Result<(), vm_memory::GuestMemoryError> {
    for s in segments {
        if data.is_empty() {
            break;
        }
        let n = (s.len as usize).min(data.len());
        mem.write_slice(&data[..n], s.addr)?;
        data = &data[n..];
    }
    Ok(())
}


#[cfg(test)]
mod tests {
    use super::*;

    fn iov(base: usize, len: usize) -> libc::iovec {
        libc::iovec { iov_base: base as *mut libc::c_void, iov_len: len }
    }

    #[test]
    fn sub_iovecs_slices_across_buffers() {
        let v = [iov(0x1000, 512), iov(0x4000, 1024)];
        let s = sub_iovecs(&v, 256, 512);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].iov_base as usize, s[0].iov_len), (0x1100, 256));
        assert_eq!((s[1].iov_base as usize, s[1].iov_len), (0x4000, 256));
        assert!(sub_iovecs(&v, 2000, 100).is_empty());
    }

    #[test]
    fn a_flush_joins_only_while_the_metadata_epoch_stands() {
        let file = std::fs::File::open("/dev/null").expect("/dev/null");
        let mut w = Worker::new(0, 8, &[std::os::fd::AsRawFd::as_raw_fd(&file)], None).expect("worker (needs io_uring)");
        let flush = Request { kind: RequestType::Flush, offset: 0, segments: Vec::new(), data_len: 0, ranges: Vec::new() };
        let slot = w.pending.insert(Pending {
            head: 0,
            status: GuestAddress(0),
            req: flush,
            ops: 1,
            errno: None,
            staged: None,
            mem: Arc::new(Mem::new()),
            tickets: Vec::new(),
            clock: Clock::default(),
            joined: Vec::new(),
        });
        w.flush_batch = Some((slot, 7));
        assert!(w.join_flush(7, 1, GuestAddress(0x10)), "nothing changed: share the sync");
        // Another queue linked a completed write since the first FLUSH's write-back.
        assert!(!w.join_flush(8, 2, GuestAddress(0x20)), "a FLUSH joined one that misses a completed write");
        assert_eq!(w.pending.get_mut(slot).map(|p| p.joined.len()), Some(1));
    }

    #[test]
    fn the_memory_table_a_chain_is_checked_against_is_never_older_than_the_chain() {
        use vm_memory::{GuestMemoryRegion, GuestRegionMmap};
        let file = std::fs::File::open("/dev/null").expect("/dev/null");
        let mut w = Worker::new(0, 8, &[std::os::fd::AsRawFd::as_raw_fd(&file)], None).expect("worker (needs io_uring)");
        // Region 0 holds the rings, descriptors and header; region 1, which the frontend adds
        // just before publishing the chain, holds the data buffer.
        let r0 = Arc::new(GuestRegionMmap::<()>::from_range(GuestAddress(0), 0x10000, None).expect("region 0"));
        let r1 = Arc::new(GuestRegionMmap::<()>::from_range(GuestAddress(0x10_0000), 0x10000, None).expect("region 1"));
        let old = Arc::new(GuestMemoryMmap::from_arc_regions(vec![r0.clone()]).expect("old table"));
        let new = Arc::new(GuestMemoryMmap::from_arc_regions(vec![r0.clone(), r1]).expect("new table"));
        assert_eq!(r0.len(), 0x10000);
        let vring = Vring::new(GuestMemoryAtomic::new((*old).clone()), 16).expect("vring");
        vring.set_queue_size(16);
        vring.set_queue_info(0x0, 0x1000, 0x2000).expect("queue info");
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        // A read of sector 0: header (device-readable), 512-byte buffer in region 1, status.
        let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            old.write_slice(&d, GuestAddress(i * 16)).expect("descriptor");
        };
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        desc(0, 0x3000, 16, NEXT, 1);
        desc(1, 0x10_0000, 512, NEXT | WRITE, 2);
        desc(2, 0x3100, 1, WRITE, 0);
        old.write_slice(&[0u8; 16], GuestAddress(0x3000)).expect("header");
        old.write_obj(0u16, GuestAddress(0x1004)).expect("avail ring[0]");
        old.write_obj(1u16, GuestAddress(0x1002)).expect("avail idx");
        // The table is swapped (ADD_MEM_REG handled) between the worker's two steps.
        let calls = std::cell::Cell::new(0);
        let memory = || {
            calls.set(calls.get() + 1);
            Some(if calls.get() == 1 { old.clone() } else { new.clone() })
        };
        let (chain, mem) = w.pop_with(memory, &vring, false).expect("a chain");
        assert!(Arc::ptr_eq(&mem, &new), "the chain was checked against a table taken before its index was read");
        let limits = crate::request::Limits { capacity: 1 << 20, logical_block_size: 512, seg_max: 126, max_bytes: 1 << 20, read_only: false };
        let parsed = parse(chain, &limits);
        assert!(parsed.request.is_ok(), "{:?}", parsed.request.err());
        // Nothing more to pop, whatever the table.
        assert!(w.pop_with(|| Some(new.clone()), &vring, false).is_none());
    }

    #[test]
    fn advance_after_short_transfer() {
        let mut v = vec![iov(0x1000, 512), iov(0x4000, 1024)];
        advance_iovecs(&mut v, 700);
        assert_eq!(v.len(), 1);
        assert_eq!((v[0].iov_base as usize, v[0].iov_len), (0x4000 + 188, 836));
    }
}

/// In-process tests of the worker over a fake engine: the test decides when and how every
/// host op completes.
#[cfg(test)]
mod engine_tests {
    use super::*;
    use crate::image::{ImageFormat, RawImage};
    use crate::park::{FaultPolicy, ParkHub};
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// Ops pushed and not answered; answers not yet popped.
    #[derive(Default)]
    struct FakeState {
        ops: VecDeque<(u64, HostOp)>,
        done: VecDeque<(u64, i32)>,
    }

    struct Fake {
        state: Arc<Mutex<FakeState>>,
        efd: EventFd,
    }

    impl Engine for Fake {
        unsafe fn push(&mut self, op: HostOp, user_data: u64) {
            self.state.lock().expect("fake").ops.push_back((user_data, op));
        }
        fn submit(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn submit_and_wait_one(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn submit_and_wait_one_for(&mut self, _limit: std::time::Duration) -> io::Result<bool> {
            Ok(!self.state.lock().expect("fake").done.is_empty())
        }
        fn pop(&mut self) -> Option<(u64, i32)> {
            self.state.lock().expect("fake").done.pop_front()
        }
        fn in_flight(&self) -> usize {
            let s = self.state.lock().expect("fake");
            s.ops.len() + s.done.len()
        }
        fn eventfd(&self) -> std::os::fd::RawFd {
            std::os::fd::AsRawFd::as_raw_fd(&self.efd)
        }
        fn ack_eventfd(&self) {}
    }

    /// Bytes an op asks for.
    fn op_len(op: &HostOp) -> i32 {
        match op {
            // SAFETY: the worker keeps the iovec array alive until the op completes.
            HostOp::Readv { iov, iov_len, .. } | HostOp::Writev { iov, iov_len, .. } => unsafe {
                std::slice::from_raw_parts(*iov, *iov_len as usize).iter().map(|v| v.iov_len as i32).sum()
            },
            _ => 0,
        }
    }

    struct Rig {
        w: Worker,
        fake: Arc<Mutex<FakeState>>,
        ctx: Context,
        vring: Vring,
        mem: Arc<Mem>,
        avail: u16,
        _dir: std::path::PathBuf,
    }

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    impl Rig {
        fn new(name: &str, op_cap: usize) -> Rig {
            let dir = std::env::temp_dir().join(format!("thinblk-worker-{name}-{}", std::process::id()));
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join("disk");
            std::fs::File::create(&path).and_then(|f| f.set_len(1 << 20)).expect("image");
            let image: Arc<dyn ImageFormat> = Arc::new(RawImage::open(&path, false, false).expect("raw image"));
            let mem = Arc::new(Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory"));
            let atomic = AtomicMem::new((*mem).clone());
            let park = ParkHub::new(1).expect("hub");
            let ctx = Context::for_test(image, atomic.clone(), park);
            let vring = Vring::new(atomic, 16).expect("vring");
            vring.set_queue_size(16);
            vring.set_queue_info(DESC, AVAIL, USED).expect("queue info");
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            let fake = Arc::new(Mutex::new(FakeState::default()));
            let engine = Fake { state: fake.clone(), efd: EventFd::new(EFD_NONBLOCK).expect("eventfd") };
            let w = Worker::with_engine(0, Box::new(engine), op_cap, None);
            Rig { w, fake, ctx, vring, mem, avail: 0, _dir: dir }
        }

        fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem.write_slice(&d, GuestAddress(DESC + 16 * u64::from(i))).expect("descriptor");
        }

        /// Publishes a 4 KiB read of sector `n` as chain `n` (3 descriptors); `data` is the
        /// buffer's address. Returns the status byte's address.
        fn read(&mut self, n: u16, data: u64) -> u64 {
            let hdr = 0x8000 + 32 * u64::from(n);
            let status = hdr + 16;
            let mut h = [0u8; 16];
            h[8..16].copy_from_slice(&(u64::from(n) * 8).to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(hdr)).expect("header");
            self.mem.write_slice(&[0xff], GuestAddress(status)).expect("status");
            let head = 3 * n;
            self.desc(head, hdr, 16, 1, head + 1);
            self.desc(head + 1, data, 4096, 1 | 2, head + 2);
            self.desc(head + 2, status, 1, 2, 0);
            let slot = AVAIL + 4 + 2 * u64::from(self.avail % 16);
            self.mem.write_slice(&head.to_le_bytes(), GuestAddress(slot)).expect("avail ring");
            self.avail += 1;
            self.mem.write_slice(&self.avail.to_le_bytes(), GuestAddress(AVAIL + 2)).expect("avail idx");
            status
        }

        fn kick(&mut self) {
            self.w.on_kick(&self.ctx, &self.vring).expect("kick");
        }

        /// Answers the oldest `n` ops with `result(op)`, then lets the worker reap and pop.
        fn answer(&mut self, n: usize, result: impl Fn(&HostOp) -> i32) {
            {
                let mut s = self.fake.lock().expect("fake");
                for _ in 0..n {
                    let Some((ud, op)) = s.ops.pop_front() else { break };
                    let r = result(&op);
                    s.done.push_back((ud, r));
                }
            }
            self.w.on_completion(&self.ctx).expect("completion");
            self.kick();
        }

        fn pushed(&self) -> usize {
            self.fake.lock().expect("fake").ops.len()
        }

        fn used(&self) -> u16 {
            let mut b = [0u8; 2];
            self.mem.read_slice(&mut b, GuestAddress(USED + 2)).expect("used idx");
            u16::from_le_bytes(b)
        }

        fn byte(&self, at: u64) -> u8 {
            let mut b = [0u8; 1];
            self.mem.read_slice(&mut b, GuestAddress(at)).expect("byte");
            b[0]
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self._dir);
        }
    }

    #[test]
    fn back_pressure_pops_no_chain_while_ops_are_at_their_cap() {
        let mut r = Rig::new("cap", 2);
        let statuses: Vec<u64> = (0..5).map(|n| r.read(n, 0x20000 + 4096 * u64::from(n))).collect();
        r.kick();
        assert_eq!(r.pushed(), 2, "two ops in flight, the other chains stay in the ring");
        assert_eq!(r.used(), 0);
        r.answer(1, op_len);
        assert_eq!((r.used(), r.pushed()), (1, 2), "one completion frees room for one chain");
        while r.used() < 5 {
            r.answer(1, op_len);
        }
        assert_eq!(r.pushed(), 0);
        assert!(statuses.iter().all(|&s| r.byte(s) == 0));
    }

    #[test]
    fn a_short_transfer_is_resubmitted_for_the_rest() {
        let mut r = Rig::new("short", 64);
        let status = r.read(0, 0x20000);
        r.kick();
        r.answer(1, |_| 1024);
        assert_eq!(r.used(), 0, "not complete after a quarter");
        let rest = r.fake.lock().expect("fake").ops.front().map(|(_, op)| (op_len(op), *op));
        match rest {
            Some((3072, HostOp::Readv { offset, .. })) => assert_eq!(offset, 1024),
            other => panic!("expected the remaining 3072 bytes at offset 1024, got {other:?}"),
        }
        r.answer(1, op_len);
        assert_eq!((r.used(), r.byte(status)), (1, 0));
    }

    struct AlwaysPark;
    impl FaultPolicy for AlwaysPark {
        fn on_error(&self, _op: FaultOp, _errno: i32) -> FaultAction {
            FaultAction::Park
        }
        fn on_success(&self) {}
    }

    #[test]
    fn a_stop_reports_parked_io_and_never_parks_again() {
        let mut r = Rig::new("stop", 64);
        r.ctx.park.set_policy(Arc::new(AlwaysPark));
        let first = r.read(0, 0x20000);
        r.kick();
        r.answer(1, |_| -libc::EIO);
        assert_eq!((r.w.parked(), r.used()), (1, 0), "the failed read is parked");
        // The queue stops: what is parked is reported, and what fails from now on too.
        r.w.fail_parked(&r.ctx);
        assert_eq!((r.w.parked(), r.used(), r.byte(first)), (0, 1, 1));
        // A request popped while the stop still holds (popping normally ends the stop, as
        // the queue serves again; the stop is restored to model a retry racing the stop).
        let second = r.read(1, 0x21000);
        let (chain, mem) = r.w.pop(&r.ctx, &r.vring.clone(), false).expect("a chain");
        r.w.final_stop = true;
        let parsed = parse(chain, &r.ctx.limits());
        let (Ok(req), Some(status)) = (parsed.request, parsed.status) else { panic!("a valid read") };
        r.w.start(&r.ctx, &mem, parsed.head, status, req, Clock::default());
        r.answer(1, |_| -libc::EIO);
        assert_eq!((r.w.parked(), r.used(), r.byte(second)), (0, 2, 1), "reported, not parked");
    }

    #[test]
    fn a_worker_dropped_with_ops_in_flight_leaks_their_buffers() {
        // Unaligned buffer: the read goes through a bounce chunk the kernel would write.
        let mut r = Rig::new("drop", 64);
        r.read(0, 0x20001);
        r.kick();
        assert_eq!(r.pushed(), 1);
        let pool = r.w.pool.clone();
        assert_eq!(pool.idle(), 0);
        let w = std::mem::replace(&mut r.w, Worker::with_engine(1, Box::new(Fake { state: Arc::default(), efd: EventFd::new(EFD_NONBLOCK).expect("eventfd") }), 1, None));
        drop(w);
        assert_eq!(pool.idle(), 0, "the chunk under an op in flight must not return to the pool");
        // The same with the op answered first: the chunk comes back.
        let mut r = Rig::new("drop2", 64);
        r.read(0, 0x20001);
        r.kick();
        r.answer(1, op_len);
        let pool = r.w.pool.clone();
        assert_eq!(r.used(), 1);
        assert_eq!(pool.idle(), 1);
    }
}

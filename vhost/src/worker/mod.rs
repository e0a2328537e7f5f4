//! One worker per virtqueue: pops chains, parses requests, asks the image format where the
//! data lives, queues host IO on the worker's engine straight into guest memory, and
//! completes requests as the engine reports back.
//!
//! One request reads top-down through the submodules: [`pop`] (virtqueue → request) →
//! [`submit`] (extents → engine ops) → [`reap`] (completions) → [`dispose`] (the one place a
//! failure is reported, ignored or parked) → [`complete`] (status, used ring, notify);
//! [`parked`] holds requests that wait, [`iov`] the iovec arithmetic, [`budget`] what every
//! request in our hands holds from pop to used ring. This file holds the worker's state.

mod budget;
mod complete;
mod dispose;
mod iov;
mod parked;
mod pop;
mod reap;
mod submit;

use budget::{Budget, Misbehaviour};
use dispose::Fate;
use iov::{advance_iovecs, aligned_for, copy_to_guest, needs_bounce, stage_next, sub_iovecs};
use crate::guest_write::{host_iovecs, mark_filled};

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use crate::bounce::{copy_range_from_guest, copy_range_to_guest, AlignedBuf, BouncePool, Staged, CHUNK, POOL_CHUNKS};
use crate::context::Context;
use crate::error::{error_class, virtio_status, ImageError, Outcome};
use crate::image::{Extent, HostZero, Target, WriteTicket, ZeroMode, ZeroRequest};
use crate::park::{FaultAction, FaultOp, ParkCause};
use crate::request::{parse, Request, RequestType, Segment, ID_LEN};
use crate::stats::{QueueStats, StatOp};
use crate::engine::{Engine, HostOp};
use crate::uring::Ring;

pub use crate::context::{AtomicMem, InHand, Mem};
pub use crate::vring::Vring;

/// Size of the zero buffer used when a host cannot zero a range itself.
const ZERO_CHUNK: usize = 1 << 20;


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
    fn values(&self) -> impl Iterator<Item = &T> {
        self.items.iter().flatten()
    }
}

/// The per-queue worker.
pub struct Worker {
    queue: usize,
    ring: Box<dyn Engine>,
    pending: Slab<Pending>,
    ops: Slab<Op>,
    in_hand: Arc<InHand>,
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
    /// Requests in our hands, by head: at most the ring's size (checked before popping).
    budget: Budget,
    /// The last pop found the budget spent or the ring broken: the kick loop stops (the
    /// chains stay in the ring until a completion returns budget).
    held_back: bool,
    /// Polling mode: the queue thread polls the ring before it sleeps, so the driver is not
    /// asked for kicks (EVENT_IDX) until [`Worker::before_sleep`].
    polling: bool,
}

impl Worker {
    /// Creates the worker for `queue` with its own ring over `files` (in a table of `slots`),
    /// counting requests in `stats` if given.
    pub fn new(queue: usize, ring_entries: u32, files: &[std::os::fd::RawFd], slots: usize, stats: Option<Arc<QueueStats>>) -> io::Result<Worker> {
        let ring = Box::new(Ring::new(ring_entries, files, slots)?);
        Ok(Worker::with_engine(queue, ring, ring_entries as usize * 4, stats))
    }

    /// Registers the image's file table `table` with this worker's ring; refused while a
    /// request in hand (a bounced read that goes on chunk by chunk) names a slot it changes.
    pub fn set_files(&mut self, table: &[std::os::fd::RawFd]) -> io::Result<()> {
        let mut busy: Vec<u32> = Vec::new();
        for p in self.pending.values() {
            if let Some(st) = &p.staged {
                busy.extend(st.extents.iter().filter_map(|e| match e.target {
                    crate::image::Target::Host { file, .. } => Some(file),
                    _ => None,
                }));
            }
        }
        self.ring.set_files(table, &busy)
    }

    /// A worker over any engine, popping no chain while `op_cap` host ops are in flight.
    pub fn with_engine(queue: usize, ring: Box<dyn Engine>, op_cap: usize, stats: Option<Arc<QueueStats>>) -> Worker {
        Worker {
            queue,
            ring,
            pending: Slab::new(),
            ops: Slab::new(),
            in_hand: Arc::new(InHand::with_stats(stats.clone())),
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
            budget: Budget::new(),
            held_back: false,
            polling: false,
        }
    }

    /// Back-pressure: host ops in flight are at their cap, so no new chain is popped until
    /// completions free room (the completion handler pops again).
    fn throttled(&self) -> bool {
        self.ring.in_flight() >= self.op_cap
    }

    /// Has the worker's ring wait on the queue thread's event set `fd` as well (one blocking
    /// point per loop: [`Worker::prepare_wait`], then a wait outside the worker's lock).
    pub fn watch_events(&mut self, fd: std::os::fd::RawFd) -> io::Result<()> {
        self.ring.watch_events(fd)
    }

    /// Whether the worker has something to do without waiting (the polling mode's check):
    /// completions, or chains the driver published that the worker may take now (the same
    /// questions `pop` asks: otherwise a ring that cannot be served would keep the thread
    /// polling).
    pub fn has_work(&mut self, ctx: &Context) -> bool {
        if self.ring.ready() {
            return true;
        }
        self.chains_to_take(ctx)
    }

    /// Chains the driver published that a pop would take now.
    fn chains_to_take(&self, ctx: &Context) -> bool {
        if self.held_back {
            return false;
        }
        let Some(v) = self.vring.as_ref() else { return false };
        let s = v.lock();
        if self.refusal(&s, ctx.stopping.load(Ordering::SeqCst), &ctx.gate).is_some() {
            return false;
        }
        let q = s.get_queue();
        let mem = s.memory();
        q.avail_idx(&*mem, Ordering::Acquire).map(|a| a.0 != q.next_avail()).unwrap_or(false)
    }

    /// Polling mode on or off (see [`Worker::before_sleep`]).
    pub fn set_polling(&mut self, on: bool) {
        self.polling = on;
    }

    /// Polling mode, before the queue thread sleeps: asks the driver for kicks again
    /// (EVENT_IDX); true if chains arrived meanwhile (the thread then does not sleep).
    pub fn before_sleep(&mut self, ctx: &Context) -> bool {
        if !self.polling || !ctx.event_idx.load(Ordering::Relaxed) {
            return false;
        }
        // Chains that arrived but cannot be taken now (budget, gate, stop) do not keep the
        // thread awake: what frees them (a completion, the gate) wakes it.
        self.vring.as_ref().is_some_and(|v| v.enable_notification().unwrap_or(false)) && self.chains_to_take(ctx)
    }

    /// Readies the queue thread's wait: what is queued goes to the submission queue, and the
    /// event poll is armed; the returned wait submits them.
    pub fn prepare_wait(&mut self) -> Option<crate::uring::Waiter> {
        self.ring.prepare_wait()
    }

    /// The in-flight counter `stop_vring` waits on.
    pub fn in_hand(&self) -> Arc<InHand> {
        self.in_hand.clone()
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

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryAtomic;



    #[test]
    fn a_flush_joins_only_while_the_metadata_epoch_stands() {
        let file = std::fs::File::open("/dev/null").expect("/dev/null");
        let mut w = Worker::new(0, 8, &[std::os::fd::AsRawFd::as_raw_fd(&file)], 1, None).expect("worker (needs io_uring)");
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
        let mut w = Worker::new(0, 8, &[std::os::fd::AsRawFd::as_raw_fd(&file)], 1, None).expect("worker (needs io_uring)");
        // Region 0 holds the rings, descriptors and header; region 1, which the frontend adds
        // just before publishing the chain, holds the data buffer.
        let r0 = Arc::new(GuestRegionMmap::<crate::guest_write::LogBitmap>::from_range(GuestAddress(0), 0x10000, None).expect("region 0"));
        let r1 = Arc::new(GuestRegionMmap::<crate::guest_write::LogBitmap>::from_range(GuestAddress(0x10_0000), 0x10000, None).expect("region 1"));
        let old = Arc::new(Mem::from_arc_regions(vec![r0.clone()]).expect("old table"));
        let new = Arc::new(Mem::from_arc_regions(vec![r0.clone(), r1]).expect("new table"));
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
        let (chain, mem) = w.pop_with(memory, &vring, false, &Default::default()).expect("a chain");
        assert!(Arc::ptr_eq(&mem, &new), "the chain was checked against a table taken before its index was read");
        let limits = crate::request::Limits { capacity: 1 << 20, logical_block_size: 512, seg_max: 126, max_bytes: 1 << 20, read_only: false };
        let parsed = parse(chain, &limits);
        assert!(parsed.request.is_ok(), "{:?}", parsed.request.err());
        // Nothing more to pop, whatever the table.
        assert!(w.pop_with(|| Some(new.clone()), &vring, false, &Default::default()).is_none());
    }

}

#[cfg(test)]
mod engine_tests;

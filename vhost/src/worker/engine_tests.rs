//! In-process tests of the worker over a fake engine: the test decides when and how every
//! host op completes. Compiled only with `#[cfg(test)]` (declared so in `mod.rs`).

use super::*;
use super::pop::SUBMIT_EVERY;
use crate::image::{Disk, RawImage};
use crate::park::{FaultPolicy, ParkHub};
use std::collections::VecDeque;
use std::sync::Mutex;

/// Ops pushed and not answered; answers not yet popped.
#[derive(Default)]
struct FakeState {
    ops: VecDeque<(u64, HostOp)>,
    done: VecDeque<(u64, i32)>,
    /// At each `submit` call, in order: the ops pushed and not yet answered.
    submits: Vec<usize>,
}

struct Fake {
    state: Arc<Mutex<FakeState>>,
}

/// The fake's state, also after a test thread failed an assertion while holding it (so a
/// failing test unwinds and cleans up rather than aborting on a poisoned lock).
fn lock(state: &Mutex<FakeState>) -> std::sync::MutexGuard<'_, FakeState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Engine for Fake {
    unsafe fn push(&mut self, op: HostOp, user_data: u64) {
        lock(&self.state).ops.push_back((user_data, op));
    }
    fn submit(&mut self) -> io::Result<()> {
        let mut s = lock(&self.state);
        let n = s.ops.len();
        s.submits.push(n);
        Ok(())
    }
    fn submit_and_wait_one(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn submit_and_wait_one_for(&mut self, _limit: std::time::Duration) -> io::Result<bool> {
        Ok(!lock(&self.state).done.is_empty())
    }
    fn pop(&mut self) -> Option<(u64, i32)> {
        lock(&self.state).done.pop_front()
    }
    fn in_flight(&self) -> usize {
        let s = lock(&self.state);
        s.ops.len() + s.done.len()
    }
}

/// A split-ring descriptor's 16 bytes.
fn descriptor(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
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
        Rig::build(name, op_cap, None)
    }

    /// A rig whose guest memory logs into `log` (off until the test turns it on).
    fn logged(name: &str, log: &Arc<crate::guest_write::DirtyLog>) -> Rig {
        Rig::build(name, 64, Some(log.clone()))
    }

    fn build(name: &str, op_cap: usize, log: Option<Arc<crate::guest_write::DirtyLog>>) -> Rig {
        let dir = std::env::temp_dir().join(format!("thinblk-worker-{name}-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("disk");
        std::fs::File::create(&path).and_then(|f| f.set_len(1 << 20)).expect("image");
        let image: Arc<dyn Disk> = Arc::new(RawImage::open(&path, false, false).expect("raw image"));
        let region = vm_memory::GuestRegionMmap::<crate::guest_write::LogBitmap>::from_range(GuestAddress(0), 1 << 20, None).expect("region");
        if let Some(log) = log {
            region.bitmap().bind(0, log);
        }
        let mem = Arc::new(Mem::from_arc_regions(vec![Arc::new(region)]).expect("memory"));
        let atomic = AtomicMem::new((*mem).clone());
        let park = ParkHub::new(1).expect("hub");
        let ctx = Context::for_test(image, atomic.clone(), park);
        let vring = Vring::new(atomic, 16).expect("vring");
        vring.set_queue_size(16);
        vring.set_queue_info(DESC, AVAIL, USED).expect("queue info");
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let fake = Arc::new(Mutex::new(FakeState::default()));
        let engine = Fake { state: fake.clone() };
        let w = Worker::with_engine(0, Box::new(engine), op_cap, None);
        Rig { w, fake, ctx, vring, mem, avail: 0, _dir: dir }
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.mem.write_slice(&descriptor(addr, len, flags, next), GuestAddress(DESC + 16 * u64::from(i))).expect("descriptor");
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

    /// Publishes chain `n` of type `rtype` (header, one data buffer of `len` bytes at `data`,
    /// device-writable if `to_guest`, status byte). Returns the status byte's address.
    fn request(&mut self, n: u16, rtype: u32, data: u64, len: u32, to_guest: bool) -> u64 {
        let hdr = 0x8000 + 32 * u64::from(n);
        let status = hdr + 16;
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&rtype.to_le_bytes());
        h[8..16].copy_from_slice(&(u64::from(n) * 8).to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).expect("header");
        self.mem.write_slice(&[0xff], GuestAddress(status)).expect("status");
        let head = 3 * n;
        self.desc(head, hdr, 16, 1, head + 1);
        self.desc(head + 1, data, len, 1 | if to_guest { 2 } else { 0 }, head + 2);
        self.desc(head + 2, status, 1, 2, 0);
        self.publish(head);
        status
    }

    /// Builds a 4 KiB read of sector `8 × head` as chain `head`: one ring descriptor naming an
    /// indirect table (so any of the ring's 16 heads can carry a read); `data` is the buffer's
    /// address. Not published. Returns the status byte's address.
    fn read_at(&mut self, head: u16, data: u64) -> u64 {
        let hdr = 0x9000 + 32 * u64::from(head);
        let status = hdr + 16;
        let table = 0x40000 + 0x100 * u64::from(head);
        let mut h = [0u8; 16];
        h[8..16].copy_from_slice(&(u64::from(head) * 8).to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).expect("header");
        self.mem.write_slice(&[0xff], GuestAddress(status)).expect("status");
        self.indirect(head, table, &[(hdr, 16, 1, 1), (data, 4096, 1 | 2, 2), (status, 1, 2, 0)]);
        status
    }

    /// Writes `descs` (address, length, flags, next) as an indirect table at `table` and
    /// makes ring descriptor `head` name it.
    fn indirect(&self, head: u16, table: u64, descs: &[(u64, u32, u16, u16)]) {
        let b: Vec<u8> = descs.iter().flat_map(|&(addr, len, flags, next)| descriptor(addr, len, flags, next)).collect();
        self.mem.write_slice(&b, GuestAddress(table)).expect("indirect table");
        self.desc(head, table, b.len() as u32, 4, 0);
    }

    /// Builds a FLUSH as chain `head` (an indirect table: header, status byte). Not
    /// published. Returns the status byte's address.
    fn flush_at(&mut self, head: u16) -> u64 {
        let hdr = 0x9000 + 32 * u64::from(head);
        let status = hdr + 16;
        let table = 0x40000 + 0x100 * u64::from(head);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&4u32.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).expect("header");
        self.mem.write_slice(&[0xff], GuestAddress(status)).expect("status");
        self.indirect(head, table, &[(hdr, 16, 1, 1), (status, 1, 2, 0)]);
        status
    }

    /// Syncs pushed and not answered.
    fn syncs(&self) -> usize {
        lock(&self.fake).ops.iter().filter(|(_, op)| matches!(op, HostOp::Fdatasync { .. })).count()
    }

    /// Publishes chain `head` (without kicking).
    fn publish(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail % 16);
        self.mem.write_slice(&head.to_le_bytes(), GuestAddress(slot)).expect("avail ring");
        self.avail = self.avail.wrapping_add(1);
        self.mem.write_slice(&self.avail.to_le_bytes(), GuestAddress(AVAIL + 2)).expect("avail idx");
    }

    /// The ring's next available index (what the worker has taken).
    fn next_avail(&self) -> u16 {
        self.vring.lock().get_queue().next_avail()
    }

    fn broken(&self) -> bool {
        self.vring.lock().is_broken()
    }

    fn kick(&mut self) {
        self.w.on_kick(&self.ctx, &self.vring).expect("kick");
    }

    /// Answers the oldest `n` ops with `result(op)`, then lets the worker reap and pop.
    fn answer(&mut self, n: usize, result: impl Fn(&HostOp) -> i32) {
        {
            let mut s = lock(&self.fake);
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
        lock(&self.fake).ops.len()
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
    let rest = lock(&r.fake).ops.front().map(|(_, op)| (op_len(op), *op));
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
    let w = std::mem::replace(&mut r.w, Worker::with_engine(1, Box::new(Fake { state: Arc::default() }), 1, None));
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

#[test]
fn a_spent_budget_leaves_chains_in_the_ring_until_a_completion_returns_a_unit() {
    let mut r = Rig::new("budget", 64);
    // A lawful driver (6 outstanding on a 16-entry ring) against a budget lowered to 4.
    r.w.budget.set_cap(4);
    let statuses: Vec<u64> = (0..6).map(|h| r.read_at(h, 0x20000 + 4096 * u64::from(h))).collect();
    (0..6).for_each(|h| r.publish(h));
    r.kick();
    assert_eq!((r.pushed(), r.next_avail(), r.w.budget.held()), (4, 4, 4), "popping stops at the budget; the rest stay in the ring");
    assert_eq!(r.w.in_hand.get(), 4);
    assert!(!r.broken(), "a spent budget is back-pressure, not misbehaviour");
    r.kick();
    assert_eq!(r.next_avail(), 4, "a kick pops nothing while the budget is spent");
    r.answer(1, op_len);
    assert_eq!((r.used(), r.next_avail(), r.pushed()), (1, 5, 4), "a completion returns a unit: one more chain popped");
    while r.used() < 6 {
        r.answer(1, op_len);
    }
    assert_eq!((r.w.budget.held(), r.w.in_hand.get()), (0, 0));
    assert!(statuses.iter().all(|&s| r.byte(s) == 0));
}

#[test]
fn a_head_in_hand_published_again_breaks_the_ring_until_it_is_reset() {
    let mut r = Rig::new("same-head", 64);
    let first = r.read_at(0, 0x20000);
    r.publish(0);
    r.kick();
    assert_eq!(r.pushed(), 1);
    // The same head again while its read is at the storage, then a lawful one.
    r.publish(0);
    let second = r.read_at(1, 0x21000);
    r.publish(1);
    r.kick();
    assert!(r.broken(), "a head in hand published again must break the ring");
    assert_eq!((r.pushed(), r.next_avail(), r.w.budget.held(), r.w.budget.breaks()), (1, 1, 1, 1), "nothing more is taken; the repeat stays in the ring");
    // What was in hand still completes; the broken ring takes nothing more.
    r.answer(1, op_len);
    assert_eq!((r.used(), r.byte(first), r.pushed(), r.next_avail()), (1, 0, 0, 1));
    assert!(r.broken());
    // The frontend stops and restarts the ring (the driver's reset): it serves again, from
    // where it stopped taking (head 0 is no longer in hand).
    r.vring.set_queue_ready(false);
    r.vring.set_queue_ready(true);
    r.kick();
    assert!(!r.broken());
    assert_eq!((r.pushed(), r.next_avail()), (2, 3));
    r.answer(2, op_len);
    assert_eq!((r.used(), r.byte(second), r.w.budget.held()), (3, 0, 0));
}

#[test]
fn more_heads_outstanding_than_the_ring_has_break_it() {
    let mut r = Rig::new("overrun", 64);
    for h in 0..16 {
        r.read_at(h, 0x20000 + 4096 * u64::from(h));
    }
    // 17 published, none returned, on a 16-entry ring.
    (0..16).for_each(|h| r.publish(h));
    r.publish(0);
    r.kick();
    assert!(r.broken());
    assert_eq!((r.pushed(), r.next_avail(), r.w.budget.held()), (0, 0, 0), "nothing is taken from an overrun ring");
    // Kicks of a broken ring take nothing (and log at most once per interval).
    for _ in 0..100 {
        r.kick();
    }
    assert_eq!((r.pushed(), r.next_avail()), (0, 0));
}

#[test]
fn a_parked_request_returns_its_unit_when_it_completes() {
    let mut r = Rig::new("parked-budget", 64);
    r.ctx.park.set_policy(Arc::new(AlwaysPark));
    r.w.budget.set_cap(1);
    let a = r.read_at(0, 0x20000);
    r.publish(0);
    r.kick();
    r.answer(1, |_| -libc::EIO);
    assert_eq!((r.w.parked(), r.w.budget.held()), (1, 1), "a parked request holds its unit");
    let b = r.read_at(1, 0x21000);
    r.publish(1);
    r.kick();
    assert_eq!((r.pushed(), r.next_avail()), (0, 1), "no pop while the parked request holds the budget");
    // Resumed, the parked read succeeds: its unit returns and the waiting chain is popped.
    r.w.on_resume(&r.ctx).expect("resume");
    assert_eq!(r.pushed(), 1);
    r.answer(1, op_len);
    assert_eq!((r.used(), r.byte(a), r.next_avail(), r.pushed()), (1, 0, 2, 1));
    r.answer(1, op_len);
    assert_eq!((r.used(), r.byte(b), r.w.budget.held()), (2, 0, 0));
}

#[test]
fn resubmissions_after_a_restart_count_against_the_budget() {
    use crate::inflight::{InflightInfo, InflightRegion};
    let mut r = Rig::new("resubmit-budget", 64);
    // The previous daemon took three reads (heads 0, 1, 2) and completed none.
    let statuses: Vec<u64> = (0..3).map(|h| r.read_at(h, 0x20000 + 4096 * u64::from(h))).collect();
    (0..3).for_each(|h| r.publish(h));
    let info = InflightInfo { mmap_size: 0, mmap_offset: 0, num_queues: 1, queue_size: 16 };
    let region = InflightRegion::create(info, 1).expect("inflight region");
    let mut old = region.queue(0).expect("queue 0");
    assert!(old.recover(16, 0, 0).is_ok());
    (0..3).for_each(|h| old.mark(h));
    let rec = r.vring.start_tracking(region.queue(0).expect("queue 0")).expect("recovery");
    assert_eq!(rec.resubmit, vec![0, 1, 2]);
    // The new daemon's budget is lowered to 2: the third resubmission waits for a unit.
    r.w.budget.set_cap(2);
    r.kick();
    assert_eq!((r.pushed(), r.w.budget.held(), r.vring.lock().peek_resubmit()), (2, 2, Some(2)));
    r.answer(1, op_len);
    assert_eq!((r.used(), r.pushed(), r.w.budget.held()), (1, 2, 2), "a completion let the third resubmission in");
    // A resubmitted head in hand, published again, breaks the ring like any head in hand.
    r.w.budget.set_cap(16);
    r.publish(1);
    r.kick();
    assert!(r.broken(), "head 1, resubmitted and in hand, was published again");
    r.answer(2, op_len);
    assert_eq!((r.used(), r.w.budget.held(), r.w.in_hand.get()), (3, 0, 0));
    assert!(statuses.iter().all(|&s| r.byte(s) == 0));
}

#[test]
fn a_head_past_the_ring_breaks_it_and_stays_in_the_ring() {
    let mut r = Rig::new("head-past-ring", 64);
    let status = r.read_at(0, 0x20000);
    r.publish(0);
    r.publish(200);
    r.kick();
    // The valid chain before it is served; the one past the ring is neither taken nor
    // answered (no used entry can name head 200), and nothing more is popped.
    r.answer(1, op_len);
    assert_eq!((r.used(), r.byte(status), r.next_avail()), (1, 0, 1));
    assert!(r.broken(), "head 200 on a ring of 16 was accepted");
    assert_eq!((r.w.budget.held(), r.w.in_hand.get()), (0, 0));
}

#[test]
fn a_resubmission_is_built_even_where_guest_memory_reaches_high() {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};
    let r = Rig::new("resubmit-high", 64);
    r.desc(5, 0x8000, 16, 0, 0);
    // The frontend may place a region anywhere, also where an earlier version put the private
    // avail page of a resubmission (1 << 62): the chain is still built, above every region.
    let high = GuestRegionMmap::<crate::guest_write::LogBitmap>::from_range(GuestAddress(1 << 62), 4096, None).expect("high region");
    let mem = Arc::new(r.mem.insert_region(Arc::new(high)).expect("insert"));
    let state = r.vring.lock();
    let (chain, aug) = super::pop::chain_at(state.get_queue(), &mem, 5).expect("a chain for head 5");
    assert_eq!(chain.head_index(), 5);
    assert_eq!(aug.num_regions(), 3);
    assert!(aug.iter().any(|g| g.start_addr().0 > 1 << 62));
}

#[test]
fn a_fenced_request_ends_silently_and_holds_the_queue_until_it_has() {
    let mut r = Rig::new("fenced", 64);
    let stale = r.read_at(0, 0x20000);
    r.publish(0);
    r.kick();
    assert_eq!(r.pushed(), 1);
    // The stop gave up on it (the ring may be reconfigured now).
    assert!(r.w.in_hand.fence());
    let newer = r.read_at(3, 0x22000);
    r.publish(3);
    r.kick();
    assert_eq!((r.pushed(), r.next_avail()), (1, 1), "a chain was taken while a fenced request is at the storage");
    // Its host IO ends: no status byte, no used element; the queue serves again.
    r.answer(1, op_len);
    assert_eq!((r.used(), r.byte(stale)), (0, 0xff), "a fenced request reached guest memory");
    assert!(!r.w.in_hand.is_stale());
    assert_eq!(r.pushed(), 1, "the waiting chain was taken once the fenced request had ended");
    r.answer(1, op_len);
    assert_eq!((r.used(), r.byte(newer)), (1, 0));
}

/// Gives `log` a fresh, clean 32-byte bitmap (the rig's 1 MiB of guest memory).
fn fresh_log(log: &crate::guest_write::DirtyLog) {
    // SAFETY: a NUL-terminated name; the new fd is owned by the File below.
    let fd = unsafe { libc::memfd_create(c"thinblk-test-log".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: we own the new fd.
    let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(4096).expect("size the log");
    log.set_base(crate::protocol::message::LogBase { size: 32, offset: 0 }, f).expect("map the log");
}

#[test]
fn every_guest_memory_write_marks_exactly_its_pages() {
    use crate::guest_write::{DirtyLog, LOG_PAGE};
    let log = DirtyLog::new();
    let marked = |log: &DirtyLog| -> Vec<u64> { (0..256u64).filter(|p| log.is_marked(p * LOG_PAGE)).collect() };
    let mut r = Rig::logged("dirty-log", &log);
    let used_page = USED / LOG_PAGE;
    // (what the guest asks, where the status byte and data lie, the pages it must dirty)
    // 1. a read the kernel fills through raw pointers (io_uring): its buffer, the status
    //    byte's page (0x8000) and the used ring's.
    // 2. a read into an unaligned buffer, staged through a bounce chunk and copied in: the
    //    two pages the buffer straddles.
    // 3. GET_ID: the 20 bytes of serial.
    // 4. a write: the guest's buffer is only read; the status byte and the used ring only.
    let cases: [(u32, u64, u32, bool, Vec<u64>); 4] = [
        (0, 0x20000, 4096, true, vec![used_page, 8, 0x20]),
        (0, 0x30800, 4096, true, vec![used_page, 8, 0x30, 0x31]),
        (8, 0x40ff0, 20, true, vec![used_page, 8, 0x40, 0x41]),
        (1, 0x50000, 4096, false, vec![used_page, 8]),
    ];
    for (n, (rtype, data, len, to_guest, want)) in cases.into_iter().enumerate() {
        let status = r.request(n as u16, rtype, data, len, to_guest);
        // Set-up writes are the test's own: the log starts clean for each request.
        fresh_log(&log);
        log.set_enabled(true);
        r.kick();
        while r.pushed() > 0 {
            r.answer(1, op_len);
        }
        log.set_enabled(false);
        assert_eq!(r.used(), n as u16 + 1, "request {n} completed");
        assert_eq!(r.byte(status), 0, "request {n} succeeded");
        assert_eq!(marked(&log), want, "request {n} (type {rtype}) marked exactly its pages");
    }
    // With logging off nothing is marked.
    fresh_log(&log);
    r.request(4, 0, 0x60000, 4096, true);
    r.kick();
    while r.pushed() > 0 {
        r.answer(1, op_len);
    }
    assert_eq!(r.used(), 5);
    assert!(marked(&log).is_empty());
}

#[test]
fn a_large_batch_is_submitted_on_the_way_and_a_submitted_flush_is_not_joined() {
    // Two FLUSHes side by side in one batch share one sync.
    let mut r = Rig::new("join", 64);
    for head in 0..2 {
        r.flush_at(head);
        r.publish(head);
    }
    r.kick();
    assert_eq!(r.syncs(), 1, "the second FLUSH joins the first");
    assert_eq!(lock(&r.fake).submits, vec![1], "a small batch is submitted once, at the end of the pass");
    while r.used() < 2 {
        r.answer(1, |_| 0);
    }

    // A FLUSH, SUBMIT_EVERY reads, a FLUSH: the batch goes to the kernel after SUBMIT_EVERY
    // chains, the first FLUSH's sync with it, and the second FLUSH syncs on its own (a write
    // another queue completes after the first sync started must be covered).
    let mut r = Rig::new("split", 64);
    let last = SUBMIT_EVERY as u16 + 1;
    r.flush_at(0);
    r.publish(0);
    for head in 1..last {
        r.read_at(head, 0x20000 + 4096 * u64::from(head));
        r.publish(head);
    }
    r.flush_at(last);
    r.publish(last);
    r.kick();
    // (This engine is not waited on: the pass ends with a submission of its own.)
    assert_eq!(lock(&r.fake).submits, vec![SUBMIT_EVERY, SUBMIT_EVERY + 2], "the first SUBMIT_EVERY chains' ops went to the kernel during the batch");
    assert_eq!(r.syncs(), 2, "a FLUSH whose sync was submitted is not joined");
    while r.used() < last + 1 {
        r.answer(1, op_len);
    }
    assert_eq!(r.pushed(), 0);
}

#[test]
fn in_polling_mode_kicks_stay_off_during_a_pass_and_are_asked_for_before_a_sleep() {
    let mut r = Rig::new("pollkick", 64);
    r.ctx.event_idx.store(true, Ordering::SeqCst);
    r.vring.lock().get_queue_mut().set_event_idx(true);
    r.w.set_polling(true);
    // EVENT_IDX: the driver kicks when the avail index passes the avail event (after the
    // used ring's 16 entries).
    let avail_event = |r: &Rig| {
        let mut b = [0u8; 2];
        r.mem.read_slice(&mut b, GuestAddress(USED + 4 + 8 * 16)).expect("avail event");
        u16::from_le_bytes(b)
    };
    r.read(0, 0x20000);
    r.kick();
    assert_eq!(r.pushed(), 1);
    assert_eq!(avail_event(&r), 0, "a polling pass does not ask for kicks");
    // Nothing new: kicks are asked for again (the thread may sleep).
    assert!(!r.w.before_sleep(&r.ctx));
    assert_eq!(avail_event(&r), 1, "kicks asked for from the next chain on before the thread sleeps");
    // A chain published meanwhile keeps the thread awake instead.
    r.read(1, 0x21000);
    assert!(r.w.before_sleep(&r.ctx), "a chain arrived: no sleep");
    r.kick();
    assert_eq!(r.pushed(), 2);
    // Polling mode off: each pass asks for kicks itself.
    r.w.set_polling(false);
    r.read(2, 0x22000);
    r.kick();
    assert_eq!(avail_event(&r), 3);
    while r.used() < 3 {
        r.answer(1, op_len);
    }
}

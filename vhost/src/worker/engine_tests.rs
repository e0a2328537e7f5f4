//! In-process tests of the worker over a fake engine: the test decides when and how every
//! host op completes. Compiled only with `#[cfg(test)]` (declared so in `mod.rs`).

use super::*;
use crate::image::{Disk, RawImage};
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
        let image: Arc<dyn Disk> = Arc::new(RawImage::open(&path, false, false).expect("raw image"));
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

//! One virtqueue's state as the frontend configured it: the split ring, its kick, call and
//! error eventfds, and whether it is enabled.
//!
//! The kick and call eventfds are shared with the frontend, and so is their open file
//! description: the O_NONBLOCK we set when we accept them ([`accept_eventfd`]) is a flag the
//! frontend can clear again with `fcntl`. So nothing here relies on it, and no lock is held
//! while the kernel touches either descriptor:
//!
//! - the call eventfd is never written by us. It is the completion eventfd of a one-slot
//!   io_uring of our own ([`CallNotifier`]); a notification is a NOP submitted to that ring,
//!   and the kernel signals the eventfd from the completion with `eventfd_signal`, which adds
//!   to the counter under its spinlock and never waits, whatever the file's flags and counter
//!   (a full counter stays full: the frontend is "notified" already).
//! - the kick eventfd is read with `preadv2(RWF_NOWAIT)` ([`read_nowait`]): a per-call
//!   non-blocking read, whatever the file's flags; an empty counter (a spurious wake-up, or a
//!   frontend that drained it first) is EAGAIN.
//!
//! Proof: `tests/hostile.rs` `a_call_eventfd_made_blocking_and_full_never_wedges_the_daemon`
//! and `a_kick_eventfd_made_blocking_never_wedges_the_daemon`; the unit tests below
//! (`a_blocking_full_call_eventfd_is_signalled_without_waiting`,
//! `a_blocking_empty_kick_is_read_without_waiting`).
//!
//! Only eventfds are accepted for kick, call and err.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use io_uring::{opcode, register::Restriction, IoUring};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace};

use std::collections::VecDeque;

use crate::context::AtomicMem;
use crate::inflight::{InflightQueue, Recovery};

/// The mutable state of one ring.
pub struct VringState {
    queue: Queue,
    /// Shared so a reader can hold it without the lock (see [`Vring::read_kick`]).
    kick: Option<Arc<File>>,
    /// Shared so a notification is sent without the lock (see [`Vring::signal_used_queue`]).
    call: Option<Arc<CallNotifier>>,
    err: Option<File>,
    enabled: bool,
    mem: AtomicMem,
    /// Inflight tracking for this ring (INFLIGHT_SHMFD negotiated and a region set).
    tracking: Option<InflightQueue>,
    /// Heads a recovered region still had in flight: served, oldest first, before any new
    /// chain is popped.
    resubmit: VecDeque<u16>,
    /// The driver broke the ring's rules (worker/budget.rs): nothing more is popped until
    /// the frontend stops the ring.
    broken: bool,
}

impl VringState {
    /// The queue.
    pub fn get_queue(&self) -> &Queue {
        &self.queue
    }

    /// The queue, mutably.
    pub fn get_queue_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }

    /// Enabled by the frontend (SET_VRING_ENABLE, or by negotiation without protocol features).
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The guest memory the ring lives in.
    pub fn memory(&self) -> vm_memory::GuestMemoryLoadGuard<crate::context::Mem> {
        self.mem.memory()
    }

    /// The kick eventfd, if set.
    pub fn kick(&self) -> Option<&File> {
        self.kick.as_deref()
    }

    /// Puts a completed chain on the used ring (and, with inflight tracking, records the
    /// publication around it so a crash in between is recoverable), under the lock the
    /// caller holds.
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), VringError> {
        let mem = self.mem.memory();
        if let Some(i) = self.tracking.as_mut() {
            i.pre_put(head);
        }
        self.queue.add_used(&*mem, head, len)?;
        let used = self.queue.next_used();
        if let Some(i) = self.tracking.as_mut() {
            i.post_put(head, used);
        }
        Ok(())
    }

    /// Records that `head` was taken from the ring (inflight tracking, if any).
    pub fn mark_taken(&mut self, head: u16) {
        if let Some(i) = self.tracking.as_mut() {
            i.mark(head);
        }
    }

    /// The next head a recovered region asks to resubmit (left listed).
    pub fn peek_resubmit(&self) -> Option<u16> {
        self.resubmit.front().copied()
    }

    /// Takes the next head a recovered region asks to resubmit off the list.
    pub fn next_resubmit(&mut self) -> Option<u16> {
        self.resubmit.pop_front()
    }

    /// Whether the driver broke the ring's rules since the ring last started.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Marks the ring broken (nothing more is popped until the frontend stops it) and
    /// signals the frontend's error eventfd, if it set one (never blocks).
    pub fn mark_broken(&mut self) {
        self.broken = true;
        if let Some(err) = self.err.as_ref() {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live local buffer to an eventfd we own (made
            // non-blocking when it was accepted: a full counter already means "signalled").
            unsafe { libc::write(err.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        }
    }
}

/// A shared handle on one ring's state.
#[derive(Clone)]
pub struct Vring {
    state: Arc<Mutex<VringState>>,
}

/// Errors of ring operations the worker reports.
pub type VringError = virtio_queue::Error;

impl Vring {
    /// A ring of at most `max_size` entries over `mem`.
    pub fn new(mem: AtomicMem, max_size: u16) -> Result<Vring, VringError> {
        Ok(Vring {
            state: Arc::new(Mutex::new(VringState {
                queue: Queue::new(max_size)?,
                kick: None,
                call: None,
                err: None,
                enabled: false,
                mem,
                tracking: None,
                resubmit: VecDeque::new(),
                broken: false,
            })),
        })
    }

    /// Locks the state (a poisoned lock is taken over: the state stays consistent per call).
    pub fn lock(&self) -> MutexGuard<'_, VringState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts a completed chain on the used ring (and, with inflight tracking, records the
    /// publication around it so a crash in between is recoverable).
    pub fn add_used(&self, head: u16, len: u32) -> Result<(), VringError> {
        self.lock().add_used(head, len)
    }

    /// Attaches inflight tracking and applies its recovery: the ring's next available index
    /// and the heads to resubmit. Call when the ring starts (its addresses and size set).
    pub fn start_tracking(&self, mut q: InflightQueue) -> Result<Recovery, crate::error::ProtocolError> {
        let mut s = self.lock();
        let mem = s.mem.memory();
        let used = s.queue.used_idx(&*mem, std::sync::atomic::Ordering::Acquire).map(|w| w.0).unwrap_or(0);
        let avail = s.queue.avail_idx(&*mem, std::sync::atomic::Ordering::Acquire).map(|w| w.0).unwrap_or(0);
        let size = s.queue.size();
        let rec = q.recover(size, used, avail)?;
        if !rec.fresh {
            s.queue.set_next_avail(rec.next_avail);
        }
        // A fresh region knows nothing of this ring: where to start is SET_VRING_BASE's
        // (a migrated or restarted ring may have chains behind its base that are done).
        // tests/hostile.rs case "a fresh inflight region keeps the ring's base".
        s.queue.set_next_used(used);
        s.resubmit = rec.resubmit.iter().copied().collect();
        s.tracking = Some(q);
        Ok(rec)
    }

    /// Notifies the frontend. Never blocks, whatever the frontend did to its call eventfd
    /// (see [`CallNotifier`]); the ring lock is not held while the kernel signals it.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        let call = self.lock().call.clone();
        match call {
            Some(c) => c.notify(),
            None => Ok(()),
        }
    }

    /// Asks the driver for kicks again; true if chains arrived meanwhile. A stopped ring is
    /// left alone: after GET_VRING_BASE nothing is written into it (a migration's source has
    /// answered, and the destination owns the guest's memory).
    pub fn enable_notification(&self) -> Result<bool, VringError> {
        let mut s = self.lock();
        if !s.queue.ready() {
            return Ok(false);
        }
        let mem = s.mem.memory();
        s.queue.enable_notification(&*mem)
    }

    /// Asks the driver not to kick (a stopped ring is left alone, as above).
    pub fn disable_notification(&self) -> Result<(), VringError> {
        let mut s = self.lock();
        if !s.queue.ready() {
            return Ok(());
        }
        let mem = s.mem.memory();
        s.queue.disable_notification(&*mem)
    }

    /// Whether the driver wants to be notified of the latest used entries.
    pub fn needs_notification(&self) -> Result<bool, VringError> {
        let mut s = self.lock();
        let mem = s.mem.memory();
        s.queue.needs_notification(&*mem)
    }

    /// Sets the ring size (the caller checked it: a power of two within the maximum).
    pub fn set_queue_size(&self, size: u16) {
        self.lock().queue.set_size(size);
    }

    /// Sets the ring addresses (guest physical).
    pub fn set_queue_info(&self, desc: u64, avail: u64, used: u64) -> Result<(), VringError> {
        let mut s = self.lock();
        s.queue.try_set_desc_table_address(GuestAddress(desc))?;
        s.queue.try_set_avail_ring_address(GuestAddress(avail))?;
        s.queue.try_set_used_ring_address(GuestAddress(used))
    }

    /// Marks the ring ready (started) or not. A ring stopped by the frontend is no longer
    /// broken: the driver starts it afresh.
    pub fn set_queue_ready(&self, ready: bool) {
        let mut s = self.lock();
        s.queue.set_ready(ready);
        if !ready {
            s.broken = false;
        }
    }

    /// Enables or disables the ring.
    pub fn set_enabled(&self, enabled: bool) {
        self.lock().enabled = enabled;
    }

    /// Sets the kick eventfd.
    pub fn set_kick(&self, f: Option<File>) {
        self.lock().kick = f.map(Arc::new);
    }

    /// Sets the call eventfd (an accepted eventfd), attaching it to a notifier ring of its
    /// own first; on failure the previous one stays.
    pub fn set_call(&self, f: Option<File>) -> io::Result<()> {
        let notifier = f.map(CallNotifier::new).transpose()?.map(Arc::new);
        self.lock().call = notifier;
        Ok(())
    }

    /// Sets the error eventfd.
    pub fn set_err(&self, f: Option<File>) {
        self.lock().err = f;
    }

    /// Drains the kick eventfd without waiting and without the ring lock held (a frontend
    /// may have made it blocking and emptied it: see [`read_nowait`]); true if the ring is
    /// enabled. An empty counter is not an error: the caller looks at the ring anyway.
    pub fn read_kick(&self) -> bool {
        let (kick, enabled) = {
            let s = self.lock();
            (s.kick.clone(), s.enabled)
        };
        if let Some(k) = kick {
            if let Err(e) = read_nowait(&k) {
                tracing::debug!(error = %e, "reading the kick eventfd failed");
            }
        }
        enabled
    }
}

/// Slots of a notifier ring: one NOP at a time is all it ever holds.
const NOTIFIER_ENTRIES: u32 = 1;

/// A call eventfd that is never written by us: it is the registered completion eventfd of a
/// one-slot io_uring that may execute only NOPs and accepts no further registration. A
/// notification submits a NOP; its completion makes the kernel signal the eventfd with
/// `eventfd_signal` (as KVM's irqfds and vhost-net are signalled), which never waits: the
/// counter is raised under a spinlock (and stays at its maximum if the frontend filled it).
/// A plain `write` would wait on a full counter as soon as the frontend clears O_NONBLOCK on
/// the description it shares with us, and `pwritev2(RWF_NOWAIT)` is refused on eventfds
/// (no `write_iter`): docs/decisions.md.
pub struct CallNotifier {
    /// Taken only for a NOP's push, submission and reaping: none of them waits (the
    /// submission asks for no completion), so the lock is never held across anything the
    /// frontend can stall.
    ring: Mutex<IoUring>,
    /// The frontend's eventfd (the ring holds its own reference to the eventfd as well).
    _call: File,
}

impl CallNotifier {
    /// Attaches `call` to a new notifier ring.
    pub fn new(call: File) -> io::Result<CallNotifier> {
        let ring = IoUring::builder().setup_r_disabled().build(NOTIFIER_ENTRIES)?;
        let submitter = ring.submitter();
        // Registered before the restrictions, which then forbid every register call.
        submitter.register_eventfd(call.as_raw_fd())?;
        let mut only_nop = [Restriction::sqe_op(opcode::Nop::CODE)];
        submitter.register_restrictions(&mut only_nop)?;
        submitter.register_enable_rings()?;
        Ok(CallNotifier { ring: Mutex::new(ring), _call: call })
    }

    /// Signals the eventfd once. Never blocks: the NOP completes inline in the submission,
    /// which waits for nothing.
    pub fn notify(&self) -> io::Result<()> {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let nop = opcode::Nop::new().build();
        // SAFETY: a NOP carries no pointer for the kernel to follow.
        if unsafe { ring.submission().push(&nop) }.is_err() {
            // An earlier submission failed (EINTR, EAGAIN) and left its NOP queued: send it.
            ring.submit()?;
            // SAFETY: as above.
            unsafe { ring.submission().push(&nop) }
                .map_err(|_| io::Error::new(io::ErrorKind::WouldBlock, "notifier submission queue full"))?;
        }
        ring.submit()?;
        let mut failed = None;
        for cqe in ring.completion() {
            if cqe.result() < 0 {
                failed = Some(io::Error::from_raw_os_error(-cqe.result()));
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

/// Reads an eventfd's counter without ever waiting: `preadv2` with `RWF_NOWAIT` is
/// non-blocking for this one call whatever the description's O_NONBLOCK (Linux ≥ 5.12 for
/// eventfds). `Ok(None)`: the counter was zero. On older kernels (`EOPNOTSUPP`) it reads
/// only if `poll` says the counter is non-zero: a frontend that cleared O_NONBLOCK and
/// drains the counter between those two calls could still make that read wait there, until
/// its next kick (docs/security.md). (No `fcntl` here: queue threads may not call it.)
pub fn read_nowait(f: &File) -> io::Result<Option<u64>> {
    let mut buf = [0u8; 8];
    let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: one iovec over a live local buffer of 8 bytes; offset -1 is the file position
    // (eventfds have none); the fd is open for the duration of the call.
    let r = unsafe { libc::preadv2(f.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
    if r == 8 {
        return Ok(Some(u64::from_ne_bytes(buf)));
    }
    if r >= 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("eventfd read of {r} bytes")));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) => Ok(None),
        Some(libc::EOPNOTSUPP) => {
            let mut p = libc::pollfd { fd: f.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one pollfd in a live local; timeout 0 (never waits).
            if unsafe { libc::poll(&mut p, 1, 0) } != 1 || p.revents & libc::POLLIN == 0 {
                return Ok(None);
            }
            // SAFETY: reads at most 8 bytes into a live local buffer from an open fd.
            let r = unsafe { libc::read(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            Ok((r == 8).then(|| u64::from_ne_bytes(buf)))
        }
        _ => Err(e),
    }
}

fn set_nonblocking(f: &File) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we own.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Accepts `f` as a ring eventfd: it must be an eventfd. It is also made non-blocking, as a
/// courtesy and for the fallback of [`read_nowait`] on old kernels only: the frontend shares
/// the flag and may clear it, so no path depends on it (see the module documentation).
///
/// Without `/proc` (a sandbox may have none): an eventfd is an anonymous inode that takes an
/// 8-byte write of 0 (which changes nothing and never waits). The other anonymous inodes a
/// process usually has (signalfd, timerfd, epoll, io_uring, inotify, userfaultfd) refuse such
/// a write, and pipes and sockets, which would take it, are not anonymous inodes. A few device
/// descriptors (vfio, IIO buffers) would pass: the frontend owns those, and we only ever read
/// and signal what it gave us, so it gains nothing by it.
pub fn accept_eventfd(f: &File) -> io::Result<()> {
    const ANON_INODE_FS_MAGIC: i64 = 0x0904_1934;
    let not = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("not an eventfd: {what}"));
    // SAFETY: statfs is plain data, filled by fstatfs on success.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `fs` is a valid out-pointer; the fd is open.
    if unsafe { libc::fstatfs(f.as_raw_fd(), &mut fs) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if fs.f_type as i64 != ANON_INODE_FS_MAGIC {
        return Err(not(&format!("file system {:#x}", fs.f_type)));
    }
    let zero = 0u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live local buffer; an eventfd adds 0 (never waits: the
    // counter cannot overflow by 0), other anonymous inodes refuse.
    if unsafe { libc::write(f.as_raw_fd(), zero.as_ptr().cast(), zero.len()) } != 8 {
        return Err(not(&format!("an anonymous inode refusing an eventfd write ({})", io::Error::last_os_error())));
    }
    set_nonblocking(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn eventfd(initial: u32) -> File {
        // SAFETY: creates a new fd, owned by the returned File.
        let fd = unsafe { libc::eventfd(initial, libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd was just created.
        unsafe { File::from_raw_fd(fd) }
    }

    #[test]
    fn only_eventfds_are_accepted() {
        assert!(accept_eventfd(&eventfd(0)).is_ok());
        assert!(accept_eventfd(&File::open("/dev/null").expect("null")).is_err());
        let mut fds = [0; 2];
        // SAFETY: fds is a valid out-array of two ints.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both fds were just created.
        let (r, w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        assert!(accept_eventfd(&w).is_err());
        drop(r);
        // Other anonymous inodes.
        // SAFETY: each call creates a new fd, owned by the File.
        let others = unsafe {
            let mut mask: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut mask);
            [
                libc::signalfd(-1, &mask, libc::SFD_CLOEXEC),
                libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC),
                libc::epoll_create1(libc::EPOLL_CLOEXEC),
                libc::inotify_init1(libc::IN_CLOEXEC),
            ]
        };
        for fd in others {
            assert!(fd >= 0);
            // SAFETY: fd was just created.
            let f = unsafe { File::from_raw_fd(fd) };
            assert!(accept_eventfd(&f).is_err(), "fd {fd} taken for an eventfd");
        }
        // An eventfd keeps its counter.
        let e = eventfd(3);
        assert!(accept_eventfd(&e).is_ok());
        assert_eq!(counter(&e), Some(3));
    }

    /// Runs `f` on a thread and gives its result if it returns within `limit` (a thread
    /// that blocks is left behind; the test fails instead of hanging).
    fn within<T: Send + 'static>(limit: std::time::Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(limit).ok()
    }

    fn counter(f: &File) -> Option<u64> {
        read_nowait(f).expect("read the counter")
    }

    #[test]
    fn a_full_call_counter_does_not_block() {
        let call = eventfd(0);
        let full = (u64::MAX - 1).to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd.
        assert_eq!(unsafe { libc::write(call.as_raw_fd(), full.as_ptr().cast(), 8) }, 8);
        assert!(accept_eventfd(&call).is_ok());
        let v = Vring::new(AtomicMem::new(crate::context::Mem::new()), 16).expect("vring");
        v.set_call(Some(call)).expect("notifier");
        assert!(v.signal_used_queue().is_ok());
        assert!(v.signal_used_queue().is_ok());
    }

    #[test]
    fn a_notification_raises_the_call_counter_by_one() {
        let call = eventfd(0);
        let mine = call.try_clone().expect("dup");
        let n = CallNotifier::new(call).expect("notifier");
        n.notify().expect("notify");
        assert_eq!(counter(&mine), Some(1));
        for _ in 0..3 {
            n.notify().expect("notify");
        }
        assert_eq!(counter(&mine), Some(3));
        assert_eq!(counter(&mine), None);
    }

    /// The frontend's attack: the counter at its maximum (a write of 1 would wait) and
    /// O_NONBLOCK cleared on the description we share (our eventfd() here never had it).
    #[test]
    fn a_blocking_full_call_eventfd_is_signalled_without_waiting() {
        let call = eventfd(0);
        let full = (u64::MAX - 1).to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd.
        assert_eq!(unsafe { libc::write(call.as_raw_fd(), full.as_ptr().cast(), 8) }, 8);
        let mine = call.try_clone().expect("dup");
        let v = Vring::new(AtomicMem::new(crate::context::Mem::new()), 16).expect("vring");
        v.set_call(Some(call)).expect("notifier");
        let v2 = v.clone();
        let done = within(std::time::Duration::from_secs(5), move || {
            (0..100).all(|_| v2.signal_used_queue().is_ok())
        });
        assert_eq!(done, Some(true), "a notification waited on a full, blocking call eventfd");
        // The lock is free and the counter still reads (saturated, never wrapped to zero).
        assert!(v.lock().get_queue().size() > 0);
        assert!(counter(&mine).is_some_and(|c| c >= u64::MAX - 1));
    }

    #[test]
    fn a_blocking_empty_kick_is_read_without_waiting() {
        let kick = eventfd(0);
        let mine = kick.try_clone().expect("dup");
        let v = Vring::new(AtomicMem::new(crate::context::Mem::new()), 16).expect("vring");
        v.set_kick(Some(kick));
        v.set_enabled(true);
        let v2 = v.clone();
        assert_eq!(within(std::time::Duration::from_secs(5), move || v2.read_kick()), Some(true), "an empty, blocking kick eventfd was waited on");
        // A kick is still drained.
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd.
        assert_eq!(unsafe { libc::write(mine.as_raw_fd(), one.as_ptr().cast(), 8) }, 8);
        assert!(v.read_kick());
        assert_eq!(counter(&mine), None);
    }
}

//! One io_uring per queue worker, locked down like Firecracker's: only the image's
//! registered files, only the opcodes the data path needs.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use io_uring::{opcode, register::Restriction, squeue, types, IoUring};

pub use crate::engine::HostOp;
use crate::engine::Engine;

/// The opcodes a worker ring may execute (the poll is the queue thread's wait on its own
/// event set, see [`Engine::watch_events`]).
const ALLOWED_OPCODES: [u8; 5] =
    [opcode::Readv::CODE, opcode::Writev::CODE, opcode::Fsync::CODE, opcode::Fallocate::CODE, opcode::PollAdd::CODE];

/// User data of the event-set poll: the tag bit, and the watch's generation below it (a
/// poll armed for an earlier queue thread's event set is told apart and dropped).
const EVENTS_TAG: u64 = 1 << 63;

/// How long a file-table change waits for the queue thread's submission to end.
const BEHIND_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// `IORING_REGISTER_FILES_UPDATE`: the one register call allowed after the restrictions
/// (a chain that gains or drops a layer online changes a slot of the file table).
const REGISTER_FILES_UPDATE: u8 = 6;

/// A worker's io_uring, which also waits on its queue thread's event set.
///
/// Back-pressure instead of spinning: at most as many entries are handed to the kernel as
/// the completion queue holds, so completions never overflow; entries beyond that (or
/// beyond a full submission queue) wait in a backlog, moved to the kernel by
/// [`Ring::submit`] as completions are popped. The worker bounds the backlog by refusing
/// new requests while [`Ring::in_flight`] is at its cap.
pub struct Ring {
    ring: IoUring,
    backlog: std::collections::VecDeque<squeue::Entry>,
    /// Entries given to the submission queue and not yet popped as completions.
    in_kernel: usize,
    /// Completion queue size: the most entries the kernel may hold.
    cq_cap: usize,
    /// The registered file table, slot by slot (-1: empty); the last slot is the event
    /// set's (not part of the image's table).
    registered: Vec<RawFd>,
    /// The event set the queue thread waits on through this ring, if watched.
    events: Option<Events>,
    /// Threads between [`Engine::prepare_wait`] and the end of their [`Waiter::wait`].
    entering: Arc<AtomicUsize>,
    /// Entries ever put in the submission queue (wrapping).
    pushed: u32,
    /// `pushed` when the last wait was prepared: the entries up to there are the waiter's to
    /// submit (see [`Ring::behind_a_submission`]).
    waiter_upto: u32,
}

/// The queue thread's event set, polled by the ring (one entry, one-shot, re-armed by the
/// thread once it has looked at the set).
struct Events {
    /// Generation of this watch (user data of its poll).
    generation: u64,
    /// The poll is in the submission queue or at the kernel.
    armed: bool,
    /// The poll completed since the thread last asked.
    fired: bool,
}

impl Ring {
    /// Creates a ring of `entries` slots with `files` registered in a table of `slots` (at
    /// least `files.len()`; the rest empty, to be filled by [`Engine::set_files`]) and the
    /// opcode allow-list applied.
    pub fn new(entries: u32, files: &[RawFd], slots: usize) -> io::Result<Ring> {
        let (ring, setup) = build(entries)?;
        tracing::debug!(flags = setup, "worker io_uring set up");
        let submitter = ring.submitter();
        let mut registered = files.to_vec();
        // One more slot for the event set.
        registered.resize(slots.max(files.len()) + 1, -1);
        submitter.register_files(&registered)?;
        let mut restrictions: Vec<Restriction> =
            ALLOWED_OPCODES.iter().map(|&op| Restriction::sqe_op(op)).collect();
        restrictions.push(Restriction::sqe_flags_required(squeue::Flags::FIXED_FILE.bits()));
        restrictions.push(Restriction::register_op(REGISTER_FILES_UPDATE));
        submitter.register_restrictions(&mut restrictions)?;
        submitter.register_enable_rings()?;
        // One completion slot stays free for the event set's poll.
        let cq_cap = (ring.params().cq_entries() as usize).saturating_sub(1).max(1);
        Ok(Ring { ring, backlog: std::collections::VecDeque::new(), in_kernel: 0, cq_cap, registered, events: None, entering: Arc::new(AtomicUsize::new(0)), pushed: 0, waiter_upto: 0 })
    }

    /// Whether a submission now could queue behind another thread's: a waiter may be inside
    /// `io_uring_enter` while the kernel has not taken every queued entry (it publishes what
    /// it took when the whole submission ends, which a file written inline can stall). Then
    /// nothing is submitted from here: the kernel would hold us on its submission lock.
    /// Entries queued after the wait was prepared are not the waiter's: whoever queued them
    /// submits them.
    fn behind_a_submission(&mut self) -> bool {
        if self.entering.load(Ordering::SeqCst) == 0 {
            return false;
        }
        let queued = self.ring.submission().len() as u32;
        let taken = self.pushed.wrapping_sub(queued);
        // The kernel has not yet published that it took everything the waiter submits.
        (self.waiter_upto.wrapping_sub(taken) as i32) > 0
    }

    /// The event set's slot (the last of the table).
    fn events_slot(&self) -> usize {
        self.registered.len() - 1
    }

    /// Puts the event set's poll in the submission queue if it is watched and not armed.
    fn arm_events(&mut self) {
        let slot = self.events_slot() as u32;
        let Some(ev) = self.events.as_mut() else { return };
        if ev.armed {
            return;
        }
        let poll = opcode::PollAdd::new(types::Fixed(slot), libc::POLLIN as u32).build().user_data(EVENTS_TAG | ev.generation);
        // SAFETY: a poll references no memory of ours.
        if unsafe { self.ring.submission().push(&poll) }.is_ok() {
            // Not counted in `in_kernel` (host ops only): its completion slot is kept free
            // by `cq_cap`, its submission slot by `fill`.
            ev.armed = true;
            self.pushed = self.pushed.wrapping_add(1);
        }
    }


    /// Moves backlog entries into the submission queue while both it and the completion
    /// queue have room.
    ///
    /// One submission slot stays free for the event set's poll, which only the queue thread's
    /// [`Engine::prepare_wait`] arms: it never waits behind host IO (a stop must be seen while
    /// the storage does not answer), and it is submitted by the thread it wakes (io_uring
    /// runs a request's completion as task work of the thread that submitted it).
    fn fill(&mut self) {
        while self.in_kernel < self.cq_cap {
            let Some(entry) = self.backlog.front() else { return };
            let full = {
                let sq = self.ring.submission();
                sq.len() + 1 >= sq.capacity()
            };
            if full {
                return;
            }
            // SAFETY: the entry's pointers were guaranteed valid until completion by the
            // caller of `push`.
            if unsafe { self.ring.submission().push(entry) }.is_err() {
                return;
            }
            self.backlog.pop_front();
            self.in_kernel += 1;
            self.pushed = self.pushed.wrapping_add(1);
        }
    }
}

/// Builds a ring, disabled until its restrictions are in place, with the setup flags that
/// cut kernel overhead where the kernel has them, falling back flag by flag:
/// - `COOP_TASKRUN` + `TASKRUN_FLAG` (5.19): completions are run as task work when the worker
///   next enters the kernel, instead of interrupting it with an IPI; the flag in the shared
///   ring tells the worker to enter when such work waits.
/// - `SUBMIT_ALL` (5.18): a batch is not cut short by one failing entry.
///
/// Not used: `SINGLE_ISSUER` and `DEFER_TASKRUN`, which require every submission and register
/// call to come from one thread; file-table changes (chain jobs) and drains (disconnect,
/// shutdown) come from other threads under the worker's lock (docs/decisions.md).
fn build(entries: u32) -> io::Result<(IoUring, &'static str)> {
    if std::env::var_os("THINBLK_RING_PLAIN").is_none() {
        let r = IoUring::builder().setup_r_disabled().setup_coop_taskrun().setup_taskrun_flag().setup_submit_all().build(entries);
        match r {
            Ok(ring) => return Ok((ring, "coop_taskrun,taskrun_flag,submit_all")),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    Ok((IoUring::builder().setup_r_disabled().build(entries)?, "none"))
}

/// A wait on a ring outside the worker's lock (the queue thread's one blocking point), made
/// by [`Engine::prepare_wait`] under the lock. While it exists the ring counts a thread that
/// may be inside `io_uring_enter`: the kernel then holds the ring's submission lock for as
/// long as one submission takes (a file without real non-blocking IO, such as FUSE, is
/// written inline), and other threads of the worker must not submit behind it.
pub struct Waiter {
    fd: RawFd,
    to_submit: u32,
    entering: Arc<AtomicUsize>,
}

impl Waiter {
    /// Submits what is queued and returns once a completion is available (an operation's,
    /// or the event set's poll), or after `limit`; `block` false: does not wait (the polling
    /// mode saw something ready; pending completion work still runs). Interruptions, a
    /// timeout and a busy completion queue all return `Ok`: the caller looks and comes back.
    ///
    /// Other threads may reap from the same ring meanwhile under the worker's lock: the
    /// completion queue is only read there.
    pub fn wait(self, block: bool, limit: Option<std::time::Duration>) -> io::Result<()> {
        enter(self.fd, self.to_submit, block, limit)
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.entering.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `io_uring_enter` on `fd`: submits up to `to_submit` entries (the kernel caps it at what is
/// queued), then, if `block`, waits for one completion for at most `limit`.
fn enter(fd: RawFd, to_submit: u32, block: bool, limit: Option<std::time::Duration>) -> io::Result<()> {
    const GETEVENTS: libc::c_uint = 1;
    const EXT_ARG: libc::c_uint = 1 << 3;
    #[repr(C)]
    struct GetEventsArg {
        sigmask: u64,
        sigmask_sz: u32,
        min_wait_usec: u32,
        ts: u64,
    }
    let ts = limit.map(|l| libc::timespec { tv_sec: l.as_secs() as libc::time_t, tv_nsec: l.subsec_nanos() as libc::c_long });
    let arg = GetEventsArg { sigmask: 0, sigmask_sz: 0, min_wait_usec: 0, ts: ts.as_ref().map_or(0, |t| t as *const libc::timespec as u64) };
    let (flags, argp, argsz) = match ts {
        Some(_) => (GETEVENTS | EXT_ARG, &arg as *const GetEventsArg as *const libc::c_void, std::mem::size_of::<GetEventsArg>()),
        None => (GETEVENTS, std::ptr::null(), 0),
    };
    // SAFETY: `fd` is a live io_uring (the worker that owns it outlives the call); the
    // argument, if any, and the timespec it points to live on this stack for the call.
    let r = unsafe { libc::syscall(libc::SYS_io_uring_enter, fd, to_submit, libc::c_uint::from(block), flags, argp, argsz) };
    if r >= 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINTR | libc::ETIME | libc::EBUSY | libc::EAGAIN) => Ok(()),
        _ => Err(e),
    }
}

impl Engine for Ring {
    fn watch_events(&mut self, fd: RawFd) -> io::Result<()> {
        let slot = self.events_slot();
        if self.registered[slot] != fd {
            self.ring.submitter().register_files_update(slot as u32, &[fd])?;
            self.registered[slot] = fd;
        }
        // A poll still armed for an earlier set completes (or not) under its own generation
        // and is dropped when popped.
        let generation = self.events.as_ref().map_or(0, |e| (e.generation + 1) & !EVENTS_TAG);
        self.events = Some(Events { generation, armed: false, fired: false });
        Ok(())
    }

    fn ready(&mut self) -> bool {
        !self.ring.completion().is_empty() || self.ring.submission().taskrun()
    }

    fn events_fired(&mut self) -> bool {
        let Some(ev) = self.events.as_mut() else { return false };
        let fired = ev.fired;
        ev.fired = false;
        fired
    }

    fn prepare_wait(&mut self) -> Option<Waiter> {
        self.fill();
        self.arm_events();
        self.waiter_upto = self.pushed;
        self.entering.fetch_add(1, Ordering::SeqCst);
        Some(Waiter { fd: self.ring.as_raw_fd(), to_submit: self.ring.submission().len() as u32, entering: self.entering.clone() })
    }

    fn waitable(&self) -> bool {
        true
    }

    /// Queues `op` (into the submission queue, or the backlog when the kernel holds as many
    /// entries as the completion queue can answer). Never blocks, never spins.
    unsafe fn push(&mut self, op: HostOp, user_data: u64) {
        let entry = match op {
            HostOp::Readv { file, iov, iov_len, offset } => {
                opcode::Readv::new(types::Fixed(file), iov, iov_len).offset(offset).build()
            }
            HostOp::Writev { file, iov, iov_len, offset, dsync } => {
                let flags = if dsync { libc::RWF_DSYNC } else { 0 };
                opcode::Writev::new(types::Fixed(file), iov, iov_len)
                    .offset(offset)
                    .rw_flags(flags)
                    .build()
            }
            HostOp::Fdatasync { file } => {
                opcode::Fsync::new(types::Fixed(file)).flags(types::FsyncFlags::DATASYNC).build()
            }
            HostOp::Fallocate { file, offset, len, mode } => {
                opcode::Fallocate::new(types::Fixed(file), len).offset(offset).mode(mode).build()
            }
        }
        .user_data(user_data);
        self.backlog.push_back(entry);
        self.fill();
    }

    fn in_flight(&self) -> usize {
        self.in_kernel + self.backlog.len()
    }

    fn set_files(&mut self, table: &[RawFd], busy: &[u32]) -> io::Result<()> {
        if table.len() > self.events_slot() {
            return Err(io::Error::other(format!("{} files do not fit the ring's {} slots", table.len(), self.events_slot())));
        }
        // A fixed file is looked up when its entry is submitted: an entry mapped before a
        // slot is emptied or replaced must reach the kernel first. Everything queued is
        // submitted now; if the kernel cannot take the backlog yet, the change waits.
        // A register call takes the ring's submission lock: never behind a submission the
        // kernel has not finished. Normally it ends in microseconds (the queue thread is
        // between preparing its wait and entering it); one that lasts is a write stalled in
        // the storage, and the change is refused (the caller retries or reports). Polled,
        // not signalled: the kernel publishes what it took without telling anyone, and the
        // waiter itself may then sleep for a long time in the same call.
        let deadline = std::time::Instant::now() + BEHIND_LIMIT;
        while self.behind_a_submission() {
            if std::time::Instant::now() >= deadline {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, "a submission of the queue thread has not ended"));
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        let changes = |slot: usize| table.get(slot).zip(self.registered.get(slot)).is_some_and(|(&new, &old)| old >= 0 && new != old);
        if let Some(slot) = busy.iter().find(|&&s| changes(s as usize)) {
            return Err(io::Error::new(io::ErrorKind::WouldBlock, format!("slot {slot} is named by a request still in hand")));
        }
        let replaces = (0..table.len()).any(changes);
        if replaces {
            // Moved to the kernel and submitted here only while no queue thread waits on
            // the ring: a request is completed as task work of the thread that submitted
            // it, which must not be a job thread busy with its own IO. Otherwise the queue
            // thread's next wait moves and submits them, and the change is retried.
            if self.entering.load(Ordering::SeqCst) == 0 {
                self.submit()?;
            }
            let queued = self.backlog.len() + self.ring.submission().len();
            if queued > 0 {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, format!("{queued} host ops are not yet submitted")));
            }
        }
        for (slot, &fd) in table.iter().enumerate() {
            if self.registered[slot] != fd {
                // The kernel keeps a replaced file referenced until the operations that use
                // it complete: an update never pulls a file from under IO in flight.
                self.ring.submitter().register_files_update(slot as u32, &[fd])?;
                self.registered[slot] = fd;
            }
        }
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        self.fill();
        if self.behind_a_submission() {
            // The queued entries are the waiting thread's to submit (see `Waiter`).
            return Ok(());
        }
        if self.ring.submission().is_empty() {
            // Nothing to hand over: no system call (a pass of chains that queued no host op).
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion queue is busy: the caller reaps and we retry later.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    fn submit_and_wait_one(&mut self) -> io::Result<()> {
        self.fill();
        if self.behind_a_submission() {
            return enter(self.ring.as_raw_fd(), 0, true, None);
        }
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    fn submit_and_wait_one_for(&mut self, limit: std::time::Duration) -> io::Result<bool> {
        self.fill();
        if self.behind_a_submission() {
            // Waits without submitting: no wait on the submission lock, and the limit holds.
            enter(self.ring.as_raw_fd(), 0, true, Some(limit))?;
            return Ok(!self.ring.completion().is_empty());
        }
        let ts = types::Timespec::new().sec(limit.as_secs()).nsec(limit.subsec_nanos());
        let args = types::SubmitArgs::new().timespec(&ts);
        loop {
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => return Ok(true),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => return Ok(!self.ring.completion().is_empty()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(true),
                Err(e) => return Err(e),
            }
        }
    }

    fn pop(&mut self) -> Option<(u64, i32)> {
        loop {
            let c = self.ring.completion().next()?;
            let ud = c.user_data();
            if ud & EVENTS_TAG == 0 {
                self.in_kernel = self.in_kernel.saturating_sub(1);
                return Some((ud, c.result()));
            }
            // The event set's poll: noted for the queue thread, never an op of the worker.
            if let Some(ev) = self.events.as_mut().filter(|e| EVENTS_TAG | e.generation == ud) {
                ev.armed = false;
                ev.fired = true;
                if c.result() < 0 {
                    tracing::debug!(error = c.result(), "event set poll failed");
                }
                // Taken by another thread (a drain) while the queue thread waits: that wait
                // still ends, as the kernel wakes a wait when the completion queue's tail
                // passes the head it saw, whoever reaps; the thread then finds `fired`.
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;
    use std::fs::File;
    use std::io::Write;

    #[test]
    fn reads_a_registered_file_and_refuses_other_opcodes() {
        let path = std::env::temp_dir().join(format!("thinblk-ring-{}", std::process::id()));
        File::create(&path).unwrap().write_all(b"hello ring").unwrap();
        struct Cleanup(std::path::PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let _cleanup = Cleanup(path.clone());
        let file = File::open(&path).unwrap();
        let mut ring = Ring::new(8, &[file.as_raw_fd()], 1).unwrap();
        let mut buf = [0u8; 10];
        let iov = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
        // SAFETY: buf and iov outlive the completion, which we wait for below.
        unsafe { ring.push(HostOp::Readv { file: 0, iov: iov.as_ptr(), iov_len: 1, offset: 0 }, 7) };
        ring.submit_and_wait_one().unwrap();
        assert_eq!(ring.pop(), Some((7, 10)));
        assert_eq!(&buf, b"hello ring");

        // More entries than the rings hold: the rest wait in the backlog, none is lost, the
        // kernel never holds more than the completion queue can answer.
        let bufs: Vec<[u8; 10]> = vec![[0u8; 10]; 40];
        let iovs: Vec<libc::iovec> =
            bufs.iter().map(|b| libc::iovec { iov_base: b.as_ptr() as *mut libc::c_void, iov_len: b.len() }).collect();
        for (i, v) in iovs.iter().enumerate() {
            // SAFETY: bufs and iovs outlive every completion, all waited for below.
            unsafe { ring.push(HostOp::Readv { file: 0, iov: v, iov_len: 1, offset: 0 }, 100 + i as u64) };
            assert!(ring.in_kernel <= ring.cq_cap);
        }
        assert_eq!(ring.in_flight(), 40);
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < 40 {
            ring.submit_and_wait_one().unwrap();
            while let Some((ud, res)) = ring.pop() {
                assert_eq!(res, 10);
                seen.insert(ud);
            }
            assert!(ring.in_kernel <= ring.cq_cap);
        }
        assert_eq!(ring.in_flight(), 0);
        assert!(bufs.iter().all(|b| b == b"hello ring"));

        // A NOP is not on the allow-list: the kernel rejects it.
        let nop = opcode::Nop::new().build().user_data(9);
        // SAFETY: a NOP references no memory.
        unsafe { ring.ring.submission().push(&nop) }.unwrap();
        let r = ring.ring.submit_and_wait(1);
        let refused = r.is_err() || ring.pop().map(|(_, res)| res < 0).unwrap_or(false);
        assert!(refused);
    }

    #[test]
    fn an_empty_slot_is_filled_and_emptied_after_the_restrictions() {
        let dir = std::env::temp_dir();
        let a = dir.join(format!("thinblk-ring-a-{}", std::process::id()));
        let b = dir.join(format!("thinblk-ring-b-{}", std::process::id()));
        File::create(&a).unwrap().write_all(b"first file").unwrap();
        File::create(&b).unwrap().write_all(b"other file").unwrap();
        let (fa, fb) = (File::open(&a).unwrap(), File::open(&b).unwrap());
        let _ = (std::fs::remove_file(&a), std::fs::remove_file(&b));
        let mut ring = Ring::new(8, &[fa.as_raw_fd()], 4).unwrap();
        let read = |ring: &mut Ring, file: u32| -> (i32, [u8; 10]) {
            let mut buf = [0u8; 10];
            let iov = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
            // SAFETY: buf and iov outlive the completion, which is waited for here.
            unsafe { ring.push(HostOp::Readv { file, iov: iov.as_ptr(), iov_len: 1, offset: 0 }, 1) };
            ring.submit_and_wait_one().unwrap();
            (ring.pop().unwrap().1, buf)
        };
        assert_eq!(read(&mut ring, 2).0, -libc::EBADF, "an empty slot");
        ring.set_files(&[fa.as_raw_fd(), -1, fb.as_raw_fd()], &[]).expect("fill slot 2");
        assert!(ring.set_files(&[fa.as_raw_fd(), -1, -1], &[2]).is_err(), "a busy slot is not emptied");
        assert_eq!(read(&mut ring, 2), (10, *b"other file"));
        assert_eq!(read(&mut ring, 0), (10, *b"first file"), "slot 0 unchanged");
        ring.set_files(&[fa.as_raw_fd(), -1, -1], &[0]).expect("empty slot 2");
        assert_eq!(read(&mut ring, 2).0, -libc::EBADF);
        assert!(ring.set_files(&[-1; 5], &[]).is_err(), "more files than slots");
    }

    #[test]
    fn one_wait_ends_on_the_watched_event_set_and_its_poll_is_no_op_of_the_worker() {
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        let file = File::open("/dev/null").unwrap();
        let mut ring = Ring::new(8, &[file.as_raw_fd()], 2).unwrap();
        let set = EventFd::new(EFD_NONBLOCK).unwrap();
        ring.watch_events(set.as_raw_fd()).expect("watch (PollAdd on the last slot)");
        // Nothing ready: the wait ends at its limit.
        let t = std::time::Instant::now();
        ring.prepare_wait().expect("a ring is waited on").wait(true, Some(std::time::Duration::from_millis(50))).unwrap();
        assert!(t.elapsed() >= std::time::Duration::from_millis(40), "the wait ended early");
        assert_eq!(ring.pop(), None);
        assert!(!ring.events_fired());
        // The set becomes ready: the wait ends, and the poll is reported as events, never
        // as a completion of an op, and never counted in flight.
        set.write(1).unwrap();
        ring.prepare_wait().unwrap().wait(true, Some(std::time::Duration::from_secs(5))).unwrap();
        assert_eq!(ring.pop(), None);
        assert!(ring.events_fired());
        assert!(!ring.events_fired(), "reported once");
        assert_eq!(ring.in_flight(), 0);
        assert_eq!(ring.entering.load(Ordering::SeqCst), 0, "a finished wait still counted");
        // A new set (another queue thread): the old one's readiness no longer ends a wait.
        let other = EventFd::new(EFD_NONBLOCK).unwrap();
        ring.watch_events(other.as_raw_fd()).unwrap();
        set.read().unwrap();
        ring.prepare_wait().unwrap().wait(true, Some(std::time::Duration::from_millis(50))).unwrap();
        assert!(!ring.events_fired());
        other.write(1).unwrap();
        ring.prepare_wait().unwrap().wait(true, Some(std::time::Duration::from_secs(5))).unwrap();
        assert_eq!(ring.pop(), None);
        assert!(ring.events_fired());
        // Host ops and the poll share the ring: a read completes as before.
        let mut buf = [0u8; 4];
        let iov = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
        // SAFETY: buf and iov outlive the completion, waited for below.
        unsafe { ring.push(HostOp::Readv { file: 0, iov: iov.as_ptr(), iov_len: 1, offset: 0 }, 5) };
        ring.prepare_wait().unwrap().wait(true, Some(std::time::Duration::from_secs(5))).unwrap();
        assert_eq!(ring.pop(), Some((5, 0)), "/dev/null reads nothing");
        assert_eq!(ring.in_flight(), 0);
    }

    #[test]
    fn other_threads_do_not_submit_what_a_waiter_submits_but_do_submit_their_own() {
        let file = File::open("/dev/null").unwrap();
        let mut ring = Ring::new(8, &[file.as_raw_fd()], 1).unwrap();
        let mut buf = [0u8; 4];
        let iov = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
        let read = HostOp::Readv { file: 0, iov: iov.as_ptr(), iov_len: 1, offset: 0 };
        // SAFETY: buf and iov outlive every completion, all waited for below.
        unsafe { ring.push(read, 1) };
        let waiter = ring.prepare_wait().unwrap();
        // The waiter has not entered yet: its entry is its own to submit (a submission from
        // here could wait on the kernel's submission lock behind it).
        assert!(ring.behind_a_submission());
        ring.submit().unwrap();
        assert_eq!(ring.ring.submission().len(), 1, "another thread submitted the waiter's entry");
        waiter.wait(true, Some(std::time::Duration::from_secs(5))).unwrap();
        assert_eq!(ring.pop(), Some((1, 0)));
        assert!(!ring.behind_a_submission());
        // An entry queued after a wait was prepared is the queuer's to submit.
        let waiter = ring.prepare_wait().unwrap();
        // SAFETY: as above.
        unsafe { ring.push(read, 2) };
        assert!(!ring.behind_a_submission());
        ring.submit().unwrap();
        assert_eq!(ring.ring.submission().len(), 0, "an entry nobody would submit");
        ring.submit_and_wait_one_for(std::time::Duration::from_secs(5)).unwrap();
        assert_eq!(ring.pop(), Some((2, 0)));
        drop(waiter);
        assert_eq!(ring.entering.load(Ordering::SeqCst), 0);
    }
}

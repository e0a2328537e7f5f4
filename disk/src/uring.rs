//! One io_uring per queue worker, locked down like Firecracker's: only the image's
//! registered files, only the opcodes the data path needs.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, register::Restriction, squeue, types, IoUring};

pub use crate::engine::HostOp;
use crate::engine::Engine;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The opcodes a worker ring may execute.
const ALLOWED_OPCODES: [u8; 4] =
    [opcode::Readv::CODE, opcode::Writev::CODE, opcode::Fsync::CODE, opcode::Fallocate::CODE];

/// `IORING_REGISTER_FILES_UPDATE`: the one register call allowed after the restrictions
/// (a chain that gains or drops a layer online changes a slot of the file table).
const REGISTER_FILES_UPDATE: u8 = 6;

/// A worker's io_uring with its completion eventfd.
///
/// Back-pressure instead of spinning: at most as many entries are handed to the kernel as
/// the completion queue holds, so completions never overflow; entries beyond that (or
/// beyond a full submission queue) wait in a backlog, moved to the kernel by
/// [`Ring::submit`] as completions are popped. The worker bounds the backlog by refusing
/// new requests while [`Ring::in_flight`] is at its cap.
pub struct Ring {
    ring: IoUring,
    eventfd: EventFd,
    backlog: std::collections::VecDeque<squeue::Entry>,
    /// Entries given to the submission queue and not yet popped as completions.
    in_kernel: usize,
    /// Completion queue size: the most entries the kernel may hold.
    cq_cap: usize,
    /// The registered file table, slot by slot (-1: empty).
    registered: Vec<RawFd>,
}

impl Ring {
    /// Creates a ring of `entries` slots with `files` registered in a table of `slots` (at
    /// least `files.len()`; the rest empty, to be filled by [`Engine::set_files`]) and the
    /// opcode allow-list applied.
    pub fn new(entries: u32, files: &[RawFd], slots: usize) -> io::Result<Ring> {
        let ring = IoUring::builder().setup_r_disabled().build(entries)?;
        let submitter = ring.submitter();
        let mut registered = files.to_vec();
        registered.resize(slots.max(files.len()), -1);
        submitter.register_files(&registered)?;
        // Registered before the restrictions, which also forbid later register calls.
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        submitter.register_eventfd(eventfd.as_raw_fd())?;
        let mut restrictions: Vec<Restriction> =
            ALLOWED_OPCODES.iter().map(|&op| Restriction::sqe_op(op)).collect();
        restrictions.push(Restriction::sqe_flags_required(squeue::Flags::FIXED_FILE.bits()));
        restrictions.push(Restriction::register_op(REGISTER_FILES_UPDATE));
        submitter.register_restrictions(&mut restrictions)?;
        submitter.register_enable_rings()?;
        let cq_cap = ring.params().cq_entries() as usize;
        Ok(Ring { ring, eventfd, backlog: std::collections::VecDeque::new(), in_kernel: 0, cq_cap, registered })
    }


    /// Moves backlog entries into the submission queue while both it and the completion
    /// queue have room.
    fn fill(&mut self) {
        while self.in_kernel < self.cq_cap {
            let Some(entry) = self.backlog.front() else { return };
            // SAFETY: the entry's pointers were guaranteed valid until completion by the
            // caller of `push`.
            if unsafe { self.ring.submission().push(entry) }.is_err() {
                return;
            }
            self.backlog.pop_front();
            self.in_kernel += 1;
        }
    }
}

impl Engine for Ring {
    fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn ack_eventfd(&self) {
        // EAGAIN just means nothing was pending.
        let _ = self.eventfd.read();
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
        if table.len() > self.registered.len() {
            return Err(io::Error::other(format!("{} files do not fit the ring's {} slots", table.len(), self.registered.len())));
        }
        // A fixed file is looked up when its entry is submitted: an entry mapped before a
        // slot is emptied or replaced must reach the kernel first. Everything queued is
        // submitted now; if the kernel cannot take the backlog yet, the change waits.
        let changes = |slot: usize| table.get(slot).zip(self.registered.get(slot)).is_some_and(|(&new, &old)| old >= 0 && new != old);
        if let Some(slot) = busy.iter().find(|&&s| changes(s as usize)) {
            return Err(io::Error::new(io::ErrorKind::WouldBlock, format!("slot {slot} is named by a request still in hand")));
        }
        let replaces = (0..table.len()).any(changes);
        if replaces {
            self.submit()?;
            if !self.backlog.is_empty() {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, format!("{} host ops wait for room in the ring", self.backlog.len())));
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
        let c = self.ring.completion().next()?;
        self.in_kernel = self.in_kernel.saturating_sub(1);
        Some((c.user_data(), c.result()))
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
}

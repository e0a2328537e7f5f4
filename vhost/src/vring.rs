//! One virtqueue's state as the frontend configured it: the split ring, its kick, call and
//! error eventfds, and whether it is enabled.
//!
//! The call eventfd is non-blocking: a frontend that never reads it (its counter full) or
//! passes something that is not an eventfd cannot wedge a worker in a notification write.
//! Only eventfds are accepted for kick, call and err.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace};

use std::collections::VecDeque;

use crate::context::AtomicMem;
use crate::inflight::{InflightQueue, Recovery};

/// The mutable state of one ring.
pub struct VringState {
    queue: Queue,
    kick: Option<File>,
    call: Option<File>,
    err: Option<File>,
    enabled: bool,
    mem: AtomicMem,
    /// Inflight tracking for this ring (INFLIGHT_SHMFD negotiated and a region set).
    inflight: Option<InflightQueue>,
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

    /// The kick eventfd, if set.
    pub fn kick(&self) -> Option<&File> {
        self.kick.as_ref()
    }

    /// Records that `head` was taken from the ring (inflight tracking, if any).
    pub fn mark_taken(&mut self, head: u16) {
        if let Some(i) = self.inflight.as_mut() {
            i.mark(head);
        }
    }

    /// The next head a recovered region asks to resubmit.
    pub fn next_resubmit(&mut self) -> Option<u16> {
        self.resubmit.pop_front()
    }

    /// Heads still waiting to be resubmitted.
    pub fn resubmit_pending(&self) -> usize {
        self.resubmit.len()
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
                inflight: None,
                resubmit: VecDeque::new(),
                broken: false,
            })),
        })
    }

    /// Locks the state (a poisoned lock is taken over: the state stays consistent per call).
    pub fn get_mut(&self) -> MutexGuard<'_, VringState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts a completed chain on the used ring (and, with inflight tracking, records the
    /// publication around it so a crash in between is recoverable).
    pub fn add_used(&self, head: u16, len: u32) -> Result<(), VringError> {
        let mut s = self.get_mut();
        let mem = s.mem.memory();
        if let Some(i) = s.inflight.as_mut() {
            i.pre_put(head);
        }
        s.queue.add_used(&*mem, head, len)?;
        let used = s.queue.next_used();
        if let Some(i) = s.inflight.as_mut() {
            i.post_put(head, used);
        }
        Ok(())
    }

    /// Attaches inflight tracking and applies its recovery: the ring's next available index
    /// and the heads to resubmit. Call when the ring starts (its addresses and size set).
    pub fn start_inflight(&self, mut q: InflightQueue) -> Result<Recovery, crate::error::ProtocolError> {
        let mut s = self.get_mut();
        let mem = s.mem.memory();
        let used = s.queue.used_idx(&*mem, std::sync::atomic::Ordering::Acquire).map(|w| w.0).unwrap_or(0);
        let avail = s.queue.avail_idx(&*mem, std::sync::atomic::Ordering::Acquire).map(|w| w.0).unwrap_or(0);
        let size = s.queue.size();
        let rec = q.recover(size, used, avail)?;
        s.queue.set_next_avail(rec.next_avail);
        s.queue.set_next_used(used);
        s.resubmit = rec.resubmit.iter().copied().collect();
        s.inflight = Some(q);
        Ok(rec)
    }

    /// Detaches inflight tracking (the ring stopped).
    pub fn stop_inflight(&self) {
        let mut s = self.get_mut();
        s.inflight = None;
        s.resubmit.clear();
    }

    /// Notifies the frontend (never blocks: a full counter already means "notified").
    pub fn signal_used_queue(&self) -> io::Result<()> {
        let s = self.get_mut();
        let Some(call) = s.call.as_ref() else { return Ok(()) };
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer to an fd we own.
        let r = unsafe { libc::write(call.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }

    /// Asks the driver for kicks again; true if chains arrived meanwhile.
    pub fn enable_notification(&self) -> Result<bool, VringError> {
        let mut s = self.get_mut();
        let mem = s.mem.memory();
        s.queue.enable_notification(&*mem)
    }

    /// Asks the driver not to kick.
    pub fn disable_notification(&self) -> Result<(), VringError> {
        let mut s = self.get_mut();
        let mem = s.mem.memory();
        s.queue.disable_notification(&*mem)
    }

    /// Whether the driver wants to be notified of the latest used entries.
    pub fn needs_notification(&self) -> Result<bool, VringError> {
        let mut s = self.get_mut();
        let mem = s.mem.memory();
        s.queue.needs_notification(&*mem)
    }

    /// Sets the ring size (the caller checked it: a power of two within the maximum).
    pub fn set_queue_size(&self, size: u16) {
        self.get_mut().queue.set_size(size);
    }

    /// Sets the ring addresses (guest physical).
    pub fn set_queue_info(&self, desc: u64, avail: u64, used: u64) -> Result<(), VringError> {
        let mut s = self.get_mut();
        s.queue.try_set_desc_table_address(GuestAddress(desc))?;
        s.queue.try_set_avail_ring_address(GuestAddress(avail))?;
        s.queue.try_set_used_ring_address(GuestAddress(used))
    }

    /// Marks the ring ready (started) or not. A ring stopped by the frontend is no longer
    /// broken: the driver starts it afresh.
    pub fn set_queue_ready(&self, ready: bool) {
        let mut s = self.get_mut();
        s.queue.set_ready(ready);
        if !ready {
            s.broken = false;
        }
    }

    /// Enables or disables the ring.
    pub fn set_enabled(&self, enabled: bool) {
        self.get_mut().enabled = enabled;
    }

    /// Sets the kick eventfd.
    pub fn set_kick(&self, f: Option<File>) {
        self.get_mut().kick = f;
    }

    /// Sets the call eventfd.
    pub fn set_call(&self, f: Option<File>) {
        self.get_mut().call = f;
    }

    /// Sets the error eventfd.
    pub fn set_err(&self, f: Option<File>) {
        self.get_mut().err = f;
    }

    /// Drains the kick eventfd; true if the ring is enabled.
    pub fn read_kick(&self) -> bool {
        let s = self.get_mut();
        if let Some(k) = s.kick.as_ref() {
            let mut buf = [0u8; 8];
            // SAFETY: reads at most 8 bytes into a live local buffer from an fd we own
            // (non-blocking: made so when it was accepted).
            unsafe { libc::read(k.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        }
        s.enabled
    }
}

/// Accepts `f` as a ring eventfd: it must be an eventfd; it is made non-blocking.
pub fn accept_eventfd(f: &File) -> io::Result<()> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))?;
    if link.as_os_str() != "anon_inode:[eventfd]" {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("not an eventfd: {}", link.display())));
    }
    // SAFETY: F_GETFL/F_SETFL on an fd we own.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
    }

    #[test]
    fn a_full_call_counter_does_not_block() {
        let call = eventfd(0);
        let full = (u64::MAX - 1).to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd.
        assert_eq!(unsafe { libc::write(call.as_raw_fd(), full.as_ptr().cast(), 8) }, 8);
        assert!(accept_eventfd(&call).is_ok());
        let v = Vring::new(AtomicMem::new(crate::context::Mem::new()), 16).expect("vring");
        v.set_call(Some(call));
        assert!(v.signal_used_queue().is_ok());
        assert!(v.signal_used_queue().is_ok());
    }
}

//! The seam between a worker and the kernel: an engine takes host operations, answers
//! completions, and never blocks or spins when full (it queues, and tells how much is in
//! flight so the worker can stop taking requests). The io_uring `Ring` (`uring.rs`) is the
//! daemon's engine; tests use a fake one to drive the worker through completions they choose.

use std::io;
use std::os::fd::RawFd;

/// One host operation, targeting a registered file.
#[derive(Clone, Copy, Debug)]
pub enum HostOp {
    /// Vectored read.
    Readv {
        /// Registered file index.
        file: u32,
        /// iovec array; must stay valid until completion.
        iov: *const libc::iovec,
        /// Number of iovecs.
        iov_len: u32,
        /// Byte offset in the file.
        offset: u64,
    },
    /// Vectored write.
    Writev {
        /// Registered file index.
        file: u32,
        /// iovec array; must stay valid until completion.
        iov: *const libc::iovec,
        /// Number of iovecs.
        iov_len: u32,
        /// Byte offset in the file.
        offset: u64,
        /// Write-through: the write is durable on completion.
        dsync: bool,
    },
    /// fdatasync.
    Fdatasync {
        /// Registered file index.
        file: u32,
    },
    /// fallocate (punch hole / zero range).
    Fallocate {
        /// Registered file index.
        file: u32,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// fallocate mode flags.
        mode: i32,
    },
}

// SAFETY: a HostOp's pointers are only dereferenced by the kernel (or a test engine) while
// the worker that owns the memory keeps it alive; the op itself is plain data.
unsafe impl Send for HostOp {}

/// Where a worker's host operations go.
pub trait Engine: Send {
    /// Queues `op`; it completes (in [`Engine::pop`]) with `user_data`. Never blocks.
    ///
    /// # Safety
    /// Every buffer and iovec array `op` points to must stay valid and unaliased by Rust
    /// references until the completion carrying `user_data` has been popped.
    unsafe fn push(&mut self, op: HostOp, user_data: u64);
    /// Hands queued operations on.
    fn submit(&mut self) -> io::Result<()>;
    /// Submits and blocks until at least one completion is available.
    fn submit_and_wait_one(&mut self) -> io::Result<()>;
    /// Submits and waits up to `limit` for a completion; false if none came in time.
    fn submit_and_wait_one_for(&mut self, limit: std::time::Duration) -> io::Result<bool>;
    /// One completion: (user_data, result: bytes or -errno).
    fn pop(&mut self) -> Option<(u64, i32)>;
    /// Operations queued and not yet popped.
    fn in_flight(&self) -> usize;
    /// Has the engine wait on the file `fd` too (an epoll set of the queue thread): its
    /// readiness is reported by [`Engine::events_fired`] after a wait, so one blocking call
    /// waits for completions and events alike. Re-armed by the next [`Engine::prepare_wait`].
    fn watch_events(&mut self, _fd: RawFd) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "this engine cannot wait on events"))
    }
    /// Whether the watched event set became ready since the last call.
    fn events_fired(&mut self) -> bool {
        false
    }
    /// Readies a wait outside the worker's lock: queues what waits (the event poll first)
    /// and returns the wait, which submits it, or `None` if this engine cannot be waited on
    /// that way.
    fn prepare_wait(&mut self) -> Option<crate::uring::Waiter> {
        None
    }
    /// Whether [`Engine::prepare_wait`] gives a wait (the queue thread's wait then submits
    /// what the worker queued).
    fn waitable(&self) -> bool {
        false
    }
    /// Whether completions (or kernel work that posts them) wait, without entering the
    /// kernel: the polling mode's check.
    fn ready(&mut self) -> bool {
        false
    }
    /// Makes the registered file table `table` (slot → fd, -1: empty), slot by slot; the
    /// slots in `busy` (named by extents the worker still holds) must not change. Engines
    /// that address files directly (tests) have nothing to register.
    fn set_files(&mut self, _table: &[RawFd], _busy: &[u32]) -> io::Result<()> {
        Ok(())
    }
}

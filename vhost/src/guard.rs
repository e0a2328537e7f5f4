//! The SIGBUS guard: a frontend may shrink a file we have mapped (guest memory, the inflight
//! region); touching the lost pages raises SIGBUS. Mapped ranges are registered here, with
//! their page size; [`install_sigbus_guard`] handles the signal for addresses inside them by
//! replacing the page (a huge page on hugetlbfs) with private zero pages (the access
//! completes, reading zeros or writing into a page nobody sees), shutting down the connection
//! of the session that owns the memory, and counting the fault. A SIGBUS anywhere else keeps
//! its default effect. A leaf module: it imports nothing of the crate.
//!
//! Proof: `protocol/memory.rs` `a_shrunk_file_does_not_kill_the_process`,
//! `a_shrunk_hugetlbfs_file_does_not_kill_the_process`, `refused_tables_release_their_guard_slots`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};

/// The page size of mappings of `file`: a hugetlbfs file's huge page size, else the base page.
pub(crate) fn page_size_of(file: &File) -> std::io::Result<usize> {
    // SAFETY: statfs is plain data filled by fstatfs on success.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is owned by `file`; `fs` is a valid out-pointer.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: sysconf reads a constant.
    let base = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    if fs.f_type == libc::HUGETLBFS_MAGIC as _ {
        let huge = usize::try_from(fs.f_bsize).unwrap_or(0);
        if huge.is_power_of_two() && huge >= base {
            return Ok(huge);
        }
    }
    Ok(base)
}

/// Slots of the SIGBUS guard's registry: the regions of one session (at most
/// `MAX_MEM_SLOTS`), its inflight region, and regions of earlier sessions still held by a
/// memory snapshot. Slots are released with their mappings, on every path.
pub(crate) const GUARD_SLOTS: usize = 1024;

/// Registered mapped ranges: start (0 = free) and end, written by the session thread and read
/// by the signal handler without locks.
static GUARD_START: [AtomicUsize; GUARD_SLOTS] = [const { AtomicUsize::new(0) }; GUARD_SLOTS];
static GUARD_END: [AtomicUsize; GUARD_SLOTS] = [const { AtomicUsize::new(0) }; GUARD_SLOTS];
/// The page size of each registered range (what a lost page is replaced in units of).
static GUARD_PAGE: [AtomicUsize; GUARD_SLOTS] = [const { AtomicUsize::new(0) }; GUARD_SLOTS];
/// The socket of the session to shut down when its memory faults (-1: none).
static GUARD_SOCKET: AtomicI32 = AtomicI32::new(-1);
/// Faults absorbed since start.
static GUARD_FAULTS: AtomicU64 = AtomicU64::new(0);

/// Registers `[start, end)`, replaced in units of `page` on a fault; false if the registry is
/// full.
pub(crate) fn register(start: usize, end: usize, page: usize) -> bool {
    for i in 0..GUARD_SLOTS {
        if GUARD_START[i].load(Ordering::Acquire) == 0 {
            GUARD_END[i].store(end, Ordering::Release);
            GUARD_PAGE[i].store(page, Ordering::Release);
            if GUARD_START[i].compare_exchange(0, start, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return true;
            }
        }
    }
    false
}

/// Releases the slot of the range starting at `start` (before it is unmapped).
pub(crate) fn unregister(start: usize) {
    for slot in GUARD_START.iter() {
        if slot.compare_exchange(start, 0, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            return;
        }
    }
}

/// Puts a mapping of ours that the frontend's file backs (the inflight region) under the
/// SIGBUS guard, lost pages replaced in units of `page`; false if the registry is full.
pub(crate) fn guard_range(start: usize, len: usize, page: usize) -> bool {
    register(start, start + len, page)
}

/// Ranges registered with the guard now (tests).
#[cfg(test)]
pub(crate) fn guarded() -> usize {
    GUARD_START.iter().filter(|s| s.load(Ordering::Acquire) != 0).count()
}

/// Takes a mapping out of the guard (before unmapping it).
pub(crate) fn unguard_range(start: usize) {
    unregister(start)
}

/// Names the socket to shut down when guest memory faults (`None`: no session).
pub fn guard_session(socket: Option<i32>) {
    GUARD_SOCKET.store(socket.unwrap_or(-1), Ordering::Release);
}

/// Faults on guest memory absorbed so far (a frontend shrank a mapped file).
pub fn guard_faults() -> u64 {
    GUARD_FAULTS.load(Ordering::Relaxed)
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let slot = (0..GUARD_SLOTS).find(|&i| {
        let s = GUARD_START[i].load(Ordering::Acquire);
        s != 0 && addr >= s && addr < GUARD_END[i].load(Ordering::Acquire)
    });
    let Some(slot) = slot else {
        // Not ours: restore the default action; returning re-runs the access, which faults
        // again and terminates the process as it would have without us.
        // SAFETY: signal() with SIG_DFL is async-signal-safe.
        unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
        return;
    };
    // The mapping's own page size: a hugetlbfs mapping can only be split at huge-page
    // boundaries (a 4 KiB replacement would fail there and the fault would be fatal).
    let page = GUARD_PAGE[slot].load(Ordering::Acquire).max(4096);
    let base = addr & !(page - 1);
    // SAFETY: the page lies inside a guest mapping of ours (checked above); replacing it with
    // a private anonymous page keeps every pointer valid and only loses the frontend's view
    // of that page, which its truncation already destroyed.
    let r = unsafe {
        libc::mmap(
            base as *mut libc::c_void,
            page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if r == libc::MAP_FAILED {
        // SAFETY: as above.
        unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
        return;
    }
    GUARD_FAULTS.fetch_add(1, Ordering::Relaxed);
    let sock = GUARD_SOCKET.load(Ordering::Acquire);
    if sock >= 0 {
        // SAFETY: shutdown is async-signal-safe; a stale fd number at worst shuts down
        // nothing (the session clears it before closing its socket).
        unsafe { libc::shutdown(sock, libc::SHUT_RDWR) };
    }
}

/// Installs the SIGBUS handler for guest memory (once per process).
pub fn install_sigbus_guard() -> std::io::Result<()> {
    // SAFETY: sigaction is plain data, fully initialised below.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigbus as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: sa_mask is a valid sigset_t inside `sa`.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: installs a handler that only uses async-signal-safe operations.
    if unsafe { libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

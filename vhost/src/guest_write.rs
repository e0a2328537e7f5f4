//! Every write into guest memory, and the dirty log live migration reads.
//!
//! While the frontend migrates the VM it sets `VHOST_F_LOG_ALL` and hands us a log
//! (SET_LOG_BASE): one bit per 4 KiB page of guest-physical memory. Every byte we put into
//! guest memory must set its page's bit before the used element that makes it visible is
//! published, or the destination runs with a page older than what the guest was told.
//! Guest memory is written in exactly two ways, and both pass through this module:
//!
//! 1. **Through [`crate::context::Mem`]** (vm-memory's `Bytes`): the used ring (elements,
//!    index, flags and avail event, written by virtio-queue), status bytes, GET_ID, bounce
//!    and other copies. Every region of `Mem` carries a [`LogBitmap`] as its vm-memory
//!    bitmap, bound to the session's [`DirtyLog`] when the region is mapped, so vm-memory marks
//!    each of these writes itself, after the bytes land: a new write through `Mem` cannot
//!    forget the log. The used ring is logged at the guest-physical address we translated it
//!    to; SET_VRING_ADDR refuses a log address that differs (see `protocol::session`).
//! 2. **Through raw pointers** handed to the kernel (io_uring reads) or to an inline copy
//!    (zeroes, compressed clusters): [`host_iovecs`] is the only place guest memory becomes
//!    raw pointers, and the request's device-writable segments are marked with
//!    [`mark_filled`] by `Worker::finish_sync`, under the ring lock, before `add_used`
//!    (whatever the outcome: a failed read may have filled part of its buffer).
//!
//! The private page a resubmission reads its chain from (`worker::pop::chain_at`) is not
//! guest memory: its bitmap is never bound.
//!
//! Proof: the tests below and `worker::engine_tests::every_guest_memory_write_marks_exactly_its_pages`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};
use vm_memory::GuestMemoryBackend;

use crate::context::Mem;
use crate::error::ProtocolError;
use crate::protocol::message::LogBase;
use crate::request::Segment;

/// Bytes of guest memory one log bit stands for (`VHOST_LOG_PAGE`).
pub const LOG_PAGE: u64 = 4096;
/// Largest log we map: 1 GiB of bits covers 32 TiB of guest-physical address space.
pub const MAX_LOG_BYTES: u64 = 1 << 30;

/// The dirty log of one frontend connection: the shared bitmap (once SET_LOG_BASE gave
/// one) and whether logging is on (`VHOST_F_LOG_ALL` negotiated).
#[derive(Default)]
pub struct DirtyLog {
    on: AtomicBool,
    area: RwLock<Option<Arc<LogArea>>>,
    /// Pages marked while logging was on (a page marked twice counts twice).
    marked: AtomicU64,
    /// Marks that fell past the end of the log (the frontend sized it too small).
    beyond: AtomicU64,
}

impl std::fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyLog").field("on", &self.enabled()).field("marked", &self.marked()).finish()
    }
}

impl DirtyLog {
    /// A log that is off and has no bitmap yet.
    pub fn new() -> Arc<DirtyLog> {
        Arc::new(DirtyLog::default())
    }

    /// Maps the bitmap the frontend passed with SET_LOG_BASE, replacing an earlier one (a
    /// resized log). Markers still holding the old one finish with it.
    pub fn set_base(&self, base: LogBase, file: File) -> Result<(), ProtocolError> {
        let area = LogArea::map(base, file)?;
        tracing::info!(bytes = base.size, covers_mib = (base.size * 8 * LOG_PAGE) >> 20, "dirty log mapped");
        *self.area.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(area));
        Ok(())
    }

    /// Turns logging on or off (`VHOST_F_LOG_ALL` in SET_FEATURES).
    pub fn set_enabled(&self, on: bool) {
        if self.on.swap(on, Ordering::SeqCst) != on {
            tracing::info!(on, "dirty-page logging {}", if on { "started" } else { "stopped" });
        }
    }

    /// Whether logging is on.
    pub fn enabled(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }

    /// Pages marked so far (a page marked twice counts twice).
    pub fn marked(&self) -> u64 {
        self.marked.load(Ordering::Relaxed)
    }

    /// Marks the pages of `[gpa, gpa + len)` dirty, if logging is on. Atomic per byte of
    /// the log (the frontend clears bits concurrently with atomic exchanges).
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 || !self.on.load(Ordering::Acquire) {
            return;
        }
        // The read guard is held while the bits are set: a SET_LOG_BASE that replaces the log
        // waits for markers still setting bits in the old one, and only then is answered (the
        // frontend reads the old log once more right after that answer, then frees it).
        let guard = self.area.read().unwrap_or_else(|e| e.into_inner());
        let Some(area) = guard.as_ref() else { return };
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        for page in first..=last {
            if !area.set(page) {
                if self.beyond.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(gpa = page * LOG_PAGE, log_bytes = area.len, "a guest-memory write lies past the end of the dirty log (logged once)");
                }
                break;
            }
        }
        self.marked.fetch_add(last - first + 1, Ordering::Relaxed);
    }

    /// Whether the page holding `gpa` is marked in the current log.
    pub fn is_marked(&self, gpa: u64) -> bool {
        let area = self.area.read().unwrap_or_else(|e| e.into_inner()).clone();
        area.is_some_and(|a| a.test(gpa / LOG_PAGE))
    }
}

/// A mapped log bitmap.
struct LogArea {
    base: *mut u8,
    len: usize,
}

// SAFETY: `base` points into a shared mapping that lives as long as the LogArea and is only
// accessed through atomic byte operations.
unsafe impl Send for LogArea {}
// SAFETY: as above: every access is atomic.
unsafe impl Sync for LogArea {}

impl LogArea {
    fn map(base: LogBase, file: File) -> Result<LogArea, ProtocolError> {
        let bad = |why: &'static str| ProtocolError::State(why);
        if base.size == 0 || base.size > MAX_LOG_BYTES {
            return Err(bad("dirty log: size 0 or larger than 1 GiB"));
        }
        let end = base.offset.checked_add(base.size).ok_or(bad("dirty log: offset + size overflows"))?;
        let meta = file.metadata().map_err(ProtocolError::Host)?;
        if !meta.file_type().is_file() || meta.len() < end {
            return Err(bad("dirty log: not a regular file of at least offset + size bytes"));
        }
        let page = crate::guard::page_size_of(&file).unwrap_or(4096);
        if base.offset % page as u64 != 0 {
            return Err(bad("dirty log: offset not a multiple of the file's page size"));
        }
        let len = base.size as usize;
        // SAFETY: maps `len` bytes of a file at least `offset + len` long, shared; unmapped in
        // Drop; only atomic byte operations touch it.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, file.as_raw_fd(), base.offset as libc::off_t)
        };
        if ptr == libc::MAP_FAILED {
            return Err(ProtocolError::Host(io::Error::last_os_error()));
        }
        // A frontend that shrinks the file afterwards must not kill us (SIGBUS): guarded like
        // the memory table and the inflight region.
        if !crate::guard::guard_range(ptr as usize, len, page) {
            // SAFETY: unmaps exactly what was just mapped; nothing refers to it yet.
            unsafe { libc::munmap(ptr, len) };
            return Err(bad("dirty log: the SIGBUS guard's registry is full"));
        }
        Ok(LogArea { base: ptr.cast(), len })
    }

    /// The byte holding `page`'s bit, if inside the log.
    fn byte(&self, page: u64) -> Option<&AtomicU8> {
        let at = usize::try_from(page / 8).ok().filter(|at| *at < self.len)?;
        // SAFETY: `at < len`: inside the mapping, which outlives `&self`; AtomicU8 has the
        // size and alignment of u8, and every access to the log is atomic.
        Some(unsafe { AtomicU8::from_ptr(self.base.add(at)) })
    }

    /// Sets `page`'s bit; false if the page is past the end of the log.
    fn set(&self, page: u64) -> bool {
        match self.byte(page) {
            Some(b) => {
                b.fetch_or(1 << (page % 8), Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    fn test(&self, page: u64) -> bool {
        self.byte(page).is_some_and(|b| b.load(Ordering::SeqCst) & (1 << (page % 8)) != 0)
    }
}

impl Drop for LogArea {
    fn drop(&mut self) {
        crate::guard::unguard_range(self.base as usize);
        // SAFETY: unmaps exactly what `map` mapped; no reference outlives the LogArea.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// The vm-memory bitmap of one guest region: every write vm-memory makes into the region
/// marks its pages in the session's [`DirtyLog`]. Unbound (marks nothing) until
/// [`LogBitmap::bind`] gives it the region's guest-physical address.
#[derive(Default)]
pub struct LogBitmap {
    bound: OnceLock<(u64, Arc<DirtyLog>)>,
}

impl std::fmt::Debug for LogBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogBitmap").field("guest_addr", &self.bound.get().map(|b| b.0)).finish()
    }
}

impl LogBitmap {
    /// Binds the region starting at guest-physical `gpa` to `log` (once; a second call is
    /// ignored: a region does not move).
    pub fn bind(&self, gpa: u64, log: Arc<DirtyLog>) {
        let _ = self.bound.set((gpa, log));
    }
}

impl NewBitmap for LogBitmap {
    fn with_len(_len: usize) -> Self {
        LogBitmap::default()
    }
}

impl<'a> WithBitmapSlice<'a> for LogBitmap {
    type S = RefSlice<'a, LogBitmap>;
}

impl Bitmap for LogBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if let Some((gpa, log)) = self.bound.get() {
            log.mark(gpa.wrapping_add(offset as u64), len as u64);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.bound.get().is_some_and(|(gpa, log)| log.is_marked(gpa.wrapping_add(offset as u64)))
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, LogBitmap> {
        RefSlice::new(self, offset)
    }
}

/// Translates guest segments into host iovecs (a segment may span memory regions). The only
/// place guest memory becomes raw pointers: what is written through them (a read's data) is
/// marked by [`mark_filled`] when the request completes.
pub fn host_iovecs(mem: &Mem, segments: &[Segment]) -> io::Result<Vec<libc::iovec>> {
    let mut out = Vec::with_capacity(segments.len());
    for s in segments {
        for slice in GuestMemoryBackend::get_slices(mem, s.addr, s.len as usize) {
            let slice = slice.map_err(|_| io::Error::from_raw_os_error(libc::EFAULT))?;
            out.push(libc::iovec { iov_base: slice.ptr_guard_mut().as_ptr().cast(), iov_len: slice.len() });
        }
    }
    Ok(out)
}

/// Marks the pages of `segments` (a request's device-writable buffers, which the kernel or
/// an inline copy may have filled through [`host_iovecs`]) in the log of the regions holding
/// them. Unmapped parts are skipped: nothing was written there.
pub fn mark_filled(mem: &Mem, segments: &[Segment]) {
    for s in segments {
        for slice in GuestMemoryBackend::get_slices(mem, s.addr, s.len as usize).flatten() {
            slice.bitmap().mark_dirty(0, slice.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestRegionMmap};

    /// A memfd of `len` bytes.
    pub(crate) fn memfd(len: u64) -> File {
        // SAFETY: a NUL-terminated name; the new fd is owned by the File.
        let fd = unsafe { libc::memfd_create(c"thinblk-test-log".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: we own the new fd.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(len).expect("size the memfd");
        f
    }

    /// Guest memory of two regions (at 0 and 1 MiB, 64 KiB each) logging into a fresh log.
    pub(crate) fn logged_mem() -> (Arc<DirtyLog>, Mem) {
        let log = DirtyLog::new();
        log.set_base(LogBase { size: 64, offset: 0 }, memfd(4096)).expect("map the log");
        let mut regions = Vec::new();
        for at in [0u64, 0x10_0000] {
            let r = GuestRegionMmap::<LogBitmap>::from_range(GuestAddress(at), 0x10000, None).expect("region");
            r.bitmap().bind(at, log.clone());
            regions.push(Arc::new(r));
        }
        (log.clone(), Mem::from_arc_regions(regions).expect("memory"))
    }

    fn marked_pages(log: &DirtyLog) -> Vec<u64> {
        (0..64 * 8).filter(|p| log.is_marked(p * LOG_PAGE)).collect()
    }

    #[test]
    fn writes_through_mem_mark_their_pages_only_while_logging() {
        let (log, mem) = logged_mem();
        mem.write_slice(&[1u8; 8], GuestAddress(0x2ffc)).expect("write");
        assert!(marked_pages(&log).is_empty(), "logging is off: nothing marked");
        log.set_enabled(true);
        // 8 bytes across a page boundary: pages 2 and 3.
        mem.write_slice(&[1u8; 8], GuestAddress(0x2ffc)).expect("write");
        mem.write_obj(0xffu8, GuestAddress(0x10_5000)).expect("status byte");
        mem.store(7u16, GuestAddress(0x10_8002), Ordering::Release).expect("used index");
        assert_eq!(marked_pages(&log), vec![2, 3, 0x105, 0x108]);
        log.set_enabled(false);
        mem.write_obj(0xffu8, GuestAddress(0x9000)).expect("write");
        assert_eq!(marked_pages(&log).len(), 4, "logging stopped: nothing more marked");
    }

    #[test]
    fn filled_buffers_are_marked_across_regions() {
        let (log, mem) = logged_mem();
        log.set_enabled(true);
        let segs = [Segment { addr: GuestAddress(0xf000), len: 0x1001 }, Segment { addr: GuestAddress(0x10_0000), len: 1 }];
        // The first segment runs past its region's end (0x10000): that part is unmapped.
        mark_filled(&mem, &segs[..1]);
        mark_filled(&mem, &segs[1..]);
        assert_eq!(marked_pages(&log), vec![0xf, 0x100]);
    }

    #[test]
    fn a_resized_log_replaces_the_old_one_and_marks_past_its_end_are_dropped() {
        let (log, mem) = logged_mem();
        log.set_enabled(true);
        log.set_base(LogBase { size: 8, offset: 0 }, memfd(4096)).expect("smaller log");
        // 8 bytes cover pages 0..64: 1 MiB + 20 KiB is past the end.
        mem.write_obj(1u8, GuestAddress(0x10_5000)).expect("write");
        mem.write_obj(1u8, GuestAddress(0x1000)).expect("write");
        assert!(log.is_marked(0x1000));
        assert!(!log.is_marked(0x10_5000));
        assert_eq!(log.beyond.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn bad_logs_are_refused() {
        let log = DirtyLog::new();
        assert!(log.set_base(LogBase { size: 0, offset: 0 }, memfd(4096)).is_err(), "size 0");
        assert!(log.set_base(LogBase { size: 4096, offset: 4096 }, memfd(4096)).is_err(), "past the file");
        assert!(log.set_base(LogBase { size: 64, offset: 1 }, memfd(8192)).is_err(), "unaligned offset");
        assert!(log.set_base(LogBase { size: MAX_LOG_BYTES + 1, offset: 0 }, memfd(4096)).is_err(), "too large");
        let dir = std::env::temp_dir();
        let d = File::open(&dir).expect("open a directory");
        assert!(log.set_base(LogBase { size: 64, offset: 0 }, d).is_err(), "not a regular file");
    }
}

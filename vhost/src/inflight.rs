//! Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, split virtqueues): the
//! state of every descriptor, kept in a memory region the frontend holds across our
//! restarts, so that a new daemon resubmits exactly the requests the old one had taken and
//! not completed.
//!
//! The layout is the one of the vhost-user specification (and libvhost-user): per queue a
//! 16-byte header (`features`, `version`, `desc_num`, `last_batch_head`, `used_idx`) and
//! `desc_num` 16-byte descriptor states (`inflight`, padding, `next`, `counter`), the queue's
//! part rounded up to 64 bytes. The protocol per descriptor:
//! 1. popped: `counter` = next counter, then `inflight` = 1;
//! 2. before its used element is published: `last_batch_head` = its index;
//! 3. after the used index moved: `inflight` = 0, then `used_idx` = the new used index.
//!
//! A crash between 2 and 3 leaves `used_idx` behind the ring's: recovery then clears the
//! last batch head (it was completed). Everything still marked was taken and not completed:
//! it is resubmitted oldest first (by `counter`), and the ring's next available index is the
//! used index plus their number. Our used elements are published one at a time, so a
//! "batch" is always one descriptor.
//!
//! After the queues, regions we create carry a 64-byte trailer of our own (the frontend keeps
//! whatever size we announce): a magic and the `CLOCK_BOOTTIME` instant of the first storage
//! failure not yet followed by a success ([`FailureClock`]), so that `--retry-timeout` counts
//! from the first failure even across daemon restarts. A region without it (another backend's
//! layout) is still accepted.
//!
//! Proof: `out_of_order_completions_resubmit_exactly_the_rest_oldest_first`,
//! `a_crash_between_the_used_ring_and_the_clear_completes_once` (below); `tests/restart.rs` (every
//! request exactly once after SIGKILL, SIGTERM, and whatever the memory layout).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use crate::error::ProtocolError;

/// Bytes of one descriptor state.
const DESC_LEN: usize = 16;
/// Bytes of a queue's header.
const HEADER_LEN: usize = 16;
/// The version we write into a fresh queue region.
const VERSION: u16 = 1;
/// Bytes of our trailer after the queues.
const TRAILER_LEN: usize = 64;
/// First bytes of the trailer.
const TRAILER_MAGIC: [u8; 8] = *b"thinblk1";

/// Bytes one queue takes in the region (libvhost-user's formula, header included).
pub fn queue_region_size(queue_size: u16) -> usize {
    (DESC_LEN * usize::from(queue_size) + 2).div_ceil(64) * 64
}

/// The body of GET_INFLIGHT_FD / SET_INFLIGHT_FD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InflightInfo {
    /// Size of the region.
    pub mmap_size: u64,
    /// Offset of the region in the file.
    pub mmap_offset: u64,
    /// Queues the region covers.
    pub num_queues: u16,
    /// Descriptors per queue.
    pub queue_size: u16,
}

/// Encoded size of [`InflightInfo`] (with its 4 bytes of padding).
pub const INFO_LEN: usize = 24;

impl InflightInfo {
    /// Decodes the 24-byte body.
    pub fn parse(body: &[u8]) -> Result<InflightInfo, ProtocolError> {
        if body.len() != INFO_LEN {
            return Err(ProtocolError::BodySize { request: "INFLIGHT_FD", got: body.len(), want: INFO_LEN });
        }
        let u64at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let u16at = |at: usize| u16::from_le_bytes([body[at], body[at + 1]]);
        Ok(InflightInfo { mmap_size: u64at(0), mmap_offset: u64at(8), num_queues: u16at(16), queue_size: u16at(18) })
    }

    /// Encodes the reply body.
    pub fn bytes(&self) -> [u8; INFO_LEN] {
        let mut b = [0u8; INFO_LEN];
        b[0..8].copy_from_slice(&self.mmap_size.to_le_bytes());
        b[8..16].copy_from_slice(&self.mmap_offset.to_le_bytes());
        b[16..18].copy_from_slice(&self.num_queues.to_le_bytes());
        b[18..20].copy_from_slice(&self.queue_size.to_le_bytes());
        b
    }

    /// Checks the geometry a frontend asks for (at most `max_queues`, a power-of-two size).
    fn check(&self, max_queues: usize) -> Result<usize, ProtocolError> {
        if self.num_queues == 0 || usize::from(self.num_queues) > max_queues {
            return Err(ProtocolError::State("inflight region: queue count out of range"));
        }
        if self.queue_size == 0 || !self.queue_size.is_power_of_two() {
            return Err(ProtocolError::State("inflight region: queue size not a power of two"));
        }
        Ok(usize::from(self.num_queues) * queue_region_size(self.queue_size))
    }
}

/// A mapped inflight region (shared with the frontend).
pub struct InflightRegion {
    base: *mut u8,
    len: usize,
    info: InflightInfo,
    /// The memfd (kept for GET_INFLIGHT_FD's reply and so the mapping's file stays).
    file: File,
    /// Offset of our trailer, if the region has one.
    trailer: Option<usize>,
}

// SAFETY: the mapping is plain shared memory; every access goes through the accessors of
// [`InflightQueue`], which the owning vring serialises under its lock.
unsafe impl Send for InflightRegion {}
// SAFETY: as above.
unsafe impl Sync for InflightRegion {}

impl InflightRegion {
    /// Creates a zeroed region for `info`'s geometry (GET_INFLIGHT_FD).
    pub fn create(info: InflightInfo, max_queues: usize) -> Result<Arc<InflightRegion>, ProtocolError> {
        let len = info.check(max_queues)? + TRAILER_LEN;
        // SAFETY: the name is a valid C string; the new fd is owned by the File below.
        let fd = unsafe { libc::memfd_create(c"thinblk-inflight".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(ProtocolError::Host(io::Error::last_os_error()));
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).map_err(ProtocolError::Host)?;
        // The frontend cannot shrink what we map (it may still write anything into it).
        // SAFETY: F_ADD_SEALS on our own memfd.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) };
        let info = InflightInfo { mmap_size: len as u64, mmap_offset: 0, ..info };
        let region = Self::map(file, info, max_queues)?;
        if let Some(at) = region.trailer {
            // SAFETY: the trailer lies inside the mapping (map() checked mmap_size).
            unsafe { std::ptr::write_volatile(region.base.add(at).cast::<[u8; 8]>(), TRAILER_MAGIC) };
        }
        Ok(region)
    }

    /// Maps a region the frontend hands back (SET_INFLIGHT_FD), after checking it.
    pub fn attach(file: File, info: InflightInfo, max_queues: usize) -> Result<Arc<InflightRegion>, ProtocolError> {
        let len = info.check(max_queues)?;
        if info.mmap_size != len as u64 && info.mmap_size != (len + TRAILER_LEN) as u64 {
            return Err(ProtocolError::State("inflight region: size does not match its queues"));
        }
        Self::map(file, info, max_queues)
    }

    fn map(file: File, info: InflightInfo, max_queues: usize) -> Result<Arc<InflightRegion>, ProtocolError> {
        let queues = info.check(max_queues)?;
        let with_trailer = info.mmap_size == (queues + TRAILER_LEN) as u64;
        let len = if with_trailer { queues + TRAILER_LEN } else { queues };
        let meta = file.metadata().map_err(ProtocolError::Host)?;
        let end = info.mmap_offset.checked_add(len as u64).ok_or(ProtocolError::State("inflight region: offset overflows"))?;
        if !meta.file_type().is_file() || meta.len() < end || info.mmap_offset % 4096 != 0 {
            return Err(ProtocolError::State("inflight region: not a file of the announced size"));
        }
        // SAFETY: maps `len` bytes of a file at least `offset + len` long, shared; unmapped
        // in Drop. Pointers into it are only used while the region lives (Arc).
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                info.mmap_offset as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(ProtocolError::Host(io::Error::last_os_error()));
        }
        let page = crate::guard::page_size_of(&file).unwrap_or(4096);
        if !crate::guard::guard_range(base as usize, len, page) {
            // SAFETY: unmaps exactly what was just mapped; nothing refers to it yet.
            unsafe { libc::munmap(base, len) };
            return Err(ProtocolError::State("inflight region: the SIGBUS guard's registry is full"));
        }
        let trailer = with_trailer.then_some(queues);
        Ok(Arc::new(InflightRegion { base: base.cast(), len, info, file, trailer }))
    }

    /// The geometry (for GET_INFLIGHT_FD's reply).
    pub fn info(&self) -> InflightInfo {
        self.info
    }

    /// The memfd (for GET_INFLIGHT_FD's reply).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The first-failure clock in our trailer, if the region has one (its magic is set if a
    /// frontend cleared it: the region is ours from now on).
    pub fn failure_clock(self: &Arc<Self>) -> Option<FailureClock> {
        let at = self.trailer?;
        // SAFETY: the trailer lies inside the mapping; volatile: shared with the frontend.
        let magic = unsafe { std::ptr::read_volatile(self.base.add(at).cast::<[u8; 8]>()) };
        let clock = FailureClock { region: self.clone(), at: at + 8 };
        if magic != TRAILER_MAGIC {
            // SAFETY: as above.
            unsafe { std::ptr::write_volatile(self.base.add(at).cast::<[u8; 8]>(), TRAILER_MAGIC) };
            clock.store(0);
        }
        Some(clock)
    }

    /// Queue `q`'s part, if the region covers it.
    pub fn queue(self: &Arc<Self>, q: usize) -> Option<InflightQueue> {
        if q >= usize::from(self.info.num_queues) {
            return None;
        }
        let offset = q * queue_region_size(self.info.queue_size);
        Some(InflightQueue { region: self.clone(), offset, desc_num: self.info.queue_size, counter: 0 })
    }
}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        crate::guard::unguard_range(self.base as usize);
        // SAFETY: unmaps exactly what map() mapped; no InflightQueue outlives the Arc.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// The `CLOCK_BOOTTIME` nanosecond of the first storage failure not yet followed by a
/// success (0: none), kept in the inflight region so it outlives the daemon.
#[derive(Clone)]
pub struct FailureClock {
    region: Arc<InflightRegion>,
    at: usize,
}

impl FailureClock {
    fn cell(&self) -> &std::sync::atomic::AtomicU64 {
        // SAFETY: `at` is 8-byte aligned (the trailer starts on a 64-byte boundary of a
        // page-aligned mapping) and 8 bytes inside it; the mapping lives as long as `region`.
        unsafe { &*self.region.base.add(self.at).cast::<std::sync::atomic::AtomicU64>() }
    }

    /// The stored instant (0: none). A frontend may have written anything: callers ignore
    /// instants in the future.
    pub fn load(&self) -> u64 {
        self.cell().load(Ordering::SeqCst)
    }

    /// Stores an instant (0: clear).
    pub fn store(&self, boottime_ns: u64) {
        self.cell().store(boottime_ns, Ordering::SeqCst)
    }
}

/// `CLOCK_BOOTTIME` now, in nanoseconds (it counts across processes and suspends).
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// One queue's inflight state (serialised by the vring lock that owns it).
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    offset: usize,
    desc_num: u16,
    counter: u64,
}

/// What recovery found for a queue.
#[derive(Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Descriptor heads to resubmit, oldest first.
    pub resubmit: Vec<u16>,
    /// The ring's next available index: used index + descriptors still in flight.
    pub next_avail: u16,
    /// The region was fresh (first start): nothing to recover, and `next_avail` is only the
    /// used index (the ring's own base, SET_VRING_BASE, applies).
    pub fresh: bool,
}

impl InflightQueue {
    fn ptr(&self, at: usize) -> *mut u8 {
        debug_assert!(self.offset + at < self.region.len);
        // SAFETY: `offset + at` stays inside the mapping: callers index headers (< 16) and
        // descriptors (< desc_num, checked), and queue_region_size covers both.
        unsafe { self.region.base.add(self.offset + at) }
    }

    fn read_u16(&self, at: usize) -> u16 {
        // SAFETY: in bounds (see ptr); volatile: the memory is shared with the frontend.
        u16::from_le_bytes(unsafe { std::ptr::read_volatile(self.ptr(at).cast::<[u8; 2]>()) })
    }

    fn write_u16(&self, at: usize, v: u16) {
        // SAFETY: as read_u16.
        unsafe { std::ptr::write_volatile(self.ptr(at).cast::<[u8; 2]>(), v.to_le_bytes()) }
    }

    fn desc(&self, i: u16) -> usize {
        HEADER_LEN + DESC_LEN * usize::from(i)
    }

    fn inflight(&self, i: u16) -> bool {
        // SAFETY: in bounds (i < desc_num); volatile shared memory.
        unsafe { std::ptr::read_volatile(self.ptr(self.desc(i))) != 0 }
    }

    fn set_inflight(&self, i: u16, v: bool) {
        // SAFETY: as inflight().
        unsafe { std::ptr::write_volatile(self.ptr(self.desc(i)), u8::from(v)) }
    }

    fn desc_counter(&self, i: u16) -> u64 {
        // SAFETY: in bounds; the counter is bytes 8..16 of the descriptor state, read as a
        // byte array (no alignment needed).
        u64::from_le_bytes(unsafe { std::ptr::read_volatile(self.ptr(self.desc(i) + 8).cast::<[u8; 8]>()) })
    }

    fn set_desc_counter(&self, i: u16, v: u64) {
        // SAFETY: in bounds; byte-array write (no alignment requirement).
        unsafe { std::ptr::write_volatile(self.ptr(self.desc(i) + 8).cast::<[u8; 8]>(), v.to_le_bytes()) }
    }

    /// Descriptors this queue's part tracks.
    pub fn desc_num(&self) -> u16 {
        self.desc_num
    }

    /// Recovers the queue when it starts on a ring of `ring_size` descriptors whose used
    /// index is `used_idx` and available index `avail_idx`: clears a completed last batch,
    /// lists what is still in flight (oldest first). Refuses a region that cannot be right.
    pub fn recover(&mut self, ring_size: u16, used_idx: u16, avail_idx: u16) -> Result<Recovery, ProtocolError> {
        if ring_size > self.desc_num {
            return Err(ProtocolError::State("inflight region tracks fewer descriptors than the ring has"));
        }
        let version = self.read_u16(8);
        if version == 0 {
            // Fresh: initialise (features 0, our version, the size), nothing to resubmit.
            self.write_u16(10, self.desc_num);
            self.write_u16(14, used_idx);
            fence(Ordering::SeqCst);
            self.write_u16(8, VERSION);
            return Ok(Recovery { resubmit: Vec::new(), next_avail: used_idx, fresh: true });
        }
        if version != VERSION {
            return Err(ProtocolError::State("inflight region: unknown version"));
        }
        if self.read_u16(14) != used_idx {
            // The last used element was published but not cleared: it completed.
            let last = self.read_u16(12);
            if last < self.desc_num {
                self.set_inflight(last, false);
            }
            fence(Ordering::SeqCst);
            self.write_u16(14, used_idx);
        }
        let mut marked: Vec<(u64, u16)> = (0..ring_size).filter(|&i| self.inflight(i)).map(|i| (self.desc_counter(i), i)).collect();
        // Marks beyond the ring's size cannot be ours (garbage, or another ring): dropped.
        for i in ring_size..self.desc_num {
            if self.inflight(i) {
                self.set_inflight(i, false);
            }
        }
        let outstanding = avail_idx.wrapping_sub(used_idx);
        if marked.len() > usize::from(outstanding) {
            return Err(ProtocolError::State("inflight region marks more descriptors than the driver has outstanding"));
        }
        marked.sort_unstable();
        self.counter = marked.last().map(|(c, _)| c.wrapping_add(1)).unwrap_or(0);
        let resubmit: Vec<u16> = marked.into_iter().map(|(_, i)| i).collect();
        let next_avail = used_idx.wrapping_add(resubmit.len() as u16);
        Ok(Recovery { resubmit, next_avail, fresh: false })
    }

    /// Step 1: descriptor `head` was taken from the ring.
    pub fn mark(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        self.set_desc_counter(head, self.counter);
        self.counter = self.counter.wrapping_add(1);
        fence(Ordering::SeqCst);
        self.set_inflight(head, true);
    }

    /// Step 2: `head`'s used element is about to be published.
    pub fn pre_put(&mut self, head: u16) {
        if head < self.desc_num {
            self.write_u16(12, head);
            fence(Ordering::SeqCst);
        }
    }

    /// Step 3: `head`'s used element is published and the used index is now `used_idx`.
    pub fn post_put(&mut self, head: u16, used_idx: u16) {
        if head < self.desc_num {
            fence(Ordering::SeqCst);
            self.set_inflight(head, false);
            fence(Ordering::SeqCst);
            self.write_u16(14, used_idx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(queues: u16, size: u16) -> Arc<InflightRegion> {
        let info = InflightInfo { mmap_size: 0, mmap_offset: 0, num_queues: queues, queue_size: size };
        InflightRegion::create(info, 8).expect("region")
    }

    #[test]
    fn sizes_follow_libvhost_user() {
        assert_eq!(queue_region_size(256), 4160);
        assert_eq!(queue_region_size(1), 64);
        assert_eq!(region(2, 128).info().mmap_size, 2 * 2112 + TRAILER_LEN as u64, "queues, then our trailer");
        let info = InflightInfo { mmap_size: 1, mmap_offset: 2, num_queues: 3, queue_size: 4 };
        assert_eq!(InflightInfo::parse(&info.bytes()).ok(), Some(info));
    }

    #[test]
    fn out_of_order_completions_resubmit_exactly_the_rest_oldest_first() {
        let r = region(1, 16);
        let mut q = r.queue(0).expect("queue 0");
        assert!(q.recover(16, 0, 0).map(|x| x.fresh).unwrap_or(false));
        for head in [3, 7, 1, 9] {
            q.mark(head);
        }
        // 7 and 9 complete (out of order); the used index moves to 2.
        q.pre_put(7);
        q.post_put(7, 1);
        q.pre_put(9);
        q.post_put(9, 2);
        // A new daemon: same region, ring used index 2, avail index 4.
        let mut q = r.queue(0).expect("queue 0");
        let rec = q.recover(16, 2, 4).expect("recovery");
        assert_eq!(rec, Recovery { resubmit: vec![3, 1], next_avail: 4, fresh: false });
    }

    #[test]
    fn a_crash_between_the_used_ring_and_the_clear_completes_once() {
        let r = region(1, 16);
        let mut q = r.queue(0).expect("queue 0");
        assert!(q.recover(16, 0, 0).is_ok());
        q.mark(5);
        q.mark(6);
        q.pre_put(6);
        // ... the used element of 6 is published (ring used index 1), then the daemon dies.
        let mut q = r.queue(0).expect("queue 0");
        let rec = q.recover(16, 1, 2).expect("recovery");
        assert_eq!(rec.resubmit, vec![5], "6 completed: not resubmitted");
        assert_eq!(rec.next_avail, 2);
    }

    #[test]
    fn regions_that_cannot_be_right_are_refused() {
        // Fewer descriptors tracked than the ring has.
        let r = region(1, 8);
        let mut q = r.queue(0).expect("queue 0");
        assert!(q.recover(16, 0, 0).is_err());
        // Garbage: every descriptor marked, more than the driver has outstanding.
        let r = region(1, 16);
        let mut q = r.queue(0).expect("queue 0");
        assert!(q.recover(16, 0, 0).is_ok());
        for i in 0..16 {
            q.mark(i);
        }
        let mut q = r.queue(0).expect("queue 0");
        assert!(q.recover(16, 0, 3).is_err());
        // An unknown version.
        let r = region(1, 16);
        let q = r.queue(0).expect("queue 0");
        q.write_u16(8, 7);
        let mut q = r.queue(0).expect("queue 0");
        assert!(q.recover(16, 0, 0).is_err());
        // Geometry out of range, and a size that does not match.
        let bad = InflightInfo { mmap_size: 0, mmap_offset: 0, num_queues: 9, queue_size: 16 };
        assert!(InflightRegion::create(bad, 8).is_err());
        let bad = InflightInfo { mmap_size: 0, mmap_offset: 0, num_queues: 1, queue_size: 12 };
        assert!(InflightRegion::create(bad, 8).is_err());
        let r = region(1, 16);
        let f = r.file().try_clone().expect("fd");
        let wrong = InflightInfo { mmap_size: 4096, ..r.info() };
        assert!(InflightRegion::attach(f, wrong, 8).is_err());
        assert!(r.queue(1).is_none());
    }

    #[test]
    fn the_failure_clock_outlives_the_mapping_and_other_layouts_have_none() {
        let r = region(1, 16);
        let clock = r.failure_clock().expect("our regions have a trailer");
        assert_eq!(clock.load(), 0);
        clock.store(12345);
        // The next daemon maps the same file (SET_INFLIGHT_FD) and finds it.
        let again = InflightRegion::attach(r.file().try_clone().expect("fd"), r.info(), 8).expect("attach");
        assert_eq!(again.failure_clock().map(|c| c.load()), Some(12345));
        // A region in the specification's size only (another backend made it): accepted, no clock.
        let plain = InflightInfo { mmap_size: queue_region_size(16) as u64, ..r.info() };
        let other = InflightRegion::attach(r.file().try_clone().expect("fd"), plain, 8).expect("attach plain");
        assert!(other.failure_clock().is_none());
        assert!(boottime_ns() > 0);
    }
}

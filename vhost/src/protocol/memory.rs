//! The frontend's memory table: regions checked against their files before they are mapped,
//! the frontend-address → guest-address translation, and the guard that keeps a shrunk file
//! from killing the daemon.
//!
//! A region is mapped only if its file is a regular file (memfd, tmpfs, hugetlbfs) at least
//! `mmap_offset + size` bytes long. A memfd sealed against shrinking (QEMU seals its memfd
//! backend by default) cannot fail us later. An unsealed file can still be truncated by the
//! frontend while mapped; touching the lost pages raises SIGBUS. The guard (`crate::guard`)
//! handles that signal for addresses inside mapped guest regions: the page (a huge page on
//! hugetlbfs) is replaced by private zero pages (the access completes, reading zeros or writing into a page nobody
//! sees), the connection of the session that owns the memory is shut down, and the fault is
//! counted. A SIGBUS anywhere else keeps its default effect.
//!
//! Proof: `regions_past_their_file_are_refused`, `overlapping_and_excess_regions_are_refused`,
//! `refused_tables_release_their_guard_slots`, `a_shrunk_file_does_not_kill_the_process`,
//! `a_shrunk_hugetlbfs_file_does_not_kill_the_process` (below).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

use crate::error::ProtocolError;
use crate::protocol::message::Region;
use crate::context::Mem;
use crate::guard::{page_size_of, register, unregister};
use crate::guest_write::{DirtyLog, LogBitmap};

/// One mapped region and where the frontend sees it.
struct Mapped {
    /// The frontend's description.
    desc: Region,
    /// Our mapping (shared with memory snapshots).
    region: Arc<GuestRegionMmap<LogBitmap>>,
}

/// The regions of one session.
#[derive(Default)]
pub struct MemoryTable {
    regions: Vec<Mapped>,
    /// The session's dirty log, which every region mapped here logs into.
    log: Arc<DirtyLog>,
    /// Regions removed from the table but possibly still in a worker's memory snapshot: they
    /// stay registered with the SIGBUS guard until we hold the last reference.
    retired: Vec<Arc<GuestRegionMmap<LogBitmap>>>,
}

impl MemoryTable {
    /// An empty table whose regions will log into `log`.
    pub fn new(log: Arc<DirtyLog>) -> MemoryTable {
        MemoryTable { regions: Vec::new(), log, retired: Vec::new() }
    }

    /// Number of regions mapped.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// No region is mapped.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Replaces the whole table (SET_MEM_TABLE); returns the new guest memory.
    pub fn set(&mut self, regions: &[Region], files: Vec<File>) -> Result<Mem, ProtocolError> {
        if files.len() != regions.len() {
            return Err(ProtocolError::FdCount { want: regions.len(), got: files.len() });
        }
        let mut mapped = Vec::with_capacity(regions.len());
        for (r, f) in regions.iter().zip(files) {
            match map(r, f, &self.log) {
                Ok(region) => mapped.push(Mapped { desc: *r, region }),
                Err(e) => return Err(self.refuse(mapped, e)),
            }
        }
        mapped.sort_by_key(|m| m.desc.guest_addr);
        let mem = match build(&mapped) {
            Ok(mem) => mem,
            Err(e) => return Err(self.refuse(mapped, e)),
        };
        let old = std::mem::replace(&mut self.regions, mapped);
        self.retired.extend(old.into_iter().map(|m| m.region));
        self.reap();
        Ok(mem)
    }

    /// Adds one region (ADD_MEM_REG); returns the new guest memory.
    pub fn add(&mut self, r: &Region, file: File, max: usize) -> Result<Mem, ProtocolError> {
        if self.regions.len() >= max {
            return Err(ProtocolError::RegionCount(self.regions.len() + 1));
        }
        let region = map(r, file, &self.log)?;
        let mut next: Vec<Mapped> =
            self.regions.iter().map(|m| Mapped { desc: m.desc, region: m.region.clone() }).collect();
        next.push(Mapped { desc: *r, region: region.clone() });
        next.sort_by_key(|m| m.desc.guest_addr);
        let mem = match build(&next) {
            Ok(mem) => mem,
            Err(e) => {
                drop(next);
                return Err(self.refuse(vec![Mapped { desc: *r, region }], e));
            }
        };
        self.regions = next;
        self.reap();
        Ok(mem)
    }

    /// Removes the region matching `r` (REM_MEM_REG); returns the new guest memory.
    pub fn remove(&mut self, r: &Region) -> Result<Mem, ProtocolError> {
        let at = self
            .regions
            .iter()
            .position(|m| m.desc.guest_addr == r.guest_addr && m.desc.size == r.size && m.desc.user_addr == r.user_addr)
            .ok_or(ProtocolError::NoSuchRegion(r.guest_addr))?;
        let gone = self.regions.remove(at);
        let mem = if self.regions.is_empty() { Mem::new() } else { build(&self.regions)? };
        self.retired.push(gone.region);
        self.reap();
        Ok(mem)
    }

    /// A refused message's fresh mappings leave the guard with them (every error path after
    /// [`map`] comes here; a registry slot is released exactly when its mapping goes).
    /// Test: `refused_tables_release_their_guard_slots`.
    fn refuse(&mut self, fresh: Vec<Mapped>, e: ProtocolError) -> ProtocolError {
        self.retired.extend(fresh.into_iter().map(|m| m.region));
        self.reap();
        e
    }

    /// Translates a frontend virtual address to a guest physical address.
    pub fn to_guest(&self, user_addr: u64) -> Option<u64> {
        self.regions.iter().find_map(|m| {
            let off = user_addr.checked_sub(m.desc.user_addr)?;
            (off < m.desc.size).then(|| m.desc.guest_addr + off)
        })
    }

    /// Drops the retired regions nobody else holds any more (unregistering them first).
    pub fn reap(&mut self) {
        self.retired.retain(still_held);
        if let Ok(mut orphans) = ORPHANS.lock() {
            orphans.retain(still_held);
        }
    }
}

/// Regions of ended sessions still referenced by a memory snapshot somewhere: kept
/// registered with the guard until the last reference is ours.
static ORPHANS: std::sync::Mutex<Vec<Arc<GuestRegionMmap<LogBitmap>>>> = std::sync::Mutex::new(Vec::new());

/// False (after unregistering it) when `r` is held by nobody but us.
fn still_held(r: &Arc<GuestRegionMmap<LogBitmap>>) -> bool {
    if Arc::strong_count(r) > 1 {
        return true;
    }
    unregister(r.as_ptr() as usize);
    false
}

impl Drop for MemoryTable {
    fn drop(&mut self) {
        let regions = std::mem::take(&mut self.regions);
        self.retired.extend(regions.into_iter().map(|m| m.region));
        self.reap();
        if let Ok(mut orphans) = ORPHANS.lock() {
            orphans.append(&mut self.retired);
        }
    }
}

/// Checks a region against its file and maps it.
fn map(r: &Region, file: File, log: &Arc<DirtyLog>) -> Result<Arc<GuestRegionMmap<LogBitmap>>, ProtocolError> {
    let bad = |why: &'static str| ProtocolError::BadRegion { guest_addr: r.guest_addr, why };
    if r.size == 0 {
        return Err(bad("size 0"));
    }
    let end_offset = r.mmap_offset.checked_add(r.size).ok_or(bad("offset + size overflows"))?;
    r.guest_addr.checked_add(r.size - 1).ok_or(bad("guest address + size overflows"))?;
    r.user_addr.checked_add(r.size - 1).ok_or(bad("frontend address + size overflows"))?;
    let size = usize::try_from(r.size).ok().filter(|s| *s <= isize::MAX as usize).ok_or(bad("size too large"))?;
    // SAFETY: stat is plain data filled by fstat on success.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is owned by `file`; `st` is a valid out-pointer.
    if unsafe { libc::fstat(file.as_raw_fd(), &mut st) } != 0 {
        return Err(ProtocolError::Host(std::io::Error::last_os_error()));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(bad("not a regular file (memfd, tmpfs or hugetlbfs expected)"));
    }
    if (st.st_size as u64) < end_offset {
        return Err(bad("region extends past the end of its file"));
    }
    // SAFETY: F_GET_SEALS reads a property of our own fd.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    let sealed = seals >= 0 && seals & libc::F_SEAL_SHRINK != 0;
    let page = page_size_of(&file).map_err(ProtocolError::Host)?;
    if page > 4096 && (r.mmap_offset % page as u64 != 0 || r.size % page as u64 != 0) {
        // hugetlbfs maps and the guard replaces whole huge pages only.
        return Err(bad("offset or size not a multiple of the file's huge page size"));
    }
    let mapping = MmapRegion::<LogBitmap>::from_file(FileOffset::new(file, r.mmap_offset), size)
        .map_err(|e| ProtocolError::Map(e.to_string()))?;
    let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr)).ok_or(bad("guest range overflows"))?;
    // Every write vm-memory makes into this region now marks the log (crate::guest_write).
    region.bitmap().bind(r.guest_addr, log.clone());
    let start = region.as_ptr() as usize;
    if !register(start, start + size, page) {
        return Err(bad("too many regions mapped"));
    }
    tracing::debug!(guest_addr = r.guest_addr, size = r.size, sealed, "mapped a memory region");
    Ok(Arc::new(region))
}

/// A guest memory object over the (sorted) regions.
fn build(regions: &[Mapped]) -> Result<Mem, ProtocolError> {
    Mem::from_arc_regions(regions.iter().map(|m| m.region.clone()).collect())
        .map_err(|e| ProtocolError::Map(format!("memory table: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guard::{guard_faults, guarded, install_sigbus_guard, GUARD_SLOTS};
    use std::io::Write;

    fn memfd(len: u64) -> File {
        // SAFETY: the name is a valid C string; the returned fd is owned by the File.
        let fd = unsafe { libc::memfd_create(c"thinblk-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd was just created and is owned by nobody else.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(len).expect("set_len");
        f
    }

    fn region(guest_addr: u64, size: u64, offset: u64) -> Region {
        Region { guest_addr, size, user_addr: 0x7000_0000u64.wrapping_add(guest_addr), mmap_offset: offset }
    }

    #[test]
    fn regions_past_their_file_are_refused() {
        let mut t = MemoryTable::default();
        assert!(t.set(&[region(0, 8192, 0)], vec![memfd(4096)]).is_err());
        assert!(t.set(&[region(0, 4096, 4096)], vec![memfd(4096)]).is_err());
        assert!(t.set(&[region(0, 4096, u64::MAX - 10)], vec![memfd(4096)]).is_err());
        assert!(t.set(&[region(u64::MAX - 10, 4096, 0)], vec![memfd(4096)]).is_err());
        assert!(t.set(&[region(0, 0, 0)], vec![memfd(4096)]).is_err());
        let dev = File::open("/dev/zero").expect("zero");
        assert!(t.set(&[region(0, 4096, 0)], vec![dev]).is_err());
        assert!(t.set(&[region(0, 4096, 0)], vec![]).is_err());
        assert!(t.set(&[region(0, 4096, 0)], vec![memfd(4096)]).is_ok());
        assert_eq!(t.to_guest(0x7000_0000 + 100), Some(100));
        assert_eq!(t.to_guest(0x7000_0000 + 4096), None);
    }

    #[test]
    fn overlapping_and_excess_regions_are_refused() {
        let mut t = MemoryTable::default();
        assert!(t.set(&[region(0, 8192, 0), region(4096, 4096, 0)], vec![memfd(8192), memfd(8192)]).is_err());
        assert!(t.add(&region(0, 4096, 0), memfd(4096), 1).is_ok());
        assert!(t.add(&region(8192, 4096, 0), memfd(4096), 1).is_err());
        assert!(t.remove(&region(8192, 4096, 0)).is_err());
        assert!(t.remove(&region(0, 4096, 0)).is_ok());
        assert!(t.is_empty());
    }

    #[test]
    fn a_shrunk_file_does_not_kill_the_process() {
        assert!(install_sigbus_guard().is_ok());
        let f = memfd(2 * 4096);
        let keep = f.try_clone().expect("clone");
        let mut t = MemoryTable::default();
        let mem = t.set(&[region(0, 2 * 4096, 0)], vec![f]).expect("mapped");
        keep.set_len(0).expect("shrink");
        let before = guard_faults();
        use vm_memory::Bytes;
        let mut buf = [1u8; 8];
        mem.read_slice(&mut buf, GuestAddress(4096)).expect("read");
        assert_eq!(buf, [0u8; 8]);
        mem.write_slice(&[7u8; 8], GuestAddress(16)).expect("write");
        assert!(guard_faults() > before);
        let mut k = &keep;
        let _ = k.write(&[0]);
    }

    #[test]
    fn refused_tables_release_their_guard_slots() {
        // Twice the registry's size of refusals, each after a region was mapped: a table whose
        // second file is too short, a table whose regions overlap, an added region overlapping.
        let mut t = MemoryTable::default();
        assert!(t.add(&region(0, 4096, 0), memfd(4096), 8).is_ok());
        for _ in 0..GUARD_SLOTS {
            assert!(t.set(&[region(0, 4096, 0), region(8192, 8192, 0)], vec![memfd(4096), memfd(4096)]).is_err());
            assert!(t.set(&[region(0, 8192, 0), region(4096, 4096, 0)], vec![memfd(8192), memfd(8192)]).is_err());
            assert!(t.add(&region(0, 4096, 0), memfd(4096), 8).is_err());
        }
        // Slots are still free: a table maps, and so does an inflight region.
        assert!(t.set(&[region(0, 4096, 0), region(8192, 4096, 0)], vec![memfd(4096), memfd(4096)]).is_ok());
        assert!(guarded() < GUARD_SLOTS / 2, "{} guard slots taken", guarded());
        let info = crate::inflight::InflightInfo { mmap_size: 0, mmap_offset: 0, num_queues: 1, queue_size: 16 };
        assert!(crate::inflight::InflightRegion::create(info, 1).is_ok());
    }

    /// Huge pages for one test: reserves `n` more if none are free (root; restored after).
    struct HugePages {
        restore: Option<u64>,
    }

    impl HugePages {
        const KNOB: &'static str = "/proc/sys/vm/nr_hugepages";

        fn reserve(n: u64) -> HugePages {
            let now: u64 = std::fs::read_to_string(Self::KNOB).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(0);
            let written = std::fs::write(Self::KNOB, format!("{}", now + n)).is_ok();
            HugePages { restore: written.then_some(now) }
        }
    }

    impl Drop for HugePages {
        fn drop(&mut self) {
            if let Some(n) = self.restore {
                let _ = std::fs::write(Self::KNOB, format!("{n}"));
            }
        }
    }

    #[test]
    fn a_shrunk_hugetlbfs_file_does_not_kill_the_process() {
        const HUGE: u64 = 2 << 20;
        assert!(install_sigbus_guard().is_ok());
        let _pages = HugePages::reserve(2);
        // SAFETY: the name is a valid C string; the returned fd is owned by the File below.
        let fd = unsafe { libc::memfd_create(c"thinblk-huge".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB) };
        assert!(fd >= 0, "no 2 MiB hugetlbfs memfd: {} (reserving huge pages needs root)", std::io::Error::last_os_error());
        // SAFETY: fd was just created and is owned by nobody else.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(2 * HUGE).expect("size the hugetlbfs file");
        assert_eq!(page_size_of(&f).expect("page size"), HUGE as usize);
        // Regions of a hugetlbfs file are whole huge pages.
        let mut t = MemoryTable::default();
        assert!(t.set(&[region(0, HUGE / 2, 0)], vec![f.try_clone().expect("clone")]).is_err());
        assert!(t.set(&[region(0, HUGE, 4096)], vec![f.try_clone().expect("clone")]).is_err());
        let keep = f.try_clone().expect("clone");
        let mut t = MemoryTable::default();
        let mem = t.set(&[region(0, 2 * HUGE, 0)], vec![f]).expect("mapped");
        use vm_memory::Bytes;
        mem.write_slice(&[3u8; 8], GuestAddress(HUGE + 64)).expect("write before the shrink");
        keep.set_len(0).expect("shrink");
        let before = guard_faults();
        let mut buf = [1u8; 8];
        mem.read_slice(&mut buf, GuestAddress(HUGE + 64)).expect("read a lost huge page");
        assert_eq!(buf, [0u8; 8]);
        mem.write_slice(&[7u8; 8], GuestAddress(16)).expect("write a lost huge page");
        assert!(guard_faults() >= before + 2);
    }
}

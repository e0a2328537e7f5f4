//! The metadata journal: what keeps the *daemon-crash* contract (docs/qcow2.md).
//!
//! Every metadata change the engine makes in memory (a refcount, a refcount-table entry or a
//! whole new table, the header's refcount-table fields, an L2 entry, an L1 entry, a fresh
//! table's zeroes) is recorded, as the bytes it will eventually write into the image, in a
//! file mapped shared from tmpfs — under the metadata lock, before the change can make a
//! completion visible. A store into a shared mapping is in the kernel's page cache the moment
//! it executes, so a daemon killed at any instant (SIGKILL, OOM, panic) leaves every record of
//! every completed request behind, with no syscall and no sync on the data path.
//!
//! On the next open, [`Journal::open`] writes the records into the image in the write-back
//! order (refcount blocks → sync → refcount table → sync → header → sync → L2 tables → sync →
//! L1 → sync), then the journal starts empty. The data those records link was written with O_DIRECT before its completion, so it
//! is in the device when the daemon dies; the first sync of the replay makes it durable before
//! any L2 entry that points at it.
//!
//! A host crash (power loss) wipes tmpfs, and the journal's boot id no longer matches should it
//! survive on another file system: the journal is then discarded, and the image's own ordered
//! write-back (the *host-crash* contract) is what holds. Records are never needed for that.
//!
//! Layout: two segments, each a 64-byte header (magic, image key, generation, bytes used,
//! boot id) followed by records `[len u32][class u8][flags u8][pad u16][offset u64][payload]`
//! padded to 8 bytes. Records are appended to the *active* segment; at each write-back the
//! engine rotates to the other one and clears the old one once the write-back is durable, so
//! the journal holds only what the image may not have yet.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Qcow2Error, Result};
use crate::storage::Storage;

const MAGIC: u64 = u64::from_be_bytes(*b"TBJRNL01");
const SEG_HEADER: usize = 64;
const REC_HEADER: usize = 16;
/// Default bytes per segment (the file is twice this; tmpfs backs only the pages touched).
pub const DEFAULT_SEGMENT_BYTES: usize = 8 << 20;
const FLAG_ZERO: u8 = 1;

/// Write-back class of a record: replay applies the classes in this order, a sync after each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(crate) enum Class {
    /// Refcount blocks.
    Refcount = 0,
    /// The refcount table (after the blocks it names are durable).
    RefTable = 1,
    /// Header fields (the refcount table's place).
    Header = 2,
    /// L2 tables.
    L2 = 3,
    /// The L1 table.
    L1 = 4,
}

impl Class {
    fn from_u8(v: u8) -> Option<Class> {
        Some(match v {
            0 => Class::Refcount,
            1 => Class::RefTable,
            2 => Class::Header,
            3 => Class::L2,
            4 => Class::L1,
            _ => return None,
        })
    }
}

/// The running journal of an open image.
pub(crate) struct Journal {
    ptr: *mut u8,
    seg_bytes: usize,
    active: usize,
    gen: u64,
    used: [usize; 2],
    key: u64,
    boot: [u8; 32],
    file: File,
    path: PathBuf,
    /// A record did not fit (logged once): the tail of this segment is lost.
    overflowed: bool,
}

// SAFETY: the mapping is owned by the journal and only touched through `&mut self`
// (under the image's metadata write lock).
unsafe impl Send for Journal {}
// SAFETY: as above; shared references never touch the mapping.
unsafe impl Sync for Journal {}

/// This boot's id (changes at every boot): 32 hex digits.
fn boot_id() -> [u8; 32] {
    let mut id = [b'0'; 32];
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        for (d, c) in id.iter_mut().zip(s.bytes().filter(|c| c.is_ascii_hexdigit())) {
            *d = c;
        }
    }
    id
}

fn io_err(path: &Path, what: &str, e: io::Error) -> Qcow2Error {
    Qcow2Error::Io(io::Error::new(e.kind(), format!("journal {}: {what}: {e}", path.display())))
}

fn bad(path: &Path, what: impl std::fmt::Display) -> Qcow2Error {
    Qcow2Error::Corrupt(format!("journal {}: {what} (remove it to start without replaying it)", path.display()))
}

impl Journal {
    /// Opens the journal at `path` for the image `key`: locks it (a second process serving the
    /// same image fails here), replays what an earlier process left into `storage`, and starts
    /// it empty.
    pub(crate) fn open(path: &Path, key: u64, seg_bytes: usize, storage: &dyn Storage) -> Result<(Journal, Option<ReplayReport>)> {
        let seg_bytes = seg_bytes.max(4096).next_multiple_of(4096);
        // The directory is shared (/dev/shm is world-writable) and the name predictable: never
        // follow a link there (we would truncate its target), and never use a file someone
        // else could write (its records would be replayed into the image).
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| {
                let what = if e.raw_os_error() == Some(libc::ELOOP) { "open (a symbolic link is refused)" } else { "open" };
                io_err(path, what, e)
            })?;
        {
            use std::os::unix::fs::MetadataExt;
            let meta = file.metadata().map_err(|e| io_err(path, "stat", e))?;
            // SAFETY: geteuid has no failure mode and no memory effects.
            let me = unsafe { libc::geteuid() };
            if !meta.file_type().is_file() || meta.uid() != me || meta.nlink() != 1 || meta.mode() & 0o077 != 0 {
                return Err(bad(
                    path,
                    format!("not a private file of ours (uid {}, mode {:o}, links {})", meta.uid(), meta.mode() & 0o7777, meta.nlink()),
                ));
            }
        }
        // SAFETY: plain syscall on our own fd.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io_err(path, "locked by another process serving this image", e));
        }
        let report = replay_file(&file, path, key, storage)?;
        file.set_len(0).map_err(|e| io_err(path, "truncate", e))?;
        file.set_len((seg_bytes * 2) as u64).map_err(|e| io_err(path, "size", e))?;
        // SAFETY: a fresh shared mapping of the whole file, which stays open (and at this size)
        // for the mapping's life; unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), seg_bytes * 2, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, file.as_raw_fd(), 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(io_err(path, "mmap", io::Error::last_os_error()));
        }
        let mut j = Journal {
            ptr: ptr.cast(),
            seg_bytes,
            active: 0,
            gen: 1,
            used: [0, 0],
            key,
            boot: boot_id(),
            file,
            path: path.to_path_buf(),
            overflowed: false,
        };
        j.write_header(0, 1);
        j.write_header(1, 0);
        Ok((j, report))
    }

    fn seg(&mut self, s: usize) -> &mut [u8] {
        // SAFETY: the mapping is 2 * seg_bytes long and lives as long as self; `&mut self`
        // makes this the only reference into it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(s * self.seg_bytes), self.seg_bytes) }
    }

    fn write_header(&mut self, s: usize, gen: u64) {
        let (key, boot, used) = (self.key, self.boot, self.used[s] as u64);
        let h = &mut self.seg(s)[..SEG_HEADER];
        h[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        h[8..16].copy_from_slice(&key.to_le_bytes());
        h[16..24].copy_from_slice(&gen.to_le_bytes());
        h[24..32].copy_from_slice(&used.to_le_bytes());
        h[32..64].copy_from_slice(&boot);
    }

    fn set_used(&mut self, s: usize, used: usize) {
        self.used[s] = used;
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.seg(s)[24..32].copy_from_slice(&(used as u64).to_le_bytes());
    }

    fn append(&mut self, class: Class, offset: u64, len: usize, payload: Option<&[u8]>) {
        let s = self.active;
        let body = payload.map(|p| p.len()).unwrap_or(0).next_multiple_of(8);
        let at = SEG_HEADER + self.used[s];
        if at + REC_HEADER + body > self.seg_bytes || len > u32::MAX as usize {
            if !self.overflowed {
                self.overflowed = true;
                eprintln!("thinblk-qcow2: journal {} full: changes until the next write-back are not protected against a daemon crash", self.path.display());
            }
            return;
        }
        let seg = self.seg(s);
        let r = &mut seg[at..at + REC_HEADER];
        r[0..4].copy_from_slice(&(len as u32).to_le_bytes());
        r[4] = class as u8;
        r[5] = if payload.is_none() { FLAG_ZERO } else { 0 };
        r[6..8].fill(0);
        r[8..16].copy_from_slice(&offset.to_le_bytes());
        if let Some(p) = payload {
            seg[at + REC_HEADER..at + REC_HEADER + p.len()].copy_from_slice(p);
        }
        let used = self.used[s] + REC_HEADER + body;
        // The record is complete before `used` counts it.
        self.set_used(s, used);
    }

    /// Records that `bytes` will be written at image offset `offset`.
    pub(crate) fn record(&mut self, class: Class, offset: u64, bytes: &[u8]) {
        self.append(class, offset, bytes.len(), Some(bytes));
    }

    /// Records that `len` zero bytes will be written at image offset `offset`.
    pub(crate) fn record_zero(&mut self, class: Class, offset: u64, len: u64) {
        self.append(class, offset, len as usize, None);
    }

    /// The active segment is past half full: write back soon.
    pub(crate) fn pressure(&self) -> bool {
        self.used[self.active] > self.seg_bytes / 2
    }

    /// The generation records go to now (to tag freed clusters with).
    pub(crate) fn generation(&self) -> u64 {
        self.gen
    }

    /// At the start of a write-back: the segment to clear once it is durable, and its
    /// generation. Later records go to the other segment when that one is clear.
    pub(crate) fn rotate(&mut self) -> (usize, u64) {
        let other = 1 - self.active;
        if self.used[other] == 0 {
            let old = (self.active, self.gen);
            self.gen += 1;
            self.active = other;
            let g = self.gen;
            self.write_header(other, g);
            old
        } else {
            // The other segment holds a failed write-back's records, older than the active
            // one's: this write-back covers them (they were made dirty again).
            let g = self.gen.saturating_sub(1);
            (other, g)
        }
    }

    /// After a durable write-back: empties segment `s` and gives its pages back.
    pub(crate) fn clear(&mut self, s: usize) {
        if self.used[s] == 0 {
            return;
        }
        self.set_used(s, 0);
        if s == self.active {
            self.overflowed = false;
        }
        let start = (s * self.seg_bytes + 4096) as i64;
        let len = (self.seg_bytes - 4096) as i64;
        // SAFETY: plain syscall on our own fd; the range lies inside the file. Failure only
        // means the pages stay allocated.
        unsafe {
            libc::fallocate(self.file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, start, len);
        }
    }

    /// The image is closed clean (everything written back and synced): the journal goes.
    pub(crate) fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // Dropped without a crash and with nothing unwritten (e.g. a start refused after the
        // image opened): nothing to keep.
        if self.used == [0, 0] {
            let _ = std::fs::remove_file(&self.path);
        }
        // SAFETY: the mapping made in `create`, unmapped once.
        unsafe {
            libc::munmap(self.ptr.cast(), self.seg_bytes * 2);
        }
    }
}

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Records written into the image.
    pub records: u64,
    /// Bytes they wrote.
    pub bytes: u64,
    /// The journal came from an earlier boot (the host crashed): discarded, nothing replayed.
    pub stale_boot: bool,
    /// Leaked clusters given back after the unclean stop (allocations whose writes never
    /// completed).
    pub leaks_repaired: u64,
}

struct Record {
    class: Class,
    offset: u64,
    len: usize,
    data: Option<std::ops::Range<usize>>,
}

/// Replays a journal (open and locked) into the image on `storage`, in write-back order with a
/// sync after each class. `key` must be the image's key: a journal of another image is
/// refused. Garbage is refused with an error, never applied. The caller empties it afterwards.
fn replay_file(file: &File, path: &Path, key: u64, storage: &dyn Storage) -> Result<Option<ReplayReport>> {
    let len = file.metadata().map_err(|e| io_err(path, "stat", e))?.len();
    if len == 0 {
        return Ok(None);
    }
    if len % 2 != 0 || len > 1 << 32 {
        return Err(bad(path, format!("size {len}")));
    }
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, 0).map_err(|e| io_err(path, "read", e))?;
    let seg_bytes = buf.len() / 2;
    let boot = boot_id();
    let mut segs = Vec::new();
    for s in 0..2 {
        let base = s * seg_bytes;
        let h = &buf[base..base + SEG_HEADER.min(seg_bytes)];
        if h.len() < SEG_HEADER {
            return Err(bad(path, "too small"));
        }
        let word = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&h[i * 8..i * 8 + 8]);
            u64::from_le_bytes(a)
        };
        if word(0) != MAGIC {
            return Err(bad(path, format!("segment {s}: bad magic")));
        }
        if word(1) != key {
            // An empty journal holds nothing to lose: it is simply replaced.
            if word(3) == 0 {
                continue;
            }
            return Err(bad(path, format!("belongs to another image (key {:#x}, this image {key:#x})", word(1))));
        }
        if h[32..64] != boot {
            return Ok(Some(ReplayReport { stale_boot: true, ..Default::default() }));
        }
        let used = word(3) as usize;
        if used > seg_bytes - SEG_HEADER {
            return Err(bad(path, format!("segment {s}: {used} bytes used")));
        }
        if used > 0 {
            segs.push((word(2), base + SEG_HEADER, used));
        }
    }
    segs.sort_by_key(|s| s.0);
    let mut recs = Vec::new();
    for &(_, start, used) in &segs {
        let mut at = start;
        while at < start + used {
            if at + REC_HEADER > start + used {
                return Err(bad(path, "truncated record"));
            }
            let r = &buf[at..at + REC_HEADER];
            let rlen = u32::from_le_bytes([r[0], r[1], r[2], r[3]]) as usize;
            let class = Class::from_u8(r[4]).ok_or_else(|| bad(path, format!("record class {}", r[4])))?;
            let zero = r[5] & FLAG_ZERO != 0;
            let mut o = [0u8; 8];
            o.copy_from_slice(&r[8..16]);
            let offset = u64::from_le_bytes(o);
            let body = if zero { 0 } else { rlen.next_multiple_of(8) };
            if at + REC_HEADER + body > start + used || offset.checked_add(rlen as u64).is_none() {
                return Err(bad(path, "record past its segment"));
            }
            let data = (!zero).then(|| at + REC_HEADER..at + REC_HEADER + rlen);
            recs.push(Record { class, offset, len: rlen, data });
            at += REC_HEADER + body;
        }
    }
    let mut report = ReplayReport::default();
    let zeroes = vec![0u8; 1 << 16];
    for class in [Class::Refcount, Class::RefTable, Class::Header, Class::L2, Class::L1] {
        let mut any = false;
        for r in recs.iter().filter(|r| r.class == class) {
            match &r.data {
                Some(range) => storage.write_at(&buf[range.clone()], r.offset)?,
                None => {
                    let mut done = 0;
                    while done < r.len {
                        let n = (r.len - done).min(zeroes.len());
                        storage.write_at(&zeroes[..n], r.offset + done as u64)?;
                        done += n;
                    }
                }
            }
            report.records += 1;
            report.bytes += r.len as u64;
            any = true;
        }
        // The first sync also makes the data the L2 entries link durable before them.
        if any || class == Class::Refcount {
            storage.flush()?;
        }
    }
    Ok(Some(report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    /// A temp path removed when dropped, even when the test fails.
    struct TmpPath(PathBuf);
    impl std::ops::Deref for TmpPath {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }
    impl AsRef<Path> for TmpPath {
        fn as_ref(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TmpPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn tmp(name: &str) -> TmpPath {
        TmpPath(std::env::temp_dir().join(format!("thinblk-journal-{}-{name}", std::process::id())))
    }

    fn fresh(p: &Path, key: u64) -> Journal {
        let _ = std::fs::remove_file(p);
        Journal::open(p, key, 4096, &MemStorage::default()).expect("create").0
    }

    #[test]
    fn records_replay_in_class_order_and_rotation_clears() {
        let p = tmp("order");
        let mut j = fresh(&p, 7);
        j.record(Class::L2, 100, &[1, 2, 3]);
        j.record(Class::Refcount, 100, &[9, 9, 9]);
        let (old, _) = j.rotate();
        j.record(Class::L1, 0, &[5]);
        j.record_zero(Class::L2, 200, 10);
        // A write-back covering the first segment succeeded.
        j.clear(old);
        j.record(Class::L2, 203, &[7]);
        drop(j);
        let st = MemStorage::new(vec![0xff; 300]);
        let (j, rep) = Journal::open(&p, 7, 4096, &st).expect("replay");
        let rep = rep.expect("a journal");
        assert_eq!(rep.records, 3);
        let img = st.snapshot();
        assert_eq!(img[100..103], [0xff, 0xff, 0xff], "the cleared segment is not replayed");
        assert_eq!(img[0], 5);
        assert_eq!(img[200..210], [0, 0, 0, 7, 0, 0, 0, 0, 0, 0], "zeroes, then the later entry");
        // Starts empty: a second replay does nothing.
        drop(j);
        let st2 = MemStorage::new(vec![0xff; 300]);
        let (j, rep) = Journal::open(&p, 7, 4096, &st2).expect("reopen");
        assert!(rep.is_none_or(|r| r.records == 0));
        assert_eq!(st2.snapshot(), vec![0xff; 300]);
        j.remove();
        assert!(!p.exists());
    }

    #[test]
    fn foreign_and_garbage_journals_are_refused() {
        let p = tmp("foreign");
        let mut j = fresh(&p, 1);
        j.record(Class::L2, 0, &[1]);
        drop(j);
        let st = MemStorage::new(vec![0; 64]);
        assert!(matches!(Journal::open(&p, 2, 4096, &st), Err(Qcow2Error::Corrupt(_))));
        assert!(p.exists(), "a journal with records survives a drop");
        // Garbage records.
        let f = OpenOptions::new().write(true).open(&p).expect("open");
        f.write_all_at(&[0xee; 32], SEG_HEADER as u64).expect("write");
        assert!(matches!(Journal::open(&p, 1, 4096, &st), Err(Qcow2Error::Corrupt(_))));
        assert_eq!(st.snapshot(), vec![0; 64], "nothing applied");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn second_process_is_locked_out_and_stale_boot_discarded() {
        let p = tmp("lock");
        let mut j = fresh(&p, 3);
        j.record(Class::L2, 0, &[1]);
        // flock is per open file description: a second open in this process conflicts too.
        assert!(Journal::open(&p, 3, 4096, &MemStorage::default()).is_err());
        drop(j);
        let f = OpenOptions::new().write(true).open(&p).expect("open");
        f.write_all_at(&[b'x'; 32], 32).expect("write");
        let st = MemStorage::new(vec![0; 8]);
        let (j, rep) = Journal::open(&p, 3, 4096, &st).expect("replay");
        assert!(rep.expect("report").stale_boot);
        assert_eq!(st.snapshot(), vec![0; 8], "a journal of another boot is not applied");
        j.remove();
    }

    #[test]
    fn an_empty_journal_goes_with_its_drop_and_never_blocks_another_image() {
        let p = tmp("empty");
        drop(fresh(&p, 5));
        assert!(!p.exists(), "an empty journal is removed when dropped");
        // One left empty by a crash (no Drop) is replaced, whatever image it was for.
        let j = fresh(&p, 5);
        let copy = tmp("empty-copy");
        std::fs::copy(&p, &copy).expect("copy");
        drop(j);
        std::fs::rename(&copy, &p).expect("rename");
        let (j, rep) = Journal::open(&p, 6, 4096, &MemStorage::default()).expect("replaced");
        assert_eq!(rep.map(|r| r.records), Some(0));
        drop(j);
    }

    #[test]
    fn a_planted_link_or_foreign_file_is_refused_and_left_alone() {
        use std::os::unix::fs::PermissionsExt;
        let p = tmp("planted");
        let victim = tmp("victim");
        // Empty, as a lock or state file: a followed link would turn it into a journal.
        std::fs::write(&victim, b"").expect("victim");
        // A private file of ours (as /root/.ssh/id_rsa): only O_NOFOLLOW keeps it intact.
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let _ = std::fs::remove_file(&p);
        std::os::unix::fs::symlink(&victim, &p).expect("symlink");
        assert!(Journal::open(&p, 1, 4096, &MemStorage::default()).is_err());
        assert_eq!(std::fs::metadata(&victim).expect("victim").len(), 0, "a link's target was touched");
        std::fs::remove_file(&p).expect("rm link");
        // A file others may write.
        std::fs::write(&p, b"").expect("file");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        assert!(matches!(Journal::open(&p, 1, 4096, &MemStorage::default()), Err(Qcow2Error::Corrupt(_))));
        // Someone else's file.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: chown of our own test file.
        if unsafe { libc::chown(c.as_ptr(), 65534, 65534) } == 0 {
            assert!(matches!(Journal::open(&p, 1, 4096, &MemStorage::default()), Err(Qcow2Error::Corrupt(_))));
        }
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(&victim);
    }

    #[test]
    fn overflow_keeps_a_consistent_prefix() {
        let p = tmp("overflow");
        let mut j = fresh(&p, 4);
        for i in 0..1000u64 {
            j.record(Class::L2, i * 8, &i.to_be_bytes());
        }
        assert!(j.overflowed && j.pressure());
        drop(j);
        let st = MemStorage::new(vec![0; 8000]);
        let (j, rep) = Journal::open(&p, 4, 4096, &st).expect("replay");
        let n = (4096 - SEG_HEADER) / (REC_HEADER + 8);
        assert_eq!(rep.expect("report").records, n as u64);
        j.remove();
    }
}

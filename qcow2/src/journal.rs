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
//! L1 → sync), then the journal starts empty. The data those records link was written with
//! O_DIRECT before its completion, so it is in the device when the daemon dies; the first
//! sync of the replay makes it durable before any L2 entry that points at it.
//!
//! **Identity and generation.** A journal belongs to one image *state*, never to a path: it is
//! named by the uuid in the image's owner extension (`header.rs` [`crate::header::Owner`]),
//! and every segment carries the image's write-back generation it extends (`base`), the
//! generation of the write-back that covers it (`covered`) and the newest generation its
//! process may have written (`head`). The replay rules ([`replay_file`]):
//! - the owner extension must be current (its autoclear bit still set: no other program
//!   opened the image for writing since), else the open is refused;
//! - the image's generation `G` must not be newer than `head` (served elsewhere since), else
//!   refused;
//! - segments are taken oldest first, `E` starting at `G`; a segment with
//!   `covered != 0 && E >= covered` is already in the image: skipped;
//! - a segment with `E < base` is refused (the image is older than the journal: a copy
//!   restored from before), unless it was opened after a seal (below), whose records no
//!   completion depends on until `base` is durable: skipped;
//! - a whole segment replayed brings the image to `covered` (`E = covered`); a sealed one,
//!   a prefix, does not.
//!
//! A host crash (power loss) wipes tmpfs, and the journal's boot id no longer matches should
//! it survive on another file system: it is then discarded, and the image's own ordered
//! write-back (the *host-crash* contract) is what holds; the owner extension's in-use flag
//! tells the next open to give back the clusters that leaked.
//!
//! **Never a hole.** The file is preallocated (no page is ever allocated by a store, so a full
//! tmpfs fails the open, never a store with SIGBUS). A record that does not fit *seals* the
//! journal: it takes no more records, so what it holds is always a prefix of what happened,
//! and the engine makes every completion wait for a write-back that started after its change
//! until the journal is unsealed (at the next write-back's rotation).
//!
//! Layout: two segments, each a 128-byte header (magic, uuid, sequence, bytes used, base,
//! covered, head, boot id, flags) followed by records
//! `[len u32][class u8][flags u8][pad u16][offset u64][payload]` padded to 8 bytes. Records
//! are appended to the *active* segment; at each write-back the engine rotates to the other
//! one and clears the old one once the write-back is durable, so the journal holds only what
//! the image may not have yet.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Qcow2Error, Result};
use crate::storage::Storage;

const MAGIC: u64 = u64::from_be_bytes(*b"TBJRNL02");
/// The journal format before identity and generations: never replayed, only detected.
const LEGACY_MAGIC: u64 = u64::from_be_bytes(*b"TBJRNL01");
const SEG_HEADER: usize = 128;
const REC_HEADER: usize = 16;
/// Default bytes per segment (the file is twice this, preallocated).
pub const DEFAULT_SEGMENT_BYTES: usize = 8 << 20;
const FLAG_ZERO: u8 = 1;
/// Segment flag: opened when a sealed journal was unsealed; replayable only over `base`.
const SEG_AFTER_SEAL: u64 = 1;
/// Segment flag: a record did not fit; what it holds is a prefix of what happened.
const SEG_SEALED: u64 = 2;

// Segment header fields (byte offsets).
const H_MAGIC: usize = 0;
const H_UUID: usize = 8;
const H_SEQ: usize = 24;
const H_USED: usize = 32;
const H_BASE: usize = 40;
const H_COVERED: usize = 48;
const H_HEAD: usize = 56;
const H_BOOT: usize = 64;
const H_FLAGS: usize = 96;

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

/// What the image says of itself, for deciding whether a journal may be replayed into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ImageMark {
    /// The owner extension is present and current (its autoclear bit is set).
    pub trusted: bool,
    /// Its write-back generation.
    pub generation: u64,
}

/// The running journal of an open image.
pub(crate) struct Journal {
    ptr: *mut u8,
    seg_bytes: usize,
    active: usize,
    seq: u64,
    used: [usize; 2],
    uuid: [u8; 16],
    boot: [u8; 32],
    file: File,
    path: PathBuf,
    /// A record did not fit: nothing more is recorded until the next rotation.
    sealed: bool,
    /// The newest generation any earlier process of this journal may have written.
    head_seen: u64,
    /// `remove` unlinked the file (Drop must not unlink a successor's).
    removed: bool,
    /// The segment a write-back in progress (or failed) will clear once one is durable.
    pending: Option<usize>,
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

/// A journal that exists but must not be replayed into this image: the error says why and
/// what to do.
fn refused(path: &Path, why: impl std::fmt::Display) -> Qcow2Error {
    Qcow2Error::JournalMismatch(format!(
        "{why}. The metadata journal {} of thinblk's unclean stop holds changes that cannot be replayed into this image safely, and is not dropped silently: if the image is the one to keep, check it (qemu-img check -r all IMAGE), then remove the journal (the completed writes it held since the last write-back are lost); if not, put back the image the journal belongs to and start again",
        path.display()
    ))
}

fn word(h: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&h[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Journal file name for the image with this uuid.
pub fn journal_file_name(uuid_hex: &str) -> String {
    format!("thinblk-{uuid_hex}.journal")
}

/// Whether `path` holds a journal of the format `magic` (segment headers of `header` bytes,
/// the bytes used at `used_at`) with records in either segment.
fn has_records(path: &Path, magic: u64, header: usize, used_at: usize) -> bool {
    let Ok(f) = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path) else {
        return false;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len < 2 * header as u64 || len % 2 != 0 {
        return false;
    }
    (0..2).any(|s| {
        let mut h = vec![0u8; header];
        f.read_exact_at(&mut h, s * (len / 2)).is_ok() && word(&h, H_MAGIC) == magic && word(&h, used_at) != 0
    })
}

/// Whether `path` holds a journal (of this format) with records in it.
pub fn journal_has_records(path: &Path) -> bool {
    has_records(path, MAGIC, SEG_HEADER, H_USED)
}

/// Whether `path` holds a journal of the earlier format (before identity and generations:
/// 64-byte segment headers, bytes used at 24) with records in it: such a journal is never
/// replayed by this version.
pub fn legacy_journal_pending(path: &Path) -> bool {
    has_records(path, LEGACY_MAGIC, 64, 24)
}

impl Journal {
    /// Opens the journal at `path` for the image `uuid` in state `image`: locks it (a second
    /// process serving the same image fails here), replays what an earlier process left into
    /// `storage` if the replay rules allow (else refuses), and starts it empty and
    /// preallocated. Call [`Journal::begin`] once the image's new generation is durable.
    pub(crate) fn open(
        path: &Path,
        uuid: [u8; 16],
        image: ImageMark,
        seg_bytes: usize,
        storage: &dyn Storage,
    ) -> Result<(Journal, Option<ReplayReport>)> {
        let seg_bytes = seg_bytes.max(8192).next_multiple_of(4096);
        // The directory is shared (/dev/shm is world-writable): never follow a link there (we
        // would truncate its target), and never use a file someone else could write (its
        // records would be replayed into the image). The name holds the image's uuid, which
        // only those who can read the image know.
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
        let (report, head_seen) = replay_file(&file, path, uuid, image, storage)?;
        file.set_len(0).map_err(|e| io_err(path, "truncate", e))?;
        let total = (seg_bytes * 2) as i64;
        // Every page now, none at a store: a full tmpfs fails here, not with SIGBUS later.
        // SAFETY: plain syscall on our own fd.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, total) } != 0 {
            let e = io::Error::last_os_error();
            let _ = std::fs::remove_file(path);
            let dir = path.parent().map(|p| p.display().to_string()).unwrap_or_default();
            return Err(Qcow2Error::Io(io::Error::new(
                e.kind(),
                format!(
                    "journal {}: cannot reserve {} MiB in {dir} ({e}): give that file system room (a tmpfs of at least {} MiB per image served) or choose another --journal-dir",
                    path.display(),
                    total >> 20,
                    (total >> 20) + 1
                ),
            )));
        }
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
            seq: 1,
            used: [0, 0],
            uuid,
            boot: boot_id(),
            file,
            path: path.to_path_buf(),
            sealed: false,
            head_seen,
            removed: false,
            pending: None,
        };
        j.write_header(0, 1, 0, 0);
        j.write_header(1, 0, 0, 0);
        Ok((j, report))
    }

    /// The newest image generation an earlier process of this journal may have written (0
    /// without one): the image's next generation must be past it.
    pub(crate) fn head_seen(&self) -> u64 {
        self.head_seen
    }

    /// The image's generation `gen` is durable: records from now on extend it.
    pub(crate) fn begin(&mut self, gen: u64) {
        for s in 0..2 {
            self.put(s, H_BASE, gen);
            self.put(s, H_HEAD, gen);
        }
    }

    fn seg(&mut self, s: usize) -> &mut [u8] {
        // SAFETY: the mapping is 2 * seg_bytes long and lives as long as self; `&mut self`
        // makes this the only reference into it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(s * self.seg_bytes), self.seg_bytes) }
    }

    fn put(&mut self, s: usize, at: usize, v: u64) {
        self.seg(s)[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn write_header(&mut self, s: usize, seq: u64, base: u64, flags: u64) {
        let (uuid, boot, used) = (self.uuid, self.boot, self.used[s] as u64);
        let head = if s == self.active { base } else { 0 };
        let h = &mut self.seg(s)[..SEG_HEADER];
        h.fill(0);
        h[H_MAGIC..H_MAGIC + 8].copy_from_slice(&MAGIC.to_le_bytes());
        h[H_UUID..H_UUID + 16].copy_from_slice(&uuid);
        h[H_SEQ..H_SEQ + 8].copy_from_slice(&seq.to_le_bytes());
        h[H_USED..H_USED + 8].copy_from_slice(&used.to_le_bytes());
        h[H_BASE..H_BASE + 8].copy_from_slice(&base.to_le_bytes());
        h[H_HEAD..H_HEAD + 8].copy_from_slice(&head.to_le_bytes());
        h[H_BOOT..H_BOOT + 32].copy_from_slice(&boot);
        h[H_FLAGS..H_FLAGS + 8].copy_from_slice(&flags.to_le_bytes());
    }

    fn set_used(&mut self, s: usize, used: usize) {
        self.used[s] = used;
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.put(s, H_USED, used as u64);
    }

    /// Appends a record; false (and the journal is sealed) when it does not fit or the
    /// journal is sealed already: the caller's change must then be written through.
    fn append(&mut self, class: Class, offset: u64, len: usize, payload: Option<&[u8]>) -> bool {
        if self.sealed {
            return false;
        }
        let s = self.active;
        let body = payload.map(|p| p.len()).unwrap_or(0).next_multiple_of(8);
        let at = SEG_HEADER + self.used[s];
        if at + REC_HEADER + body > self.seg_bytes || len > u32::MAX as usize {
            self.sealed = true;
            let flags = word(self.seg(s), H_FLAGS) | SEG_SEALED;
            self.put(s, H_FLAGS, flags);
            return false;
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
        true
    }

    /// Records that `bytes` will be written at image offset `offset`; false if it could not
    /// be (sealed).
    pub(crate) fn record(&mut self, class: Class, offset: u64, bytes: &[u8]) -> bool {
        self.append(class, offset, bytes.len(), Some(bytes))
    }

    /// Records that `len` zero bytes will be written at image offset `offset`; false if it
    /// could not be (sealed).
    pub(crate) fn record_zero(&mut self, class: Class, offset: u64, len: u64) -> bool {
        self.append(class, offset, len as usize, None)
    }

    /// The active segment is past half full, or sealed: write back soon.
    pub(crate) fn pressure(&self) -> bool {
        self.sealed || self.used[self.active] > self.seg_bytes / 2
    }

    /// A record did not fit: nothing is recorded until the next rotation.
    pub(crate) fn sealed(&self) -> bool {
        self.sealed
    }

    /// The sequence number records go to now (to tag freed clusters with).
    pub(crate) fn generation(&self) -> u64 {
        self.seq
    }

    /// At the start of a write-back that will make the image's generation `next` once
    /// durable: the segment to clear then, and its sequence number. Later records go to the
    /// other segment when that one is clear; a sealed journal is unsealed there, in a segment
    /// replayable only over `next` (returned `true`: completions must wait for `next`).
    pub(crate) fn rotate(&mut self, next: u64) -> (usize, u64, bool) {
        for s in 0..2 {
            self.put(s, H_HEAD, next);
        }
        let other = 1 - self.active;
        if self.pending.is_none() {
            let old = (self.active, self.seq);
            self.pending = Some(old.0);
            self.put(old.0, H_COVERED, next);
            let unsealed = self.sealed;
            self.seq += 1;
            self.active = other;
            // Its records extend the state this write-back writes (generation `next`).
            let flags = if unsealed { SEG_AFTER_SEAL } else { 0 };
            self.write_header(other, self.seq, next, flags);
            self.put(other, H_HEAD, next);
            self.sealed = false;
            (old.0, old.1, unsealed)
        } else {
            // The other segment holds a failed write-back's records, older than the active
            // one's: this write-back covers them (they were made dirty again).
            (other, self.seq.saturating_sub(1), false)
        }
    }

    /// After a durable write-back: empties segment `s`.
    pub(crate) fn clear(&mut self, s: usize) {
        if self.pending == Some(s) {
            self.pending = None;
        }
        if self.used[s] == 0 {
            return;
        }
        self.set_used(s, 0);
    }

    /// The image is closed clean (everything written back and synced): the journal goes.
    pub(crate) fn remove(mut self) {
        self.unlink_if_ours();
    }

    /// A process killed now: the file stays as it is, whatever it holds (tests).
    #[cfg(test)]
    pub(crate) fn crash(mut self) {
        self.removed = true;
    }

    /// Unlinks the journal's path only if it still names this file (never a successor's).
    fn unlink_if_ours(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        let ours = match (self.file.metadata(), std::fs::symlink_metadata(&self.path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // Dropped without a crash and with nothing unwritten (e.g. a start refused after the
        // image opened): nothing to keep.
        if self.used == [0, 0] {
            self.unlink_if_ours();
        }
        // SAFETY: the mapping made in `open`, unmapped once.
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
    /// Segments skipped because the image already held them (or, opened after a seal, no
    /// completion depended on them).
    pub skipped_segments: u64,
    /// Records replacing a whole region (a new refcount block or table, the header's table)
    /// not written because a write-back had already published a newer state of it.
    pub superseded: u64,
    /// The image was not closed clean (its owner extension says so), journal or not.
    pub unclean: bool,
    /// A journal of this image was found (empty ones included): false when the file was
    /// missing or had never been set up, which after an unclean stop means it was lost.
    pub journal_found: bool,
    /// Leaked clusters given back after the unclean stop (allocations whose writes never
    /// completed, or whose counts a host crash left behind).
    pub leaks_repaired: u64,
}

struct Record {
    class: Class,
    offset: u64,
    len: usize,
    data: Option<std::ops::Range<usize>>,
}

struct Segment {
    seq: u64,
    start: usize,
    used: usize,
    base: u64,
    covered: u64,
    flags: u64,
}

/// Replays a journal (open and locked) into the image on `storage`, in write-back order with a
/// sync after each class, if the rules of the module doc allow; refuses otherwise. Garbage is
/// refused with an error, never applied. Returns the report (None: nothing there) and the
/// newest generation the journal's process may have written. The caller empties it afterwards.
fn replay_file(file: &File, path: &Path, uuid: [u8; 16], image: ImageMark, storage: &dyn Storage) -> Result<(Option<ReplayReport>, u64)> {
    let len = file.metadata().map_err(|e| io_err(path, "stat", e))?.len();
    if len == 0 {
        return Ok((None, 0));
    }
    if len % 2 != 0 || len > 1 << 32 || len < 2 * SEG_HEADER as u64 {
        return Err(bad(path, format!("size {len}")));
    }
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, 0).map_err(|e| io_err(path, "read", e))?;
    let seg_bytes = buf.len() / 2;
    let boot = boot_id();
    let mut segs = Vec::new();
    let mut head = 0u64;
    for s in 0..2 {
        let base = s * seg_bytes;
        let h = &buf[base..base + SEG_HEADER];
        let magic = word(h, H_MAGIC);
        if magic == LEGACY_MAGIC {
            return Err(bad(path, "written by an earlier thinblk version, which must replay it itself"));
        }
        if magic != MAGIC {
            return Err(bad(path, format!("segment {s}: bad magic")));
        }
        let used = word(h, H_USED) as usize;
        if used == 0 {
            continue;
        }
        if h[H_UUID..H_UUID + 16] != uuid {
            return Err(bad(path, "belongs to another image (its uuid differs)"));
        }
        if h[H_BOOT..H_BOOT + 32] != boot {
            return Ok((Some(ReplayReport { stale_boot: true, journal_found: true, ..Default::default() }), 0));
        }
        if used > seg_bytes - SEG_HEADER {
            return Err(bad(path, format!("segment {s}: {used} bytes used")));
        }
        head = head.max(word(h, H_HEAD));
        segs.push(Segment {
            seq: word(h, H_SEQ),
            start: base + SEG_HEADER,
            used,
            base: word(h, H_BASE),
            covered: word(h, H_COVERED),
            flags: word(h, H_FLAGS),
        });
    }
    if segs.is_empty() {
        return Ok((Some(ReplayReport { journal_found: true, ..Default::default() }), head));
    }
    if !image.trusted {
        return Err(refused(
            path,
            "the image was opened for writing by another program (qemu-img check -r, commit, snapshot, QEMU) or lost thinblk's owner extension after thinblk stopped uncleanly",
        ));
    }
    let g = image.generation;
    if g > head {
        return Err(refused(
            path,
            format!("the image's write-back generation {g} is newer than the journal's {head}: another process (on another host?) served it since"),
        ));
    }
    segs.sort_by_key(|s| s.seq);
    let mut report = ReplayReport { journal_found: true, ..Default::default() };
    let mut recs = Vec::new();
    // The state the records replayed so far bring the image to: a whole segment brings it
    // to the generation of the write-back that covers it; a sealed one (a prefix) does not.
    let mut eff = g;
    for seg in &segs {
        if seg.covered != 0 && eff >= seg.covered {
            report.skipped_segments += 1;
            continue;
        }
        if eff < seg.base {
            if seg.flags & SEG_AFTER_SEAL != 0 {
                report.skipped_segments += 1;
                continue;
            }
            return Err(refused(
                path,
                format!("the image's write-back generation {g} is older than the journal's {}: a copy restored from before?", seg.base),
            ));
        }
        parse_records(&buf, path, seg.start, seg.used, &mut recs)?;
        if seg.covered != 0 && seg.flags & SEG_SEALED == 0 {
            eff = eff.max(seg.covered);
        }
    }
    let disk = OnDisk::read(storage)?;
    let zeroes = vec![0u8; 1 << 16];
    for class in [Class::Refcount, Class::RefTable, Class::Header, Class::L2, Class::L1] {
        let mut any = false;
        for r in recs.iter().filter(|r| r.class == class) {
            if disk.supersedes(r, &buf) {
                report.superseded += 1;
                continue;
            }
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
    Ok((Some(report), head))
}

/// What the image on disk says before a replay, for the records that replace a whole region.
/// Such a record (a new refcount block's zeroes, a new refcount table, the header's table
/// fields) is needed only while no write-back has published that region; once one has, the
/// disk holds the region as that write-back wrote it, possibly with changes a sealed journal
/// never recorded, and writing the record again would take them back.
struct OnDisk {
    /// The refcount table the header names.
    table_offset: u64,
    /// The refcount blocks that table names.
    blocks: std::collections::HashSet<u64>,
}

impl OnDisk {
    fn read(storage: &dyn Storage) -> Result<OnDisk> {
        let mut h = [0u8; 64];
        storage.read_at(&mut h, 0)?;
        let be32 = |at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let mut o = [0u8; 8];
        o.copy_from_slice(&h[48..56]);
        let table_offset = u64::from_be_bytes(o);
        let bits = be32(20);
        let mut blocks = std::collections::HashSet::new();
        if (9..=21).contains(&bits) {
            let bytes = (u64::from(be32(56)) << bits).min(crate::header::MAX_REFTABLE_BYTES);
            let mut t = vec![0u8; bytes as usize];
            if storage.read_at(&mut t, table_offset).is_ok() {
                for e in t.chunks_exact(8) {
                    o.copy_from_slice(e);
                    let b = u64::from_be_bytes(o) & crate::table::REFTABLE_OFFSET_MASK;
                    if b != 0 {
                        blocks.insert(b);
                    }
                }
            }
        }
        Ok(OnDisk { table_offset, blocks })
    }

    /// Whether the disk already holds a newer state of the region `r` replaces whole.
    fn supersedes(&self, r: &Record, buf: &[u8]) -> bool {
        match (r.class, &r.data) {
            // A new refcount block's zeroes: the table on disk names it, so a write-back
            // wrote the block before it (and synced).
            (Class::Refcount, None) => self.blocks.contains(&r.offset),
            // A whole new refcount table: the header on disk names it or a newer one (tables
            // only ever move up, to the bump pointer).
            (Class::RefTable, Some(_)) if r.len > 8 => self.table_offset >= r.offset,
            // The header's table fields: older than the table the header names.
            (Class::Header, Some(d)) if r.offset == 48 && r.len >= 8 => {
                let mut o = [0u8; 8];
                o.copy_from_slice(&buf[d.start..d.start + 8]);
                u64::from_be_bytes(o) < self.table_offset
            }
            _ => false,
        }
    }
}

fn parse_records(buf: &[u8], path: &Path, start: usize, used: usize, recs: &mut Vec<Record>) -> Result<()> {
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
    Ok(())
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

    const U: [u8; 16] = [7; 16];

    fn mark(generation: u64) -> ImageMark {
        ImageMark { trusted: true, generation }
    }

    /// A fresh journal extending image generation 1.
    fn fresh(p: &Path, uuid: [u8; 16]) -> Journal {
        let _ = std::fs::remove_file(p);
        let mut j = Journal::open(p, uuid, mark(0), 8192, &MemStorage::default()).expect("create").0;
        j.begin(1);
        j
    }

    #[test]
    fn records_replay_in_class_order_and_rotation_clears() {
        let p = tmp("order");
        let mut j = fresh(&p, U);
        j.record(Class::L2, 100, &[1, 2, 3]);
        j.record(Class::Refcount, 100, &[9, 9, 9]);
        let (old, _, unsealed) = j.rotate(2);
        assert!(!unsealed);
        j.record(Class::L1, 0, &[5]);
        j.record_zero(Class::L2, 200, 10);
        // A write-back covering the first segment succeeded.
        j.clear(old);
        j.record(Class::L2, 203, &[7]);
        drop(j);
        let st = MemStorage::new(vec![0xff; 300]);
        // The write-back that cleared the first segment made the image's generation 2.
        let (j, rep) = Journal::open(&p, U, mark(2), 8192, &st).expect("replay");
        let rep = rep.expect("a journal");
        assert_eq!(rep.records, 3);
        assert_eq!(j.head_seen(), 2);
        let img = st.snapshot();
        assert_eq!(img[100..103], [0xff, 0xff, 0xff], "the cleared segment is not replayed");
        assert_eq!(img[0], 5);
        assert_eq!(img[200..210], [0, 0, 0, 7, 0, 0, 0, 0, 0, 0], "zeroes, then the later entry");
        // Starts empty: a second replay does nothing.
        drop(j);
        let st2 = MemStorage::new(vec![0xff; 300]);
        let (j, rep) = Journal::open(&p, U, mark(1), 8192, &st2).expect("reopen");
        assert!(rep.is_none_or(|r| r.records == 0));
        assert_eq!(st2.snapshot(), vec![0xff; 300]);
        j.remove();
        assert!(!p.exists());
    }

    #[test]
    fn the_image_state_decides_whether_a_journal_replays() {
        let p = tmp("gen");
        // Image at generation 1; a write-back to 2 in flight (its segment covered by 2), later
        // records in the active segment.
        let setup = |p: &Path| {
            let mut j = fresh(p, U);
            j.record(Class::L2, 0, &[1]);
            let _ = j.rotate(2);
            j.record(Class::L2, 1, &[2]);
            j.crash();
        };
        let replay = |p: &Path, m: ImageMark| {
            let st = MemStorage::new(vec![0; 4]);
            Journal::open(p, U, m, 8192, &st).map(|(j, r)| {
                j.crash();
                (r.expect("report"), st.snapshot())
            })
        };
        setup(&p);
        let (r, img) = replay(&p, mark(1)).expect("generation 1: both segments");
        assert_eq!((r.records, r.skipped_segments, &img[..2]), (2, 0, &[1u8, 2][..]));
        setup(&p);
        let (r, img) = replay(&p, mark(2)).expect("generation 2: the covered segment is in the image");
        assert_eq!((r.records, r.skipped_segments, &img[..2]), (1, 1, &[0u8, 2][..]));
        setup(&p);
        let e = replay(&p, mark(3)).expect_err("newer than the journal").to_string();
        assert!(e.contains("newer than the journal") && e.contains("qemu-img check"), "{e}");
        setup(&p);
        let e = replay(&p, mark(0)).expect_err("older than the journal").to_string();
        assert!(e.contains("older than the journal"), "{e}");
        setup(&p);
        let e = replay(&p, ImageMark { trusted: false, generation: 1 }).expect_err("untrusted").to_string();
        assert!(e.contains("another program"), "{e}");
        assert!(p.exists(), "a refused journal stays");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn a_full_segment_seals_the_journal_and_the_replay_is_a_prefix() {
        let p = tmp("seal");
        let mut j = fresh(&p, U);
        let mut kept = 0u64;
        for i in 0..2000u64 {
            if j.record(Class::L2, i * 8, &i.to_be_bytes()) {
                kept += 1;
            }
            // Smaller records after the first refusal are refused too: no holes.
            assert!(!j.sealed() || !j.record(Class::Refcount, 0, &[1]));
        }
        assert!(j.sealed() && j.pressure());
        assert_eq!(kept, ((8192 - SEG_HEADER) / (REC_HEADER + 8)) as u64);
        // The next write-back's rotation unseals it, in a segment replayable only over 2.
        let (_, _, unsealed) = j.rotate(2);
        assert!(unsealed && !j.sealed());
        assert!(j.record(Class::L2, 1 << 20, &[9]));
        j.crash();
        let st = MemStorage::new(vec![0; 1 << 16]);
        let (j, rep) = Journal::open(&p, U, mark(1), 8192, &st).expect("replay");
        let rep = rep.expect("report");
        assert_eq!((rep.records, rep.skipped_segments), (kept, 1), "the prefix; not the segment after the seal");
        let img = st.snapshot();
        for i in 0..kept {
            assert_eq!(img[(i * 8) as usize..(i * 8 + 8) as usize], i.to_be_bytes());
        }
        j.remove();
    }

    #[test]
    fn foreign_and_garbage_journals_are_refused() {
        let p = tmp("foreign");
        let mut j = fresh(&p, [1; 16]);
        j.record(Class::L2, 0, &[1]);
        drop(j);
        let st = MemStorage::new(vec![0; 64]);
        assert!(matches!(Journal::open(&p, [2; 16], mark(1), 8192, &st), Err(Qcow2Error::Corrupt(_))));
        assert!(p.exists(), "a journal with records survives a drop");
        // Garbage records.
        let f = OpenOptions::new().write(true).open(&p).expect("open");
        f.write_all_at(&[0xee; 32], SEG_HEADER as u64).expect("write");
        assert!(matches!(Journal::open(&p, [1; 16], mark(1), 8192, &st), Err(Qcow2Error::Corrupt(_))));
        assert_eq!(st.snapshot(), vec![0; 64], "nothing applied");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn second_process_is_locked_out_and_stale_boot_discarded() {
        let p = tmp("lock");
        let mut j = fresh(&p, U);
        j.record(Class::L2, 0, &[1]);
        // flock is per open file description: a second open in this process conflicts too.
        assert!(Journal::open(&p, U, mark(1), 8192, &MemStorage::default()).is_err());
        drop(j);
        let f = OpenOptions::new().write(true).open(&p).expect("open");
        f.write_all_at(&[b'x'; 32], H_BOOT as u64).expect("write");
        let st = MemStorage::new(vec![0; 8]);
        let (j, rep) = Journal::open(&p, U, mark(1), 8192, &st).expect("replay");
        assert!(rep.expect("report").stale_boot);
        assert_eq!(st.snapshot(), vec![0; 8], "a journal of another boot is not applied");
        j.remove();
    }

    #[test]
    fn the_file_is_preallocated_and_a_successor_is_never_unlinked() {
        use std::os::unix::fs::MetadataExt;
        let p = tmp("prealloc");
        let j = fresh(&p, U);
        let meta = std::fs::metadata(&p).expect("stat");
        assert!(meta.blocks() * 512 >= meta.len(), "holes: {} blocks for {} bytes", meta.blocks(), meta.len());
        // A successor's journal at the same path (this one was removed and made again).
        std::fs::remove_file(&p).expect("rm");
        std::fs::write(&p, b"").expect("successor");
        j.remove();
        assert!(p.exists(), "remove unlinked another process's journal");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn a_legacy_journal_with_records_is_detected_and_never_replayed() {
        let p = tmp("legacy");
        let mut b = vec![0u8; 8192];
        b[0..8].copy_from_slice(&LEGACY_MAGIC.to_le_bytes());
        b[24..32].copy_from_slice(&24u64.to_le_bytes());
        std::fs::write(&p, &b).expect("write");
        assert!(legacy_journal_pending(&p));
        assert!(matches!(Journal::open(&p, U, mark(1), 8192, &MemStorage::default()), Err(Qcow2Error::Corrupt(_))));
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn an_empty_journal_goes_with_its_drop_and_never_blocks_another_image() {
        let p = tmp("empty");
        drop(fresh(&p, U));
        assert!(!p.exists(), "an empty journal is removed when dropped");
        // One left empty by a crash (no Drop) is replaced, whatever image it was for.
        let j = fresh(&p, U);
        j.crash();
        let (j, rep) = Journal::open(&p, [6; 16], mark(1), 8192, &MemStorage::default()).expect("replaced");
        assert_eq!(rep.map(|r| (r.records, r.journal_found)), Some((0, true)), "found, and nothing to replay");
        drop(j);
        // None at all: nothing found.
        let _ = std::fs::remove_file(&p);
        let (j, rep) = Journal::open(&p, U, mark(1), 8192, &MemStorage::default()).expect("created");
        assert!(rep.is_none_or(|r| !r.journal_found));
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
        assert!(Journal::open(&p, U, mark(1), 8192, &MemStorage::default()).is_err());
        assert_eq!(std::fs::metadata(&victim).expect("victim").len(), 0, "a link's target was touched");
        std::fs::remove_file(&p).expect("rm link");
        // A file others may write.
        std::fs::write(&p, b"").expect("file");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        assert!(matches!(Journal::open(&p, U, mark(1), 8192, &MemStorage::default()), Err(Qcow2Error::Corrupt(_))));
        // Someone else's file.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: chown of our own test file.
        if unsafe { libc::chown(c.as_ptr(), 65534, 65534) } == 0 {
            assert!(matches!(Journal::open(&p, U, mark(1), 8192, &MemStorage::default()), Err(Qcow2Error::Corrupt(_))));
        }
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(&victim);
    }

    #[test]
    fn a_failed_write_back_after_a_seal_keeps_the_segment_it_must_clear() {
        // A record larger than a segment seals a fresh one (nothing used); the write-back that
        // unseals fails; its retry must clear the same segment, not reopen the other.
        let p = tmp("pending");
        let mut j = fresh(&p, U);
        assert!(!j.record(Class::RefTable, 0, &vec![1u8; 16384]), "larger than a segment");
        assert!(j.sealed());
        let (s1, _, unsealed) = j.rotate(2);
        assert!(unsealed);
        assert!(j.record(Class::L2, 8, &[2]));
        // Failed: nothing cleared. The retry covers the same segment and keeps the active one.
        let (s2, _, again) = j.rotate(2);
        assert_eq!((s2, again), (s1, false));
        j.crash();
        // Not durable: the sealed (empty) segment and the one after the seal; nothing refused.
        let st = MemStorage::new(vec![0; 64]);
        let (j, rep) = Journal::open(&p, U, mark(1), 8192, &st).expect("no refusal");
        assert_eq!(rep.expect("report").skipped_segments, 1);
        j.remove();
    }

    #[test]
    fn records_of_regions_a_write_back_published_are_not_written_again() {
        // 512 B clusters; the header names a refcount table at 4096 (one cluster) that names a
        // block at 8192. A journal (a sealed prefix) holds that block's zeroes, the whole table
        // as it was at its growth, and the header's fields for an older table: a write-back
        // published newer states of all three, which the records must not take back.
        let mut img = vec![0u8; 16384];
        img[20..24].copy_from_slice(&9u32.to_be_bytes());
        img[48..56].copy_from_slice(&4096u64.to_be_bytes());
        img[56..60].copy_from_slice(&1u32.to_be_bytes());
        img[4096..4104].copy_from_slice(&8192u64.to_be_bytes());
        img[4104..4112].copy_from_slice(&12288u64.to_be_bytes());
        img[8192..8704].fill(0xab);
        let p = tmp("superseded");
        let mut j = fresh(&p, U);
        j.record_zero(Class::Refcount, 8192, 512);
        j.record(Class::RefTable, 4096, &{
            let mut t = vec![0u8; 512];
            t[..8].copy_from_slice(&8192u64.to_be_bytes());
            t
        });
        let mut f = [0u8; 12];
        f[..8].copy_from_slice(&2048u64.to_be_bytes());
        j.record(Class::Header, 48, &f);
        // A block the table does not name yet: its zeroes are needed.
        j.record_zero(Class::Refcount, 12800, 512);
        j.crash();
        let st = MemStorage::new(img.clone());
        let (j, rep) = Journal::open(&p, U, mark(1), 8192, &st).expect("replay");
        let rep = rep.expect("report");
        assert_eq!((rep.records, rep.superseded), (1, 3));
        let after = st.snapshot();
        assert_eq!(after[..12288], img[..12288], "a published region was taken back");
        j.remove();
    }
}

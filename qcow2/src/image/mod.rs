//! An open qcow2 image: mapping guest ranges, allocating clusters, writing metadata back.
//!
//! Data never passes through here. Reads are *mapped* to host offsets (or zeroes, backing,
//! compressed clusters) and the caller moves the bytes; writes are mapped too, into the
//! cluster a zero-flagged entry still owns (in place, as QEMU), else into a new cluster (a
//! freed one whose release is durable, or one at the bump pointer), and linked into the L2
//! tables only once the caller reports the data has landed ([`Qcow2::write_done`]).
//! Metadata is cached and written back by [`Qcow2::flush_metadata`] in QEMU's order (the
//! host-crash contract); every change is also recorded in the journal before it can make a
//! completion visible (the daemon-crash contract, `journal.rs`). Both are stated in
//! docs/qcow2.md.
//!
//! This module opens the image and holds its state; the work is split by concern:
//! `cache` (L2 tables), `map` (reads), `write` (writes and linking), `zero` (zeroes and
//! discard), `refcount` (allocation and room checks), `writeback` (metadata write-back
//! order).

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::error::{corrupt, Qcow2Error, Result};
use crate::header::{autoclear, Header, Owner, MAX_REFTABLE_BYTES};
use crate::journal::{Class, Journal, ReplayReport};
use crate::stats::{CacheStats, ShardedCounter};
use crate::storage::Storage;
use crate::table::{decode_l2, get_refcount, L2Entry, COPIED, OFFSET_MASK, REFTABLE_OFFSET_MASK, ZERO};

mod cache;
mod map;
mod refcount;
mod write;
mod writeback;
mod zero;

#[cfg(test)]
mod tests;

/// How one piece of a guest range is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// At this host offset of the image.
    Data(u64),
    /// Reads as zeroes.
    Zero,
    /// Not allocated in this image: read the backing file (zeroes without one).
    Backing,
    /// In a compressed cluster (raw L2 entry); decompress with [`Qcow2::read_compressed`].
    Compressed(u64),
}

/// A guest range and where it lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedRange {
    /// Guest byte offset.
    pub guest: u64,
    /// Byte length.
    pub len: u64,
    /// Where the bytes are. For `Compressed`, the range starts `guest % cluster_size`
    /// bytes into the decompressed cluster.
    pub mapping: Mapping,
}

/// Options for [`Qcow2::open`].
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Refuse every write.
    pub read_only: bool,
    /// L2 cache budget in bytes (None: enough for the whole disk, capped at 32 MiB).
    pub l2_cache_bytes: Option<u64>,
    /// Host offsets at or past this read as zeroes until written (a regular file's end).
    /// `u64::MAX` when nothing is known (a block device).
    pub zeroes_from: u64,
    /// The metadata journal (daemon-crash contract); None: changes since the last write-back
    /// live only in memory. Ignored when read-only.
    pub journal: Option<JournalOptions>,
    /// Clean refcount blocks kept in memory (None: [`MAX_CACHED_REFBLOCKS`]).
    pub refcount_cache_blocks: Option<usize>,
}

/// Where an image's metadata journal lives (a file on tmpfs: see `journal.rs`).
#[derive(Clone, Debug)]
pub struct JournalOptions {
    /// The directory; the file is named by the image's uuid (`thinblk-<uuid>.journal`), and
    /// what an earlier process left there is replayed at open if it belongs to the image.
    pub dir: PathBuf,
    /// Bytes per segment (the file is twice this, preallocated).
    pub segment_bytes: usize,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions { read_only: false, l2_cache_bytes: None, zeroes_from: u64::MAX, journal: None, refcount_cache_blocks: None }
    }
}

/// Default L2 cache cap, as QEMU.
pub const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;

/// Releases (clusters given back) waiting for a durable write-back before the next
/// allocating request must first write metadata back: while write-backs keep failing
/// (storage down), retried writes would otherwise take a new cluster at every attempt and
/// move the allocation mark (and a thin volume's extensions) for nothing.
pub const MAX_PENDING_RELEASES: usize = 4096;

/// Refcount blocks kept in memory (besides dirty ones, which wait for their write-back).
/// Allocation touches the last few; an image whose entries lack the COPIED flag makes every
/// write look a refcount up, anywhere in the image: without a cap its blocks would all pile up.
pub const MAX_CACHED_REFBLOCKS: usize = 64;

/// How far ahead of the bump pointer the engine prepares host space: zeroes it where a fresh
/// cluster is not known to read zeroes (a block device, space a file already had), so that a
/// partial write into a new cluster needs no zeroing of its own (one call for many clusters
/// instead of two per cluster in the writer's path); allocates it where it does (a file's
/// sparse space), so that writes do not fill holes (docs/qcow2.md).
pub const ZERO_AHEAD: u64 = 1 << 20;

/// Something that can fill bytes of a guest cluster that a partial write does not cover.
pub trait BackingReader: Send + Sync {
    /// Reads `buf.len()` bytes of the backing disk at guest offset `offset` (zeroes past its end).
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()>;
}

struct L2Table {
    /// Shared with a write-back in progress (its snapshot); a change then copies it first.
    entries: Arc<Vec<u64>>,
    dirty: bool,
    /// Its contents are being written back: it must not be evicted (the disk copy may
    /// still be older than this one).
    flushing: bool,
    last_use: AtomicU64,
}

struct RefBlock {
    counts: Vec<u16>,
    dirty: bool,
    /// A copy of it is being written back: it must not be evicted (re-read from disk it
    /// could be older than that copy, and a failed write-back must find it to re-dirty it).
    flushing: bool,
}

/// A write target whose data is in flight and which is not yet linked into its L2 table.
struct Pending {
    host: u64,
    writers: u32,
    linked: bool,
    /// The cluster is the one the zero-flagged entry already owns (written in place): linking
    /// clears the flag; if nothing lands it stays as it was (no refcount change either way).
    in_place: bool,
    /// Its first writer is still filling the rest of the cluster (without the lock):
    /// other writers wait, or the fill could overwrite their data.
    filling: bool,
}

/// What a write to one guest cluster must do next.
enum WriteTarget {
    /// Write at this host cluster; `true` if it joined a pending allocation.
    Ready(u64, bool),
    /// Another writer is filling this new cluster: wait and retry.
    Wait,
    /// Fill the cluster `host` (old L2 entry `raw`) around the write, then publish it;
    /// `fresh`: it comes from the bump pointer (never written since open).
    Fill { host: u64, raw: u64, fresh: bool },
}

struct Meta {
    l1: Vec<u64>,
    l1_dirty: bool,
    l2: HashMap<u64, L2Table>,
    l2_capacity: usize,
    reftable: Vec<u64>,
    reftable_offset: u64,
    reftable_clusters: u64,
    reftable_dirty: bool,
    /// Earlier tables the header on disk may still name (a header write naming them was
    /// made or attempted): released only once a header naming the current one is durable.
    old_reftables: Vec<(u64, u64)>,
    /// A header write naming the current table was made or attempted (true at open).
    reftable_published: bool,
    /// Completions wait (write through) until the image's durable generation reaches this:
    /// records after a journal seal are replayable only over it.
    need_gen: u64,
    header_dirty: bool,
    refblocks: HashMap<u64, RefBlock>,
    next_free: u64,
    pending: HashMap<u64, Pending>,
    new_l2_since_flush: bool,
    tick: u64,
    /// Completed L2 write-backs: a table read without the lock is inserted only if none
    /// completed since the read began (else the read may predate the disk's copy).
    l2_writebacks: u64,
    /// The metadata journal (None: not kept).
    journal: Option<Journal>,
    /// Clusters released (refcount 0) whose release is not durable yet, with the journal
    /// generation they were released in.
    freed: Vec<(u64, u64)>,
    /// Released durably, but the journal may still hold records of their earlier use.
    limbo: Vec<(u64, u64)>,
    /// Journal generations up to this one have been cleared (u64::MAX without a journal).
    cleared_gen: u64,
    /// Free clusters below the bump pointer, reused (lowest first) before it moves.
    free: BTreeSet<u64>,
    /// Host clusters that lost a reference (a compressed cluster overwritten) by an L2 update
    /// not durable yet: their refcounts drop only after the write-back that carries the
    /// update, never before it (a crash in between leaks them, which is safe).
    unref: Vec<u64>,
    /// Host bytes `[start, end)` this engine zeroed while they were at or past the bump
    /// pointer ([`ZERO_AHEAD`]): a cluster handed out fresh from there reads zeroes.
    zeroed: (u64, u64),
    /// Sparse space to allocate (a hint): taken by the writer that set it, which allocates it
    /// once the lock is released.
    allocate_hint: Option<(u64, u64)>,
}

/// Told of the allocation mark's moves, inline in the allocator (keep it quick and lock-free:
/// it runs under the metadata lock).
pub trait AllocationObserver: Send + Sync {
    /// The allocation mark moved up to `end`.
    fn allocated(&self, end: u64);
    /// An allocation that would end at `needed` was refused: it passes `limit`.
    fn refused(&self, needed: u64, limit: u64);
}

/// An open qcow2 image.
pub struct Qcow2 {
    storage: Arc<dyn Storage>,
    /// The header as read at open; the backing file name and format and the owner
    /// extension's place follow [`Qcow2::change_backing`].
    header: RwLock<Header>,
    /// Fields of the header that never change while the image is open (read on the data path
    /// without a lock).
    version: u32,
    cluster_bits: u32,
    virtual_size: u64,
    l1_table_offset: u64,
    cluster_size: u64,
    l2_entries: u64,
    rb_entries: u64,
    read_only: Option<String>,
    zeroes_from: u64,
    backing: Option<Arc<dyn BackingReader>>,
    meta: RwLock<Meta>,
    /// Serializes write-backs, so a later one never writes older copies than an earlier one.
    flush_serial: std::sync::Mutex<()>,
    /// Signalled when a cluster fill ends.
    fill_done: (std::sync::Mutex<()>, std::sync::Condvar),
    allocation: AtomicU64,
    /// Allocations may not end past this host offset (the volume's size; `u64::MAX`: none).
    limit: AtomicU64,
    observer: std::sync::OnceLock<Arc<dyn AllocationObserver>>,
    l2_hits: Box<ShardedCounter>,
    l2_misses: Box<ShardedCounter>,
    /// Bumped at every L1/L2 change: a FLUSH may share an earlier FLUSH's write-back only
    /// while this has not moved.
    epoch: AtomicU64,
    /// What the journal replay at open did.
    replayed: Option<ReplayReport>,
    /// Set under the lock when the L2 cache overflowed or the journal passed half full: the
    /// next writer to drop the lock writes metadata back (`relieve`).
    relief: std::sync::atomic::AtomicBool,
    /// thinblk's owner extension as this open wrote it (None: read-only, or no room); its
    /// offset follows a header rewrite that moves it. Read and written under `flush_serial`
    /// when it matters (the header writes that use it).
    owner: RwLock<Option<Owner>>,
    /// Why the journal could not be kept for this image, if it could not.
    journal_off: Option<String>,
    /// The image's durable write-back generation (the owner extension's).
    gen: AtomicU64,
    /// The journal was sealed (a record did not fit) or completions wait for a generation:
    /// every completion first waits for a write-back that started after its change.
    gate: AtomicBool,
    /// Clean refcount blocks kept cached at most.
    refblock_cap: usize,
    /// Refcount blocks read from disk, and evicted, since open.
    refblock_reads: AtomicU64,
    refblock_evictions: AtomicU64,
}

/// Reads a table of big-endian offsets and checks every entry points at a whole cluster
/// inside the image.
fn read_table(st: &dyn Storage, what: &str, off: u64, bytes: u64, mask: u64, cs: u64, file_size: u64) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; bytes as usize];
    st.read_at(&mut raw, off)?;
    let table = be64s(&raw);
    for (i, e) in table.iter().enumerate() {
        let target = e & mask;
        if target % cs != 0 {
            return corrupt(format!("{what} entry {i} points to unaligned offset {target:#x}"));
        }
        if target != 0 && target.saturating_add(cs) > file_size {
            return corrupt(format!("{what} entry {i} points past the end of the image ({target:#x})"));
        }
    }
    Ok(table)
}

fn be64s(buf: &[u8]) -> Vec<u64> {
    buf.chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect()
}

fn to_be64s(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|e| e.to_be_bytes()).collect()
}

/// Reads the first cluster (at least 4 KiB) and parses the header in it.
pub(crate) fn read_header(storage: &dyn Storage) -> Result<(Vec<u8>, Header)> {
    let file_size = storage.size()?;
    let mut first = vec![0u8; 4096];
    storage.read_at(&mut first, 0)?;
    // Read the whole first cluster: extensions may use all of it.
    let cluster_bits = u32::from_be_bytes([first[20], first[21], first[22], first[23]]);
    if (crate::header::MIN_CLUSTER_BITS..=crate::header::MAX_CLUSTER_BITS).contains(&cluster_bits) && cluster_bits > 12 {
        first = vec![0u8; 1 << cluster_bits];
        storage.read_at(&mut first, 0)?;
    }
    let header = Header::parse(&first, file_size)?;
    Ok((first, header))
}

/// 16 random bytes (an image's identity).
fn random_uuid() -> [u8; 16] {
    let mut b = [0u8; 16];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // No entropy source: the time and pid still make it unique on this host.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        b.copy_from_slice(&(t ^ (u128::from(std::process::id()) << 96)).to_le_bytes());
    }
    b
}

fn poisoned() -> Qcow2Error {
    Qcow2Error::Io(std::io::Error::other("qcow2 metadata lock poisoned"))
}

impl Qcow2 {
    /// Opens and validates an image. A read-write open marks the image as in use by
    /// thinblk (its owner extension: identity, a new write-back generation, the in-use flag,
    /// durable before anything else is written) after replaying the journal an unclean stop
    /// left, if the replay rules allow (`journal.rs`), and gives back the clusters an unclean
    /// stop leaked.
    pub fn open(storage: Arc<dyn Storage>, opts: OpenOptions) -> Result<Qcow2> {
        let mut replayed = None;
        let mut journal = None;
        let mut owner = None;
        let mut journal_off = None;
        if !opts.read_only {
            let (first, header) = read_header(storage.as_ref())?;
            let trusted = header.version >= 3 && header.autoclear_features & autoclear::THINBLK != 0;
            if trusted && header.owner.is_some_and(|o| o.flags & Owner::MERGED != 0) {
                return Err(Qcow2Error::Merged);
            }
            if header.write_blocker().is_none() {
                let state = Self::take_ownership(storage.as_ref(), &opts, &first, &header)?;
                (journal, replayed, owner, journal_off) = state;
            }
        }
        let mut img = Self::open_replayed(storage, opts, journal, replayed)?;
        *img.owner.get_mut().unwrap_or_else(|e| e.into_inner()) = owner;
        img.journal_off = journal_off;
        if let Some(o) = owner {
            img.gen.store(o.generation, Ordering::SeqCst);
        }
        // The last process did not stop clean (a journal was left behind, or the in-use flag
        // says so after a host crash): allocations whose writes never completed, or whose
        // counts a power loss kept, hold clusters nothing references. Give them back.
        if img.replayed.as_ref().is_some_and(|r| r.unclean || r.records > 0 || r.stale_boot) && img.read_only.is_none() {
            let n = img.repair_leaks()?;
            if let Some(r) = img.replayed.as_mut() {
                r.leaks_repaired = n;
            }
        }
        Ok(img)
    }

    /// The read-write open's first steps: the journal (found by the image's uuid, replayed
    /// if it belongs to the image's present state, refused if not), then the owner extension
    /// rewritten with a new generation and the in-use flag (and every other autoclear bit
    /// cleared: persistent bitmaps are not kept up to date), synced.
    #[allow(clippy::type_complexity)]
    fn take_ownership(
        storage: &dyn Storage,
        opts: &OpenOptions,
        first: &[u8],
        header: &Header,
    ) -> Result<(Option<Journal>, Option<ReplayReport>, Option<Owner>, Option<String>)> {
        let trusted = header.version >= 3 && header.autoclear_features & autoclear::THINBLK != 0 && header.owner.is_some();
        let old = header.owner;
        let image_gen = old.map(|o| o.generation).unwrap_or(0);
        let unclean = trusted && old.is_some_and(|o| o.flags & Owner::IN_USE != 0);
        // A clean image gets a new identity at every open, so copies of it (cp, dd, an LV
        // copy, a template) never share a journal. One that was not closed clean, or that
        // another program changed, keeps its own: its journal must be found.
        let fresh_identity = trusted && !unclean && !opts.journal.as_ref().is_some_and(|j| {
            let hex = old.map(|o| o.uuid_hex()).unwrap_or_default();
            crate::journal::journal_has_records(&j.dir.join(crate::journal::journal_file_name(&hex)))
        });
        let uuid = match old {
            Some(o) if !fresh_identity => o.uuid,
            _ => random_uuid(),
        };
        let hex = Owner { offset: 0, uuid, generation: 0, flags: 0 }.uuid_hex();
        // Where the extension cannot go (version 2, no room), no journal is kept: decided
        // before one is made.
        let probe = Owner { offset: 0, uuid, generation: 0, flags: 0 };
        let fits = old.is_some() || header.with_owner(first, &probe, autoclear::THINBLK).is_some();
        let (mut journal, mut report) = match &opts.journal {
            Some(j) if fits => {
                let path = j.dir.join(crate::journal::journal_file_name(&hex));
                let mark = crate::journal::ImageMark { trusted, generation: image_gen };
                let (jn, rep) = Journal::open(&path, uuid, mark, j.segment_bytes, storage)?;
                (Some(jn), rep)
            }
            _ => (None, None),
        };
        // The replay may have rewritten header fields: build on what the image holds now.
        let reread;
        let (first, header) = if report.as_ref().is_some_and(|r| r.records > 0) {
            reread = read_header(storage)?;
            (&reread.0[..], &reread.1)
        } else {
            (first, header)
        };
        let head = journal.as_ref().map(|j| j.head_seen()).unwrap_or(0);
        let mut owner = Owner { offset: 0, uuid, generation: image_gen.max(head) + 1, flags: Owner::IN_USE };
        let mut journal_off = None;
        let current = trusted && header.autoclear_features == autoclear::THINBLK;
        match (current, old) {
            (true, Some(o)) => {
                // The uuid, generation and flags change in place: the generation and the flags
                // each as one aligned 8-byte word (never across a sector).
                owner.offset = o.offset;
                let d = owner.encode();
                if owner.uuid != o.uuid {
                    storage.write_at(&d[..16], o.offset)?;
                }
                storage.write_at(&d[16..24], o.offset + 16)?;
                storage.write_at(&d[24..32], o.offset + 24)?;
            }
            _ => match header.with_owner(first, &owner, autoclear::THINBLK) {
                Some((bytes, at)) => {
                    owner.offset = at;
                    storage.write_at(&bytes, 0)?;
                }
                None => {
                    if header.version >= 3 && header.autoclear_features != 0 {
                        storage.write_at(&0u64.to_be_bytes(), 88)?;
                    }
                    journal_off = Some(if header.version < 3 {
                        "a version 2 image has no autoclear bits to guard thinblk's owner extension (qemu-img amend -o compat=1.1 upgrades it)".to_string()
                    } else {
                        "no room for thinblk's owner extension in the first cluster".to_string()
                    });
                    if let Some(j) = journal.take() {
                        j.remove();
                    }
                    storage.flush()?;
                    if let Some(r) = report.as_mut() {
                        r.unclean |= unclean;
                    }
                    return Ok((None, report, None, journal_off));
                }
            },
        }
        storage.flush()?;
        if let Some(j) = journal.as_mut() {
            j.begin(owner.generation);
        }
        if unclean {
            report.get_or_insert_with(ReplayReport::default).unclean = true;
        }
        Ok((journal, report, Some(owner), journal_off))
    }

    /// Recounts references (like `qemu-img check`) and lowers every refcount that is higher
    /// than its references, releasing clusters that reach 0; writes the result back. Call
    /// only with nothing in flight (at open). Returns the clusters repaired; an image the
    /// check cannot walk is left as it is (0); one with corruptions is refused.
    pub fn repair_leaks(&self) -> Result<u64> {
        let report = match crate::check::check(self.storage.as_ref()) {
            Ok(r) => r,
            Err(_) => return Ok(0),
        };
        if report.undercounted > 0 {
            // Never served as it is: an allocation could hand out a cluster something still
            // references.
            return Err(Qcow2Error::Corrupt(format!(
                "{} cluster(s) referenced more often than counted after the unclean stop (first: {}); repair it with qemu-img check -r all before serving it",
                report.undercounted,
                report.messages.iter().find(|m| m.contains("referenced")).cloned().unwrap_or_default()
            )));
        }
        // Other findings (a COPIED flag a tool left out, ...) are left alone, as before.
        if report.corruptions > 0 || report.leaked.is_empty() {
            return Ok(0);
        }
        {
            let mut m = self.meta.write().map_err(|_| poisoned())?;
            for &(host, refs) in &report.leaked {
                if refs == 0 {
                    self.release(&mut m, host)?;
                } else {
                    self.set_refcount(&mut m, host, refs as u16)?;
                }
            }
        }
        self.flush_metadata()?;
        Ok(report.leaked.len() as u64)
    }

    /// The rest of [`Qcow2::open`], once the journal (if any) is replayed and held.
    fn open_replayed(storage: Arc<dyn Storage>, opts: OpenOptions, journal: Option<Journal>, replayed: Option<ReplayReport>) -> Result<Qcow2> {
        let file_size = storage.size()?;
        let (_, header) = read_header(storage.as_ref())?;
        let cs = header.cluster_size();
        let l1 = read_table(storage.as_ref(), "L1", header.l1_table_offset, u64::from(header.l1_size) * 8, OFFSET_MASK, cs, file_size)?;
        let rt_bytes = u64::from(header.refcount_table_clusters) * cs;
        let reftable =
            read_table(storage.as_ref(), "refcount table", header.refcount_table_offset, rt_bytes, REFTABLE_OFFSET_MASK, cs, file_size)?;
        let l2_tables_for_disk = l1.len().max(1) as u64;
        let cache_bytes = opts.l2_cache_bytes.unwrap_or((l2_tables_for_disk * cs).min(DEFAULT_L2_CACHE_MAX));
        let l2_capacity = (cache_bytes / cs).max(2) as usize;
        let read_only = if opts.read_only { Some("opened read-only".to_string()) } else { header.write_blocker() };
        let rb_entries = cs * 8 / (1u64 << header.refcount_order);
        let meta = Meta {
            l1,
            l1_dirty: false,
            l2: HashMap::new(),
            l2_capacity,
            reftable,
            reftable_offset: header.refcount_table_offset,
            reftable_clusters: u64::from(header.refcount_table_clusters),
            reftable_dirty: false,
            old_reftables: Vec::new(),
            reftable_published: true,
            need_gen: 0,
            header_dirty: false,
            refblocks: HashMap::new(),
            next_free: 0,
            pending: HashMap::new(),
            new_l2_since_flush: false,
            tick: 0,
            l2_writebacks: 0,
            cleared_gen: if journal.is_some() { 0 } else { u64::MAX },
            journal,
            freed: Vec::new(),
            limbo: Vec::new(),
            unref: Vec::new(),
            free: BTreeSet::new(),
            zeroed: (0, 0),
            allocate_hint: None,
        };
        let img = Qcow2 {
            storage,
            cluster_size: cs,
            l2_entries: header.l2_entries(),
            rb_entries,
            read_only,
            zeroes_from: opts.zeroes_from,
            backing: None,
            version: header.version,
            cluster_bits: header.cluster_bits,
            virtual_size: header.size,
            l1_table_offset: header.l1_table_offset,
            header: RwLock::new(header),
            meta: RwLock::new(meta),
            flush_serial: std::sync::Mutex::new(()),
            fill_done: (std::sync::Mutex::new(()), std::sync::Condvar::new()),
            allocation: AtomicU64::new(0),
            limit: AtomicU64::new(u64::MAX),
            observer: std::sync::OnceLock::new(),
            l2_hits: Box::default(),
            l2_misses: Box::default(),
            epoch: AtomicU64::new(0),
            replayed,
            relief: std::sync::atomic::AtomicBool::new(false),
            owner: RwLock::new(None),
            journal_off: None,
            gen: AtomicU64::new(0),
            gate: AtomicBool::new(false),
            refblock_cap: opts.refcount_cache_blocks.unwrap_or(MAX_CACHED_REFBLOCKS).max(1),
            refblock_reads: AtomicU64::new(0),
            refblock_evictions: AtomicU64::new(0),
        };
        let end = img.compute_end()?;
        {
            let mut m = img.meta.write().map_err(|_| poisoned())?;
            m.next_free = end;
        }
        img.allocation.store(end, Ordering::SeqCst);
        Ok(img)
    }

    /// Why no journal is kept for this image although one was asked for (a version 2 image,
    /// or no room for the owner extension).
    pub fn journal_unavailable(&self) -> Option<&str> {
        self.journal_off.as_deref()
    }

    /// The image's identity (thinblk's owner extension), once opened read-write.
    pub fn owner(&self) -> Option<Owner> {
        self.current_owner()
    }

    /// The owner extension as this open wrote it, at its current place.
    fn current_owner(&self) -> Option<Owner> {
        *self.owner.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Completions are waiting for write-backs: the journal filled (sealed), or its records
    /// since are replayable only once the next write-back is durable.
    pub fn write_through_active(&self) -> bool {
        self.gate.load(Ordering::SeqCst)
    }

    /// The image's durable write-back generation.
    pub fn generation(&self) -> u64 {
        self.gen.load(Ordering::SeqCst)
    }

    /// Records a metadata change in the journal (if one is kept). A record that cannot be
    /// made (the journal is sealed) closes the gate: completions then write through.
    fn jrecord(&self, m: &mut Meta, class: Class, offset: u64, bytes: Option<&[u8]>, len: u64) {
        if let Some(j) = m.journal.as_mut() {
            let ok = match bytes {
                Some(b) => j.record(class, offset, b),
                None => j.record_zero(class, offset, len),
            };
            if !ok {
                self.gate.store(true, Ordering::SeqCst);
            }
            if j.pressure() {
                self.relief.store(true, Ordering::Release);
            }
        }
    }

    /// While the gate is closed, a completion waits for a write-back that starts after its
    /// change (the journal may not hold it). One atomic load otherwise.
    pub(super) fn write_through_if_gated(&self) -> Result<()> {
        if self.gate.load(Ordering::SeqCst) {
            self.flush_metadata()?;
        }
        Ok(())
    }

    /// What the journal replay at open did (None: no journal was kept or found).
    pub fn replayed(&self) -> Option<&ReplayReport> {
        self.replayed.as_ref()
    }

    /// Moves at every L1/L2 change (for deciding whether a FLUSH may share another's sync).
    pub fn metadata_epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// L2 tables held in the cache now (bounded by the cache size, plus the tables of the
    /// requests in progress).
    pub fn cached_l2_tables(&self) -> usize {
        self.meta.read().map(|m| m.l2.len()).unwrap_or(0)
    }

    /// Refcount blocks read from disk and evicted from the cache since open.
    pub fn refcount_cache_stats(&self) -> (u64, u64) {
        (self.refblock_reads.load(Ordering::Relaxed), self.refblock_evictions.load(Ordering::Relaxed))
    }

    /// Refcount blocks held in memory now (at most [`MAX_CACHED_REFBLOCKS`] clean ones).
    pub fn cached_refblocks(&self) -> usize {
        self.meta.read().map(|m| m.refblocks.len()).unwrap_or(0)
    }

    /// Closes the image clean: writes every dirty table back in order, syncs, clears the
    /// in-use flag, and removes the journal (nothing in it is needed any more). On error the
    /// journal stays, for the next open.
    pub fn close(&self) -> Result<()> {
        self.close_with(0)
    }

    /// Closes like [`Qcow2::close`], leaving the image marked [`Owner::MERGED`]: an active
    /// commit's pivot, after which the image's writes go on in its base. A later read-write
    /// open by thinblk is refused ([`Qcow2Error::Merged`]); QEMU ignores the mark (and drops
    /// it at its own read-write open). Images without thinblk's extension carry no mark.
    pub fn close_merged(&self) -> Result<()> {
        self.close_with(Owner::MERGED)
    }

    fn close_with(&self, flags: u64) -> Result<()> {
        self.flush_metadata()?;
        self.storage.flush()?;
        // Serialised with the other header writes (a backing change may move the extension).
        let _serial = self.flush_serial.lock().map_err(|_| poisoned())?;
        if let Some(o) = self.current_owner() {
            let cleared = self.storage.write_at(&flags.to_be_bytes(), o.offset + 24).and_then(|()| self.storage.flush());
            if let Err(e) = cleared {
                // The flag may now read clear while this open goes on serving (a handover whose
                // write-back failed stays active): set it again, so that a crash after this is
                // never taken for a clean close (which would drop the journal's records).
                // Test: `a_close_that_fails_after_clearing_the_flag_sets_it_again`.
                let _ = self.storage.write_at(&Owner::IN_USE.to_be_bytes(), o.offset + 24);
                let _ = self.storage.flush();
                return Err(e.into());
            }
        }
        if let Ok(mut m) = self.meta.write() {
            if let Some(j) = m.journal.take() {
                j.remove();
            }
        }
        Ok(())
    }

    /// Changes the backing file name and format of this image, open read-write by this
    /// engine (the active top of a chain), as `qemu-img rebase -u -b NAME -F FORMAT` does
    /// (None: no backing file).
    ///
    /// Crash safety is [`crate::backing`]'s rule: the caller has made the new backing
    /// file's data durable (the commit base synced) and keeps the old chain intact until this
    /// returns; the header changes by one write at offset 0 within its first 512 bytes (the
    /// new name, when it lies further, written and synced before it), and the image is synced
    /// before this returns. Changes that cannot be made so are refused with
    /// [`Qcow2Error::HeaderRewrite`] before anything is written; a read-only image with
    /// [`Qcow2Error::ReadOnly`].
    ///
    /// The header is read again from the image and rewritten under the lock of the engine's
    /// own header writes (write-backs, the generation, the in-use flag at close), and the
    /// cached header and the owner extension's place follow, so every later header write keeps
    /// the new name. The backing chain the caller reads through is its own to reopen.
    pub fn change_backing(&self, backing: Option<(&str, &str)>) -> Result<()> {
        if let Some(why) = &self.read_only {
            return Err(Qcow2Error::ReadOnly(why.clone()));
        }
        let _serial = self.flush_serial.lock().map_err(|_| poisoned())?;
        let (first, on_disk) = read_header(self.storage.as_ref())?;
        let new = crate::backing::rewrite(self.storage.as_ref(), &first, &on_disk, backing)?;
        // The image has changed: the cache follows, even past a poisoned lock.
        if let (Some(o), Some(n)) = (self.owner.write().unwrap_or_else(|e| e.into_inner()).as_mut(), new.owner) {
            o.offset = n.offset;
        }
        let mut h = self.header.write().unwrap_or_else(|e| e.into_inner());
        h.backing_file = new.backing_file;
        h.backing_format = new.backing_format;
        if let (Some(o), Some(n)) = (h.owner.as_mut(), new.owner) {
            o.offset = n.offset;
        }
        Ok(())
    }

    /// Attaches the reader used to fill partial writes of clusters the backing file provides.
    pub fn set_backing(&mut self, backing: Arc<dyn BackingReader>) {
        self.backing = Some(backing);
    }

    /// Attaches the observer of the allocation mark (once; later calls are ignored).
    pub fn set_observer(&self, observer: Arc<dyn AllocationObserver>) {
        let _ = self.observer.set(observer);
    }

    /// Sets the host offset no allocation may pass (the volume's size); `u64::MAX` lifts it.
    /// A refused allocation fails with [`Qcow2Error::VolumeFull`] before any change.
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::SeqCst);
    }

    /// The current allocation limit.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::SeqCst)
    }

    /// Publishes the allocation mark and tells the observer when it moved.
    fn publish_allocation(&self, end: u64) {
        let old = self.allocation.swap(end, Ordering::SeqCst);
        if end != old {
            if let Some(o) = self.observer.get() {
                o.allocated(end);
            }
        }
    }

    /// The validated header as read at open, with the backing file name and format as
    /// [`Qcow2::change_backing`] left them.
    pub fn header(&self) -> Header {
        self.header.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.virtual_size
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// Why writes are refused, if they are.
    pub fn read_only_reason(&self) -> Option<&str> {
        self.read_only.as_deref()
    }

    /// L2 table cache hits and misses since open.
    pub fn cache_stats(&self) -> CacheStats {
        CacheStats { hits: self.l2_hits.get(), misses: self.l2_misses.get() }
    }

    /// The allocation high-water mark: one past the last host byte the image uses,
    /// metadata included. Exact at every instant; recomputed at open.
    pub fn allocation(&self) -> u64 {
        self.allocation.load(Ordering::SeqCst)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(e) if e <= self.virtual_size => Ok(()),
            _ => Err(Qcow2Error::OutOfRange { offset, len, size: self.virtual_size }),
        }
    }

}

/// The part of a guest range that falls in one cluster.
struct Piece {
    /// Guest byte offset of the piece.
    pos: u64,
    /// Guest cluster index.
    ci: u64,
    /// Offset of the piece inside its cluster.
    in_off: u64,
    /// Length of the piece.
    n: u64,
}

/// Splits `[offset, offset+len)` at cluster boundaries.
fn pieces(offset: u64, len: u64, cs: u64) -> impl Iterator<Item = Piece> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let in_off = pos % cs;
        let n = (cs - in_off).min(end - pos);
        let piece = Piece { pos, ci: pos / cs, in_off, n };
        pos += n;
        Some(piece)
    })
}

fn push_merged(out: &mut Vec<MappedRange>, r: MappedRange) {
    if let Some(last) = out.last_mut() {
        let contiguous = last.guest + last.len == r.guest;
        let same = match (last.mapping, r.mapping) {
            (Mapping::Data(a), Mapping::Data(b)) => a + last.len == b,
            (Mapping::Zero, Mapping::Zero) | (Mapping::Backing, Mapping::Backing) => true,
            _ => false,
        };
        if contiguous && same {
            last.len += r.len;
            return;
        }
    }
    out.push(r);
}

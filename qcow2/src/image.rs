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

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::error::{corrupt, Qcow2Error, Result};
use crate::header::{Header, MAX_REFTABLE_BYTES};
use crate::journal::{Class, Journal, ReplayReport};
use crate::stats::{CacheStats, ShardedCounter};
use crate::storage::Storage;
use crate::table::{decode_l2, get_refcount, L2Entry, COPIED, OFFSET_MASK, REFTABLE_OFFSET_MASK, ZERO};

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
}

/// Where an image's metadata journal lives (a file on tmpfs: see `journal.rs`).
#[derive(Clone, Debug)]
pub struct JournalOptions {
    /// The journal file; what an earlier process left there is replayed at open.
    pub path: PathBuf,
    /// Identifies the image (e.g. its device and inode): a journal of another image is refused.
    pub key: u64,
    /// Bytes per segment (the file is twice this).
    pub segment_bytes: usize,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions { read_only: false, l2_cache_bytes: None, zeroes_from: u64::MAX, journal: None }
    }
}

/// Default L2 cache cap, as QEMU.
pub const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;

/// Refcount blocks kept in memory (besides dirty ones, which wait for their write-back).
/// Allocation touches the last few; an image whose entries lack the COPIED flag makes every
/// write look a refcount up, anywhere in the image: without a cap its blocks would all pile up.
pub const MAX_CACHED_REFBLOCKS: usize = 64;

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
    /// Old table to release once the header points at the new one.
    old_reftable: Option<(u64, u64)>,
    header_dirty: bool,
    autoclear: u64,
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
}

/// Dirty metadata copied at one instant under the lock, written back without it. Because
/// every table is copied at the same instant, every L2 link in the copy has its refcount
/// in the copy too, so writing refcounts first keeps QEMU's ordering.
#[derive(Default)]
struct WriteBack {
    refblocks: Vec<(u64, u64, Vec<u8>)>,
    reftable: Option<(u64, Vec<u8>)>,
    header: Option<(u64, u32)>,
    old_reftable: Option<(u64, u64)>,
    /// L2 tables: snapshots shared with the cache (no copy unless changed meanwhile).
    l2s: Vec<(u64, Arc<Vec<u64>>)>,
    l1: Option<Vec<u8>>,
    new_l2: bool,
    /// Releases this write-back makes durable.
    freed: Vec<(u64, u64)>,
    /// References dropped by L2 updates in this write-back: decremented once it is durable.
    unref: Vec<u64>,
    /// The journal segment to clear once it is durable, and its generation.
    journal_clear: Option<(usize, u64)>,
}

impl WriteBack {
    fn is_empty(&self) -> bool {
        self.refblocks.is_empty() && self.reftable.is_none() && self.header.is_none() && self.l2s.is_empty() && self.l1.is_none()
    }
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
    header: Header,
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

fn poisoned() -> Qcow2Error {
    Qcow2Error::Io(std::io::Error::other("qcow2 metadata lock poisoned"))
}

impl Qcow2 {
    /// Opens and validates an image.
    pub fn open(storage: Arc<dyn Storage>, opts: OpenOptions) -> Result<Qcow2> {
        // Replay first: the header and tables read below must be the ones the records extend.
        let (journal, replayed) = match (&opts.journal, opts.read_only) {
            (Some(j), false) => {
                // The image's geometry goes into the key: a journal is never replayed into
                // another image that happens to sit at the same path and device.
                // Magic and version, then cluster bits, size, encryption, L1 size and offset
                // (bytes 20..48): nothing thinblk ever changes. FNV-1a, stable across builds.
                let mut h = [0u8; 48];
                storage.read_at(&mut h, 0)?;
                let key = h[..8]
                    .iter()
                    .chain(&h[20..48])
                    .fold(j.key, |k, b| (k ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
                let (journal, report) = Journal::open(&j.path, key, j.segment_bytes, storage.as_ref())?;
                (Some(journal), report)
            }
            _ => (None, None),
        };
        let held = journal.as_ref().map(|_| opts.journal.as_ref().map(|j| j.path.clone()));
        let mut img = Self::open_replayed(storage, opts, journal, replayed).inspect_err(|_| {
            // An image we cannot serve keeps no journal behind (it was replayed, or empty).
            if let Some(Some(p)) = &held {
                let _ = std::fs::remove_file(p);
            }
        })?;
        // A journal was left behind: the last process did not stop clean. Allocations whose
        // writes never completed hold clusters nothing references: give them back.
        if img.replayed.is_some() && img.read_only.is_none() {
            let n = img.repair_leaks()?;
            if let Some(r) = img.replayed.as_mut() {
                r.leaks_repaired = n;
            }
        }
        Ok(img)
    }

    /// Recounts references (like `qemu-img check`) and lowers every refcount that is higher
    /// than its references, releasing clusters that reach 0; writes the result back. Call
    /// only with nothing in flight (at open). Returns the clusters repaired; an image the
    /// check cannot walk is left as it is (0).
    pub fn repair_leaks(&self) -> Result<u64> {
        let report = match crate::check::check(self.storage.as_ref()) {
            Ok(r) => r,
            Err(_) => return Ok(0),
        };
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
        let mut first = vec![0u8; 4096];
        storage.read_at(&mut first, 0)?;
        // Read the whole first cluster: extensions may use all of it.
        let cluster_bits = u32::from_be_bytes([first[20], first[21], first[22], first[23]]);
        if (crate::header::MIN_CLUSTER_BITS..=crate::header::MAX_CLUSTER_BITS).contains(&cluster_bits)
            && cluster_bits > 12
        {
            first = vec![0u8; 1 << cluster_bits];
            storage.read_at(&mut first, 0)?;
        }
        let header = Header::parse(&first, file_size)?;
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
            old_reftable: None,
            header_dirty: false,
            autoclear: header.autoclear_features,
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
        };
        let img = Qcow2 {
            storage,
            cluster_size: cs,
            l2_entries: header.l2_entries(),
            rb_entries,
            read_only,
            zeroes_from: opts.zeroes_from,
            backing: None,
            header,
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
        };
        let end = img.compute_end()?;
        {
            let mut m = img.meta.write().map_err(|_| poisoned())?;
            m.next_free = end;
        }
        img.allocation.store(end, Ordering::SeqCst);
        Ok(img)
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

    /// Refcount blocks held in memory now (at most [`MAX_CACHED_REFBLOCKS`] clean ones).
    pub fn cached_refblocks(&self) -> usize {
        self.meta.read().map(|m| m.refblocks.len()).unwrap_or(0)
    }

    /// Closes the image clean: writes every dirty table back in order, syncs, and removes the
    /// journal (nothing in it is needed any more). On error the journal stays, for the next open.
    pub fn close(&self) -> Result<()> {
        self.flush_metadata()?;
        self.storage.flush()?;
        if let Ok(mut m) = self.meta.write() {
            if let Some(j) = m.journal.take() {
                j.remove();
            }
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

    /// Where the bump pointer would end after allocating `n` more clusters, counting the
    /// refcount blocks and refcount-table growth they bring (mirrors `cover`, changes nothing).
    fn end_after(&self, m: &Meta, n: u64) -> u64 {
        let cs = self.cluster_size;
        let mut end = m.next_free.saturating_add(n.saturating_mul(cs));
        let mut table_len = m.reftable.len() as u64;
        let mut added = 0u64;
        loop {
            let blocks = end.div_ceil(cs).div_ceil(self.rb_entries);
            if blocks > table_len {
                let entries = (blocks * 2).max(table_len * 2);
                let new_clusters = (entries * 8).div_ceil(cs);
                end = end.saturating_add(new_clusters * cs);
                table_len = new_clusters * cs / 8;
                continue;
            }
            let present = m.reftable.iter().take(blocks as usize).filter(|e| **e & REFTABLE_OFFSET_MASK != 0).count() as u64;
            let missing = blocks.saturating_sub(present + added);
            if missing == 0 {
                return end;
            }
            end = end.saturating_add(missing * cs);
            added += missing;
        }
    }

    /// Refuses (before any change) an allocation of `n` clusters that would pass the limit.
    fn check_room(&self, m: &Meta, n: u64) -> Result<()> {
        let limit = self.limit.load(Ordering::SeqCst);
        if limit == u64::MAX {
            return Ok(());
        }
        let needed = self.end_after(m, n);
        if needed > limit {
            if let Some(o) = self.observer.get() {
                o.refused(needed, limit);
            }
            return Err(Qcow2Error::VolumeFull { needed, limit });
        }
        Ok(())
    }

    /// Clusters a write of guest clusters `ci..ci+count` may still allocate: data clusters
    /// plus the L2 tables they may need.
    fn worst_case(&self, m: &Meta, ci: u64, count: u64) -> u64 {
        let first_l2 = ci / self.l2_entries;
        let last_l2 = (ci + count.max(1) - 1) / self.l2_entries;
        let tables = (first_l2..=last_l2)
            .filter(|&i| m.l1.get(i as usize).map(|e| e & OFFSET_MASK == 0).unwrap_or(false))
            .count() as u64;
        count + tables
    }

    /// The validated header as read at open.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.header.size
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

    /// The end of the last cluster with a non-zero refcount, and of every table the header
    /// and L1 point at (so a wrong refcount never lets us allocate over live metadata).
    fn compute_end(&self) -> Result<u64> {
        let cs = self.cluster_size;
        let h = &self.header;
        let mut end = cs;
        end = end.max(h.l1_table_offset + (u64::from(h.l1_size) * 8).div_ceil(cs) * cs);
        end = end.max(h.refcount_table_offset + u64::from(h.refcount_table_clusters) * cs);
        let m = self.meta.read().map_err(|_| poisoned())?;
        for e in &m.l1 {
            let off = e & OFFSET_MASK;
            if off != 0 {
                end = end.max(off + cs);
            }
        }
        let mut block = vec![0u8; cs as usize];
        // A crafted table may name one block many times: each is read once (a block read
        // before held no count, or the scan would have stopped), so the scan reads at most
        // what the file holds.
        let mut scanned = std::collections::HashSet::new();
        for (i, e) in m.reftable.iter().enumerate().rev() {
            let off = e & REFTABLE_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            end = end.max(off + cs);
            if !scanned.insert(off) {
                continue;
            }
            self.storage.read_at(&mut block, off)?;
            let last = (0..self.rb_entries as usize)
                .rev()
                .find(|&j| get_refcount(&block, j, h.refcount_order) != 0);
            if let Some(j) = last {
                end = end.max((i as u64 * self.rb_entries + j as u64 + 1) * cs);
                break;
            }
        }
        Ok(end)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(e) if e <= self.header.size => Ok(()),
            _ => Err(Qcow2Error::OutOfRange { offset, len, size: self.header.size }),
        }
    }

    fn read_l2_table(&self, off: u64) -> Result<Vec<u64>> {
        // Every table read goes into the cache: this is the one place a miss costs IO.
        self.l2_misses.add(1);
        let mut raw = vec![0u8; self.cluster_size as usize];
        self.storage.read_at(&mut raw, off)?;
        Ok(be64s(&raw))
    }

    /// Makes sure the L2 tables covering `[offset, offset+len)` are cached (counting those
    /// already cached as hits if `count_hits`). The IO happens with no lock held.
    fn preload_l2(&self, offset: u64, len: u64, count_hits: bool) -> Result<()> {
        let cs = self.cluster_size;
        let first = offset / cs / self.l2_entries;
        let last = (offset + len.max(1) - 1) / cs / self.l2_entries;
        for l1_idx in first..=last {
            loop {
                let (off, writebacks) = {
                    let m = self.meta.read().map_err(|_| poisoned())?;
                    let off = m.l1.get(l1_idx as usize).map(|e| e & OFFSET_MASK).unwrap_or(0);
                    if off == 0 {
                        break;
                    }
                    if m.l2.contains_key(&off) {
                        if count_hits {
                            self.l2_hits.add(1);
                        }
                        break;
                    }
                    (off, m.l2_writebacks)
                };
                let entries = self.read_l2_table(off)?;
                let mut m = self.meta.write().map_err(|_| poisoned())?;
                if m.l2.contains_key(&off) {
                    break;
                }
                // A write-back that completed while we read may have written this table
                // (loaded, changed and evicted by another queue): our copy may be older than
                // the disk's. Read again.
                if m.l2_writebacks == writebacks {
                    self.insert_l2(&mut m, off, entries, false)?;
                    break;
                }
            }
        }
        Ok(())
    }

    fn insert_l2(&self, m: &mut Meta, off: u64, entries: Vec<u64>, dirty: bool) -> Result<()> {
        if !Self::trim_cache(m, m.l2_capacity.saturating_sub(1)) {
            // Everything is dirty: hold it over capacity; the writer writes it back as soon
            // as it drops the lock (no IO under the lock here), then the cache shrinks.
            self.relief.store(true, Ordering::Release);
        }
        m.tick += 1;
        let t = L2Table { entries: Arc::new(entries), dirty, flushing: false, last_use: AtomicU64::new(m.tick) };
        m.l2.insert(off, t);
        Ok(())
    }

    /// Evicts the least recently used clean tables until at most `keep` are cached; false if
    /// only dirty (or in-write-back) tables are left above it.
    fn trim_cache(m: &mut Meta, keep: usize) -> bool {
        while m.l2.len() > keep {
            let victim = m
                .l2
                .iter()
                .filter(|(_, t)| !t.dirty && !t.flushing)
                .min_by_key(|(_, t)| t.last_use.load(Ordering::Relaxed))
                .map(|(k, _)| *k);
            match victim {
                Some(k) => {
                    m.l2.remove(&k);
                }
                None => return false,
            }
        }
        true
    }

    /// Writes metadata back if the L2 cache overflowed with dirty tables (then shrinks it to
    /// its size) or the journal is filling up. Call with no lock held.
    fn relieve(&self) -> Result<()> {
        // A plain load first: on the per-request path the flag is almost always clear, and a
        // read leaves the cache line shared between the queues.
        if self.relief.load(Ordering::Relaxed) && self.relief.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.flush_metadata() {
                self.relief.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Raw L2 entry of guest cluster `ci`, or None if its table is not cached.
    fn l2_entry(&self, m: &Meta, ci: u64) -> Option<u64> {
        let l1_idx = (ci / self.l2_entries) as usize;
        let off = m.l1.get(l1_idx).map(|e| e & OFFSET_MASK)?;
        if off == 0 {
            return Some(0);
        }
        let t = m.l2.get(&off)?;
        t.last_use.store(m.tick, Ordering::Relaxed);
        t.entries.get((ci % self.l2_entries) as usize).copied()
    }

    /// Raw L2 entry of guest cluster `ci`, loading its table under the (write) lock if it was
    /// evicted since the preload (rare; the one place IO runs under the lock).
    fn l2_entry_locked(&self, m: &mut Meta, ci: u64) -> Result<u64> {
        if let Some(r) = self.l2_entry(m, ci) {
            return Ok(r);
        }
        let l2_off = m.l1.get((ci / self.l2_entries) as usize).map(|e| e & OFFSET_MASK).unwrap_or(0);
        let entries = self.read_l2_table(l2_off)?;
        self.insert_l2(m, l2_off, entries, false)?;
        self.l2_entry(m, ci).ok_or_else(|| Qcow2Error::Corrupt(format!("L2 table of guest cluster {ci} not cached")))
    }

    fn entry_mapping(&self, raw: u64, ci: u64) -> Result<Mapping> {
        Ok(match decode_l2(raw, self.header.cluster_bits) {
            L2Entry::Unallocated => Mapping::Backing,
            L2Entry::Zero { .. } => Mapping::Zero,
            L2Entry::Compressed { .. } => Mapping::Compressed(raw),
            L2Entry::Normal { host, .. } => {
                if host % self.cluster_size != 0 {
                    return corrupt(format!("L2 entry of guest cluster {ci} unaligned ({host:#x})"));
                }
                Mapping::Data(host)
            }
        })
    }

    /// Maps a guest read of `len` bytes at `offset`, appending merged ranges to `out`.
    pub fn map_read(&self, offset: u64, len: u64, out: &mut Vec<MappedRange>) -> Result<()> {
        self.check_range(offset, len)?;
        // One L2 table's span at a time: a range needing more tables than the cache holds
        // would otherwise evict its own tables while loading them, forever.
        let span = self.cluster_size * self.l2_entries;
        let mut pos = offset;
        while pos < offset + len {
            let n = (span - pos % span).min(offset + len - pos);
            self.map_read_table(pos, n, out)?;
            pos += n;
        }
        Ok(())
    }

    /// Maps a range that one L2 table covers.
    fn map_read_table(&self, offset: u64, len: u64, out: &mut Vec<MappedRange>) -> Result<()> {
        let mut first = true;
        loop {
            let start = out.len();
            match self.try_map_read(offset, len, out)? {
                Some(tables) => {
                    // A lookup that had to load its tables counts as misses only.
                    if first {
                        self.l2_hits.add(tables);
                    }
                    return Ok(());
                }
                None => {
                    out.truncate(start);
                    self.preload_l2(offset, len, false)?;
                    first = false;
                }
            }
        }
    }

    /// Maps under the read lock; the number of L2 tables looked up, or None if one is
    /// missing from the cache.
    fn try_map_read(&self, offset: u64, len: u64, out: &mut Vec<MappedRange>) -> Result<Option<u64>> {
        let cs = self.cluster_size;
        let m = self.meta.read().map_err(|_| poisoned())?;
        let mut tables = 0;
        let mut last_table = u64::MAX;
        for Piece { pos, ci, in_off, n } in pieces(offset, len, cs) {
            let Some(raw) = self.l2_entry(&m, ci) else { return Ok(None) };
            if ci / self.l2_entries != last_table {
                last_table = ci / self.l2_entries;
                tables += 1;
            }
            let mapping = match self.entry_mapping(raw, ci)? {
                Mapping::Data(h) => Mapping::Data(h + in_off),
                other => other,
            };
            push_merged(out, MappedRange { guest: pos, len: n, mapping });
        }
        Ok(Some(tables))
    }

    /// Decompresses the cluster a `Mapping::Compressed` entry points to.
    pub fn read_compressed(&self, raw_entry: u64) -> Result<Vec<u8>> {
        let L2Entry::Compressed { host, len } = decode_l2(raw_entry, self.header.cluster_bits) else {
            return corrupt("not a compressed cluster entry");
        };
        let mut data = vec![0u8; len as usize];
        self.storage.read_at(&mut data, host)?;
        let cs = self.cluster_size as usize;
        let mut out = vec![0u8; cs];
        let mut state = miniz_oxide::inflate::core::DecompressorOxide::new();
        let (status, _in_used, produced) = miniz_oxide::inflate::core::decompress(
            &mut state,
            &data,
            &mut out,
            0,
            miniz_oxide::inflate::core::inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
        );
        use miniz_oxide::inflate::TINFLStatus;
        match status {
            TINFLStatus::Done | TINFLStatus::HasMoreOutput if produced == cs => Ok(out),
            TINFLStatus::Done | TINFLStatus::NeedsMoreInput | TINFLStatus::HasMoreOutput => {
                corrupt(format!("compressed cluster at {host:#x} inflates to {produced} of {cs} bytes"))
            }
            other => corrupt(format!("compressed cluster at {host:#x} does not inflate ({other:?})")),
        }
    }

    fn writable(&self) -> Result<()> {
        match &self.read_only {
            Some(r) => Err(Qcow2Error::ReadOnly(r.clone())),
            None => Ok(()),
        }
    }

    /// Maps a guest write of `len` bytes at `offset` to host ranges, allocating clusters that
    /// cannot be written in place. Returns the guest clusters whose allocation this write
    /// joined: pass them to [`Qcow2::write_done`] once the data has landed (or failed).
    pub fn map_write(&self, offset: u64, len: u64, out: &mut Vec<MappedRange>) -> Result<Vec<u64>> {
        let mut ticket = Vec::new();
        if !self.begin_update(offset, len)? {
            return Ok(ticket);
        }
        let start = out.len();
        match self.map_write_pieces(offset, len, out, &mut ticket) {
            Ok(()) => Ok(ticket),
            Err(e) => {
                // Clusters this request allocated before the failure go back (unlinked).
                out.truncate(start);
                self.write_done(&ticket, false)?;
                Err(e)
            }
        }
    }

    fn map_write_pieces(&self, offset: u64, len: u64, out: &mut Vec<MappedRange>, ticket: &mut Vec<u64>) -> Result<()> {
        let cs = self.cluster_size;
        let last_ci = (offset + len - 1) / cs;
        for Piece { pos, ci, in_off, n } in pieces(offset, len, cs) {
            let (host, pending) = loop {
                let target = {
                    let mut m = self.meta.write().map_err(|_| poisoned())?;
                    let t = self.cluster_for_write(&mut m, ci, in_off, n, last_ci - ci + 1)?;
                    self.publish_allocation(m.next_free);
                    t
                };
                match target {
                    WriteTarget::Ready(host, pending) => break (host, pending),
                    WriteTarget::Wait => self.wait_for_fill(),
                    WriteTarget::Fill { host, raw, fresh } => {
                        // The IO runs with no lock held; joiners wait on `filling`.
                        let filled = self.fill_cluster(raw, ci, host, in_off, n, fresh);
                        let mut m = self.meta.write().map_err(|_| poisoned())?;
                        if let Err(e) = filled {
                            // Nobody else can have joined: drop the allocation (a cluster
                            // written in place stays with its zero-flagged entry).
                            if let Some(p) = m.pending.remove(&ci) {
                                if !p.in_place {
                                    self.release(&mut m, host)?;
                                }
                            }
                            drop(m);
                            self.signal_fill();
                            return Err(e);
                        }
                        if let Some(p) = m.pending.get_mut(&ci) {
                            p.filling = false;
                        }
                        drop(m);
                        self.signal_fill();
                        break (host, true);
                    }
                }
            };
            if pending {
                ticket.push(ci);
            }
            push_merged(out, MappedRange { guest: pos, len: n, mapping: Mapping::Data(host + in_off) });
            // A request spanning many tables must not pile them up beyond the cache size.
            self.relieve()?;
        }
        Ok(())
    }

    /// Checks a write-like request and caches its L2 tables; false if there is nothing to do.
    fn begin_update(&self, offset: u64, len: u64) -> Result<bool> {
        self.writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(false);
        }
        self.preload_l2(offset, len, true)?;
        Ok(true)
    }

    fn wait_for_fill(&self) {
        let (mx, cv) = &self.fill_done;
        if let Ok(g) = mx.lock() {
            // Bounded: a fill that ends between our check and this wait is caught on retry.
            let _ = cv.wait_timeout(g, std::time::Duration::from_millis(1));
        }
    }

    fn signal_fill(&self) {
        let (mx, cv) = &self.fill_done;
        let _g = mx.lock();
        cv.notify_all();
    }

    /// What a write to guest cluster `ci` must do: write in place, join a pending
    /// allocation, wait for one being filled, or fill a fresh one.
    /// `remaining` counts the guest clusters of the request from `ci` on: the first
    /// allocation checks there is room for all of them, so a request is refused whole.
    fn cluster_for_write(&self, m: &mut Meta, ci: u64, in_off: u64, n: u64, remaining: u64) -> Result<WriteTarget> {
        if let Some(p) = m.pending.get_mut(&ci) {
            if p.filling {
                return Ok(WriteTarget::Wait);
            }
            p.writers += 1;
            return Ok(WriteTarget::Ready(p.host, true));
        }
        let raw = self.l2_entry_locked(m, ci)?;
        let old = decode_l2(raw, self.header.cluster_bits);
        let partial = in_off > 0 || n < self.cluster_size;
        match old {
            L2Entry::Normal { host, copied } => {
                if copied || self.refcount(m, host)? == 1 {
                    return Ok(WriteTarget::Ready(host, false));
                }
                return Err(Qcow2Error::ReadOnly(format!(
                    "guest cluster {ci} is shared (refcount > 1); copy-on-write of shared clusters is not implemented"
                )));
            }
            // A zero-flagged entry that still owns its cluster (a discard, write-zeroes or
            // preallocation): write into that cluster, as QEMU does. No allocation and no
            // refcount change, so churn never grows the image, and no refcount ever drops
            // while an L2 entry on disk may still point at its cluster. The rest of a partial
            // write is zeroed (the cluster may hold data from before the discard).
            L2Entry::Zero { host } if host != 0 && (raw & COPIED != 0 || self.refcount(m, host)? == 1) => {
                m.pending.insert(ci, Pending { host, writers: 1, linked: false, in_place: true, filling: partial });
                return Ok(if partial { WriteTarget::Fill { host, raw, fresh: false } } else { WriteTarget::Ready(host, true) });
            }
            _ => {}
        }
        self.check_room(m, self.worst_case(m, ci, remaining))?;
        self.ensure_l2_table(m, ci)?;
        let (host, fresh) = self.alloc_one(m)?;
        // Bytes of the new cluster the write does not cover must hold the old contents,
        // unless they are zeroes and the host is known to read zeroes there (a cluster from
        // the bump pointer past the file's size at open; a reused one may hold anything).
        let zero_known = fresh
            && host >= self.zeroes_from
            && (matches!(old, L2Entry::Zero { .. }) || (old == L2Entry::Unallocated && self.backing.is_none()));
        let filling = partial && !zero_known;
        m.pending.insert(ci, Pending { host, writers: 1, linked: false, in_place: false, filling });
        Ok(if filling { WriteTarget::Fill { host, raw, fresh } } else { WriteTarget::Ready(host, true) })
    }

    /// Writes the old contents of guest cluster `ci` around `[in_off, in_off+n)` into `host`
    /// (`fresh`: from the bump pointer, so zeroes past `zeroes_from` need no writing).
    fn fill_cluster(&self, raw: u64, ci: u64, host: u64, in_off: u64, n: u64, fresh: bool) -> Result<()> {
        let cs = self.cluster_size;
        let mut buf = match decode_l2(raw, self.header.cluster_bits) {
            L2Entry::Compressed { .. } => self.read_compressed(raw)?,
            L2Entry::Unallocated if self.backing.is_some() => {
                let mut b = vec![0u8; cs as usize];
                if let Some(bk) = &self.backing {
                    bk.read(&mut b, ci * cs)?;
                }
                b
            }
            _ => {
                // Zeroes: nothing to write where the host is known to read zeroes; elsewhere
                // the storage zeroes without moving data where it can.
                if fresh && host >= self.zeroes_from {
                    return Ok(());
                }
                if in_off > 0 {
                    self.storage.write_zeroes(host, in_off)?;
                }
                if in_off + n < cs {
                    self.storage.write_zeroes(host + in_off + n, cs - in_off - n)?;
                }
                return Ok(());
            }
        };
        let (a, b) = (in_off as usize, (in_off + n) as usize);
        if a > 0 {
            self.storage.write_at(&buf[..a], host)?;
        }
        if b < cs as usize {
            self.storage.write_at(&buf[b..], host + b as u64)?;
        }
        buf.clear();
        Ok(())
    }

    /// Reports that the data of a mapped write (its `ticket`) has landed (`ok`) or failed:
    /// new clusters are linked into their L2 tables only now.
    ///
    /// The link is recorded in the journal before this returns, so once the caller publishes
    /// the completion, a daemon crash cannot lose it (the daemon-crash contract).
    pub fn write_done(&self, ticket: &[u64], ok: bool) -> Result<()> {
        if ticket.is_empty() {
            return Ok(());
        }
        {
            let mut m = self.meta.write().map_err(|_| poisoned())?;
            for &ci in ticket {
                let Some(p) = m.pending.get_mut(&ci) else { continue };
                p.writers = p.writers.saturating_sub(1);
                let link = ok && !p.linked;
                if link {
                    p.linked = true;
                }
                let (host, finished, linked, in_place) = (p.host, p.writers == 0, p.linked, p.in_place);
                if link {
                    let old = self.l2_entry_locked(&mut m, ci)?;
                    self.set_l2_entry(&mut m, ci, host | COPIED)?;
                    if let L2Entry::Compressed { host: data, len } = decode_l2(old, self.header.cluster_bits) {
                        // Each host cluster the compressed bytes touch loses a reference.
                        let cs = self.cluster_size;
                        let mut c = data / cs * cs;
                        while c < data + len.max(1) {
                            m.unref.push(c);
                            c += cs;
                        }
                    }
                }
                if finished {
                    m.pending.remove(&ci);
                    if !linked && !in_place {
                        // Nothing landed: the new cluster is free again (reused once that is durable).
                        self.release(&mut m, host)?;
                    }
                }
            }
        }
        self.relieve()
    }

    /// Sets the refcount of an unreferenced cluster to 0; it is reused once the release is
    /// durable and the journal no longer holds records of its earlier use.
    fn release(&self, m: &mut Meta, host: u64) -> Result<()> {
        self.set_refcount(m, host, 0)?;
        let gen = m.journal.as_ref().map(|j| j.generation()).unwrap_or(0);
        m.freed.push((host, gen));
        Ok(())
    }

    /// Marks `[offset, offset+len)` as reading zeroes (discard / write-zeroes): whole clusters
    /// get the zero flag and keep their host cluster; partial clusters (and every cluster of
    /// a version 2 image, which has no zero flag) are mapped as writes and returned for the
    /// caller to zero on the host, with the ticket for [`Qcow2::write_done`]. The host
    /// clusters of whole clusters now flagged zero are appended to `flagged` (the caller may
    /// release their space on the host; they stay referenced).
    pub fn zero_range(
        &self,
        offset: u64,
        len: u64,
        partial: &mut Vec<MappedRange>,
        flagged: &mut Vec<u64>,
    ) -> Result<Vec<u64>> {
        let mut ticket = Vec::new();
        if !self.begin_update(offset, len)? {
            return Ok(ticket);
        }
        let start = partial.len();
        match self.zero_pieces(offset, len, partial, flagged, &mut ticket).and_then(|()| self.relieve()) {
            Ok(()) => Ok(ticket),
            Err(e) => {
                partial.truncate(start);
                self.write_done(&ticket, false)?;
                Err(e)
            }
        }
    }

    fn zero_pieces(
        &self,
        offset: u64,
        len: u64,
        partial: &mut Vec<MappedRange>,
        flagged: &mut Vec<u64>,
        ticket: &mut Vec<u64>,
    ) -> Result<()> {
        let cs = self.cluster_size;
        let v3 = self.header.version >= 3;
        let mut m = self.meta.write().map_err(|_| poisoned())?;
        for Piece { pos, ci, in_off, n } in pieces(offset, len, cs) {
            let whole = in_off == 0 && n == cs && !m.pending.contains_key(&ci);
            if whole && v3 {
                let raw = self.l2_entry_locked(&mut m, ci)?;
                let entry = decode_l2(raw, self.header.cluster_bits);
                let keep = match entry {
                    L2Entry::Normal { host, .. } => host | COPIED,
                    L2Entry::Zero { host } => host | if host != 0 { COPIED } else { 0 },
                    L2Entry::Compressed { .. } | L2Entry::Unallocated => 0,
                };
                if entry == L2Entry::Unallocated && self.backing.is_none() {
                    // Already reads as zeroes.
                } else if raw & crate::table::COMPRESSED != 0 {
                    // The compressed data's clusters stay referenced until unlinked; keep
                    // the image consistent by zeroing through a new cluster instead.
                    drop(m);
                    ticket.extend(self.map_write(pos, n, partial)?);
                    m = self.meta.write().map_err(|_| poisoned())?;
                } else if raw != (keep | ZERO) {
                    let l2_missing = m.l1.get((ci / self.l2_entries) as usize).map(|e| e & OFFSET_MASK == 0).unwrap_or(false);
                    if l2_missing {
                        self.check_room(&m, 1)?;
                    }
                    self.ensure_l2_table(&mut m, ci)?;
                    self.set_l2_entry(&mut m, ci, keep | ZERO)?;
                    if keep & OFFSET_MASK != 0 {
                        flagged.push(keep & OFFSET_MASK);
                    }
                }
            } else {
                // Partial cluster (or v2): write zeroes through the normal write path.
                drop(m);
                ticket.extend(self.map_write(pos, n, partial)?);
                m = self.meta.write().map_err(|_| poisoned())?;
            }
        }
        self.publish_allocation(m.next_free);
        Ok(())
    }

    /// Allocates every L2 table the virtual disk needs (metadata preallocation: guest
    /// clusters stay unallocated, but no write ever has to allocate a table).
    pub fn preallocate_l2_tables(&self) -> Result<()> {
        self.writable()?;
        let mut m = self.meta.write().map_err(|_| poisoned())?;
        for i in 0..m.l1.len() as u64 {
            self.ensure_l2_table(&mut m, i * self.l2_entries)?;
        }
        self.publish_allocation(m.next_free);
        drop(m);
        self.flush_metadata()
    }

    fn ensure_l2_table(&self, m: &mut Meta, ci: u64) -> Result<()> {
        let l1_idx = (ci / self.l2_entries) as usize;
        let Some(&l1e) = m.l1.get(l1_idx) else {
            return corrupt(format!("guest cluster {ci} beyond the L1 table"));
        };
        if l1e & OFFSET_MASK != 0 {
            if l1e & COPIED == 0 {
                return Err(Qcow2Error::ReadOnly("L2 table shared with a snapshot".into()));
            }
            return Ok(());
        }
        let (off, _) = self.alloc_one(m)?;
        self.insert_l2(m, off, vec![0u64; self.l2_entries as usize], true)?;
        m.l1[l1_idx] = off | COPIED;
        m.l1_dirty = true;
        m.new_l2_since_flush = true;
        let l1_at = self.header.l1_table_offset + l1_idx as u64 * 8;
        if let Some(j) = m.journal.as_mut() {
            j.record_zero(Class::L2, off, self.cluster_size);
            j.record(Class::L1, l1_at, &(off | COPIED).to_be_bytes());
        }
        self.epoch.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn set_l2_entry(&self, m: &mut Meta, ci: u64, value: u64) -> Result<()> {
        let l1_idx = (ci / self.l2_entries) as usize;
        let off = m.l1.get(l1_idx).map(|e| e & OFFSET_MASK).unwrap_or(0);
        if off == 0 {
            return corrupt(format!("no L2 table for guest cluster {ci}"));
        }
        if !m.l2.contains_key(&off) {
            let entries = self.read_l2_table(off)?;
            self.insert_l2(m, off, entries, false)?;
        }
        let idx = ci % self.l2_entries;
        let Some(t) = m.l2.get_mut(&off) else { return corrupt("L2 table vanished from the cache") };
        // Copy-on-write: a write-back in progress keeps its snapshot of the table.
        if let Some(e) = Arc::make_mut(&mut t.entries).get_mut(idx as usize) {
            *e = value;
            t.dirty = true;
            if let Some(j) = m.journal.as_mut() {
                j.record(Class::L2, off + idx * 8, &value.to_be_bytes());
                if j.pressure() {
                    self.relief.store(true, Ordering::Release);
                }
            }
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    fn refblock<'a>(&self, m: &'a mut Meta, idx: u64) -> Result<&'a mut RefBlock> {
        if !m.refblocks.contains_key(&idx) {
            let off = m.reftable.get(idx as usize).map(|e| e & REFTABLE_OFFSET_MASK).unwrap_or(0);
            if off == 0 {
                return corrupt(format!("no refcount block {idx}"));
            }
            let mut raw = vec![0u8; self.cluster_size as usize];
            self.storage.read_at(&mut raw, off)?;
            let counts = raw.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
            if m.refblocks.len() >= MAX_CACHED_REFBLOCKS {
                let clean: Vec<u64> = m.refblocks.iter().filter(|(_, b)| !b.dirty).map(|(i, _)| *i).take(m.refblocks.len() / 2 + 1).collect();
                if clean.is_empty() {
                    // All dirty: the next writer writes them back, then they can go.
                    self.relief.store(true, Ordering::Release);
                }
                for i in clean {
                    m.refblocks.remove(&i);
                }
            }
            m.refblocks.insert(idx, RefBlock { counts, dirty: false });
        }
        m.refblocks.get_mut(&idx).ok_or_else(|| Qcow2Error::Corrupt("refcount block cache".into()))
    }

    fn refcount(&self, m: &mut Meta, host: u64) -> Result<u64> {
        let c = host / self.cluster_size;
        let idx = c / self.rb_entries;
        let has = m.reftable.get(idx as usize).map(|e| e & REFTABLE_OFFSET_MASK != 0).unwrap_or(false);
        if !has {
            return Ok(0);
        }
        let rb = self.refblock(m, idx)?;
        Ok(u64::from(rb.counts.get((c % self.rb_entries) as usize).copied().unwrap_or(0)))
    }

    fn set_refcount(&self, m: &mut Meta, host: u64, value: u16) -> Result<()> {
        let c = host / self.cluster_size;
        let idx = c / self.rb_entries;
        let at = c % self.rb_entries;
        let rb = self.refblock(m, idx)?;
        if let Some(v) = rb.counts.get_mut(at as usize) {
            *v = value;
            rb.dirty = true;
            let block = m.reftable.get(idx as usize).map(|e| e & REFTABLE_OFFSET_MASK).unwrap_or(0);
            if let Some(j) = m.journal.as_mut() {
                j.record(Class::Refcount, block + at * 2, &value.to_be_bytes());
                if j.pressure() {
                    self.relief.store(true, Ordering::Release);
                }
            }
        }
        Ok(())
    }

    /// One cluster with refcount 1: the lowest free one (whose release is durable), else one
    /// at the bump pointer. `true` when it comes from the bump pointer (never written).
    fn alloc_one(&self, m: &mut Meta) -> Result<(u64, bool)> {
        if let Some(host) = m.free.pop_first() {
            self.set_refcount(m, host, 1)?;
            return Ok((host, false));
        }
        Ok((self.alloc_clusters(m, 1)?, true))
    }

    /// Allocates `n` contiguous clusters at the bump pointer, with refcount 1.
    fn alloc_clusters(&self, m: &mut Meta, n: u64) -> Result<u64> {
        let start = m.next_free;
        m.next_free = start
            .checked_add(n * self.cluster_size)
            .filter(|&e| e <= OFFSET_MASK)
            .ok_or_else(|| Qcow2Error::NoSpace("host offsets exhausted".into()))?;
        let extra = self.cover(m)?;
        for i in 0..n {
            self.set_refcount(m, start + i * self.cluster_size, 1)?;
        }
        for off in extra {
            self.set_refcount(m, off, 1)?;
        }
        self.publish_allocation(m.next_free);
        self.storage.reserve(m.next_free)?;
        Ok(start)
    }

    /// Makes sure refcount blocks (and a large enough refcount table) exist for every cluster
    /// below the bump pointer. Returns the metadata clusters it allocated, to be counted.
    fn cover(&self, m: &mut Meta) -> Result<Vec<u64>> {
        let cs = self.cluster_size;
        let mut extra = Vec::new();
        loop {
            let clusters = m.next_free.div_ceil(cs);
            let blocks = clusters.div_ceil(self.rb_entries);
            if blocks > m.reftable.len() as u64 {
                // Grow the refcount table: a new, larger copy at the bump pointer.
                let entries = (blocks * 2).max(m.reftable.len() as u64 * 2);
                let new_clusters = (entries * 8).div_ceil(cs);
                if new_clusters * cs > MAX_REFTABLE_BYTES {
                    return Err(Qcow2Error::NoSpace("refcount table at its maximum size".into()));
                }
                let off = m.next_free;
                m.next_free += new_clusters * cs;
                let mut table = m.reftable.clone();
                table.resize((new_clusters * cs / 8) as usize, 0);
                m.reftable = table;
                let old = (m.reftable_offset, m.reftable_clusters);
                if m.old_reftable.is_none() {
                    m.old_reftable = Some(old);
                } else {
                    // Grown twice before a flush: the intermediate table was never published.
                    for i in 0..old.1 {
                        self.release(m, old.0 + i * cs)?;
                    }
                }
                m.reftable_offset = off;
                m.reftable_clusters = new_clusters;
                m.reftable_dirty = true;
                m.header_dirty = true;
                if let Some(j) = m.journal.as_mut() {
                    j.record(Class::RefTable, off, &to_be64s(&m.reftable));
                    let mut f = [0u8; 12];
                    f[..8].copy_from_slice(&off.to_be_bytes());
                    f[8..].copy_from_slice(&(new_clusters as u32).to_be_bytes());
                    j.record(Class::Header, 48, &f);
                }
                for i in 0..new_clusters {
                    extra.push(off + i * cs);
                }
                continue;
            }
            let missing = (0..blocks).find(|&i| m.reftable[i as usize] & REFTABLE_OFFSET_MASK == 0);
            if let Some(i) = missing {
                let off = m.next_free;
                m.next_free += cs;
                m.reftable[i as usize] = off;
                m.reftable_dirty = true;
                m.refblocks.insert(i, RefBlock { counts: vec![0u16; self.rb_entries as usize], dirty: true });
                let entry_at = m.reftable_offset + i * 8;
                if let Some(j) = m.journal.as_mut() {
                    j.record_zero(Class::Refcount, off, cs);
                    j.record(Class::RefTable, entry_at, &off.to_be_bytes());
                }
                extra.push(off);
                continue;
            }
            return Ok(extra);
        }
    }

    /// Writes all dirty metadata back in QEMU's order:
    /// refcount blocks (and a relocated refcount table) → sync → header → sync →
    /// L2 tables → sync (only if an L1 entry now points at a new table) → L1 → sync.
    ///
    /// The metadata lock is held only to copy what is dirty; the IO runs without it, so
    /// mapping (reads of allocated clusters above all) goes on during a FLUSH.
    pub fn flush_metadata(&self) -> Result<()> {
        if self.read_only.is_some() {
            return Ok(());
        }
        let _serial = self.flush_serial.lock().map_err(|_| poisoned())?;
        // A pass that moved the refcount table frees the old one: one more pass writes that.
        for _ in 0..3 {
            let wb = {
                let mut m = self.meta.write().map_err(|_| poisoned())?;
                let wb = self.take_writeback(&mut m)?;
                if wb.is_empty() {
                    // (A release always dirties its refcount block; keep the list regardless.)
                    m.freed.extend(wb.freed);
                    m.unref.extend(wb.unref);
                    return Ok(());
                }
                wb
            };
            let result = self.write_back(&wb);
            let mut m = self.meta.write().map_err(|_| poisoned())?;
            for (off, _) in &wb.l2s {
                if let Some(t) = m.l2.get_mut(off) {
                    t.flushing = false;
                }
            }
            if let Err(e) = result {
                self.restore_dirty(&mut m, wb);
                return Err(e);
            }
            if !wb.l2s.is_empty() {
                m.l2_writebacks += 1;
            }
            self.written_back(&mut m, &wb);
            match wb.old_reftable {
                Some((off, n)) => {
                    for i in 0..n {
                        self.release(&mut m, off + i * self.cluster_size)?;
                    }
                }
                None => return Ok(()),
            }
        }
        Ok(())
    }

    /// After a durable write-back: its journal segment goes, releases it carried become
    /// reusable (once no journal record of their earlier use is left), and the cache shrinks
    /// back to its size.
    fn written_back(&self, m: &mut Meta, wb: &WriteBack) {
        if let (Some((seg, gen)), Some(j)) = (wb.journal_clear, m.journal.as_mut()) {
            j.clear(seg);
            m.cleared_gen = m.cleared_gen.max(gen);
        }
        m.limbo.extend(wb.freed.iter().copied());
        // The updates that dropped these references are durable: drop the counts now (the
        // next write-back writes them). A cluster reaching 0 is released like any other.
        for &host in &wb.unref {
            let Ok(rc) = self.refcount(m, host) else { continue };
            if rc == 0 {
                continue;
            }
            if self.set_refcount(m, host, (rc - 1) as u16).is_ok() && rc == 1 {
                let gen = m.journal.as_ref().map(|j| j.generation()).unwrap_or(0);
                m.freed.push((host, gen));
            }
        }
        let cleared = m.cleared_gen;
        let (ready, wait): (Vec<_>, Vec<_>) = m.limbo.drain(..).partition(|&(_, g)| g <= cleared);
        m.limbo = wait;
        m.free.extend(ready.into_iter().map(|(h, _)| h));
        let cap = m.l2_capacity;
        if !Self::trim_cache(m, cap) {
            // Dirtied again while this write-back ran: the next writer writes back again.
            self.relief.store(true, Ordering::Release);
        }
    }

    /// Copies everything dirty and marks it clean (L2 tables: under write-back).
    fn take_writeback(&self, m: &mut Meta) -> Result<WriteBack> {
        let mut wb = WriteBack { freed: std::mem::take(&mut m.freed), unref: std::mem::take(&mut m.unref), ..Default::default() };
        let mut idxs: Vec<u64> = m.refblocks.iter().filter(|(_, b)| b.dirty).map(|(i, _)| *i).collect();
        idxs.sort_unstable();
        for idx in idxs {
            let off = m.reftable.get(idx as usize).map(|e| e & REFTABLE_OFFSET_MASK).unwrap_or(0);
            if off == 0 {
                return corrupt(format!("dirty refcount block {idx} has no table entry"));
            }
            if let Some(b) = m.refblocks.get_mut(&idx) {
                wb.refblocks.push((idx, off, b.counts.iter().flat_map(|c| c.to_be_bytes()).collect()));
                b.dirty = false;
            }
        }
        if m.reftable_dirty {
            wb.reftable = Some((m.reftable_offset, to_be64s(&m.reftable)));
            m.reftable_dirty = false;
        }
        if self.header.version >= 3 && m.autoclear != 0 {
            m.autoclear = 0;
            m.header_dirty = true;
        }
        if m.header_dirty {
            wb.header = Some((m.reftable_offset, m.reftable_clusters as u32));
            wb.old_reftable = m.old_reftable.take();
            m.header_dirty = false;
        }
        let mut keys: Vec<u64> = m.l2.iter().filter(|(_, t)| t.dirty).map(|(k, _)| *k).collect();
        keys.sort_unstable();
        for off in keys {
            if let Some(t) = m.l2.get_mut(&off) {
                wb.l2s.push((off, t.entries.clone()));
                t.dirty = false;
                t.flushing = true;
            }
        }
        if m.l1_dirty {
            wb.l1 = Some(to_be64s(&m.l1));
            wb.new_l2 = m.new_l2_since_flush;
            m.l1_dirty = false;
            m.new_l2_since_flush = false;
        }
        // Everything recorded so far is in this copy: its segment may go once it is durable.
        if !wb.is_empty() {
            wb.journal_clear = m.journal.as_mut().map(|j| j.rotate());
        }
        Ok(wb)
    }

    /// After a failed write-back, everything it carried is dirty again.
    fn restore_dirty(&self, m: &mut Meta, wb: WriteBack) {
        m.freed.extend(wb.freed);
        m.unref.extend(wb.unref);
        for (idx, _, _) in &wb.refblocks {
            if let Some(b) = m.refblocks.get_mut(idx) {
                b.dirty = true;
            }
        }
        if wb.reftable.is_some() {
            m.reftable_dirty = true;
        }
        if wb.header.is_some() {
            m.header_dirty = true;
            if m.old_reftable.is_none() {
                m.old_reftable = wb.old_reftable;
            }
        }
        for (off, _) in &wb.l2s {
            if let Some(t) = m.l2.get_mut(off) {
                t.dirty = true;
            }
        }
        if wb.l1.is_some() {
            m.l1_dirty = true;
            m.new_l2_since_flush |= wb.new_l2;
        }
    }

    /// The IO of a write-back, in order, with no lock held.
    fn write_back(&self, wb: &WriteBack) -> Result<()> {
        // 1. Refcounts first: a cluster is never referenced before it is counted.
        for (_, off, raw) in &wb.refblocks {
            self.storage.write_at(raw, *off)?;
        }
        if let Some((off, raw)) = &wb.reftable {
            // A new refcount block is durable before the table names it (else the table
            // points at a block that does not count itself: refcount=0 reference=1).
            if !wb.refblocks.is_empty() {
                self.storage.flush()?;
            }
            self.storage.write_at(raw, *off)?;
        }
        // The same sync makes the data of every write linked in the copy durable before its
        // L2 entry is written: needed even when no refcount changed (a write into a cluster
        // allocated before the last write-back, or written in place).
        if !wb.refblocks.is_empty() || wb.reftable.is_some() || !wb.l2s.is_empty() {
            self.storage.flush()?;
        }
        // 2. The header, once the refcount table it points at is durable.
        if let Some((rt_off, rt_clusters)) = wb.header {
            let mut f = [0u8; 12];
            f[..8].copy_from_slice(&rt_off.to_be_bytes());
            f[8..].copy_from_slice(&rt_clusters.to_be_bytes());
            self.storage.write_at(&f, 48)?;
            if self.header.version >= 3 {
                // Autoclear features we do not maintain are dropped (as the spec requires).
                self.storage.write_at(&0u64.to_be_bytes(), 88)?;
            }
            self.storage.flush()?;
        }
        // 3. L2 tables, then the L1 entries that point at them (each serialized into one
        // reused buffer).
        let mut raw = Vec::with_capacity(self.cluster_size as usize);
        for (off, entries) in &wb.l2s {
            raw.clear();
            raw.extend(entries.iter().flat_map(|e| e.to_be_bytes()));
            self.storage.write_at(&raw, *off)?;
        }
        if let Some(raw) = &wb.l1 {
            if wb.new_l2 {
                self.storage.flush()?;
            }
            self.storage.write_at(raw, self.header.l1_table_offset)?;
        }
        if !wb.l2s.is_empty() || wb.l1.is_some() {
            self.storage.flush()?;
        }
        Ok(())
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

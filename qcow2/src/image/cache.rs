//! The L2 table cache: reading tables in, inserting them without losing a write-back race,
//! trimming, and relief when it overflows.
//!
//! Invariants (all under the metadata lock):
//! - a table that is `dirty` or `flushing` (a copy of it is being written back) is never
//!   evicted: read again from disk it could be older than the copy in flight, and a failed
//!   write-back must find it to mark it dirty again (`restore_dirty`);
//! - a table read without the lock is inserted only if no L2 write-back completed while the
//!   read was in flight (`l2_writebacks`), else it is read again;
//! - the cache holds at most its capacity of clean tables; over it, only dirty or flushing
//!   ones, and `relief` makes the next writer write them back.

use super::*;

impl Qcow2 {
    pub(super) fn read_l2_table(&self, off: u64) -> Result<Vec<u64>> {
        // Every table read goes into the cache: this is the one place a miss costs IO.
        self.l2_misses.add(1);
        let mut raw = vec![0u8; self.cluster_size as usize];
        self.storage.read_at(&mut raw, off)?;
        Ok(be64s(&raw))
    }

    /// Makes sure the L2 tables covering `[offset, offset+len)` are cached (counting those
    /// already cached as hits if `count_hits`). The IO happens with no lock held.
    pub(super) fn preload_l2(&self, offset: u64, len: u64, count_hits: bool) -> Result<()> {
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

    pub(super) fn insert_l2(&self, m: &mut Meta, off: u64, entries: Vec<u64>, dirty: bool) -> Result<()> {
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
    pub(super) fn trim_cache(m: &mut Meta, keep: usize) -> bool {
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
    pub(super) fn relieve(&self) -> Result<()> {
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
    pub(super) fn l2_entry(&self, m: &Meta, ci: u64) -> Option<u64> {
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
    pub(super) fn l2_entry_locked(&self, m: &mut Meta, ci: u64) -> Result<u64> {
        if let Some(r) = self.l2_entry(m, ci) {
            return Ok(r);
        }
        let l2_off = m.l1.get((ci / self.l2_entries) as usize).map(|e| e & OFFSET_MASK).unwrap_or(0);
        let entries = self.read_l2_table(l2_off)?;
        self.insert_l2(m, l2_off, entries, false)?;
        self.l2_entry(m, ci).ok_or_else(|| Qcow2Error::Corrupt(format!("L2 table of guest cluster {ci} not cached")))
    }
}

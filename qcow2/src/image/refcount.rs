//! Refcount blocks and allocation: the bump pointer, free clusters, room checks against the
//! volume limit, and L2 tables allocated on the way.
//!
//! Refcount-block cache invariants (under the metadata lock), the same as the L2 cache's:
//! - a block that is `dirty` or `flushing` (a copy of it is being written back) is never
//!   evicted, so it is never read again from disk while the disk may be older than memory,
//!   and a failed write-back re-dirties exactly the blocks it carried
//!   (`a_refcount_block_in_write_back_is_never_evicted_and_reread_stale`,
//!   `a_failed_write_back_re_dirties_the_refcount_blocks_it_carried`);
//! - at most `refblock_cap` ([`MAX_CACHED_REFBLOCKS`] unless the open asks otherwise) blocks
//!   stay cached, besides dirty and flushing ones; clean ones go lowest first, on a miss and
//!   when a new block is made.

use super::*;

impl Qcow2 {
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
    pub(super) fn check_room(&self, m: &Meta, n: u64) -> Result<()> {
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
    pub(super) fn worst_case(&self, m: &Meta, ci: u64, count: u64) -> u64 {
        let first_l2 = ci / self.l2_entries;
        let last_l2 = (ci + count.max(1) - 1) / self.l2_entries;
        let tables = (first_l2..=last_l2)
            .filter(|&i| m.l1.get(i as usize).map(|e| e & OFFSET_MASK == 0).unwrap_or(false))
            .count() as u64;
        count + tables
    }

    /// The end of the last cluster with a non-zero refcount, and of every table the header
    /// and L1 point at (so a wrong refcount never lets us allocate over live metadata).
    pub(super) fn compute_end(&self) -> Result<u64> {
        let cs = self.cluster_size;
        let h = self.header.read().map_err(|_| poisoned())?.clone();
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

    pub(super) fn ensure_l2_table(&self, m: &mut Meta, ci: u64) -> Result<()> {
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
        let l1_at = self.l1_table_offset + l1_idx as u64 * 8;
        self.jrecord(m, Class::L2, off, None, self.cluster_size);
        self.jrecord(m, Class::L1, l1_at, Some(&(off | COPIED).to_be_bytes()), 8);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    pub(super) fn set_l2_entry(&self, m: &mut Meta, ci: u64, value: u64) -> Result<()> {
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
            self.jrecord(m, Class::L2, off + idx * 8, Some(&value.to_be_bytes()), 8);
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
            self.refblock_reads.fetch_add(1, Ordering::Relaxed);
            let counts = raw.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
            if m.refblocks.len() >= self.refblock_cap {
                // Room for half the cache at once: a scan of many blocks does not evict at
                // every miss.
                self.trim_refblocks(m, self.refblock_cap / 2);
            }
            m.refblocks.insert(idx, RefBlock { counts, dirty: false, flushing: false });
        }
        m.refblocks.get_mut(&idx).ok_or_else(|| Qcow2Error::Corrupt("refcount block cache".into()))
    }

    /// Evicts clean refcount blocks that are not in a write-back, lowest first (allocation
    /// works at the end of the image), until at most `keep` are cached; if only dirty or
    /// flushing ones are left above it, the next writer writes them back (`relief`).
    fn trim_refblocks(&self, m: &mut Meta, keep: usize) {
        if m.refblocks.len() <= keep {
            return;
        }
        let mut clean: Vec<u64> = m.refblocks.iter().filter(|(_, b)| !b.dirty && !b.flushing).map(|(i, _)| *i).collect();
        clean.sort_unstable();
        clean.truncate(m.refblocks.len() - keep);
        if clean.len() < m.refblocks.len() - keep {
            self.relief.store(true, Ordering::Release);
        }
        self.refblock_evictions.fetch_add(clean.len() as u64, Ordering::Relaxed);
        for i in clean {
            m.refblocks.remove(&i);
        }
    }

    pub(super) fn refcount(&self, m: &mut Meta, host: u64) -> Result<u64> {
        let c = host / self.cluster_size;
        let idx = c / self.rb_entries;
        let has = m.reftable.get(idx as usize).map(|e| e & REFTABLE_OFFSET_MASK != 0).unwrap_or(false);
        if !has {
            return Ok(0);
        }
        let rb = self.refblock(m, idx)?;
        Ok(u64::from(rb.counts.get((c % self.rb_entries) as usize).copied().unwrap_or(0)))
    }

    pub(super) fn set_refcount(&self, m: &mut Meta, host: u64, value: u16) -> Result<()> {
        let c = host / self.cluster_size;
        let idx = c / self.rb_entries;
        let at = c % self.rb_entries;
        let rb = self.refblock(m, idx)?;
        if let Some(v) = rb.counts.get_mut(at as usize) {
            *v = value;
            rb.dirty = true;
            let block = m.reftable.get(idx as usize).map(|e| e & REFTABLE_OFFSET_MASK).unwrap_or(0);
            self.jrecord(m, Class::Refcount, block + at * 2, Some(&value.to_be_bytes()), 2);
        }
        Ok(())
    }

    /// One cluster with refcount 1: the lowest free one (whose release is durable), else one
    /// at the bump pointer. `true` when it comes from the bump pointer (never written).
    pub(super) fn alloc_one(&self, m: &mut Meta) -> Result<(u64, bool)> {
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
                if m.reftable_published {
                    // The header on disk may name it (a header write naming it was made or
                    // attempted): it goes only once a header naming a newer one is durable.
                    m.old_reftables.push(old);
                } else {
                    // Grown twice before any header write named it: nothing points at it.
                    for i in 0..old.1 {
                        self.release(m, old.0 + i * cs)?;
                    }
                }
                m.reftable_published = false;
                m.reftable_offset = off;
                m.reftable_clusters = new_clusters;
                m.reftable_dirty = true;
                m.header_dirty = true;
                let table = to_be64s(&m.reftable);
                self.jrecord(m, Class::RefTable, off, Some(&table), table.len() as u64);
                let mut f = [0u8; 12];
                f[..8].copy_from_slice(&off.to_be_bytes());
                f[8..].copy_from_slice(&(new_clusters as u32).to_be_bytes());
                self.jrecord(m, Class::Header, 48, Some(&f), 12);
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
                m.refblocks.insert(i, RefBlock { counts: vec![0u16; self.rb_entries as usize], dirty: true, flushing: false });
                self.trim_refblocks(m, self.refblock_cap);
                let entry_at = m.reftable_offset + i * 8;
                self.jrecord(m, Class::Refcount, off, None, cs);
                self.jrecord(m, Class::RefTable, entry_at, Some(&off.to_be_bytes()), 8);
                extra.push(off);
                continue;
            }
            return Ok(extra);
        }
    }
}

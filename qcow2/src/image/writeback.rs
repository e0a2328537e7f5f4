//! Metadata write-back in QEMU's order (refcounts before the tables that link them, L2 before
//! L1): the host-crash invariants live here.

use super::*;

/// Dirty metadata copied at one instant under the lock, written back without it. Because
/// every table is copied at the same instant, every L2 link in the copy has its refcount
/// in the copy too, so writing refcounts first keeps QEMU's ordering.
#[derive(Default)]
struct WriteBack {
    refblocks: Vec<(u64, u64, Vec<u8>)>,
    reftable: Option<(u64, Vec<u8>)>,
    header: Option<(u64, u32)>,
    /// Tables the header on disk may have named: released once this write-back is durable.
    old_reftables: Vec<(u64, u64)>,
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
    /// The image generation this write-back writes into the owner extension once durable
    /// (with a journal only: the journal's replay rules key on it).
    gen: Option<u64>,
}

impl WriteBack {
    fn is_empty(&self) -> bool {
        self.refblocks.is_empty() && self.reftable.is_none() && self.header.is_none() && self.l2s.is_empty() && self.l1.is_none()
    }
}

impl Qcow2 {
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
        // A pass that moved the refcount table frees the old one, and a pass that carried
        // unlinks of compressed clusters drops their counts only once it is durable: one more
        // pass writes each (so a FLUSH or close leaves nothing of its own writes dirty).
        for _ in 0..4 {
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
            for (idx, _, _) in &wb.refblocks {
                if let Some(b) = m.refblocks.get_mut(idx) {
                    b.flushing = false;
                }
            }
            if let Err(e) = result {
                self.restore_dirty(&mut m, wb);
                return Err(e);
            }
            if !wb.l2s.is_empty() {
                m.l2_writebacks += 1;
            }
            if let Some(g) = wb.gen {
                self.gen.store(g, Ordering::SeqCst);
            }
            self.written_back(&mut m, &wb);
            if self.gate.load(Ordering::SeqCst) {
                let sealed = m.journal.as_ref().is_some_and(|j| j.sealed());
                if !sealed && m.need_gen <= self.gen.load(Ordering::SeqCst) {
                    self.gate.store(false, Ordering::SeqCst);
                }
            }
            if wb.old_reftables.is_empty() && wb.unref.is_empty() {
                return Ok(());
            }
            for &(off, n) in &wb.old_reftables {
                for i in 0..n {
                    self.release(&mut m, off + i * self.cluster_size)?;
                }
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
                b.flushing = true;
            }
        }
        if m.reftable_dirty {
            wb.reftable = Some((m.reftable_offset, to_be64s(&m.reftable)));
            m.reftable_dirty = false;
        }
        if m.header_dirty {
            wb.header = Some((m.reftable_offset, m.reftable_clusters as u32));
            wb.old_reftables = std::mem::take(&mut m.old_reftables);
            m.reftable_published = true;
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
            let next = self.gen.load(Ordering::SeqCst) + 1;
            if let Some(j) = m.journal.as_mut() {
                let (seg, seq, unsealed) = j.rotate(next);
                wb.journal_clear = Some((seg, seq));
                if self.current_owner().is_some() {
                    wb.gen = Some(next);
                }
                if unsealed {
                    // Records from here on are replayable only over `next`: completions wait
                    // for it (the gate stays closed until it is durable).
                    m.need_gen = m.need_gen.max(next);
                }
            }
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
            m.old_reftables.extend(wb.old_reftables);
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
            self.storage.write_at(raw, self.l1_table_offset)?;
        }
        if !wb.l2s.is_empty() || wb.l1.is_some() {
            self.storage.flush()?;
        }
        // 4. The generation, once everything above is durable (no sync of its own: a daemon
        // crash keeps it, and after a host crash the journal is gone anyway).
        if let (Some(g), Some(o)) = (wb.gen, self.current_owner()) {
            self.storage.write_at(&g.to_be_bytes(), o.offset + 16)?;
        }
        Ok(())
    }
}

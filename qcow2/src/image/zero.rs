//! Write-zeroes and discard: zero flags and released clusters.

use super::*;

impl Qcow2 {
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
        match self.zero_pieces(offset, len, partial, flagged, &mut ticket).and_then(|()| self.relieve()).and_then(|()| self.write_through_if_gated()) {
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
        let v3 = self.version >= 3;
        let mut m = self.meta.write().map_err(|_| poisoned())?;
        for Piece { pos, ci, in_off, n } in pieces(offset, len, cs) {
            let whole = in_off == 0 && n == cs && !m.pending.contains_key(&ci);
            if whole && v3 {
                let raw = self.l2_entry_locked(&mut m, ci)?;
                let entry = decode_l2(raw, self.cluster_bits);
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
}

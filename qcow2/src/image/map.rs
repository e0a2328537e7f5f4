//! Read mapping: where each piece of a guest range lives (data, zeroes, backing, compressed).

use super::*;

impl Qcow2 {
    fn entry_mapping(&self, raw: u64, ci: u64) -> Result<Mapping> {
        Ok(match decode_l2(raw, self.cluster_bits) {
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
        let L2Entry::Compressed { host, len } = decode_l2(raw_entry, self.cluster_bits) else {
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
}

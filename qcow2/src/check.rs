//! Consistency check: recompute every cluster's references and compare with the stored
//! refcounts, like `qemu-img check` (corruptions, leaks, image end offset).

use crate::error::Result;
use crate::header::Header;
use crate::storage::Storage;
use crate::table::{decode_l2, get_refcount, L2Entry, COPIED, OFFSET_MASK, REFTABLE_OFFSET_MASK};

/// Most messages kept in a report.
const MAX_MESSAGES: usize = 100;

/// What a check found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Refcounts lower than the references, references past the end, bad flags.
    pub corruptions: u64,
    /// Clusters with a refcount but no reference.
    pub leaks: u64,
    /// The first problems, in words.
    pub messages: Vec<String>,
    /// One past the last cluster with a non-zero refcount (the image's allocation).
    pub image_end_offset: u64,
    /// Guest clusters with data in the active L1/L2 tables.
    pub allocated_clusters: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Leaked clusters (host offset, how many references it has), at most [`MAX_LEAKS_LISTED`].
    pub leaked: Vec<(u64, u64)>,
    /// Clusters referenced more often than their refcount says (among the corruptions): an
    /// allocator trusting the counts would hand them out while still in use.
    pub undercounted: u64,
}

/// Leaked clusters [`CheckReport::leaked`] lists at most.
pub const MAX_LEAKS_LISTED: usize = 1 << 20;

impl CheckReport {
    fn problem(&mut self, corruption: bool, msg: String) {
        if corruption {
            self.corruptions += 1;
        } else {
            self.leaks += 1;
        }
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(msg);
        }
    }

    /// Exit code as `qemu-img check`: 0 clean, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

struct Walker<'a> {
    storage: &'a dyn Storage,
    h: Header,
    cs: u64,
    file_clusters: u64,
    expected: Vec<u32>,
    report: CheckReport,
}

fn read_u64s(storage: &dyn Storage, off: u64, len: u64) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; len as usize];
    storage.read_at(&mut raw, off)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect())
}

impl Walker<'_> {
    fn add(&mut self, what: &str, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = off / self.cs;
        let last = (off + len - 1) / self.cs;
        for c in first..=last {
            match self.expected.get_mut(c as usize) {
                Some(n) => *n = n.saturating_add(1),
                None => {
                    let msg = format!("{what} at {:#x} is past the end of the image", c * self.cs);
                    self.report.problem(true, msg);
                    return;
                }
            }
        }
    }

    /// Walks one L1 table (active or a snapshot's) and everything it references.
    fn walk_l1(&mut self, l1_off: u64, l1_size: u64, active: bool) -> Result<Vec<(u64, u64, bool)>> {
        self.add("L1 table", l1_off, l1_size * 8);
        let l1 = read_u64s(self.storage, l1_off, l1_size * 8)?;
        let mut copied_checks = Vec::new();
        for (i, e) in l1.iter().enumerate() {
            let l2_off = e & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            if l2_off % self.cs != 0 {
                self.report.problem(true, format!("L1 entry {i}: unaligned L2 table offset {l2_off:#x}"));
                continue;
            }
            if l2_off / self.cs >= self.file_clusters {
                self.report.problem(true, format!("L1 entry {i}: L2 table {l2_off:#x} past the end"));
                continue;
            }
            self.add("L2 table", l2_off, self.cs);
            if active {
                copied_checks.push((l2_off, 0, e & COPIED != 0));
            }
            let l2 = read_u64s(self.storage, l2_off, self.cs)?;
            for (j, raw) in l2.iter().enumerate() {
                let guest = (i as u64 * (self.cs / 8) + j as u64) * self.cs;
                match decode_l2(*raw, self.h.cluster_bits) {
                    L2Entry::Unallocated => {}
                    L2Entry::Zero { host } => {
                        if host != 0 {
                            self.add("preallocated zero cluster", host, self.cs);
                        }
                    }
                    L2Entry::Normal { host, copied } => {
                        if host % self.cs != 0 {
                            self.report.problem(true, format!("guest {guest:#x}: unaligned data cluster {host:#x}"));
                            continue;
                        }
                        self.add("data cluster", host, self.cs);
                        if active {
                            self.report.allocated_clusters += 1;
                            copied_checks.push((host, guest, copied));
                        }
                    }
                    L2Entry::Compressed { host, len } => {
                        self.add("compressed cluster", host, len.max(1));
                        if active {
                            self.report.allocated_clusters += 1;
                        }
                    }
                }
            }
        }
        Ok(copied_checks)
    }

    /// Counts the persistent bitmaps' clusters (directory, tables, data) as references, as
    /// QEMU does while their autoclear bit says they are consistent: a repair must never free
    /// them.
    fn walk_bitmaps(&mut self, b: crate::header::Bitmaps) -> Result<()> {
        let file_end = self.file_clusters * self.cs;
        if b.directory_size == 0 || b.directory_size > 64 << 20 || b.directory_offset.saturating_add(b.directory_size) > file_end {
            self.report.problem(true, format!("bitmap directory {:#x} ({} bytes) out of the image", b.directory_offset, b.directory_size));
            return Ok(());
        }
        self.add("bitmap directory", b.directory_offset, b.directory_size);
        let mut dir = vec![0u8; b.directory_size as usize];
        self.storage.read_at(&mut dir, b.directory_offset)?;
        let be32 = |d: &[u8], at: usize| u32::from_be_bytes([d[at], d[at + 1], d[at + 2], d[at + 3]]);
        let mut at = 0usize;
        // QEMU's bounds: 65535 bitmaps, 2^27 table entries each; and at most 2^27 entries read
        // in all, so a crafted directory cannot make the check read (or allocate) without end.
        let mut budget: u64 = 1 << 27;
        for n in 0..b.count.min(65535) {
            if at + 24 > dir.len() {
                self.report.problem(true, format!("bitmap {n}: directory entry past the directory"));
                break;
            }
            let table = u64::from_be_bytes(dir[at..at + 8].try_into().unwrap_or([0; 8]));
            let entries = u64::from(be32(&dir, at + 8));
            let name = u64::from(u16::from_be_bytes([dir[at + 18], dir[at + 19]]));
            let extra = u64::from(be32(&dir, at + 20));
            if entries > budget.min(0x800_0000) {
                self.report.problem(true, format!("bitmap {n}: table of {entries} entries"));
                break;
            }
            budget -= entries;
            if table % self.cs != 0 || table.saturating_add(entries * 8) > file_end {
                self.report.problem(true, format!("bitmap {n}: bad table {table:#x} ({entries} entries)"));
            } else if entries > 0 {
                self.add("bitmap table", table, entries * 8);
                for e in read_u64s(self.storage, table, entries * 8)? {
                    let data = e & 0x00ff_ffff_ffff_fe00;
                    if data != 0 {
                        self.add("bitmap data", data, self.cs);
                    }
                }
            }
            at += (24 + extra + name).div_ceil(8) as usize * 8;
        }
        Ok(())
    }

    fn walk_snapshots(&mut self) -> Result<()> {
        let mut off = self.h.snapshots_offset;
        let start = off;
        for n in 0..self.h.nb_snapshots {
            let mut fixed = [0u8; 40];
            self.storage.read_at(&mut fixed, off)?;
            let l1_off = u64::from_be_bytes(fixed[0..8].try_into().unwrap_or([0; 8]));
            let l1_size = u64::from(u32::from_be_bytes(fixed[8..12].try_into().unwrap_or([0; 4])));
            let id_len = u64::from(u16::from_be_bytes([fixed[12], fixed[13]]));
            let name_len = u64::from(u16::from_be_bytes([fixed[14], fixed[15]]));
            let extra = u64::from(u32::from_be_bytes(fixed[36..40].try_into().unwrap_or([0; 4])));
            let past_end = l1_off.saturating_add(l1_size * 8) > self.file_clusters * self.cs;
            if l1_off % self.cs != 0 || l1_size > crate::header::MAX_L1_ENTRIES || past_end {
                self.report.problem(true, format!("snapshot {n}: bad L1 table {l1_off:#x} ({l1_size} entries)"));
            } else {
                self.walk_l1(l1_off, l1_size, false)?;
            }
            off += (40 + extra + id_len + name_len).div_ceil(8) * 8;
        }
        self.add("snapshot table", start, off - start);
        Ok(())
    }
}

/// Checks the image on `storage`. An `Err` means the check itself could not run (the
/// header is unreadable); problems found are in the report.
pub fn check(storage: &dyn Storage) -> Result<CheckReport> {
    let file_size = storage.size()?;
    let mut first = vec![0u8; 4096];
    storage.read_at(&mut first, 0)?;
    let mut h = Header::parse(&first, file_size);
    if let Ok(hh) = &h {
        if hh.cluster_size() > 4096 {
            first = vec![0u8; hh.cluster_size() as usize];
            storage.read_at(&mut first, 0)?;
            h = Header::parse(&first, file_size);
        }
    }
    let h = h?;
    let cs = h.cluster_size();
    let file_clusters = file_size.div_ceil(cs);
    let mut w = Walker {
        storage,
        cs,
        file_clusters,
        expected: vec![0u32; file_clusters as usize],
        report: CheckReport { total_clusters: h.size.div_ceil(cs), ..Default::default() },
        h: h.clone(),
    };
    w.add("header", 0, cs);
    let copied = w.walk_l1(h.l1_table_offset, u64::from(h.l1_size), true)?;
    if h.nb_snapshots > 0 {
        w.walk_snapshots()?;
    }
    if let Some(b) = h.bitmaps.filter(|_| h.autoclear_features & crate::header::autoclear::BITMAPS != 0) {
        w.walk_bitmaps(b)?;
    }
    let rt_len = u64::from(h.refcount_table_clusters) * cs;
    w.add("refcount table", h.refcount_table_offset, rt_len);
    let reftable = read_u64s(storage, h.refcount_table_offset, rt_len)?;
    let rb_entries = cs * 8 / (1u64 << h.refcount_order);
    let mut stored = vec![0u64; file_clusters as usize];
    let mut block = vec![0u8; cs as usize];
    let mut highest = None;
    for (i, e) in reftable.iter().enumerate() {
        let off = e & REFTABLE_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if off % cs != 0 || off / cs >= file_clusters {
            w.report.problem(true, format!("refcount block {i} at bad offset {off:#x}"));
            continue;
        }
        w.add("refcount block", off, cs);
        storage.read_at(&mut block, off)?;
        for j in 0..rb_entries {
            let v = get_refcount(&block, j as usize, h.refcount_order);
            if v == 0 {
                continue;
            }
            let c = i as u64 * rb_entries + j;
            highest = Some(c);
            match stored.get_mut(c as usize) {
                Some(s) => *s = v,
                None => w.report.problem(false, format!("refcount {v} for cluster {:#x} past the end of the image", c * cs)),
            }
        }
    }
    let mut report = std::mem::take(&mut w.report);
    for (c, (&s, &e)) in stored.iter().zip(w.expected.iter()).enumerate() {
        let e = u64::from(e);
        if s < e {
            report.undercounted += 1;
            report.problem(true, format!("cluster {:#x}: refcount {s}, referenced {e} times", c as u64 * cs));
        } else if s > e {
            report.problem(false, format!("cluster {:#x}: leaked (refcount {s}, referenced {e} times)", c as u64 * cs));
            if report.leaked.len() < MAX_LEAKS_LISTED {
                report.leaked.push((c as u64 * cs, e));
            }
        }
    }
    for (host, guest, flag) in copied {
        let rc = stored.get((host / cs) as usize).copied().unwrap_or(0);
        if flag != (rc == 1) {
            report.problem(true, format!("COPIED flag {flag} at {host:#x} (guest {guest:#x}) but refcount {rc}"));
        }
    }
    report.image_end_offset = highest.map(|c| (c + 1) * cs).unwrap_or(0);
    Ok(report)
}

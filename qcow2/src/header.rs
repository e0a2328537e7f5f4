//! The qcow2 header (versions 2 and 3) and its extensions: parsed, validated, and the few
//! fields we rewrite encoded back.

use crate::error::{corrupt, unsupported, Qcow2Error, Result};

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of the version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Length of the version 3 header we write (with the compression type field).
pub const V3_HEADER_LEN: u32 = 112;
/// Smallest and largest cluster sizes accepted (512 B .. 2 MiB).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest L1 table accepted, in entries (32 MiB of table, as QEMU).
pub const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;
/// Largest refcount table accepted, in bytes (8 MiB, as QEMU).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest virtual size accepted (QEMU's limit: 2^61 - 512... rounded to 2 EiB).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 61;
/// Largest backing file name, as QEMU.
pub(crate) const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature bits.
pub mod incompat {
    /// Refcounts may be stale (lazy refcounts in use and not closed cleanly).
    pub const DIRTY: u64 = 1 << 0;
    /// Metadata corruption was detected; writing is unsafe.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const EXTERNAL_DATA: u64 = 1 << 2;
    /// The compression type field is meaningful (non-zlib compression).
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// Extended L2 entries (subclusters).
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every bit this engine knows.
    pub const KNOWN: u64 = DIRTY | CORRUPT | EXTERNAL_DATA | COMPRESSION_TYPE | EXTENDED_L2;
}

/// Autoclear feature bits: a writer that does not know one clears it (QEMU does at every
/// read-write open), which marks the data the bit guards as stale.
pub mod autoclear {
    /// The persistent bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// thinblk's owner extension ([`super::Owner`]) is current: no other program has opened
    /// the image for writing since thinblk last wrote it.
    pub const THINBLK: u64 = 1 << 62;
}

/// thinblk's own header extension: the image's identity, its write-back generation, and
/// whether a thinblk process has it open for writing (not closed clean).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// File offset of the extension's data (the generation is at +16, the flags at +24).
    pub offset: u64,
    /// Random identity given at the first read-write open by thinblk; names the journal.
    pub uuid: [u8; 16],
    /// Write-back generation: bumped at every read-write open and every journalled write-back.
    pub generation: u64,
    /// [`Owner::IN_USE`].
    pub flags: u64,
}

impl Owner {
    /// Open for writing by thinblk and not closed clean since.
    pub const IN_USE: u64 = 1;
    /// Closed after an active commit merged it into its backing file (the pivot): the
    /// writes that followed went to the base, so thinblk refuses to serve it read-write.
    pub const MERGED: u64 = 2;
    /// Bytes of extension data.
    pub const LEN: usize = 40;

    /// The extension's data bytes.
    pub fn encode(&self) -> [u8; Owner::LEN] {
        let mut d = [0u8; Owner::LEN];
        d[..16].copy_from_slice(&self.uuid);
        d[16..24].copy_from_slice(&self.generation.to_be_bytes());
        d[24..32].copy_from_slice(&self.flags.to_be_bytes());
        d
    }

    /// The uuid as 32 hex digits.
    pub fn uuid_hex(&self) -> String {
        self.uuid.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Where the persistent bitmaps are described (the bitmaps extension).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bitmaps {
    /// Number of bitmaps.
    pub count: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Host offset of the bitmap directory.
    pub directory_offset: u64,
}

/// Compatible feature bits.
pub mod compat {
    /// Lazy refcounts may be used by writers.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Header extension types.
pub(crate) mod ext {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_NAMES: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const ENCRYPTION: u32 = 0x0537_be77;
    pub const EXTERNAL_DATA_FILE: u32 = 0x4441_5441;
    /// thinblk's owner extension ("thnb").
    pub const THINBLK: u32 = 0x7468_6e62;
}

/// Where one header extension lies in the first cluster.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Extension {
    /// Its type.
    pub kind: u32,
    /// Offset of its type field.
    pub at: usize,
    /// Bytes it takes, header and padding included.
    pub padded: usize,
}

/// A parsed, validated header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Entries in the L1 table.
    pub l1_size: u32,
    /// Host offset of the L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters occupied by the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length (72 for v2).
    pub header_length: u32,
    /// Backing file name, if any.
    pub backing_file: Option<String>,
    /// Backing file format from the header extension, if any.
    pub backing_format: Option<String>,
    /// thinblk's owner extension, if present (current only while [`autoclear::THINBLK`] is set).
    pub owner: Option<Owner>,
    /// The persistent bitmaps extension, if present.
    pub bitmaps: Option<Bitmaps>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// L1 entries needed to map `size` bytes.
    pub fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
        let per_l2 = 1u64 << (cluster_bits + cluster_bits - 3);
        size.div_ceil(per_l2)
    }

    /// Parses and validates the first cluster of an image of `file_size` bytes.
    ///
    /// `buf` must hold at least the first 4 KiB (or the whole file if smaller); extensions
    /// are only read within it and within the first cluster.
    pub fn parse(buf: &[u8], file_size: u64) -> Result<Header> {
        let avail = (buf.len() as u64).min(file_size);
        if avail < u64::from(V2_HEADER_LEN) {
            return corrupt(format!("file too short for a header ({avail} bytes)"));
        }
        let magic = be32(buf, 0);
        if magic != MAGIC {
            return Err(Qcow2Error::BadMagic(magic));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return unsupported(format!("qcow2 version {version}"));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return unsupported(format!("cluster size 2^{cluster_bits} (512 B to 2 MiB supported)"));
        }
        let cluster_size = 1u64 << cluster_bits;
        let crypt_method = be32(buf, 32);
        if crypt_method != 0 {
            return unsupported(format!("encryption (crypt_method {crypt_method})"));
        }
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(buf, 24),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            backing_file: None,
            backing_format: None,
            owner: None,
            bitmaps: None,
        };
        let mut compression_type = 0u8;
        if version == 3 {
            if avail < 104 {
                return corrupt(format!("file too short for a version 3 header ({avail} bytes)"));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 || h.header_length % 8 != 0 && h.header_length != 104 {
                return corrupt(format!("header length {}", h.header_length));
            }
            if u64::from(h.header_length) > cluster_size || h.header_length as usize > buf.len() {
                return corrupt(format!("header length {} exceeds the first cluster", h.header_length));
            }
            if h.header_length > 104 {
                compression_type = buf[104];
            }
        }
        h.check_features(compression_type)?;
        h.check_geometry(file_size)?;
        let backing_offset = be64(buf, 8);
        let backing_size = be32(buf, 16);
        h.parse_backing_name(buf, backing_offset, backing_size)?;
        h.parse_extensions(buf, backing_offset)?;
        Ok(h)
    }

    fn check_features(&self, compression_type: u8) -> Result<()> {
        let f = self.incompatible_features;
        if f & !incompat::KNOWN != 0 {
            return unsupported(format!("unknown incompatible feature bits {:#x}", f & !incompat::KNOWN));
        }
        if f & incompat::EXTERNAL_DATA != 0 {
            return unsupported("external data file");
        }
        if f & incompat::EXTENDED_L2 != 0 {
            return unsupported("extended L2 entries (subclusters)");
        }
        if f & incompat::COMPRESSION_TYPE != 0 && compression_type != 0 {
            return unsupported(format!("compression type {compression_type} (only zlib/deflate)"));
        }
        if compression_type > 1 {
            return unsupported(format!("compression type {compression_type}"));
        }
        if self.refcount_order > 6 {
            return corrupt(format!("refcount order {}", self.refcount_order));
        }
        Ok(())
    }

    fn check_geometry(&self, file_size: u64) -> Result<()> {
        let cs = self.cluster_size();
        if self.size > MAX_VIRTUAL_SIZE {
            return unsupported(format!("virtual size {} larger than {}", self.size, MAX_VIRTUAL_SIZE));
        }
        let needed = Header::l1_entries_for(self.size, self.cluster_bits);
        if u64::from(self.l1_size) < needed {
            return corrupt(format!("L1 table has {} entries, {} needed for the virtual size", self.l1_size, needed));
        }
        if u64::from(self.l1_size) > MAX_L1_ENTRIES {
            return unsupported(format!("L1 table of {} entries (max {})", self.l1_size, MAX_L1_ENTRIES));
        }
        let table = |what: &str, off: u64, len: u64| -> Result<()> {
            if off % cs != 0 {
                return corrupt(format!("{what} offset {off:#x} not cluster aligned"));
            }
            if off == 0 && len > 0 {
                return corrupt(format!("{what} overlaps the header"));
            }
            match off.checked_add(len) {
                Some(end) if end <= file_size => Ok(()),
                _ => corrupt(format!("{what} at {off:#x}+{len:#x} past the end of the image ({file_size:#x})")),
            }
        };
        if self.l1_size > 0 {
            table("L1 table", self.l1_table_offset, u64::from(self.l1_size) * 8)?;
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if self.refcount_table_clusters == 0 {
            return corrupt("empty refcount table");
        }
        if rt_bytes > MAX_REFTABLE_BYTES {
            return unsupported(format!("refcount table of {rt_bytes} bytes (max {MAX_REFTABLE_BYTES})"));
        }
        table("refcount table", self.refcount_table_offset, rt_bytes)?;
        if self.l1_size > 0 {
            let (a0, a1) = (self.l1_table_offset, self.l1_table_offset + u64::from(self.l1_size) * 8);
            let (b0, b1) = (self.refcount_table_offset, self.refcount_table_offset + rt_bytes);
            if a0 < b1 && b0 < a1 {
                return corrupt("L1 table overlaps the refcount table");
            }
        }
        if self.nb_snapshots > 65536 {
            return corrupt(format!("{} snapshots", self.nb_snapshots));
        }
        if self.nb_snapshots > 0 {
            table("snapshot table", self.snapshots_offset, 1)?;
        }
        Ok(())
    }

    fn parse_backing_name(&mut self, buf: &[u8], offset: u64, size: u32) -> Result<()> {
        if offset == 0 {
            return Ok(());
        }
        if size == 0 || size > MAX_BACKING_NAME {
            return corrupt(format!("backing file name length {size}"));
        }
        let end = offset.saturating_add(u64::from(size));
        if end > self.cluster_size() || end > buf.len() as u64 {
            return corrupt("backing file name outside the first cluster");
        }
        let name = &buf[offset as usize..end as usize];
        let name = std::str::from_utf8(name).map_err(|_| Qcow2Error::Corrupt("backing file name is not UTF-8".into()))?;
        self.backing_file = Some(name.to_string());
        Ok(())
    }

    fn parse_extensions(&mut self, buf: &[u8], backing_offset: u64) -> Result<()> {
        let limit = (self.cluster_size() as usize).min(buf.len());
        let limit = if backing_offset > 0 { limit.min(backing_offset as usize) } else { limit };
        let mut at = self.header_length as usize;
        while at + 8 <= limit {
            let kind = be32(buf, at);
            let len = be32(buf, at + 4) as usize;
            at += 8;
            if kind == ext::END {
                return Ok(());
            }
            let Some(end) = at.checked_add(len).filter(|&e| e <= limit) else {
                return corrupt(format!("header extension {kind:#x} of {len} bytes overruns the header"));
            };
            let data = &buf[at..end];
            match kind {
                ext::BACKING_FORMAT => {
                    let f = std::str::from_utf8(data)
                        .map_err(|_| Qcow2Error::Corrupt("backing format is not UTF-8".into()))?;
                    self.backing_format = Some(f.trim_end_matches('\0').to_string());
                }
                ext::EXTERNAL_DATA_FILE => return unsupported("external data file"),
                ext::ENCRYPTION => return unsupported("encryption"),
                ext::THINBLK if len >= Owner::LEN => {
                    let mut uuid = [0u8; 16];
                    uuid.copy_from_slice(&data[..16]);
                    self.owner = Some(Owner { offset: at as u64, uuid, generation: be64(data, 16), flags: be64(data, 24) });
                }
                ext::BITMAPS if len >= 24 => {
                    self.bitmaps =
                        Some(Bitmaps { count: be32(data, 0), directory_size: be64(data, 8), directory_offset: be64(data, 16) });
                }
                ext::FEATURE_NAMES => {}
                _ => {}
            }
            at = end.div_ceil(8) * 8;
        }
        Ok(())
    }

    /// The start of the first cluster (`first`, as read) rewritten with `owner` as thinblk's
    /// extension (replacing an earlier one, every other extension kept in order), the
    /// autoclear bits set to `autoclear`, and the backing file name moved after the end
    /// marker. Returns the bytes to write at offset 0 and the owner's new data offset, or
    /// None when it does not fit in the first cluster (or the image is version 2, which has
    /// no autoclear bits to guard it).
    pub fn with_owner(&self, first: &[u8], owner: &Owner, autoclear: u64) -> Option<(Vec<u8>, u64)> {
        if self.version < 3 {
            return None;
        }
        let cs = (self.cluster_size() as usize).min(first.len());
        let backing_offset = be64(first, 8) as usize;
        let limit = if backing_offset > 0 { cs.min(backing_offset) } else { cs };
        let mut out = first.get(..self.header_length as usize)?.to_vec();
        out[88..96].copy_from_slice(&autoclear.to_be_bytes());
        let mut at = self.header_length as usize;
        while at + 8 <= limit {
            let kind = be32(first, at);
            let len = be32(first, at + 4) as usize;
            if kind == ext::END {
                break;
            }
            let end = (at + 8).checked_add(len).filter(|&e| e <= limit)?;
            let padded = (end - at).div_ceil(8) * 8;
            if kind != ext::THINBLK {
                let mut e = first[at..end].to_vec();
                e.resize(padded, 0);
                out.extend_from_slice(&e);
            }
            at += padded;
        }
        out.extend_from_slice(&ext::THINBLK.to_be_bytes());
        out.extend_from_slice(&(Owner::LEN as u32).to_be_bytes());
        let data_at = out.len() as u64;
        out.extend_from_slice(&owner.encode());
        out.extend_from_slice(&[0u8; 8]);
        if let Some(name) = &self.backing_file {
            let name_at = out.len() as u64;
            out[8..16].copy_from_slice(&name_at.to_be_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        (out.len() <= cs).then_some((out, data_at))
    }

    /// The extensions of the first cluster (`first`, as read) up to the end marker, and where
    /// the list ends: past the end marker, or where the walk stopped (the backing file name,
    /// or the end of the cluster). None if an extension overruns that limit.
    pub(crate) fn extension_list(&self, first: &[u8]) -> Option<(Vec<Extension>, usize)> {
        let cs = (self.cluster_size() as usize).min(first.len());
        let backing_offset = usize::try_from(be64(first, 8)).unwrap_or(usize::MAX);
        let limit = if backing_offset > 0 { cs.min(backing_offset) } else { cs };
        let mut list = Vec::new();
        let mut at = self.header_length as usize;
        while at + 8 <= limit {
            let kind = be32(first, at);
            let len = be32(first, at + 4) as usize;
            if kind == ext::END {
                return Some((list, at + 8));
            }
            let end = (at + 8).checked_add(len).filter(|&e| e <= limit)?;
            let padded = (end - at).div_ceil(8) * 8;
            list.push(Extension { kind, at, padded });
            at += padded;
        }
        Some((list, at))
    }

    /// Where the backing file name lies in `first` (offset, length), if the header names one.
    pub(crate) fn backing_name_range(first: &[u8]) -> Option<(usize, usize)> {
        let at = usize::try_from(be64(first, 8)).ok().filter(|&a| a > 0)?;
        let len = be32(first, 16) as usize;
        at.checked_add(len).filter(|&e| e <= first.len()).map(|_| (at, len))
    }

    /// The start of the first cluster (`first`, as read) rewritten to name `backing` (file
    /// name, format) as the backing file, or no backing file with None.
    ///
    /// The backing format extension is replaced where it is (appended after the last
    /// extension when there is none; removed with the backing file); every other extension,
    /// thinblk's owner extension included, is kept byte for byte and in order, at the same
    /// offset unless the format extension before it changed its padded length. Header
    /// fields 8..20 (backing file offset and size) name the new name, which goes after the
    /// end marker, after the old extension list too, and never over the bytes of the current
    /// name (the same name stays where it is): it can then be written before the header names
    /// it (`backing.rs`). Bytes in between are copied from `first`.
    ///
    /// Returns the bytes to write at offset 0, or None when they do not fit in the first
    /// cluster, when the name is empty, longer than 1023 bytes (QEMU's limit) or holds a NUL,
    /// or when the format is empty or holds a NUL. Version 2 images take the format extension
    /// like version 3 ones (QEMU writes it into both).
    pub fn with_backing(&self, first: &[u8], backing: Option<(&str, &str)>) -> Option<Vec<u8>> {
        if let Some((name, format)) = backing {
            let bad = |s: &str| s.is_empty() || s.contains('\0');
            if bad(name) || bad(format) || name.len() > MAX_BACKING_NAME as usize {
                return None;
            }
        }
        let cs = (self.cluster_size() as usize).min(first.len());
        let hl = self.header_length as usize;
        if hl < V2_HEADER_LEN as usize || hl > cs {
            return None;
        }
        let (list, old_end) = self.extension_list(first)?;
        let format_ext = |f: &str| {
            let mut e = Vec::with_capacity(8 + f.len().div_ceil(8) * 8);
            e.extend_from_slice(&ext::BACKING_FORMAT.to_be_bytes());
            e.extend_from_slice(&(f.len() as u32).to_be_bytes());
            e.extend_from_slice(f.as_bytes());
            e.resize(8 + f.len().div_ceil(8) * 8, 0);
            e
        };
        let mut region = Vec::new();
        let mut placed = false;
        for &Extension { kind, at, padded } in &list {
            if kind == ext::BACKING_FORMAT {
                if let (Some((_, f)), false) = (backing, placed) {
                    region.extend_from_slice(&format_ext(f));
                    placed = true;
                }
                continue;
            }
            let mut e = first[at..(at + padded).min(first.len())].to_vec();
            e.resize(padded, 0);
            region.extend_from_slice(&e);
        }
        if let (Some((_, f)), false) = (backing, placed) {
            region.extend_from_slice(&format_ext(f));
        }
        region.extend_from_slice(&[0u8; 8]);
        let ext_end = hl + region.len();
        let old_name = Header::backing_name_range(first);
        let name_at = backing.map(|(name, _)| {
            let n = name.len();
            match old_name {
                Some((at, len)) if at >= ext_end && first[at..at + len] == *name.as_bytes() => at,
                _ => {
                    let at = ext_end.max(old_end);
                    match old_name {
                        Some((o, l)) if at < o + l && o < at + n => o + l,
                        _ => at,
                    }
                }
            }
        });
        let end = match (backing, name_at) {
            (Some((name, _)), Some(at)) => ext_end.max(at + name.len()),
            _ => ext_end,
        };
        if end > cs {
            return None;
        }
        let mut out = first[..end].to_vec();
        out[hl..ext_end].copy_from_slice(&region);
        match (backing, name_at) {
            (Some((name, _)), Some(at)) => {
                out[8..16].copy_from_slice(&(at as u64).to_be_bytes());
                out[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
                out[at..at + name.len()].copy_from_slice(name.as_bytes());
            }
            _ => out[8..20].fill(0),
        }
        Some(out)
    }

    /// Why this image cannot be written by this engine, if it cannot.
    pub fn write_blocker(&self) -> Option<String> {
        if self.incompatible_features & incompat::CORRUPT != 0 {
            return Some("marked corrupt; repair it with qemu-img check -r all".into());
        }
        if self.incompatible_features & incompat::DIRTY != 0 {
            return Some("refcounts dirty (lazy refcounts, not closed cleanly); run qemu-img check -r all".into());
        }
        if self.refcount_order != 4 {
            return Some(format!("refcount width {} bits (only 16 is written)", 1u32 << self.refcount_order));
        }
        if self.nb_snapshots > 0 {
            return Some(format!("{} internal snapshot(s); writes would need copy-on-write of shared clusters", self.nb_snapshots));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid v3 header: 64 KiB clusters, 1 GiB, L1 at cluster 3, reftable at 1.
    pub(crate) fn sample() -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        b[36..40].copy_from_slice(&2u32.to_be_bytes());
        b[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes());
        b[48..56].copy_from_slice(&(1u64 << 16).to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        b
    }

    const FILE: u64 = 4 << 16;

    #[test]
    fn parses_a_valid_v3_header() {
        let h = Header::parse(&sample(), FILE).unwrap();
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.size, 1 << 30);
        assert_eq!(h.write_blocker(), None);
    }

    fn set32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    fn set64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    #[test]
    fn every_bad_header_has_its_error() {
        type Edit = fn(&mut Vec<u8>);
        let cases: Vec<(&str, Edit, &str)> = vec![
            ("magic", |b| set32(b, 0, 0x1234), "not a qcow2"),
            ("version", |b| set32(b, 4, 4), "version 4"),
            ("cluster bits small", |b| set32(b, 20, 8), "cluster size"),
            ("cluster bits large", |b| set32(b, 20, 22), "cluster size"),
            ("encryption", |b| set32(b, 32, 1), "encryption"),
            ("external data", |b| set64(b, 72, incompat::EXTERNAL_DATA), "external data"),
            ("extended l2", |b| set64(b, 72, incompat::EXTENDED_L2), "extended L2"),
            ("unknown incompat", |b| set64(b, 72, 1 << 40), "unknown incompatible"),
            ("zstd", |b| { set64(b, 72, incompat::COMPRESSION_TYPE); b[104] = 1 }, "compression type"),
            ("l1 too small", |b| set32(b, 36, 0), "L1 table has 0 entries"),
            ("l1 unaligned", |b| set64(b, 40, 3 << 16 | 8), "not cluster aligned"),
            ("l1 past end", |b| set64(b, 40, 100 << 16), "past the end"),
            ("l1 huge", |b| set32(b, 36, u32::MAX), "L1 table of"),
            ("l1 over reftable", |b| set64(b, 40, 1 << 16), "overlaps the refcount"),
            ("l1 at header", |b| set64(b, 40, 0), "overlaps the header"),
            ("reftable empty", |b| set32(b, 56, 0), "empty refcount"),
            ("reftable huge", |b| set32(b, 56, 1000), "refcount table of"),
            ("size absurd", |b| set64(b, 24, u64::MAX), "virtual size"),
            ("header length", |b| set32(b, 100, 8), "header length"),
            ("backing name length", |b| { set64(b, 8, 512); set32(b, 16, 5000) }, "backing file name length"),
            ("backing outside", |b| { set64(b, 8, 4090); set32(b, 16, 100) }, "outside the first cluster"),
            ("extension overrun", |b| { set32(b, 112, 0xe279_2aca); set32(b, 116, 100_000) }, "overruns"),
            ("short", |b| b.truncate(40), "too short"),
            ("short v3", |b| b.truncate(80), "too short for a version 3"),
        ];
        for (name, edit, want) in cases {
            let mut b = sample();
            edit(&mut b);
            let err = Header::parse(&b, FILE).expect_err(name).to_string();
            assert!(err.contains(want), "{name}: got '{err}', want '{want}'");
        }
    }

    #[test]
    fn flags_that_block_writing() {
        let mut b = sample();
        set64(&mut b, 72, incompat::DIRTY);
        assert!(Header::parse(&b, FILE).unwrap().write_blocker().unwrap().contains("dirty"));
        let mut b = sample();
        set64(&mut b, 72, incompat::CORRUPT);
        assert!(Header::parse(&b, FILE).unwrap().write_blocker().unwrap().contains("corrupt"));
        let mut b = sample();
        set32(&mut b, 96, 3);
        assert!(Header::parse(&b, FILE).unwrap().write_blocker().unwrap().contains("refcount width"));
    }

    #[test]
    fn backing_name_and_format() {
        let mut b = sample();
        set64(&mut b, 8, 1024);
        set32(&mut b, 16, 8);
        b[1024..1032].copy_from_slice(b"base.img");
        set32(&mut b, 112, 0xe279_2aca);
        set32(&mut b, 116, 5);
        b[120..125].copy_from_slice(b"qcow2");
        let h = Header::parse(&b, FILE).unwrap();
        assert_eq!(h.backing_file.as_deref(), Some("base.img"));
        assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
    }

    #[test]
    fn the_owner_extension_goes_in_keeping_every_other_one_and_the_backing_name() {
        let mut b = sample();
        set64(&mut b, 8, 1024);
        set32(&mut b, 16, 8);
        b[1024..1032].copy_from_slice(b"base.img");
        set32(&mut b, 112, 0xe279_2aca);
        set32(&mut b, 116, 5);
        b[120..125].copy_from_slice(b"qcow2");
        set64(&mut b, 88, autoclear::BITMAPS);
        let h = Header::parse(&b, FILE).unwrap();
        let owner = Owner { offset: 0, uuid: [9; 16], generation: 7, flags: Owner::IN_USE };
        let (bytes, at) = h.with_owner(&b, &owner, autoclear::THINBLK).expect("fits");
        let mut c = b.clone();
        c[..bytes.len()].copy_from_slice(&bytes);
        let h2 = Header::parse(&c, FILE).unwrap();
        assert_eq!(h2.backing_file.as_deref(), Some("base.img"));
        assert_eq!(h2.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(h2.autoclear_features, autoclear::THINBLK);
        assert_eq!(h2.owner, Some(Owner { offset: at, ..owner }));
        // Again over itself: replaced, not added twice.
        let (again, at2) = h2.with_owner(&c, &Owner { generation: 8, ..owner }, autoclear::THINBLK).expect("fits");
        assert_eq!((again.len(), at2), (bytes.len(), at));
        // No room in a 512-byte first cluster with a long backing name; version 2: none.
        let mut small = h.clone();
        small.cluster_bits = 9;
        small.backing_file = Some("x".repeat(400));
        assert!(small.with_owner(&b, &owner, autoclear::THINBLK).is_none());
        let mut v2 = h.clone();
        v2.version = 2;
        assert!(v2.with_owner(&b, &owner, autoclear::THINBLK).is_none());
    }


    /// `sample()` with a backing file `name` of `format`, an extension thinblk does not know
    /// (24 bytes) and thinblk's owner extension, in that order after the format extension.
    fn with_chain(name: &str, format: &str) -> Vec<u8> {
        let mut b = sample();
        let mut at = 112;
        let mut put = |b: &mut Vec<u8>, kind: u32, data: &[u8]| {
            set32(b, at, kind);
            set32(b, at + 4, data.len() as u32);
            b[at + 8..at + 8 + data.len()].copy_from_slice(data);
            at += 8 + data.len().div_ceil(8) * 8;
        };
        put(&mut b, 0xe279_2aca, format.as_bytes());
        put(&mut b, 0x1234_5678, &[0xab; 20]);
        let owner = Owner { offset: 0, uuid: [7; 16], generation: 5, flags: Owner::IN_USE };
        put(&mut b, 0x7468_6e62, &owner.encode());
        at += 8;
        set64(&mut b, 8, at as u64);
        set32(&mut b, 16, name.len() as u32);
        b[at..at + name.len()].copy_from_slice(name.as_bytes());
        set64(&mut b, 88, autoclear::THINBLK);
        b
    }

    fn applied(first: &[u8], bytes: &[u8]) -> Vec<u8> {
        let mut c = first.to_vec();
        c[..bytes.len()].copy_from_slice(bytes);
        c
    }

    #[test]
    fn a_new_backing_round_trips_through_parse_keeping_every_other_extension() {
        let b = with_chain("mid.qcow2", "qcow2");
        let h = Header::parse(&b, FILE).unwrap();
        let bytes = h.with_backing(&b, Some(("base.img", "raw"))).expect("fits");
        let c = applied(&b, &bytes);
        let h2 = Header::parse(&c, FILE).unwrap();
        assert_eq!((h2.backing_file.as_deref(), h2.backing_format.as_deref()), (Some("base.img"), Some("raw")));
        // The unknown extension and the owner extension: same bytes at the same offsets.
        assert_eq!(c[128..184], b[128..184]);
        assert_eq!(h2.owner, h.owner);
        assert_eq!(h2.autoclear_features, autoclear::THINBLK);
        assert_eq!(Header { backing_file: None, backing_format: None, ..h2.clone() }, Header { backing_file: None, backing_format: None, ..h });
        // The new name is not written over the old one (it is written first, see backing.rs).
        let (old_at, new_at) = (be64(&b, 8) as usize, be64(&c, 8) as usize);
        assert!(new_at >= old_at + "mid.qcow2".len(), "{new_at} over the old name at {old_at}");
        // And back: the name fits before the current one again.
        let again = h2.with_backing(&c, Some(("mid.qcow2", "qcow2"))).expect("fits");
        let d = applied(&c, &again);
        assert_eq!(be64(&d, 8) as usize, old_at);
        assert_eq!(Header::parse(&d, FILE).unwrap().backing_file.as_deref(), Some("mid.qcow2"));
        // The same name with another format stays where it is.
        let same = h2.with_backing(&c, Some(("base.img", "qcow2"))).expect("fits");
        assert_eq!(be64(&same, 8), be64(&c, 8));
    }

    #[test]
    fn removing_the_backing_drops_the_name_and_the_format_extension() {
        let b = with_chain("mid.qcow2", "qcow2");
        let h = Header::parse(&b, FILE).unwrap();
        let bytes = h.with_backing(&b, None).expect("fits");
        let c = applied(&b, &bytes);
        assert_eq!((be64(&c, 8), be32(&c, 16)), (0, 0));
        let h2 = Header::parse(&c, FILE).unwrap();
        assert_eq!((h2.backing_file.as_deref(), h2.backing_format.as_deref()), (None, None));
        // The extensions after it moved up by the format extension's 16 bytes, unchanged.
        assert_eq!(c[112..168], b[128..184]);
        assert_eq!(h2.owner, h.owner.map(|o| Owner { offset: o.offset - 16, ..o }));
        // Added again where there is none: after the last extension (the others stay put).
        let back = h2.with_backing(&c, Some(("base.qcow2", "qcow2"))).expect("fits");
        let d = applied(&c, &back);
        let h3 = Header::parse(&d, FILE).unwrap();
        assert_eq!((h3.backing_file.as_deref(), h3.backing_format.as_deref()), (Some("base.qcow2"), Some("qcow2")));
        assert_eq!(h3.owner, h2.owner);
        assert_eq!(be32(&d, 192), 0xe279_2aca, "after the owner extension");
    }

    #[test]
    fn names_too_long_or_without_room_and_bad_names_give_none() {
        let b = with_chain("mid.qcow2", "qcow2");
        let h = Header::parse(&b, FILE).unwrap();
        let name = "n".repeat(1023);
        let bytes = h.with_backing(&b, Some((&name, "qcow2"))).expect("1023 bytes fit in 64 KiB");
        assert_eq!(Header::parse(&applied(&b, &bytes), FILE).unwrap().backing_file, Some(name));
        assert!(h.with_backing(&b, Some((&"n".repeat(1024), "qcow2"))).is_none(), "QEMU's limit");
        for (name, format) in [("", "qcow2"), ("a\0b", "qcow2"), ("base", ""), ("base", "q\0")] {
            assert!(h.with_backing(&b, Some((name, format))).is_none(), "{name:?} {format:?}");
        }
        // A 512-byte first cluster: no room for a long name after the extensions.
        let mut small = b.clone();
        set32(&mut small, 20, 9);
        set64(&mut small, 24, 16 << 20);
        set32(&mut small, 36, 512);
        set64(&mut small, 40, 3 << 9);
        set64(&mut small, 48, 1 << 9);
        let hs = Header::parse(&small, FILE).unwrap();
        assert!(hs.with_backing(&small, Some((&"x".repeat(400), "qcow2"))).is_none());
        assert!(hs.with_backing(&small, Some(("base", "qcow2"))).is_some());
    }

    #[test]
    fn a_version_2_image_takes_the_format_extension_too() {
        let mut b = sample();
        set32(&mut b, 4, 2);
        b[72..112].fill(0);
        let h = Header::parse(&b, FILE).unwrap();
        let bytes = h.with_backing(&b, Some(("base.qcow2", "qcow2"))).expect("fits");
        let h2 = Header::parse(&applied(&b, &bytes), FILE).unwrap();
        assert_eq!((h2.version, h2.backing_file.as_deref(), h2.backing_format.as_deref()), (2, Some("base.qcow2"), Some("qcow2")));
        assert_eq!(be32(&bytes, 72), 0xe279_2aca, "right after the 72-byte header");
    }
}

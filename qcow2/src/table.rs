//! Table entry encodings (L1, L2, refcount blocks).

/// L1/L2 entry flag: the cluster's refcount is exactly one (writable in place).
pub const COPIED: u64 = 1 << 63;
/// L2 entry flag: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// L2 entry flag (v3): the cluster reads as zeroes.
pub const ZERO: u64 = 1;
/// Host offset bits of an L1 entry or a standard L2 entry.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Host offset bits of a refcount table entry.
pub const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// What one L2 entry says about its guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Entry {
    /// Never written: backing file or zeroes.
    Unallocated,
    /// Reads as zeroes; `host` is a preallocated cluster (0 if none).
    Zero {
        /// Preallocated host cluster, or 0.
        host: u64,
    },
    /// Stored uncompressed at `host`.
    Normal {
        /// Host cluster offset.
        host: u64,
        /// Refcount known to be one.
        copied: bool,
    },
    /// Stored compressed: `len` bytes from `host` (not cluster aligned).
    Compressed {
        /// Host byte offset of the compressed data.
        host: u64,
        /// Upper bound of the compressed length, in bytes.
        len: u64,
    },
}

/// Decodes an L2 entry of an image with `cluster_bits`.
pub fn decode_l2(raw: u64, cluster_bits: u32) -> L2Entry {
    if raw & COMPRESSED != 0 {
        let x = 62 - (cluster_bits - 8);
        let host = raw & ((1u64 << x) - 1);
        let sectors = ((raw >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
        let len = sectors * 512 - (host & 511);
        return L2Entry::Compressed { host, len };
    }
    let host = raw & OFFSET_MASK;
    if raw & ZERO != 0 {
        return L2Entry::Zero { host };
    }
    if host == 0 {
        return L2Entry::Unallocated;
    }
    L2Entry::Normal { host, copied: raw & COPIED != 0 }
}

/// Reads refcount `index` from a refcount block with `1 << order`-bit entries.
pub fn get_refcount(block: &[u8], index: usize, order: u32) -> u64 {
    let bits = 1usize << order;
    if bits >= 8 {
        let bytes = bits / 8;
        let at = index * bytes;
        let Some(s) = block.get(at..at + bytes) else { return 0 };
        s.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    } else {
        let bit = index * bits;
        let Some(&byte) = block.get(bit / 8) else { return 0 };
        (u64::from(byte) >> (bit % 8)) & ((1u64 << bits) - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_entries() {
        assert_eq!(decode_l2(0, 16), L2Entry::Unallocated);
        assert_eq!(decode_l2(0x5_0000 | COPIED, 16), L2Entry::Normal { host: 0x5_0000, copied: true });
        assert_eq!(decode_l2(ZERO, 16), L2Entry::Zero { host: 0 });
        assert_eq!(decode_l2(0x5_0000 | ZERO, 16), L2Entry::Zero { host: 0x5_0000 });
        // 64 KiB clusters: x = 54; offset 0x1234 with 3 extra sectors.
        let raw = COMPRESSED | (3u64 << 54) | 0x1234;
        assert_eq!(decode_l2(raw, 16), L2Entry::Compressed { host: 0x1234, len: 4 * 512 - 0x34 });
    }

    #[test]
    fn refcount_widths() {
        assert_eq!(get_refcount(&[0x00, 0x02, 0x01, 0x00], 1, 4), 256);
        assert_eq!(get_refcount(&[0b1010_0100], 2, 1), 2); // bits 4..5, LSB first as QEMU
        assert_eq!(get_refcount(&[0b1010_0100], 1, 0), 0);
        assert_eq!(get_refcount(&[7], 5, 4), 0);
    }
}

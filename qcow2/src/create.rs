//! Creating a new, empty version 3 image.

use crate::error::{Qcow2Error, Result};
use crate::header::{Header, MAGIC, MAX_CLUSTER_BITS, MAX_L1_ENTRIES, MIN_CLUSTER_BITS, V3_HEADER_LEN};
use crate::storage::Storage;

/// Parameters of a new image.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size in bytes (a multiple of 512).
    pub size: u64,
    /// Cluster size in bytes (a power of two, 512 B .. 2 MiB).
    pub cluster_size: u64,
}

/// Writes a fresh image onto `storage` (which should be empty or zeroed): header, refcount
/// table, one refcount block and the L1 table, all counted. Returns the image end offset.
pub fn create(storage: &dyn Storage, opts: &CreateOptions) -> Result<u64> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cs.trailing_zeros()) {
        return Err(Qcow2Error::Unsupported(format!("cluster size {cs} (power of two, 512 B to 2 MiB)")));
    }
    if opts.size % 512 != 0 || opts.size == 0 {
        return Err(Qcow2Error::Unsupported(format!("size {} is not a non-zero multiple of 512", opts.size)));
    }
    let bits = cs.trailing_zeros();
    let l1_entries = Header::l1_entries_for(opts.size, bits).max(1);
    if l1_entries > MAX_L1_ENTRIES {
        return Err(Qcow2Error::Unsupported(format!("size {} needs an L1 table too large for cluster size {cs}", opts.size)));
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    let rb_entries = cs / 2;
    // Layout: header | refcount table | refcount blocks... | L1 table.
    let mut rt_clusters = 1u64;
    let mut rb_count = 1u64;
    loop {
        let total = 1 + rt_clusters + rb_count + l1_clusters;
        let need_rb = total.div_ceil(rb_entries);
        let need_rt = (need_rb * 8).div_ceil(cs);
        if need_rb <= rb_count && need_rt <= rt_clusters {
            break;
        }
        rb_count = need_rb.max(rb_count);
        rt_clusters = need_rt.max(rt_clusters);
    }
    let rt_off = cs;
    let rb_off = rt_off + rt_clusters * cs;
    let l1_off = rb_off + rb_count * cs;
    let end = l1_off + l1_clusters * cs;
    let used = end / cs;

    let mut h = vec![0u8; V3_HEADER_LEN as usize + 8];
    h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&bits.to_be_bytes());
    h[24..32].copy_from_slice(&opts.size.to_be_bytes());
    h[36..40].copy_from_slice(&(l1_entries as u32).to_be_bytes());
    h[40..48].copy_from_slice(&l1_off.to_be_bytes());
    h[48..56].copy_from_slice(&rt_off.to_be_bytes());
    h[56..60].copy_from_slice(&(rt_clusters as u32).to_be_bytes());
    h[96..100].copy_from_slice(&4u32.to_be_bytes());
    h[100..104].copy_from_slice(&V3_HEADER_LEN.to_be_bytes());
    // h[112..120]: end-of-extensions marker (zeroes).

    let mut rt = vec![0u8; (rt_clusters * cs) as usize];
    for i in 0..rb_count {
        let off = rb_off + i * cs;
        rt[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
    }
    let mut rbs = vec![0u8; (rb_count * cs) as usize];
    for c in 0..used {
        rbs[(c * 2) as usize..(c * 2 + 2) as usize].copy_from_slice(&1u16.to_be_bytes());
    }
    // Tables first, header last: a half-written image has no magic.
    storage.write_at(&vec![0u8; (l1_clusters * cs) as usize], l1_off)?;
    storage.write_at(&rbs, rb_off)?;
    storage.write_at(&rt, rt_off)?;
    let mut first = vec![0u8; cs as usize];
    first[..h.len()].copy_from_slice(&h);
    storage.write_at(&first, 0)?;
    storage.flush()?;
    Ok(end)
}

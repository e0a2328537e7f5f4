//! Creating a new, empty version 3 image, with or without a backing file.

use crate::error::{Qcow2Error, Result};
use crate::header::{ext, Header, MAGIC, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_ENTRIES, MIN_CLUSTER_BITS, V3_HEADER_LEN};
use crate::storage::Storage;

/// Parameters of a new image.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size in bytes (a multiple of 512).
    pub size: u64,
    /// Cluster size in bytes (a power of two, 512 B .. 2 MiB).
    pub cluster_size: u64,
    /// The backing file, as (name, format): the name is written verbatim (a relative name is
    /// resolved against the image's directory by whoever opens the chain), the format in the
    /// backing format extension. Nothing here opens it.
    pub backing: Option<(String, String)>,
}

/// Writes a fresh image onto `storage` (which should be empty or zeroed): header (with the
/// backing file's format extension and name, if any), refcount table, one refcount block and
/// the L1 table, all counted. Returns the image end offset.
pub fn create(storage: &dyn Storage, opts: &CreateOptions) -> Result<u64> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cs.trailing_zeros()) {
        return Err(Qcow2Error::Unsupported(format!("cluster size {cs} (power of two, 512 B to 2 MiB)")));
    }
    if opts.size % 512 != 0 || opts.size == 0 {
        return Err(Qcow2Error::Unsupported(format!("size {} is not a non-zero multiple of 512", opts.size)));
    }
    if let Some((name, format)) = &opts.backing {
        let bad = |s: &str| s.is_empty() || s.contains('\0');
        if bad(name) || bad(format) || name.len() > MAX_BACKING_NAME as usize {
            return Err(Qcow2Error::Unsupported(format!(
                "backing file name '{name}' or format '{format}' (1 to {MAX_BACKING_NAME} bytes, no NUL)"
            )));
        }
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
    // The backing format extension first (as QEMU), then the end-of-extensions marker
    // (zeroes), then the backing file name.
    if let Some((name, format)) = &opts.backing {
        h.truncate(V3_HEADER_LEN as usize);
        h.extend_from_slice(&ext::BACKING_FORMAT.to_be_bytes());
        h.extend_from_slice(&(format.len() as u32).to_be_bytes());
        h.extend_from_slice(format.as_bytes());
        h.resize(h.len().div_ceil(8) * 8 + 8, 0);
        let name_at = h.len() as u64;
        h[8..16].copy_from_slice(&name_at.to_be_bytes());
        h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        h.extend_from_slice(name.as_bytes());
        if h.len() as u64 > cs {
            return Err(Qcow2Error::Unsupported(format!(
                "backing file name and format need {} bytes of header, more than the {cs}-byte first cluster",
                h.len()
            )));
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn header_of(st: &MemStorage) -> Header {
        let b = st.snapshot();
        Header::parse(&b, b.len() as u64).expect("parses")
    }

    #[test]
    fn a_backing_file_is_recorded_with_its_format() {
        let st = MemStorage::default();
        let backing = Some(("6a1f0c3e-2b4d-4e5f-8a9b-0c1d2e3f4a5b".to_string(), "raw".to_string()));
        create(&st, &CreateOptions { size: 1 << 30, cluster_size: 65536, backing }).expect("create");
        let h = header_of(&st);
        assert_eq!(h.backing_file.as_deref(), Some("6a1f0c3e-2b4d-4e5f-8a9b-0c1d2e3f4a5b"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        // The format extension right after the header (as QEMU), all of it in the first sector.
        let b = st.snapshot();
        assert_eq!(&b[112..116], &ext::BACKING_FORMAT.to_be_bytes());
        assert!(u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")) + 36 <= 512);
    }

    #[test]
    fn backing_names_that_cannot_be_written_are_refused() {
        let long = "n".repeat(1024);
        for (name, format, cs) in [("", "qcow2", 65536), ("base", "", 65536), (long.as_str(), "qcow2", 65536), (&long[..600], "qcow2", 512)] {
            let st = MemStorage::default();
            let backing = Some((name.to_string(), format.to_string()));
            let r = create(&st, &CreateOptions { size: 1 << 20, cluster_size: cs, backing });
            assert!(matches!(r, Err(Qcow2Error::Unsupported(_))), "{name:?} {format:?} {cs}: {r:?}");
            assert!(st.snapshot().is_empty(), "nothing written");
        }
    }
}

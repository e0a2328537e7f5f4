//! Fuzzes the open path: any bytes as an image must give an image or a typed error, never a
//! panic; an image that opens must map every guest range, read, and check without panicking.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use thinblk_qcow2::{check, MemStorage, OpenOptions, Qcow2};

fuzz_target!(|data: &[u8]| {
    let storage = Arc::new(MemStorage::new(data.to_vec()));
    let _ = check(storage.as_ref());
    let opts = OpenOptions { read_only: true, l2_cache_bytes: Some(1 << 20), ..Default::default() };
    let Ok(img) = Qcow2::open(storage, opts) else { return };
    let size = img.size();
    let mut out = Vec::new();
    for off in [0, size / 3, size.saturating_sub(4096)] {
        out.clear();
        if img.map_read(off, 4096.min(size - off), &mut out).is_ok() {
            for r in &out {
                if let thinblk_qcow2::Mapping::Compressed(e) = r.mapping {
                    let _ = img.read_compressed(e);
                }
            }
        }
    }
});

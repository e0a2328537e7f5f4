//! The allocation limit (a thin volume's size): refused allocations change nothing, writes in
//! place and reads go on, raising the limit lets the same write through; the observer sees
//! every move of the allocation mark and every refusal.

use std::sync::{Arc, Mutex};

use thinblk_qcow2::{check, create, AllocationObserver, CreateOptions, Mapping, MemStorage, OpenOptions, Qcow2, Qcow2Error, Storage};

#[derive(Default)]
struct Seen {
    allocated: Mutex<Vec<u64>>,
    refused: Mutex<Vec<(u64, u64)>>,
}

impl AllocationObserver for Seen {
    fn allocated(&self, end: u64) {
        self.allocated.lock().unwrap().push(end);
    }
    fn refused(&self, needed: u64, limit: u64) {
        self.refused.lock().unwrap().push((needed, limit));
    }
}

fn write(img: &Qcow2, st: &MemStorage, off: u64, data: &[u8]) -> Result<(), Qcow2Error> {
    let mut ranges = Vec::new();
    let ticket = img.map_write(off, data.len() as u64, &mut ranges)?;
    for r in &ranges {
        let Mapping::Data(h) = r.mapping else { panic!("write mapped to {:?}", r.mapping) };
        let s = (r.guest - off) as usize;
        st.write_at(&data[s..s + r.len as usize], h).unwrap();
    }
    img.write_done(&ticket, true)
}

#[test]
fn limit_refuses_before_any_change_and_lifts() {
    let cs = 65536u64;
    let st = Arc::new(MemStorage::new(Vec::new()));
    create(st.as_ref(), &CreateOptions { size: 1 << 30, cluster_size: cs, backing: None }).unwrap();
    let img = Qcow2::open(st.clone(), OpenOptions::default()).unwrap();
    let seen = Arc::new(Seen::default());
    img.set_observer(seen.clone());
    let start = img.allocation();
    // Room for one L2 table and one data cluster exactly.
    img.set_limit(start + 2 * cs);
    write(&img, &st, 0, &vec![1u8; 4096]).unwrap();
    assert_eq!(img.allocation(), start + 2 * cs);
    assert_eq!(seen.allocated.lock().unwrap().last(), Some(&(start + 2 * cs)));
    // A new cluster does not fit: refused, nothing moved.
    let before = st.snapshot();
    let e = write(&img, &st, cs, &vec![2u8; 4096]).unwrap_err();
    assert!(matches!(e, Qcow2Error::VolumeFull { needed, limit } if needed == start + 3 * cs && limit == start + 2 * cs), "{e}");
    assert_eq!(img.allocation(), start + 2 * cs);
    assert_eq!(seen.refused.lock().unwrap().len(), 1);
    // A multi-cluster write that only partly fits is refused whole.
    let e = write(&img, &st, 0, &vec![3u8; 3 * cs as usize]).unwrap_err();
    assert!(matches!(e, Qcow2Error::VolumeFull { .. }));
    assert_eq!(img.allocation(), start + 2 * cs);
    // Writes in place go on.
    write(&img, &st, 4096, &vec![4u8; 4096]).unwrap();
    img.flush_metadata().unwrap();
    let after = st.snapshot();
    assert_eq!(before.len(), after.len());
    // Lifting the limit lets the refused write through.
    img.set_limit(start + 64 * cs);
    write(&img, &st, cs, &vec![2u8; 4096]).unwrap();
    img.flush_metadata().unwrap();
    let report = check(st.as_ref()).unwrap();
    assert_eq!((report.corruptions, report.leaks), (0, 0), "{:?}", report.messages);
    assert_eq!(report.image_end_offset, img.allocation());
}

#[test]
fn limit_counts_refcount_blocks_the_allocation_brings() {
    // 512 B clusters: one refcount block covers 256 clusters (128 KiB), so a refcount block
    // (and table growth) come with allocations; the limit must count them.
    let cs = 512u64;
    let st = Arc::new(MemStorage::new(Vec::new()));
    create(st.as_ref(), &CreateOptions { size: 64 << 20, cluster_size: cs, backing: None }).unwrap();
    let img = Qcow2::open(st.clone(), OpenOptions::default()).unwrap();
    let mut limit = img.allocation() + 8 * cs;
    img.set_limit(limit);
    let mut guest = 0u64;
    let mut refusals = 0;
    for _ in 0..2000 {
        match write(&img, &st, guest, &[7u8; 512]) {
            Ok(()) => guest = (guest + 64 * cs + cs) % (64 << 20),
            Err(Qcow2Error::VolumeFull { needed, limit: l }) => {
                assert!(needed > l);
                assert!(img.allocation() <= l, "allocation {} passed the limit {l}", img.allocation());
                refusals += 1;
                limit += 8 * cs;
                img.set_limit(limit);
            }
            Err(e) => panic!("{e}"),
        }
        assert!(img.allocation() <= limit);
    }
    assert!(refusals > 100, "{refusals} refusals");
    img.flush_metadata().unwrap();
    let report = check(st.as_ref()).unwrap();
    assert_eq!(report.corruptions, 0, "{:?}", report.messages);
}

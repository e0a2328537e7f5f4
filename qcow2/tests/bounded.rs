//! What an image controls is bounded: a crafted image cannot make the engine hold memory in
//! proportion to its size.

use std::sync::Arc;

use thinblk_qcow2::{create, CreateOptions, Mapping, MemStorage, OpenOptions, Qcow2, Storage};

#[test]
fn refcount_blocks_cached_stay_bounded_on_an_image_without_copied_flags() {
    // 512-byte clusters: one refcount block counts 256 clusters (128 KiB of host).
    let cs = 512u64;
    let size = 24u64 << 20;
    let base = MemStorage::default();
    create(&base, &CreateOptions { size, cluster_size: cs, backing: None }).unwrap();
    let st = Arc::new(MemStorage::new(base.snapshot()));
    {
        let img = Qcow2::open(st.clone(), OpenOptions::default()).unwrap();
        let data = vec![0x5au8; 1 << 20];
        for off in (0..size).step_by(data.len()) {
            let mut ranges = Vec::new();
            let t = img.map_write(off, data.len() as u64, &mut ranges).unwrap();
            for r in &ranges {
                let Mapping::Data(h) = r.mapping else { panic!() };
                st.write_at(&data[..r.len as usize], h).unwrap();
            }
            img.write_done(&t, true).unwrap();
        }
        img.flush_metadata().unwrap();
    }
    // Clear COPIED (bit 63) in every L2 entry, as an image from a tool that never sets it:
    // every write in place must now look its cluster's refcount up.
    let mut bytes = st.snapshot();
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1_off = be(&bytes, 40) as usize;
    let l1_size = u32::from_be_bytes(bytes[36..40].try_into().unwrap()) as usize;
    for i in 0..l1_size {
        let l2 = (be(&bytes, l1_off + i * 8) & 0x00ff_ffff_ffff_fe00) as usize;
        for j in 0..(cs as usize / 8) {
            let at = l2 + j * 8;
            let e = be(&bytes, at) & !(1u64 << 63);
            bytes[at..at + 8].copy_from_slice(&e.to_be_bytes());
        }
    }
    let st = Arc::new(MemStorage::new(bytes));
    let img = Qcow2::open(st.clone(), OpenOptions::default()).unwrap();
    let mut most = 0;
    for k in 0..size / cs {
        let mut ranges = Vec::new();
        let t = img.map_write(k * cs, 512, &mut ranges).unwrap();
        img.write_done(&t, true).unwrap();
        most = most.max(img.cached_refblocks());
    }
    let blocks = (img.allocation() / cs).div_ceil(cs * 8 / 16);
    assert!(blocks > 2 * thinblk_qcow2::image::MAX_CACHED_REFBLOCKS as u64, "the image should span more blocks ({blocks})");
    assert!(most <= thinblk_qcow2::image::MAX_CACHED_REFBLOCKS + 1, "{most} refcount blocks cached of {blocks}");
    // (The crafted image stays what it was: `check` calls entries without COPIED errors, as QEMU.)
    img.flush_metadata().unwrap();
}

/// Counts reads, to see how much IO opening an image costs.
struct Counting {
    inner: MemStorage,
    reads: std::sync::atomic::AtomicU64,
}

impl Storage for Counting {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn size(&self) -> std::io::Result<u64> {
        self.inner.size()
    }
}

#[test]
fn opening_reads_each_refcount_block_once_however_often_the_table_names_it() {
    // A refcount table of 64 clusters (4096 entries) whose entries past the first all name
    // one empty block: the scan for the end of allocation must not read it 4095 times.
    let cs = 512u64;
    let base = MemStorage::default();
    create(&base, &CreateOptions { size: 64 << 20, cluster_size: cs, backing: None }).unwrap();
    let mut bytes = base.snapshot();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let old_table = be64(&bytes, 48) as usize;
    let first_block = be64(&bytes, old_table);
    let table = bytes.len().div_ceil(cs as usize) * cs as usize;
    let clusters = 64usize;
    let zero_block = table + clusters * cs as usize;
    bytes.resize(zero_block + cs as usize, 0);
    bytes[table..table + 8].copy_from_slice(&first_block.to_be_bytes());
    for i in 1..clusters * cs as usize / 8 {
        bytes[table + i * 8..table + i * 8 + 8].copy_from_slice(&(zero_block as u64).to_be_bytes());
    }
    bytes[48..56].copy_from_slice(&(table as u64).to_be_bytes());
    bytes[56..60].copy_from_slice(&(clusters as u32).to_be_bytes());
    let st = Arc::new(Counting { inner: MemStorage::new(bytes), reads: Default::default() });
    let img = Qcow2::open(st.clone(), OpenOptions { read_only: true, ..Default::default() });
    let reads = st.reads.load(std::sync::atomic::Ordering::Relaxed);
    assert!(reads < 64, "opening read {reads} times (result: {:?})", img.as_ref().map(|_| ()));
}

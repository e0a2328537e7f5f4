//! Cache invariants that need the engine's private state: a refcount block in write-back is
//! never evicted (so never re-read stale), and a failed write-back finds it to re-dirty it.

use super::*;
use crate::create::{create, CreateOptions};
use crate::storage::MemStorage;
use std::sync::{Condvar, Mutex};

/// A storage that can hold (and then pass or fail) the next write at one offset.
#[derive(Default)]
struct Gate {
    mem: MemStorage,
    /// Offset of the write to hold.
    at: Mutex<Option<u64>>,
    /// 0 idle, 1 a write is held, 2 let it pass, 3 let it fail.
    state: (Mutex<u8>, Condvar),
}

impl Gate {
    fn set(&self, v: u8) {
        *self.state.0.lock().unwrap() = v;
        self.state.1.notify_all();
    }
    fn wait_for(&self, pred: impl Fn(u8) -> bool) -> u8 {
        let mut g = self.state.0.lock().unwrap();
        while !pred(*g) {
            g = self.state.1.wait(g).unwrap();
        }
        *g
    }
}

impl Storage for Gate {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let hold = self.at.lock().unwrap().take_if(|o| *o == offset).is_some();
        if hold {
            self.set(1);
            if self.wait_for(|s| s >= 2) == 3 {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
        }
        self.mem.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn size(&self) -> std::io::Result<u64> {
        self.mem.size()
    }
}

/// 512 B clusters: a refcount block covers 256 clusters (128 KiB), so 70 blocks (more than
/// the cache keeps) cover under 9 MiB.
fn filled_image() -> (Arc<Gate>, Qcow2) {
    let st = Arc::new(Gate::default());
    create(&st.mem, &CreateOptions { size: 16 << 20, cluster_size: 512, backing: None }).unwrap();
    let img = Qcow2::open(st.clone(), OpenOptions::default()).unwrap();
    let mut ranges = Vec::new();
    for i in 0..160u64 {
        ranges.clear();
        let t = img.map_write(i << 16, 1 << 16, &mut ranges).unwrap();
        img.write_done(&t, true).unwrap();
    }
    img.close().unwrap();
    drop(img);
    // Opened again: nothing cached, so every block touched below is read in.
    let img = Qcow2::open(st.clone(), OpenOptions::default()).unwrap();
    let blocks = img.meta.read().unwrap().reftable.iter().filter(|e| **e != 0).count();
    assert!(blocks > MAX_CACHED_REFBLOCKS + 4, "{blocks} refcount blocks");
    assert_eq!(img.cached_refblocks(), 0);
    (st, img)
}

/// Changes a count in block 1, holds the write-back's write of that block, and meanwhile
/// touches every other block (evicting clean ones) and then block 1 again, changing another
/// count in it. Returns the refcount of the first cluster as a fresh open reads it.
fn evict_during_writeback(fail: bool) -> u64 {
    let (st, img) = filled_image();
    let img = Arc::new(img);
    let rb = img.rb_entries;
    let cs = img.cluster_size;
    let x = (rb + 3) * cs;
    let y = (rb + 9) * cs;
    let block1 = {
        let mut m = img.meta.write().unwrap();
        assert_eq!(img.refcount(&mut m, x).unwrap(), 1);
        img.set_refcount(&mut m, x, 5).unwrap();
        m.reftable[1] & REFTABLE_OFFSET_MASK
    };
    *st.at.lock().unwrap() = Some(block1);
    let flusher = {
        let img = img.clone();
        std::thread::spawn(move || img.flush_metadata())
    };
    st.wait_for(|s| s == 1);
    {
        let mut m = img.meta.write().unwrap();
        let blocks = m.reftable.iter().filter(|e| **e != 0).count() as u64;
        for idx in (0..blocks).filter(|&i| i != 1) {
            img.refcount(&mut m, idx * rb * cs).unwrap();
        }
        // Block 1 again: from the cache (5), or re-read from disk before its write landed (1).
        let seen = img.refcount(&mut m, x).unwrap();
        img.set_refcount(&mut m, y, 2).unwrap();
        assert_eq!(seen, 5, "block 1 was evicted during its write-back and re-read stale");
    }
    st.set(if fail { 3 } else { 2 });
    let r = flusher.join().unwrap();
    assert_eq!(r.is_err(), fail);
    img.flush_metadata().unwrap();
    let fresh = Qcow2::open(Arc::new(MemStorage::new(st.mem.snapshot())), OpenOptions { read_only: true, ..Default::default() }).unwrap();
    let mut m = fresh.meta.write().unwrap();
    assert_eq!(fresh.refcount(&mut m, y).unwrap(), 2);
    fresh.refcount(&mut m, x).unwrap()
}

#[test]
fn a_refcount_block_in_write_back_is_never_evicted_and_reread_stale() {
    assert_eq!(evict_during_writeback(false), 5, "a stale copy overwrote the write-back's counts");
}

#[test]
fn a_failed_write_back_re_dirties_the_refcount_blocks_it_carried() {
    assert_eq!(evict_during_writeback(true), 5, "the failed write-back's counts were lost");
}

/// A storage whose flushes fail once the owner's in-use flag was written clear.
#[derive(Default)]
struct FailAfterClear {
    mem: MemStorage,
    /// The in-use flag's offset (owner extension + 24).
    flag_at: Mutex<Option<u64>>,
    cleared: std::sync::atomic::AtomicBool,
}

impl Storage for FailAfterClear {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if Some(offset) == *self.flag_at.lock().unwrap() {
            self.cleared.store(buf == [0u8; 8], Ordering::SeqCst);
        }
        self.mem.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        if self.cleared.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
    fn size(&self) -> std::io::Result<u64> {
        self.mem.size()
    }
}

#[test]
fn a_close_that_fails_after_clearing_the_flag_sets_it_again() {
    let st = Arc::new(FailAfterClear::default());
    create(&st.mem, &CreateOptions { size: 16 << 20, cluster_size: 65536, backing: None }).unwrap();
    let img = Qcow2::open(st.clone(), OpenOptions::default()).unwrap();
    let o = img.owner.expect("an owner extension");
    *st.flag_at.lock().unwrap() = Some(o.offset + 24);
    assert!(img.close().is_err(), "the flush after clearing the flag failed");
    let mut flag = [0u8; 8];
    st.mem.read_at(&mut flag, o.offset + 24).unwrap();
    assert_eq!(u64::from_be_bytes(flag), Owner::IN_USE, "the image reads as closed clean while it is still served");
}

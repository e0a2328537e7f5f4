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
    let o = img.owner().expect("an owner extension");
    *st.flag_at.lock().unwrap() = Some(o.offset + 24);
    assert!(img.close().is_err(), "the flush after clearing the flag failed");
    let mut flag = [0u8; 8];
    st.mem.read_at(&mut flag, o.offset + 24).unwrap();
    assert_eq!(u64::from_be_bytes(flag), Owner::IN_USE, "the image reads as closed clean while it is still served");
}

/// Writes `data` at `off` through the engine, as the data path does.
fn write_through(img: &Qcow2, st: &dyn Storage, off: u64, data: &[u8]) {
    let mut ranges = Vec::new();
    let ticket = img.map_write(off, data.len() as u64, &mut ranges).unwrap();
    for r in &ranges {
        let Mapping::Data(h) = r.mapping else { panic!("write mapped to {:?}", r.mapping) };
        let s = (r.guest - off) as usize;
        st.write_at(&data[s..s + r.len as usize], h).unwrap();
    }
    img.write_done(&ticket, true).unwrap();
}

fn overlay(cs: u64) -> Arc<MemStorage> {
    let st = Arc::new(MemStorage::default());
    let backing = Some(("mid.qcow2".to_string(), "qcow2".to_string()));
    create(st.as_ref(), &CreateOptions { size: 16 << 20, cluster_size: cs, backing }).unwrap();
    st
}

fn on_disk(st: &MemStorage) -> Header {
    read_header(st).unwrap().1
}

#[test]
fn a_backing_change_by_the_engine_survives_close_and_reopen() {
    let st = overlay(65536);
    let img = Qcow2::open(st.clone(), OpenOptions::default()).unwrap();
    let o = img.owner().expect("an owner extension");
    write_through(&img, st.as_ref(), 0, &[1; 4096]);
    img.change_backing(Some(("base.qcow2", "qcow2"))).unwrap();
    assert_eq!(img.header().backing_file.as_deref(), Some("base.qcow2"));
    // Write-backs (the generation goes into the owner extension) and the close go on.
    write_through(&img, st.as_ref(), 1 << 20, &[2; 4096]);
    img.flush_metadata().unwrap();
    let mid = on_disk(&st);
    assert_eq!(mid.owner.map(|x| (x.uuid, x.generation, x.flags)), Some((o.uuid, img.generation(), Owner::IN_USE)));
    img.close().unwrap();
    let h = on_disk(&st);
    assert_eq!((h.backing_file.as_deref(), h.backing_format.as_deref()), (Some("base.qcow2"), Some("qcow2")));
    assert_eq!(h.owner.map(|x| (x.uuid, x.flags)), Some((o.uuid, 0)), "owner extension intact, in-use cleared by close");
    assert_eq!(h.autoclear_features, autoclear::THINBLK);
    let r = crate::check::check(st.as_ref()).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    let again = Qcow2::open(st.clone(), OpenOptions { read_only: true, ..Default::default() }).unwrap();
    assert_eq!(again.header().backing_file.as_deref(), Some("base.qcow2"));
}

#[test]
fn a_change_that_moves_the_owner_extension_moves_the_engine_s_header_writes_with_it() {
    // A small header (all in the first sector): removing the format extension, which comes
    // before the owner extension, moves it up by 16 bytes.
    let st = overlay(65536);
    let img = Qcow2::open(st.clone(), OpenOptions::default()).unwrap();
    let o = img.owner().expect("an owner extension");
    img.change_backing(None).unwrap();
    let moved = img.owner().expect("still there");
    assert_eq!((moved.uuid, moved.offset), (o.uuid, o.offset - 16));
    assert_eq!(img.header().owner.map(|x| x.offset), Some(moved.offset));
    write_through(&img, st.as_ref(), 0, &[3; 4096]);
    img.close().unwrap();
    let h = on_disk(&st);
    assert_eq!((h.backing_file, h.backing_format), (None, None));
    assert_eq!(h.owner.map(|x| (x.offset, x.uuid, x.generation, x.flags)), Some((moved.offset, o.uuid, img.generation(), 0)));
    let r = crate::check::check(st.as_ref()).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
}

/// Watches the generation in the owner extension: set if a write ever takes it backwards.
#[derive(Default)]
struct GenWatch {
    mem: MemStorage,
    /// Offset of the generation (0: not watched yet).
    at: AtomicU64,
    last: AtomicU64,
    backwards: AtomicBool,
    /// Header reads take a millisecond (the window between a change's read and its write).
    slow_header: AtomicBool,
}

impl Storage for GenWatch {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset == 0 && self.slow_header.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.mem.write_at(buf, offset)?;
        let at = self.at.load(Ordering::SeqCst);
        if at != 0 && offset <= at && at + 8 <= offset + buf.len() as u64 {
            let mut g = [0u8; 8];
            self.mem.read_at(&mut g, at)?;
            let g = u64::from_be_bytes(g);
            if self.last.fetch_max(g, Ordering::SeqCst) > g {
                self.backwards.store(true, Ordering::SeqCst);
            }
        }
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn size(&self) -> std::io::Result<u64> {
        self.mem.size()
    }
}

#[test]
fn backing_changes_race_write_backs_without_losing_either() {
    // With a journal, every write-back writes the next generation into the owner extension,
    // which a backing change rewrites too (the whole small header is in its first sector):
    // without the write-backs' lock, a change would write back a generation it read before.
    let dir = std::env::temp_dir().join(format!("thinblk-backing-race-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let st = Arc::new(GenWatch::default());
    let backing = Some(("mid.qcow2".to_string(), "qcow2".to_string()));
    create(&st.mem, &CreateOptions { size: 16 << 20, cluster_size: 4096, backing }).unwrap();
    let journal = Some(JournalOptions { dir: dir.clone(), segment_bytes: 1 << 20 });
    let img = Arc::new(Qcow2::open(st.clone(), OpenOptions { journal, ..Default::default() }).unwrap());
    let o = img.owner().expect("an owner extension");
    st.at.store(o.offset + 16, Ordering::SeqCst);
    st.slow_header.store(true, Ordering::SeqCst);
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (img, st, done) = (img.clone(), st.clone(), done.clone());
        std::thread::spawn(move || {
            for i in 0..300u64 {
                write_through(&img, st.as_ref(), i * 4096 * 3, &[i as u8; 4096]);
                img.flush_metadata().unwrap();
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    // A new name each time: the header write reaches past the owner extension.
    let name = |i: usize| format!("base-{i}{}.qcow2", "x".repeat(i % 7));
    let format = |i: usize| if i % 2 == 0 { "qcow2" } else { "raw" };
    let mut i = 0;
    while !done.load(Ordering::SeqCst) || i < 10 {
        img.change_backing(Some((&name(i), format(i)))).unwrap();
        i += 1;
    }
    writer.join().unwrap();
    st.slow_header.store(false, Ordering::SeqCst);
    assert!(!st.backwards.load(Ordering::SeqCst), "a backing change wrote back an older generation");
    img.close().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let h = read_header(&st.mem).unwrap().1;
    assert_eq!((h.backing_file, h.backing_format.as_deref()), (Some(name(i - 1)), Some(format(i - 1))));
    assert_eq!(h.owner.map(|x| (x.uuid, x.generation, x.flags)), Some((o.uuid, img.generation(), 0)));
    let r = crate::check::check(&st.mem).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    let img = Qcow2::open(st.clone(), OpenOptions { read_only: true, ..Default::default() }).unwrap();
    for i in 0..300u64 {
        let mut ranges = Vec::new();
        img.map_read(i * 4096 * 3, 4096, &mut ranges).unwrap();
        let Mapping::Data(host) = ranges[0].mapping else { panic!("{:?}", ranges[0]) };
        let mut b = [0u8; 4096];
        st.read_at(&mut b, host).unwrap();
        assert!(b.iter().all(|&x| x == i as u8), "write {i}");
    }
}

#[test]
fn a_read_only_engine_refuses_a_backing_change() {
    let st = overlay(65536);
    let img = Qcow2::open(st.clone(), OpenOptions { read_only: true, ..Default::default() }).unwrap();
    let before = st.snapshot();
    assert!(matches!(img.change_backing(Some(("base.qcow2", "qcow2"))), Err(Qcow2Error::ReadOnly(_))));
    assert!(st.snapshot() == before);
}

/// Storage standing in for a block device whose old contents are garbage: nothing past the
/// bump pointer reads zeroes. Counts zeroing and allocation calls; `fail_zeroes` makes
/// zeroings fail.
#[derive(Default)]
struct Garbage {
    mem: MemStorage,
    zeroings: std::sync::atomic::AtomicUsize,
    allocations: std::sync::atomic::AtomicUsize,
    fail_zeroes: std::sync::atomic::AtomicBool,
}

impl Garbage {
    /// An image of `size` bytes with `cs`-byte clusters on storage filled with 0xaa up to
    /// `total` bytes.
    fn image(size: u64, cs: u64, total: u64) -> Arc<Garbage> {
        let st = Arc::new(Garbage::default());
        create(&st.mem, &CreateOptions { size, cluster_size: cs, backing: None }).unwrap();
        let from = st.mem.size().unwrap();
        st.mem.write_at(&vec![0xaa; (total - from) as usize], from).unwrap();
        st
    }
}

impl Storage for Garbage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.mem.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn size(&self) -> std::io::Result<u64> {
        self.mem.size()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if self.fail_zeroes.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.zeroings.fetch_add(1, Ordering::SeqCst);
        self.mem.write_at(&vec![0; len as usize], offset)
    }
    fn allocate(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        self.allocations.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Reads `len` bytes at `off` through the engine (no backing file: unallocated reads zeroes).
fn read_through(img: &Qcow2, st: &dyn Storage, off: u64, len: u64) -> Vec<u8> {
    let mut ranges = Vec::new();
    img.map_read(off, len, &mut ranges).unwrap();
    let mut out = vec![0u8; len as usize];
    for r in &ranges {
        let s = (r.guest - off) as usize;
        match r.mapping {
            Mapping::Data(h) => st.read_at(&mut out[s..s + r.len as usize], h).unwrap(),
            Mapping::Zero | Mapping::Backing => {}
            Mapping::Compressed(_) => panic!("no compressed clusters here"),
        }
    }
    out
}

#[test]
fn partial_writes_into_fresh_clusters_read_zeroes_around_them_with_one_zeroing_per_run() {
    // 4 KiB clusters (an L2 table covers 2 MiB, so tables are allocated between data
    // clusters throughout), 32 MiB image on storage full of garbage: a missing zeroing, or one
    // that wiped a cluster already handed out, shows in the read-back.
    let (size, cs) = (32u64 << 20, 4096u64);
    let st = Garbage::image(size, cs, 48 << 20);
    let img = Qcow2::open(st.clone(), OpenOptions::default()).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |m: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % m
    };
    for i in 0..3000u64 {
        let v = (i % 250 + 1) as u8;
        let (off, len) = match next(4) {
            // A partial write inside one cluster.
            0 | 1 => {
                let len = (next(7) + 1) * 512;
                (next(size / cs) * cs + next((cs - len) / 512 + 1) * 512, len)
            }
            // A whole cluster (no zeroing needed).
            2 => (next(size / cs) * cs, cs),
            // Partial at both ends, across clusters.
            _ => (next(size / 512 - 24) * 512, (next(16) + 2) * 512 + cs),
        };
        write_through(&img, st.as_ref(), off, &vec![v; len as usize]);
        model[off as usize..(off + len) as usize].fill(v);
    }
    for chunk in 0..size / (1 << 20) {
        let got = read_through(&img, st.as_ref(), chunk << 20, 1 << 20);
        assert!(got == model[(chunk << 20) as usize..((chunk + 1) << 20) as usize], "MiB {chunk} differs from the model");
    }
    let zeroings = st.zeroings.load(Ordering::SeqCst) as u64;
    let end = img.allocation();
    // Without zeroing ahead, each partial write into a fresh cluster zeroed its own cluster
    // (one or two calls): over a thousand here.
    assert!(zeroings <= end / ZERO_AHEAD + 1, "{zeroings} zeroings for {end} bytes allocated");
    assert!(zeroings >= 2, "the run should span several zeroed runs ({end} bytes allocated)");
    img.close().unwrap();
    let r = crate::check::check(&st.mem).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    // Reopened, the same contents (what the storage holds, not what the engine remembers).
    let img = Qcow2::open(st.clone(), OpenOptions { read_only: true, ..Default::default() }).unwrap();
    let got = read_through(&img, st.as_ref(), 0, size);
    assert!(got == model, "the reopened image differs from the model");
}

#[test]
fn zeroing_ahead_stops_at_the_allocation_limit() {
    let cs = 65536u64;
    let st = Garbage::image(64 << 20, cs, 64 << 20);
    let img = Qcow2::open(st.clone(), OpenOptions::default()).unwrap();
    let limit = img.allocation() + 4 * cs;
    img.set_limit(limit);
    let mut written = 0u64;
    for ci in 0..8u64 {
        let mut ranges = Vec::new();
        match img.map_write(ci * cs + 512, 4096, &mut ranges) {
            Ok(t) => {
                let Mapping::Data(h) = ranges[0].mapping else { panic!("{:?}", ranges[0]) };
                st.write_at(&[9u8; 4096], h).unwrap();
                img.write_done(&t, true).unwrap();
                written += 1;
            }
            Err(Qcow2Error::VolumeFull { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(written >= 2, "{written} clusters written under a limit of 4 clusters");
    assert_eq!(st.zeroings.load(Ordering::SeqCst), 1, "the clusters below the limit were zeroed ahead, at once");
    let bytes = st.mem.snapshot();
    assert!(bytes[limit as usize..].iter().all(|&b| b == 0xaa), "zeroed past the allocation limit");
    for ci in 0..written {
        let got = read_through(&img, st.as_ref(), ci * cs, cs);
        let ok = got[..512].iter().all(|&b| b == 0) && got[512..4608].iter().all(|&b| b == 9) && got[4608..].iter().all(|&b| b == 0);
        assert!(ok, "cluster {ci}: garbage around the write");
    }
}

#[test]
fn a_failed_zeroing_fails_the_write_and_links_nothing() {
    let cs = 65536u64;
    let st = Garbage::image(16 << 20, cs, 32 << 20);
    let img = Qcow2::open(st.clone(), OpenOptions::default()).unwrap();
    st.fail_zeroes.store(true, Ordering::SeqCst);
    let mut ranges = Vec::new();
    assert!(matches!(img.map_write(512, 4096, &mut ranges), Err(Qcow2Error::Io(_))), "the writer's own fill fails too");
    assert!(ranges.is_empty());
    assert!(read_through(&img, st.as_ref(), 0, cs).iter().all(|&b| b == 0), "a failed write linked a cluster of garbage");
    // The storage heals: the retried write zeroes ahead and lands.
    st.fail_zeroes.store(false, Ordering::SeqCst);
    write_through(&img, st.as_ref(), 512, &[7u8; 4096]);
    let got = read_through(&img, st.as_ref(), 0, cs);
    assert!(got[..512].iter().all(|&b| b == 0) && got[512..4608].iter().all(|&b| b == 7) && got[4608..].iter().all(|&b| b == 0));
    assert_eq!(st.zeroings.load(Ordering::SeqCst), 1, "one zeroing ahead, no fill of its own");
    img.close().unwrap();
    let r = crate::check::check(&st.mem).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
}

#[test]
fn sparse_space_is_allocated_ahead_and_never_zeroed() {
    // Past `zeroes_from` (a file's size at open, its sparse space) the host reads zeroes:
    // nothing is zeroed, and the space at the bump pointer is allocated a range at a time.
    let (size, cs) = (16u64 << 20, 4096u64);
    let st = Arc::new(Garbage::default());
    create(&st.mem, &CreateOptions { size, cluster_size: cs, backing: None }).unwrap();
    let from = st.mem.size().unwrap();
    st.mem.write_at(&vec![0; (32 << 20) - from as usize], from).unwrap();
    let img = Qcow2::open(st.clone(), OpenOptions { zeroes_from: from, ..Default::default() }).unwrap();
    let mut model = vec![0u8; size as usize];
    for i in 0..2000u64 {
        let off = (i * 7919 % (size / 512 - 16)) * 512;
        let len = (i % 8 + 1) * 512 + if i % 5 == 0 { cs } else { 0 };
        let v = (i % 200 + 1) as u8;
        write_through(&img, st.as_ref(), off, &vec![v; len as usize]);
        model[off as usize..(off + len) as usize].fill(v);
    }
    assert_eq!(st.zeroings.load(Ordering::SeqCst), 0, "sparse space was zeroed");
    let (allocations, end) = (st.allocations.load(Ordering::SeqCst) as u64, img.allocation());
    assert!(allocations >= (end - from) / ZERO_AHEAD && allocations <= end / ZERO_AHEAD + 1, "{allocations} allocations for {end} bytes");
    assert!(read_through(&img, st.as_ref(), 0, size) == model, "the image differs from the model");
}

#[test]
fn file_storage_allocates_a_hole_without_changing_its_size_or_contents() {
    use std::os::unix::fs::MetadataExt;
    let path = std::env::temp_dir().join(format!("thinblk-allocate-{}", std::process::id()));
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    f.set_len(8 << 20).unwrap();
    let st = crate::storage::FileStorage::new(f, 1);
    let before = std::fs::metadata(&path).unwrap().blocks();
    let r = st.allocate(1 << 20, 2 << 20);
    let meta = std::fs::metadata(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    if r.as_ref().is_err_and(|e| e.raw_os_error() == Some(libc::EOPNOTSUPP)) {
        eprintln!("fallocate is not supported under {}: nothing to test", std::env::temp_dir().display());
        return;
    }
    r.unwrap();
    assert_eq!(meta.len(), 8 << 20, "allocating changed the size");
    assert!(meta.blocks() >= before + (2 << 20) / 512, "{} blocks of 512 B after allocating 2 MiB ({before} before)", meta.blocks());
    let mut b = vec![1u8; 4096];
    st.read_at(&mut b, 2 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 0), "allocated space does not read zeroes");
}

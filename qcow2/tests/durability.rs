//! The durability rules, each with a deterministic test that fails without its fix:
//! in-place writes into zero clusters, the sync before L2 tables, stale L2 reads, the L2
//! cache bound, the journal (daemon-crash contract) and the reuse of freed clusters.

mod common;

use std::io;
use std::sync::{Arc, Condvar, Mutex};

use thinblk_qcow2::{check, create, CreateOptions, JournalOptions, Mapping, MemStorage, OpenOptions, Qcow2, Storage};

/// A storage that logs its IO (writes with their offsets, syncs), and can hold one read.
#[derive(Default)]
struct Logged {
    mem: MemStorage,
    log: Mutex<Vec<Ev>>,
    /// Hold the next read at this offset until released.
    gate: Mutex<Option<u64>>,
    held: (Mutex<u8>, Condvar),
}

#[derive(Clone, Debug, PartialEq)]
enum Ev {
    Write(u64, usize),
    Sync,
}

impl Logged {
    fn new(bytes: Vec<u8>) -> Logged {
        Logged { mem: MemStorage::new(bytes), ..Default::default() }
    }
    fn take_log(&self) -> Vec<Ev> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
    /// State of the gate: 0 idle, 1 a read is held, 2 released.
    fn set_held(&self, v: u8) {
        *self.held.0.lock().unwrap() = v;
        self.held.1.notify_all();
    }
    fn wait_held(&self, v: u8) {
        let mut g = self.held.0.lock().unwrap();
        while *g != v {
            g = self.held.1.wait(g).unwrap();
        }
    }
}

impl Storage for Logged {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Read first, then hold: the copy is taken before whatever happens while held.
        self.mem.read_at(buf, offset)?;
        let hold = { self.gate.lock().unwrap().take_if(|g| *g == offset).is_some() };
        if hold {
            self.set_held(1);
            self.wait_held(2);
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.log.lock().unwrap().push(Ev::Write(offset, buf.len()));
        self.mem.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.log.lock().unwrap().push(Ev::Sync);
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        self.mem.size()
    }
}

fn image(cs: u64, size: u64) -> Vec<u8> {
    let base = MemStorage::default();
    create(&base, &CreateOptions { size, cluster_size: cs, backing: None }).unwrap();
    base.snapshot()
}

/// Maps, writes and links one guest write (what a worker does).
fn write(img: &Qcow2, st: &dyn Storage, off: u64, data: &[u8]) -> Vec<u64> {
    let mut ranges = Vec::new();
    let ticket = img.map_write(off, data.len() as u64, &mut ranges).unwrap();
    let mut hosts = Vec::new();
    for r in &ranges {
        let Mapping::Data(h) = r.mapping else { panic!("write mapped to {:?}", r.mapping) };
        let s = (r.guest - off) as usize;
        st.write_at(&data[s..s + r.len as usize], h).unwrap();
        hosts.push(h);
    }
    img.write_done(&ticket, true).unwrap();
    hosts
}

fn zero(img: &Qcow2, st: &dyn Storage, off: u64, len: u64) {
    let mut partial = Vec::new();
    let t = img.zero_range(off, len, &mut partial, &mut Vec::new()).unwrap();
    for r in &partial {
        let Mapping::Data(h) = r.mapping else { panic!() };
        st.write_at(&vec![0u8; r.len as usize], h).unwrap();
    }
    img.write_done(&t, true).unwrap();
}

fn read(img: &Qcow2, st: &dyn Storage, off: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut ranges = Vec::new();
    img.map_read(off, len as u64, &mut ranges).unwrap();
    for r in ranges {
        let s = (r.guest - off) as usize;
        let dst = &mut out[s..s + r.len as usize];
        match r.mapping {
            Mapping::Data(h) => st.read_at(dst, h).unwrap(),
            _ => dst.fill(0),
        }
    }
    out
}

fn check_clean(bytes: Vec<u8>) {
    let r = check(&MemStorage::new(bytes)).unwrap();
    assert_eq!(r.corruptions, 0, "corrupt: {:?}", r.messages);
}

#[test]
fn rewrite_after_discard_goes_in_place_and_never_grows() {
    for cs in [512u64, 4096, 65536] {
        let bytes = image(cs, 8 << 20);
        let st = Arc::new(MemStorage::new(bytes));
        // Nothing is known to read zeroes: old data would show through a missed fill.
        let img = Qcow2::open(st.clone(), OpenOptions::default()).unwrap();
        let region = 16 * cs;
        let first = write(&img, st.as_ref(), 0, &vec![0xaa; region as usize]);
        img.flush_metadata().unwrap();
        let end = img.allocation();
        for round in 0..20u8 {
            zero(&img, st.as_ref(), 0, region);
            assert_eq!(read(&img, st.as_ref(), 0, region as usize), vec![0; region as usize]);
            // A partial rewrite of each cluster: the rest must read zeroes, not the old 0xaa.
            for c in 0..16 {
                let hosts = write(&img, st.as_ref(), c * cs + cs / 4, &vec![round + 1; (cs / 2) as usize]);
                assert_eq!(hosts[0], first[0] + c * cs + cs / 4, "cs {cs}: guest cluster {c} moved");
            }
            let got = read(&img, st.as_ref(), 0, cs as usize);
            assert!(got[..(cs / 4) as usize].iter().all(|&b| b == 0), "cs {cs}: old data before the write");
            assert!(got[(cs / 4) as usize..(3 * cs / 4) as usize].iter().all(|&b| b == round + 1));
            assert!(got[(3 * cs / 4) as usize..].iter().all(|&b| b == 0), "cs {cs}: old data after the write");
            img.flush_metadata().unwrap();
        }
        assert_eq!(img.allocation(), end, "cs {cs}: churn grew the image");
        check_clean(st.snapshot());
    }
}

#[test]
fn data_is_synced_before_an_l2_entry_even_without_refcount_changes() {
    let cs = 65536;
    let st = Arc::new(Logged::new(image(cs, 8 << 20)));
    let img = Qcow2::open(st.clone(), OpenOptions::default()).unwrap();
    write(&img, st.as_ref(), 0, &vec![1; cs as usize]);
    zero(&img, st.as_ref(), 0, cs);
    img.flush_metadata().unwrap();
    st.take_log();
    // In place: only the L2 table changes. Its write must come after a sync of the data.
    let hosts = write(&img, st.as_ref(), 0, &vec![2; cs as usize]);
    img.flush_metadata().unwrap();
    let log = st.take_log();
    let data = log.iter().position(|e| *e == Ev::Write(hosts[0], cs as usize)).expect("data write");
    let l2 = log.iter().enumerate().position(|(i, e)| i > data && matches!(e, Ev::Write(..))).expect("an L2 write");
    assert!(log[data..l2].contains(&Ev::Sync), "L2 table written before the data was synced: {log:?}");
}

#[test]
fn a_stale_l2_read_never_replaces_a_newer_table() {
    let cs = 4096u64;
    let l2_span = cs / 8 * cs; // guest bytes one L2 table maps
    let bytes = {
        let st = Arc::new(MemStorage::new(image(cs, 8 * l2_span)));
        let img = Qcow2::open(st.clone(), OpenOptions::default()).unwrap();
        for t in 0..3 {
            write(&img, st.as_ref(), t * l2_span, &[9; 512]);
        }
        img.flush_metadata().unwrap();
        st.snapshot()
    };
    let st = Arc::new(Logged::new(bytes));
    let img = Arc::new(Qcow2::open(st.clone(), OpenOptions { l2_cache_bytes: Some(2 * cs), ..Default::default() }).unwrap());
    // Where table 0 lives: the L1 entry of guest cluster 0.
    let l1_off = img.header().l1_table_offset;
    let mut e = [0u8; 8];
    st.read_at(&mut e, l1_off).unwrap();
    let table0 = u64::from_be_bytes(e) & 0x00ff_ffff_ffff_fe00;
    // A reader loads table 0 and is held after its read (as a slow queue).
    *st.gate.lock().unwrap() = Some(table0);
    let reader = {
        let (img, st) = (img.clone(), st.clone());
        std::thread::spawn(move || read(&img, st.as_ref(), 0, 512))
    };
    st.wait_held(1);
    // Meanwhile another queue loads table 0, links a new cluster, writes it back, and the
    // table is evicted by two others.
    write(&img, st.as_ref(), 8 * cs, &[7; 512]);
    img.flush_metadata().unwrap();
    read(&img, st.as_ref(), l2_span, 512);
    read(&img, st.as_ref(), 2 * l2_span, 512);
    st.set_held(2);
    assert_eq!(reader.join().unwrap(), vec![9; 512]);
    // The stale copy (without the new link) must not be the one cached now.
    assert_eq!(read(&img, st.as_ref(), 8 * cs, 512), vec![7; 512], "a stale L2 table replaced the current one");
    // And a write-back never writes it over the newer one.
    write(&img, st.as_ref(), 16 * cs, &[5; 512]);
    img.flush_metadata().unwrap();
    assert_eq!(read(&img, st.as_ref(), 8 * cs, 512), vec![7; 512]);
}

#[test]
fn l2_cache_stays_within_its_size_without_any_flush() {
    let cs = 4096u64;
    let l2_span = cs / 8 * cs;
    let tables = 64;
    let st = Arc::new(MemStorage::new(image(cs, tables * l2_span)));
    let cap = 4u64;
    let img = Qcow2::open(st.clone(), OpenOptions { l2_cache_bytes: Some(cap * cs), ..Default::default() }).unwrap();
    let mut rng = common::Rng(42);
    let mut most = 0;
    for i in 0..2000u64 {
        let off = rng.below(tables * l2_span / 512) * 512;
        write(&img, st.as_ref(), off, &[(i as u8) | 1; 512]);
        most = most.max(img.cached_l2_tables());
    }
    // One request maps one table here; the write-back evicts down to the size.
    assert!(most as u64 <= cap + 1, "{most} tables cached with a cache of {cap}");
    img.flush_metadata().unwrap();
    check_clean(st.snapshot());
}

fn journal(dir: &std::path::Path) -> JournalOptions {
    JournalOptions { dir: dir.to_path_buf(), segment_bytes: 1 << 20 }
}

/// The journal file in `dir` (named by the image's uuid), if there is one.
fn jfile(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "journal"))
}

struct TempDir(std::path::PathBuf);
impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("thinblk-durability-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn completed_writes_survive_a_daemon_crash_through_the_journal() {
    for cs in [512u64, 65536] {
        let dir = TempDir::new(&format!("crash-{cs}"));
        let size = 32 << 20;
        let st = Arc::new(MemStorage::new(image(cs, size)));
        let opts = || OpenOptions { journal: Some(journal(&dir.0)), ..Default::default() };
        let img = Qcow2::open(st.clone(), opts()).unwrap();
        let mut rng = common::Rng(cs);
        let mut model = vec![0u8; size as usize];
        for i in 0..400u64 {
            let len = (1 + rng.below(8)) * 512;
            let off = rng.below((size - len) / 512) * 512;
            if i % 7 == 3 {
                zero(&img, st.as_ref(), off, len);
                model[off as usize..(off + len) as usize].fill(0);
            } else {
                let data = vec![(i as u8) | 1; len as usize];
                write(&img, st.as_ref(), off, &data);
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            if i == 150 {
                // One FLUSH in the middle: the journal rotates and clears.
                img.flush_metadata().unwrap();
            }
        }
        // The daemon dies: nothing more is written back; only what reached the kernel stays.
        drop(img);
        let crashed = Arc::new(MemStorage::new(st.snapshot()));
        let back = Qcow2::open(crashed.clone(), opts()).unwrap();
        let rep = back.replayed().cloned().expect("a replay");
        assert!(rep.records > 0 && !rep.stale_boot);
        assert_eq!(read(&back, crashed.as_ref(), 0, size as usize), model, "cs {cs}: a completed write was lost");
        // Replayed in order: the image is consistent on disk before any new write.
        let r = check(&MemStorage::new(crashed.snapshot())).unwrap();
        assert_eq!(r.corruptions, 0, "cs {cs}: {:?}", r.messages);
        back.close().unwrap();
        assert!(jfile(&dir.0).is_none(), "a clean close removes the journal");
    }
}

#[test]
fn without_the_journal_unflushed_links_are_lost() {
    // The contrast that shows the test above tests something.
    let cs = 65536;
    let st = Arc::new(MemStorage::new(image(cs, 8 << 20)));
    let img = Qcow2::open(st.clone(), OpenOptions::default()).unwrap();
    write(&img, st.as_ref(), 0, &[3; 512]);
    drop(img);
    let back = Qcow2::open(Arc::new(MemStorage::new(st.snapshot())), OpenOptions::default()).unwrap();
    let mut ranges = Vec::new();
    back.map_read(0, 512, &mut ranges).unwrap();
    assert_eq!(ranges[0].mapping, Mapping::Backing);
}

/// A storage that fails writes into one range while armed.
struct FailAt {
    mem: MemStorage,
    range: Mutex<Option<(u64, u64)>>,
}

impl Storage for FailAt {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.mem.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        self.mem.size()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if let Some((a, b)) = *self.range.lock().unwrap() {
            if offset < b && a < offset + len {
                return Err(io::Error::from_raw_os_error(libc_eio()));
            }
        }
        self.mem.write_at(&vec![0; len as usize], offset)
    }
}

fn libc_eio() -> i32 {
    5
}

#[test]
fn a_freed_cluster_is_reused_only_after_its_release_is_durable() {
    let cs = 4096u64;
    let st = Arc::new(FailAt { mem: MemStorage::new(image(cs, 8 << 20)), range: Mutex::new(None) });
    let img = Qcow2::open(st.clone(), OpenOptions::default()).unwrap();
    write(&img, st.as_ref(), 0, &[1; 4096]);
    let end = img.allocation();
    // The next allocation is at `end`; its fill fails, so it is released.
    *st.range.lock().unwrap() = Some((end, end + cs));
    let mut ranges = Vec::new();
    assert!(img.map_write(cs + 512, 512, &mut ranges).is_err());
    *st.range.lock().unwrap() = None;
    // Not reused before the release is written back: a new cluster comes from the pointer.
    let h1 = write(&img, st.as_ref(), 2 * cs, &[2; 4096]);
    assert_ne!(h1[0], end);
    img.flush_metadata().unwrap();
    let before = img.allocation();
    let h2 = write(&img, st.as_ref(), 3 * cs, &[3; 4096]);
    assert_eq!(h2[0], end, "the durably freed cluster is reused");
    assert_eq!(img.allocation(), before, "reuse does not move the allocation mark");
    img.flush_metadata().unwrap();
    assert_eq!(read(&img, st.as_ref(), 3 * cs, 4096), vec![3; 4096]);
    check_clean(st.mem.snapshot());
}

#[test]
fn a_new_refcount_block_is_synced_before_the_table_names_it() {
    // 512-byte clusters: a refcount block counts 256 clusters, so writes soon need new ones.
    let cs = 512u64;
    let st = Arc::new(Logged::new(image(cs, 8 << 20)));
    let img = Qcow2::open(st.clone(), OpenOptions::default()).unwrap();
    let rt = img.header().refcount_table_offset;
    let rt_end = rt + u64::from(img.header().refcount_table_clusters) * cs;
    let mut seen = 0;
    for i in 0..40u64 {
        st.take_log();
        for k in 0..16 {
            write(&img, st.as_ref(), (i * 16 + k) * 8 * cs, &[1; 512]);
        }
        img.flush_metadata().unwrap();
        let log = st.take_log();
        // Where the refcount table is written (in place: it has not moved), every write
        // before it in this write-back (the blocks) must be followed by a sync first.
        let Some(t) = log.iter().position(|e| matches!(e, Ev::Write(off, _) if *off >= rt && *off < rt_end)) else { continue };
        let last_block = log[..t].iter().rposition(|e| matches!(e, Ev::Write(..)));
        if let Some(b) = last_block {
            assert!(log[b..t].contains(&Ev::Sync), "refcount table written before its new block was synced: {log:?}");
            seen += 1;
        }
    }
    assert!(seen > 0, "no write-back added a refcount block");
}

#[test]
fn an_image_that_fails_to_open_leaves_no_journal() {
    let dir = TempDir::new("badimage");
    let st = Arc::new(MemStorage::new(vec![0x5a; 1 << 16]));
    let opts = OpenOptions { journal: Some(journal(&dir.0)), ..Default::default() };
    assert!(Qcow2::open(st, opts).is_err());
    assert!(jfile(&dir.0).is_none());
}

#[test]
fn allocations_whose_writes_never_completed_are_given_back_after_a_crash() {
    let cs = 65536u64;
    let dir = TempDir::new("crash-leak");
    let size = 16 << 20;
    let st = Arc::new(MemStorage::new(image(cs, size)));
    let opts = || OpenOptions { journal: Some(journal(&dir.0)), ..Default::default() };
    let img = Qcow2::open(st.clone(), opts()).unwrap();
    let data = vec![0x77u8; 4096];
    write(&img, st.as_ref(), 0, &data);
    // Two writes in flight when the daemon dies: their clusters are allocated (and, after
    // this write-back, counted on disk), never linked.
    let mut ranges = Vec::new();
    let _t1 = img.map_write(4 << 20, 4096, &mut ranges).unwrap();
    let _t2 = img.map_write(8 << 20, 4096, &mut ranges).unwrap();
    img.flush_metadata().unwrap();
    // SIGKILL: no destructor runs, the journal file (empty after that write-back) stays. The
    // dead process's file is copied: this process still holds the original's lock.
    let after = TempDir::new("crash-leak-after");
    let j = jfile(&dir.0).unwrap();
    std::fs::copy(&j, after.0.join(j.file_name().unwrap())).unwrap();
    let crashed = Arc::new(MemStorage::new(st.snapshot()));
    std::mem::forget(img);
    assert!(check(&MemStorage::new(crashed.snapshot())).unwrap().leaks >= 2, "the crash leaves leaks to repair");
    let back = Qcow2::open(crashed.clone(), OpenOptions { journal: Some(journal(&after.0)), ..Default::default() }).unwrap();
    assert_eq!(back.replayed().map(|r| r.leaks_repaired), Some(2));
    assert_eq!(read(&back, crashed.as_ref(), 0, 4096), data, "completed write kept");
    let r = check(&MemStorage::new(crashed.snapshot())).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    // The clusters given back are used again before the image grows.
    let end = back.allocation();
    let mut ranges = Vec::new();
    let t = back.map_write(12 << 20, 4096, &mut ranges).unwrap();
    back.write_done(&t, true).unwrap();
    assert_eq!(back.allocation(), end, "a freed cluster was reused");
    back.close().unwrap();
}

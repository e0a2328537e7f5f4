//! One writer, one truth: the owner extension, the journal bound to the image's state, the
//! sealed journal, leaks given back after a host crash, and bounded releases while
//! write-backs fail. Each test fails without its fix.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use thinblk_qcow2::header::{autoclear, Owner};
use thinblk_qcow2::{check, create, CreateOptions, FileStorage, JournalOptions, Mapping, MemStorage, OpenOptions, Qcow2, Qcow2Error, Storage};

struct TempDir(PathBuf);
impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("thinblk-ownership-{}-{name}", std::process::id()));
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

fn journal(dir: &Path, segment_bytes: usize) -> Option<JournalOptions> {
    Some(JournalOptions { dir: dir.to_path_buf(), segment_bytes })
}

fn jfile(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "journal"))
}

/// A crashed process's journal, as the next process finds it (this one still holds the
/// original's lock): copied to `to`.
fn copy_journal(from: &Path, to: &Path) {
    let j = jfile(from).expect("a journal");
    std::fs::copy(&j, to.join(j.file_name().unwrap())).unwrap();
}

fn image_file(path: &Path, cs: u64, size: u64) -> Arc<FileStorage> {
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).unwrap();
    let st = FileStorage::new(f, 1);
    create(&st, &CreateOptions { size, cluster_size: cs, backing: None }).unwrap();
    Arc::new(st)
}

fn reopen_file(path: &Path) -> Arc<FileStorage> {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    Arc::new(FileStorage::new(f, 1))
}

fn write(img: &Qcow2, st: &dyn Storage, off: u64, data: &[u8]) -> Result<(), Qcow2Error> {
    let mut ranges = Vec::new();
    let ticket = img.map_write(off, data.len() as u64, &mut ranges)?;
    for r in &ranges {
        let Mapping::Data(h) = r.mapping else { panic!("write mapped to {:?}", r.mapping) };
        let s = (r.guest - off) as usize;
        st.write_at(&data[s..s + r.len as usize], h)?;
    }
    img.write_done(&ticket, true)
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

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img").args(args).output().expect("qemu-img")
}

#[test]
fn the_owner_extension_is_written_at_open_and_kept_by_qemu() {
    let dir = TempDir::new("owner");
    let path = dir.0.join("img.qcow2");
    let out = qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", path.to_str().unwrap(), "64M"]);
    assert!(out.status.success(), "{out:?}");
    // A persistent bitmap: its autoclear bit must be cleared before thinblk writes anything.
    let out = qemu_img(&["bitmap", "--add", path.to_str().unwrap(), "b0"]);
    assert!(out.status.success(), "{out:?}");
    // Dirtied and stored by QEMU: a directory, a table and data clusters that the check must
    // count as referenced (a repair would free them otherwise).
    let out = Command::new("qemu-io").args(["-c", "write 0 1M", path.to_str().unwrap()]).output().expect("qemu-io");
    assert!(out.status.success(), "{out:?}");
    let r = check(reopen_file(&path).as_ref()).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "bitmap clusters seen as leaks: {:?}", r.messages);
    let st = reopen_file(&path);
    let img = Qcow2::open(st.clone(), OpenOptions::default()).unwrap();
    let o = img.owner().expect("owner extension");
    let on_disk = Qcow2::open(reopen_file(&path), OpenOptions { read_only: true, ..Default::default() }).unwrap();
    let h = on_disk.header();
    assert_eq!(h.autoclear_features, autoclear::THINBLK, "bitmaps bit cleared, ours set, before any write");
    assert_eq!(h.owner.map(|x| (x.uuid, x.generation, x.flags)), Some((o.uuid, 1, Owner::IN_USE)));
    drop(on_disk);
    write(&img, st.as_ref(), 0, &[5; 4096]).unwrap();
    img.close().unwrap();
    drop(img);
    let h = Qcow2::open(reopen_file(&path), OpenOptions { read_only: true, ..Default::default() }).unwrap().header().clone();
    assert_eq!(h.owner.map(|x| x.flags), Some(0), "a clean close clears the in-use flag");
    // QEMU keeps the extension it does not know, and clears our bit when it opens for writing.
    let out = qemu_img(&["check", "-r", "leaks", path.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let h = Qcow2::open(reopen_file(&path), OpenOptions { read_only: true, ..Default::default() }).unwrap().header().clone();
    assert_eq!(h.owner.map(|x| x.uuid), Some(o.uuid), "the extension survives qemu-img");
    assert_eq!(h.autoclear_features & autoclear::THINBLK, 0, "qemu-img cleared thinblk's autoclear bit");
    // The second open (another generation) reads as QEMU wrote it, and the data is intact.
    let img = Qcow2::open(reopen_file(&path), OpenOptions::default()).unwrap();
    assert_eq!(img.owner().map(|x| (x.uuid, x.generation)), Some((o.uuid, 2)));
    img.close().unwrap();
    let out = qemu_img(&["check", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

/// Serves `path` with a journal in `jdir`, writes without a FLUSH, and "dies": returns the
/// data written, with the journal left as a crash leaves it in `after`.
fn crash_with_journal(path: &Path, jdir: &Path, after: &Path) -> Vec<u8> {
    let st = reopen_file(path);
    let img = Qcow2::open(st.clone(), OpenOptions { journal: journal(jdir, 1 << 20), ..Default::default() }).unwrap();
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    write(&img, st.as_ref(), 1 << 20, &data).unwrap();
    copy_journal(jdir, after);
    drop(img);
    data
}

#[test]
fn a_journal_is_never_replayed_into_an_image_another_program_changed() {
    for (name, args) in [("check", vec!["check", "-r", "leaks"]), ("snapshot", vec!["snapshot", "-c", "s1"])] {
        let dir = TempDir::new(&format!("foreign-{name}"));
        let (jdir, after) = (dir.0.join("j"), dir.0.join("after"));
        std::fs::create_dir_all(&jdir).unwrap();
        std::fs::create_dir_all(&after).unwrap();
        let path = dir.0.join("img.qcow2");
        image_file(&path, 65536, 64 << 20);
        let data = crash_with_journal(&path, &jdir, &after);
        // Replayable as it is: the same bytes again (checked on a copy).
        let copy = dir.0.join("copy.qcow2");
        std::fs::copy(&path, &copy).unwrap();
        let back_dir = dir.0.join("back");
        std::fs::create_dir_all(&back_dir).unwrap();
        copy_journal(&after, &back_dir);
        let st = reopen_file(&copy);
        let back = Qcow2::open(st.clone(), OpenOptions { journal: journal(&back_dir, 1 << 20), ..Default::default() }).unwrap();
        assert!(back.replayed().is_some_and(|r| r.records > 0));
        assert_eq!(read(&back, st.as_ref(), 1 << 20, data.len()), data);
        back.close().unwrap();
        // Another program opens the image for writing between the crash and the restart.
        let mut a = args.clone();
        a.push(path.to_str().unwrap());
        let out = qemu_img(&a);
        assert!(out.status.success(), "{name}: {out:?}");
        if name == "snapshot" {
            // Deleted again (an image with internal snapshots is refused for writing anyway).
            let out = qemu_img(&["snapshot", "-d", "s1", path.to_str().unwrap()]);
            assert!(out.status.success(), "{out:?}");
        }
        let e = match Qcow2::open(reopen_file(&path), OpenOptions { journal: journal(&after, 1 << 20), ..Default::default() }) {
            Ok(_) => panic!("{name}: the journal was replayed into an image qemu-img changed"),
            Err(e) => e,
        };
        let msg = e.to_string();
        assert!(matches!(e, Qcow2Error::JournalMismatch(_)), "{name}: {msg}");
        assert!(msg.contains("another program") && msg.contains("qemu-img check -r all"), "{name}: {msg}");
        assert!(jfile(&after).is_some(), "{name}: the refused journal is kept");
    }
}

#[test]
fn a_journal_is_never_replayed_into_an_older_copy_or_after_serving_elsewhere() {
    let dir = TempDir::new("copies");
    let (jdir, after) = (dir.0.join("j"), dir.0.join("after"));
    std::fs::create_dir_all(&jdir).unwrap();
    std::fs::create_dir_all(&after).unwrap();
    let path = dir.0.join("img.qcow2");
    image_file(&path, 65536, 64 << 20);
    // A copy of the image taken while it is served (a backup by LV snapshot), then more
    // write-backs, then a crash.
    let st = reopen_file(&path);
    let img = Qcow2::open(st.clone(), OpenOptions { journal: journal(&jdir, 1 << 20), ..Default::default() }).unwrap();
    write(&img, st.as_ref(), 0, &[1; 4096]).unwrap();
    img.flush_metadata().unwrap();
    let old = dir.0.join("old.qcow2");
    std::fs::copy(&path, &old).unwrap();
    write(&img, st.as_ref(), 1 << 20, &[2; 4096]).unwrap();
    img.flush_metadata().unwrap();
    write(&img, st.as_ref(), 2 << 20, &[3; 4096]).unwrap();
    copy_journal(&jdir, &after);
    drop(img);
    // The older copy restored: refused.
    let e = Qcow2::open(reopen_file(&old), OpenOptions { journal: journal(&after, 1 << 20), ..Default::default() }).err().expect("refused");
    assert!(e.to_string().contains("older than the journal"), "{e}");
    // Served by another process (no journal there) and written back since: refused.
    let elsewhere = dir.0.join("elsewhere.qcow2");
    std::fs::copy(&path, &elsewhere).unwrap();
    let st2 = reopen_file(&elsewhere);
    let other = Qcow2::open(st2.clone(), OpenOptions::default()).unwrap();
    write(&other, st2.as_ref(), 3 << 20, &[4; 4096]).unwrap();
    other.close().unwrap();
    let e = Qcow2::open(st2, OpenOptions { journal: journal(&after, 1 << 20), ..Default::default() }).err().expect("refused");
    assert!(e.to_string().contains("newer than the journal"), "{e}");
    // The image itself: replayed, every completed write there.
    let st = reopen_file(&path);
    let back = Qcow2::open(st.clone(), OpenOptions { journal: journal(&after, 1 << 20), ..Default::default() }).unwrap();
    assert_eq!(read(&back, st.as_ref(), 2 << 20, 4096), vec![3; 4096]);
    assert_eq!(read(&back, st.as_ref(), 1 << 20, 4096), vec![2; 4096]);
    back.close().unwrap();
}

#[test]
fn clusters_a_host_crash_leaked_are_given_back_without_a_journal() {
    let cs = 65536u64;
    let st = Arc::new(MemStorage::default());
    create(st.as_ref(), &CreateOptions { size: 16 << 20, cluster_size: cs, backing: None }).unwrap();
    let img = Qcow2::open(st.clone(), OpenOptions::default()).unwrap();
    write(&img, st.as_ref(), 0, &[7; 4096]).unwrap();
    // Two writes in flight at the power loss: allocated and counted on disk, never linked.
    let mut ranges = Vec::new();
    let _t1 = img.map_write(4 << 20, 4096, &mut ranges).unwrap();
    let _t2 = img.map_write(8 << 20, 4096, &mut ranges).unwrap();
    img.flush_metadata().unwrap();
    let crashed = Arc::new(MemStorage::new(st.snapshot()));
    drop(img);
    assert!(check(&MemStorage::new(crashed.snapshot())).unwrap().leaks >= 2);
    // No journal (tmpfs is gone): the in-use flag says the image was not closed clean.
    let back = Qcow2::open(crashed.clone(), OpenOptions::default()).unwrap();
    let rep = back.replayed().cloned().expect("a report");
    assert!(rep.unclean);
    assert_eq!(rep.leaks_repaired, 2);
    let r = check(&MemStorage::new(crashed.snapshot())).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    assert_eq!(read(&back, crashed.as_ref(), 0, 4096), vec![7; 4096]);
    back.close().unwrap();
    // Closed clean: nothing to repair next time.
    let again = Qcow2::open(crashed, OpenOptions::default()).unwrap();
    assert!(again.replayed().is_none());
}

/// A storage whose writes can be held: while `hold` is set, every write past `from` waits.
struct Held {
    mem: MemStorage,
    from: AtomicU64,
    hold: AtomicBool,
    fail: AtomicBool,
    cv: (Mutex<()>, Condvar),
    waiting: AtomicU64,
}

impl Held {
    fn new(mem: MemStorage) -> Held {
        Held {
            mem,
            from: AtomicU64::new(u64::MAX),
            hold: AtomicBool::new(false),
            fail: AtomicBool::new(false),
            cv: (Mutex::new(()), Condvar::new()),
            waiting: AtomicU64::new(0),
        }
    }
    fn release(&self) {
        self.hold.store(false, Ordering::SeqCst);
        let _g = self.cv.0.lock().unwrap();
        self.cv.1.notify_all();
    }
}

impl Storage for Held {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(5));
        }
        if offset < self.from.load(Ordering::SeqCst) {
            return self.mem.write_at(buf, offset);
        }
        let mut g = self.cv.0.lock().unwrap();
        self.waiting.fetch_add(1, Ordering::SeqCst);
        while self.hold.load(Ordering::SeqCst) {
            g = self.cv.1.wait(g).unwrap();
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        drop(g);
        self.mem.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        self.mem.size()
    }
}

#[test]
fn a_full_journal_holds_completions_and_never_loses_one() {
    // 512 B clusters and a tiny journal (two 8 KiB segments, ~330 records). A 256 KiB write
    // (512 clusters) is mapped; a write-back is then held at the storage, and the write's
    // completion links its 512 clusters: the journal fills and seals part way. Another
    // writer rewrites, in place, the last cluster (whose link the journal could not take).
    // A snapshot of the image and the journal taken then is what a SIGKILL leaves: every
    // write that completed must read back from it.
    let dir = TempDir::new("seal");
    let after = TempDir::new("seal-after");
    let cs = 512u64;
    let mem = MemStorage::default();
    create(&mem, &CreateOptions { size: 8 << 20, cluster_size: cs, backing: None }).unwrap();
    let st = Arc::new(Held::new(mem));
    let img = Arc::new(Qcow2::open(st.clone(), OpenOptions { journal: journal(&dir.0, 8192), ..Default::default() }).unwrap());
    let x = 1u64 << 20;
    let len = 512 * cs;
    let mut ranges = Vec::new();
    let ticket = img.map_write(x, len, &mut ranges).unwrap();
    for r in &ranges {
        let Mapping::Data(h) = r.mapping else { panic!() };
        st.mem.write_at(&vec![0x11; r.len as usize], h).unwrap();
    }
    // Hold every metadata write: a write-back starts and stays in flight.
    st.from.store(0, Ordering::SeqCst);
    st.hold.store(true, Ordering::SeqCst);
    let flusher = {
        let img = img.clone();
        std::thread::spawn(move || img.flush_metadata())
    };
    while st.waiting.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let completed: Arc<Mutex<Vec<(u64, u64, u8)>>> = Arc::default();
    let w1 = {
        let (img, completed) = (img.clone(), completed.clone());
        std::thread::spawn(move || {
            if img.write_done(&ticket, true).is_ok() {
                completed.lock().unwrap().push((x, len, 0x11));
            }
        })
    };
    let t0 = std::time::Instant::now();
    while !img.write_through_active() && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(img.write_through_active(), "the journal did not fill");
    // In place into the last cluster of the first write.
    let last = x + len - cs;
    let w2 = {
        let (img, st, completed) = (img.clone(), st.clone(), completed.clone());
        std::thread::spawn(move || {
            let mut ranges = Vec::new();
            let Ok(t) = img.map_write(last, cs, &mut ranges) else { return };
            for r in &ranges {
                let Mapping::Data(h) = r.mapping else { return };
                st.mem.write_at(&vec![0x22; r.len as usize], h).unwrap();
            }
            if img.write_done(&t, true).is_ok() {
                completed.lock().unwrap().push((last, cs, 0x22));
            }
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The crash: what the storage and the journal hold now.
    let image_now = st.mem.snapshot();
    copy_journal(&dir.0, &after.0);
    let done_now = completed.lock().unwrap().clone();
    st.release();
    flusher.join().unwrap().unwrap();
    w1.join().unwrap();
    w2.join().unwrap();
    let crashed = Arc::new(MemStorage::new(image_now));
    let back = Qcow2::open(crashed.clone(), OpenOptions { journal: journal(&after.0, 8192), ..Default::default() }).unwrap();
    for (off, n, tag) in &done_now {
        assert_eq!(read(&back, crashed.as_ref(), *off, *n as usize), vec![*tag; *n as usize], "completed write at {off} lost");
    }
    let r = check(&MemStorage::new(crashed.snapshot())).unwrap();
    assert_eq!(r.corruptions, 0, "{:?}", r.messages);
    // Released, every write completed and reads back from the live image.
    let done = completed.lock().unwrap().clone();
    assert_eq!(done.len(), 2, "{done:?}");
    assert_eq!(read(&img, st.as_ref(), last, cs as usize), vec![0x22; cs as usize]);
    assert_eq!(read(&img, st.as_ref(), x, cs as usize), vec![0x11; cs as usize]);
    assert!(!img.write_through_active(), "the gate opens once a write-back after the seal is durable");
}

#[test]
fn failing_write_backs_stop_allocation_instead_of_moving_the_mark_for_nothing() {
    // Storage down: every write fails. A write that fails gives its new cluster back, but the
    // release is not durable, so the retry takes another one: without a bound, every retry
    // moves the allocation mark (and asks a thin volume to grow).
    let cs = 4096u64;
    let mem = MemStorage::default();
    create(&mem, &CreateOptions { size: 256 << 20, cluster_size: cs, backing: None }).unwrap();
    let st = Arc::new(Held::new(mem));
    let img = Qcow2::open(st.clone(), OpenOptions::default()).unwrap();
    let start = img.allocation();
    st.fail.store(true, Ordering::SeqCst);
    let mut refused = 0;
    for i in 0..20_000u64 {
        let mut ranges = Vec::new();
        match img.map_write((i % 1000) * cs, cs, &mut ranges) {
            // The data write failed: the worker reports it (and the policy retries later).
            Ok(t) => img.write_done(&t, false).unwrap_or(()),
            Err(_) => refused += 1,
        }
    }
    let grown = (img.allocation() - start) / cs;
    assert!(refused > 10_000, "only {refused} refused");
    assert!(grown <= thinblk_qcow2::image::MAX_PENDING_RELEASES as u64 + 64, "the mark moved {grown} clusters");
    // Storage back: the next write-back makes the releases durable, and they are reused.
    st.fail.store(false, Ordering::SeqCst);
    img.flush_metadata().unwrap();
    let mark = img.allocation();
    write(&img, st.as_ref(), 0, &[1; 4096]).unwrap();
    assert_eq!(img.allocation(), mark, "a released cluster was reused");
    img.close().unwrap();
    let r = check(&MemStorage::new(st.mem.snapshot())).unwrap();
    assert_eq!(r.corruptions, 0, "{:?}", r.messages);
}

/// Fails, while armed, the first write after the header's refcount-table fields (offset 48)
/// were written, or that header write itself.
struct FailAfterHeader {
    mem: MemStorage,
    /// 0 off, 1 fail the write after the header, 2 fail the header write.
    mode: AtomicU64,
    saw_header: AtomicBool,
}

impl Storage for FailAfterHeader {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self.mode.load(Ordering::SeqCst) {
            1 if self.saw_header.load(Ordering::SeqCst) => {
                self.mode.store(0, Ordering::SeqCst);
                return Err(io::Error::from_raw_os_error(5));
            }
            1 if offset == 48 => self.saw_header.store(true, Ordering::SeqCst),
            2 if offset == 48 => {
                self.mode.store(0, Ordering::SeqCst);
                return Err(io::Error::from_raw_os_error(5));
            }
            _ => {}
        }
        self.mem.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        self.mem.size()
    }
}

#[test]
fn a_refcount_table_the_header_on_disk_may_name_is_never_released() {
    // 512 B clusters: the first refcount table (one cluster, 64 blocks) covers 8 MiB of host,
    // the next (3 clusters) 24 MiB. A write-back that wrote the header naming the second table
    // fails after it; a second growth then must not release the second table, which the
    // header on disk names: a crash after the next write-back's refcount blocks and before its
    // header would leave the header pointing at clusters counted free.
    let cs = 512u64;
    let mem = MemStorage::default();
    create(&mem, &CreateOptions { size: 64 << 20, cluster_size: cs, backing: None }).unwrap();
    let st = Arc::new(FailAfterHeader { mem, mode: AtomicU64::new(0), saw_header: AtomicBool::new(false) });
    // A cache that holds every block: no write-back happens but the ones the test asks for
    // (as after a guest FLUSH that failed, which leaves no relief pending).
    let img = Qcow2::open(st.clone(), OpenOptions { refcount_cache_blocks: Some(1 << 20), ..Default::default() }).unwrap();
    let t0 = img.header().refcount_table_offset;
    let fill = |img: &Qcow2, from: u64, to: u64| {
        for off in (from..to).step_by(1 << 16) {
            write(img, st.as_ref(), off, &[1; 1 << 16]).unwrap();
        }
    };
    // Past 8 MiB of host: the table grows (in memory) to a second one.
    fill(&img, 0, 9 << 20);
    st.mode.store(1, Ordering::SeqCst);
    assert!(img.flush_metadata().is_err(), "the write after the header must fail");
    let on_disk = thinblk_qcow2::Header::parse(&st.mem.snapshot()[..4096], st.mem.size().unwrap()).unwrap();
    let t1 = on_disk.refcount_table_offset;
    assert_ne!(t1, t0, "the header on disk names the second table");
    // Past 24 MiB: the table grows again; then a write-back whose header write fails.
    fill(&img, 9 << 20, 26 << 20);
    st.mode.store(2, Ordering::SeqCst);
    assert!(img.flush_metadata().is_err(), "the header write must fail");
    // The crash: the header still names the second table; its clusters must still count.
    let r = check(&MemStorage::new(st.mem.snapshot())).unwrap();
    assert_eq!(r.corruptions, 0, "{:?}", r.messages);
    // And once a header naming the newest table is durable, the old ones go.
    img.flush_metadata().unwrap();
    img.flush_metadata().unwrap();
    let r = check(&MemStorage::new(st.mem.snapshot())).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
}

#[test]
fn copies_of_a_clean_image_never_share_a_journal() {
    let dir = TempDir::new("copies-uuid");
    let jdir = dir.0.join("j");
    std::fs::create_dir_all(&jdir).unwrap();
    let a = dir.0.join("a.qcow2");
    image_file(&a, 65536, 16 << 20);
    let img = Qcow2::open(reopen_file(&a), OpenOptions::default()).unwrap();
    img.close().unwrap();
    drop(img);
    let b = dir.0.join("b.qcow2");
    std::fs::copy(&a, &b).unwrap();
    // Both served at once, journals in one directory: two identities, two journals.
    let ia = Qcow2::open(reopen_file(&a), OpenOptions { journal: journal(&jdir, 1 << 20), ..Default::default() }).unwrap();
    let ib = Qcow2::open(reopen_file(&b), OpenOptions { journal: journal(&jdir, 1 << 20), ..Default::default() }).unwrap();
    assert_ne!(ia.owner().map(|o| o.uuid), ib.owner().map(|o| o.uuid));
    assert_eq!(std::fs::read_dir(&jdir).unwrap().count(), 2);
    ia.close().unwrap();
    ib.close().unwrap();
}

#[test]
fn an_image_corrupt_after_an_unclean_stop_is_not_served() {
    let cs = 65536u64;
    let st = Arc::new(MemStorage::default());
    create(st.as_ref(), &CreateOptions { size: 16 << 20, cluster_size: cs, backing: None }).unwrap();
    let img = Qcow2::open(st.clone(), OpenOptions::default()).unwrap();
    write(&img, st.as_ref(), 0, &[7; 4096]).unwrap();
    img.flush_metadata().unwrap();
    let mut ranges = Vec::new();
    img.map_read(0, 4096, &mut ranges).unwrap();
    let Mapping::Data(host) = ranges[0].mapping else { panic!() };
    drop(img);
    // The data cluster's count lost (as a broken replay or a bad disk would leave it).
    let bytes = st.snapshot();
    let rt = u64::from_be_bytes(bytes[48..56].try_into().unwrap());
    let block = u64::from_be_bytes(bytes[rt as usize..rt as usize + 8].try_into().unwrap());
    st.write_at(&[0, 0], block + host / cs * 2).unwrap();
    let e = Qcow2::open(st.clone(), OpenOptions::default()).err().expect("refused");
    assert!(e.to_string().contains("qemu-img check -r all"), "{e}");
}

//! Image locks against QEMU's own tools (qemu-img, qemu-io, qemu-storage-daemon 10.0) and a
//! second thinblk, in both directions: thinblk takes the OFD lock bytes QEMU takes. And the
//! hand-over of an image between two opens, as a live migration between two daemons on one
//! host does it (an inactive open, `Disk::activate`, `Disk::inactivate`).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{s, Client, Daemon, LoopDev, TestDir};
use thinblk::format::{ImageOptions, Qcow2Format};
use thinblk_disk::lock::{LockError, Perm};
use thinblk_disk::{Disk, ImageError};

const LIMIT: Duration = Duration::from_secs(30);

/// Runs `cmd` for at most `LIMIT` (killed after that); exit code and stdout+stderr.
fn run_bounded(cmd: &mut Command, out: &Path) -> (Option<i32>, String) {
    let log = std::fs::File::create(out).expect("output file");
    let err = log.try_clone().expect("dup output file");
    let mut child = cmd.stdin(Stdio::null()).stdout(log).stderr(err).spawn().expect("spawn");
    let deadline = Instant::now() + LIMIT;
    let code = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after {LIMIT:?}: {}", std::fs::read_to_string(out).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, std::fs::read_to_string(out).unwrap_or_default())
}

fn tool(dir: &TestDir, prog: &str, args: &[&str]) -> (Option<i32>, String) {
    run_bounded(Command::new(prog).args(args), &dir.path("tool.out"))
}

fn tool_ok(dir: &TestDir, prog: &str, args: &[&str]) -> String {
    let (code, text) = tool(dir, prog, args);
    assert_eq!(code, Some(0), "{prog} {args:?}: {text}");
    text
}

/// The tool fails, saying `message`.
fn tool_refused(dir: &TestDir, prog: &str, args: &[&str], message: &str) -> String {
    let (code, text) = tool(dir, prog, args);
    assert_eq!(code, Some(1), "{prog} {args:?} was not refused: {text}");
    assert!(text.contains(message), "{prog} {args:?}: expected {message:?} in: {text}");
    text
}

/// A thinblk start that must fail: exit code 1 before its socket appears; its stderr.
fn thinblk_refused(dir: &TestDir, args: &[&str]) -> String {
    let sock = dir.path("refused.sock");
    let (code, text) = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_thinblk"))
            .arg("--socket-path")
            .arg(&sock)
            .args(["--journal-dir", s(&dir.0)])
            .args(args)
            .env("THINBLK_LOG", "info"),
        &dir.path("refused.log"),
    );
    assert_eq!(code, Some(1), "the second thinblk was not refused: {text}");
    assert!(!sock.exists(), "the refused daemon created its socket");
    text
}

/// qemu-storage-daemon serving `img` writable (a qcow2 node, as under an export), once it
/// holds its locks: it writes its pid file only after its block nodes are open. A start refused
/// by a lock whose owner is gone already (a description that a child forked by a parallel test
/// carries until its exec, a QEMU tool's io_uring) is tried again.
fn qemu_storage_daemon(dir: &TestDir, img: &Path) -> Daemon {
    let pidfile = dir.path("qsd.pid");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let _ = std::fs::remove_file(&pidfile);
        let child = Command::new("qemu-storage-daemon")
            .arg("--pidfile")
            .arg(&pidfile)
            .args(["--blockdev", &format!("driver=file,node-name=f,filename={}", s(img))])
            .args(["--blockdev", "driver=qcow2,node-name=q,file=f"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let mut qsd = Daemon { child, socket: dir.path("none") };
        loop {
            if pidfile.exists() {
                return qsd;
            }
            if qsd.child.try_wait().ok().flatten().is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "qemu-storage-daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(Instant::now() < deadline, "qemu-storage-daemon kept failing to start");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn qcow2_image(dir: &TestDir, name: &str) -> std::path::PathBuf {
    let img = dir.path(name);
    tool_ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    img
}

#[test]
fn a_second_daemon_through_a_symlink_is_refused_and_the_first_keeps_serving() {
    let dir = TestDir::new("lock-two");
    let img = qcow2_image(&dir, "disk.qcow2");
    let first = Daemon::start(&dir.path("a.sock"), &["--image", s(&img), "--format", "qcow2"]);
    let link = dir.path("link.qcow2");
    std::os::unix::fs::symlink(&img, &link).expect("symlink");
    let text = thinblk_refused(&dir, &["--image", s(&link), "--format", "qcow2"]);
    let holder = format!("pid {} (thinblk)", first.child.id());
    assert!(text.contains("Failed to get \"write\" lock") && text.contains(&holder), "{text}");
    eprintln!("second thinblk: {}", text.trim());
    // A second read-only daemon is refused too: it does not share "write".
    let text = thinblk_refused(&dir, &["--image", s(&link), "--format", "qcow2", "--read-only"]);
    assert!(text.contains("Failed to get shared \"write\" lock") && text.contains(&holder), "{text}");
    let mut c = Client::connect(&first.socket, 1).expect("connect to the first daemon");
    assert_eq!(c.write(0, 1 << 20, &[0x5au8; 4096]), 0);
    assert_eq!(c.flush(0), 0);
    assert_eq!(c.read(0, 1 << 20, 4096).expect("read"), vec![0x5au8; 4096]);
    drop(c);
    // `thinblk create` is a writer too: it leaves the served image alone.
    let (code, text) = tool(&dir, env!("CARGO_BIN_EXE_thinblk"), &["create", s(&link), "16M"]);
    assert!(code == Some(1) && text.contains("Failed to get \"write\" lock"), "thinblk create: {text}");
    let mut c = Client::connect(&first.socket, 1).expect("reconnect to the first daemon");
    assert_eq!(c.capacity, 64 << 20);
    assert_eq!(c.read(0, 1 << 20, 4096).expect("read"), vec![0x5au8; 4096], "thinblk create wrote");
    drop(c);
    common::stop_clean(first);
    // Once the first is gone, the same image opens through the link.
    let again = Daemon::start(&dir.path("b.sock"), &["--image", s(&link), "--format", "qcow2"]);
    common::stop_clean(again);
}

#[test]
fn qemu_io_and_qemu_img_are_refused_while_thinblk_writes_and_info_u_works() {
    let dir = TestDir::new("lock-qemu");
    let img = qcow2_image(&dir, "disk.qcow2");
    let d = Daemon::start(&dir.path("sock"), &["--image", s(&img), "--format", "qcow2"]);
    let mut c = Client::connect(&d.socket, 1).expect("connect");
    assert_eq!(c.write(0, 0, &[0x11u8; 4096]), 0);
    assert_eq!(c.flush(0), 0);
    let text = tool_refused(&dir, "qemu-io", &["-c", "write -P 0x55 0 4k", s(&img)], "Failed to get \"write\" lock");
    eprintln!("qemu-io: {}", text.trim());
    let text = tool_refused(&dir, "qemu-img", &["check", s(&img)], "Failed to get shared \"write\" lock");
    eprintln!("qemu-img check: {}", text.trim());
    tool_refused(&dir, "qemu-img", &["info", s(&img)], "Failed to get shared \"write\" lock");
    tool_refused(&dir, "qemu-img", &["snapshot", "-c", "s1", s(&img)], "Failed to get \"write\" lock");
    let info = tool_ok(&dir, "qemu-img", &["info", "-U", s(&img)]);
    assert!(info.contains("file format: qcow2"), "{info}");
    assert_eq!(c.read(0, 0, 4096).expect("read"), vec![0x11u8; 4096], "qemu-io changed the disk");
    drop(c);
    common::stop_clean(d);
    // On the image too: what thinblk wrote, no snapshot, and it checks clean.
    tool_ok(&dir, "qemu-io", &["-r", "-c", "read -P 0x11 0 4k", s(&img)]);
    let snaps = tool_ok(&dir, "qemu-img", &["snapshot", "-l", s(&img)]);
    assert!(!snaps.contains("s1"), "{snaps}");
    tool_ok(&dir, "qemu-img", &["check", s(&img)]);
}

#[test]
fn thinblk_is_refused_while_qemu_storage_daemon_holds_the_image() {
    let dir = TestDir::new("lock-qsd");
    let img = qcow2_image(&dir, "disk.qcow2");
    let mut qsd = qemu_storage_daemon(&dir, &img);
    let text = thinblk_refused(&dir, &["--image", s(&img), "--format", "qcow2"]);
    let holder = format!("pid {} (qemu-storage-d", qsd.child.id());
    assert!(text.contains("Failed to get \"write\" lock") && text.contains(&holder), "{text}");
    eprintln!("thinblk against qemu-storage-daemon: {}", text.trim());
    let text = thinblk_refused(&dir, &["--image", s(&img), "--format", "qcow2", "--read-only"]);
    assert!(text.contains("Failed to get shared \"write\" lock"), "{text}");
    qsd.signal(libc::SIGTERM);
    assert_eq!(qsd.wait_exit(Duration::from_secs(10)), Some(0), "qemu-storage-daemon did not stop");
    let d = Daemon::start(&dir.path("sock"), &["--image", s(&img), "--format", "qcow2"]);
    common::stop_clean(d);
}

#[test]
fn read_only_daemons_share_with_readers_and_exclude_writers() {
    let dir = TestDir::new("lock-ro");
    let img = qcow2_image(&dir, "disk.qcow2");
    let ro = ["--image", s(&img), "--format", "qcow2", "--read-only"];
    let rw = ["--image", s(&img), "--format", "qcow2"];
    let r1 = Daemon::start(&dir.path("r1.sock"), &ro);
    // Readers: qemu-img info with and without -U, a second read-only daemon.
    tool_ok(&dir, "qemu-img", &["info", "-U", s(&img)]);
    tool_ok(&dir, "qemu-img", &["info", s(&img)]);
    let r2 = Daemon::start(&dir.path("r2.sock"), &ro);
    // Writers are refused: a reader does not share "write" (QEMU's default, share-rw=off).
    let text = thinblk_refused(&dir, &rw);
    assert!(text.contains("Failed to get \"write\" lock") && text.contains("(thinblk)"), "{text}");
    tool_refused(&dir, "qemu-io", &["-c", "write 0 4k", s(&img)], "Failed to get \"write\" lock");
    let mut c = Client::connect_with(&r1.socket, 1, true).expect("connect read-only");
    assert_eq!(c.read(0, 0, 4096).expect("read"), vec![0u8; 4096]);
    drop(c);
    common::stop_clean(r1);
    common::stop_clean(r2);
    // And the other way round: a writer excludes a read-only daemon.
    let w = Daemon::start(&dir.path("w.sock"), &rw);
    let text = thinblk_refused(&dir, &ro);
    assert!(text.contains("Failed to get shared \"write\" lock"), "{text}");
    common::stop_clean(w);
}

#[test]
fn the_backing_file_is_locked_as_qemu_locks_a_backing_node() {
    let dir = TestDir::new("lock-backing");
    let base = qcow2_image(&dir, "base.qcow2");
    tool_ok(&dir, "qemu-io", &["-c", "write -P 0x42 0 1M", s(&base)]);
    let top = dir.path("top.qcow2");
    let top2 = dir.path("top2.qcow2");
    for t in [&top, &top2] {
        tool_ok(&dir, "qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", s(t)]);
    }
    let d = Daemon::start(&dir.path("sock"), &["--image", s(&top), "--format", "qcow2"]);
    let text = tool_refused(&dir, "qemu-io", &["-c", "write -P 0x66 0 4k", s(&base)], "Failed to get \"write\" lock");
    eprintln!("qemu-io on the backing file: {}", text.trim());
    let text = thinblk_refused(&dir, &["--image", s(&base), "--format", "qcow2"]);
    assert!(text.contains("base.qcow2: Failed to get \"write\" lock"), "{text}");
    // Readers of the backing file are welcome: qemu-img info, and a second overlay on it.
    tool_ok(&dir, "qemu-img", &["info", s(&base)]);
    let d2 = Daemon::start(&dir.path("sock2"), &["--image", s(&top2), "--format", "qcow2"]);
    let mut c = Client::connect(&d.socket, 1).expect("connect");
    assert_eq!(c.read(0, 0, 4096).expect("read"), vec![0x42u8; 4096]);
    drop(c);
    common::stop_clean(d2);
    common::stop_clean(d);
    tool_ok(&dir, "qemu-io", &["-r", "-c", "read -P 0x42 0 1M", s(&base)]);
}

#[test]
fn raw_images_and_block_devices_are_locked_too() {
    let dir = TestDir::new("lock-raw");
    let img = dir.path("disk.raw");
    common::sparse_file(&img, 64 << 20);
    let lv_file = dir.path("lv.img");
    common::sparse_file(&lv_file, 64 << 20);
    let lv = LoopDev::attach(&lv_file);
    for (name, path) in [("file", img.clone()), ("block device", lv.0.clone())] {
        let d = Daemon::start(&dir.path("sock"), &["--image", s(&path), "--format", "raw"]);
        let text =
            tool_refused(&dir, "qemu-io", &["-f", "raw", "-c", "write -P 0x55 0 4k", s(&path)], "Failed to get \"write\" lock");
        eprintln!("qemu-io on a served raw {name}: {}", text.trim());
        tool_ok(&dir, "qemu-img", &["info", "-U", "-f", "raw", s(&path)]);
        let text = thinblk_refused(&dir, &["--image", s(&path), "--format", "raw"]);
        assert!(text.contains("Failed to get \"write\" lock") && text.contains("(thinblk)"), "{name}: {text}");
        let mut c = Client::connect(&d.socket, 1).expect("connect");
        assert_eq!(c.read(0, 0, 4096).expect("read"), vec![0u8; 4096], "{name}: qemu-io wrote");
        drop(c);
        common::stop_clean(d);
    }
}

#[test]
fn image_locking_off_takes_no_lock() {
    let dir = TestDir::new("lock-off");
    let img = qcow2_image(&dir, "disk.qcow2");
    let w = Daemon::start(&dir.path("w.sock"), &["--image", s(&img), "--format", "qcow2", "--image-locking", "off"]);
    // Nothing held: QEMU's tools open the image (read-only here, to leave it intact).
    tool_ok(&dir, "qemu-img", &["info", s(&img)]);
    let r = Daemon::start(&dir.path("r.sock"), &["--image", s(&img), "--format", "qcow2", "--read-only"]);
    common::stop_clean(r);
    common::stop_clean(w);
}

/// Writes `data` (4 KiB multiples, at an aligned offset) through the `Disk` API as a worker
/// does.
fn write_through(d: &dyn Disk, offset: u64, data: &[u8]) {
    thinblk_disk::disk::write_mapped(d, offset, data).expect("write through the mapping");
}

/// Reads through the mapping as a worker does.
fn read_through(d: &dyn Disk, offset: u64, len: usize) -> Vec<u8> {
    thinblk_disk::disk::read_mapped(d, offset, len).expect("read through the mapping")
}

/// Every file of `dir` with its contents, sorted by name.
fn dir_state(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .expect("read dir")
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).expect("read file")))
        .collect();
    v.sort();
    v
}

/// The image's thinblk in-use flag (its owner extension), as the file holds it now.
fn in_use(img: &Path) -> bool {
    let bytes = std::fs::read(img).expect("read image");
    let h = thinblk_qcow2::Header::parse(&bytes[..65536], bytes.len() as u64).expect("header");
    h.owner.is_some_and(|o| o.flags & thinblk_qcow2::Owner::IN_USE != 0)
}

/// Activation must fail on the write lock another open holds, after waiting `wait`; the
/// error names the holder.
fn activation_refused(d: &dyn Disk, wait: Duration, holder: &str) -> String {
    let started = Instant::now();
    let e = d.activate(wait).expect_err("activated while another open writes");
    let waited = started.elapsed();
    assert!(waited >= wait && waited < wait + Duration::from_secs(5), "waited {waited:?} for {wait:?}");
    match &e {
        ImageError::Lock { source: LockError::Refused { perm: Perm::Write, holders, .. }, .. } => {
            assert!(holders.iter().any(|h| format!("pid {} ({})", h.pid, h.comm).starts_with(holder)), "{e}");
        }
        other => panic!("not a lock refusal: {other}"),
    }
    assert!(!d.is_active());
    e.to_string()
}

fn journalled(jdir: &Path, inactive: bool) -> ImageOptions {
    ImageOptions { journal_dir: Some(jdir.to_path_buf()), journal_segment_bytes: 1 << 20, inactive, ..Default::default() }
}

#[test]
fn a_qcow2_image_is_handed_over_between_two_opens_and_back() {
    let dir = TestDir::new("lock-migrate");
    let img = qcow2_image(&dir, "disk.qcow2");
    let jdir = dir.path("shm");
    std::fs::create_dir_all(&jdir).expect("journal dir");
    let me = format!("pid {}", std::process::id());
    // Two opens in one process are two open file descriptions: their OFD locks conflict as
    // two daemons' do. A is the source, writing; nothing flushed, so only its journal links
    // these writes.
    let a = Qcow2Format::open(&img, &journalled(&jdir, false)).expect("open a");
    let first = vec![0x5au8; 1 << 20];
    write_through(&a, 0, &first);
    let image_before = std::fs::read(&img).expect("read image");
    let journals_before = dir_state(&jdir);
    assert_eq!(journals_before.len(), 1, "a's journal");

    // B, the destination, opens inactive beside the writer: no byte of the image changes,
    // no journal is made, and no IO is mapped.
    let b = Qcow2Format::open(&img, &journalled(&jdir, true)).expect("inactive open beside a writer");
    assert!(!b.is_active());
    assert_eq!(b.capacity(), 64 << 20);
    assert_eq!(std::fs::read(&img).expect("read image"), image_before, "the inactive open wrote");
    assert_eq!(dir_state(&jdir), journals_before, "the inactive open touched the journals");
    assert!(matches!(b.map_read(0, 4096, &mut Vec::new()), Err(ImageError::Inactive)));
    // The source still writes: it takes the image over only once the source hands it over.
    let text = activation_refused(&b, Duration::from_millis(200), &me);
    assert!(text.contains("disk.qcow2: Failed to get \"write\" lock"), "{text}");
    eprintln!("activation while the source writes: {text}");
    tool_refused(&dir, "qemu-io", &["-f", "qcow2", "-c", "write -P 0x66 20M 4k", s(&img)], "Failed to get \"write\" lock");

    // A hands over: written back, closed clean, journal gone, write lock dropped.
    a.inactivate().expect("a hands over");
    assert!(!a.is_active());
    assert!(matches!(a.map_read(0, 4096, &mut Vec::new()), Err(ImageError::Inactive)));
    assert!(dir_state(&jdir).is_empty(), "a's journal is removed");
    assert!(!in_use(&img), "a closed clean");
    tool_ok(&dir, "qemu-img", &["check", s(&img)]);
    // Both inactive hold no write lock (no lock at all): a QEMU writer gets the image.
    tool_ok(&dir, "qemu-io", &["-f", "qcow2", "-c", "write -P 0x66 20M 4k", s(&img)]);

    // B takes over and sees everything: a's writes and qemu-io's.
    b.activate(Duration::from_secs(5)).expect("b takes over");
    assert!(b.is_active() && in_use(&img));
    assert_eq!(read_through(&b, 0, 1 << 20), first);
    assert_eq!(read_through(&b, 20 << 20, 4096), vec![0x66u8; 4096]);
    let second = vec![0x77u8; 128 << 10];
    write_through(&b, 0, &second[..4096]);
    write_through(&b, 2 << 20, &second);
    let text = activation_refused(&a, Duration::from_millis(200), &me);
    eprintln!("the source taking back while the destination writes: {text}");
    b.inactivate().expect("b hands back");
    tool_ok(&dir, "qemu-img", &["check", s(&img)]);

    // The migration back: a reads everything again (its first engine had the L2 table of
    // these offsets cached without b's clusters).
    a.activate(Duration::from_secs(5)).expect("a takes back");
    let mut expect = first.clone();
    expect[..4096].copy_from_slice(&second[..4096]);
    assert_eq!(read_through(&a, 0, 1 << 20), expect);
    assert_eq!(read_through(&a, 2 << 20, 128 << 10), second);
    assert_eq!(read_through(&a, 20 << 20, 4096), vec![0x66u8; 4096]);
    write_through(&a, 4 << 20, &vec![0x11u8; 65536]);
    // Inactivated rather than only closed: its lock bytes are unlocked at once, where a
    // dropped description can live on a moment in a child a parallel test forks.
    a.inactivate().expect("close a");
    drop(a);
    drop(b);
    tool_ok(&dir, "qemu-img", &["check", s(&img)]);
    tool_ok(&dir, "qemu-io", &["-r", "-c", "read -P 0x77 0 4k", "-c", "read -P 0x5a 4k 1020k", "-c", "read -P 0x77 2M 128k",
        "-c", "read -P 0x11 4M 64k", "-c", "read -P 0x66 20M 4k", s(&img)]);
}

#[test]
fn an_inactive_open_writes_nothing_and_keeps_no_journal_beside_a_writer() {
    let dir = TestDir::new("lock-inactive");
    let img = qcow2_image(&dir, "disk.qcow2");
    let jdir = dir.path("shm");
    std::fs::create_dir_all(&jdir).expect("journal dir");
    let a = Qcow2Format::open(&img, &journalled(&jdir, false)).expect("open a");
    write_through(&a, 0, &vec![0x42u8; 256 << 10]);
    // What a daemon that did not stop clean leaves too: the in-use flag and a journal with
    // records. Neither refuses (nor is replayed or repaired by) an inactive open.
    assert!(in_use(&img));
    let image_before = std::fs::read(&img).expect("read image");
    let journals_before = dir_state(&jdir);
    assert_eq!(journals_before.len(), 1);
    for _ in 0..2 {
        let b = Qcow2Format::open(&img, &journalled(&jdir, true)).expect("inactive open");
        b.inactivate().expect("inactivating an inactive image");
        b.close().expect("closing an inactive image");
        drop(b);
        assert_eq!(std::fs::read(&img).expect("read image"), image_before, "an inactive open wrote");
        assert_eq!(dir_state(&jdir), journals_before, "an inactive open touched the journals");
    }
    a.close().expect("close a");
}

#[test]
fn an_inactive_open_waits_for_qemu_to_hand_over_and_refuses_what_a_start_refuses() {
    let dir = TestDir::new("lock-inactive-qemu");
    let img = qcow2_image(&dir, "disk.qcow2");
    let w = Qcow2Format::open(&img, &ImageOptions::default()).expect("open");
    write_through(&w, 0, &vec![0x24u8; 65536]);
    w.inactivate().expect("close");
    drop(w);
    let mut qsd = qemu_storage_daemon(&dir, &img);
    let jdir = dir.path("shm");
    std::fs::create_dir_all(&jdir).expect("journal dir");
    let b = Qcow2Format::open(&img, &journalled(&jdir, true)).expect("inactive open beside qemu-storage-daemon");
    let text = activation_refused(&b, Duration::from_millis(200), &format!("pid {} (qemu-storage-d", qsd.child.id()));
    eprintln!("activation while qemu-storage-daemon writes: {text}");
    qsd.signal(libc::SIGTERM);
    assert_eq!(qsd.wait_exit(Duration::from_secs(10)), Some(0), "qemu-storage-daemon did not stop");
    b.activate(Duration::from_secs(5)).expect("take over from qemu-storage-daemon");
    assert_eq!(read_through(&b, 0, 65536), vec![0x24u8; 65536]);
    b.close().expect("close");
    drop(b);

    // QEMU's dirty bit (lazy refcounts, a QEMU that died): an inactive open takes it, the
    // activation refuses it as a start would, and goes back to holding no write lock.
    let lazy = dir.path("lazy.qcow2");
    tool_ok(&dir, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", s(&lazy), "64M"]);
    let (code, text) = tool(&dir, "qemu-io", &["-c", "write -P 0x33 0 64k", "-c", "abort", s(&lazy)]);
    assert_ne!(code, Some(0), "qemu-io did not abort: {text}");
    let info = tool_ok(&dir, "qemu-img", &["info", "-U", "--output=json", s(&lazy)]);
    assert!(info.contains("\"dirty-flag\": true"), "{info}");
    let before = std::fs::read(&lazy).expect("read image");
    let c = Qcow2Format::open(&lazy, &journalled(&jdir, true)).expect("inactive open of a dirty image");
    // (With a wait: qemu-io's locks can outlive it a moment.)
    let e = c.activate(Duration::from_secs(5)).expect_err("activated a dirty image");
    assert!(e.to_string().contains("refcounts dirty"), "{e}");
    assert!(!c.is_active());
    assert_eq!(std::fs::read(&lazy).expect("read image"), before, "a refused activation wrote");
    // Its write lock is gone again: QEMU repairs the image beside it.
    tool_ok(&dir, "qemu-img", &["check", "-r", "all", s(&lazy)]);
    c.activate(Duration::from_secs(5)).expect("activate the repaired image");
    assert_eq!(read_through(&c, 0, 65536), vec![0x33u8; 65536]);
    c.close().expect("close");
}

//! Image locks against QEMU's own tools (qemu-img, qemu-io, qemu-storage-daemon 10.0) and a
//! second thinblk, in both directions: thinblk takes the OFD lock bytes QEMU takes.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, Daemon, LoopDev, TestDir};

const LIMIT: Duration = Duration::from_secs(30);

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

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
    let child = Command::new("qemu-storage-daemon")
        .args(["--blockdev", &format!("driver=file,node-name=f,filename={}", s(&img))])
        .args(["--blockdev", "driver=qcow2,node-name=q,file=f"])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn qemu-storage-daemon");
    let mut qsd = Daemon { child, socket: dir.path("none") };
    // Wait until it holds its locks.
    let fdinfo = format!("/proc/{}/fdinfo", qsd.child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_dir(&fdinfo)
        .map(|d| d.flatten().any(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("lock:"))))
        .unwrap_or(false)
    {
        assert!(qsd.child.try_wait().ok().flatten().is_none(), "qemu-storage-daemon exited");
        assert!(Instant::now() < deadline, "qemu-storage-daemon took no lock");
        std::thread::sleep(Duration::from_millis(50));
    }
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

//! The metadata journal at the daemon's level (issue 19): found by the image's identity, not
//! its device number; refused, never replayed or dropped silently, when another program
//! changed the image after a kill; a journal directory too small refuses the start instead of
//! killing the daemon with SIGBUS later.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{s, Client, Daemon, LoopDev, TestDir};

const MIB: u64 = 1 << 20;

fn ok(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect("run");
    assert!(out.status.success(), "{cmd} {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the daemon expecting it to refuse to start; returns its stderr.
fn refused(dir: &TestDir, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .arg("--socket-path")
        .arg(dir.path("refused.sock"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run thinblk");
    assert_eq!(out.status.code(), Some(1), "thinblk {args:?} should refuse to start: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!dir.path("refused.sock").exists(), "no socket after a refused start");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Writes `n` MiB of distinct blocks without a FLUSH, then SIGKILLs the daemon: only the
/// journal holds the links of those writes.
fn write_then_kill(mut d: Daemon, n: u64) -> Vec<u8> {
    let mut c = Client::connect(&d.socket, 1).expect("connect");
    let data: Vec<u8> = (0..n * MIB).map(|i| (i / 4096 % 251) as u8 | 1).collect();
    for k in 0..n {
        assert_eq!(c.write(0, k * MIB, &data[(k * MIB) as usize..((k + 1) * MIB) as usize]), 0);
    }
    d.signal(libc::SIGKILL);
    let _ = d.wait_exit(Duration::from_secs(10));
    drop(c);
    data
}

#[test]
fn the_journal_is_found_again_after_the_loop_device_changes_its_minor() {
    // An LV reactivated gets another dm minor; here a loop device re-attached under another
    // number. The journal is named by the image's uuid: found, replayed, nothing lost.
    let dir = TestDir::new("journal-minor");
    let backing = dir.path("lv.img");
    std::fs::write(&backing, vec![0u8; (48 * MIB) as usize]).unwrap();
    let lv = LoopDev::attach(&backing);
    let dev = s(&lv.0).to_string();
    ok(env!("CARGO_BIN_EXE_thinblk"), &["create", &dev, "32M"]);
    let jdir = dir.path("shm");
    std::fs::create_dir_all(&jdir).unwrap();
    let args = ["--image", dev.as_str(), "--format", "qcow2", "--journal-dir", s(&jdir)];
    let d = Daemon::start_logging(&dir.path("sock"), &args, Some(&dir.path("first.log")));
    let data = write_then_kill(d, 4);
    // The "LV" comes back under another number: attached again while the old device still
    // holds its number (detaching first races with the kernel's deferred release of the
    // killed daemon's descriptors, and with other tests attaching devices).
    let lv2 = LoopDev::attach(&backing);
    drop(lv);
    assert_ne!(lv2.0.to_str(), Some(dev.as_str()), "the loop device came back under the same number");
    let dev2 = s(&lv2.0).to_string();
    let args = ["--image", dev2.as_str(), "--format", "qcow2", "--journal-dir", s(&jdir)];
    let log = dir.path("second.log");
    let d = Daemon::start_logging(&dir.path("sock"), &args, Some(&log));
    let mut c = Client::connect(&dir.path("sock"), 1).expect("connect");
    let back = c.read(0, 0, data.len()).expect("read");
    assert!(back == data, "completed writes lost after the device number changed");
    drop(c);
    common::stop_clean(d);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("replayed the metadata journal"), "{text}");
    let check = ok("qemu-img", &["check", "-f", "qcow2", &dev2]);
    assert!(check.contains("No errors were found"), "{check}");
}

#[test]
fn a_journal_is_refused_after_qemu_img_changed_the_image_between_kill_and_restart() {
    let dir = TestDir::new("journal-foreign");
    let img = dir.path("disk.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    let args = ["--image", s(&img), "--format", "qcow2", "--journal-dir", s(&dir.0)];
    let d = Daemon::start_logging(&dir.path("sock"), &args, Some(&dir.path("first.log")));
    write_then_kill(d, 2);
    ok("qemu-img", &["check", "-r", "leaks", s(&img)]);
    let err = refused(&dir, &args);
    assert!(err.contains("journal refused") && err.contains("another program") && err.contains("qemu-img check -r all"), "{err}");
    let journals: Vec<_> = std::fs::read_dir(&dir.0).unwrap().flatten().filter(|e| e.path().extension().is_some_and(|x| x == "journal")).collect();
    assert_eq!(journals.len(), 1, "the refused journal is kept");
    // The operator's way out, as the error says: check, remove the journal, start.
    ok("qemu-img", &["check", "-r", "all", s(&img)]);
    std::fs::remove_file(journals[0].path()).unwrap();
    let d = Daemon::start(&dir.path("sock"), &args);
    common::stop_clean(d);
}

#[test]
fn a_daemon_killed_with_an_empty_journal_is_not_reported_as_a_lost_journal() {
    // Killed after writes, started again (the journal replays), killed again having only
    // read: its journal is empty, and the third start says so. Without a journal (removed
    // by hand here; a host crash empties the tmpfs) the warning says the journal is missing.
    let dir = TestDir::new("journal-empty");
    let img = dir.path("disk.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    let args = ["--image", s(&img), "--format", "qcow2", "--journal-dir", s(&dir.0)];
    let d = Daemon::start_logging(&dir.path("sock"), &args, Some(&dir.path("first.log")));
    let data = write_then_kill(d, 2);
    let mut d = Daemon::start_logging(&dir.path("sock"), &args, Some(&dir.path("second.log")));
    let mut c = Client::connect(&dir.path("sock"), 1).expect("connect");
    assert!(c.read(0, 0, data.len()).expect("read") == data, "completed writes lost");
    d.signal(libc::SIGKILL);
    let _ = d.wait_exit(Duration::from_secs(10));
    drop(c);
    let second = std::fs::read_to_string(dir.path("second.log")).unwrap_or_default();
    assert!(second.contains("replayed the metadata journal"), "{second}");
    let restart = |name: &str| {
        let log = dir.path(name);
        let d = Daemon::start_logging(&dir.path("sock"), &args, Some(&log));
        common::stop_clean(d);
        std::fs::read_to_string(&log).unwrap_or_default()
    };
    let third = restart("third.log");
    assert!(third.contains("its metadata journal held nothing the image lacked"), "{third}");
    assert!(!third.contains("no journal was found"), "{third}");
    // Killed once more, and its journal removed: that is a lost journal.
    let mut d = Daemon::start(&dir.path("sock"), &args);
    d.signal(libc::SIGKILL);
    let _ = d.wait_exit(Duration::from_secs(10));
    for e in std::fs::read_dir(&dir.0).unwrap().flatten().filter(|e| e.path().extension().is_some_and(|x| x == "journal")) {
        std::fs::remove_file(e.path()).unwrap();
    }
    let fourth = restart("fourth.log");
    assert!(fourth.contains("no journal was found"), "{fourth}");
    ok("qemu-img", &["check", s(&img)]);
}

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        ok("mount", &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", s(at)]);
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_journal_dir_too_small_refuses_the_start_instead_of_dying_later() {
    // Before: the journal was a sparse file; on a 2 MiB tmpfs the daemon started and died of
    // SIGBUS under 4k writes (and so did every restart).
    let dir = TestDir::new("journal-tmpfs");
    let img = dir.path("disk.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", s(&img), "64M"]);
    let shm = Tmpfs::mount(&dir.path("shm"), "2m");
    let args = ["--image", s(&img), "--format", "qcow2", "--journal-dir", s(&shm.0)];
    let err = refused(&dir, &args);
    assert!(err.contains("cannot reserve 16 MiB") && err.contains(s(&shm.0)), "{err}");
    assert_eq!(std::fs::read_dir(&shm.0).unwrap().count(), 0, "nothing left in the tmpfs");
    // A journal that fits (two 512 KiB segments) serves, and 4k writes at 512 B clusters fill
    // and rotate it many times without a fault.
    let mut args = args.to_vec();
    args.extend_from_slice(&["--journal-segment-kib", "512"]);
    let d = Daemon::start_logging(&dir.path("sock"), &args, Some(&dir.path("small.log")));
    let mut c = Client::connect(&dir.path("sock"), 1).expect("connect");
    for i in 0..2048u64 {
        assert_eq!(c.write(0, i * 8192, &[i as u8 | 1; 4096]), 0);
    }
    assert_eq!(c.read(0, 2047 * 8192, 4096).expect("read"), vec![(2047u64 as u8) | 1; 4096]);
    drop(c);
    common::stop_clean(d);
    let check = ok("qemu-img", &["check", s(&img)]);
    assert!(check.contains("No errors were found"), "{check}");
}

#[test]
fn a_refused_start_leaves_the_image_as_it_was() {
    // The backing policy refuses an absolute backing name: nothing of the image may change
    // (its persistent bitmaps stay valid, it is not marked in use).
    let dir = TestDir::new("journal-refused-untouched");
    let base = dir.path("base.qcow2");
    let top = dir.path("top.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&base), "16M"]);
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", s(&base), "-F", "qcow2", s(&top)]);
    ok("qemu-img", &["bitmap", "--add", s(&top), "b0"]);
    let before = std::fs::read(&top).unwrap();
    let err = refused(&dir, &["--image", s(&top), "--format", "qcow2", "--journal-dir", s(&dir.0)]);
    assert!(err.contains("absolute name"), "{err}");
    assert!(std::fs::read(&top).unwrap() == before, "a refused start changed the image");
    let info = ok("qemu-img", &["info", s(&top)]);
    assert!(info.contains("b0"), "{info}");
}

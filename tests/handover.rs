//! The image handover of a live migration, message by message (issue 21), without QEMU: two
//! daemons on one qcow2 image, the second started with `--incoming`, and a raw frontend of
//! our own playing QEMU on each side (dirty log, LOG_ALL, GET_VRING_BASE at the switch-over,
//! the destination's ring start). The image lies on the FUSE fixture, which records which
//! process modified it and when: the source writes nothing after it handed the image over,
//! the destination nothing before it took it. tests/migration.rs does the same with QEMU.

mod common;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::faultfs::FaultMount;
use common::frontend::*;
use common::{ctl, ctl_reply, sparse_file, Daemon, TestDir};

const LIMIT: Duration = Duration::from_secs(15);

/// Milliseconds since the epoch, now.
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A frontend on `sock` with its ring started; `log`: the dirty log it set up first (with
/// VHOST_F_LOG_ALL), as QEMU does when a migration starts.
fn frontend(sock: &Path, log: bool) -> Frontend {
    let mut f = Frontend::connect(sock);
    f.negotiate();
    if log {
        start_logging(&f);
    }
    f.start_queue();
    f
}

/// SET_LOG_BASE (a memfd of 32 bytes: the frontend's 1 MiB) and SET_FEATURES with LOG_ALL.
fn start_logging(f: &Frontend) {
    let log = memfd(4096);
    let body = [32u64.to_le_bytes(), 0u64.to_le_bytes()].concat();
    f.send(code::SET_LOG_BASE, V1, &body, &[log.as_raw_fd()]).expect("SET_LOG_BASE");
    let (request, _) = f.reply().expect("the SET_LOG_BASE reply");
    assert_eq!(request, code::SET_LOG_BASE);
    set_log_all(f, true);
}

/// SET_FEATURES with or without VHOST_F_LOG_ALL (QEMU clears it when a migration ends).
fn set_log_all(f: &Frontend, on: bool) {
    let feats = f.get_u64(code::GET_FEATURES).expect("features") & !(1 << 29) & !(1 << 26);
    let feats = if on { feats | 1 << 26 } else { feats };
    assert_eq!(f.ack(code::SET_FEATURES, &feats.to_le_bytes(), &[]).expect("SET_FEATURES"), 0);
}

/// Writes 4 KiB of `fill` at `sector` through chain 0 and waits for it; returns the status.
fn write(f: &mut Frontend, sector: u64, fill: u8) -> u8 {
    let mut hdr = [0u8; 16];
    hdr[0] = 1; // VIRTIO_BLK_T_OUT
    hdr[8..].copy_from_slice(&sector.to_le_bytes());
    f.put(DATA, &hdr);
    f.put(DATA + 0x1000, &[fill; 4096]);
    f.desc(DESC, 0, DATA, 16, F_NEXT, 1);
    f.desc(DESC, 1, DATA + 0x1000, 4096, F_NEXT, 2);
    f.desc(DESC, 2, DATA + 0x3000, 1, F_WRITE, 0);
    f.submit(0);
    assert!(f.wait_used(LIMIT), "the write was not completed");
    f.ram.bytes()[(DATA + 0x3000) as usize]
}

/// Reads 4 KiB at `sector` through chain 0; returns (status, first byte, all bytes equal).
fn read(f: &mut Frontend, sector: u64) -> (u8, u8, bool) {
    let mut hdr = [0u8; 16];
    hdr[8..].copy_from_slice(&sector.to_le_bytes());
    f.put(DATA, &hdr);
    f.desc(DESC, 0, DATA, 16, F_NEXT, 1);
    f.desc(DESC, 1, DATA + 0x4000, 4096, F_NEXT | F_WRITE, 2);
    f.desc(DESC, 2, DATA + 0x3000, 1, F_WRITE, 0);
    f.submit(0);
    assert!(f.wait_used(LIMIT), "the read was not completed");
    let b = &f.ram.bytes()[(DATA + 0x4000) as usize..(DATA + 0x5000) as usize];
    (f.ram.bytes()[(DATA + 0x3000) as usize], b[0], b.iter().all(|x| *x == b[0]))
}

/// GET_VRING_BASE of ring 0 (QEMU stopping the device), answered within the limit.
fn stop(f: &Frontend) {
    f.send(code::GET_VRING_BASE, V1, &Frontend::vring_state(0, 0), &[]).expect("GET_VRING_BASE");
    f.reply().expect("GET_VRING_BASE answered");
}

fn role(control: &Path) -> String {
    ctl(control, "query-status", serde_json::json!({}))["migration"]["role"].as_str().unwrap_or("none").to_string()
}

/// Modifications of the image by `pid` within `[from, to]` (wall-clock ms).
fn writes_by(mount: &FaultMount, pid: u32, from: u64, to: u64) -> usize {
    mount.faults.modifications().iter().filter(|(p, t)| *p == pid && *t >= from && *t <= to).count()
}

/// A 64 MiB qcow2 image made by `thinblk create` on the FUSE fixture; returns the mount and
/// the image's path.
fn fuse_image(dir: &TestDir) -> (FaultMount, String) {
    let backing = dir.path("backing.img");
    sparse_file(&backing, 0);
    let mount = FaultMount::new(&backing, &dir.path("mnt"));
    let img = mount.disk().to_str().expect("utf-8 path").to_string();
    let made = Command::new(env!("CARGO_BIN_EXE_thinblk")).args(["create", &img, "64M"]).output().expect("thinblk create");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    (mount, img)
}

#[test]
fn the_image_is_handed_over_at_the_switch_over_and_back() {
    let dir = TestDir::new("handover");
    let (mount, img) = fuse_image(&dir);
    let img = img.as_str();
    let (sock_a, sock_b) = (dir.path("a.sock"), dir.path("b.sock"));
    let (ctl_a, ctl_b) = (dir.path("a.ctl"), dir.path("b.ctl"));
    let args = |control: &Path| vec!["--image".to_string(), img.to_string(), "--format".into(), "qcow2".into(), "--control".into(), control.display().to_string()];
    let a_args = args(&ctl_a);
    let a = Daemon::start_logging(&sock_a, &a_args.iter().map(String::as_str).collect::<Vec<_>>(), Some(&dir.path("a.log")));
    let mut b_args = args(&ctl_b);
    b_args.push("--incoming".into());
    let b_started = now_ms();
    let b = Daemon::start_logging(&sock_b, &b_args.iter().map(String::as_str).collect::<Vec<_>>(), Some(&dir.path("b.log")));
    let (pid_a, pid_b) = (a.child.id(), b.child.id());
    assert_eq!(role(&ctl_a), "serving");
    assert_eq!(role(&ctl_b), "incoming");

    // The VM runs on A; a migration starts (dirty log on), the guest keeps writing.
    let mut fa = frontend(&sock_a, false);
    assert_eq!(write(&mut fa, 0, 0xa1), 0);
    start_logging(&fa);
    assert_eq!(write(&mut fa, 8, 0xa2), 0);
    // A cancelled attempt: logging stops, the device is reset; nothing is handed over.
    set_log_all(&fa, false);
    stop(&fa);
    assert_eq!(role(&ctl_a), "serving", "a stop without dirty logging is not a switch-over");
    fa.restart_queue();
    assert_eq!(write(&mut fa, 16, 0xa3), 0);
    // The next attempt reaches the switch-over: A hands the image over before it answers.
    start_logging(&fa);
    stop(&fa);
    let handed = now_ms();
    assert_eq!(role(&ctl_a), "handed-over");
    assert_eq!(writes_by(&mount, pid_b, b_started, handed), 0, "the destination wrote before it took the image");

    // B's rings start: it takes the image and sees everything A completed.
    let mut fb = frontend(&sock_b, false);
    assert_eq!(role(&ctl_b), "serving");
    for (sector, fill) in [(0, 0xa1), (8, 0xa2), (16, 0xa3)] {
        assert_eq!(read(&mut fb, sector), (0, fill, true), "sector {sector} on the destination");
    }
    assert_eq!(write(&mut fb, 24, 0xb1), 0);
    assert!(writes_by(&mount, pid_b, handed, now_ms()) > 0, "the destination took the image but wrote nothing");
    assert!(writes_by(&mount, pid_a, 0, handed) > 0, "the source's writes were not attributed to it");

    // And back: B hands over at its switch-over, A's rings start again (the source of a
    // failed migration does the same) and A takes the image again.
    start_logging(&fb);
    assert_eq!(write(&mut fb, 32, 0xb2), 0);
    stop(&fb);
    let back = now_ms();
    assert_eq!(role(&ctl_b), "handed-over");
    assert_eq!(writes_by(&mount, pid_a, handed, back), 0, "the source wrote after it handed the image over");
    drop(fa);
    let mut fa = frontend(&sock_a, false);
    assert_eq!(role(&ctl_a), "serving");
    assert_eq!(read(&mut fa, 24), (0, 0xb1, true));
    assert_eq!(read(&mut fa, 32), (0, 0xb2, true));
    assert_eq!(writes_by(&mount, pid_b, back, now_ms()), 0, "the destination wrote after it handed the image back");
    let metrics_a = ctl(&ctl_a, "query-status", serde_json::json!({}))["migration"].clone();
    assert_eq!((metrics_a["activations"].as_u64(), metrics_a["handovers"].as_u64()), (Some(1), Some(1)), "{metrics_a}");

    // Both stop clean; the image checks clean.
    drop((fa, fb));
    common::stop_clean(a);
    common::stop_clean(b);
    let check = Command::new("qemu-img").args(["check", "-f", "qcow2", img]).output().expect("qemu-img check");
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success() && text.contains("No errors were found"), "{text}");
}

#[test]
fn a_destination_that_cannot_take_the_image_keeps_its_ring_stopped_and_writes_nothing() {
    let dir = TestDir::new("handover-refused");
    let (mount, img) = fuse_image(&dir);
    let img = img.as_str();
    let (sock_a, sock_b) = (dir.path("a.sock"), dir.path("b.sock"));
    let a = Daemon::start_logging(&sock_a, &["--image", img, "--format", "qcow2"], Some(&dir.path("a.log")));
    let b = Daemon::start_logging(&sock_b, &["--image", img, "--format", "qcow2", "--incoming"], Some(&dir.path("b.log")));
    let pid_b = b.child.id();
    let mut fa = frontend(&sock_a, false);
    assert_eq!(write(&mut fa, 0, 0x5a), 0);
    // The source still serves: the destination's ring start waits for the lock, then is
    // refused (the frontend is told); no request is taken.
    let mut fb = Frontend::connect(&sock_b);
    fb.negotiate();
    fb.put(AVAIL, &[0u8; 4 + 2 * QSIZE as usize + 2]);
    fb.put(USED, &[0u8; 4 + 8 * QSIZE as usize + 2]);
    for (req, body) in [
        (code::SET_VRING_NUM, Frontend::vring_state(0, u32::from(QSIZE))),
        (code::SET_VRING_BASE, Frontend::vring_state(0, 0)),
        (code::SET_VRING_ADDR, fb.addr_body(0, DESC, USED, AVAIL)),
    ] {
        assert_eq!(fb.ack(req, &body, &[]).expect("ring setup"), 0);
    }
    let kick = eventfd(0);
    // The daemon answers after its whole lock wait (ACTIVATE_WAIT, 10 s): the frontend's
    // usual 10 s read timeout would race it (seen in CI: answered at 10.004 s).
    fb.sock.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let t = std::time::Instant::now();
    let answer = fb.ack(code::SET_VRING_KICK, &0u64.to_le_bytes(), &[kick.as_raw_fd()]);
    fb.sock.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    assert!(matches!(answer, Ok(n) if n != 0), "the ring start was not refused: {answer:?}");
    assert!(t.elapsed() >= Duration::from_secs(9), "refused before the lock wait: {:?}", t.elapsed());
    // The ring did not start: a chain published and kicked (on the refused kick) is not taken.
    let mut hdr = [0u8; 16];
    hdr[0] = 1;
    fb.put(DATA, &hdr);
    fb.put(DATA + 0x1000, &[0xbb; 4096]);
    fb.desc(DESC, 0, DATA, 16, F_NEXT, 1);
    fb.desc(DESC, 1, DATA + 0x1000, 4096, F_NEXT, 2);
    fb.desc(DESC, 2, DATA + 0x3000, 1, F_WRITE, 0);
    fb.submit(0);
    std::io::Write::write_all(&mut &kick, &1u64.to_ne_bytes()).expect("kick");
    assert!(!fb.wait_used(Duration::from_millis(500)), "a ring whose start was refused took a chain");
    // The source goes on serving; the image is what it wrote.
    assert_eq!(read(&mut fa, 0), (0, 0x5a, true));
    let log = std::fs::read_to_string(dir.path("b.log")).unwrap_or_default();
    assert!(log.contains("cannot be taken over"), "the destination did not say why:\n{log}");
    let wrote = mount.faults.modifications().iter().filter(|(p, _)| *p == pid_b).count();
    assert_eq!(wrote, 0, "the destination that could not take the image wrote it");
    drop((fa, fb));
    common::stop_clean(a);
    common::stop_clean(b);
    let check = Command::new("qemu-img").args(["check", "-f", "qcow2", img]).output().expect("qemu-img check");
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
}

#[test]
fn a_stopped_vm_is_handed_over_by_the_management_command() {
    // QEMU tells the backend nothing when a VM that was already paused migrates (its rings
    // stopped at the pause, without dirty logging): `ctl hand-over` does it.
    let dir = TestDir::new("handover-paused");
    let image = dir.path("disk.qcow2");
    let img = image.to_str().expect("utf-8 path");
    let made = Command::new(env!("CARGO_BIN_EXE_thinblk")).args(["create", img, "64M"]).output().expect("thinblk create");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let (sock_a, sock_b, ctl_a) = (dir.path("a.sock"), dir.path("b.sock"), dir.path("a.ctl"));
    let a = Daemon::start_logging(&sock_a, &["--image", img, "--format", "qcow2", "--control", ctl_a.to_str().expect("utf-8")], Some(&dir.path("a.log")));
    let b = Daemon::start_logging(&sock_b, &["--image", img, "--format", "qcow2", "--incoming"], Some(&dir.path("b.log")));
    let mut fa = frontend(&sock_a, false);
    assert_eq!(write(&mut fa, 0, 0x77), 0);
    let refused = ctl_reply(&ctl_a, "hand-over", serde_json::json!({}));
    assert!(refused["error"]["desc"].as_str().is_some_and(|d| d.contains("running")), "hand-over of a running VM: {refused}");
    // The VM pauses: the ring stops without dirty logging; the image stays here.
    stop(&fa);
    assert_eq!(role(&ctl_a), "serving");
    let done = ctl(&ctl_a, "hand-over", serde_json::json!({}));
    assert_eq!(done["role"], "handed-over", "{done}");
    let mut fb = frontend(&sock_b, false);
    assert_eq!(read(&mut fb, 0), (0, 0x77, true));
    drop((fa, fb));
    common::stop_clean(a);
    common::stop_clean(b);
}

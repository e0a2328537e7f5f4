//! A real guest: QEMU under TCG with vhost-user-blk-pci (2 queues, shared memfd memory)
//! boots a Debian kernel whose initramfs runs mkfs, file checksums, a verifying dd pass
//! and e2fsck on the disk thinblk serves. The guest prints the verdict; we assert it.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::vm::{assert_pass, assets, qemu_tcg, run_to_end, tail, VERDICT};
use common::{log_time_ms, sparse_file, Daemon, LoopDev, TestDir};

/// Upper bound for one guest run (boot + test + poweroff under TCG).
const GUEST_LIMIT: Duration = Duration::from_secs(420);

/// Runs QEMU until it exits or the limit passes; returns the console log.
fn run_guest(assets: &Path, socket: &Path, console: &Path, mode: &str) -> String {
    run_guest_with(assets, socket, console, mode, "", None)
}

/// [`run_guest`] with extra chardev options (e.g. `,reconnect-ms=1000`) and, if given, a
/// second disk (QEMU's own virtio-blk, serial `restart-ctl`) the host writes `STOP` into.
fn run_guest_with(assets: &Path, socket: &Path, console: &Path, mode: &str, chardev: &str, control: Option<&Path>) -> String {
    let initrd = assets.join(if mode == "faults" || mode == "restart" { "initramfs-fio.cpio.gz" } else { "initramfs.cpio.gz" });
    let mut qemu = qemu_tcg(assets, &initrd, &format!("console=ttyS0 panic=-1 loglevel=4 thinblk_test={mode}"), console);
    qemu.args(["-m", "512M", "-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-numa", "node,memdev=mem"])
        .arg("-chardev")
        .arg(format!("socket,id=blk0,path={}{chardev}", socket.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=blk0,num-queues=2"]);
    if let Some(c) = control {
        qemu.arg("-drive")
            .arg(format!("file={},format=raw,if=none,id=ctl0,readonly=on", c.display()))
            .args(["-device", "virtio-blk-pci,drive=ctl0,serial=restart-ctl"]);
    }
    run_to_end(qemu, console, GUEST_LIMIT)
}

/// Boots the guest against a daemon serving `image_args`; asserts the guest's verdict,
/// then stops the daemon cleanly.
fn guest_run(dir: &TestDir, image_args: &[&str]) {
    guest_run_mode(dir, image_args, "fs");
}

/// Like [`guest_run`], with the guest program picked by `mode` (`fs` or `bulk`).
fn guest_run_mode(dir: &TestDir, image_args: &[&str], mode: &str) {
    let assets = assets();
    let sock = dir.path("sock");
    let mut args = image_args.to_vec();
    args.extend_from_slice(&["--num-queues", "2", "--serial", "guest-disk-1"]);
    let mut daemon = Daemon::start(&sock, &args);
    let log = run_guest(&assets, &sock, &dir.path("console.log"), mode);
    assert_pass(&log);
    assert!(log.contains("queues=2"), "guest did not see 2 queues:\n{}", tail(&log));
    assert!(log.contains("serial=guest-disk-1"), "GET_ID serial not seen by the guest:\n{}", tail(&log));
    // The daemon outlives its frontend, then stops cleanly.
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(20)), Some(0));
}

#[test]
fn guest_filesystem_survives_checksums_and_fsck() {
    let dir = TestDir::new("guest");
    let image = dir.path("disk.raw");
    sparse_file(&image, 256 << 20);
    let image_arg = image.to_str().expect("utf-8 path");
    guest_run(&dir, &["--image", image_arg, "--format", "raw"]);
    // The host agrees with the guest's fsck.
    let fsck = Command::new("e2fsck").args(["-fn", image_arg]).output().expect("run e2fsck");
    assert!(fsck.status.success(), "host e2fsck: {}", String::from_utf8_lossy(&fsck.stdout));
}

#[test]
fn guest_on_qcow2_on_a_loop_device() {
    let dir = TestDir::new("guest-qcow2");
    let backing = dir.path("lv.img");
    sparse_file(&backing, 512 << 20);
    let lv = LoopDev::attach(&backing);
    let dev = lv.0.to_str().expect("utf-8 path").to_string();
    let created = Command::new(env!("CARGO_BIN_EXE_thinblk")).args(["create", &dev, "256M"]).output().expect("create");
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    guest_run(&dir, &["--image", &dev, "--format", "qcow2"]);
    let check = Command::new("qemu-img").args(["check", "-f", "qcow2", &dev]).output().expect("qemu-img check");
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success() && text.contains("No errors were found"), "{text}");
}

#[test]
fn guest_writes_1gib_onto_a_256mib_thin_volume() {
    // qcow2 of 1.5 GiB on a 256 MiB loop volume; `thinblk spm` grows the loop device's
    // backing file by 128 MiB chunks while the guest writes 1 GiB and reads it back.
    let dir = TestDir::new("guest-thin");
    let (args, lv, _spm, backing) = common::thin_volume(&dir);
    let dev = lv.0.to_str().expect("utf-8 path").to_string();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    guest_run_mode(&dir, &args, "bulk");
    let size = std::fs::metadata(&backing).expect("volume").len();
    assert!(size > (1024 << 20), "the volume only reached {} MiB", size >> 20);
    let check = Command::new("qemu-img").args(["check", "-f", "qcow2", &dev]).output().expect("qemu-img check");
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success() && text.contains("No errors were found"), "{text}");
}

#[test]
fn guest_fio_verifies_through_a_ten_second_write_outage_under_retry() {
    use std::sync::atomic::Ordering;
    let dir = TestDir::new("guest-faults");
    let backing = dir.path("backing.raw");
    sparse_file(&backing, 256 << 20);
    let mount = common::faultfs::FaultMount::new(&backing, &dir.path("mnt"));
    let disk = mount.disk();
    // When the guest starts fio, the storage fails every write for 10 s.
    let console = dir.path("console.log");
    let faults = mount.faults.clone();
    let watch = console.clone();
    let injector = std::thread::spawn(move || {
        let deadline = Instant::now() + GUEST_LIMIT;
        while Instant::now() < deadline {
            if std::fs::read_to_string(&watch).unwrap_or_default().contains("guest: fio started") {
                std::thread::sleep(Duration::from_millis(300));
                faults.fail_writes(libc::EIO);
                std::thread::sleep(Duration::from_secs(10));
                faults.clear();
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    });
    guest_run_mode(&dir, &["--image", disk.to_str().expect("utf-8"), "--format", "raw", "--werror", "retry"], "faults");
    assert!(injector.join().expect("injector"), "the guest never started fio");
    let failed = mount.faults.writes_failed.load(Ordering::SeqCst);
    assert!(failed > 0, "no write hit the outage");
    eprintln!("writes failed during the outage (and retried): {failed}");
}

/// Once `start` shows on the console, SIGKILLs the daemon and starts it again (same socket,
/// arguments and log) five times, `interval` apart, stopping early if `done` or the guest's
/// verdict shows. Calls `event(None)` 300 ms after `start`, and `event(Some(i))` before kill
/// `i`. With `control`, writes `STOP` into that disk `interval` after the last restart (the
/// guest's rounds end). Returns the last daemon and the wall-clock millisecond of each kill.
#[allow(clippy::too_many_arguments)]
fn kill_and_restart(
    first: Daemon,
    sock: &Path,
    args: &[String],
    log: &Path,
    console: &Path,
    start: &'static str,
    done: &'static str,
    interval: Duration,
    control: Option<&Path>,
    event: impl Fn(Option<usize>) + Send + 'static,
) -> std::thread::JoinHandle<(Daemon, Vec<u64>)> {
    let control = control.map(Path::to_path_buf);
    let (sock, args, log, watch) = (sock.to_path_buf(), args.to_vec(), log.to_path_buf(), console.to_path_buf());
    std::thread::spawn(move || {
        let mut d = first;
        let mut kills = Vec::new();
        let deadline = Instant::now() + GUEST_LIMIT;
        let seen = |what: &str| {
            let text = std::fs::read_to_string(&watch).unwrap_or_default();
            text.contains(what) || text.contains(VERDICT)
        };
        while Instant::now() < deadline && !seen(start) {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        event(None);
        for i in 0..5 {
            std::thread::sleep(interval);
            if seen(done) {
                break;
            }
            event(Some(i));
            let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
            let _ = d.child.kill();
            let _ = d.child.wait();
            kills.push(at);
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            d = Daemon::start_logging(&sock, &a, Some(&log));
        }
        if let Some(c) = control {
            // The last daemon serves for a while too, then the guest ends its round.
            std::thread::sleep(interval);
            use std::os::unix::fs::FileExt;
            let written = std::fs::OpenOptions::new().write(true).open(&c).and_then(|f| f.write_all_at(b"STOP\n", 0));
            if let Err(e) = written {
                eprintln!("could not write STOP into {}: {e}", c.display());
            }
        }
        (d, kills)
    })
}

/// From each kill to the first request the next daemon served (its log), sorted.
fn restart_gaps(log: &Path, kills: &[u64]) -> Vec<u64> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let firsts: Vec<u64> = text.lines().filter(|l| l.contains("first request since the frontend connected")).filter_map(log_time_ms).collect();
    let mut gaps: Vec<u64> = kills.iter().filter_map(|&k| firsts.iter().find(|&&f| f > k).map(|f| f - k)).collect();
    gaps.sort_unstable();
    gaps
}


/// The daemon is SIGKILLed and started again five times while the guest runs rounds of a
/// verifying fio (2 jobs) on ext4, until the host tells it to stop: QEMU reconnects
/// (`reconnect-ms=1000`), the inflight region carries the requests in flight over each
/// restart, fio verifies, the guest logs no IO error and no hung task, e2fsck is clean; the
/// image checks clean. Reports the time from each SIGKILL to the first request the new
/// daemon serves.
fn guest_survives_restarts(name: &str, format: &str) {
    guest_survives_restarts_with(name, format, false)
}

/// With `outage`, the image sits on the fault fixture and its writes fail (under `retry`)
/// from just after fio starts until after the second restart: parked requests cross two
/// restarts before the storage comes back.
fn guest_survives_restarts_with(name: &str, format: &str, outage: bool) {
    let dir = TestDir::new(name);
    let backing = dir.path("backing.raw");
    let mount = outage.then(|| {
        sparse_file(&backing, 256 << 20);
        common::faultfs::FaultMount::new(&backing, &dir.path("mnt"))
    });
    let image = match &mount {
        Some(m) => m.disk(),
        None => dir.path("disk.img"),
    };
    if outage {
        // (the fixture serves the backing file)
    } else if format == "qcow2" {
        let st = std::process::Command::new(env!("CARGO_BIN_EXE_thinblk"))
            .args(["create", image.to_str().expect("utf-8"), "256M"])
            .status()
            .expect("thinblk create");
        assert!(st.success());
    } else {
        sparse_file(&image, 256 << 20);
    }
    let assets = assets();
    let sock = dir.path("sock");
    let log = dir.path("daemon.log");
    // The guest deletes each round's files on a discard mount: the daemon releases the space
    // (punched holes, freed clusters) with the kills going on.
    let mut args: Vec<String> = ["--image", image.to_str().expect("utf-8"), "--format", format, "--num-queues", "2", "--serial", "guest-disk-1", "--discard", "unmap"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if outage {
        args.extend(["--werror", "retry", "--retry-interval", "300"].iter().map(|s| s.to_string()));
    }
    let faults = mount.as_ref().map(|m| m.faults.clone());
    let first = Daemon::start_logging(&sock, &args.iter().map(String::as_str).collect::<Vec<_>>(), Some(&log));
    let console = dir.path("console.log");
    let control = dir.path("control.raw");
    sparse_file(&control, 1 << 20);
    let killer = kill_and_restart(first, &sock, &args, &log, &console, "guest: fio started", "guest: fio done", Duration::from_millis(1500), Some(&control), move |i| {
        if let Some(f) = &faults {
            match i {
                // Just after fio started, before the first kill.
                None => f.fail_writes(libc::EIO),
                Some(2) => f.clear(),
                _ => {}
            }
        }
    });
    let out = run_guest_with(&assets, &sock, &console, "restart", ",reconnect-ms=1000", Some(&control));
    let (mut daemon, kills) = killer.join().expect("killer");
    assert_pass(&out);
    if let Some(line) = out.lines().find(|l| l.contains("guest: fio done")) {
        eprintln!("{format}: {}", line.trim());
    }
    assert_eq!(kills.len(), 5, "the guest ended before five restarts ({} done)", kills.len());
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(20)), Some(0));
    // SIGKILL to the first request served by the next daemon.
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let gaps = restart_gaps(&log, &kills);
    let resubmitted: usize = text.lines().filter(|l| l.contains("restart recovered from the inflight region")).count();
    eprintln!("{format}: SIGKILL → first request of the new daemon (ms): {gaps:?}, median {} ms; queue recoveries with requests to resubmit: {resubmitted}", gaps.get(gaps.len() / 2).copied().unwrap_or(0));
    assert_eq!(gaps.len(), kills.len(), "a restarted daemon never served a request");
    if let Some(m) = &mount {
        let failed = m.faults.writes_failed.load(std::sync::atomic::Ordering::SeqCst);
        eprintln!("writes failed during the outage (parked across restarts, then done): {failed}");
        assert!(failed > 0, "no write hit the outage");
    }
    if format == "qcow2" {
        let check = std::process::Command::new("qemu-img").args(["check", image.to_str().expect("utf-8")]).output().expect("qemu-img");
        let text = format!("{}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
        eprintln!("qemu-img check after five kills (exit {:?}): {}", check.status.code(), text.trim());
        assert!(check.status.success(), "qemu-img check: {text}");
    }
}

#[test]
fn guest_fio_verifies_across_five_daemon_kills_on_raw() {
    guest_survives_restarts("guest-restart-raw", "raw");
}

#[test]
fn guest_fio_verifies_across_five_daemon_kills_on_qcow2() {
    guest_survives_restarts("guest-restart-qcow2", "qcow2");
}

#[test]
fn guest_fio_verifies_across_daemon_kills_during_a_write_outage() {
    guest_survives_restarts_with("guest-restart-outage", "raw", true);
}

/// The thin volume grows while the daemon is killed and started again: the guest writes 1 GiB
/// onto a 256 MiB volume (`thinblk spm` extends it), the daemon dies five times on the way;
/// parked writes (volume full) and those in flight cross the restarts, every byte verifies.
#[test]
fn guest_writes_1gib_onto_a_thin_volume_across_five_daemon_kills() {
    let dir = TestDir::new("guest-thin-restart");
    let (mut args, lv, _spm, backing) = common::thin_volume(&dir);
    let dev = lv.0.to_str().expect("utf-8 path").to_string();
    args.extend(["--num-queues", "2", "--serial", "guest-disk-1"].iter().map(|s| s.to_string()));
    let sock = dir.path("sock");
    let log = dir.path("daemon.log");
    let console = dir.path("console.log");
    let first = Daemon::start_logging(&sock, &args.iter().map(String::as_str).collect::<Vec<_>>(), Some(&log));
    let killer = kill_and_restart(first, &sock, &args, &log, &console, "guest: bulk started", "guest: 1 GiB written", Duration::from_millis(4000), None, |_| {});
    let out = run_guest_with(&assets(), &sock, &console, "bulk", ",reconnect-ms=1000", None);
    let (mut daemon, kills) = killer.join().expect("killer");
    assert_pass(&out);
    assert_eq!(kills.len(), 5, "the guest finished before five restarts ({} done)", kills.len());
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(20)), Some(0));
    let gaps = restart_gaps(&log, &kills);
    let size = std::fs::metadata(&backing).expect("volume").len();
    eprintln!("thin: SIGKILL → first request of the new daemon (ms): {gaps:?}; the volume grew to {} MiB", size >> 20);
    assert!(size > (1024 << 20), "the volume only reached {} MiB", size >> 20);
    let check = Command::new("qemu-img").args(["check", "-f", "qcow2", &dev]).output().expect("qemu-img check");
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success() && text.contains("No errors were found"), "{text}");
}

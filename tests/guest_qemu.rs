//! A real guest: QEMU under TCG with vhost-user-blk-pci (2 queues, shared memfd memory)
//! boots a Debian kernel whose initramfs runs mkfs, file checksums, a verifying dd pass
//! and e2fsck on the disk thinblk serves. The guest prints the verdict; we assert it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{sparse_file, Daemon, LoopDev, TestDir};

const VERDICT: &str = "THINBLK-GUEST-RESULT: ";
/// Upper bound for one guest run (boot + test + poweroff under TCG).
const GUEST_LIMIT: Duration = Duration::from_secs(420);

/// Builds the guest kernel and initramfs once per test process (the script also locks).
fn assets() -> PathBuf {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = root.join("target/vm-assets");
        let st = Command::new("bash").arg(root.join("tests/vm/build-assets.sh")).arg(&out).status();
        match st {
            Ok(s) if s.success() => Ok(out),
            other => Err(format!("{other:?}")),
        }
    });
    match built {
        Ok(p) => p.clone(),
        Err(e) => panic!("building guest assets failed ({e}); needs busybox-static, e2fsprogs, cpio: see .ci/run"),
    }
}

/// Runs QEMU until it exits or the limit passes; returns the console log.
fn run_guest(assets: &Path, socket: &Path, console: &Path, mode: &str) -> String {
    let qemu = "qemu-system-x86_64";
    let mut child = Command::new(qemu)
        .args(["-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "512M"])
        .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-numa", "node,memdev=mem"])
        .args(["-display", "none", "-monitor", "none", "-nic", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(assets.join("vmlinuz"))
        .arg("-initrd")
        .arg(assets.join(if mode == "faults" { "initramfs-fio.cpio.gz" } else { "initramfs.cpio.gz" }))
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 loglevel=4 thinblk_test={mode}"))
        .arg("-chardev")
        .arg(format!("socket,id=blk0,path={}", socket.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=blk0,num-queues=2"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{qemu} not runnable ({e}): install qemu-system-x86 from bookworm-backports (.ci/run does)"));
    let deadline = Instant::now() + GUEST_LIMIT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait qemu") {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = std::fs::read_to_string(console).unwrap_or_default();
    assert!(status.is_some(), "guest did not finish within {GUEST_LIMIT:?}; console:\n{}", tail(&log));
    log
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
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
    eprintln!("{}", log.lines().filter(|l| l.starts_with("guest:") || l.contains(VERDICT)).collect::<Vec<_>>().join("\n"));
    let verdict = log.lines().find_map(|l| l.trim().strip_prefix(VERDICT)).map(str::to_string);
    assert_eq!(verdict.as_deref(), Some("PASS"), "guest verdict; console:\n{}", tail(&log));
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
    const DOMAIN: &str = "8adbc85e-e554-4ae0-b318-8a5465fe5fe1";
    const VOLUME: &str = "d772f1c6-3ebb-43c3-a42e-73fcd8255a5f";
    let dir = TestDir::new("guest-thin");
    let (inbox, outbox) = (dir.path("inbox"), dir.path("outbox"));
    sparse_file(&inbox, 16 << 20);
    sparse_file(&outbox, 16 << 20);
    let vols = dir.path("volumes");
    std::fs::create_dir_all(vols.join(DOMAIN)).expect("volume dir");
    let backing = vols.join(DOMAIN).join(VOLUME);
    let created = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&backing).arg("1536M").output().expect("qemu-img");
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    std::fs::OpenOptions::new().write(true).open(&backing).and_then(|f| f.set_len(256 << 20)).expect("size volume");
    let lv = LoopDev::attach(&backing);
    let dev = lv.0.to_str().expect("utf-8 path").to_string();
    let _spm = common::spm_process(&inbox, &outbox, &vols, &[], None);
    let lock = dir.path("host-2.lock");
    let args = [
        "--image", &dev, "--format", "qcow2", "--thin", "--chunk-mb", "128", "--utilization-percent", "50",
        "--spm-inbox", inbox.to_str().expect("utf-8"), "--spm-outbox", outbox.to_str().expect("utf-8"),
        "--host-id", "2", "--domain-uuid", DOMAIN, "--volume-uuid", VOLUME, "--mailbox-lock", lock.to_str().expect("utf-8"),
    ];
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

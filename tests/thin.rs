//! Thin volumes end to end: a qcow2 image on a loop device (standing in for an LV) smaller
//! than the disk, the daemon's in-process mailbox client, and `thinblk spm` (file backend)
//! growing the loop device's backing file. The blkio client must never see an IO error.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{check_end_offset, stop_clean as stop, Client, Daemon, LoopDev, Rng, TestDir};

const MIB: u64 = 1 << 20;
const DOMAIN: &str = "8adbc85e-e554-4ae0-b318-8a5465fe5fe1";
const VOLUME: &str = "d772f1c6-3ebb-43c3-a42e-73fcd8255a5f";
const VOLUME2: &str = "11111111-2222-3333-4444-555555555555";
/// Guest block unit of the verification map.
const BLOCK: u64 = 64 * 1024;

/// One test's storage: mailbox volumes, a volume directory the SPM grows, loop devices.
struct Setup {
    dir: TestDir,
    inbox: PathBuf,
    outbox: PathBuf,
    volumes: PathBuf,
}

impl Setup {
    fn new(name: &str) -> Setup {
        let dir = TestDir::new(name);
        let inbox = dir.path("inbox");
        let outbox = dir.path("outbox");
        for p in [&inbox, &outbox] {
            std::fs::File::create(p).unwrap().set_len(16 * MIB).unwrap();
        }
        let volumes = dir.path("volumes");
        std::fs::create_dir_all(volumes.join(DOMAIN)).unwrap();
        Setup { dir, inbox, outbox, volumes }
    }

    /// A volume file of `size` bytes holding a fresh qcow2 of `virtual_size`, on a loop device.
    fn volume(&self, uuid: &str, size: u64, virtual_size: u64) -> (PathBuf, LoopDev) {
        let file = self.volumes.join(DOMAIN).join(uuid);
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&file)
            .arg(virtual_size.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(size).unwrap();
        let lv = LoopDev::attach(&file);
        (file, lv)
    }

    fn spm(&self, extra: &[&str]) -> Daemon {
        common::spm_process(&self.inbox, &self.outbox, &self.volumes, extra, Some(&self.dir.path("spm.log")))
    }

    fn daemon(&self, name: &str, dev: &Path, uuid: &str, host: u16, chunk_mb: u64, percent: u64) -> Daemon {
        self.daemon_with(name, dev, uuid, host, chunk_mb, percent, &[])
    }

    #[allow(clippy::too_many_arguments)]
    fn daemon_with(&self, name: &str, dev: &Path, uuid: &str, host: u16, chunk_mb: u64, percent: u64, extra: &[&str]) -> Daemon {
        let socket = self.dir.path(&format!("{name}.sock"));
        let lock = self.dir.path(&format!("host-{host}.lock"));
        let host = host.to_string();
        let chunk = chunk_mb.to_string();
        let percent = percent.to_string();
        let mut args: Vec<&str> = vec![
            "--image",
            dev.to_str().unwrap(),
            "--format",
            "qcow2",
            "--num-queues",
            "2",
            "--thin",
            "--chunk-mb",
            &chunk,
            "--utilization-percent",
            &percent,
            "--spm-inbox",
            self.inbox.to_str().unwrap(),
            "--spm-outbox",
            self.outbox.to_str().unwrap(),
            "--host-id",
            &host,
            "--domain-uuid",
            DOMAIN,
            "--volume-uuid",
            uuid,
            "--mailbox-lock",
            lock.to_str().unwrap(),
        ];
        // These tests pin the spec's §2 sizing (chunk steps, thresholds); rate-aware sizing
        // on top of it is covered by src/thin/monitor.rs and the thin benchmark.
        if !extra.contains(&"--rate-aware") {
            args.push("--spec-sizing");
        }
        args.extend(extra.iter().filter(|a| **a != "--rate-aware"));
        Daemon::start(&socket, &args)
    }
}

/// Deterministic content of guest block `b` at generation `g`.
fn block_data(b: u64, g: u32, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng(b.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(g) ^ 0x5555).fill(&mut v);
    v
}

/// Writes and remembers what each block holds.
struct Writer {
    gens: Vec<u32>,
}

impl Writer {
    fn new(capacity: u64) -> Writer {
        Writer { gens: vec![0; (capacity / BLOCK) as usize] }
    }

    /// Writes `n` blocks from block `b` as one request; panics on any error.
    fn write(&mut self, c: &mut Client, q: usize, b: u64, n: u64) {
        let mut data = Vec::with_capacity((n * BLOCK) as usize);
        for k in b..b + n {
            self.gens[k as usize] += 1;
            data.extend(block_data(k, self.gens[k as usize], BLOCK as usize));
        }
        let r = c.try_write(q, b * BLOCK, &data, Duration::from_secs(120));
        assert_eq!(r, Some(0), "write of {n} blocks at block {b} failed or hung");
    }

    fn verify(&self, c: &mut Client) {
        let per = 64u64;
        for start in (0..self.gens.len() as u64).step_by(per as usize) {
            let n = per.min(self.gens.len() as u64 - start);
            let got = c.read(0, start * BLOCK, (n * BLOCK) as usize).expect("read back");
            for k in 0..n {
                let g = self.gens[(start + k) as usize];
                let want = if g == 0 { vec![0u8; BLOCK as usize] } else { block_data(start + k, g, BLOCK as usize) };
                let a = (k * BLOCK) as usize;
                assert!(got[a..a + BLOCK as usize] == want[..], "block {} (generation {g}) differs", start + k);
            }
        }
    }
}

fn qemu_img_check(path: &Path) {
    let out = Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(path).output().unwrap();
    assert!(out.status.success(), "qemu-img check: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}


#[test]
fn grows_in_chunk_steps_under_sequential_then_random_writes() {
    let s = Setup::new("thin-grow");
    let start_size = 256 * MIB;
    let capacity = 2048 * MIB;
    let (file, lv) = s.volume(VOLUME, start_size, capacity);
    let _spm = s.spm(&[]);
    let d = s.daemon("disk", &lv.0, VOLUME, 5, 64, 50);
    let mut c = Client::connect(&d.socket, 2).unwrap();
    assert_eq!(c.capacity, capacity);
    let mut w = Writer::new(capacity);
    // 1 GiB sequentially in 4 MiB requests, alternating queues...
    let seq_blocks = 1024 * MIB / BLOCK;
    let step = 4 * MIB / BLOCK;
    for (i, b) in (0..seq_blocks).step_by(step as usize).enumerate() {
        w.write(&mut c, i % 2, b, step);
    }
    // ...then 512 MiB at random places over the whole disk, 64 KiB to 1 MiB each.
    let mut rng = Rng(42);
    let mut written = 0;
    let total_blocks = capacity / BLOCK;
    while written < 512 * MIB {
        let n = 1 + rng.below(16);
        let b = rng.below(total_blocks - n);
        w.write(&mut c, (written / MIB) as usize % 2, b, n);
        written += n * BLOCK;
    }
    assert_eq!(c.flush(0), 0);
    w.verify(&mut c);
    drop(c);
    stop(d);
    let grown = file_size(&file);
    assert!(grown > start_size + 1024 * MIB, "volume only reached {} MiB", grown / MIB);
    assert_eq!((grown - start_size) % (64 * MIB), 0, "volume grew to {} MiB, not in 64 MiB chunks", grown / MIB);
    assert!(grown <= 2253 * MIB, "volume passed the maximum size: {} MiB", grown / MIB);
    qemu_img_check(&lv.0);
}

/// Writes sequentially from `from` until `bytes` are written; returns the next block.
fn fill(w: &mut Writer, c: &mut Client, from: u64, bytes: u64) -> u64 {
    let step = 2 * MIB / BLOCK;
    let mut b = from;
    while (b - from) * BLOCK < bytes {
        w.write(c, 0, b, step);
        b += step;
    }
    b
}

/// On its own thread: connects, writes `bytes` sequentially from the start, verifies them.
fn background_writer(socket: PathBuf, capacity: u64, bytes: u64) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut c = Client::connect(&socket, 2).unwrap();
        let mut w = Writer::new(capacity);
        fill(&mut w, &mut c, 0, bytes);
        w.verify(&mut c);
    })
}

#[test]
fn late_spm_parks_writes_and_resumes_them() {
    let s = Setup::new("thin-late");
    let capacity = 1024 * MIB;
    let (_file, lv) = s.volume(VOLUME, 64 * MIB, capacity);
    let _spm = s.spm(&["--delay-ms", "3000"]);
    let d = s.daemon("disk", &lv.0, VOLUME, 6, 64, 50);
    let mut c = Client::connect(&d.socket, 2).unwrap();
    let mut w = Writer::new(capacity);
    let t0 = Instant::now();
    // 256 MiB: several extensions, each answered 3 s late; writes park meanwhile.
    fill(&mut w, &mut c, 0, 256 * MIB);
    assert!(t0.elapsed() > Duration::from_secs(3), "no extension had to wait for the slow SPM");
    w.verify(&mut c);
    drop(c);
    stop(d);
    qemu_img_check(&lv.0);
}

#[test]
fn requests_survive_the_spm_being_down() {
    let s = Setup::new("thin-down");
    let capacity = 1024 * MIB;
    let (file, lv) = s.volume(VOLUME, 64 * MIB, capacity);
    let d = s.daemon("disk", &lv.0, VOLUME, 7, 64, 50);
    let socket = d.socket.clone();
    // The writer runs on its own thread; it stalls (parked) when the volume is full.
    let writer = background_writer(socket, capacity, 160 * MIB);
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(file_size(&file), 64 * MIB, "the volume grew without an SPM");
    assert!(!writer.is_finished(), "160 MiB fitted in a 64 MiB volume?");
    let _spm = s.spm(&[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !writer.is_finished() {
        assert!(Instant::now() < deadline, "IO did not resume after the SPM came up");
        std::thread::sleep(Duration::from_millis(100));
    }
    writer.join().expect("writer failed");
    assert!(file_size(&file) > 160 * MIB);
    stop(d);
    qemu_img_check(&lv.0);
}

#[test]
fn a_failed_mailbox_write_is_retried_and_parked_io_completes() {
    // The SPM's inbox lives on the fault fixture: the daemon's first writes of its block fail
    // with EIO (a multipath failover). The request must stay queued and reach the SPM once
    // writes work again; a phantom slot would fold every re-send and park the writes forever.
    use std::sync::atomic::Ordering;
    let mut s = Setup::new("thin-mbox-eio");
    let capacity = 512 * MIB;
    let (file, lv) = s.volume(VOLUME, 64 * MIB, capacity);
    let mount = common::faultfs::FaultMount::new(&s.inbox, &s.dir.path("mnt"));
    s.inbox = mount.disk();
    let _spm = s.spm(&[]);
    let addr = format!("unix:{}", s.dir.path("metrics.sock").display());
    let d = s.daemon_with("disk", &lv.0, VOLUME, 14, 64, 50, &["--serial", "eio", "--metrics", &addr]);
    mount.faults.fail_writes(libc::EIO);
    let writer = background_writer(d.socket.clone(), capacity, 100 * MIB);
    let deadline = Instant::now() + Duration::from_secs(30);
    while mount.faults.writes_failed.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the daemon never tried to write its mailbox block");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A second of refused writes (the client retries every 0.5 s meanwhile).
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(file_size(&file), 64 * MIB, "extended although no request could be written");
    assert!(!writer.is_finished(), "100 MiB fitted in a 64 MiB volume?");
    let failed = scrape_until(&addr, "a write error", |m| m.one("thinblk_mailbox_write_errors_total", &[("disk", "eio")]) >= 1.0);
    assert_eq!(failed.one("thinblk_extensions_completed_total", &[("disk", "eio")]), 0.0);
    mount.faults.fail_writes(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !writer.is_finished() {
        assert!(Instant::now() < deadline, "parked IO did not complete after mailbox writes worked again");
        std::thread::sleep(Duration::from_millis(100));
    }
    writer.join().expect("writer failed");
    assert!(file_size(&file) > 100 * MIB);
    let log = std::fs::read_to_string(s.dir.path("spm.log")).unwrap();
    assert!(log.contains("extended"), "{log}");
    stop(d);
    qemu_img_check(&lv.0);
}

#[test]
fn two_daemons_share_one_host_block() {
    let s = Setup::new("thin-two");
    let capacity = 512 * MIB;
    let (f1, lv1) = s.volume(VOLUME, 64 * MIB, capacity);
    let (f2, lv2) = s.volume(VOLUME2, 64 * MIB, capacity);
    let _spm = s.spm(&[]);
    let d1 = s.daemon("one", &lv1.0, VOLUME, 9, 64, 50);
    let d2 = s.daemon("two", &lv2.0, VOLUME2, 9, 64, 50);
    let threads: Vec<_> = [d1.socket.clone(), d2.socket.clone()]
        .into_iter()
        .map(|socket| {
            background_writer(socket, capacity, 256 * MIB)
        })
        .collect();
    for t in threads {
        t.join().expect("a writer failed");
    }
    for f in [&f1, &f2] {
        assert!(file_size(f) > 256 * MIB, "{} did not grow", f.display());
    }
    stop(d1);
    stop(d2);
    qemu_img_check(&lv1.0);
    qemu_img_check(&lv2.0);
}

#[test]
fn garbage_in_the_mailbox_is_ignored() {
    use std::os::unix::fs::FileExt;
    let s = Setup::new("thin-garbage");
    let capacity = 512 * MIB;
    let (file, lv) = s.volume(VOLUME, 64 * MIB, capacity);
    let host = 11u64;
    // Other hosts' blocks: a bad checksum, an unknown opcode (with a valid checksum).
    let inbox = std::fs::OpenOptions::new().write(true).open(&s.inbox).unwrap();
    let mut bad = vec![0u8; 4096];
    bad[..64].copy_from_slice(&[b'1'; 64]);
    bad[4092..].copy_from_slice(&[1, 2, 3, 4]);
    inbox.write_all_at(&bad, 20 * 4096).unwrap();
    let mut unknown = vec![0u8; 4096];
    unknown[..5].copy_from_slice(b"1zzzz");
    unknown[5..64].fill(b'0');
    let sum: u32 = unknown[..4092].iter().map(|&b| u32::from(b)).sum();
    unknown[4092..].copy_from_slice(&sum.to_le_bytes());
    inbox.write_all_at(&unknown, 21 * 4096).unwrap();
    let _spm = s.spm(&[]);
    let d = s.daemon("disk", &lv.0, VOLUME, host as u16, 64, 50);
    let socket = d.socket.clone();
    let writer = background_writer(socket, capacity, 200 * MIB);
    // Meanwhile, noise in our reply block: replies that match no request.
    let outbox = std::fs::OpenOptions::new().write(true).open(&s.outbox).unwrap();
    let mut rng = Rng(7);
    let mut noise = vec![0u8; 4096];
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(700));
        rng.fill(&mut noise[..64]);
        noise[0] = b'1';
        outbox.write_all_at(&noise, host * 4096).unwrap();
    }
    writer.join().expect("writer failed");
    assert!(file_size(&file) > 200 * MIB);
    stop(d);
    qemu_img_check(&lv.0);
    let log = std::fs::read_to_string(s.dir.path("spm.log")).unwrap();
    assert!(log.contains("bad checksum ignored") && log.contains("host=20"), "{log}");
    assert!(log.contains("mailbox message ignored") && log.contains("unknown opcode"), "{log}");
    assert_eq!(log.matches("bad checksum").count(), 1, "logged on every poll: {log}");
}

#[test]
fn kernel_enospc_at_the_volume_end_parks_and_extends() {
    // The daemon believes the volume is 128 MiB; it is then cut to 64 MiB behind its back
    // (beyond anything allocated). Writes past 64 MiB get ENOSPC from the kernel, not from
    // the allocator's limit: they must park, trigger an extension, and complete.
    let s = Setup::new("thin-enospc");
    let capacity = 512 * MIB;
    let (file, lv) = s.volume(VOLUME, 128 * MIB, capacity);
    let _spm = s.spm(&[]);
    let d = s.daemon("disk", &lv.0, VOLUME, 12, 64, 50);
    let mut c = Client::connect(&d.socket, 2).unwrap();
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(64 * MIB).unwrap();
    let out = Command::new("losetup").arg("-c").arg(&lv.0).output().unwrap();
    assert!(out.status.success(), "losetup -c: {}", String::from_utf8_lossy(&out.stderr));
    let mut w = Writer::new(capacity);
    fill(&mut w, &mut c, 0, 120 * MIB);
    w.verify(&mut c);
    drop(c);
    stop(d);
    assert!(file_size(&file) >= 128 * MIB, "the volume was not extended");
    qemu_img_check(&lv.0);
}

#[test]
fn demo_grows_its_file_volume() {
    // The README's first command, with a smaller chunk: the in-process SPM grows the file.
    let dir = TestDir::new("thin-demo");
    let child = Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .args(["demo", "--size-mib", "512", "--chunk-mb", "32", "--num-queues", "1", "--dir"])
        .arg(&dir.0)
        .env("THINBLK_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let socket = dir.path("thinblk.sock");
    let mut d = Daemon { child, socket: socket.clone() };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(d.child.try_wait().unwrap().is_none(), "demo exited early");
        assert!(Instant::now() < deadline, "demo socket did not appear");
        std::thread::sleep(Duration::from_millis(20));
    }
    let image = dir.path("volumes").join(DOMAIN).join(VOLUME);
    assert_eq!(file_size(&image), 32 * MIB, "a new thin volume is one chunk");
    let mut c = Client::connect(&socket, 1).unwrap();
    let mut w = Writer::new(512 * MIB);
    fill(&mut w, &mut c, 0, 160 * MIB);
    w.verify(&mut c);
    drop(c);
    assert!(file_size(&image) > 160 * MIB, "the demo volume did not grow");
    // Whole chunks (rate-aware sizing rounds up to them), or the maximum size (1.1 × 512 MiB).
    let size = file_size(&image);
    assert!(size % (32 * MIB) == 0 || size == 564 * MIB, "demo volume of {} MiB", size / MIB);
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(20)), Some(0));
    qemu_img_check(&image);
}

/// Runs an LVM command; false when it fails.
fn lvm(args: &[&str]) -> bool {
    Command::new(args[0]).args(&args[1..]).stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false)
}

/// Removes the test VG and its PV's loop device even when the test fails.
struct Vg {
    vg: String,
    _pv: LoopDev,
}

impl Drop for Vg {
    fn drop(&mut self) {
        lvm(&["vgchange", "-an", &self.vg]);
        lvm(&["vgremove", "-f", &self.vg]);
    }
}

#[test]
fn real_lvm_volume_grows_through_lvextend_where_device_mapper_exists() {
    // Needs lvm2 and device-mapper; these CI machines have neither, so the test says so and
    // passes trivially there. On a machine with both it runs the whole LVM path: lvextend by
    // `thinblk spm --backend lvm`, lvchange --refresh by the daemon.
    if !Path::new("/dev/mapper/control").exists() || !lvm(&["vgs", "--version"]) {
        eprintln!("skipped: no device-mapper or no lvm2 on this machine");
        return;
    }
    let s = Setup::new("thin-lvm");
    let pv_file = s.dir.path("pv.img");
    std::fs::File::create(&pv_file).unwrap().set_len(1024 * MIB).unwrap();
    let pv = LoopDev::attach(&pv_file);
    let pv_path = pv.0.to_str().unwrap().to_string();
    assert!(lvm(&["vgcreate", "-s", "4m", DOMAIN, &pv_path]), "vgcreate");
    let _vg = Vg { vg: DOMAIN.to_string(), _pv: pv };
    assert!(lvm(&["lvcreate", "-n", VOLUME, "-L", "128m", "-y", DOMAIN]), "lvcreate");
    let dev = PathBuf::from(format!("/dev/{DOMAIN}/{VOLUME}"));
    let out = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&dev).arg((768 * MIB).to_string()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let child = Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .args(["spm", "--backend", "lvm"])
        .arg("--inbox")
        .arg(&s.inbox)
        .arg("--outbox")
        .arg(&s.outbox)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let _spm = Daemon { child, socket: s.dir.path("no-socket") };
    let d = s.daemon("disk", &dev, VOLUME, 13, 64, 50);
    let mut c = Client::connect(&d.socket, 2).unwrap();
    let mut w = Writer::new(768 * MIB);
    fill(&mut w, &mut c, 0, 300 * MIB);
    w.verify(&mut c);
    drop(c);
    stop(d);
    let out = Command::new("lvs").args(["--noheadings", "--nosuffix", "--units", "b", "-o", "lv_size"]).arg(format!("{DOMAIN}/{VOLUME}")).output().unwrap();
    let size: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
    assert!(size > 300 * MIB, "the LV is {size} bytes");
    qemu_img_check(&dev);
}

/// Scrapes until `ok` holds for the samples (the control thread publishes as it goes).
fn scrape_until(addr: &str, what: &str, ok: impl Fn(&common::metrics::Samples) -> bool) -> common::metrics::Samples {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = common::metrics::scrape(addr);
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "metrics never showed {what}: {:?}", s.0.iter().filter(|x| x.name.contains("thin") || x.name.contains("volume") || x.name.contains("extension") || x.name.contains("mailbox")).collect::<Vec<_>>());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn metrics_follow_the_volume_as_it_grows() {
    let s = Setup::new("thin-metrics");
    let capacity = 512 * MIB;
    let (file, lv) = s.volume(VOLUME, 64 * MIB, capacity);
    let _spm = s.spm(&[]);
    let addr = format!("unix:{}", s.dir.path("metrics.sock").display());
    let d = s.daemon_with("disk", &lv.0, VOLUME, 9, 64, 50, &["--serial", "thin-1", "--metrics", &addr]);
    let disk = [("disk", "thin-1")];
    let set = [("disk", "thin-1"), ("state", "set")];
    let before = scrape_until(&addr, "an armed threshold", |m| m.one("thinblk_thin_state", &set) == 1.0);
    assert_eq!(before.one("thinblk_volume_physical_bytes", &disk), (64 * MIB) as f64);
    assert_eq!(before.one("thinblk_extension_requests_total", &disk), 0.0);
    assert_eq!(before.one("thinblk_capacity_bytes", &disk), capacity as f64);
    assert!(before.one("thinblk_volume_max_size_bytes", &disk) >= capacity as f64);
    let threshold = before.one("thinblk_write_threshold_bytes", &disk);
    assert!(threshold > 0.0 && threshold < (64 * MIB) as f64, "threshold {threshold}");

    let mut c = Client::connect(&d.socket, 2).unwrap();
    let mut w = Writer::new(capacity);
    fill(&mut w, &mut c, 0, 200 * MIB);
    assert_eq!(c.flush(0), 0);
    let after = scrape_until(&addr, "a settled volume", |m| {
        m.one("thinblk_mailbox_slots_in_use", &disk) == 0.0
            && m.one("thinblk_thin_state", &set) == 1.0
            && m.one("thinblk_volume_physical_bytes", &disk) == file_size(&file) as f64
    });
    let completed = after.one("thinblk_extensions_completed_total", &disk);
    assert!(completed >= 2.0, "200 MiB on a 64 MiB volume in 64 MiB chunks: {completed} extensions");
    assert!(after.one("thinblk_extension_requests_total", &disk) >= completed);
    assert_eq!(after.one("thinblk_extension_failures_total", &disk), 0.0);
    assert_eq!(after.one("thinblk_extension_duration_seconds_count", &disk), completed);
    assert!(after.one("thinblk_extension_duration_seconds_sum", &disk) > 0.0);
    let physical = after.one("thinblk_volume_physical_bytes", &disk);
    let allocation = after.one("thinblk_allocation_bytes", &disk);
    assert!(allocation > (200 * MIB) as f64 && allocation <= physical, "allocation {allocation}, physical {physical}");
    assert!(after.one("thinblk_write_threshold_bytes", &disk) > allocation);
    assert_eq!(after.sum("thinblk_request_errors_total", &[]), 0.0);
    common::metrics::assert_documented(&after);
    drop(c);
    stop(d);
    assert_eq!(allocation as u64, check_end_offset(&lv.0), "allocation_bytes is thinblk check's image end offset");
    assert_eq!(physical as u64, file_size(&file), "physical is the volume's size");
}

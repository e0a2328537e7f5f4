//! Thin-volume benchmark: how fast thinblk reacts to a threshold crossing and grows the
//! volume through the vdsm mailbox, and whether a sequential allocating writer ever waits.
//!
//! 1. Extension latency: a 1M sequential writer crosses ~16 thresholds (chunk 64 MiB, 50 %)
//!    against `thinblk spm` (doorbell polled every 0.5 s, as vdsm's SPM). Reported from the
//!    daemon's own log: threshold crossing → request written to the inbox (`signal_to_inbox_us`),
//!    and request → volume refreshed (`duration_ms`). vdsm's measured round trip is 2.2–6.2 s.
//! 2. Parked time at the defaults (20 % / 2560 MiB): 4k sequential allocating writes at QD32
//!    over several extensions; the run reports how many requests ever parked (target 0).
//! 3. A slow SPM (1100 ms per extension), 25 s of 1 MiB QD8 sequential writes at the defaults,
//!    with the spec's sizing alone and with rate-aware sizing: rate, extensions, requests
//!    parked (target 0), and the space allocated beyond what was written
//!    (`THINBLK_BENCH_SLOW_SECS` changes the duration).
//!
//! Volumes are files (the file volume backend); `THINBLK_BENCH_DIR` picks the directory,
//! `THINBLK_BENCH_THIN_GIB` the size of run 2 (default 6 GiB: three extensions).

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};

const MIB: u64 = 1 << 20;
const DOMAIN: &str = "8adbc85e-e554-4ae0-b318-8a5465fe5fe1";
const VOLUME: &str = "d772f1c6-3ebb-43c3-a42e-73fcd8255a5f";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Setup {
    dir: PathBuf,
    image: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn setup(base: &Path, name: &str, capacity: u64, initial: u64) -> Setup {
    let dir = base.join(format!("thinblk-thin-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let vols = dir.join("volumes").join(DOMAIN);
    std::fs::create_dir_all(&vols).expect("bench dir");
    for f in ["inbox", "outbox"] {
        std::fs::File::create(dir.join(f)).and_then(|f| f.set_len(16 * MIB)).expect("mailbox");
    }
    let image = vols.join(VOLUME);
    let st = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg(capacity.to_string()).status();
    assert!(st.map(|s| s.success()).unwrap_or(false), "qemu-img create");
    std::fs::OpenOptions::new().write(true).open(&image).and_then(|f| f.set_len(initial)).expect("size volume");
    Setup { dir, image }
}

fn start(s: &Setup, chunk_mb: u64, percent: u64) -> (Proc, Proc, PathBuf, PathBuf) {
    start_with(s, chunk_mb, percent, 0, &[])
}

/// [`start`] with an SPM that takes `delay_ms` per extension and extra daemon arguments.
fn start_with(s: &Setup, chunk_mb: u64, percent: u64, delay_ms: u64, extra: &[&str]) -> (Proc, Proc, PathBuf, PathBuf) {
    let bin = env!("CARGO_BIN_EXE_thinblk");
    let spm = Command::new(bin)
        .args(["spm", "--backend", "file", "--delay-ms", &delay_ms.to_string()])
        .env("THINBLK_LOG", "warn")
        .arg("--inbox")
        .arg(s.dir.join("inbox"))
        .arg("--outbox")
        .arg(s.dir.join("outbox"))
        .arg("--volumes")
        .arg(s.dir.join("volumes"))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn spm");
    let log = s.dir.join("daemon.log");
    let sock = s.dir.join("thinblk.sock");
    let mut child = Command::new(bin)
        .args(["--format", "qcow2", "--num-queues", "1", "--log-level", "info", "--thin", "--host-id", "1"])
        .args(["--domain-uuid", DOMAIN, "--volume-uuid", VOLUME])
        .args(["--chunk-mb", &chunk_mb.to_string(), "--utilization-percent", &percent.to_string()])
        .arg("--image")
        .arg(&s.image)
        .arg("--spm-inbox")
        .arg(s.dir.join("inbox"))
        .arg("--spm-outbox")
        .arg(s.dir.join("outbox"))
        .arg("--mailbox-lock")
        .arg(s.dir.join("host-1.lock"))
        .arg("--socket-path")
        .arg(&sock)
        .args(extra)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn thinblk");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(child.try_wait().ok().flatten().is_none(), "thinblk exited; see {}", log.display());
        assert!(Instant::now() < deadline, "socket did not appear");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Proc(spm), Proc(child), sock, log)
}

/// Sequential writes of `bs` at queue depth `qd` until `total` bytes; returns IOPS.
fn seq_write(sock: &Path, bs: usize, qd: usize, total: u64) -> f64 {
    seq_write_for(sock, bs, qd, total, Duration::MAX).0
}

/// [`seq_write`], stopping after `limit` too; returns (IOPS, bytes written).
fn seq_write_for(sock: &Path, bs: usize, qd: usize, total: u64, limit: Duration) -> (f64, u64) {
    let mut b = Blkio::new("virtio-blk-vhost-user").expect("blkio");
    b.set_str("path", sock.to_str().unwrap_or_default()).expect("path");
    b.connect().expect("connect");
    b.set_i32("num-queues", 1).expect("queues");
    let mut out = b.start().expect("start");
    let q = &mut out.queues[0];
    let region = b.alloc_mem_region(bs * qd).expect("alloc");
    b.map_mem_region(&region).expect("map");
    let base = region.addr as *mut u8;
    // SAFETY: the region is bs*qd bytes and ours.
    unsafe { std::ptr::write_bytes(base, 0xa5, bs * qd) };
    let n = total / bs as u64;
    let mut next = 0u64;
    let mut done = 0u64;
    let t0 = Instant::now();
    let mut comps: Vec<MaybeUninit<Completion>> = (0..qd).map(|_| MaybeUninit::uninit()).collect();
    for slot in 0..qd.min(n as usize) {
        // SAFETY: slot < qd keeps the buffer inside the region.
        q.write(next * bs as u64, unsafe { base.add(slot * bs) }, bs, slot, ReqFlags::empty());
        next += 1;
    }
    let mut n = n;
    while done < n {
        if t0.elapsed() >= limit && next < n {
            // Time is up: finish what is in flight, submit nothing new.
            n = next;
            if done >= n {
                break;
            }
        }
        let mut timeout = Duration::from_secs(60);
        let k = q.do_io(&mut comps, 1, Some(&mut timeout), None).expect("do_io");
        assert!(k > 0, "IO stalled for 60 s");
        for c in comps.iter().take(k) {
            // SAFETY: do_io initialised the first k completions.
            let c = unsafe { c.assume_init_ref() };
            assert_eq!(c.ret, 0, "IO failed");
            done += 1;
            if next < n {
                // SAFETY: user_data is the slot (< qd).
                q.write(next * bs as u64, unsafe { base.add(c.user_data * bs) }, bs, c.user_data, ReqFlags::empty());
                next += 1;
            }
        }
    }
    (done as f64 / t0.elapsed().as_secs_f64(), done * bs as u64)
}

/// Values of `key=` on log lines containing `marker`.
fn log_values(log: &str, marker: &str, key: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains(marker))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| v.parse().ok()))
        .collect()
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn pct(v: &[u64], p: f64) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    s.get(((s.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("thin: run with `cargo bench --bench thin`");
        return;
    }
    let base: PathBuf = std::env::var_os("THINBLK_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);

    let only_slow = std::env::var("THINBLK_BENCH_ONLY").map(|v| v == "slow").unwrap_or(false);
    if !only_slow {
        fast_rows(&base);
    }
    slow_spm_rows(&base);
}

/// Rows 1 and 2.
fn fast_rows(base: &Path) {
    // 1. Reaction and round trip.
    let s = setup(base, "latency", 4096 * MIB, 128 * MIB);
    let (spm, daemon, sock, log) = start(&s, 64, 50);
    let iops = seq_write(&sock, 1 << 20, 8, 1024 * MIB);
    drop(daemon);
    drop(spm);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let mut signal_us = log_values(&text, "extension requested", "signal_to_inbox_us=");
    let mut round_ms = log_values(&text, "outcome=\"extended\"", "duration_ms=");
    let mut wake_us = log_values(&text, "extension requested", "wake_us=");
    println!("thin extension latency (1M seq write QD8, chunk 64 MiB at 50 %, {:.0} MiB/s):", iops);
    println!(
        "  threshold crossing -> request in the inbox: median {} us, p90 {} us over {} requests (target < 1000 us)",
        median(&mut signal_us),
        pct(&signal_us, 0.9),
        signal_us.len()
    );
    println!("    of which the control thread's wake-up: median {} us", median(&mut wake_us));
    println!(
        "  request -> volume grown and refreshed:      median {} ms, p90 {} ms over {} extensions (target < 1500 ms; vdsm 2200-6200 ms)",
        median(&mut round_ms),
        pct(&round_ms, 0.9),
        round_ms.len()
    );
    drop(s);

    // 2. Parked time at the defaults.
    let gib = std::env::var("THINBLK_BENCH_THIN_GIB").ok().and_then(|v| v.parse().ok()).unwrap_or(6u64);
    let s = setup(base, "defaults", 16 * 1024 * MIB, 2560 * MIB);
    let (spm, daemon, sock, log) = start(&s, 2560, 20);
    let iops = seq_write(&sock, 4096, 32, gib << 30);
    drop(daemon);
    drop(spm);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let extensions = log_values(&text, "outcome=\"extended\"", "duration_ms=").len();
    let parked = log_values(&text, "outcome=\"extended\"", "parked_total=").into_iter().max().unwrap_or(0);
    let parking_lines = text.lines().filter(|l| l.contains("parking IO")).count();
    let mut signal_us = log_values(&text, "extension requested", "signal_to_inbox_us=");
    println!(
        "4k sequential allocating write QD32, {gib} GiB at 20 % / 2560 MiB: {:.0} IOPS ({:.0} MiB/s), {} extensions, {} requests parked ({} parking episodes; target 0)",
        iops,
        iops * 4096.0 / MIB as f64,
        extensions,
        parked,
        parking_lines
    );
    println!("  threshold crossing -> request in the inbox there: median {} us over {} requests", median(&mut signal_us), signal_us.len());
}

/// Row 3.
fn slow_spm_rows(base: &Path) {
    // 3. A slow SPM (1.1 s per extension: vdsm's lvextend 0.92 s plus refresh 0.22 s), 25 s of
    //    1 MiB sequential writes at QD8, default policy: the spec's sizes alone, then rate-aware.
    let secs = std::env::var("THINBLK_BENCH_SLOW_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(25u64);
    for (label, extra) in [("spec sizing", &["--spec-sizing"][..]), ("rate-aware", &[][..])] {
        let s = setup(base, "slow-spm", 64 * 1024 * MIB, 2560 * MIB);
        let (spm, daemon, sock, log) = start_with(&s, 2560, 20, 1100, extra);
        let (iops, written) = seq_write_for(&sock, 1 << 20, 8, 64 * 1024 * MIB, Duration::from_secs(secs));
        drop(daemon);
        drop(spm);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let extensions = log_values(&text, "outcome=\"extended\"", "duration_ms=").len();
        let parked = log_values(&text, "outcome=\"extended\"", "parked_total=").into_iter().max().unwrap_or(0);
        let volume = std::fs::metadata(&s.image).map(|m| m.len()).unwrap_or(0);
        // When the parks happened: the running total after each extension.
        let totals = log_values(&text, "outcome=\"extended\"", "parked_total=");
        let sizes: Vec<u64> = log_values(&text, "outcome=\"extended\"", "physical=").into_iter().map(|p| p >> 20).collect();
        println!(
            "slow SPM (1100 ms), 1M seq write QD8 for {secs} s, 20 % / 2560 MiB, {label}: {:.0} MiB/s, {} extensions, {} requests parked (target 0), volume {} MiB for {} MiB written ({} MiB beyond)",
            iops,
            extensions,
            parked,
            volume >> 20,
            written >> 20,
            volume.saturating_sub(written) >> 20
        );
        println!("  parked so far after each extension: {totals:?}; volume sizes (MiB): {sizes:?}");
        drop(s);
    }
}

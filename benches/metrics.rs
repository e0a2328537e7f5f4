//! What the metrics cost: 4k randread QD32 through thinblk without `--metrics`, and with it
//! while a scraper fetches /metrics ten times a second, in alternating rounds of one run;
//! qemu-storage-daemon on the same image for scale.
//!
//! `cargo bench --bench metrics` (env: THINBLK_BENCH_SECS per round, default 5;
//! THINBLK_BENCH_ROUNDS, default 3; THINBLK_BENCH_SIZE_MIB, default 1024;
//! THINBLK_BENCH_DIR, default $TMPDIR). Target: the metrics cost under 2 % of IOPS.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{env_u64, median, prefill, run_blkio, start_qsd, start_thinblk, warm, Result, Workload};

const LOAD: Workload = Workload { name: "4k randread QD32", write: false, random: true, bs: 4096, qd: 32 };
const SCRAPE_EVERY: Duration = Duration::from_millis(100);

/// Fetches /metrics every [`SCRAPE_EVERY`] until stopped; returns how many answers came.
fn scraper(addr: String, stop: Arc<AtomicBool>, count: Arc<AtomicU64>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            if let Ok(mut s) = std::net::TcpStream::connect(&addr) {
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n");
                let mut body = Vec::new();
                if s.read_to_end(&mut body).is_ok() && body.starts_with(b"HTTP/1.1 200") {
                    count.fetch_add(1, Ordering::SeqCst);
                }
            }
            std::thread::sleep(SCRAPE_EVERY);
        }
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(19_100)
}

/// One thinblk run; with metrics, a scraper runs alongside. Returns the result and scrapes.
fn run_thinblk(img: &Path, format: &str, dir: &Path, size: u64, secs: u64, metrics: bool) -> (Result, u64) {
    let sock = dir.join("thinblk.sock");
    let addr = format!("127.0.0.1:{}", free_port());
    let extra: Vec<&str> = if metrics { vec!["--metrics", &addr] } else { Vec::new() };
    warm(img);
    let server = start_thinblk(img, format, &sock, &extra);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let scraping = metrics.then(|| scraper(addr.clone(), stop.clone(), count.clone()));
    let r = run_blkio(&sock, server.child.id(), size, LOAD, secs);
    stop.store(true, Ordering::SeqCst);
    if let Some(t) = scraping {
        let _ = t.join();
    }
    (r, count.load(Ordering::SeqCst))
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("metrics: run with `cargo bench --bench metrics`");
        return;
    }
    let secs = env_u64("THINBLK_BENCH_SECS", 5);
    let rounds = env_u64("THINBLK_BENCH_ROUNDS", 3).max(1);
    let size = env_u64("THINBLK_BENCH_SIZE_MIB", 1024) << 20;
    let dir: PathBuf = std::env::var_os("THINBLK_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let dir = dir.join(format!("thinblk-bench-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let raw = dir.join("bench.raw");
    prefill(&raw, size);
    let qcow2 = dir.join("allocated.qcow2");
    let st = Command::new("qemu-img")
        .args(["convert", "-q", "-O", "qcow2", "-o", "cluster_size=65536"])
        .arg(&raw)
        .arg(&qcow2)
        .status()
        .expect("qemu-img");
    assert!(st.success(), "qemu-img convert");
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    println!("{}: {rounds} rounds of {secs} s each way, alternating; scraping every {SCRAPE_EVERY:?} with --metrics", LOAD.name);
    println!(
        "{:<8} | {:>10} {:>8} | {:>10} {:>8} {:>8} | {:>8} | {:>10} | {:>8}",
        "image", "off IOPS", "p99us", "on IOPS", "p99us", "scrapes", "cost", "qsd IOPS", "on/qsd"
    );
    for (name, img, format) in [("raw", &raw, "raw"), ("qcow2", &qcow2, "qcow2")] {
        let (mut off, mut on, mut off_p99, mut on_p99, mut scrapes) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0);
        for round in 0..rounds {
            // Alternate which goes first, so drift in the host's state favours neither.
            let order = if round % 2 == 0 { [false, true] } else { [true, false] };
            for metrics in order {
                let (r, n) = run_thinblk(img, format, &dir, size, secs, metrics);
                if metrics {
                    on.push(r.iops);
                    on_p99.push(r.p99_us);
                    scrapes += n;
                } else {
                    off.push(r.iops);
                    off_p99.push(r.p99_us);
                }
            }
        }
        warm(img);
        let qsock = dir.join("qsd.sock");
        let q = start_qsd(img, format, &qsock).map(|s| run_blkio(&qsock, s.child.id(), size, LOAD, secs)).unwrap_or_default();
        let (off_m, on_m) = (median(&mut off), median(&mut on));
        let cost = if off_m > 0.0 { (off_m - on_m) / off_m * 100.0 } else { 0.0 };
        let vs = if q.iops > 0.0 { format!("{:.2}x", on_m / q.iops) } else { "n/a".into() };
        println!(
            "{:<8} | {:>10.0} {:>8.1} | {:>10.0} {:>8.1} {:>8} | {:>7.2}% | {:>10.0} | {:>8}",
            name,
            off_m,
            median(&mut off_p99),
            on_m,
            median(&mut on_p99),
            scrapes,
            cost,
            q.iops,
            vs
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

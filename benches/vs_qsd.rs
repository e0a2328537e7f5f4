//! Side-by-side benchmark: thinblk vs qemu-storage-daemon (both driven by the same libblkio
//! vhost-user client, same raw file) vs fio io_uring direct=1 on the file itself.
//!
//! `cargo bench --bench vs_qsd` (env: THINBLK_BENCH_SECS per workload, default 5;
//! THINBLK_BENCH_SIZE_MIB file size, default 1024; THINBLK_BENCH_DIR, default $TMPDIR;
//! THINBLK_BENCH_ONLY, a substring of the workload names to run).
//! Prints IOPS, p50/p99 latency, server CPU and the ratios.

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    write: bool,
    random: bool,
    bs: usize,
    qd: usize,
}

const WORKLOADS: [Workload; 5] = [
    Workload { name: "4k randread QD1", write: false, random: true, bs: 4096, qd: 1 },
    Workload { name: "4k randread QD32", write: false, random: true, bs: 4096, qd: 32 },
    Workload { name: "4k randwrite QD32", write: true, random: true, bs: 4096, qd: 32 },
    Workload { name: "1M seqread QD8", write: false, random: false, bs: 1 << 20, qd: 8 },
    Workload { name: "1M seqwrite QD8", write: true, random: false, bs: 1 << 20, qd: 8 },
];

#[derive(Clone, Copy, Default)]
struct Result {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_pct: f64,
}

struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_socket(sock: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if let Ok(Some(s)) = child.try_wait() {
            panic!("server exited: {s}");
        }
        assert!(Instant::now() < deadline, "socket did not appear");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_thinblk(image: &Path, format: &str, sock: &Path) -> Server {
    let bin = env!("CARGO_BIN_EXE_thinblk");
    let mut child = Command::new(bin)
        .args(["--image", image.to_str().unwrap(), "--format", format, "--num-queues", "1", "--log-level", "warn"])
        .arg("--socket-path")
        .arg(sock)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn thinblk");
    wait_socket(sock, &mut child);
    Server { child }
}

fn start_qsd(image: &Path, format: &str, sock: &Path) -> Option<Server> {
    let mut child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={},aio=io_uring,cache.direct=on",
            image.display()
        ))
        .arg("--blockdev")
        .arg(format!("driver={format},node-name=disk0,file=file0"))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues=1",
            sock.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .ok()?;
    wait_socket(sock, &mut child);
    Some(Server { child })
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" of the command name: state is field 3; utime 14, stime 15.
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ut: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let st: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ut + st
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

/// Drives one workload over a vhost-user socket for `secs`; returns the result.
fn run_blkio(sock: &Path, pid: u32, size: u64, w: Workload, secs: u64) -> Result {
    let mut b = Blkio::new("virtio-blk-vhost-user").expect("blkio");
    b.set_str("path", sock.to_str().unwrap()).unwrap();
    b.connect().expect("connect");
    b.set_i32("num-queues", 1).unwrap();
    let mut out = b.start().expect("start");
    let q = &mut out.queues[0];
    let region = b.alloc_mem_region(w.bs * w.qd).expect("alloc");
    b.map_mem_region(&region).expect("map");
    let base = region.addr as *mut u8;
    // SAFETY: the region is bs*qd bytes and ours.
    unsafe { std::ptr::write_bytes(base, 0x5a, w.bs * w.qd) };
    let blocks = size / w.bs as u64;
    let mut rng = Rng(0x1234_5678);
    let mut seq = 0u64;
    let mut next_off = |rng: &mut Rng| {
        if w.random {
            (rng.next() % blocks) * w.bs as u64
        } else {
            let o = (seq % blocks) * w.bs as u64;
            seq += 1;
            o
        }
    };
    let mut started = vec![Instant::now(); w.qd];
    let submit = |q: &mut blkio::Blkioq, slot: usize, off: u64| {
        // SAFETY: slot < qd, so the buffer stays in the region.
        let buf = unsafe { base.add(slot * w.bs) };
        if w.write {
            q.write(off, buf, w.bs, slot, ReqFlags::empty());
        } else {
            q.read(off, buf, w.bs, slot, ReqFlags::empty());
        }
    };
    // Warm up briefly, then measure.
    let cpu0 = cpu_ticks(pid);
    let t0 = Instant::now();
    for slot in 0..w.qd {
        started[slot] = Instant::now();
        submit(q, slot, next_off(&mut rng));
    }
    let mut lat_ns: Vec<u32> = Vec::with_capacity(1 << 20);
    let mut done = 0u64;
    let mut comps: Vec<MaybeUninit<Completion>> = (0..w.qd).map(|_| MaybeUninit::uninit()).collect();
    let end = t0 + Duration::from_secs(secs);
    let mut inflight = w.qd;
    while inflight > 0 {
        let mut timeout = Duration::from_secs(10);
        let n = q.do_io(&mut comps, 1, Some(&mut timeout), None).expect("do_io");
        assert!(n > 0, "IO timed out");
        let now = Instant::now();
        for c in comps.iter().take(n) {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_ref() };
            assert_eq!(c.ret, 0, "IO failed");
            let slot = c.user_data;
            lat_ns.push(now.duration_since(started[slot]).as_nanos().min(u128::from(u32::MAX)) as u32);
            done += 1;
            if now < end {
                started[slot] = Instant::now();
                submit(q, slot, next_off(&mut rng));
            } else {
                inflight -= 1;
            }
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_ticks(pid);
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    lat_ns.sort_unstable();
    Result {
        iops: done as f64 / elapsed,
        p50_us: percentile(&lat_ns, 0.50),
        p99_us: percentile(&lat_ns, 0.99),
        cpu_pct: (cpu1 - cpu0) as f64 / hz / elapsed * 100.0,
    }
}

/// fio io_uring direct=1 on the file, terse output parsed for IOPS and clat percentiles.
fn run_fio(image: &Path, w: Workload, secs: u64) -> Option<Result> {
    let rw = match (w.write, w.random) {
        (false, true) => "randread",
        (true, true) => "randwrite",
        (false, false) => "read",
        (true, false) => "write",
    };
    let out = Command::new("fio")
        .args(["--name=bench", "--ioengine=io_uring", "--direct=1", "--time_based", "--minimal"])
        .arg(format!("--filename={}", image.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", w.bs))
        .arg(format!("--iodepth={}", w.qd))
        .arg(format!("--runtime={secs}"))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = text.trim().split(';').collect();
    // terse v3: read iops at field 8, write iops at 49; clat percentiles 18..37 / 59..78.
    let (iops_idx, pct) = if w.write { (48, 58..78) } else { (7, 17..37) };
    let iops: f64 = f.get(iops_idx)?.parse().ok()?;
    let pick = |name: &str| -> f64 {
        f.get(pct.clone())
            .and_then(|s| s.iter().find_map(|e| e.strip_prefix(name).and_then(|v| v.parse::<f64>().ok())))
            .unwrap_or(0.0)
    };
    Some(Result { iops, p50_us: pick("50.000000%="), p99_us: pick("99.000000%="), cpu_pct: 0.0 })
}

fn prefill(image: &Path, size: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(image).expect("create image");
    let chunk = vec![0xc3u8; 4 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).expect("fill");
        left -= n as u64;
    }
    f.sync_all().expect("sync");
}

/// Reads the whole image once (buffered) so every server starts from the same host-side
/// cache state: whoever ran first would otherwise warm the storage for the second.
fn warm(image: &Path) {
    use std::io::Read;
    if let Ok(mut f) = std::fs::File::open(image) {
        let mut buf = vec![0u8; 4 << 20];
        while matches!(f.read(&mut buf), Ok(n) if n > 0) {}
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    // `cargo test --benches` runs this with --bench absent; only run when benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        println!("vs_qsd: run with `cargo bench --bench vs_qsd`");
        return;
    }
    let secs = env_u64("THINBLK_BENCH_SECS", 5);
    let size = env_u64("THINBLK_BENCH_SIZE_MIB", 1024) << 20;
    let dir: PathBuf = std::env::var_os("THINBLK_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let dir = dir.join(format!("thinblk-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let image = dir.join("bench.raw");
    prefill(&image, size);
    println!("image: {} ({} MiB), {} s per workload, 1 queue", image.display(), size >> 20, secs);
    println!(
        "{:<30} | {:>10} {:>8} {:>8} {:>6} | {:>10} {:>8} {:>8} {:>6} | {:>10} {:>8} {:>8} | {:>8} {:>8}",
        "workload", "thinblk", "p50us", "p99us", "cpu%", "qsd", "p50us", "p99us", "cpu%", "fio", "p50us", "p99us", "vs qsd", "vs fio"
    );
    let only = std::env::var("THINBLK_BENCH_ONLY").unwrap_or_default();
    // qcow2 rows: an allocated image (converted from the raw one), and an empty image made
    // afresh for each server, where every write allocates a cluster.
    let allocated = dir.join("allocated.qcow2");
    let empty = dir.join("empty.qcow2");
    let qimg = |args: &[&str]| {
        let st = Command::new("qemu-img").args(args).status().expect("qemu-img");
        assert!(st.success(), "qemu-img {args:?}");
        // qemu-img writes through the page cache: flush it now, or its writeback competes
        // with whichever server runs first.
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
    };
    let rows: Vec<(String, Workload, &'static str, &PathBuf, bool)> = WORKLOADS
        .iter()
        .map(|w| (format!("raw {}", w.name), *w, "raw", &image, false))
        .chain([
            ("qcow2 alloc 4k randread QD32".to_string(), WORKLOADS[1], "qcow2", &allocated, false),
            ("qcow2 empty 4k randwrite QD32".to_string(), WORKLOADS[2], "qcow2", &empty, true),
        ])
        .filter(|r| r.0.contains(only.as_str()))
        .collect();
    if rows.iter().any(|r| r.2 == "qcow2" && !r.4) {
        qimg(&["convert", "-q", "-O", "qcow2", "-o", "cluster_size=65536", image.to_str().unwrap(), allocated.to_str().unwrap()]);
    }
    let fresh = |p: &Path| qimg(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", p.to_str().unwrap(), &size.to_string()]);
    for (name, w, format, img, recreate) in rows {
        let sock = dir.join("thinblk.sock");
        if recreate {
            fresh(img);
        }
        warm(img);
        let t = {
            let s = start_thinblk(img, format, &sock);
            run_blkio(&sock, s.child.id(), size, w, secs)
        };
        if recreate {
            fresh(img);
        }
        warm(img);
        let qsock = dir.join("qsd.sock");
        let q = start_qsd(img, format, &qsock).map(|s| run_blkio(&qsock, s.child.id(), size, w, secs));
        warm(img);
        let f = if format == "raw" { run_fio(img, w, secs) } else { None };
        let qv = q.unwrap_or_default();
        let fv = f.unwrap_or_default();
        let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}x", a / b) } else { "n/a".into() };
        println!(
            "{:<30} | {:>10.0} {:>8.1} {:>8.1} {:>6.1} | {:>10.0} {:>8.1} {:>8.1} {:>6.1} | {:>10.0} {:>8.1} {:>8.1} | {:>8} {:>8}",
            name, t.iops, t.p50_us, t.p99_us, t.cpu_pct, qv.iops, qv.p50_us, qv.p99_us, qv.cpu_pct,
            fv.iops, fv.p50_us, fv.p99_us, ratio(t.iops, qv.iops), ratio(t.iops, fv.iops)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

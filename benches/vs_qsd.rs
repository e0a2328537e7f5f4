//! Side-by-side benchmark: thinblk vs qemu-storage-daemon (both driven by the same libblkio
//! vhost-user client, same raw file) vs fio io_uring direct=1 on the file itself.
//!
//! `cargo bench --bench vs_qsd` (env: THINBLK_BENCH_SECS per workload, default 5;
//! THINBLK_BENCH_SIZE_MIB file size, default 1024; THINBLK_BENCH_DIR, default $TMPDIR;
//! THINBLK_BENCH_ONLY, a substring of the workload names to run; THINBLK_BENCH_BIN, another
//! thinblk binary for an A/B against an earlier build; THINBLK_BENCH_ARGS, extra
//! thinblk options for A/B runs; THINBLK_BENCH_L2_CACHE, thinblk's L2 cache in the sparse row;
//! THINBLK_BENCH_TMPFS, the memory file system of the tmpfs rows, default /dev/shm;
//! THINBLK_BENCH_ROUNDS, rounds per row, each running thinblk, qemu-storage-daemon and fio in
//! turn, default 1: every figure printed is then its median over the rounds).
//! The two `qcow2 empty LV` rows (one queue, two) run on a loop device standing in for an LV
//! (skipped without losetup rights).
//! Prints IOPS, p50/p99 latency, server CPU and the ratios.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    env_u64, median, peak_rss_mib, prefill, run_blkio, run_blkio_queues, start_qsd_queues, start_thinblk, warm, Result, Workload,
};

const WORKLOADS: [Workload; 5] = [
    Workload { name: "4k randread QD1", write: false, random: true, bs: 4096, qd: 1 },
    Workload { name: "4k randread QD32", write: false, random: true, bs: 4096, qd: 32 },
    Workload { name: "4k randwrite QD32", write: true, random: true, bs: 4096, qd: 32 },
    Workload { name: "1M seqread QD8", write: false, random: false, bs: 1 << 20, qd: 8 },
    Workload { name: "1M seqwrite QD8", write: true, random: false, bs: 1 << 20, qd: 8 },
];

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

fn main() {
    // `cargo test --benches` runs this with --bench absent; only run when benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        println!("vs_qsd: run with `cargo bench --bench vs_qsd`");
        return;
    }
    let secs = env_u64("THINBLK_BENCH_SECS", 5);
    let rounds = env_u64("THINBLK_BENCH_ROUNDS", 1).max(1);
    let size = env_u64("THINBLK_BENCH_SIZE_MIB", 1024) << 20;
    let dir: PathBuf = std::env::var_os("THINBLK_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let dir = dir.join(format!("thinblk-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let image = dir.join("bench.raw");
    prefill(&image, size);
    println!(
        "image: {} ({} MiB), {} s per workload, medians of {} alternated round(s); cpu/io: server CPU per IO over qemu-storage-daemon's",
        image.display(),
        size >> 20,
        secs,
        rounds
    );
    println!(
        "{:<32} | {:>10} {:>8} {:>8} {:>6} | {:>10} {:>8} {:>8} {:>6} | {:>10} {:>8} {:>8} | {:>8} {:>8} {:>8} {:>8}",
        "workload", "thinblk", "p50us", "p99us", "cpu%", "qsd", "p50us", "p99us", "cpu%", "fio", "p50us", "p99us", "vs qsd", "vs fio", "p50/fio", "cpu/io"
    );
    let only = std::env::var("THINBLK_BENCH_ONLY").unwrap_or_default();
    // tmpfs rows: a raw file of the same size and contents in memory (THINBLK_BENCH_TMPFS,
    // default /dev/shm), where the storage costs next to nothing: what is left is each
    // server's round trip with the client, the floor under every row above. O_DIRECT on
    // tmpfs needs Linux 6.6; before it qemu-storage-daemon and fio refuse those rows (n/a).
    let tmpfs = std::env::var_os("THINBLK_BENCH_TMPFS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/dev/shm"));
    let tmpfs_dir = tmpfs.join(format!("thinblk-bench-{}", std::process::id()));
    let in_memory = tmpfs_dir.join("bench.raw");
    // qcow2 rows: an allocated image (converted from the raw one), and an empty image made
    // afresh for each server, where every write allocates a cluster.
    let allocated = dir.join("allocated.qcow2");
    let empty = dir.join("empty.qcow2");
    // The LV row: an empty image written onto a block device, as vdsm lays out a thin disk on
    // block storage. A loop device (direct IO) over a file stands in for the LV; the file is
    // filled with non-zero bytes first, as a reused LV holds old data. Skipped without
    // losetup rights.
    let lv_file = dir.join("lv.img");
    let mut lv_dev: Option<LoopGuard> = None;
    let lv_wanted = ["qcow2 empty LV 4k randwrite QD32", "qcow2 empty LV 4k randwrite 2qxQD16"].iter().any(|n| n.contains(only.as_str()));
    if lv_wanted {
        // Refilled before each server (below).
        prefill(&lv_file, size + (128 << 20));
        lv_dev = LoopGuard::attach(&lv_file);
        if lv_dev.is_none() {
            println!("LV row skipped: losetup --direct-io=on failed (needs root and loop devices)");
        }
    }
    let lv: PathBuf = lv_dev.as_ref().map(|d| d.0.clone()).unwrap_or_default();
    let qimg = |args: &[&str]| {
        let st = Command::new("qemu-img").args(args).status().expect("qemu-img");
        assert!(st.success(), "qemu-img {args:?}");
        // qemu-img writes through the page cache: flush it now, or its writeback competes
        // with whichever server runs first.
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
    };
    // (name, workload, format, image, fresh image per server, queues): with several queues
    // the workload's depth is per queue.
    let qd16 = |write: bool| Workload { name: "", write, random: true, bs: 4096, qd: 16 };
    let qd8 = |write: bool| Workload { name: "", write, random: true, bs: 4096, qd: 8 };
    let rows: Vec<(String, Workload, &'static str, &PathBuf, bool, usize)> = WORKLOADS
        .iter()
        .map(|w| (format!("raw {}", w.name), *w, "raw", &image, false, 1))
        .chain([
            ("qcow2 alloc 4k randread QD32".to_string(), WORKLOADS[1], "qcow2", &allocated, false, 1),
            ("qcow2 alloc 4k randwrite QD32".to_string(), WORKLOADS[2], "qcow2", &allocated, false, 1),
            ("qcow2 empty 4k randwrite QD32".to_string(), WORKLOADS[2], "qcow2", &empty, true, 1),
            ("qcow2 empty LV 4k randwrite QD32".to_string(), WORKLOADS[2], "qcow2", &lv, true, 1),
            ("qcow2 empty LV 4k randwrite 2qxQD16".to_string(), qd16(true), "qcow2", &lv, true, 2),
            ("qcow2 alloc 4k randread 2qxQD16".to_string(), qd16(false), "qcow2", &allocated, false, 2),
            ("qcow2 alloc 4k randwrite 2qxQD16".to_string(), qd16(true), "qcow2", &allocated, false, 2),
            ("qcow2 alloc 4k randread 4qxQD8".to_string(), qd8(false), "qcow2", &allocated, false, 4),
            ("qcow2 alloc 4k randwrite 4qxQD8".to_string(), qd8(true), "qcow2", &allocated, false, 4),
        ])
        .chain(WORKLOADS[..3].iter().map(|w| (format!("tmpfs {}", w.name), *w, "raw", &in_memory, false, 1)))
        .filter(|r| r.0.contains(only.as_str()))
        .filter(|r| r.3 != &lv || lv_dev.is_some())
        .collect();
    if rows.iter().any(|r| r.2 == "qcow2" && !r.4) {
        qimg(&["convert", "-q", "-O", "qcow2", "-o", "cluster_size=65536", image.to_str().unwrap(), allocated.to_str().unwrap()]);
    }
    let mut rows = rows;
    if rows.iter().any(|r| r.3 == &in_memory) {
        // Skipped, not failed, where the memory file system has no room for the file.
        if free_bytes(&tmpfs) < size + (64 << 20) {
            println!("tmpfs rows skipped: {} has less than {} MiB free", tmpfs.display(), (size >> 20) + 64);
            rows.retain(|r| r.3 != &in_memory);
        } else {
            std::fs::create_dir_all(&tmpfs_dir).expect("tmpfs bench dir");
            prefill(&in_memory, size);
        }
    }
    let fresh = |p: &Path| qimg(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", p.to_str().unwrap(), &size.to_string()]);
    for (name, w, format, img, recreate, queues) in rows {
        let sock = dir.join("thinblk.sock");
        let nq = queues.to_string();
        let (mut ts, mut qs, mut fs) = (Vec::new(), Vec::new(), Vec::new());
        // Each round runs the three in turn, so drift between them spreads over all three.
        // Before each server: a fresh image where the row asks for one, and a warm cache.
        let ready = || {
            if lv_dev.as_ref().is_some_and(|d| &d.0 == img) {
                // The LV's old bytes again: the servers leave its file's extents in different
                // states (zeroed ranges become unwritten extents under the loop device).
                prefill(&lv_file, size + (128 << 20));
                let _ = Command::new("blockdev").arg("--flushbufs").arg(img).status();
            }
            if recreate {
                fresh(img);
            }
            warm(img);
        };
        for _ in 0..rounds {
            ready();
            ts.push({
                let s = start_thinblk(img, format, &sock, &["--num-queues", &nq]);
                run_blkio_queues_or_one(&sock, s.child.id(), size, w, secs, queues)
            });
            ready();
            let qsock = dir.join("qsd.sock");
            qs.extend(start_qsd_queues(img, format, &qsock, queues).map(|s| run_blkio_queues_or_one(&qsock, s.child.id(), size, w, secs, queues)));
            warm(img);
            if format == "raw" {
                fs.extend(run_fio(img, w, secs));
            }
        }
        let (t, qv, fv) = (median_of(&ts), median_of(&qs), median_of(&fs));
        let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}x", a / b) } else { "n/a".into() };
        // Server CPU per IO, thinblk's over qemu-storage-daemon's.
        let per_io = |r: &Result| if r.iops > 0.0 { r.cpu_pct / r.iops } else { 0.0 };
        println!(
            "{:<32} | {:>10.0} {:>8.1} {:>8.1} {:>6.1} | {:>10.0} {:>8.1} {:>8.1} {:>6.1} | {:>10.0} {:>8.1} {:>8.1} | {:>8} {:>8} {:>8} {:>8}",
            name, t.iops, t.p50_us, t.p99_us, t.cpu_pct, qv.iops, qv.p50_us, qv.p99_us, qv.cpu_pct,
            fv.iops, fv.p50_us, fv.p99_us, ratio(t.iops, qv.iops), ratio(t.iops, fv.iops), ratio(t.p50_us, fv.p50_us),
            ratio(per_io(&t), per_io(&qv))
        );
    }
    if "qcow2 sparse 16T 4k randwrite QD32x2".contains(only.as_str()) {
        sparse_memory_row(&dir, secs.max(10));
    }
    drop(lv_dev);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&tmpfs_dir);
}

/// A loop device with direct IO over a file (standing in for an LV), detached when dropped.
struct LoopGuard(PathBuf);

impl LoopGuard {
    /// Attaches `file` to the first free loop device; None where that is not allowed here.
    fn attach(file: &Path) -> Option<LoopGuard> {
        let out = Command::new("losetup").args(["-f", "--show", "--direct-io=on"]).arg(file).output().ok()?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !dev.is_empty()).then(|| LoopGuard(PathBuf::from(dev)))
    }
}

impl Drop for LoopGuard {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Each figure's median over `runs` (taken separately: the median IOPS and the median p50
/// may come from different runs); all zero if there is none.
fn median_of(runs: &[Result]) -> Result {
    let mid = |f: fn(&Result) -> f64| median(&mut runs.iter().map(f).collect::<Vec<f64>>());
    Result { iops: mid(|r| r.iops), p50_us: mid(|r| r.p50_us), p99_us: mid(|r| r.p99_us), cpu_pct: mid(|r| r.cpu_pct) }
}

/// Bytes free for us on the file system holding `dir` (0 if it cannot be asked).
fn free_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return 0 };
    // SAFETY: statvfs is plain integers, for which all zeroes is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs writes one struct into `st`, which outlives the call; `c` is a valid
    // NUL-terminated path.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    st.f_bavail as u64 * st.f_frsize as u64
}

/// One queue through the single-queue client (its latency figures), several through the
/// multi-queue one.
fn run_blkio_queues_or_one(sock: &Path, pid: u32, size: u64, w: Workload, secs: u64, queues: usize) -> Result {
    if queues == 1 {
        run_blkio(sock, pid, size, w, secs)
    } else {
        run_blkio_queues(sock, pid, size, w, secs, queues)
    }
}

/// 4k random writes over a sparse 16 TiB qcow2 (64 KiB clusters), 2 queues, QD32 each, no
/// FLUSH ever: every write lands in a new L2 table's span for a long time, so the L2 cache
/// fills with dirty tables. Peak RSS shows whether memory stays bounded without FLUSH.
fn sparse_memory_row(dir: &Path, secs: u64) {
    let img = dir.join("sparse.qcow2");
    let size: u64 = 16 << 40;
    let w = Workload { name: "4k randwrite QD32x2", write: true, random: true, bs: 4096, qd: 32 };
    let fresh = || {
        let _ = std::fs::remove_file(&img);
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", img.to_str().unwrap(), &size.to_string()])
            .status()
            .expect("qemu-img");
        assert!(st.success());
    };
    let sock = dir.join("thinblk.sock");
    fresh();
    let (t, t_rss) = {
        // THINBLK_BENCH_L2_CACHE: thinblk's --l2-cache-size for this row (default: its own).
        let l2 = std::env::var("THINBLK_BENCH_L2_CACHE").ok();
        let mut args = vec!["--num-queues", "2", "--journal-dir", dir.to_str().unwrap()];
        if let Some(v) = l2.as_deref() {
            args.extend(["--l2-cache-size", v]);
        }
        let s = start_thinblk(&img, "qcow2", &sock, &args);
        let r = run_blkio_queues(&sock, s.child.id(), size, w, secs, 2);
        (r, peak_rss_mib(s.child.id()))
    };
    fresh();
    let qsock = dir.join("qsd.sock");
    let (q, q_rss) = match start_qsd_queues(&img, "qcow2", &qsock, 2) {
        Some(s) => {
            let r = run_blkio_queues(&qsock, s.child.id(), size, w, secs, 2);
            (r, peak_rss_mib(s.child.id()))
        }
        None => (Result::default(), 0.0),
    };
    let _ = std::fs::remove_file(&img);
    let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}x", a / b) } else { "n/a".into() };
    println!(
        "{:<30} | {:>10.0} {:>8.1} {:>8.1} {:>6.1} | {:>10.0} {:>8.1} {:>8.1} {:>6.1} | peak RSS thinblk {:.0} MiB, qsd {:.0} MiB | {:>8}",
        "qcow2 sparse 16T 4k randwrite QD32x2", t.iops, t.p50_us, t.p99_us, t.cpu_pct, q.iops, q.p50_us, q.p99_us, q.cpu_pct, t_rss, q_rss,
        ratio(t.iops, q.iops)
    );
}

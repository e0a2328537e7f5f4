//! Chain benchmark (issue 22): what a snapshot and a live merge cost the guest, side by side
//! with `qemu-img commit` on the same chain.
//!
//! 1. Snapshot pause: a 4k random writer at QD1 runs while 20 snapshots are taken, 250 ms
//!    apart; each `ctl snapshot` reply gives the time the guest's writes were held
//!    (`pause-us`): median and worst, and the writer's p99 and worst latency around them.
//! 2. Commit speed: an internal commit of a layer holding `THINBLK_BENCH_COMMIT_MIB` MiB
//!    (default 512) into its base, in MiB/s, against `qemu-img commit -t none` of copies of the
//!    same two files; 3 alternated runs each, medians.
//! 3. The guest's write rate during an active commit: 4k random writes at QD32 for
//!    `THINBLK_BENCH_SECS` (default 5) with no job, then while an active commit copies the
//!    same amount into the base (and mirrors what the writes change).
//!
//! `cargo bench --bench chain`; `THINBLK_BENCH_DIR` picks the directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{env_u64, median, run_blkio, start_thinblk, Workload};

const MIB: u64 = 1 << 20;
const DISK: u64 = 2048 * MIB;

fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// One control command through `thinblk ctl`; the reply's `return` (panics on an error).
fn ctl(sock: &Path, cmd: &str, args: &str) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_thinblk")).args(["ctl", p(sock), cmd, args]).output().expect("thinblk ctl");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|_| panic!("{cmd}: {text}"));
    assert!(v.get("error").is_none(), "{cmd}: {v}");
    v["return"].clone()
}

fn wait_job(sock: &Path, id: &str, status: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let jobs = ctl(sock, "query-jobs", "{}");
        if let Some(j) = jobs.as_array().and_then(|a| a.iter().find(|j| j["id"] == id)) {
            if j["status"] == status {
                return j.clone();
            }
        }
        assert!(Instant::now() < deadline, "job {id} never reached {status}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A chain in `dir`: `base` ← `s1` (holding `mib` MiB of data) ← `s2` (empty).
fn chain(dir: &Path, mib: u64) {
    for n in ["base", "s1", "s2"] {
        let _ = std::fs::remove_file(dir.join(n));
    }
    sh("qemu-img", &["create", "-q", "-f", "qcow2", p(&dir.join("base")), &DISK.to_string()]);
    sh("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", "base", "-F", "qcow2", p(&dir.join("s1")), &DISK.to_string()]);
    sh("qemu-io", &["-f", "qcow2", "-c", &format!("write -P 0x5a 0 {mib}M"), p(&dir.join("s1"))]);
    sh("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", "s1", "-F", "qcow2", p(&dir.join("s2")), &DISK.to_string()]);
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let root = std::env::var("THINBLK_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|_| std::env::temp_dir());
    let dir = root.join(format!("thinblk-bench-chain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let mib = env_u64("THINBLK_BENCH_COMMIT_MIB", 512);
    let secs = env_u64("THINBLK_BENCH_SECS", 5);
    let (sock, ctl_sock) = (dir.join("vhost.sock"), dir.join("ctl.sock"));

    // 1. Snapshot pauses under a writer: two rounds of 10 on a fresh chain each (a chain is
    // at most 16 deep).
    let mut pauses = Vec::new();
    let mut writers = Vec::new();
    for _round in 0..2 {
        chain(&dir, 64);
        let srv = start_thinblk(&dir.join("s2"), "qcow2", &sock, &["--control", p(&ctl_sock)]);
        let pid = srv.child.id();
        let s2 = sock.clone();
        let w = Workload { name: "4k randwrite QD1", write: true, random: true, bs: 4096, qd: 1 };
        let writer = std::thread::spawn(move || run_blkio(&s2, pid, 256 * MIB, w, 4));
        std::thread::sleep(Duration::from_millis(300));
        let mut parent = "s2".to_string();
        for i in 0..10 {
            let name = format!("snap{i}");
            let _ = std::fs::remove_file(dir.join(&name));
            sh("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", &parent, "-F", "qcow2", p(&dir.join(&name)), &DISK.to_string()]);
            let r = ctl(&ctl_sock, "snapshot", &format!("{{\"overlay\": \"{}\"}}", p(&dir.join(&name))));
            pauses.push(r["pause-us"].as_u64().unwrap_or(0) as f64 / 1000.0);
            parent = name;
            std::thread::sleep(Duration::from_millis(250));
        }
        writers.push(writer.join().expect("writer"));
        drop(srv);
    }
    let worst = pauses.iter().cloned().fold(0.0, f64::max);
    let med = median(&mut pauses.clone());
    let p99 = writers.iter().map(|r| r.p99_us).fold(0.0, f64::max);
    let iops = writers.iter().map(|r| r.iops).sum::<f64>() / writers.len() as f64;
    println!("snapshot pause over 20 (writer 4k QD1): median {med:.1} ms, worst {worst:.1} ms; all {pauses:.1?}; writer {iops:.0} IOPS, p99 {p99:.0} µs");

    // 2. Commit speed against qemu-img commit, alternated.
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        chain(&dir, mib);
        let oracle = dir.join("oracle");
        let _ = std::fs::remove_dir_all(&oracle);
        std::fs::create_dir_all(&oracle).expect("oracle dir");
        for n in ["base", "s1"] {
            sh("cp", &["--sparse=always", p(&dir.join(n)), p(&oracle.join(n))]);
        }
        let t = Instant::now();
        sh("qemu-img", &["commit", "-q", "-t", "none", "-f", "qcow2", "-b", p(&oracle.join("base")), p(&oracle.join("s1"))]);
        theirs.push(mib as f64 / t.elapsed().as_secs_f64());
        let srv = start_thinblk(&dir.join("s2"), "qcow2", &sock, &["--control", p(&ctl_sock)]);
        let t = Instant::now();
        let r = ctl(&ctl_sock, "commit", &format!("{{\"top\": \"{}\", \"base\": \"{}\", \"job-id\": \"c\"}}", p(&dir.join("s1")), p(&dir.join("base"))));
        let j = wait_job(&ctl_sock, r["id"].as_str().unwrap_or("c"), "concluded");
        assert_eq!(j["outcome"], "completed", "{j}");
        ours.push(mib as f64 / t.elapsed().as_secs_f64());
        drop(srv);
    }
    let (o, q) = (median(&mut ours), median(&mut theirs));
    println!("internal commit of {mib} MiB: thinblk {o:.0} MiB/s, qemu-img commit {q:.0} MiB/s (ratio {:.2}); runs {ours:.0?} / {theirs:.0?}", o / q);

    // 3. The guest's write rate with and during an active commit.
    chain(&dir, mib);
    let srv = start_thinblk(&dir.join("s2"), "qcow2", &sock, &["--control", p(&ctl_sock)]);
    let pid = srv.child.id();
    let w = Workload { name: "4k randwrite QD32", write: true, random: true, bs: 4096, qd: 32 };
    let alone = run_blkio(&sock, pid, DISK, w, secs);
    let r = ctl(&ctl_sock, "commit", &format!("{{\"top\": \"{}\", \"base\": \"{}\", \"job-id\": \"a\"}}", p(&dir.join("s2")), p(&dir.join("base"))));
    let id = r["id"].as_str().unwrap_or("a").to_string();
    let t = Instant::now();
    let during = run_blkio(&sock, pid, DISK, w, secs);
    let j = ctl(&ctl_sock, "query-jobs", "{}");
    let status = j.as_array().and_then(|a| a.iter().find(|x| x["id"] == id.as_str()).map(|x| x["status"].clone())).unwrap_or_default();
    let ready = wait_job(&ctl_sock, &id, "ready");
    let t_ready = t.elapsed();
    let tp = Instant::now();
    ctl(&ctl_sock, "job-complete", &format!("{{\"id\": \"{id}\"}}"));
    wait_job(&ctl_sock, &id, "concluded");
    println!(
        "active commit ({mib} MiB + writes): writer 4k QD32 alone {:.0} IOPS, during the copy {:.0} IOPS ({:.0} %), job {status} after {secs} s, ready after {:.1} s ({} bytes copied), pivot {} ms",
        alone.iops,
        during.iops,
        100.0 * during.iops / alone.iops.max(1.0),
        t_ready.as_secs_f64(),
        ready["current-progress"],
        tp.elapsed().as_millis()
    );
    drop(srv);
}

//! Live merge (`ctl commit`) under a writing frontend: an internal commit of a middle layer
//! runs as a job (progress, speed, cancel) while the frontend writes; a cancelled commit
//! leaves the chain as it was; the merged base reads back identical to `qemu-img commit` of
//! the same layers on copies; every image checks clean; a restart reads back every write.
//! With `--thin`, the base's volume grows through the mailbox before it receives the data.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ctl, ctl_reply, stop_clean, Client, Daemon, TestDir};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const DISK: u64 = 64 * MIB;

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().expect("qemu-img");
    assert!(out.status.success(), "qemu-img {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The frontend's writes: block → fill byte of its last completed write, in order.
type Written = Arc<Mutex<Vec<(u64, u8)>>>;

/// Writes 4 KiB blocks at pseudo-random places (each write's fill byte recorded once it
/// completed) until stopped; every result must be 0.
fn writer(socket: PathBuf, seed: u64, stop: Arc<AtomicBool>, log: Written) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut c = Client::connect(&socket, 1).expect("connect");
        let mut rng = common::Rng(seed);
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let b = rng.below(DISK / BLOCK);
            let fill = (rng.below(255) + 1) as u8;
            assert_eq!(c.write(0, b * BLOCK, &vec![fill; BLOCK as usize]), 0, "write {n} failed");
            log.lock().expect("log").push((b, fill));
            n += 1;
            if n % 64 == 0 {
                assert_eq!(c.flush(0), 0);
            }
        }
    })
}

/// Runs the writer for `d`, returning what it wrote.
fn write_for(socket: &Path, seed: u64, d: Duration, log: &Written) {
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(socket.to_path_buf(), seed, stop.clone(), log.clone());
    std::thread::sleep(d);
    stop.store(true, Ordering::SeqCst);
    w.join().expect("writer: no write may fail");
}

/// The disk as the writes left it.
fn model(log: &[(u64, u8)]) -> Vec<u8> {
    let mut m = vec![0u8; DISK as usize];
    for &(b, f) in log {
        m[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize].fill(f);
    }
    m
}

fn read_all(image: &Path, dir: &TestDir) -> Vec<u8> {
    let raw = dir.path("read.raw");
    qemu_img(&["convert", "-U", "-O", "raw", s(image), s(&raw)]);
    let data = std::fs::read(&raw).expect("read raw");
    let _ = std::fs::remove_file(&raw);
    data
}

fn job(ctl_sock: &Path, id: &str) -> Value {
    let jobs = ctl(ctl_sock, "query-jobs", json!({}));
    jobs.as_array().and_then(|a| a.iter().find(|j| j["id"] == id).cloned()).unwrap_or(Value::Null)
}

fn wait_concluded(ctl_sock: &Path, id: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let j = job(ctl_sock, id);
        if j["status"] == "concluded" {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} did not conclude: {j}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn chain(ctl_sock: &Path) -> Vec<String> {
    let st = ctl(ctl_sock, "query-status", json!({}));
    st["chain"].as_array().expect("chain").iter().filter_map(|v| v.as_str().map(String::from)).collect()
}

#[test]
fn an_internal_commit_merges_a_middle_layer_while_the_frontend_writes() {
    let dir = TestDir::new("commit-internal");
    let img = |n: &str| dir.path(n);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img("base")), &DISK.to_string()]);
    let (sock, ctl_sock) = (dir.path("vhost.sock"), dir.path("ctl.sock"));
    let d = Daemon::start(&sock, &["--image", s(&img("base")), "--format", "qcow2", "--control", s(&ctl_sock)]);
    let log: Written = Arc::new(Mutex::new(Vec::new()));
    write_for(&sock, 1, Duration::from_millis(400), &log);
    let mut at_s2 = 0;
    for (over, parent) in [("s1", "base"), ("s2", "s1")] {
        qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", parent, "-F", "qcow2", s(&img(over)), &DISK.to_string()]);
        ctl(&ctl_sock, "snapshot", json!({"overlay": s(&img(over))}));
        at_s2 = log.lock().expect("log").len();
        write_for(&sock, over.len() as u64 + 7, Duration::from_millis(400), &log);
    }
    let (base, s1, s2) = (img("base"), img("s1"), img("s2"));
    let want_chain = |v: &[&PathBuf]| v.iter().map(|p| s(p).to_string()).collect::<Vec<_>>();
    assert_eq!(chain(&ctl_sock), want_chain(&[&s2, &s1, &base]));

    // The oracle: the same merge by qemu-img, on copies of the layers below the active one.
    let oracle = dir.path("oracle");
    std::fs::create_dir_all(&oracle).expect("oracle dir");
    for n in ["base", "s1"] {
        std::fs::copy(img(n), oracle.join(n)).expect("copy");
    }
    qemu_img(&["commit", "-q", "-f", "qcow2", s(&oracle.join("s1"))]);

    // Refusals change nothing.
    for (args, why) in [
        (json!({"top": s(&s2), "base": s(&base), "backing-file": "base"}), "internal commit"),
        (json!({"top": s(&base), "base": s(&s1)}), "not below"),
        (json!({"top": s(&s1), "base": s(&s1), "speed": "fast"}), "speed"),
        (json!({"top": s(&s1), "base": s(&base), "base-volume-uuid": "d772f1c6-3ebb-43c3-a42e-73fcd8255a5f"}), "thin mode"),
    ] {
        let r = ctl_reply(&ctl_sock, "commit", args);
        assert!(r["error"]["desc"].as_str().is_some_and(|d| d.contains(why)), "{why}: {r}");
    }

    // A commit cancelled midway (slowed to 1 MiB/s) leaves the chain exactly as it was.
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(sock.clone(), 11, stop.clone(), log.clone());
    let r = ctl(&ctl_sock, "commit", json!({"top": s(&s1), "base": s(&base), "speed": MIB, "job-id": "slow"}));
    assert_eq!(r["id"], "slow");
    std::thread::sleep(Duration::from_millis(400));
    let running = job(&ctl_sock, "slow");
    assert_eq!(running["status"], "running", "{running}");
    assert!(running["current-progress"].as_u64().is_some_and(|c| c > 0 && c < running["total-progress"].as_u64().unwrap_or(0)), "{running}");
    let busy = ctl_reply(&ctl_sock, "snapshot", json!({"overlay": s(&dir.path("nope"))}));
    assert!(busy.get("error").is_some(), "a snapshot during a commit: {busy}");
    ctl(&ctl_sock, "job-cancel", json!({"id": "slow"}));
    let j = wait_concluded(&ctl_sock, "slow", Duration::from_secs(10));
    assert_eq!(j["outcome"], "cancelled", "{j}");
    assert_eq!(chain(&ctl_sock), want_chain(&[&s2, &s1, &base]));
    ctl(&ctl_sock, "job-dismiss", json!({"id": "slow"}));

    // The real one, slowed first and then released; the frontend writes all along.
    let r = ctl(&ctl_sock, "commit", json!({"top": s(&s1), "base": s(&base), "speed": 4 * MIB}));
    let id = r["id"].as_str().expect("id").to_string();
    std::thread::sleep(Duration::from_millis(300));
    ctl(&ctl_sock, "job-set-speed", json!({"id": id, "speed": 0}));
    let j = wait_concluded(&ctl_sock, &id, Duration::from_secs(60));
    assert_eq!(j["outcome"], "completed", "{j}");
    assert_eq!(j["current-progress"], j["total-progress"], "{j}");
    assert_eq!(chain(&ctl_sock), want_chain(&[&s2, &base]));
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    w.join().expect("writer: no write may fail");
    let metrics_free = ctl_reply(&ctl_sock, "job-cancel", json!({"id": id}));
    assert!(metrics_free.get("error").is_some(), "a concluded job cannot be cancelled");
    stop_clean(d);
    eprintln!("COMMIT-REPORT bytes={} writes={}", j["total-progress"], log.lock().expect("log").len());

    // qemu-img: s2 now names base; every image checks clean; the merged base reads as
    // qemu-img's merge of the same layers; the chain reads every write.
    let info = qemu_img(&["info", "--output=json", s(&s2)]);
    assert!(info.contains("\"backing-filename\": \"base\""), "{info}");
    for p in [&base, &s1, &s2] {
        qemu_img(&["check", "-q", s(p)]);
    }
    qemu_img(&["compare", "-f", "qcow2", "-F", "qcow2", s(&oracle.join("base")), s(&base)]);
    let log = log.lock().expect("log").clone();
    assert_eq!(read_all(&base, &dir), model(&log[..at_s2]), "the base holds what s1 showed at the second snapshot");
    assert_eq!(read_all(&s2, &dir), model(&log), "the chain holds every write");

    // A restart on the top reads back every write through the shorter chain.
    let d = Daemon::start(&sock, &["--image", s(&s2), "--format", "qcow2"]);
    let mut c = Client::connect(&sock, 1).expect("connect");
    let m = model(&log);
    for b in (0..DISK / BLOCK).step_by(13) {
        let at = (b * BLOCK) as usize;
        assert_eq!(c.read(0, b * BLOCK, BLOCK as usize).expect("read"), m[at..at + BLOCK as usize].to_vec(), "block {b}");
    }
    drop(c);
    stop_clean(d);
}

#[test]
fn an_active_commit_mirrors_the_guest_writes_and_pivots_onto_the_base() {
    let dir = TestDir::new("commit-active");
    let img = |n: &str| dir.path(n);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img("base")), &DISK.to_string()]);
    let (sock, ctl_sock) = (dir.path("vhost.sock"), dir.path("ctl.sock"));
    let d = Daemon::start(&sock, &["--image", s(&img("base")), "--format", "qcow2", "--control", s(&ctl_sock)]);
    let log: Written = Arc::new(Mutex::new(Vec::new()));
    write_for(&sock, 3, Duration::from_millis(300), &log);
    for (over, parent) in [("s1", "base"), ("s2", "s1")] {
        qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", parent, "-F", "qcow2", s(&img(over)), &DISK.to_string()]);
        ctl(&ctl_sock, "snapshot", json!({"overlay": s(&img(over))}));
        write_for(&sock, over.len() as u64 + 3, Duration::from_millis(300), &log);
    }
    let (base, s1, s2) = (img("base"), img("s1"), img("s2"));

    // The frontend writes all along: the job copies, turns ready, goes on mirroring.
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(sock.clone(), 21, stop.clone(), log.clone());
    let r = ctl(&ctl_sock, "commit", json!({"top": s(&s2), "base": s(&s1), "job-id": "cancelled"}));
    assert_eq!(r["id"], "cancelled");
    let deadline = Instant::now() + Duration::from_secs(30);
    while job(&ctl_sock, "cancelled")["status"] != "ready" {
        assert!(Instant::now() < deadline, "not ready: {}", job(&ctl_sock, "cancelled"));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(job(&ctl_sock, "cancelled")["type"], "active-commit");
    // A cancel after ready: the chain stays, writes go on to the top.
    ctl(&ctl_sock, "job-cancel", json!({"id": "cancelled"}));
    assert_eq!(wait_concluded(&ctl_sock, "cancelled", Duration::from_secs(10))["outcome"], "cancelled");
    assert_eq!(chain(&ctl_sock), vec![s(&s2).to_string(), s(&s1).to_string(), s(&base).to_string()]);
    let r = ctl_reply(&ctl_sock, "job-complete", json!({"id": "cancelled"}));
    assert!(r.get("error").is_some(), "a concluded job does not complete: {r}");

    // Again, into the base this time (s2 and s1 merged), and pivot while the writer writes.
    ctl(&ctl_sock, "commit", json!({"top": s(&s2), "base": s(&base), "job-id": "merge"}));
    let deadline = Instant::now() + Duration::from_secs(30);
    while job(&ctl_sock, "merge")["status"] != "ready" {
        assert!(Instant::now() < deadline, "not ready: {}", job(&ctl_sock, "merge"));
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    ctl(&ctl_sock, "job-complete", json!({"id": "merge"}));
    let j = wait_concluded(&ctl_sock, "merge", Duration::from_secs(30));
    assert_eq!(j["outcome"], "completed", "{j}");
    assert_eq!(chain(&ctl_sock), vec![s(&base).to_string()], "the base is the top");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    w.join().expect("writer: no write may fail across the pivot");
    stop_clean(d);
    let log = log.lock().expect("log").clone();
    eprintln!("ACTIVE-COMMIT-REPORT copied={} writes={}", j["current-progress"], log.len());

    // The base alone holds every write; it checks clean; the old top is marked merged:
    // thinblk refuses to serve it, read-only use still works.
    qemu_img(&["check", "-q", s(&base)]);
    assert_eq!(read_all(&base, &dir), model(&log));
    let refused = Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .args(["--socket-path", s(&dir.path("refused.sock")), "--image", s(&s2), "--format", "qcow2"])
        .output()
        .expect("thinblk");
    assert!(!refused.status.success(), "the merged top was served");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("merged into its backing file"), "{}", String::from_utf8_lossy(&refused.stderr));
    let d = Daemon::start(&sock, &["--image", s(&base), "--format", "qcow2"]);
    let mut c = Client::connect(&sock, 1).expect("connect");
    let m = model(&log);
    for b in (0..DISK / BLOCK).step_by(11) {
        let at = (b * BLOCK) as usize;
        assert_eq!(c.read(0, b * BLOCK, BLOCK as usize).expect("read"), m[at..at + BLOCK as usize].to_vec(), "block {b}");
    }
    drop(c);
    stop_clean(d);
}

/// `qemu-img check` of `image`: clean, or only leaked clusters (exit 3: a killed merge's base
/// may hold clusters its lost metadata never linked), proven harmless by repairing a copy.
fn check_allowing_leaks(image: &Path, dir: &TestDir) -> bool {
    let out = Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(image).output().expect("qemu-img check");
    match out.status.code() {
        Some(0) => false,
        Some(3) => {
            let copy = dir.path("leaky-copy");
            std::fs::copy(image, &copy).expect("copy");
            qemu_img(&["check", "-q", "-r", "leaks", s(&copy)]);
            qemu_img(&["check", "-q", s(&copy)]);
            let _ = std::fs::remove_file(&copy);
            true
        }
        _ => panic!("{} is corrupt: {}{}", image.display(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    }
}

#[test]
fn a_commit_killed_at_any_point_restarts_on_a_valid_chain_and_commits_again() {
    let dir = TestDir::new("commit-killed");
    let img = |n: &str| dir.path(n);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img("base")), &DISK.to_string()]);
    let (sock, ctl_sock) = (dir.path("vhost.sock"), dir.path("ctl.sock"));
    let start = |top: &Path| Daemon::start(&sock, &["--image", s(top), "--format", "qcow2", "--control", s(&ctl_sock)]);
    let mut d = start(&img("base"));
    let log: Written = Arc::new(Mutex::new(Vec::new()));
    write_for(&sock, 5, Duration::from_millis(300), &log);
    for (over, parent) in [("s1", "base"), ("s2", "s1")] {
        qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", parent, "-F", "qcow2", s(&img(over)), &DISK.to_string()]);
        ctl(&ctl_sock, "snapshot", json!({"overlay": s(&img(over))}));
        write_for(&sock, over.len() as u64 + 5, Duration::from_millis(300), &log);
    }
    let (base, s1, s2) = (img("base"), img("s1"), img("s2"));
    let seed = std::env::var("THINBLK_COMMIT_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x005e_edc0);
    eprintln!("THINBLK_COMMIT_SEED={seed}");
    let mut rng = common::Rng(seed);
    let mut leaky = 0;
    // Killed at random points of an internal commit (slowed: a few seconds in all), then of
    // an active one (copying, or ready); each time the frontend was writing.
    for round in 0..4 {
        let active = round >= 2;
        let stop = Arc::new(AtomicBool::new(false));
        let w = writer(sock.clone(), 100 + round, stop.clone(), log.clone());
        // The last round runs unthrottled: the active commit is killed while ready.
        // (1 MiB/s: the internal merge of a few MiB outlasts the longest wait below.)
        let speed = if round == 3 { 0 } else { MIB };
        let args = if active { json!({"top": s(&s2), "base": s(&s1), "speed": speed}) } else { json!({"top": s(&s1), "base": s(&base), "speed": speed}) };
        let id = ctl(&ctl_sock, "commit", args)["id"].as_str().expect("id").to_string();
        std::thread::sleep(Duration::from_millis(if round == 3 { 2500 } else { 100 + rng.below(1500) }));
        // The writer stops first (a client whose daemon dies waits out its timeout), then the
        // daemon is killed with the job still running.
        stop.store(true, Ordering::SeqCst);
        w.join().expect("writer");
        let at_kill = job(&ctl_sock, &id);
        eprintln!("round {round}: killed with the job {} at {}/{}", at_kill["status"], at_kill["current-progress"], at_kill["total-progress"]);
        d.signal(libc::SIGKILL);
        let _ = d.wait_exit(Duration::from_secs(10));
        for p in [&base, &s1, &s2] {
            leaky += usize::from(check_allowing_leaks(p, &dir));
        }
        d = start(&s2);
        assert_eq!(chain(&ctl_sock), vec![s(&s2).to_string(), s(&s1).to_string(), s(&base).to_string()], "round {round}");
        let m = model(&log.lock().expect("log"));
        assert_eq!(read_all(&s2, &dir), m, "round {round}: the chain after the kill");
    }
    // Now both merges run to their end: the chain is the base alone and holds every write.
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(sock.clone(), 999, stop.clone(), log.clone());
    let r = ctl(&ctl_sock, "commit", json!({"top": s(&s1), "base": s(&base)}));
    let id = r["id"].as_str().expect("id").to_string();
    assert_eq!(wait_concluded(&ctl_sock, &id, Duration::from_secs(60))["outcome"], "completed");
    let r = ctl(&ctl_sock, "commit", json!({"top": s(&s2), "base": s(&base)}));
    let id = r["id"].as_str().expect("id").to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while job(&ctl_sock, &id)["status"] != "ready" {
        assert!(Instant::now() < deadline, "not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    ctl(&ctl_sock, "job-complete", json!({"id": id}));
    assert_eq!(wait_concluded(&ctl_sock, &id, Duration::from_secs(60))["outcome"], "completed");
    stop.store(true, Ordering::SeqCst);
    w.join().expect("writer");
    // Killed after the pivot: the restart is on the base.
    d.signal(libc::SIGKILL);
    let _ = d.wait_exit(Duration::from_secs(10));
    d = start(&base);
    assert_eq!(chain(&ctl_sock), vec![s(&base).to_string()]);
    stop_clean(d);
    qemu_img(&["check", "-q", s(&base)]);
    assert_eq!(read_all(&base, &dir), model(&log.lock().expect("log")));
    eprintln!("COMMIT-KILL-REPORT seed={seed} images_with_leaks={leaky}");
}

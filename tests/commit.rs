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

use common::{ctl, ctl_reply, qemu_img, s, stop_clean, Client, Daemon, TestDir};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const DISK: u64 = 64 * MIB;

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

const DOMAIN: &str = "8adbc85e-e554-4ae0-b318-8a5465fe5fe1";
const VOL1: &str = "d772f1c6-3ebb-43c3-a42e-73fcd8255a5f";
const VOL2: &str = "5e0c1a6b-7d64-4b8e-9a43-2f1c0b9e7d21";
const VOL3: &str = "a3f5e2c1-0b6d-4e8f-8c2a-91d7b4e60f38";

/// Thin "LVs" as tests/snapshot.rs makes them: each a volume file under
/// `volumes/DOMAIN/uuid` holding a qcow2 (its backing a bare parent UUID, as oVirt writes it),
/// on a loop device linked as `sd/uuid`; the SPM (`thinblk spm --backend file`) grows the files.
/// Fields drop in order: the SPM is stopped, the loop devices detached, the directory removed.
struct ThinRig {
    spm: Option<Daemon>,
    loops: Vec<common::LoopDev>,
    dir: TestDir,
}

impl ThinRig {
    fn new(name: &str, spm_delay_ms: u64) -> ThinRig {
        let dir = TestDir::new(name);
        common::sparse_file(&dir.path("inbox"), 16 * MIB);
        common::sparse_file(&dir.path("outbox"), 16 * MIB);
        std::fs::create_dir_all(dir.path("volumes").join(DOMAIN)).expect("volumes");
        std::fs::create_dir_all(dir.path("sd")).expect("sd");
        let delay = spm_delay_ms.to_string();
        let extra: Vec<&str> = if spm_delay_ms > 0 { vec!["--delay-ms", &delay] } else { vec![] };
        let spm = common::spm_process(&dir.path("inbox"), &dir.path("outbox"), &dir.path("volumes"), &extra, Some(&dir.path("spm.log")));
        ThinRig { spm: Some(spm), loops: Vec::new(), dir }
    }

    /// The volume file of `uuid`.
    fn file(&self, uuid: &str) -> PathBuf {
        self.dir.path("volumes").join(DOMAIN).join(uuid)
    }

    /// The "LV" path of `uuid` (a link to its loop device).
    fn lv(&self, uuid: &str) -> PathBuf {
        self.dir.path("sd").join(uuid)
    }

    /// A volume of `size` bytes holding a 1 GiB qcow2 over `backing` (a bare UUID).
    fn create(&mut self, uuid: &str, size: u64, backing: Option<&str>) {
        let dev = common::ovirt_volume(&self.file(uuid), &self.lv(uuid), size, backing);
        self.loops.push(dev);
    }

    /// The daemon on `VOL1` in thin mode: 64 MiB chunks, a volume extended when less than
    /// `100 - utilization`% of one is free.
    fn daemon(&self, utilization: u64) -> Daemon {
        let utilization = utilization.to_string();
        let (inbox, outbox, lock) = (self.dir.path("inbox"), self.dir.path("outbox"), self.dir.path("host-3.lock"));
        Daemon::start_logging(
            &self.dir.path("vhost.sock"),
            &[
                "--image", s(&self.lv(VOL1)), "--format", "qcow2", "--backing-files", "devices",
                "--control", s(&self.dir.path("ctl.sock")), "--thin", "--spec-sizing", "--chunk-mb", "64",
                "--utilization-percent", &utilization, "--spm-inbox", s(&inbox), "--spm-outbox", s(&outbox), "--host-id", "3",
                "--domain-uuid", DOMAIN, "--volume-uuid", VOL1, "--mailbox-lock", s(&lock),
            ],
            Some(&self.dir.path("daemon.log")),
        )
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path("daemon.log")).unwrap_or_default()
    }

    /// Waits until the daemon's thin control thread logged at least `requests` extension
    /// requests (it logs them after the allocator's signal, not with the write) and has none
    /// outstanding (the last request logged has an outcome logged after it; a re-sent request
    /// logs again). Returns how many requests it logged.
    fn settle(&self, requests: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let asked = lines.iter().rposition(|l| l.contains("thin::control: extension requested"));
            let answered = lines.iter().rposition(|l| l.contains("thin::control: extension ") && l.contains(" outcome="));
            let count = lines.iter().filter(|l| l.contains("thin::control: extension requested")).count();
            if count >= requests && (asked.is_none() || answered > asked) {
                return count;
            }
            assert!(Instant::now() < deadline, "an extension stays outstanding:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).expect("volume file").len()
}

/// MiB `i` as write `gen` fills it.
fn mib_fill(i: u64, gen: u64) -> u8 {
    ((i * 7 + gen * 31) % 251 + 1) as u8
}

/// The field `key=VALUE` of a log line.
fn log_field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}=")).and_then(|v| v.parse().ok()))
}

/// MiBs the tests write to (of the 1 GiB disks).
const LAST_MIB: u64 = 160;

/// How a merge on thin volumes is set up.
struct Scenario {
    name: &'static str,
    /// The SPM answers this late.
    spm_delay_ms: u64,
    /// The daemon's --utilization-percent.
    utilization: u64,
    /// The MiBs the second layer receives.
    second: std::ops::Range<u64>,
    /// Whether the base's 40 MiB pass its threshold while it is the top.
    base_extends_as_top: bool,
}

/// What one merge on thin volumes showed.
struct ThinMerge {
    /// The base's volume while it was the top (after its 40 MiB).
    base_as_top: u64,
    /// The base's volume before and after the merge.
    base_before: u64,
    base_after: u64,
    /// How long the SPM took to grow the base (the job's own log), and the job's run time.
    extend_ms: u64,
    job_ms: u64,
    /// The job's progress and the base's volume size whenever the job was seen while the
    /// base's extension was outstanding.
    progress_while_waiting: Vec<(u64, u64)>,
}

/// A base volume of 64 MiB that receives 40 MiB, a snapshot onto a second volume that
/// receives `sc.second` (its volume grows through the SPM), a snapshot onto a third (the
/// active top), then `commit` of the middle layer into the base with its volume UUID while the
/// frontend writes to the top; checked against qemu-img commit of copies of the two layers.
fn merge_on_thin_volumes(sc: Scenario) -> ThinMerge {
    let mut rig = ThinRig::new(sc.name, sc.spm_delay_ms);
    rig.create(VOL1, 64 * MIB, None);
    rig.create(VOL2, 64 * MIB, Some(VOL1));
    rig.create(VOL3, 64 * MIB, Some(VOL2));
    let (lv1, lv2, lv3) = (rig.lv(VOL1), rig.lv(VOL2), rig.lv(VOL3));
    let (sock, ctl_sock) = (rig.dir.path("vhost.sock"), rig.dir.path("ctl.sock"));
    let d = rig.daemon(sc.utilization);
    let mut c = Client::connect(&sock, 1).expect("connect");
    // MiB index → fill byte (0: never written).
    let mut model = vec![0u8; LAST_MIB as usize];
    let put = |c: &mut Client, model: &mut [u8], i: u64, gen: u64| {
        let f = mib_fill(i, gen);
        assert_eq!(c.write(0, i * MIB, &vec![f; MIB as usize]), 0, "write of MiB {i}");
        model[i as usize] = f;
    };
    for i in 0..40 {
        put(&mut c, &mut model, i, 1);
    }
    assert_eq!(c.flush(0), 0);
    let asked = rig.settle(usize::from(sc.base_extends_as_top));
    let base_as_top = file_len(&rig.file(VOL1));

    let r = ctl(&ctl_sock, "snapshot", json!({"overlay": s(&lv2), "volume-uuid": VOL2}));
    assert_eq!(r["thin-followed"], true, "{r}");
    for i in sc.second.clone() {
        put(&mut c, &mut model, i, 2);
    }
    assert_eq!(c.flush(0), 0);
    rig.settle(asked + 1);
    assert!(file_len(&rig.file(VOL2)) > 64 * MIB, "the second layer's volume grew: {}", file_len(&rig.file(VOL2)));
    let r = ctl(&ctl_sock, "snapshot", json!({"overlay": s(&lv3), "volume-uuid": VOL3}));
    assert_eq!(r["thin-followed"], true, "{r}");
    let chain_names = chain(&ctl_sock);
    assert_eq!(chain_names.len(), 3, "{chain_names:?}");
    let base_model = model.clone();

    // The oracle: qemu-img commit on copies of the two layers, read-only now.
    let oracle = rig.dir.path("oracle");
    std::fs::create_dir_all(&oracle).expect("oracle dir");
    for v in [VOL1, VOL2] {
        std::fs::copy(rig.file(v), oracle.join(v)).expect("copy");
    }
    qemu_img(&["commit", "-q", "-f", "qcow2", s(&oracle.join(VOL2))]);

    // The merge, while the frontend writes MiBs to the top (the daemon takes one frontend:
    // the same connection writes between the job's polls).
    let base_before = file_len(&rig.file(VOL1));
    let mut rng = common::Rng(7);
    let mut gen = 3;
    let r = ctl(&ctl_sock, "commit", json!({"top": s(&lv2), "base": s(&lv1), "base-volume-uuid": VOL1, "job-id": "merge"}));
    assert_eq!(r["id"], "merge");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut progress_while_waiting = Vec::new();
    let j = loop {
        let j = job(&ctl_sock, "merge");
        if j["status"] == "concluded" {
            break j;
        }
        let log = rig.log();
        if log.contains("merge: base extension requested") && !log.contains("merge: base extended") {
            progress_while_waiting.push((j["current-progress"].as_u64().expect("progress"), file_len(&rig.file(VOL1))));
        }
        assert!(Instant::now() < deadline, "the merge did not conclude: {j}");
        if gen < 64 {
            put(&mut c, &mut model, rng.below(LAST_MIB), gen);
            gen += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(j["outcome"], "completed", "{j}\n{}", rig.log());
    assert_eq!(j["current-progress"], j["total-progress"], "{j}");
    assert!(gen > 3, "no write during the merge");
    assert_eq!(chain(&ctl_sock), vec![chain_names[0].clone(), chain_names[2].clone()], "the chain is [top, base]");
    let base_after = file_len(&rig.file(VOL1));

    // The base grew before the copy needed it: the request came first, the copy never found
    // the base full, the job logged the SPM's answer.
    let log = rig.log();
    let lines: Vec<&str> = log.lines().collect();
    let at = |what: &str| lines.iter().position(|l| l.contains(what));
    let requested = at("merge: base extension requested").unwrap_or_else(|| panic!("no base extension requested:\n{log}"));
    let extended = at("merge: base extended").unwrap_or_else(|| panic!("the base's extension was not seen:\n{log}"));
    assert!(requested < extended, "{log}");
    assert!(at("the base is full").is_none(), "the copy found the base full:\n{log}");
    let extend_ms = log_field(lines[extended], "ms").expect("ms field");
    let job_ms = j["elapsed-ms"].as_u64().unwrap_or(0);

    // Every write reads back through the daemon.
    for i in 0..LAST_MIB {
        let want = vec![model[i as usize]; MIB as usize];
        assert!(c.read(0, i * MIB, MIB as usize).expect("read") == want, "MiB {i} reads back");
    }
    drop(c);
    stop_clean(d);

    // qemu-img: the top names the base (bare, as before); every remaining image checks
    // clean; the merged base is qemu-img's merge of the same two layers.
    let info = qemu_img(&["info", "--output=json", s(&lv3)]);
    assert!(info.contains(&format!("\"backing-filename\": \"{VOL1}\"")), "{info}");
    for p in [&lv3, &lv1, &lv2] {
        qemu_img(&["check", "-q", s(p)]);
    }
    qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "qcow2", s(&oracle.join(VOL1)), s(&lv1)]);
    let base_raw = rig.dir.path("base.raw");
    qemu_img(&["convert", "-O", "raw", s(&lv1), s(&base_raw)]);
    let data = std::fs::read(&base_raw).expect("base raw");
    for (i, f) in base_model.iter().enumerate() {
        assert!(data[i * MIB as usize..(i + 1) * MIB as usize].iter().all(|b| b == f), "MiB {i} of the merged base");
    }
    drop(data);
    let _ = std::fs::remove_file(&base_raw);
    rig.spm.take();
    ThinMerge { base_as_top, base_before, base_after, extend_ms, job_ms, progress_while_waiting }
}

#[test]
fn an_internal_commit_on_thin_volumes_grows_the_base_through_the_mailbox() {
    // The base grows once while it is the top (its claim on the host stays with the daemon's
    // mailbox client), and again through the job for 90 MiB of the second layer's.
    let m = merge_on_thin_volumes(Scenario { name: "commit-thin", spm_delay_ms: 0, utilization: 50, second: 30..120, base_extends_as_top: true });
    eprintln!(
        "COMMIT-THIN-REPORT base_mib={}->{}->{} extend_ms={} job_ms={}",
        m.base_as_top / MIB,
        m.base_before / MIB,
        m.base_after / MIB,
        m.extend_ms,
        m.job_ms
    );
    assert_eq!(m.base_as_top, 128 * MIB, "the base grew while it was the top");
    // 40 MiB held + 90 MiB received (+ metadata) need a third 64 MiB chunk.
    assert_eq!(m.base_after, 192 * MIB, "the base's volume grew by the job");
}

#[test]
fn an_internal_commit_on_thin_volumes_waits_for_a_slow_spm() {
    const DELAY_MS: u64 = 1500;
    // The base stays at 64 MiB while it is the top; the second layer's 80 MiB (20 over the
    // base's) need a second chunk, which the slow SPM gives 1.5 s later.
    let m = merge_on_thin_volumes(Scenario { name: "commit-thin-slow", spm_delay_ms: DELAY_MS, utilization: 80, second: 20..100, base_extends_as_top: false });
    eprintln!(
        "COMMIT-THIN-SLOW-REPORT base_mib={}->{}->{} extend_ms={} job_ms={} polls_while_waiting={}",
        m.base_as_top / MIB,
        m.base_before / MIB,
        m.base_after / MIB,
        m.extend_ms,
        m.job_ms,
        m.progress_while_waiting.len()
    );
    assert_eq!(m.base_before, 64 * MIB, "the base's 40 MiB fit its first 64 MiB");
    assert_eq!(m.base_after, 128 * MIB, "the base's volume grew by the job");
    assert!(m.extend_ms >= DELAY_MS, "the SPM answered after its delay: {} ms", m.extend_ms);
    // The job waited for the base: it was seen waiting, and copied nothing meanwhile.
    assert!(m.progress_while_waiting.len() >= 5, "seen waiting {} times", m.progress_while_waiting.len());
    // (The SPM grows the file a little before the job logs its answer.)
    let w = &m.progress_while_waiting;
    assert!(w.iter().all(|&(p, _)| p == 0), "copied before the base grew: {w:?}");
    assert!(w.iter().filter(|&&(_, len)| len == m.base_before).count() >= 5, "the base kept its size while the job waited: {w:?}");
    assert!(m.job_ms >= DELAY_MS, "the job took {} ms", m.job_ms);
}

//! Online snapshots (`ctl snapshot`) under a writing frontend: each snapshot is a point in
//! time (every write acknowledged before the command is in the old chain, none started after
//! its reply), the guest never sees an error, qemu-img reads the chain thinblk leaves, and a
//! restart on the new top reads back everything. With `--thin`, the new top's volume is the
//! one the SPM grows.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ctl, ctl_reply, qemu_img, s, stop_clean, wait_for, Client, Daemon, TestDir};
use serde_json::json;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const DISK: u64 = 64 * MIB;

/// A write the frontend made: the block, its fill byte, and when it was issued and answered.
#[derive(Clone, Copy, Debug)]
struct Done {
    block: u64,
    fill: u8,
    issued: Instant,
    answered: Instant,
}

/// Writes distinct 4 KiB blocks (never one twice) until told to stop; every result must be 0.
fn writer(socket: PathBuf, stop: Arc<AtomicBool>, log: Arc<Mutex<Vec<Done>>>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut c = Client::connect(&socket, 1).expect("connect");
        let mut block = 0u64;
        while !stop.load(Ordering::SeqCst) && block < DISK / BLOCK {
            // Blocks spread over the disk: a prime stride touches every cluster.
            let b = (block * 97) % (DISK / BLOCK);
            let fill = (block % 251) as u8 + 1;
            let issued = Instant::now();
            let r = c.write(0, b * BLOCK, &vec![fill; BLOCK as usize]);
            assert_eq!(r, 0, "write {block} failed: {r}");
            log.lock().expect("log").push(Done { block: b, fill, issued, answered: Instant::now() });
            block += 1;
            if block % 64 == 0 {
                assert_eq!(c.flush(0), 0);
            }
        }
    })
}

/// Waits until the writer answered `n` writes issued after `since` (at most 20 s; the writer
/// has 16 384 distinct blocks, far more than the test needs).
fn wait_writes(log: &Mutex<Vec<Done>>, since: Instant, n: usize) {
    wait_for(&format!("{n} writes since the last point"), Duration::from_secs(20), || {
        log.lock().expect("log").iter().filter(|d| d.issued > since).count() >= n
    });
}

/// Reads the whole disk of `image` (its chain) as qemu-img sees it.
fn read_all(image: &Path, dir: &TestDir, name: &str) -> Vec<u8> {
    let raw = dir.path(name);
    qemu_img(&["convert", "-U", "-O", "raw", s(image), s(&raw)]);
    let data = std::fs::read(&raw).expect("read raw");
    let _ = std::fs::remove_file(&raw);
    data
}

/// Checks that `data` (a chain's content) holds every write answered before `sent` and
/// none issued after `answered`; the rest may go either way (they were in flight).
fn point_in_time(data: &[u8], log: &[Done], sent: Instant, answered: Instant) -> (usize, usize) {
    let (mut before, mut after) = (0, 0);
    for d in log {
        let at = &data[(d.block * BLOCK) as usize..((d.block + 1) * BLOCK) as usize];
        if d.answered < sent {
            assert!(at.iter().all(|&b| b == d.fill), "block {} acknowledged before the snapshot is missing", d.block);
            before += 1;
        } else if d.issued > answered {
            assert!(at.iter().all(|&b| b == 0), "block {} written after the snapshot is in the old chain", d.block);
            after += 1;
        } else {
            assert!(at.iter().all(|&b| b == d.fill) || at.iter().all(|&b| b == 0), "block {} is torn", d.block);
        }
    }
    (before, after)
}

#[test]
fn snapshots_are_points_in_time_under_a_writing_frontend_and_qemu_img_reads_the_chain() {
    let dir = TestDir::new("snapshot-files");
    let names = ["base", "s1", "s2", "s3"];
    let img = |n: &str| dir.path(n);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img("base")), &DISK.to_string()]);
    let (sock, ctl_sock) = (dir.path("vhost.sock"), dir.path("ctl.sock"));
    let d = Daemon::start(&sock, &["--image", s(&img("base")), "--format", "qcow2", "--control", s(&ctl_sock)]);

    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::new()));
    let w = writer(sock.clone(), stop.clone(), log.clone());
    let mut points = Vec::new();
    let mut pauses = Vec::new();
    // Each snapshot, and the stop, come once 50 writes were issued since the last snapshot's
    // answer: writes on both sides of every point, however fast or slow the writer.
    let mut since = Instant::now();
    for k in 1..names.len() {
        wait_writes(&log, since, 50);
        let (over, parent) = (img(names[k]), names[k - 1]);
        qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", parent, "-F", "qcow2", s(&over), &DISK.to_string()]);
        if k == 2 {
            // A refused overlay (its backing is not the top) changes nothing.
            let bad = dir.path("bad");
            qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", "base", "-F", "qcow2", s(&bad), &DISK.to_string()]);
            let e = ctl_reply(&ctl_sock, "snapshot", json!({"overlay": s(&bad)}));
            assert!(e["error"]["desc"].as_str().is_some_and(|m| m.contains("not the current top")), "{e}");
            let e = ctl_reply(&ctl_sock, "snapshot", json!({"overlay": s(&over), "volume-uuid": "d772f1c6-3ebb-43c3-a42e-73fcd8255a5f"}));
            assert!(e.get("error").is_some(), "volume-uuid without --thin: {e}");
        }
        let sent = Instant::now();
        let r = ctl(&ctl_sock, "snapshot", json!({"overlay": s(&over)}));
        let answered = Instant::now();
        assert_eq!(r["top"], s(&over));
        assert_eq!(r["chain"].as_array().map(|a| a.len()), Some(k + 1), "{r}");
        pauses.push(r["pause-us"].as_u64().expect("pause"));
        points.push((sent, answered));
        since = answered;
    }
    wait_writes(&log, since, 50);
    stop.store(true, Ordering::SeqCst);
    w.join().expect("writer: no write may fail");
    let status = ctl(&ctl_sock, "query-status", json!({}));
    assert_eq!(status["chain"].as_array().map(|a| a.len()), Some(4), "{status}");
    stop_clean(d);
    let log = log.lock().expect("log").clone();
    eprintln!("SNAPSHOT-REPORT writes={} pauses_us={pauses:?}", log.len());

    // Every image checks clean; qemu-img follows the chain thinblk left.
    for n in names {
        qemu_img(&["check", "-q", s(&img(n))]);
    }
    let info = qemu_img(&["info", "--backing-chain", "--output=json", s(&img("s3"))]);
    let chain: serde_json::Value = serde_json::from_str(&info).expect("json");
    let files: Vec<&str> = chain.as_array().expect("chain").iter().filter_map(|i| i["filename"].as_str()).collect();
    assert_eq!(files.len(), 4, "{info}");
    // Each old chain is its snapshot's point in time; the top holds every write.
    for (k, (sent, answered)) in points.iter().enumerate() {
        let data = read_all(&img(names[k]), &dir, "point.raw");
        let (before, after) = point_in_time(&data, &log, *sent, *answered);
        assert!(before > 0 && after > 0, "snapshot {k}: {before} writes before, {after} after");
    }
    let end = Instant::now();
    let top = read_all(&img("s3"), &dir, "top.raw");
    point_in_time(&top, &log, end, end);

    // A restart on the new top reads back every write.
    let d = Daemon::start(&sock, &["--image", s(&img("s3")), "--format", "qcow2"]);
    let mut c = Client::connect(&sock, 1).expect("connect");
    for done in log.iter().step_by(7) {
        assert_eq!(c.read(0, done.block * BLOCK, BLOCK as usize).expect("read"), vec![done.fill; BLOCK as usize]);
    }
    drop(c);
    stop_clean(d);
}

const DOMAIN: &str = "8adbc85e-e554-4ae0-b318-8a5465fe5fe1";
const VOL1: &str = "d772f1c6-3ebb-43c3-a42e-73fcd8255a5f";
const VOL2: &str = "5e0c1a6b-7d64-4b8e-9a43-2f1c0b9e7d21";

/// A volume of `size` bytes under `volumes/DOMAIN/uuid` holding a qcow2 (with `backing`, a
/// bare parent UUID as oVirt writes it), on a loop device linked as `sd/uuid` (as LVs
/// appear under `/dev/<domain>/`).
fn lv(volumes: &Path, sd: &Path, uuid: &str, size: u64, backing: Option<&str>) -> (PathBuf, common::LoopDev, PathBuf) {
    let file = volumes.join(DOMAIN).join(uuid);
    let link = sd.join(uuid);
    let dev = common::ovirt_volume(&file, &link, size, backing);
    (file, dev, link)
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).expect("volume file").len()
}

#[test]
fn a_snapshot_on_thin_volumes_moves_the_extensions_to_the_new_top() {
    let dir = TestDir::new("snapshot-thin");
    let (inbox, outbox, volumes, sd) = (dir.path("inbox"), dir.path("outbox"), dir.path("volumes"), dir.path("sd"));
    common::sparse_file(&inbox, 16 * MIB);
    common::sparse_file(&outbox, 16 * MIB);
    std::fs::create_dir_all(volumes.join(DOMAIN)).expect("volumes");
    std::fs::create_dir_all(&sd).expect("sd");
    // A slow SPM: the base's extension is still in flight when the snapshot is taken.
    let spm_log = dir.path("spm.log");
    let _spm = common::spm_process(&inbox, &outbox, &volumes, &["--delay-ms", "1500"], Some(&spm_log));
    let (f1, _l1, link1) = lv(&volumes, &sd, VOL1, 64 * MIB, None);
    let (f2, _l2, link2) = lv(&volumes, &sd, VOL2, 64 * MIB, Some(VOL1));
    let (sock, ctl_sock, log) = (dir.path("vhost.sock"), dir.path("ctl.sock"), dir.path("daemon.log"));
    let lock = dir.path("host-3.lock");
    let d = Daemon::start_logging(
        &sock,
        &[
            "--image", s(&link1), "--format", "qcow2", "--backing-files", "devices", "--control", s(&ctl_sock),
            "--thin", "--spec-sizing", "--chunk-mb", "64", "--utilization-percent", "50",
            "--spm-inbox", s(&inbox), "--spm-outbox", s(&outbox), "--host-id", "3", "--domain-uuid", DOMAIN,
            "--volume-uuid", VOL1, "--mailbox-lock", s(&lock),
        ],
        Some(&log),
    );
    let mut c = Client::connect(&sock, 1).expect("connect");
    let chunk = |i: u64| vec![(i % 250) as u8 + 1; MIB as usize];
    // 40 MiB: past the base's threshold (32 MiB of 64); its extension goes to the slow SPM.
    for i in 0..40 {
        assert_eq!(c.write(0, i * MIB, &chunk(i)), 0);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("extension requested") {
        assert!(Instant::now() < deadline, "no extension request for the base");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = ctl(&ctl_sock, "snapshot", json!({"overlay": s(&link2), "volume-uuid": VOL2}));
    assert_eq!(r["thin-followed"], true, "{r}");
    let status = ctl(&ctl_sock, "query-status", json!({}));
    assert_eq!(status["thin"]["volume"], VOL2, "{status}");
    // 100 MiB more, all in the new top: its volume must grow (64 MiB at the start).
    for i in 40..140 {
        assert_eq!(c.write(0, i * MIB, &chunk(i)), 0, "write {i}");
    }
    assert!(file_len(&f2) > 100 * MIB, "the new top's volume grew: {}", file_len(&f2));
    // The base's extension was not lost: the SPM answered it (and thinblk ignored the reply).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("SPM replied for an earlier top's volume") {
        assert!(Instant::now() < deadline, "the reply for the base was not seen:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(50));
    }
    let base_len = file_len(&f1);
    for i in (0..140).step_by(9) {
        assert_eq!(c.read(0, i * MIB, MIB as usize).expect("read"), chunk(i));
    }
    drop(c);
    stop_clean(d);
    assert_eq!(file_len(&f1), base_len, "nothing extends the base after the snapshot");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let sent_for_base_after = text
        .lines()
        .skip_while(|l| !l.contains("thin volume switched to the new top"))
        .filter(|l| l.contains("extension requested"))
        .count();
    assert!(sent_for_base_after > 0, "the new top asked for extensions");
    qemu_img(&["check", "-q", s(&link2)]);
    qemu_img(&["check", "-q", s(&link1)]);
    let info = qemu_img(&["info", "-U", "--output=json", s(&link2)]);
    assert!(info.contains(&format!("\"backing-filename\": \"{VOL1}\"")), "{info}");
}

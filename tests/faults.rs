//! Storage faults through a real kernel path: the daemon serves a raw image that lives on the
//! fault-injection FUSE file system (tests/common/faultfs.rs); the blkio client must see
//! exactly what the error policies promise.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::faultfs::FaultMount;
use common::metrics::scrape;
use common::{ctl, sparse_file, wait_for, Client, Daemon, TestDir};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

struct Rig {
    // Field order is drop order: the daemon goes before the mount it uses.
    daemon: Daemon,
    mount: FaultMount,
    control: std::path::PathBuf,
    /// The metrics endpoint (every rig serves one: the data path keeps statistics).
    metrics: String,
    _dir: TestDir,
}

fn rig(name: &str, policy: &[&str]) -> Rig {
    let dir = TestDir::new(name);
    let backing = dir.path("backing.raw");
    sparse_file(&backing, 64 * MIB);
    let mount = FaultMount::new(&backing, &dir.path("mnt"));
    let control = dir.path("control.sock");
    let disk = mount.disk();
    let mut args = vec!["--image", disk.to_str().unwrap(), "--format", "raw", "--num-queues", "2"];
    args.extend_from_slice(&["--control", control.to_str().unwrap()]);
    let metrics = format!("unix:{}", dir.path("metrics.sock").display());
    args.extend_from_slice(&["--serial", "faulty", "--metrics", &metrics]);
    args.extend_from_slice(policy);
    let daemon = Daemon::start(&dir.path("sock"), &args);
    Rig { daemon, mount, control, metrics, _dir: dir }
}

/// Waits (at most 10 s) until `n` requests are parked: the writer thread has connected and its
/// request reached the failing storage, however long that took.
fn wait_parked(control: &std::path::Path, n: u64) {
    wait_for(&format!("{n} parked requests"), Duration::from_secs(10), || {
        ctl(control, "query-parked", json!({}))["count"].as_u64().unwrap_or(0) >= n
    });
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i / 512) as u8)).collect()
}

#[test]
fn retry_hides_a_three_second_write_outage() {
    let r = rig("faults-retry", &["--werror", "retry"]);
    let data = pattern(3, 64 * 1024);
    let mut c = Client::connect(&r.daemon.socket, 2).unwrap();
    assert_eq!(c.write(0, 0, &data), 0);
    drop(c);
    // One frontend at a time: the writer's client is the only one until it is done.
    r.mount.faults.fail_writes(libc::EIO);
    let socket = r.daemon.socket.clone();
    let writer = std::thread::spawn(move || {
        let mut c = Client::connect(&socket, 2).unwrap();
        let t0 = Instant::now();
        let ret = c.try_write(1, MIB, &pattern(9, 64 * 1024), Duration::from_secs(30));
        let took = t0.elapsed();
        (ret, took, c.read(0, MIB, 64 * 1024), c.read(1, 0, 64 * 1024))
    });
    std::thread::sleep(Duration::from_millis(1500));
    let st = ctl(&r.control, "query-status", json!({}));
    assert!(st["parked"].as_u64().unwrap() >= 1, "nothing parked during the outage: {st}");
    assert!(st["first-failure-ms-ago"].as_u64().is_some(), "{st}");
    std::thread::sleep(Duration::from_millis(1500));
    r.mount.faults.clear();
    let (ret, took, new, old) = writer.join().unwrap();
    assert_eq!(ret, Some(0), "the guest saw an error");
    // The outage lasts 3 s from just before the writer connected; allow for the connection.
    assert!(took >= Duration::from_millis(2500), "completed during the outage ({took:?})");
    assert!(r.mount.faults.writes_failed.load(std::sync::atomic::Ordering::SeqCst) >= 2, "not retried");
    assert_eq!(new.unwrap(), pattern(9, 64 * 1024));
    assert_eq!(old.unwrap(), data);
    let st = ctl(&r.control, "query-status", json!({}));
    assert_eq!(st["parked"], 0);
    assert_eq!(st["first-failure-ms-ago"], Value::Null, "a success resets the clock: {st}");
}

#[test]
fn persistent_error_is_reported_between_timeout_and_timeout_plus_interval() {
    let r = rig("faults-timeout", &["--werror", "retry", "--retry-interval", "1000", "--retry-timeout", "5000"]);
    let mut c = Client::connect(&r.daemon.socket, 1).unwrap();
    r.mount.faults.fail_writes(libc::EIO);
    let t0 = Instant::now();
    let ret = c.try_write(0, 0, &pattern(1, 4096), Duration::from_secs(20));
    let took = t0.elapsed();
    assert!(matches!(ret, Some(e) if e != 0), "expected an IO error, got {ret:?}");
    assert!(took >= Duration::from_secs(5) && took < Duration::from_millis(6500), "reported after {took:?}");
    // The fault clears: normal service.
    r.mount.faults.clear();
    assert_eq!(c.write(0, 0, &pattern(2, 4096)), 0);
    assert_eq!(c.read(0, 0, 4096).unwrap(), pattern(2, 4096));
}

#[test]
fn report_fails_at_once_and_policies_are_per_direction() {
    let r = rig("faults-report", &["--werror", "report", "--rerror", "retry"]);
    let mut c = Client::connect(&r.daemon.socket, 1).unwrap();
    assert_eq!(c.write(0, 0, &pattern(5, 4096)), 0);
    r.mount.faults.fail_writes(libc::EIO);
    r.mount.faults.fail_reads(libc::EIO);
    let t0 = Instant::now();
    let ret = c.try_write(0, 4096, &pattern(6, 4096), Duration::from_secs(10));
    assert!(matches!(ret, Some(e) if e != 0), "write under report: {ret:?}");
    assert!(t0.elapsed() < Duration::from_secs(1), "report took {:?}", t0.elapsed());
    assert_ne!(c.flush(0), 0, "a failing flush follows werror=report");
    drop(c);
    // Reads follow rerror=retry: the read waits, then succeeds once reads work again.
    let socket = r.daemon.socket.clone();
    let reader = std::thread::spawn(move || {
        let mut c = Client::connect(&socket, 1).unwrap();
        c.read(0, 0, 4096)
    });
    wait_parked(&r.control, 1);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!reader.is_finished(), "the read was not parked");
    assert_eq!(ctl(&r.control, "query-parked", json!({}))["count"], 1);
    r.mount.faults.clear();
    assert_eq!(reader.join().unwrap(), Ok(pattern(5, 4096)));
}

#[test]
fn stop_parks_until_cont() {
    let r = rig("faults-stop", &["--werror", "stop"]);
    r.mount.faults.fail_writes(libc::EIO);
    let socket = r.daemon.socket.clone();
    let writer = std::thread::spawn(move || {
        let mut c = Client::connect(&socket, 1).unwrap();
        c.try_write(0, 0, &pattern(7, 8192), Duration::from_secs(30))
    });
    wait_parked(&r.control, 1);
    r.mount.faults.clear();
    // Healthy storage, but `stop` waits for the operator.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!writer.is_finished(), "stop resumed without cont");
    assert_eq!(ctl(&r.control, "query-parked", json!({}))["count"], 1);
    assert_eq!(ctl(&r.control, "cont", json!({})), json!({}));
    assert_eq!(writer.join().unwrap(), Some(0));
    let mut c = Client::connect(&r.daemon.socket, 1).unwrap();
    assert_eq!(c.read(0, 0, 8192).unwrap(), pattern(7, 8192));
}

#[test]
fn set_policy_at_run_time_and_events_on_the_socket() {
    let r = rig("faults-setpolicy", &[]);
    let st = ctl(&r.control, "query-status", json!({}));
    assert_eq!((st["werror"].as_str(), st["rerror"].as_str()), (Some("enospc"), Some("report")));
    // An event listener.
    let conn = UnixStream::connect(&r.control).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut events = BufReader::new(conn);
    let mut line = String::new();
    events.read_line(&mut line).unwrap();
    let mut c = Client::connect(&r.daemon.socket, 1).unwrap();
    r.mount.faults.fail_writes(libc::EIO);
    assert_ne!(c.write(0, 0, &pattern(1, 4096)), 0, "enospc reports EIO");
    line.clear();
    events.read_line(&mut line).unwrap();
    let ev: Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(ev["event"], "BLOCK_IO_ERROR");
    assert_eq!((ev["data"]["operation"].as_str(), ev["data"]["action"].as_str()), (Some("write"), Some("report")));
    assert_eq!(ev["data"]["nospace"], false);
    drop(c);
    // Through `thinblk ctl`, as an operator would.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .arg("ctl")
        .arg(&r.control)
        .args(["set-policy", r#"{"werror": "retry", "retry-interval": 200}"#])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["return"]["werror"], "retry");
    assert_eq!(s["return"]["retry-interval"], 200);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .arg("ctl")
        .arg(&r.control)
        .args(["set-policy", r#"{"retry-timeout": "soon"}"#])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "a refused command exits 1");
    let socket = r.daemon.socket.clone();
    let writer = std::thread::spawn(move || {
        let mut c = Client::connect(&socket, 1).unwrap();
        c.try_write(0, 0, &pattern(2, 4096), Duration::from_secs(30))
    });
    std::thread::sleep(Duration::from_millis(1000));
    r.mount.faults.clear();
    assert_eq!(writer.join().unwrap(), Some(0));
}

#[test]
fn sigterm_retries_parked_io_for_the_grace_period_then_reports_it() {
    let mut r = rig("faults-sigterm", &["--werror", "retry"]);
    r.mount.faults.fail_writes(libc::EIO);
    let socket = r.daemon.socket.clone();
    let writer = std::thread::spawn(move || {
        let mut c = Client::connect(&socket, 1).unwrap();
        c.try_write(0, 0, &pattern(4, 4096), Duration::from_secs(40))
    });
    wait_parked(&r.control, 1);
    assert_eq!(ctl(&r.control, "query-parked", json!({}))["count"], 1);
    let t0 = Instant::now();
    r.daemon.signal(libc::SIGTERM);
    let ret = writer.join().unwrap();
    let took = t0.elapsed();
    assert!(matches!(ret, Some(e) if e != 0), "parked write must fail, never succeed unwritten: {ret:?}");
    assert!(took >= Duration::from_secs(9), "reported before the grace period ended ({took:?})");
    // The storage still fails, so the final flush fails too: the daemon says so (exit 1).
    assert!(r.daemon.wait_exit(Duration::from_secs(20)).is_some(), "the daemon did not exit");
}

#[test]
fn ignore_completes_failed_writes_as_success_and_counts_them() {
    let r = rig("faults-ignore", &["--werror", "ignore"]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&r.control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode {mode:o}");
    let mut c = Client::connect(&r.daemon.socket, 1).unwrap();
    r.mount.faults.fail_writes(libc::EIO);
    assert_eq!(c.write(0, 0, &pattern(8, 4096)), 0, "ignore reports success");
    r.mount.faults.clear();
    assert_eq!(c.read(0, 0, 4096).unwrap(), vec![0u8; 4096], "the ignored write never landed");
    drop(c);
    let st = ctl(&r.control, "query-status", json!({}));
    assert_eq!(st["errors"]["ignored"], 1, "{st}");
}

#[test]
fn qcow2_allocating_writes_survive_an_outage_under_retry() {
    let dir = TestDir::new("faults-qcow2");
    let backing = dir.path("backing.qcow2");
    let out = std::process::Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&backing).arg("64M").output().unwrap();
    assert!(out.status.success());
    {
        let mount = FaultMount::new(&backing, &dir.path("mnt"));
        let disk = mount.disk();
        let d = Daemon::start(&dir.path("sock"), &["--image", disk.to_str().unwrap(), "--format", "qcow2", "--werror", "retry"]);
        mount.faults.fail_writes(libc::EIO);
        let socket = d.socket.clone();
        let writer = std::thread::spawn(move || {
            let mut c = Client::connect(&socket, 1).unwrap();
            // Allocating writes (new clusters, a new L2 table), then a flush (metadata).
            let mut rets = Vec::new();
            for k in 0..4u64 {
                rets.push(c.try_write(0, k * MIB + 4096, &pattern(k as u8, 8192), Duration::from_secs(30)));
            }
            rets.push(Some(c.flush(0)));
            let back: Vec<_> = (0..4u64).map(|k| c.read(0, k * MIB + 4096, 8192)).collect();
            (rets, back)
        });
        std::thread::sleep(Duration::from_secs(2));
        mount.faults.clear();
        let (rets, back) = writer.join().unwrap();
        assert!(rets.iter().all(|r| *r == Some(0)), "{rets:?}");
        for (k, b) in back.into_iter().enumerate() {
            assert_eq!(b.unwrap(), pattern(k as u8, 8192), "cluster {k}");
        }
        let mut d = d;
        d.signal(libc::SIGTERM);
        assert_eq!(d.wait_exit(Duration::from_secs(20)), Some(0));
    }
    let out = std::process::Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&backing).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn hung_and_slow_storage_is_only_slow_and_zeroing_follows_werror() {
    let r = rig("faults-hang", &["--werror", "retry", "--retry-interval", "300"]);
    let socket = r.daemon.socket.clone();
    // Storage that hangs for 2 s, then answers slowly: the guest sees slow IO, no error.
    r.mount.faults.hang.store(true, std::sync::atomic::Ordering::SeqCst);
    r.mount.faults.delay_ms.store(50, std::sync::atomic::Ordering::SeqCst);
    let writer = std::thread::spawn(move || {
        let mut c = Client::connect(&socket, 1).unwrap();
        let t0 = Instant::now();
        let w = c.try_write(0, 0, &pattern(3, 16384), Duration::from_secs(30));
        let took = t0.elapsed();
        (w, took, c)
    });
    std::thread::sleep(Duration::from_secs(2));
    r.mount.faults.hang.store(false, std::sync::atomic::Ordering::SeqCst);
    let (w, took, c) = writer.join().unwrap();
    assert_eq!(w, Some(0));
    // The writer's clock starts after it connected, within the 2 s hang.
    assert!(took >= Duration::from_millis(1500), "the write did not wait for the hung storage: {took:?}");
    let mut c = c;
    r.mount.faults.delay_ms.store(0, std::sync::atomic::Ordering::SeqCst);
    // Write-zeroes during a write outage (the fixture has no fallocate, so the daemon zeroes
    // by writing): parked under werror=retry, done once writes work again.
    r.mount.faults.fail_writes(libc::EIO);
    let parked_before = ctl(&r.control, "query-status", json!({}))["parked-total"].as_u64().unwrap();
    std::thread::scope(|s| {
        let h = s.spawn(|| c.write_zeroes(0, 0, 16384, false));
        std::thread::sleep(Duration::from_millis(1200));
        let st = ctl(&r.control, "query-status", json!({}));
        assert!(st["parked-total"].as_u64().unwrap() > parked_before, "write-zeroes did not park: {st}");
        r.mount.faults.clear();
        assert_eq!(h.join().unwrap(), 0);
    });
    assert_eq!(c.read(0, 0, 16384).unwrap(), vec![0u8; 16384]);
}

#[test]
fn parked_gauges_follow_an_outage() {
    let r = rig("faults-metrics", &["--werror", "retry", "--retry-interval", "500"]);
    let disk = [("disk", "faulty")];
    r.mount.faults.fail_writes(libc::EIO);
    let socket = r.daemon.socket.clone();
    let writer = std::thread::spawn(move || {
        let mut c = Client::connect(&socket, 2).unwrap();
        c.try_write(1, MIB, &pattern(4, 64 * 1024), Duration::from_secs(30))
    });
    wait_parked(&r.control, 1);
    std::thread::sleep(Duration::from_millis(1500));
    let during = scrape(&r.metrics);
    assert_eq!(during.sum("thinblk_parked_requests", &disk), 1.0, "the write is parked");
    assert!(during.one("thinblk_parked_oldest_seconds", &disk) >= 1.0, "parked since the outage began");
    assert_eq!(during.sum("thinblk_inflight_requests", &disk), 1.0, "a parked request is still in flight");
    assert!(during.one("thinblk_storage_errors_total", &disk) >= 2.0, "retried while parked");
    assert!(during.one("thinblk_storage_error_actions_total", &[("disk", "faulty"), ("action", "park")]) >= 2.0);
    assert!(during.one("thinblk_park_retries_total", &disk) >= 1.0);
    assert_eq!(during.sum("thinblk_requests_total", &[("op", "write")]), 0.0, "not completed yet");
    r.mount.faults.clear();
    assert_eq!(writer.join().unwrap(), Some(0), "the guest saw an error");
    let after = scrape(&r.metrics);
    assert_eq!(after.sum("thinblk_parked_requests", &disk), 0.0);
    assert_eq!(after.one("thinblk_parked_oldest_seconds", &disk), 0.0);
    assert_eq!(after.sum("thinblk_inflight_requests", &disk), 0.0);
    let parks = after.one("thinblk_parks_total", &disk);
    assert!(parks >= 2.0, "parked again at each failed retry: {parks}");
    let parked_for = after.one("thinblk_parked_seconds_total", &disk);
    assert!(parked_for >= 1.5, "time spent parked: {parked_for}");
    // The guest saw one slow, successful write.
    let write = [("queue", "1"), ("op", "write")];
    assert_eq!(after.sum("thinblk_requests_total", &write), 1.0);
    assert_eq!(after.sum("thinblk_request_errors_total", &write), 0.0);
    assert_eq!(after.sum("thinblk_request_bytes_total", &write), 65536.0);
    let fast = after.sum("thinblk_request_duration_seconds_bucket", &[("queue", "1"), ("op", "write"), ("le", "1.0")]);
    assert_eq!(fast, 0.0, "its latency includes the time parked");
}

#[test]
fn a_final_flush_that_cannot_write_metadata_exits_non_zero() {
    // A qcow2 image with dirty metadata at SIGTERM, on storage that now fails writes but
    // still acknowledges syncs: the daemon must write metadata back *before* its final sync
    // and say that it failed (exit 1), never exit 0 with completed writes unlinked.
    let dir = TestDir::new("faults-final-flush");
    let backing = dir.path("backing.qcow2");
    let out = std::process::Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&backing).arg("64M").output().unwrap();
    assert!(out.status.success());
    let mount = FaultMount::new(&backing, &dir.path("mnt"));
    let disk = mount.disk();
    let mut d = Daemon::start(
        &dir.path("sock"),
        &["--image", disk.to_str().unwrap(), "--format", "qcow2", "--journal-dir", dir.0.to_str().unwrap()],
    );
    let mut c = Client::connect(&d.socket, 1).unwrap();
    assert_eq!(c.write(0, 3 * MIB, &pattern(7, 4096)), 0);
    drop(c);
    mount.faults.sync_ok.store(true, std::sync::atomic::Ordering::SeqCst);
    mount.faults.fail_writes(libc::EIO);
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(20)), Some(1), "a failed final flush must not exit 0");
    // The journal stays for the next start, which replays it once writes work again.
    mount.faults.clear();
    let d = Daemon::start(
        &dir.path("sock2"),
        &["--image", disk.to_str().unwrap(), "--format", "qcow2", "--journal-dir", dir.0.to_str().unwrap()],
    );
    let mut c = Client::connect(&d.socket, 1).unwrap();
    assert_eq!(c.read(0, 3 * MIB, 4096).unwrap(), pattern(7, 4096), "the completed write was lost");
    drop(c);
    common::stop_clean(d);
    drop(mount);
    let out = std::process::Command::new("qemu-img").args(["check"]).arg(&backing).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn a_stopping_daemon_reports_a_retry_that_fails_again_instead_of_parking_it() {
    // Every IO takes 3 s and fails: under retry (no timeout) the write is mostly *in flight*,
    // not parked, when the stop grace ends. Its failure after that must be reported, never
    // parked again (the guest would wait forever and the daemon exit with it unanswered).
    let mut r = rig("faults-stop-inflight", &["--werror", "retry", "--retry-interval", "100"]);
    r.mount.faults.fail_writes(libc::EIO);
    r.mount.faults.delay_ms.store(3000, std::sync::atomic::Ordering::SeqCst);
    let socket = r.daemon.socket.clone();
    let writer = std::thread::spawn(move || {
        let mut c = Client::connect(&socket, 1).unwrap();
        c.try_write(0, 0, &pattern(4, 4096), Duration::from_secs(60))
    });
    std::thread::sleep(Duration::from_millis(4500));
    let t0 = Instant::now();
    r.daemon.signal(libc::SIGTERM);
    let ret = writer.join().unwrap();
    assert!(matches!(ret, Some(e) if e != 0), "the write must be reported as failed, not left unanswered: {ret:?}");
    assert!(t0.elapsed() < Duration::from_secs(25), "stop took {:?}", t0.elapsed());
    r.mount.faults.clear();
    assert!(r.daemon.wait_exit(Duration::from_secs(20)).is_some(), "the daemon did not exit");
}

/// `ctl freeze` (a backup by LV snapshot): writes are held, reads flow, the image on the
/// storage is clean and holds every write completed before the freeze; `thaw` lets the held
/// writes through. The storage copy stands in for `lvcreate -s`.
#[test]
fn freeze_holds_writes_leaves_a_clean_image_and_thaw_releases_them() {
    let dir = TestDir::new("freeze");
    let image = dir.path("disk.qcow2");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .args(["create", image.to_str().unwrap(), "64M"])
        .status()
        .unwrap();
    assert!(st.success());
    let control = dir.path("control.sock");
    let d = Daemon::start(
        &dir.path("sock"),
        &["--image", image.to_str().unwrap(), "--format", "qcow2", "--num-queues", "2", "--control", control.to_str().unwrap()],
    );
    let mut c = Client::connect(&d.socket, 2).unwrap();
    let a = pattern(1, 256 * 1024);
    assert_eq!(c.write(0, 0, &a), 0);
    let frozen = ctl(&control, "freeze", json!({"timeout-ms": 30000}));
    assert_eq!(frozen["frozen"], true, "{frozen}");
    // A write while frozen is held (from another part of the client's buffer).
    let b = pattern(7, 64 * 1024);
    let base = c.region.addr as *mut u8;
    // SAFETY: 4 MiB + 64 KiB is inside the client's 8 MiB region, which is ours.
    let held = unsafe { base.add(4 << 20) };
    // SAFETY: as above.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), held, b.len()) };
    c.queues[1].write(MIB, held, b.len(), 1, blkio::ReqFlags::empty());
    let mut comp = [std::mem::MaybeUninit::<blkio::Completion>::uninit(); 1];
    let mut t = Duration::from_millis(500);
    assert_eq!(c.queues[1].do_io(&mut comp, 0, Some(&mut t), None).unwrap_or(0), 0, "a write completed while frozen");
    // Reads flow.
    assert_eq!(c.read(0, 0, a.len()).expect("read while frozen"), a);
    // The storage now holds a clean image with A and without B: copy it ("snapshot").
    let snap = dir.path("snapshot.qcow2");
    std::fs::copy(&image, &snap).unwrap();
    let check = std::process::Command::new("qemu-img").args(["check", snap.to_str().unwrap()]).output().unwrap();
    assert!(check.status.success(), "snapshot check: {}", String::from_utf8_lossy(&check.stdout));
    let raw = dir.path("snapshot.raw");
    let conv = std::process::Command::new("qemu-img").args(["convert", "-O", "raw", snap.to_str().unwrap(), raw.to_str().unwrap()]).status().unwrap();
    assert!(conv.success());
    let bytes = std::fs::read(&raw).unwrap();
    assert_eq!(&bytes[..a.len()], &a[..], "a write completed before the freeze is missing from the snapshot");
    assert!(bytes[MIB as usize..MIB as usize + b.len()].iter().all(|&x| x == 0), "the held write reached the storage");
    // Thaw: the held write completes.
    ctl(&control, "thaw", json!({}));
    let mut t = Duration::from_secs(10);
    assert_eq!(c.queues[1].do_io(&mut comp, 1, Some(&mut t), None).unwrap(), 1, "the held write never completed");
    // SAFETY: one completion was returned.
    assert_eq!(unsafe { comp[0].assume_init_ref() }.ret, 0);
    assert_eq!(c.read(0, MIB, b.len()).expect("read back"), b);
    drop(c);
    common::stop_clean(d);
}

//! The daemon killed with requests in flight and started again: with the frontend's inflight
//! region (INFLIGHT_SHMFD), every request completes exactly once.

mod common;

use std::time::{Duration, Instant};

use common::faultfs::FaultMount;
use common::frontend::*;
use common::frontend::region as region_body;
use common::{sparse_file, stop_clean, wait_for, Client, Daemon, TestDir};

const MIB: u64 = 1 << 20;

/// Chain `n` (descriptors 3n..3n+2): a 4 KiB read or write of sector 8n.
fn request(f: &mut Frontend, n: u16, write: bool) {
    let hdr = DATA + 64 * u64::from(n);
    let buf = DATA + 0x10000 + 0x1000 * u64::from(n);
    let mut h = [0u8; 16];
    h[0] = u8::from(write); // VIRTIO_BLK_T_OUT = 1, IN = 0
    h[8..16].copy_from_slice(&(8 * u64::from(n)).to_le_bytes());
    f.put(hdr, &h);
    if write {
        f.put(buf, &[0x40 + n as u8; 4096]);
    }
    f.put(hdr + 16, &[0xff]);
    let head = 3 * n;
    f.desc(DESC, head, hdr, 16, F_NEXT, head + 1);
    f.desc(DESC, head + 1, buf, 4096, F_NEXT | if write { 0 } else { F_WRITE }, head + 2);
    f.desc(DESC, head + 2, hdr + 16, 1, F_WRITE, 0);
}

/// Clears the fixture's faults when dropped: a failing test must not leave the daemon (and the
/// unmount after it) waiting for storage that hangs. Declare it after the daemon.
struct Unhang(std::sync::Arc<common::faultfs::Faults>);

impl Drop for Unhang {
    fn drop(&mut self) {
        self.0.clear();
    }
}

#[test]
fn a_sigkill_with_requests_in_flight_completes_each_exactly_once_after_restart() {
    restart_with_parked_writes("restart-kill", false);
}

/// The upgrade in place: SIGTERM with writes parked exits at once (no grace, nothing failed)
/// and leaves them to the next daemon.
#[test]
fn a_sigterm_with_parked_io_hands_it_to_the_next_daemon() {
    restart_with_parked_writes("restart-term", true);
}

/// A 64 MiB raw image served through the fault-injection FUSE mount in `dir`: the mount, the
/// backing file, the socket path and a metrics endpoint for the daemon.
fn fuse_raw(dir: &TestDir) -> (FaultMount, std::path::PathBuf, std::path::PathBuf, String) {
    let backing = dir.path("backing.raw");
    sparse_file(&backing, 64 * MIB);
    let mount = FaultMount::new(&backing, &dir.path("mnt"));
    let metrics = format!("unix:{}", dir.path("metrics.sock").display());
    (mount, backing, dir.path("sock"), metrics)
}

fn restart_with_parked_writes(name: &str, graceful: bool) {
    let dir = TestDir::new(name);
    let (mount, _backing, sock, metrics) = fuse_raw(&dir);
    let disk = mount.disk();
    let args = ["--image", disk.to_str().unwrap_or_default(), "--format", "raw", "--num-queues", "1",
        "--werror", "retry", "--retry-interval", "60000", "--metrics", &metrics];
    let mut d = Daemon::start(&sock, &args);

    let mut f = Frontend::connect(&sock);
    let (region, size) = f.start_tracked();
    // Writes fail (and are parked under retry); reads succeed: the reads complete first,
    // out of order with respect to the writes submitted before them.
    mount.faults.fail_writes(libc::EIO);
    let plan = [(0u16, true), (1, false), (2, true), (3, false), (4, true)];
    for &(n, write) in &plan {
        request(&mut f, n, write);
        f.submit(3 * n);
    }
    wait_for("the two reads", Duration::from_secs(10), || f.ram.u16_at(USED + 2) == 2);
    std::thread::sleep(Duration::from_millis(300)); // the writes fail and park (retried only in a minute)
    // (The two reads may complete in either order.)
    let mut before: Vec<u32> = (0..2).map(|i| f.used(i).0).collect();
    before.sort_unstable();
    assert_eq!(before, vec![3, 9], "the reads completed first");

    // The daemon goes with three writes in flight; the storage recovers meanwhile (before a
    // SIGTERM, so the final flush of an upgrade in place sees healthy storage).
    if graceful {
        mount.faults.clear();
        let t = Instant::now();
        d.signal(libc::SIGTERM);
        assert_eq!(d.wait_exit(Duration::from_secs(5)), Some(0), "SIGTERM with parked IO must exit 0 at once");
        assert!(t.elapsed() < Duration::from_secs(3), "exited after {:?} (the parked-IO grace is for frontends without an inflight region)", t.elapsed());
        assert_eq!(f.ram.u16_at(USED + 2), 2, "parked writes were completed (failed) at the stop");
    } else {
        let _ = d.child.kill();
        let _ = d.child.wait();
    }
    mount.faults.clear();
    let t0 = Instant::now();
    let d = Daemon::start(&sock, &args);
    let mut f = f.reconnect(&sock);
    f.resume_tracked(&region, size);
    // No kick: a driver whose requests are all in flight has nothing new to kick with (and
    // with EVENT_IDX may not kick at all); the new daemon must look at the ring by itself.
    wait_for("the resubmitted writes", Duration::from_secs(10), || f.ram.u16_at(USED + 2) == 5);
    let took = t0.elapsed();
    std::thread::sleep(Duration::from_millis(300)); // nothing more may arrive
    assert_eq!(f.ram.u16_at(USED + 2), 5, "a request completed twice");
    let mut heads: Vec<u32> = (0..5).map(|i| f.used(i).0).collect();
    heads.sort_unstable();
    assert_eq!(heads, vec![0, 3, 6, 9, 12], "each request completes exactly once");
    for &(n, _) in &plan {
        assert_eq!(f.ram.bytes()[(DATA + 64 * u64::from(n) + 16) as usize], 0, "request {n} failed");
    }
    println!("restart to all requests completed: {took:?}");
    // The new daemon counts what it saw.
    let m = common::metrics::scrape(&metrics);
    assert_eq!(m.one("thinblk_frontend_connections_total", &[]), 1.0);
    assert_eq!(m.one("thinblk_inflight_recoveries_total", &[]), 1.0);
    assert_eq!(m.one("thinblk_resubmitted_requests_total", &[]), 3.0);
    let first = m.one("thinblk_connect_to_first_io_seconds", &[]);
    assert!(first > 0.0 && first < 5.0, "connect to first IO: {first} s");
    drop(f);
    // The writes landed.
    let mut c = Client::connect(&sock, 1).expect("blkio");
    for &(n, write) in &plan {
        if write {
            assert_eq!(c.read(0, 4096 * u64::from(n), 4096).expect("read back"), vec![0x40 + n as u8; 4096]);
        }
    }
    drop(c);
    stop_clean(d);
}

/// Whether `fd` becomes readable within `limit`.
fn readable_within(fd: &std::fs::File, limit: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, limit.as_millis() as i32) == 1 }
}

/// The previous daemon can die after publishing used entries and before notifying the driver.
/// With EVENT_IDX the driver then waits for an interrupt that the next daemon's event-index
/// arithmetic (which starts at the used index it finds) would never send: the guest hangs
/// (seen in the guest test with kills during an outage). A ring that starts notifies once.
#[test]
fn a_restarted_ring_notifies_the_driver_once_without_new_completions() {
    let dir = TestDir::new("restart-notify");
    let image = dir.path("disk.raw");
    sparse_file(&image, 16 * MIB);
    let sock = dir.path("sock");
    let args = ["--image", image.to_str().unwrap_or_default(), "--format", "raw"];
    let mut d = Daemon::start(&sock, &args);
    let mut f = Frontend::connect(&sock);
    let (region, size) = f.start_tracked();
    request(&mut f, 0, false);
    f.submit(0);
    wait_for("the read", Duration::from_secs(10), || f.ram.u16_at(USED + 2) == 1);
    let _ = d.child.kill();
    let _ = d.child.wait();
    let d = Daemon::start(&sock, &args);
    let mut f = f.reconnect(&sock);
    f.resume_tracked(&region, size);
    let call = f.call.as_ref().expect("call eventfd");
    assert!(readable_within(call, Duration::from_secs(5)), "the restarted ring never notified the driver");
    drop(f);
    stop_clean(d);
}

/// `--retry-timeout` bounds how long the guest waits for a failing write, restarts or not:
/// the first failure's instant lives in the frontend's inflight region, so the next daemon
/// reports at the deadline the first one set, not a full timeout after it started.
#[test]
fn the_retry_deadline_survives_a_restart() {
    let dir = TestDir::new("restart-deadline");
    let backing = dir.path("backing.raw");
    sparse_file(&backing, 16 * MIB);
    let mount = FaultMount::new(&backing, &dir.path("mnt"));
    let disk = mount.disk();
    let sock = dir.path("sock");
    let args = ["--image", disk.to_str().unwrap_or_default(), "--format", "raw",
        "--werror", "retry", "--retry-interval", "200", "--retry-timeout", "4000"];
    let mut d = Daemon::start(&sock, &args);
    let mut f = Frontend::connect(&sock);
    let (region, size) = f.start_tracked();
    mount.faults.fail_writes(libc::EIO);
    let t0 = Instant::now();
    request(&mut f, 0, true);
    f.submit(0);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(f.ram.u16_at(USED + 2), 0, "the write is parked, not reported, before its deadline");
    let _ = d.child.kill();
    let _ = d.child.wait();
    let d = Daemon::start(&sock, &args);
    let restarted = Instant::now();
    let mut f = f.reconnect(&sock);
    f.resume_tracked(&region, size);
    wait_for("the write's report", Duration::from_secs(10), || f.ram.u16_at(USED + 2) == 1);
    let (since_first, since_restart) = (t0.elapsed(), restarted.elapsed());
    println!("reported {since_first:?} after the first failure, {since_restart:?} after the restart");
    assert_eq!(f.ram.bytes()[(DATA + 16) as usize], 1, "VIRTIO_BLK_S_IOERR");
    assert!(since_first >= Duration::from_millis(3900), "reported before the deadline: {since_first:?}");
    assert!(since_restart < Duration::from_millis(3000), "the deadline restarted with the daemon: {since_restart:?}");
    drop(f);
    mount.faults.clear();
    stop_clean(d);
}

/// A child killed when dropped (the test may fail half-way).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Reaped {
    /// SIGTERM, then the exit code.
    fn term(&mut self) -> Option<i32> {
        // SAFETY: kill on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        self.0.wait().ok().and_then(|s| s.code())
    }
}

/// Spawns the daemon on an inherited listening socket, as systemd socket activation does
/// (`--fd 3`).
fn spawn_on_fd(listener: &std::os::unix::net::UnixListener, args: &[&str]) -> Reaped {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = listener.as_raw_fd();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_thinblk"));
    cmd.args(["--fd", "3"]).args(args).env("THINBLK_LOG", "info").stdin(std::process::Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe calls (dup2, fcntl) are made.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::fcntl(3, libc::F_SETFD, 0);
            Ok(())
        });
    }
    Reaped(cmd.spawn().expect("spawn thinblk --fd 3"))
}

/// The listening socket outlives the daemon (systemd holds it): a frontend that connects
/// while no daemon runs is served by the next one, and nothing written is lost.
#[test]
fn a_socket_held_across_a_restart_serves_the_next_daemon() {
    let dir = TestDir::new("restart-fd");
    let image = dir.path("disk.raw");
    sparse_file(&image, 16 * MIB);
    let sock = dir.path("sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    let jdir = dir.0.to_str().unwrap_or_default().to_string();
    let args = ["--image", image.to_str().unwrap_or_default(), "--format", "raw", "--journal-dir", &jdir];
    let mut a = spawn_on_fd(&listener, &args);
    let mut c = Client::connect(&sock, 1).expect("first daemon");
    assert_eq!(c.write(0, 0, &[0x5a; 4096]), 0);
    drop(c);
    assert_eq!(a.term(), Some(0));
    // No daemon now: the connection waits in the socket's backlog for the next one.
    let sock2 = sock.clone();
    let waiting = std::thread::spawn(move || {
        let mut c = Client::connect(&sock2, 1).expect("served by the second daemon");
        c.read(0, 0, 4096)
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut b = spawn_on_fd(&listener, &args);
    let back = waiting.join().expect("client thread");
    assert_eq!(back.expect("read"), vec![0x5a; 4096]);
    assert_eq!(b.term(), Some(0));
}

/// A request resubmitted after a restart completes whatever memory the frontend maps: here
/// also a region at 1 << 62, where the resubmission's private avail page used to be placed
/// (building the chain failed there, and the request was dropped while still marked).
#[test]
fn a_resubmission_completes_whatever_the_memory_layout() {
    let dir = TestDir::new("restart-high-region");
    let image = dir.path("disk.raw");
    sparse_file(&image, 64 * MIB);
    let sock = dir.path("sock");
    let control = dir.path("control.sock");
    let metrics = format!("unix:{}", dir.path("metrics.sock").display());
    let args = ["--image", image.to_str().unwrap_or_default(), "--format", "raw", "--num-queues", "1",
        "--control", control.to_str().unwrap_or_default(), "--metrics", &metrics];
    let mut d = Daemon::start(&sock, &args);
    let frozen = common::ctl(&control, "freeze", serde_json::json!({"timeout-ms": 60000}));
    assert_eq!(frozen["frozen"], true, "{frozen}");
    let mut f = Frontend::connect(&sock);
    let (region, size) = f.start_tracked();
    request(&mut f, 0, true);
    f.submit(0);
    wait_for("the write held by the freeze", Duration::from_secs(10), || {
        common::metrics::scrape(&metrics).sum("thinblk_inflight_requests", &[]) == 1.0
    });
    let _ = d.child.kill();
    let _ = d.child.wait();
    let d = Daemon::start(&sock, &args);
    let mut f = f.reconnect(&sock);
    f.negotiate();
    let high = memfd(4096);
    let mut body = vec![0u8; 8];
    body.extend(region_body(1 << 62, 4096, USER_BASE + (1 << 40), 0));
    assert_eq!(f.ack(code::ADD_MEM_REG, &body, &[std::os::fd::AsRawFd::as_raw_fd(&high)]).expect("ADD_MEM_REG"), 0);
    assert_eq!(f.set_inflight(&region, size).expect("SET_INFLIGHT_FD again"), 0);
    f.restart_queue();
    wait_for("the resubmitted write", Duration::from_secs(10), || f.ram.u16_at(USED + 2) == 1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(f.ram.u16_at(USED + 2), 1, "the write completed twice");
    assert_eq!(f.used(0).0, 0);
    assert_eq!(f.ram.bytes()[(DATA + 16) as usize], 0, "the resubmitted write failed");
    let m = common::metrics::scrape(&metrics);
    assert_eq!(m.one("thinblk_resubmitted_requests_total", &[]), 1.0);
    drop(f);
    stop_clean(d);
}

/// Storage hangs with a write at it; the frontend stops the ring (GET_VRING_BASE) and starts
/// it again, with the inflight region, and publishes a newer write to the same sector. The
/// stop answers within its limit; the stale write is fenced (its late completion writes
/// nothing into the ring); the resubmission and the newer write wait until it has ended; the
/// newer write's data is what the disk keeps, and each request completes exactly once.
/// A daemon on hung storage with one write (0x40 at sector 0, head 0) at it, tracked by an
/// inflight region. Fields drop in order: the faults clear, the daemon goes, then the mount.
struct StaleWrite {
    _unhang: Unhang,
    daemon: Option<Daemon>,
    mount: FaultMount,
    metrics: String,
    sock: std::path::PathBuf,
    backing: std::path::PathBuf,
    region: std::fs::File,
    size: u64,
    _dir: TestDir,
}

impl StaleWrite {
    fn start(name: &str) -> (StaleWrite, Frontend) {
        let dir = TestDir::new(name);
        let (mount, backing, sock, metrics) = fuse_raw(&dir);
        let disk = mount.disk();
        let args = ["--image", disk.to_str().unwrap_or_default(), "--format", "raw", "--num-queues", "1",
            "--stop-grace", "200", "--stop-limit", "1000", "--metrics", &metrics];
        let daemon = Daemon::start(&sock, &args);
        let unhang = Unhang(mount.faults.clone());
        let mut f = Frontend::connect(&sock);
        let (region, size) = f.start_tracked();
        mount.faults.hang.store(true, std::sync::atomic::Ordering::SeqCst);
        request(&mut f, 0, true);
        f.submit(0);
        let rig = StaleWrite { _unhang: unhang, daemon: Some(daemon), mount, metrics, sock, backing, region, size, _dir: dir };
        wait_for("the write at the hung storage", Duration::from_secs(10), || rig.inflight() == 1.0);
        (rig, f)
    }

    /// Requests in the daemon's hands.
    fn inflight(&self) -> f64 {
        common::metrics::scrape(&self.metrics).sum("thinblk_inflight_requests", &[])
    }

    /// Publishes the newer write (0x41 at sector 0, head 3) and checks that nothing new
    /// starts while the stale write is at the storage; then the storage answers, and the
    /// resubmitted write and the newer one each complete once, the newer data kept.
    fn newer_write_waits(mut self, mut f: Frontend) {
        request(&mut f, 1, true);
        f.put(DATA + 64 + 8, &0u64.to_le_bytes()); // sector 0 as well
        f.submit(3);
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(self.inflight(), 1.0, "a resubmitted or newer write was started while the stale one is at the storage");
        assert_eq!(f.ram.u16_at(USED + 2), 0, "a used element while the storage hangs");
        self.mount.faults.clear();
        wait_for("the resubmitted and the newer write", Duration::from_secs(10), || f.ram.u16_at(USED + 2) == 2);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(f.ram.u16_at(USED + 2), 2, "a request completed twice");
        let mut heads: Vec<u32> = (0..2).map(|i| f.used(i).0).collect();
        heads.sort_unstable();
        assert_eq!(heads, vec![0, 3]);
        for n in 0..2u64 {
            assert_eq!(f.ram.bytes()[(DATA + 64 * n + 16) as usize], 0, "request {n} failed");
        }
        drop(f);
        if let Some(d) = self.daemon.take() {
            stop_clean(d);
        }
        let data = std::fs::read(&self.backing).expect("backing");
        assert!(data[..4096].iter().all(|&b| b == 0x41), "the stale write landed after the newer one");
    }
}

#[test]
fn a_stop_gives_up_on_hung_storage_and_no_write_overtakes_the_stale_one() {
    let (rig, mut f) = StaleWrite::start("restart-stop-hung");
    let t = Instant::now();
    f.send(code::GET_VRING_BASE, V1, &Frontend::vring_state(0, 0), &[]).expect("GET_VRING_BASE");
    let (_, b) = f.reply().expect("GET_VRING_BASE answered");
    let took = t.elapsed();
    assert!(took < Duration::from_secs(5), "the stop took {took:?} (grace 0.2 s + limit 1 s)");
    assert_eq!(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), 1, "base");
    // The frontend starts the ring again (as QEMU does on `cont`) with the region.
    assert_eq!(f.set_inflight(&rig.region, rig.size).expect("SET_INFLIGHT_FD"), 0);
    f.restart_queue();
    rig.newer_write_waits(f);
}

/// A queue thread inside a metadata write-back that hung storage never answers (a FLUSH of a
/// qcow2 image) holds its worker: SIGTERM still ends serving within its limits (the stop gives
/// up on the queue, the thread is left behind, the final flush gets twice the limit, and the
/// exit status says it did not finish).
#[test]
fn sigterm_ends_a_daemon_whose_queue_thread_is_stuck_in_storage() {
    let dir = TestDir::new("restart-term-stuck");
    let backing = dir.path("backing.qcow2");
    let out = std::process::Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&backing).arg("64M").output();
    assert!(out.is_ok_and(|o| o.status.success()), "qemu-img create");
    let mount = FaultMount::new(&backing, &dir.path("mnt"));
    let disk = mount.disk();
    let sock = dir.path("sock");
    let journal = dir.path("journal");
    std::fs::create_dir_all(&journal).expect("journal dir");
    let args = ["--image", disk.to_str().unwrap_or_default(), "--format", "qcow2", "--num-queues", "1",
        "--journal-dir", journal.to_str().unwrap_or_default(), "--stop-grace", "200", "--stop-limit", "1000"];
    let mut d = Daemon::start(&sock, &args);
    let _unhang = Unhang(mount.faults.clone());
    let mut f = Frontend::connect(&sock);
    f.negotiate();
    f.start_queue();
    // An allocating write (dirty metadata), then a FLUSH that writes it back into hung storage.
    request(&mut f, 0, true);
    f.submit(0);
    wait_for("the allocating write", Duration::from_secs(10), || f.ram.u16_at(USED + 2) == 1);
    mount.faults.hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut h = [0u8; 16];
    h[0] = 4; // VIRTIO_BLK_T_FLUSH
    f.put(DATA + 0x800, &h);
    f.desc(DESC, 9, DATA + 0x800, 16, F_NEXT, 10);
    f.desc(DESC, 10, DATA + 0x810, 1, F_WRITE, 0);
    f.submit(9);
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    d.signal(libc::SIGTERM);
    // The daemon gives up on the stuck queue and its final flush, and its main thread
    // returns (it removes its socket). The process itself cannot end before the storage
    // answers: a thread inside a FUSE request the server has taken waits uninterruptibly.
    let mut gave_up = None;
    while t.elapsed() < Duration::from_secs(20) {
        if !sock.exists() {
            gave_up = Some(t.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    mount.faults.clear();
    let code = d.wait_exit(Duration::from_secs(10));
    assert!(gave_up.is_some(), "SIGTERM did not end serving within 20 s with a queue thread stuck in storage");
    println!("SIGTERM with a stuck queue thread: gave up after {gave_up:?}, exit {code:?} once the storage answered");
    assert_eq!(code, Some(1), "the daemon must say the final flush did not finish");
    drop(f);
}

/// The frontend disconnects while storage hangs with a write at it, and reconnects with its
/// inflight region (QEMU's reconnect): the new connection resubmits that write and the guest
/// writes the same sector anew. Nothing of the new connection starts while the old write is
/// still at the storage (the gate), so the newer data is what the disk keeps.
#[test]
fn a_reconnect_waits_for_writes_the_previous_connection_left_at_the_storage() {
    reconnect_behind_a_stale_write("restart-gate", 0);
}

/// The same with one more connection in between, which ends while still gated (QEMU trying
/// again): the third connection waits for the first one's write too.
#[test]
fn a_gate_is_handed_on_to_the_connection_after_a_gated_one() {
    reconnect_behind_a_stale_write("restart-gate-twice", 1);
}

fn reconnect_behind_a_stale_write(name: &str, gated_in_between: usize) {
    let (rig, f) = StaleWrite::start(name);
    // The frontend goes and comes back (the daemon gives up on the old connection's queue
    // within its limits and accepts the new one).
    let t = Instant::now();
    let mut f = f.reconnect(&rig.sock);
    f.resume_tracked(&rig.region, rig.size);
    for _ in 0..gated_in_between {
        // This connection is held by the gate and goes again; the daemon must hand the
        // gate on, not forget it because this one had nothing in hand.
        std::thread::sleep(Duration::from_millis(200));
        f = f.reconnect(&rig.sock);
        f.resume_tracked(&rig.region, rig.size);
    }
    println!("reconnected after {:?}", t.elapsed());
    rig.newer_write_waits(f);
}

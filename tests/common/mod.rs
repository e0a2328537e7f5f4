//! Shared test fixtures: temp dirs, the daemon as a child process, a blkio client.
#![allow(dead_code)]

pub mod faultfs;
pub mod frontend;
pub mod metrics;
pub mod qmp;
pub mod vm;

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// A directory removed when dropped, even if the test fails.
pub struct TestDir(pub PathBuf);

impl TestDir {
    /// A fresh directory under $TMPDIR named after the test.
    pub fn new(name: &str) -> TestDir {
        let p = std::env::temp_dir().join(format!("thinblk-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create test dir");
        TestDir(p)
    }
    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        // A failing test keeps its logs (not its images) for the post-mortem:
        // target/tmp/failed/<dir>/*.log.
        if std::thread::panicking() {
            if let (Some(name), Ok(entries)) = (self.0.file_name(), std::fs::read_dir(&self.0)) {
                let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("failed").join(name);
                for e in entries.flatten() {
                    if e.path().extension().is_some_and(|x| x == "log") && std::fs::create_dir_all(&keep).is_ok() {
                        let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
                    }
                }
                eprintln!("logs of the failed test kept in {}", keep.display());
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loop device over a file (standing in for an LV), detached when dropped.
pub struct LoopDev(pub PathBuf);

impl LoopDev {
    /// Attaches `file` to the first free loop device.
    pub fn attach(file: &Path) -> LoopDev {
        let out = Command::new("losetup").args(["-f", "--show"]).arg(file).output().expect("run losetup");
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        LoopDev(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A path as `&str` (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Runs `qemu-img`, which must succeed; returns its stdout.
pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().expect("run qemu-img");
    assert!(out.status.success(), "qemu-img {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An oVirt volume as a host sees it: `file` of `size` bytes holding a 1 GiB qcow2 (its
/// backing, if any, a bare parent UUID as oVirt writes it), attached to a loop device that
/// `link` names (as LVs appear under `/dev/<domain>/`).
pub fn ovirt_volume(file: &Path, link: &Path, size: u64, backing: Option<&str>) -> LoopDev {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some(b) = backing {
        args.extend(["-u", "-b", b, "-F", "qcow2"]);
    }
    args.extend([s(file), "1G"]);
    qemu_img(&args);
    std::fs::OpenOptions::new().write(true).open(file).and_then(|f| f.set_len(size)).expect("size volume");
    let dev = LoopDev::attach(file);
    std::os::unix::fs::symlink(&dev.0, link).expect("link");
    dev
}

/// Creates a sparse file of `len` bytes.
pub fn sparse_file(path: &Path, len: u64) {
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(len).expect("size image");
}

/// The daemon under test, killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
}

impl Daemon {
    /// Starts `thinblk` with `args` plus `--socket-path socket`, waiting for the socket.
    pub fn start(socket: &Path, args: &[&str]) -> Daemon {
        Self::start_logging(socket, args, None)
    }

    /// Like [`Daemon::start`], its log appended to `log` if given (else to the test's stderr).
    pub fn start_logging(socket: &Path, args: &[&str], log: Option<&Path>) -> Daemon {
        // A socket left by a killed daemon would satisfy the wait below too early.
        let _ = std::fs::remove_file(socket);
        // The qcow2 metadata journal goes beside the socket (the test's directory), not into
        // /dev/shm, so a test that kills the daemon leaves nothing behind.
        let mut args: Vec<&str> = args.to_vec();
        let dir = socket.parent().and_then(|p| p.to_str()).unwrap_or(".");
        if args.contains(&"--image") && !args.contains(&"--journal-dir") {
            args.extend_from_slice(&["--journal-dir", dir]);
        }
        let child = Command::new(env!("CARGO_BIN_EXE_thinblk"))
            .arg("--socket-path")
            .arg(socket)
            .args(&args)
            .env("THINBLK_LOG", std::env::var("THINBLK_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stderr(match log {
                Some(p) => Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(p).expect("daemon log")),
                None => Stdio::inherit(),
            })
            .spawn()
            .expect("spawn thinblk");
        let mut d = Daemon { child, socket: socket.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("thinblk exited early: {status}");
            }
            assert!(Instant::now() < deadline, "socket {} did not appear", socket.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits up to `limit` for the daemon to exit; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Stops the daemon with SIGTERM and waits for a clean exit (exit code 0).
pub fn stop_clean(mut d: Daemon) {
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(20)), Some(0), "daemon did not exit cleanly");
}

/// `thinblk check`'s "Image end offset" of the image at `path`.
pub fn check_end_offset(path: &Path) -> u64 {
    let out = Command::new(env!("CARGO_BIN_EXE_thinblk")).arg("check").arg(path).output().expect("run thinblk check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "thinblk check: {text}");
    text.lines().find_map(|l| l.strip_prefix("Image end offset: ")).and_then(|v| v.trim().parse().ok()).expect("end offset")
}

/// Starts `thinblk spm --backend file` (plus `extra`) on the mailbox files, growing volumes
/// under `volumes`; its log goes to `log` when given. Killed when dropped.
pub fn spm_process(inbox: &Path, outbox: &Path, volumes: &Path, extra: &[&str], log: Option<&Path>) -> Daemon {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_thinblk"));
    cmd.args(["spm", "--backend", "file"])
        .arg("--inbox")
        .arg(inbox)
        .arg("--outbox")
        .arg(outbox)
        .arg("--volumes")
        .arg(volumes)
        .args(extra)
        .env("THINBLK_LOG", "info")
        .stdin(Stdio::null());
    if let Some(l) = log {
        cmd.stderr(std::fs::File::create(l).expect("spm log"));
    }
    let child = cmd.spawn().expect("spawn thinblk spm");
    Daemon { child, socket: volumes.join("no-socket") }
}

/// A vhost-user client over libblkio's virtio-blk-vhost-user driver.
pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
    pub capacity: u64,
}

/// Size of the client's shared IO buffer.
pub const BUF_LEN: usize = 8 << 20;

impl Client {
    /// Connects with `num_queues` queues.
    pub fn connect(socket: &Path, num_queues: i32) -> Result<Client, blkio::Error> {
        Self::connect_with(socket, num_queues, false)
    }

    /// Connects, optionally as a read-only frontend.
    pub fn connect_with(socket: &Path, num_queues: i32, read_only: bool) -> Result<Client, blkio::Error> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", socket.to_str().unwrap_or_default())?;
        b.set_bool("read-only", read_only)?;
        b.connect()?;
        b.set_i32("num-queues", num_queues)?;
        let outcome = b.start()?;
        let region = b.alloc_mem_region(BUF_LEN)?;
        b.map_mem_region(&region)?;
        let capacity = b.get_u64("capacity")?;
        Ok(Client { blkio: b, queues: outcome.queues, region, capacity })
    }

    fn buf(&self) -> *mut u8 {
        self.region.addr as *mut u8
    }

    fn wait_one(&mut self, q: usize) -> i32 {
        let mut c = [MaybeUninit::<Completion>::uninit(); 1];
        let mut timeout = Duration::from_secs(30);
        let n = self.queues[q].do_io(&mut c, 1, Some(&mut timeout), None).expect("do_io");
        assert_eq!(n, 1, "no completion within 30 s");
        // SAFETY: do_io initialised the first `n` completions.
        unsafe { c[0].assume_init_ref() }.ret
    }

    /// Like [`Client::write`], but gives up after `limit` (None: no completion came).
    pub fn try_write(&mut self, q: usize, offset: u64, data: &[u8], limit: Duration) -> Option<i32> {
        assert!(data.len() <= BUF_LEN);
        // SAFETY: the region is BUF_LEN bytes, mapped and owned by this client.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.buf(), data.len()) };
        let buf = self.buf();
        self.queues[q].write(offset, buf, data.len(), 0, ReqFlags::empty());
        let mut c = [MaybeUninit::<Completion>::uninit(); 1];
        let mut timeout = limit;
        match self.queues[q].do_io(&mut c, 1, Some(&mut timeout), None) {
            // SAFETY: do_io initialised the first completion.
            Ok(1) => Some(unsafe { c[0].assume_init_ref() }.ret),
            _ => None,
        }
    }

    /// Writes `data` at `offset` through queue `q`; returns the completion's ret.
    pub fn write(&mut self, q: usize, offset: u64, data: &[u8]) -> i32 {
        assert!(data.len() <= BUF_LEN);
        // SAFETY: the region is BUF_LEN bytes, mapped and owned by this client.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.buf(), data.len()) };
        let buf = self.buf();
        self.queues[q].write(offset, buf, data.len(), 0, ReqFlags::empty());
        self.wait_one(q)
    }

    /// Reads `len` bytes at `offset` through queue `q`.
    pub fn read(&mut self, q: usize, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        assert!(len <= BUF_LEN);
        let buf = self.buf();
        self.queues[q].read(offset, buf, len, 0, ReqFlags::empty());
        match self.wait_one(q) {
            0 => {
                let mut out = vec![0u8; len];
                // SAFETY: the region holds at least `len` bytes just filled by the device.
                unsafe { std::ptr::copy_nonoverlapping(self.buf(), out.as_mut_ptr(), len) };
                Ok(out)
            }
            e => Err(e),
        }
    }

    /// Flushes through queue `q`.
    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, ReqFlags::empty());
        self.wait_one(q)
    }

    /// Queues `n` FLUSHes at once on queue `q` and returns their results.
    pub fn flush_many(&mut self, q: usize, n: usize) -> Vec<i32> {
        for i in 0..n {
            self.queues[q].flush(i, ReqFlags::empty());
        }
        let mut c: Vec<MaybeUninit<Completion>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
        let mut got = Vec::new();
        while got.len() < n {
            let mut timeout = Duration::from_secs(30);
            let k = self.queues[q].do_io(&mut c, 1, Some(&mut timeout), None).expect("do_io");
            assert!(k > 0, "flushes did not complete");
            // SAFETY: do_io initialised the first k completions.
            got.extend(c[..k].iter().map(|x| unsafe { x.assume_init_ref() }.ret));
        }
        got
    }

    /// Discards a range.
    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queues[q].discard(offset, len, 0, ReqFlags::empty());
        self.wait_one(q)
    }

    /// Zeroes a range (`unmap` allows deallocation).
    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64, unmap: bool) -> i32 {
        let flags = if unmap { ReqFlags::empty() } else { ReqFlags::NO_UNMAP };
        self.queues[q].write_zeroes(offset, len, 0, flags);
        self.wait_one(q)
    }
}

/// A small deterministic PRNG (xorshift64*), so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    /// Next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// A thin volume for a guest: a 1.5 GiB qcow2 on a 256 MiB loop device whose backing file
/// `thinblk spm` grows; returns the daemon's arguments, the loop device (detached on drop),
/// the SPM (stopped on drop) and the volume's backing file.
pub fn thin_volume(dir: &TestDir) -> (Vec<String>, LoopDev, Daemon, PathBuf) {
    const DOMAIN: &str = "8adbc85e-e554-4ae0-b318-8a5465fe5fe1";
    const VOLUME: &str = "d772f1c6-3ebb-43c3-a42e-73fcd8255a5f";
    let (inbox, outbox) = (dir.path("inbox"), dir.path("outbox"));
    sparse_file(&inbox, 16 << 20);
    sparse_file(&outbox, 16 << 20);
    let vols = dir.path("volumes");
    std::fs::create_dir_all(vols.join(DOMAIN)).expect("volume dir");
    let backing = vols.join(DOMAIN).join(VOLUME);
    let created = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&backing).arg("1536M").output().expect("qemu-img");
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    std::fs::OpenOptions::new().write(true).open(&backing).and_then(|f| f.set_len(256 << 20)).expect("size volume");
    let lv = LoopDev::attach(&backing);
    let dev = lv.0.to_str().expect("utf-8 path").to_string();
    let spm = spm_process(&inbox, &outbox, &vols, &[], None);
    let lock = dir.path("host-2.lock");
    let args = [
        "--image", &dev, "--format", "qcow2", "--thin", "--chunk-mb", "128", "--utilization-percent", "50",
        "--spm-inbox", inbox.to_str().expect("utf-8"), "--spm-outbox", outbox.to_str().expect("utf-8"),
        "--host-id", "2", "--domain-uuid", DOMAIN, "--volume-uuid", VOLUME, "--mailbox-lock", lock.to_str().expect("utf-8"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    (args, lv, spm, backing)
}

/// Sends one command to the control socket (`--control`) and returns the reply's `return`
/// (panics on an error reply).
pub fn ctl(socket: &Path, command: &str, args: serde_json::Value) -> serde_json::Value {
    let v = ctl_reply(socket, command, args);
    assert!(v.get("error").is_none(), "{command}: {v}");
    v["return"].clone()
}

/// Sends one command to the control socket and returns the whole reply (`return` or `error`).
pub fn ctl_reply(socket: &Path, command: &str, args: serde_json::Value) -> serde_json::Value {
    use std::io::{BufRead, BufReader, Write};
    let conn = std::os::unix::net::UnixStream::connect(socket).expect("connect to the control socket");
    conn.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut r = BufReader::new(conn.try_clone().expect("clone"));
    let mut line = String::new();
    r.read_line(&mut line).expect("greeting");
    assert!(line.contains("QMP"), "greeting: {line}");
    writeln!(&conn, "{}", serde_json::json!({"execute": command, "arguments": args})).expect("send");
    loop {
        line.clear();
        r.read_line(&mut line).expect("reply");
        let v: serde_json::Value = serde_json::from_str(line.trim()).expect("json");
        if v.get("event").is_some() {
            continue;
        }
        return v;
    }
}

/// Milliseconds since the Unix epoch of a log line's RFC 3339 timestamp (UTC, as tracing
/// prints it): `2026-12-01T21:29:12.782822Z ...`.
pub fn log_time_ms(line: &str) -> Option<u64> {
    let ts = line.split_whitespace().next()?;
    let (date, time) = ts.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (hh, mm, ss) = (t.next()?.parse::<i64>().ok()?, t.next()?.parse::<i64>().ok()?, t.next()?.parse::<f64>().ok()?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + hh * 3600 + mm * 60) as f64 * 1000.0 + ss * 1000.0) as u64)
}

/// Waits until `ok` holds, at most `limit` (then fails the test, naming `what`).
pub fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The threads of process `pid` that are its own: io_uring's worker threads (`iou-wrk-*`),
/// which the kernel starts and ends with blocking IO, are left out.
pub fn own_threads(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(|t| t.ok())
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| !c.starts_with("iou-wrk")))
        .count() as u64
}

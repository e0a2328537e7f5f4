//! What the benchmarks share: servers under test, the libblkio load driver, image helpers.
#![allow(dead_code)]

use std::mem::MaybeUninit;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};

/// One load shape.
#[derive(Clone, Copy)]
pub struct Workload {
    pub name: &'static str,
    pub write: bool,
    pub random: bool,
    pub bs: usize,
    pub qd: usize,
}

/// What one run measured.
#[derive(Clone, Copy, Default)]
pub struct Result {
    pub iops: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub cpu_pct: f64,
}

/// A server process, stopped with SIGTERM when dropped.
pub struct Server {
    pub child: Child,
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

pub fn wait_socket(sock: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if let Ok(Some(s)) = child.try_wait() {
            panic!("server exited: {s}");
        }
        assert!(Instant::now() < deadline, "socket did not appear");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts thinblk; THINBLK_BENCH_ARGS (space-separated) is appended to every start, for A/B
/// runs of one option (e.g. `--journal-dir none`).
pub fn start_thinblk(image: &Path, format: &str, sock: &Path, extra: &[&str]) -> Server {
    // THINBLK_BENCH_BIN: another thinblk binary (an A/B against an earlier build).
    let bin = std::env::var("THINBLK_BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_thinblk").to_string());
    let ab = std::env::var("THINBLK_BENCH_ARGS").unwrap_or_default();
    let ab: Vec<&str> = ab.split_whitespace().collect();
    let queues = if extra.contains(&"--num-queues") { &[][..] } else { &["--num-queues", "1"][..] };
    let mut child = Command::new(bin)
        .args(["--image", image.to_str().unwrap(), "--format", format, "--log-level", "warn"])
        .args(queues)
        .arg("--socket-path")
        .arg(sock)
        .args(extra)
        .args(&ab)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn thinblk");
    wait_socket(sock, &mut child);
    Server { child }
}

pub fn start_qsd(image: &Path, format: &str, sock: &Path) -> Option<Server> {
    start_qsd_queues(image, format, sock, 1)
}

/// qemu-storage-daemon exporting `queues` virtqueues.
pub fn start_qsd_queues(image: &Path, format: &str, sock: &Path, queues: usize) -> Option<Server> {
    // A block device (a loop device standing in for an LV) takes QEMU's host_device driver.
    use std::os::unix::fs::FileTypeExt;
    let is_block = std::fs::metadata(image).is_ok_and(|m| m.file_type().is_block_device());
    let proto = if is_block { "host_device" } else { "file" };
    let mut child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver={proto},node-name=file0,filename={},aio=io_uring,cache.direct=on",
            image.display()
        ))
        .arg("--blockdev")
        .arg(format!("driver={format},node-name=disk0,file=file0"))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
            sock.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .ok()?;
    wait_socket(sock, &mut child);
    Some(Server { child })
}

pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" of the command name: state is field 3; utime 14, stime 15.
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ut: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let st: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ut + st
}

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

pub fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

/// Completions, latencies and server CPU of one measured run.
struct Tally {
    pid: u32,
    cpu0: u64,
    t0: Instant,
    lat_ns: Vec<u32>,
}

impl Tally {
    fn start(pid: u32) -> Tally {
        Tally { pid, cpu0: cpu_ticks(pid), t0: Instant::now(), lat_ns: Vec::with_capacity(1 << 20) }
    }
    /// One completion of a request started at `started`, seen at `now`.
    fn record(&mut self, started: Instant, now: Instant, ret: i32) {
        assert_eq!(ret, 0, "IO failed");
        self.lat_ns.push(now.duration_since(started).as_nanos().min(u128::from(u32::MAX)) as u32);
    }
    fn result(mut self) -> Result {
        let elapsed = self.t0.elapsed().as_secs_f64();
        let cpu1 = cpu_ticks(self.pid);
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        self.lat_ns.sort_unstable();
        Result {
            iops: self.lat_ns.len() as f64 / elapsed,
            p50_us: percentile(&self.lat_ns, 0.50),
            p99_us: percentile(&self.lat_ns, 0.99),
            cpu_pct: (cpu1 - self.cpu0) as f64 / hz / elapsed * 100.0,
        }
    }
}

/// Queues `w`'s request for buffer slot `slot` (of `w.bs` bytes from `base`) at `off`.
fn submit_slot(q: &mut blkio::Blkioq, base: *mut u8, w: Workload, slot: usize, off: u64) {
    // SAFETY: callers pass slots inside the region they allocated for bs bytes a slot.
    let buf = unsafe { base.add(slot * w.bs) };
    if w.write {
        q.write(off, buf, w.bs, slot, ReqFlags::empty());
    } else {
        q.read(off, buf, w.bs, slot, ReqFlags::empty());
    }
}

/// Drives one workload over a vhost-user socket for `secs`; returns the result.
pub fn run_blkio(sock: &Path, pid: u32, size: u64, w: Workload, secs: u64) -> Result {
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
    let submit = |q: &mut blkio::Blkioq, slot: usize, off: u64| submit_slot(q, base, w, slot, off);
    let mut tally = Tally::start(pid);
    for (slot, at) in started.iter_mut().enumerate() {
        *at = Instant::now();
        submit(q, slot, next_off(&mut rng));
    }
    let mut comps: Vec<MaybeUninit<Completion>> = (0..w.qd).map(|_| MaybeUninit::uninit()).collect();
    let end = tally.t0 + Duration::from_secs(secs);
    let mut inflight = w.qd;
    // THINBLK_BENCH_CLIENT_POLL=1: the client busy-polls its completions instead of sleeping
    // (an experiment: how much of the gap to fio is the client's own wake-up).
    let poll = std::env::var_os("THINBLK_BENCH_CLIENT_POLL").is_some();
    let give_up = Instant::now() + Duration::from_secs(secs + 10);
    while inflight > 0 {
        let n = if poll {
            let mut zero = Duration::ZERO;
            let n = q.do_io(&mut comps, 0, Some(&mut zero), None).expect("do_io");
            assert!(n > 0 || Instant::now() < give_up, "IO timed out");
            if n == 0 {
                continue;
            }
            n
        } else {
            let mut timeout = Duration::from_secs(10);
            q.do_io(&mut comps, 1, Some(&mut timeout), None).expect("do_io")
        };
        assert!(n > 0, "IO timed out");
        let now = Instant::now();
        for c in comps.iter().take(n) {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            tally.record(started[slot], now, c.ret);
            if now < end {
                started[slot] = Instant::now();
                submit(q, slot, next_off(&mut rng));
            } else {
                inflight -= 1;
            }
        }
    }
    tally.result()
}

pub fn prefill(image: &Path, size: u64) {
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
pub fn warm(image: &Path) {
    use std::io::Read;
    if let Ok(mut f) = std::fs::File::open(image) {
        let mut buf = vec![0u8; 4 << 20];
        while matches!(f.read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// The median of `v` (sorts it): the mean of the two middle values for an even count, zero
/// for none.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}


/// Peak resident memory of a process (VmHWM), in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Like [`run_blkio`] over `queues` queues (QD `w.qd` each), driven from one thread that
/// waits on the queues' completion fds. No FLUSH is ever sent.
pub fn run_blkio_queues(sock: &Path, pid: u32, size: u64, w: Workload, secs: u64, queues: usize) -> Result {
    let mut b = Blkio::new("virtio-blk-vhost-user").expect("blkio");
    b.set_str("path", sock.to_str().unwrap()).unwrap();
    b.connect().expect("connect");
    b.set_i32("num-queues", queues as i32).unwrap();
    let mut out = b.start().expect("start");
    let slots = w.qd * queues;
    let region = b.alloc_mem_region(w.bs * slots).expect("alloc");
    b.map_mem_region(&region).expect("map");
    let base = region.addr as *mut u8;
    // SAFETY: the region is bs*slots bytes and ours.
    unsafe { std::ptr::write_bytes(base, 0x5a, w.bs * slots) };
    let blocks = size / w.bs as u64;
    let mut rng = Rng(0x1234_5678);
    let mut fds = Vec::new();
    for q in out.queues.iter_mut() {
        q.set_completion_fd_enabled(true);
        fds.push(libc::pollfd { fd: q.get_completion_fd().expect("completion fd"), events: libc::POLLIN, revents: 0 });
    }
    let submit = |q: &mut blkio::Blkioq, slot: usize, off: u64| submit_slot(q, base, w, slot, off);
    let mut tally = Tally::start(pid);
    let mut started = vec![Instant::now(); slots];
    for (qi, q) in out.queues.iter_mut().enumerate() {
        for k in 0..w.qd {
            let slot = qi * w.qd + k;
            started[slot] = Instant::now();
            submit(q, slot, (rng.next() % blocks) * w.bs as u64);
        }
        let mut none: [MaybeUninit<Completion>; 0] = [];
        let mut t = Duration::ZERO;
        let _ = q.do_io(&mut none, 0, Some(&mut t), None);
    }
    let mut comps: Vec<MaybeUninit<Completion>> = (0..w.qd).map(|_| MaybeUninit::uninit()).collect();
    let end = tally.t0 + Duration::from_secs(secs);
    let mut inflight = slots;
    while inflight > 0 {
        // SAFETY: fds is a valid array of pollfd for the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10_000) };
        assert!(r > 0, "IO timed out");
        for (qi, q) in out.queues.iter_mut().enumerate() {
            if fds[qi].revents == 0 {
                continue;
            }
            let mut v = 0u64;
            // SAFETY: reading 8 bytes from the queue's eventfd into a u64.
            unsafe { libc::read(fds[qi].fd, (&mut v as *mut u64).cast(), 8) };
            let mut t = Duration::ZERO;
            let n = q.do_io(&mut comps, 0, Some(&mut t), None).expect("do_io");
            let now = Instant::now();
            for c in comps.iter().take(n) {
                // SAFETY: do_io initialised the first n completions.
                let c = unsafe { c.assume_init_ref() };
                let slot = c.user_data;
                tally.record(started[slot], now, c.ret);
                if now < end {
                    started[slot] = Instant::now();
                    submit(q, slot, (rng.next() % blocks) * w.bs as u64);
                } else {
                    inflight -= 1;
                }
            }
            if n > 0 {
                let mut none: [MaybeUninit<Completion>; 0] = [];
                let mut t = Duration::ZERO;
                let _ = q.do_io(&mut none, 0, Some(&mut t), None);
            }
        }
    }
    tally.result()
}

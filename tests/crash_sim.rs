//! Crash simulation of the whole daemon, from below it (docs/qcow2.md, the two contracts).
//!
//! *Host crash*: the image sits on the FUSE fixture in log-writes mode, so every write,
//! zeroing and sync the daemon's kernel IO completed is recorded in order. A two-queue blkio
//! workload writes self-describing sectors, discards, zeroes, FLUSHes on both queues and
//! churns (write → discard → rewrite), keeping a journal of when each request was issued and
//! completed. Crash images are rebuilt at random cut points: every event up to the last sync
//! before the cut, plus a random subset of the later ones. Each must pass `qemu-img check`
//! (leaks allowed), read back (through `qemu-img convert`) only zeroes or valid sectors of
//! their own address written before the cut, and hold every write completed before the last
//! completed FLUSH was issued (or what a later request on that sector put there).
//!
//! *Daemon crash*: the same workload with no FLUSH at all, the daemon killed with SIGKILL
//! mid-flight and started again, three times: every completed write reads back.
//!
//! *Host crash during a live merge*: the chain base ← mid ← top, base and top each on a
//! fixture of their own in log-writes mode (mid, written before the logs start, is a plain
//! file); every logged event takes a number from one counter of the process, so the two logs
//! merge into one order. The same workload (paced) writes to the top while `ctl commit`
//! merges mid into base and rebases the top (internal), or merges top and mid into base,
//! mirrors and pivots (active), and goes on after it. Crash images are rebuilt at random cut
//! points and on both sides of every event that orders the merge (the base's syncs and
//! header writes, the top's header write that changes its chain, and the sync after it):
//! per file, its events up to its own last sync before the cut and a random half of its
//! later ones. Every image must pass `qemu-img check`; the image a restart would serve (the
//! top, unless its header carries thinblk's merged mark: then the base) must read back as
//! above.

mod common;

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::{Completion, ReqFlags};
use common::faultfs::{self, FaultMount, LogEvent};
use common::{Client, Daemon, Rng, TestDir};

const SECTOR: u64 = 512;
/// Virtual disk size: small, so that a thousand rebuilt images stay cheap.
const DISK: u64 = 4 << 20;
/// Each queue owns every other stripe, so no two requests in flight touch the same sector,
/// yet both queues share clusters and L2 tables.
const STRIPE: u64 = 128 << 10;
/// Requests in flight per queue.
const DEPTH: usize = 2;
/// Bytes of the client buffer each in-flight slot uses.
const SLOT: usize = 1 << 20;

/// The bytes of sector `s` as written by request `id`: they name their own address.
fn sector_bytes(s: u64, id: u64) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[..8].copy_from_slice(b"TBSECTOR");
    b[8..16].copy_from_slice(&s.to_le_bytes());
    b[16..24].copy_from_slice(&id.to_le_bytes());
    let mut x = s.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ id.wrapping_mul(0xc2b2_ae3d_27d4_eb4f) | 1;
    for c in b[24..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    b
}

/// What a sector holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Content {
    Zero,
    Written(u64),
    Garbage,
}

fn classify(buf: &[u8], s: u64) -> Content {
    if buf.iter().all(|&b| b == 0) {
        return Content::Zero;
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&buf[16..24]);
    let id = u64::from_le_bytes(id);
    if buf == sector_bytes(s, id) {
        Content::Written(id)
    } else {
        Content::Garbage
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Write,
    Discard,
    Zeroes,
    Flush,
}

/// One guest request and when it was issued and completed.
#[derive(Clone, Debug)]
struct Op {
    kind: Kind,
    off: u64,
    len: u64,
    /// Position in one order of every issue and every observed completion.
    issue_seq: u64,
    done_seq: Option<u64>,
    /// The fixture's log length before the issue / after the completion was seen.
    issue_log: u64,
    done_log: u64,
    ret: i32,
}

impl Op {
    /// What this request leaves in sector `s`; None: anything (a discard).
    fn content(&self, id: u64) -> Option<Content> {
        match self.kind {
            Kind::Write => Some(Content::Written(id)),
            Kind::Zeroes => Some(Content::Zero),
            Kind::Discard | Kind::Flush => None,
        }
    }
}

struct Workload {
    ops: Vec<Op>,
    seq: u64,
    /// Ids start here (distinct across rounds on one image).
    first_id: u64,
    /// Least time between two issues (zero: as fast as the queues go).
    pace: Duration,
}

impl Workload {
    fn new(first_id: u64) -> Workload {
        Workload { ops: Vec::new(), seq: 0, first_id, pace: Duration::ZERO }
    }
    fn id(&self, i: usize) -> u64 {
        self.first_id + i as u64
    }
}

/// A random range inside one of queue `q`'s stripes.
fn pick_range(rng: &mut Rng, q: usize) -> (u64, u64) {
    let stripes = DISK / STRIPE;
    let stripe = (rng.below(stripes / 2) * 2 + q as u64) * STRIPE;
    match rng.below(10) {
        // A whole 64 KiB chunk: whole clusters at every cluster size.
        0..=2 => (stripe + rng.below(STRIPE / 65536) * 65536, 65536),
        // 4 KiB aligned.
        3..=5 => {
            let n = 1 + rng.below(8);
            (stripe + rng.below(STRIPE / 4096 - n + 1) * 4096, n * 4096)
        }
        _ => {
            let n = 1 + rng.below(16);
            (stripe + rng.below(STRIPE / SECTOR - n + 1) * SECTOR, n * SECTOR)
        }
    }
}

/// Runs `n` requests over two queues, and more while `more` says so; `flush_every` 0: no
/// FLUSH at all. `clock` tells where the fixture's log is (its length, or the process-wide
/// event number), read before each issue and after each completion. `kill_at`: after that
/// many requests are issued, call it and stop (requests in flight stay uncompleted).
#[allow(clippy::too_many_arguments)]
fn run(
    c: &mut Client,
    w: &mut Workload,
    clock: &dyn Fn() -> u64,
    rng: &mut Rng,
    n: usize,
    flush_every: usize,
    more: &dyn Fn() -> bool,
    mut kill_at: Option<(usize, &mut dyn FnMut())>,
) {
    let log_len = clock;
    let base = c.region.addr as *mut u8;
    // (op index, slot) per in-flight request, per queue.
    let mut inflight: [Vec<(usize, usize)>; 2] = [Vec::new(), Vec::new()];
    let mut plan: [Vec<(Kind, u64, u64)>; 2] = [Vec::new(), Vec::new()];
    let mut since_flush = [0usize; 2];
    let mut issued = 0;
    let mut next_issue = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut comps: Vec<MaybeUninit<Completion>> = (0..8).map(|_| MaybeUninit::uninit()).collect();
    loop {
        assert!(Instant::now() < deadline, "workload did not finish in 120 s");
        if let Some((at, _)) = &kill_at {
            if issued >= *at {
                if let Some((_, kill)) = kill_at.take() {
                    kill();
                }
                return;
            }
        }
        let mut progressed = false;
        let go = issued < n || more();
        for q in 0..2 {
            if go && inflight[q].len() < DEPTH && Instant::now() >= next_issue {
                let step = if flush_every > 0 && since_flush[q] >= flush_every {
                    since_flush[q] = 0;
                    Some((Kind::Flush, 0, 0))
                } else if let Some(&p) = plan[q].first() {
                    Some(p)
                } else {
                    let (off, len) = pick_range(rng, q);
                    let kind = match rng.below(20) {
                        0..=1 => Kind::Discard,
                        2..=3 => Kind::Zeroes,
                        4..=6 => {
                            // Churn: write, discard, rewrite the same range, in order.
                            plan[q] = vec![(Kind::Write, off, len), (Kind::Discard, off, len), (Kind::Write, off, len)];
                            continue;
                        }
                        _ => Kind::Write,
                    };
                    Some((kind, off, len))
                };
                let Some((kind, off, len)) = step else { continue };
                // Never two requests on one sector at once (the order per sector is known).
                let busy = inflight.iter().flatten().any(|&(i, _)| {
                    let o = &w.ops[i];
                    o.kind != Kind::Flush && kind != Kind::Flush && o.off < off + len && off < o.off + o.len
                });
                if busy {
                    continue;
                }
                if !plan[q].is_empty() && kind != Kind::Flush {
                    plan[q].remove(0);
                }
                let slot = (0..DEPTH).find(|s| inflight[q].iter().all(|&(_, t)| t != *s)).unwrap_or(0) + q * DEPTH;
                let i = w.ops.len();
                let id = w.id(i);
                w.seq += 1;
                w.ops.push(Op { kind, off, len, issue_seq: w.seq, done_seq: None, issue_log: log_len(), done_log: 0, ret: 0 });
                let flags = ReqFlags::empty();
                match kind {
                    Kind::Write => {
                        // SAFETY: slot * SLOT + len stays inside the client's 8 MiB region.
                        let buf = unsafe { base.add(slot * SLOT) };
                        for k in 0..len / SECTOR {
                            let b = sector_bytes(off / SECTOR + k, id);
                            // SAFETY: as above; 512 bytes at a time inside the slot.
                            unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), buf.add((k * SECTOR) as usize), 512) };
                        }
                        c.queues[q].write(off, buf, len as usize, i, flags);
                    }
                    Kind::Discard => c.queues[q].discard(off, len, i, flags),
                    Kind::Zeroes => c.queues[q].write_zeroes(off, len, i, if rng.below(2) == 0 { flags } else { ReqFlags::NO_UNMAP }),
                    Kind::Flush => c.queues[q].flush(i, flags),
                }
                inflight[q].push((i, slot % DEPTH));
                issued += 1;
                next_issue = Instant::now() + w.pace;
                since_flush[q] += 1;
                progressed = true;
            }
        }
        for (q, queue) in c.queues.iter_mut().enumerate().take(2) {
            let mut t = Duration::ZERO;
            let k = queue.do_io(&mut comps, 0, Some(&mut t), None).unwrap_or(0);
            for x in &comps[..k] {
                // SAFETY: do_io initialised the first k completions.
                let x = unsafe { x.assume_init_ref() };
                w.seq += 1;
                let (seq, log) = (w.seq, log_len());
                let op = &mut w.ops[x.user_data];
                op.done_seq = Some(seq);
                op.done_log = log;
                op.ret = x.ret;
                assert_eq!(x.ret, 0, "{:?} at {} failed", op.kind, op.off);
                inflight[q].retain(|&(j, _)| j != x.user_data);
                progressed = true;
            }
        }
        if !go && inflight.iter().all(|v| v.is_empty()) {
            return;
        }
        if !progressed {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

/// Checks one crash image's guest contents (raw bytes of the whole disk) against the journal:
/// `cut_log`: the log position of the cut (requests issued at or after it cannot show);
/// `required_before`: the sequence point before which completed writes must be there.
fn verify(disk: &[u8], w: &Workload, cut_log: Option<u64>, required_before: Option<u64>, what: &str) -> usize {
    let mut checked = 0;
    // Per sector, the requests that touched it, in issue order (never two at once).
    let mut history: Vec<Vec<usize>> = vec![Vec::new(); (DISK / SECTOR) as usize];
    for (i, op) in w.ops.iter().enumerate() {
        if op.kind == Kind::Flush {
            continue;
        }
        for s in op.off / SECTOR..(op.off + op.len) / SECTOR {
            history[s as usize].push(i);
        }
    }
    let issued_before_cut = |op: &Op| cut_log.is_none_or(|c| op.issue_log < c);
    for s in 0..DISK / SECTOR {
        let got = classify(&disk[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize], s);
        let h = &history[s as usize];
        match got {
            Content::Garbage => panic!("{what}: sector {s} holds bytes no request wrote there"),
            Content::Written(id) => {
                let ok = h.iter().any(|&i| w.id(i) == id && w.ops[i].kind == Kind::Write && issued_before_cut(&w.ops[i]))
                    || id < w.first_id;
                assert!(ok, "{what}: sector {s} holds request {id}, which was not written there before the cut");
            }
            Content::Zero => {}
        }
        let Some(before) = required_before else { continue };
        // The last request on this sector that completed before the point.
        let Some(pos) = h.iter().rposition(|&i| w.ops[i].done_seq.is_some_and(|d| d < before)) else { continue };
        let mut allowed = Vec::new();
        let mut anything = false;
        for &i in &h[pos..] {
            let op = &w.ops[i];
            if i != h[pos] && !issued_before_cut(op) {
                break;
            }
            match op.content(w.id(i)) {
                Some(c) => allowed.push(c),
                None => anything = true,
            }
        }
        if anything {
            continue;
        }
        assert!(
            allowed.contains(&got),
            "{what}: sector {s} reads {got:?}, but request {} ({:?}) completed before the point and only {allowed:?} may follow",
            w.id(h[pos]),
            w.ops[h[pos]].kind
        );
        checked += 1;
    }
    checked
}

/// Rebuilds the file as a power loss at `cut` could leave it: every event before the last
/// sync before the cut, and a random half of those after it. Size changes always apply.
/// `base`: the file's bytes when the log started (it may leave out zeroes at the end), of
/// `base_len` bytes.
fn rebuild(base: &[u8], base_len: u64, log: &[LogEvent], cut: usize, rng: &mut Rng) -> (Vec<u8>, u64) {
    let last_sync = log[..cut].iter().rposition(|e| matches!(e, LogEvent::Sync)).map(|i| i + 1).unwrap_or(0);
    let mut img = base.to_vec();
    let mut size = base_len;
    for (k, e) in log[..cut].iter().enumerate() {
        let apply = k < last_sync || rng.below(2) == 0;
        match e {
            LogEvent::SetLen(n) => size = *n,
            LogEvent::Write(off, data) if apply => {
                let end = *off as usize + data.len();
                if img.len() < end {
                    img.resize(end, 0);
                }
                img[*off as usize..end].copy_from_slice(data);
            }
            LogEvent::Zero(off, len) if apply => {
                let a = (*off as usize).min(img.len());
                let b = (*off + *len).min(img.len() as u64) as usize;
                img[a..b].fill(0);
            }
            _ => {}
        }
    }
    (img, size)
}

/// Writes a rebuilt image to `path`, `size` bytes long (or longer, if written past it).
fn put_image(path: &Path, img: &[u8], size: u64) {
    use std::io::Write;
    // Overwritten in place, not truncated to zero first: ext4 (auto_da_alloc) writes a file
    // that was truncated to zero and written again back at its close, a sync per image. Cut
    // at the end of `img` (what an earlier image left past it goes), then extended by zeroes.
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(path).expect("open cut image");
    f.write_all(img).expect("write cut image");
    f.set_len(img.len() as u64).expect("cut the image's end");
    f.set_len(size.max(img.len() as u64)).expect("size cut image");
}

/// `qemu-img check` of the qcow2 image at `path`: no corruption (exit 0, or 3: leaks only).
/// On failure, `post_mortem` (the image, or its whole chain) is kept when asked
/// (THINBLK_CRASH_KEEP=DIR): the test's directory goes with the test.
fn check_image(path: &Path, post_mortem: &[&Path], what: &str) {
    let out = Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(path).output().expect("qemu-img check");
    let code = out.status.code().unwrap_or(-1);
    if code != 0 && code != 3 {
        let kept = keep_files(post_mortem).map(|k| format!(" (kept in {k})"));
        let errors: Vec<&str> = std::str::from_utf8(&out.stderr).unwrap_or("").lines().chain(std::str::from_utf8(&out.stdout).unwrap_or("").lines()).filter(|l| l.contains("ERROR")).collect();
        panic!(
            "{what}: qemu-img check {} exit {code}{}:\n{}\n{}{}",
            path.display(),
            kept.unwrap_or_default(),
            errors.join("\n"),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Copies `files` into $THINBLK_CRASH_KEEP (if set), each as thinblk-crash-failed-PID-N-NAME;
/// returns where.
fn keep_files(files: &[&Path]) -> Option<String> {
    let d = std::env::var_os("THINBLK_CRASH_KEEP")?;
    for (i, f) in files.iter().enumerate() {
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let keep = Path::new(&d).join(format!("thinblk-crash-failed-{}-{i}-{name}", std::process::id()));
        let _ = std::fs::copy(f, &keep);
    }
    Some(Path::new(&d).display().to_string())
}

/// The guest contents of the qcow2 image at `path` (its backing chain as its header names
/// it), through `qemu-img convert`; `raw` is a scratch file.
fn guest_view(path: &Path, raw: &Path, what: &str) -> Vec<u8> {
    let out = Command::new("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(path).arg(raw).output().expect("qemu-img convert");
    assert!(out.status.success(), "{what}: qemu-img convert: {}", String::from_utf8_lossy(&out.stderr));
    let mut disk = std::fs::read(raw).expect("read converted");
    disk.resize(DISK as usize, 0);
    let _ = std::fs::remove_file(raw);
    disk
}

/// `qemu-img check` (no corruption; leaks allowed) and the guest contents via `qemu-img convert`.
fn qcow2_oracle(dir: &TestDir, img: &[u8], size: u64, what: &str) -> Vec<u8> {
    let path = dir.path("cut.qcow2");
    put_image(&path, img, size);
    check_image(&path, &[&path], what);
    guest_view(&path, &dir.path("cut.raw"), what)
}

/// A fresh disk of DISK bytes at `path`: qcow2 with `cluster` bytes per cluster, or raw.
fn make_image(path: &Path, cluster: Option<u64>) {
    match cluster {
        Some(cs) => {
            let out = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-o", &format!("cluster_size={cs}")])
                .arg(path)
                .arg(DISK.to_string())
                .output()
                .expect("qemu-img create");
            assert!(out.status.success(), "qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
        }
        None => common::sparse_file(path, DISK),
    }
}

/// With `evict`, the daemon keeps 2 clean refcount blocks instead of 64, so that a 4 MiB
/// disk at 512 B clusters (about 36 blocks) makes it evict and re-read blocks all the time,
/// during write-backs too. Returns how many it evicted (from its log at the clean stop).
const EVICT_ARGS: [&str; 2] = ["--refcount-cache-blocks", "2"];

fn evictions(log: &Path) -> u64 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split("refcount_blocks_evicted=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// One configuration of the host-crash simulation; returns (cuts, sectors checked).
/// With `garbage`, the image file carries 8 MiB of non-zero bytes past the image's end, as a
/// reused LV does: no new cluster is known to read zeroes, so partial writes take clusters the
/// engine zeroed ahead of its bump pointer (docs/qcow2.md).
fn host_crash(cluster: Option<u64>, unmap: bool, evict: bool, garbage: bool, cuts: usize, seed: u64) -> (usize, usize) {
    let name = format!(
        "crashsim-{}-{}{}{}",
        cluster.map(|c| c.to_string()).unwrap_or("raw".into()),
        if unmap { "unmap" } else { "ignore" },
        if evict { "-evict" } else { "" },
        if garbage { "-garbage" } else { "" }
    );
    let dir = TestDir::new(&name);
    let backing = dir.path("backing");
    make_image(&backing, cluster);
    if garbage {
        // From the next 64 KiB on: the image's last cluster (a refcount block) ends in bytes
        // qemu-img left unwritten, which must read zeroes.
        use std::io::Write;
        let len = std::fs::metadata(&backing).expect("image size").len();
        let f = std::fs::OpenOptions::new().write(true).open(&backing).expect("open the image");
        f.set_len(len.next_multiple_of(64 << 10)).expect("pad the image");
        let mut f = std::fs::OpenOptions::new().append(true).open(&backing).expect("open the image to append");
        f.write_all(&vec![0xaa; 8 << 20]).expect("append garbage");
    }
    let base = std::fs::read(&backing).expect("read base");
    let mount = FaultMount::new(&backing, &dir.path("mnt"));
    mount.faults.start_log();
    let disk = mount.disk();
    let format = if cluster.is_some() { "qcow2" } else { "raw" };
    let discard = if unmap { "unmap" } else { "ignore" };
    let mut args = vec!["--image", disk.to_str().unwrap_or_default(), "--format", format, "--num-queues", "2", "--discard", discard, "--journal-dir", dir.0.to_str().unwrap_or_default()];
    if evict {
        args.extend_from_slice(&EVICT_ARGS);
    }
    let daemon_log = dir.path("daemon.log");
    let d = Daemon::start_logging(&dir.path("sock"), &args, Some(&daemon_log));
    let mut w = Workload::new(1);
    let mut rng = Rng(seed);
    {
        let mut c = Client::connect(&d.socket, 2).expect("connect");
        run(&mut c, &mut w, &|| mount.faults.log_len(), &mut rng, 600, 50, &|| false, None);
    }
    common::stop_clean(d);
    if evict {
        let n = evictions(&daemon_log);
        eprintln!("{name}: {n} refcount blocks evicted");
        assert!(n > 0, "{name}: no refcount block was evicted");
    }
    let log = mount.faults.take_log();
    drop(mount);
    assert!(log.iter().filter(|e| matches!(e, LogEvent::Sync)).count() >= 10, "too few syncs in the log");
    if garbage {
        // Zeroed ahead: ranges of 1 MiB, zeroed at once (a zero range, or zeroes written, which
        // FUSE splits into writes of 128 KiB). Nothing else zeroes 64 KiB at once here: with
        // discards ignored, other zeroings cover less than a 4 KiB cluster.
        let ahead: u64 = log
            .iter()
            .map(|e| match e {
                LogEvent::Zero(_, len) if *len >= 64 << 10 => *len,
                LogEvent::Write(_, b) if b.len() >= 64 << 10 && b.iter().all(|&x| x == 0) => b.len() as u64,
                _ => 0,
            })
            .sum();
        eprintln!("{name}: {ahead} bytes zeroed ahead");
        assert!(ahead >= 2 << 20, "{name}: only {ahead} bytes were zeroed ahead");
    }
    let flushes: Vec<&Op> = w.ops.iter().filter(|o| o.kind == Kind::Flush).collect();
    let mut checked = 0;
    let mut with_flush = 0;
    for n in 0..cuts {
        let cut = 1 + rng.below(log.len() as u64) as usize;
        let what = format!("{name} cut {n} at {cut}/{}", log.len());
        let (img, size) = rebuild(&base, base.len() as u64, &log, cut, &mut rng);
        let guest = match cluster {
            Some(_) => qcow2_oracle(&dir, &img, size, &what),
            None => {
                let mut g = img;
                g.resize(DISK as usize, 0);
                g
            }
        };
        // The last FLUSH (by issue) that completed before the cut.
        let flush = flushes.iter().filter(|f| f.done_log <= cut as u64).max_by_key(|f| f.issue_seq);
        if flush.is_some() {
            with_flush += 1;
        }
        checked += verify(&guest, &w, Some(cut as u64), flush.map(|f| f.issue_seq), &what);
    }
    assert!(with_flush > cuts / 2, "{name}: only {with_flush} of {cuts} cuts follow a completed FLUSH");
    eprintln!("{name}: {cuts} crash images, {with_flush} after a completed FLUSH, {checked} sector requirements checked");
    (cuts, checked)
}

#[test]
fn host_crash_simulation_below_the_daemon() {
    // 10 configurations × 130 cuts = 1300 crash images per run.
    let mut total = 0;
    let seed = std::env::var("THINBLK_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_0001u64);
    let only = std::env::var("THINBLK_CRASH_ONLY").ok();
    for (i, cluster) in [Some(512u64), Some(4096), Some(65536), None].into_iter().enumerate() {
        for unmap in [false, true] {
            let tag = format!("{}-{}", cluster.map(|c| c.to_string()).unwrap_or("raw".into()), if unmap { "unmap" } else { "ignore" });
            if only.as_ref().is_some_and(|o| *o != tag) {
                total += 130;
                continue;
            }
            total += host_crash(cluster, unmap, false, false, 130, seed + i as u64 * 2 + unmap as u64).0;
        }
    }
    // Refcount-cache eviction (issue 19): 512 B clusters with a cache of 2 blocks. (4 KiB
    // clusters cannot reach it on this 4 MiB disk: one refcount block covers 8 MiB.)
    if only.as_ref().is_none_or(|o| o == "512-unmap-evict") {
        total += host_crash(Some(512), true, true, false, 130, seed + 100).0;
    }
    // Zeroing ahead: 4 KiB clusters (a 1 MiB range is 256 of them) over a tail of garbage.
    if only.as_ref().is_none_or(|o| o == "4096-ignore-garbage") {
        total += host_crash(Some(4096), false, false, true, 130, seed + 200).0;
    }
    assert!(total >= 1000);
}

/// Reads the whole disk through the daemon.
fn read_disk(socket: &Path) -> Vec<u8> {
    let mut c = Client::connect(socket, 1).expect("connect after restart");
    let mut disk = Vec::with_capacity(DISK as usize);
    for off in (0..DISK).step_by(1 << 20) {
        disk.extend(c.read(0, off, 1 << 20).expect("read back"));
    }
    disk
}

fn daemon_crash(cluster: Option<u64>, evict: bool, seed: u64) {
    let name = format!("daemoncrash-{}{}", cluster.map(|c| c.to_string()).unwrap_or("raw".into()), if evict { "-evict" } else { "" });
    let dir = TestDir::new(&name);
    let image = dir.path("image");
    make_image(&image, cluster);
    let format = if cluster.is_some() { "qcow2" } else { "raw" };
    let mut args = vec!["--image", image.to_str().unwrap_or_default(), "--format", format, "--num-queues", "2", "--discard", "unmap", "--journal-dir", dir.0.to_str().unwrap_or_default()];
    if evict {
        args.extend_from_slice(&EVICT_ARGS);
    }
    let daemon_log = dir.path("daemon.log");
    let mut rng = Rng(seed);
    let mut all = Workload::new(1);
    for round in 0..3 {
        let mut d = Daemon::start_logging(&dir.path("sock"), &args, Some(&daemon_log));
        {
            let mut c = Client::connect(&d.socket, 2).expect("connect");
            let at = 150 + rng.below(150) as usize;
            let mut kill = || {
                d.signal(libc::SIGKILL);
                let _ = d.wait_exit(Duration::from_secs(10));
            };
            // No FLUSH at all: only the daemon-crash contract keeps these.
            run(&mut c, &mut all, &|| 0, &mut rng, usize::MAX, 0, &|| false, Some((at, &mut kill)));
        }
        drop(d);
        let d = Daemon::start_logging(&dir.path("sock"), &args, Some(&daemon_log));
        let disk = read_disk(&d.socket);
        // Every completed request must be there (or what a later, uncompleted one left). The
        // requests the kill cut off stay in the history: later rounds may still see them.
        let checked = verify(&disk, &all, None, Some(u64::MAX), &format!("{name} round {round}"));
        let lost = all.ops.iter().filter(|o| o.done_seq.is_none()).count();
        eprintln!("{name} round {round}: {} requests ({lost} cut off by SIGKILL), {checked} sectors checked after the restart", all.ops.len());
        assert!(checked > 500, "{name}: too few sectors written to mean anything ({checked})");
        common::stop_clean(d);
    }
    if evict {
        // Only the clean stops log their count, and they only read: the killed daemons ran
        // the workload whose evictions the host-crash configuration counts.
        eprintln!("{name}: {} refcount blocks evicted by the clean stops", evictions(&daemon_log));
    }
    if cluster.is_some() {
        let out = Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&image).output().expect("qemu-img check");
        // Leaks (exit 3) are allowed: allocations the kill cut off before their link.
        let code = out.status.code();
        assert!(code == Some(0) || code == Some(3), "{name}: qemu-img check exit {code:?}: {}", String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn daemon_crash_loses_no_completed_write() {
    for (i, cluster) in [Some(65536u64), Some(512), None].into_iter().enumerate() {
        daemon_crash(cluster, false, 0xdead_0000 + i as u64);
    }
    // Refcount-cache eviction (issue 19), as in the host-crash simulation.
    daemon_crash(Some(512), true, 0xdead_0100);
}

/// A qcow2 image of DISK bytes at `path` with `cluster`-byte clusters, over `backing` (a
/// qcow2 named as given) when there is one.
fn make_layer(path: &Path, cluster: u64, backing: Option<&Path>) {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-o", &format!("cluster_size={cluster}")]);
    if let Some(b) = backing {
        cmd.args(["-u", "-F", "qcow2", "-b"]).arg(b);
    }
    let out = cmd.arg(path).arg(DISK.to_string()).output().expect("qemu-img create");
    assert!(out.status.success(), "qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
}

/// The chain of a live merge under test. The files the merge changes each sit on a fixture
/// in log-writes mode (one file per mount): the base, and the top the guest writes. The
/// middle layer is a plain file, written before the logs start and never after. Fields drop
/// in order: the daemon, then the mounts, then the directory holding their backing files.
struct MergeRig {
    daemon: Option<Daemon>,
    base: Option<FaultMount>,
    top: Option<FaultMount>,
    dir: TestDir,
}

/// One file's log split for [`rebuild`]: the events, and their process-wide numbers.
struct FileLog {
    /// The file as it was when its log started, without the zeroes at its end (the engine
    /// grows a file far ahead of its data: rebuilt whole, each crash image took 128 MiB).
    start: Vec<u8>,
    start_len: u64,
    seqs: Vec<u64>,
    events: Vec<LogEvent>,
}

impl FileLog {
    fn new(mut start: Vec<u8>, log: Vec<(u64, LogEvent)>) -> FileLog {
        let start_len = start.len() as u64;
        start.truncate(start.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1));
        let (seqs, events) = log.into_iter().unzip();
        FileLog { start, start_len, seqs, events }
    }

    /// The file as a power loss right before event number `cut` (of the whole process) could
    /// leave it: its own events numbered below `cut`, all of them up to its own last sync
    /// among those (a sync covers only its own file), a random half of the later ones.
    fn at(&self, cut: u64, rng: &mut Rng) -> (Vec<u8>, u64) {
        rebuild(&self.start, self.start_len, &self.events, self.seqs.partition_point(|&s| s < cut), rng)
    }
}

/// Whether the rebuilt image `img` (`size` bytes) carries thinblk's MERGED mark the way a
/// read-write open by thinblk honours it (a current owner extension of a version 3 image):
/// then a restart serves its base instead.
fn marked_merged(img: &[u8], size: u64) -> bool {
    use thinblk_qcow2::header::autoclear;
    let h = thinblk_qcow2::Header::parse(img, size.max(img.len() as u64)).expect("the old top's header parses");
    h.version >= 3 && h.autoclear_features & autoclear::THINBLK != 0 && h.owner.is_some_and(|o| o.flags & thinblk_qcow2::Owner::MERGED != 0)
}

/// The backing file name the rebuilt image `img` gives.
fn backing_name(img: &[u8], size: u64) -> Option<String> {
    thinblk_qcow2::Header::parse(img, size.max(img.len() as u64)).expect("the top's header parses").backing_file
}

/// Tells the workload the merge's driver ended when dropped (the merge concluded, or the
/// driver panicked).
struct Done(Arc<AtomicBool>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn merge_job(ctl_sock: &Path) -> serde_json::Value {
    let jobs = common::ctl(ctl_sock, "query-jobs", serde_json::json!({}));
    jobs.as_array().and_then(|a| a.iter().find(|j| j["id"] == "merge").cloned()).unwrap_or_default()
}

/// Waits until the merge job's status is `status`; returns the job.
fn wait_job(ctl_sock: &Path, status: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let j = merge_job(ctl_sock);
        if j["status"] == status || j["status"] == "concluded" {
            return j;
        }
        assert!(Instant::now() < deadline, "the merge did not become {status}: {j}");
        // Not faster: a control connection's slot is free only ~200 ms after it closed.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Drives the merge from the control socket while the test thread's workload writes: starts
/// it, slowed so that the copy takes about `copy` and the workload overlaps all of it; an
/// active commit then runs at full speed (slowed, it never catches up with this workload),
/// turns ready, mirrors for a while and pivots. Returns the concluded job and the event
/// numbers at its start and its end.
fn drive_merge(ctl_sock: PathBuf, args: serde_json::Value, active: bool, copy: Duration, done: Arc<AtomicBool>) -> std::thread::JoinHandle<(serde_json::Value, u64, u64)> {
    std::thread::spawn(move || {
        let _done = Done(done);
        std::thread::sleep(Duration::from_millis(100));
        let start = faultfs::global_seq();
        // Started at a crawl: its total is known at once, the speed follows from it.
        let mut args = args;
        args["job-id"] = "merge".into();
        args["speed"] = 16384.into();
        common::ctl(&ctl_sock, "commit", args);
        let total = merge_job(&ctl_sock)["total-progress"].as_u64().unwrap_or(0);
        let speed = ((total as f64 / copy.as_secs_f64()) as u64).max(65536);
        common::ctl(&ctl_sock, "job-set-speed", serde_json::json!({"id": "merge", "speed": speed}));
        if active {
            let deadline = Instant::now() + Duration::from_secs(120);
            while merge_job(&ctl_sock)["current-progress"].as_u64().unwrap_or(0) < total {
                assert!(Instant::now() < deadline, "the active commit did not copy what the top held: {}", merge_job(&ctl_sock));
                std::thread::sleep(Duration::from_millis(50));
            }
            common::ctl(&ctl_sock, "job-set-speed", serde_json::json!({"id": "merge", "speed": 0}));
            let j = wait_job(&ctl_sock, "ready");
            assert_eq!(j["status"], "ready", "{j}");
            // Mirroring the workload for a while, then the pivot while it writes.
            std::thread::sleep(Duration::from_millis(400));
            common::ctl(&ctl_sock, "job-complete", serde_json::json!({"id": "merge"}));
        }
        let j = wait_job(&ctl_sock, "concluded");
        (j, start, faultfs::global_seq())
    })
}

/// One host-crash simulation of a live merge: the chain base ← mid ← top (base and top on
/// fixtures in log-writes mode), the workload writing to the top while `ctl commit` merges
/// mid into base (internal) or top and mid into base and pivots (active). Returns (cuts,
/// sectors checked).
fn merge_crash(cluster: u64, active: bool, random_cuts: usize, seed: u64) -> (usize, usize) {
    let name = format!("crashmerge-{}-{cluster}", if active { "active" } else { "internal" });
    let began = Instant::now();
    let dir = TestDir::new(&name);
    // Absolute backing names across the mounts: the files keep these names when the crash
    // images are rebuilt (the mountpoints are plain directories again by then).
    let (base_disk, top_disk, mid) = (dir.path("mnt-base").join("disk"), dir.path("mnt-top").join("disk"), dir.path("mid.qcow2"));
    let (base_file, top_file) = (dir.path("base.img"), dir.path("top.img"));
    make_layer(&base_file, cluster, None);
    make_layer(&top_file, cluster, Some(&mid));
    let mut rig = MergeRig {
        daemon: None,
        base: Some(FaultMount::new(&base_file, &dir.path("mnt-base"))),
        top: Some(FaultMount::new(&top_file, &dir.path("mnt-top"))),
        dir,
    };
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_string();
    let ctl_sock = rig.dir.path("ctl.sock");
    let journal = path(&rig.dir.0);
    let args = [
        "--image", &path(&base_disk), "--format", "qcow2", "--num-queues", "2", "--discard", "unmap",
        "--backing-files", "any", "--control", &path(&ctl_sock), "--journal-dir", &journal,
    ];
    rig.daemon = Some(Daemon::start_logging(&rig.dir.path("sock"), &args, Some(&rig.dir.path("daemon.log"))));
    let socket = rig.dir.path("sock");
    let mut w = Workload::new(1);
    let mut rng = Rng(seed);
    let clock = faultfs::global_seq;
    let mut c = Client::connect(&socket, 2).expect("connect");
    // What the merge copies: the base's data under the middle layer's, written through the
    // served chain before the logs start (the middle layer is final once it is not the top).
    run(&mut c, &mut w, &clock, &mut rng, 150, 50, &|| false, None);
    make_layer(&mid, cluster, Some(&base_disk));
    common::ctl(&ctl_sock, "snapshot", serde_json::json!({"overlay": path(&mid)}));
    run(&mut c, &mut w, &clock, &mut rng, 200, 50, &|| false, None);

    // Logging from here: the files as they are now (nothing writes them until the snapshot),
    // then every event. Crash points start once the snapshot made the top.
    let base_start = std::fs::read(&base_file).expect("read base");
    let top_start = std::fs::read(&top_file).expect("read top");
    let mounts = [rig.base.as_ref(), rig.top.as_ref()].map(|m| m.expect("mounted"));
    for m in mounts {
        m.faults.start_log();
    }
    common::ctl(&ctl_sock, "snapshot", serde_json::json!({"overlay": path(&top_disk)}));
    let from = faultfs::global_seq();

    let done = Arc::new(AtomicBool::new(false));
    let merge_args = if active {
        serde_json::json!({"top": path(&top_disk), "base": path(&base_disk)})
    } else {
        serde_json::json!({"top": path(&mid), "base": path(&base_disk)})
    };
    let driver = drive_merge(ctl_sock.clone(), merge_args, active, Duration::from_millis(1500), done.clone());
    let during = w.ops.len();
    // Paced: a few hundred requests a second keep the logs (and each rebuild) small.
    w.pace = Duration::from_millis(2);
    run(&mut c, &mut w, &clock, &mut rng, 0, 50, &|| !done.load(Ordering::SeqCst), None);
    let (job, merge_start, merge_end) = driver.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
    assert_eq!(job["outcome"], "completed", "{name}: {job}");
    let after = w.ops.len();
    run(&mut c, &mut w, &clock, &mut rng, 300, 50, &|| false, None);
    drop(c);
    let status = common::ctl(&ctl_sock, "query-status", serde_json::json!({}));
    let served: Vec<String> = status["chain"].as_array().expect("chain").iter().filter_map(|v| v.as_str().map(String::from)).collect();
    let want = if active { vec![path(&base_disk)] } else { vec![path(&top_disk), path(&base_disk)] };
    assert_eq!(served, want, "{name}: the chain after the merge");
    common::stop_clean(rig.daemon.take().expect("daemon"));
    let logs = mounts.map(|m| m.faults.take_numbered_log());
    // Unmounted: the mountpoints take the rebuilt files under the same names.
    drop(rig.top.take());
    drop(rig.base.take());
    let [base_log, top_log] = logs;
    let files = [FileLog::new(base_start, base_log), FileLog::new(top_start, top_log)];
    let overlapped = w.ops[during..after].iter().filter(|o| o.issue_log > merge_start && o.done_log < merge_end).count();
    eprintln!(
        "{name}: {} requests in {:.1} s, {} during the merge ({overlapped} inside it), {} + {} events, merge events {merge_start}..{merge_end}: {job}",
        w.ops.len(),
        began.elapsed().as_secs_f64(),
        after - during,
        files[0].events.len(),
        files[1].events.len()
    );
    assert!(overlapped > 20, "{name}: the workload hardly overlapped the merge");

    // Cut points: random events after the snapshot, and around each event that orders the
    // merge: the base's syncs and writes into its first cluster (its header) once the merge
    // started, and the top's writes that change which chain its header gives (the backing
    // name, the merged mark), with the sync that follows each.
    let mut all: Vec<u64> = files.iter().flat_map(|f| f.seqs.iter().copied()).collect();
    all.sort_unstable();
    let first = all.partition_point(|&s| s < from);
    assert!(all.len() > first + 100, "{name}: too few events after the snapshot");
    // A quarter of them after the merge (the merged chain serving), where fewer events are.
    let after_merge = all.partition_point(|&s| s < merge_end);
    let mut cuts: Vec<u64> = (0..random_cuts)
        .map(|k| {
            let from = if k % 4 == 3 && after_merge < all.len() { after_merge } else { first };
            all[from + rng.below((all.len() - from) as u64) as usize] + 1
        })
        .collect();
    let random = cuts.len();
    for (&s, e) in files[0].seqs.iter().zip(&files[0].events) {
        let ordering = match e {
            LogEvent::Sync => true,
            LogEvent::Write(off, _) => *off < cluster,
            _ => false,
        };
        if s >= merge_start && s <= merge_end && ordering {
            cuts.extend([s, s + 1]);
        }
    }
    let mut head = files[1].start.clone();
    head.resize(cluster as usize, 0);
    let chain_of = |h: &[u8]| (backing_name(h, 1 << 40), marked_merged(h, 1 << 40));
    let mut was = chain_of(&head);
    for (k, (&s, e)) in files[1].seqs.iter().zip(&files[1].events).enumerate() {
        let LogEvent::Write(off, data) = e else { continue };
        if *off >= cluster {
            continue;
        }
        let end = (*off as usize + data.len()).min(head.len());
        head[*off as usize..end].copy_from_slice(&data[..end - *off as usize]);
        let now = chain_of(&head);
        if now != was {
            let synced = files[1].events[k..].iter().position(|e| matches!(e, LogEvent::Sync)).map(|j| files[1].seqs[k + j] + 1);
            cuts.extend([s, s + 1].into_iter().chain(synced));
            eprintln!("{name}: the top's header changes at event {s}: {was:?} -> {now:?}");
            was = now;
        }
    }
    cuts.push(all.last().map(|s| s + 1).unwrap_or(0));

    let flushes: Vec<&Op> = w.ops.iter().filter(|o| o.kind == Kind::Flush).collect();
    let (mut checked, mut with_flush, mut on_new_chain) = (0, 0, 0);
    for (n, &cut) in cuts.iter().enumerate() {
        let what = format!("{name} cut {n} before event {cut} (merge {merge_start}..{merge_end})");
        let (base_img, base_size) = files[0].at(cut, &mut rng);
        let (top_img, top_size) = files[1].at(cut, &mut rng);
        put_image(&base_disk, &base_img, base_size);
        put_image(&top_disk, &top_img, top_size);
        let chain: [&Path; 3] = [&top_disk, &mid, &base_disk];
        check_image(&base_disk, &chain, &what);
        check_image(&top_disk, &chain, &what);
        if n == 0 {
            // Never written while logged: once is enough (its backing file is there now).
            check_image(&mid, &chain, &format!("{name}: the middle layer"));
        }
        // What a restart serves: the top the management knows of; a thinblk started on an
        // old top marked merged refuses it, so its base then (the mark is synced before the
        // base takes any guest write, and the base holds every earlier one).
        let serve = if active && marked_merged(&top_img, top_size) {
            on_new_chain += 1;
            &base_disk
        } else {
            if !active && backing_name(&top_img, top_size).is_some_and(|b| b == path(&base_disk)) {
                on_new_chain += 1;
            }
            &top_disk
        };
        let _keep = KeepOnPanic(&chain);
        let guest = guest_view(serve, &rig.dir.path("cut.raw"), &what);
        let flush = flushes.iter().filter(|f| f.done_log <= cut).max_by_key(|f| f.issue_seq);
        if flush.is_some() {
            with_flush += 1;
        }
        checked += verify(&guest, &w, Some(cut), flush.map(|f| f.issue_seq), &what);
    }
    let n = cuts.len();
    assert!(with_flush > n / 2, "{name}: only {with_flush} of {n} cuts follow a completed FLUSH");
    assert!(on_new_chain > 0 && on_new_chain < n, "{name}: {on_new_chain} of {n} cuts on the merged chain");
    eprintln!(
        "{name}: {n} crash images ({} aimed at the merge's ordering), {with_flush} after a completed FLUSH, {on_new_chain} on the merged chain, {checked} sector requirements checked; {:.1} s in all",
        n - random - 1,
        began.elapsed().as_secs_f64()
    );
    (n, checked)
}

/// Keeps the chain's files (THINBLK_CRASH_KEEP) if dropped by a panic.
struct KeepOnPanic<'a>(&'a [&'a Path]);

impl Drop for KeepOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(k) = keep_files(self.0) {
                eprintln!("the crash image's chain is kept in {k}");
            }
        }
    }
}

#[test]
fn host_crash_during_a_live_merge() {
    let seed = std::env::var("THINBLK_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_0001u64);
    let only = std::env::var("THINBLK_CRASH_ONLY").ok();
    let mut total = 0;
    for (i, cluster) in [65536u64, 4096].into_iter().enumerate() {
        for active in [false, true] {
            let tag = format!("merge-{}-{cluster}", if active { "active" } else { "internal" });
            if only.as_ref().is_some_and(|o| *o != tag) {
                continue;
            }
            total += merge_crash(cluster, active, 80, seed + 200 + i as u64 * 2 + active as u64).0;
        }
    }
    assert!(only.is_some() || total >= 400, "{total} crash images");
}

//! Chain operations under a real guest: QEMU (TCG, 512 MiB, vhost-user-blk-pci with two
//! queues and `reconnect-ms`) runs a verifying fio on ext4 (tests/vm/guest-init,
//! `thinblk_test=chain`) for the whole test, round after round, while the host changes the
//! chain of the disk thinblk serves. The disk is 1 GiB virtual on thin "LVs": loop devices
//! over files under `volumes/<domain>/<uuid>` linked as `sd/<uuid>` (as `/dev/<vg>/<lv>`),
//! each overlay made with `qemu-img create -u -b <parent uuid> -F qcow2` (bare UUIDs, as
//! vdsm writes them), grown by `thinblk spm --backend file` through the mailbox. The guest
//! stops when the host writes `STOP` into a second, small disk (QEMU's own virtio-blk), then
//! reads every file back cold, checks dmesg for IO errors and runs e2fsck; it prints PASS or
//! FAIL on its console.
//!
//! [`snapshots_and_merges_under_a_verifying_guest`]:
//! 1. three online snapshots (`ctl snapshot` with `volume-uuid`): chain
//!    `v3 → v2 → v1 → v0`; after each, `query-status` shows the chain and the thin volume;
//! 2. an internal commit of `v2` into `v1` (`base-volume-uuid` v1), run to completion: chain
//!    `v3 → v1 → v0`, `v3` names `v1`;
//! 3. a commit of `v1` into `v0` at 512 KiB/s, cancelled while running: the chain in
//!    `query-status`, each backing layer's `qemu-img info` and what the chain reads are as
//!    before;
//! 4. (with [`ACTIVE_COMMIT`], on since active commit landed) an active commit of `v3`
//!    into `v1`: `ready`, then `job-complete` pivots: `query-status` chain `v1 → v0`, the
//!    thin control follows `v1`; once the guest is off, thinblk refuses to serve `v3`
//!    read-write and serves `v1` after a restart;
//! 5. the guest's verdict is PASS; every image checks clean; a raw export of the final
//!    chain passes the host's e2fsck.
//!
//! What is compared with qemu-img (`qemu-img compare` reads a whole chain: equal guest-visible
//! content, whatever the allocation):
//! - the internal commit: before it, `v0`, `v1` and `v2` are backing layers (read-only,
//!   closed clean at their snapshots, nothing writes them), so byte copies of their volumes
//!   are what thinblk merges. `qemu-img commit` of the copy of `v2` into the copy of `v1`
//!   is the oracle. Once the job completed, thinblk's `v1` (its chain `v1 → v0`), which
//!   nothing writes any more, must read exactly as the oracle's `v1` (`v1 → v0` copies).
//! - the cancelled commit: thinblk's `v1` chain again against the same oracle (the cancel
//!   may leave copied clusters in `v0`, but the chain must read as before).
//! - the active commit: copies of `v1` and `v0` taken before it starts (backing layers
//!   then); at `ready` the disk is frozen (`ctl freeze`: writes held, metadata written back,
//!   files synced) and `v3` copied; `qemu-img commit` of that copy into the copy of `v1` is
//!   the oracle; `job-complete` runs while frozen, thinblk's new top `v1` is written back by
//!   a second freeze and compared, still frozen, with the oracle's `v1`; then thawed.
//! - the end (without step 4): the guest has powered off and the daemon stopped; a copy of
//!   the final top `v3` put over the oracle's merged `v1` and copied `v0` must read exactly as
//!   thinblk's chain `v3 → v1 → v0`.
//!
//! [`commits_killed_at_random_points_under_a_verifying_guest`]: chain `v2 → v1 → v0` made by
//! two snapshots; five times a commit of `v1` into `v0` is started (slowed so that it takes
//! about three seconds), the daemon SIGKILLed at a random moment of it (seeded; the seed is
//! printed and `THINBLK_CHAIN_SEED` sets it) and started again on the same top while the
//! guest waits (`reconnect-ms`). While it is down: `qemu-img check` of `v0` is clean or finds
//! leaks only (exit 3, no corruption), and a copy repaired with `-r leaks` checks clean,
//! which proves they were leaks; thinblk's chain `v1 → v0` reads exactly as copies of `v1`
//! and `v0` taken before the first commit. A sixth kill is aimed at the finish (the job
//! polled until it leaves `running`, then a random 0-149 ms): whether the rebase of `v2`
//! happened or not, the same checks hold (`v0` alone read against the oracle's merged `v0`
//! if it did). Then a commit runs to completion (unless the sixth kill came after the
//! rebase): thinblk's `v0` reads exactly as `qemu-img commit` of those copies and checks
//! clean; the guest passes; every image checks clean; the final chain reads as a copy of
//! its top over the oracle's `v0`.
//!
//! Each test prints a `CHAIN-GUEST-REPORT` line: snapshot pauses (the replies' `pause-us`),
//! commit durations, the guest's fio write rate, and for the kill test the kill points, the
//! leaks found and the time from each SIGKILL to the first request the new daemon served.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::vm::{assert_pass, assets, qemu_tcg, tail, VERDICT};
use common::{ctl, log_time_ms, s, Daemon, LoopDev, Rng, TestDir};

/// Step 4 of the first test, the active commit (`ctl commit` with the active top, `ready`,
/// `ctl job-complete`): on since active commit landed on main. `THINBLK_CHAIN_ACTIVE=1` runs
/// the step even where this is false.
const ACTIVE_COMMIT: bool = true;

const MIB: u64 = 1 << 20;
const DOMAIN: &str = "3c8f0e7a-52d1-4f0b-9a6e-0d4b7c2e9f11";
/// The volumes of a test's chain, v0 (the base) first.
const VOLS: [&str; 4] = [
    "a1f3c5e7-0b2d-4e6f-8a1c-3e5f7a9b1c2d",
    "b2e4d6f8-1c3e-4f70-9b2d-4f6a8b0c2d3e",
    "c3f5e7a9-2d4f-4081-8c3e-5a7b9c1d3e4f",
    "d4a6f8b0-3e50-4192-9d4f-6b8c0d2e4f50",
];
/// A new top's volume: small enough that the SPM grows it during its first fio round
/// (extensions start once less than half a 64 MiB chunk is free).
const OVERLAY_MIB: u64 = 40;
/// The mailbox host id of the daemon (its lock file is in the test's directory).
const HOST_ID: &str = "4";
/// Booting, and a fio round under TCG (daemon restarts included).
const BOOT_LIMIT: Duration = Duration::from_secs(150);
const ROUND_LIMIT: Duration = Duration::from_secs(90);
/// From STOP to the guest's poweroff (the round running, the cold read, e2fsck).
const FINISH_LIMIT: Duration = Duration::from_secs(180);

/// One guest at a time: the two tests of this file would otherwise run theirs together.
static ONE_GUEST: Mutex<()> = Mutex::new(());

/// Runs qemu-img; returns its exit code and stdout (stderr appended).
fn qemu_img_status(args: &[&str]) -> (i32, String) {
    let out = Command::new("qemu-img").args(args).output().expect("run qemu-img");
    (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Runs qemu-img, which must succeed; returns its stdout and stderr.
fn qemu_img_all(args: &[&str]) -> String {
    let (code, text) = qemu_img_status(args);
    assert_eq!(code, 0, "qemu-img {args:?}: {text}");
    text
}

/// `qemu-img info` of one image (no chain), as JSON.
fn info(image: &Path) -> Value {
    serde_json::from_str(&qemu_img_all(&["info", "-U", "--output=json", s(image)])).expect("qemu-img info json")
}

/// Copies a volume's file byte for byte (holes kept) to `to`.
fn copy_volume(from: &Path, to: &Path) {
    let st = Command::new("cp").arg("--sparse=always").arg(from).arg(to).status().expect("run cp");
    assert!(st.success(), "cp {} {}", from.display(), to.display());
}

/// `qemu-img compare` of two chains (their tops); both must read the same.
fn assert_same_chain(ours: &Path, oracle: &Path, what: &str) {
    let (code, text) = qemu_img_status(&["compare", "-U", "-f", "qcow2", "-F", "qcow2", s(oracle), s(ours)]);
    assert_eq!(code, 0, "{what}: thinblk's {} does not read as qemu-img's {}: {text}", ours.display(), oracle.display());
}

/// `qemu-img check` must find nothing (exit 0).
fn assert_clean(image: &Path, force_share: bool) {
    let mut args = vec!["check"];
    if force_share {
        args.push("-U");
    }
    args.push(s(image));
    let (code, text) = qemu_img_status(&args);
    assert!(code == 0 && text.contains("No errors were found"), "qemu-img check {} (exit {code}): {text}", image.display());
}

/// Whatever the guest wrote: a fio round's write rate in KiB/s, from `write-bw=12.3MiB/s`.
fn parse_bw(v: &str) -> Option<f64> {
    let v = v.trim().strip_suffix("/s")?;
    let split = v.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "B" => n / 1024.0,
        "KiB" => n,
        "MiB" => n * 1024.0,
        "GiB" => n * 1024.0 * 1024.0,
        _ => return None,
    })
}

/// The guest's rounds so far: (round, write KiB/s).
fn rounds_on(console: &str) -> Vec<(u32, Option<f64>)> {
    console
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("guest: round ")?;
            let n = rest.split_whitespace().next()?.parse().ok()?;
            let bw = rest.split("write-bw=").nth(1).and_then(parse_bw);
            Some((n, bw))
        })
        .collect()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// A thin "LV": a loop device over `volumes/<domain>/<uuid>`, linked as `sd/<uuid>`.
struct Volume {
    uuid: &'static str,
    file: PathBuf,
    link: PathBuf,
    _dev: LoopDev,
}

/// QEMU, killed when dropped.
struct Guest {
    child: Child,
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The test's world. Dropped in field order: QEMU, the daemon, the SPM, the loop devices,
/// then the directory.
struct Rig {
    guest: Option<Guest>,
    daemon: Option<Daemon>,
    _spm: Daemon,
    vols: Vec<Volume>,
    assets: PathBuf,
    sock: PathBuf,
    ctl_sock: PathBuf,
    log: PathBuf,
    console: PathBuf,
    control_disk: PathBuf,
    /// The daemon's arguments for the current top.
    args: Vec<String>,
    dir: TestDir,
}

impl Rig {
    /// The mailbox, the SPM, and the base volume `v0` (`base_mib`) with no backing.
    fn new(name: &str, base_mib: u64) -> Rig {
        let dir = TestDir::new(name);
        let (inbox, outbox) = (dir.path("inbox"), dir.path("outbox"));
        common::sparse_file(&inbox, 16 * MIB);
        common::sparse_file(&outbox, 16 * MIB);
        std::fs::create_dir_all(dir.path("volumes").join(DOMAIN)).expect("volumes dir");
        std::fs::create_dir_all(dir.path("sd")).expect("sd dir");
        std::fs::create_dir_all(dir.path("oracle")).expect("oracle dir");
        let spm = common::spm_process(&inbox, &outbox, &dir.path("volumes"), &[], Some(&dir.path("spm.log")));
        let control_disk = dir.path("control.raw");
        common::sparse_file(&control_disk, MIB);
        let mut rig = Rig {
            guest: None,
            daemon: None,
            _spm: spm,
            vols: Vec::new(),
            assets: assets(),
            sock: dir.path("vhost.sock"),
            ctl_sock: dir.path("ctl.sock"),
            log: dir.path("daemon.log"),
            console: dir.path("console.log"),
            control_disk,
            args: Vec::new(),
            dir,
        };
        rig.add_volume(0, base_mib * MIB);
        rig
    }

    /// Volume `VOLS[k]` of `size` bytes holding a 1 GiB qcow2 whose backing is `VOLS[k-1]`.
    fn add_volume(&mut self, k: usize, size: u64) -> PathBuf {
        let uuid = VOLS[k];
        let file = self.dir.path("volumes").join(DOMAIN).join(uuid);
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if k > 0 {
            args.extend(["-u", "-b", VOLS[k - 1], "-F", "qcow2"]);
        }
        args.extend([s(&file), "1G"]);
        qemu_img_all(&args);
        std::fs::OpenOptions::new().write(true).open(&file).and_then(|f| f.set_len(size)).expect("size the volume");
        let dev = LoopDev::attach(&file);
        let link = self.dir.path("sd").join(uuid);
        std::os::unix::fs::symlink(&dev.0, &link).expect("link the volume");
        self.vols.push(Volume { uuid, file, link: link.clone(), _dev: dev });
        link
    }

    fn vol(&self, k: usize) -> &Volume {
        &self.vols[k]
    }

    fn link(&self, k: usize) -> PathBuf {
        self.vols[k].link.clone()
    }

    /// The daemon's arguments serving `VOLS[top]` as the top.
    fn set_top(&mut self, top: usize) {
        let d = &self.dir;
        self.args = [
            "--image", s(&self.vols[top].link), "--format", "qcow2", "--backing-files", "devices",
            "--control", s(&self.ctl_sock), "--num-queues", "2", "--serial", "chain-data",
            "--thin", "--spec-sizing", "--chunk-mb", "64", "--utilization-percent", "50",
            "--spm-inbox", s(&d.path("inbox")), "--spm-outbox", s(&d.path("outbox")), "--host-id", HOST_ID,
            "--domain-uuid", DOMAIN, "--volume-uuid", VOLS[top], "--mailbox-lock", s(&d.path("host.lock")),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
    }

    /// Starts the daemon on the current arguments and waits for its control socket.
    fn start_daemon(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.daemon = Some(Daemon::start_logging(&self.sock, &args, Some(&self.log)));
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&self.ctl_sock).is_err() {
            assert!(Instant::now() < deadline, "no control socket");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the daemon; returns the wall-clock millisecond of the kill.
    fn kill_daemon(&mut self) -> u64 {
        let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        if let Some(mut d) = self.daemon.take() {
            let _ = d.child.kill();
            let _ = d.child.wait();
        }
        at
    }

    /// Boots the guest (the daemon must be serving).
    fn boot(&mut self) {
        let initrd = self.assets.join("initramfs-fio.cpio.gz");
        let mut qemu = qemu_tcg(&self.assets, &initrd, "console=ttyS0 panic=-1 loglevel=4 thinblk_test=chain thinblk_rounds=80", &self.console);
        qemu.args(["-m", "512M", "-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-numa", "node,memdev=mem"])
            .arg("-chardev")
            .arg(format!("socket,id=blk0,path={},reconnect-ms=1000", self.sock.display()))
            .args(["-device", "vhost-user-blk-pci,chardev=blk0,num-queues=2"])
            .arg("-drive")
            .arg(format!("file={},format=raw,if=none,id=ctl0,readonly=on", self.control_disk.display()))
            .args(["-device", "virtio-blk-pci,drive=ctl0,serial=chain-ctl"]);
        let out = std::fs::File::create(self.dir.path("qemu.log")).expect("qemu log");
        qemu.stdout(Stdio::from(out.try_clone().expect("qemu log"))).stderr(Stdio::from(out));
        let child = qemu.spawn().unwrap_or_else(|e| panic!("qemu-system-x86_64 not runnable ({e}): .ci/run installs it"));
        self.guest = Some(Guest { child });
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// The last round the guest finished.
    fn rounds(&self) -> u32 {
        rounds_on(&self.console()).iter().map(|r| r.0).max().unwrap_or(0)
    }

    /// Waits until the guest has finished round `n`; fails at once if it gave a verdict or
    /// QEMU exited.
    fn wait_round(&mut self, n: u32, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.console();
            if rounds_on(&text).iter().any(|r| r.0 >= n) {
                return;
            }
            let exited = self.guest.as_mut().map(|g| matches!(g.child.try_wait(), Ok(Some(_)))).unwrap_or(true);
            assert!(!exited && !text.contains(VERDICT), "the guest stopped before round {n}:\n{}", tail(&text));
            assert!(Instant::now() < deadline, "round {n} not done within {limit:?}:\n{}", tail(&text));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for `more` rounds after the current one.
    fn wait_rounds(&mut self, more: u32) {
        let n = self.rounds() + more;
        self.wait_round(n, ROUND_LIMIT * more);
    }

    /// Tells the guest to stop after its round; waits for its poweroff and asserts PASS.
    /// Returns the console.
    fn finish_guest(&mut self) -> String {
        let f = std::fs::OpenOptions::new().write(true).open(&self.control_disk).expect("control disk");
        f.write_all_at(b"STOP\n", 0).expect("write STOP");
        drop(f);
        let deadline = Instant::now() + FINISH_LIMIT;
        let mut guest = self.guest.take().expect("a guest");
        loop {
            if let Ok(Some(_)) = guest.child.try_wait() {
                break;
            }
            assert!(Instant::now() < deadline, "the guest did not power off:\n{}", tail(&self.console()));
            std::thread::sleep(Duration::from_millis(200));
        }
        drop(guest);
        let text = self.console();
        assert_pass(&text);
        text
    }

    fn chain(&self) -> Vec<String> {
        let st = ctl(&self.ctl_sock, "query-status", json!({}));
        st["chain"].as_array().expect("chain").iter().filter_map(|v| v.as_str().map(String::from)).collect()
    }

    /// The chain of links for volumes `ks` (top first), as `query-status` shows it.
    fn links(&self, ks: &[usize]) -> Vec<String> {
        ks.iter().map(|&k| s(&self.vols[k].link).to_string()).collect()
    }

    fn thin_volume(&self) -> String {
        let st = ctl(&self.ctl_sock, "query-status", json!({}));
        st["thin"]["volume"].as_str().unwrap_or_default().to_string()
    }

    /// Takes a snapshot onto a new volume `VOLS[k]` ([`OVERLAY_MIB`]) over the current top
    /// `k - 1`; returns the pause the guest's writes saw (µs).
    fn snapshot(&mut self, k: usize) -> u64 {
        let link = self.add_volume(k, OVERLAY_MIB * MIB);
        let r = ctl(&self.ctl_sock, "snapshot", json!({"overlay": s(&link), "volume-uuid": VOLS[k]}));
        assert_eq!(r["top"], s(&link), "{r}");
        assert_eq!(r["thin-followed"], true, "{r}");
        let want: Vec<usize> = (0..=k).rev().collect();
        assert_eq!(self.chain(), self.links(&want));
        assert_eq!(self.thin_volume(), VOLS[k], "the thin control follows the new top");
        self.set_top(k);
        r["pause-us"].as_u64().expect("pause-us")
    }

    /// Copies volume `k` into directory `sub` of the test's directory (made if needed).
    fn copy_into(&self, k: usize, sub: &str) -> PathBuf {
        let d = self.dir.path(sub);
        std::fs::create_dir_all(&d).expect("copy dir");
        let to = d.join(self.vol(k).uuid);
        copy_volume(&self.vol(k).file, &to);
        to
    }

    fn job(&self, id: &str) -> Value {
        let jobs = ctl(&self.ctl_sock, "query-jobs", json!({}));
        jobs.as_array().and_then(|a| a.iter().find(|j| j["id"] == id).cloned()).unwrap_or(Value::Null)
    }

    /// Waits until job `id` has `status`; returns the job.
    fn wait_job(&self, id: &str, status: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let j = self.job(id);
            if j["status"] == status {
                return j;
            }
            assert!(j["status"] != "concluded", "job {id} concluded before {status}: {j}");
            assert!(Instant::now() < deadline, "job {id} not {status} within {limit:?}: {j}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a commit of volume `top` into volume `base`.
    fn commit(&self, id: &str, top: usize, base: usize, speed: u64) {
        let r = ctl(
            &self.ctl_sock,
            "commit",
            json!({"top": s(&self.link(top)), "base": s(&self.link(base)), "speed": speed, "job-id": id, "base-volume-uuid": VOLS[base]}),
        );
        assert_eq!(r["id"], id, "{r}");
    }

    /// When each daemon so far served its first request (ms since the epoch, from its log).
    fn first_requests(&self) -> Vec<u64> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().filter(|l| l.contains("first request since the frontend connected")).filter_map(log_time_ms).collect()
    }

    /// Each volume's size now (MiB), v0 first.
    fn volume_sizes(&self) -> Vec<u64> {
        self.vols.iter().map(|v| v.file.metadata().map(|m| m.len() / MIB).unwrap_or(0)).collect()
    }

    /// The final checks: every volume checks clean; a raw export of the chain on `top`
    /// passes e2fsck.
    fn final_checks(&self, top: usize) {
        for v in &self.vols {
            assert_clean(&v.link, false);
        }
        let raw = self.dir.path("final.raw");
        qemu_img_all(&["convert", "-O", "raw", s(&self.link(top)), s(&raw)]);
        let fsck = Command::new("e2fsck").args(["-fn", s(&raw)]).output().expect("run e2fsck");
        assert!(fsck.status.success(), "host e2fsck of the final chain: {}", String::from_utf8_lossy(&fsck.stdout));
        let _ = std::fs::remove_file(&raw);
    }
}

/// The guest's write rate over its rounds (median KiB/s) and the number of rounds.
fn fio_rate(console: &str) -> (f64, usize) {
    let r = rounds_on(console);
    let bw: Vec<f64> = r.iter().filter_map(|x| x.1).collect();
    (median(&bw), r.len())
}

fn active_commit_enabled() -> bool {
    ACTIVE_COMMIT || std::env::var("THINBLK_CHAIN_ACTIVE").is_ok_and(|v| v == "1")
}

#[test]
fn snapshots_and_merges_under_a_verifying_guest() {
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let mut rig = Rig::new("chain-guest", 128);
    rig.set_top(0);
    rig.start_daemon();
    rig.boot();
    rig.wait_round(1, BOOT_LIMIT);

    // 1. Three snapshots, a round of fio on each new top.
    let mut pauses = Vec::new();
    for k in 1..=3 {
        pauses.push(rig.snapshot(k));
        rig.wait_rounds(1);
    }

    // 2. The internal commit of v2 into v1. The oracle: qemu-img commit of copies of the
    // backing layers (read-only and clean since their snapshots).
    for k in 0..=2 {
        rig.copy_into(k, "oracle");
    }
    let oracle_dir = rig.dir.path("oracle");
    let oracle = |k: usize| oracle_dir.join(VOLS[k]);
    qemu_img_all(&["commit", "-q", "-f", "qcow2", s(&oracle(2))]);
    let v1_before = rig.vol(1).file.metadata().map(|m| m.len()).unwrap_or(0);
    rig.commit("merge-v2", 2, 1, 0);
    let j = rig.wait_job("merge-v2", "concluded", Duration::from_secs(120));
    assert_eq!(j["outcome"], "completed", "{j}");
    assert_eq!(j["current-progress"], j["total-progress"], "{j}");
    let (merge_ms, merge_bytes) = (j["elapsed-ms"].as_u64().unwrap_or(0), j["total-progress"].as_u64().unwrap_or(0));
    ctl(&rig.ctl_sock, "job-dismiss", json!({"id": "merge-v2"}));
    assert_eq!(rig.chain(), rig.links(&[3, 1, 0]), "v2 left the chain");
    assert_eq!(rig.thin_volume(), VOLS[3], "the top's volume still grows");
    assert_eq!(info(&rig.link(3))["backing-filename"], VOLS[1], "the top names v1, as vdsm would");
    assert_clean(&rig.link(1), true);
    assert_same_chain(&rig.link(1), &oracle(1), "the merged base");
    let v1_after = rig.vol(1).file.metadata().map(|m| m.len()).unwrap_or(0);
    eprintln!("internal commit: {merge_bytes} bytes in {merge_ms} ms; v1's volume {} → {} MiB", v1_before / MIB, v1_after / MIB);
    rig.wait_rounds(1);

    // 3. A slow commit of v1 into v0, cancelled while it runs: nothing changes.
    let infos_before: Vec<Value> = [1, 0].iter().map(|&k| info(&rig.link(k))).collect();
    let chain_before = rig.chain();
    rig.commit("cancelled", 1, 0, 512 << 10);
    rig.wait_job("cancelled", "running", Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut j = rig.job("cancelled");
    // Cancelled in the middle of its copy, once a few steps are done.
    while j["current-progress"].as_u64().unwrap_or(0) < 2 * MIB {
        assert!(Instant::now() < deadline && j["status"] == "running", "the slow commit does not progress: {j}");
        std::thread::sleep(Duration::from_millis(100));
        j = rig.job("cancelled");
    }
    assert!(j["current-progress"].as_u64() < j["total-progress"].as_u64(), "{j}");
    ctl(&rig.ctl_sock, "job-cancel", json!({"id": "cancelled"}));
    let j = rig.wait_job("cancelled", "concluded", Duration::from_secs(20));
    assert_eq!(j["outcome"], "cancelled", "{j}");
    let cancelled_at = j["current-progress"].as_u64().unwrap_or(0);
    ctl(&rig.ctl_sock, "job-dismiss", json!({"id": "cancelled"}));
    assert_eq!(rig.chain(), chain_before, "a cancelled commit leaves the chain");
    let infos_after: Vec<Value> = [1, 0].iter().map(|&k| info(&rig.link(k))).collect();
    assert_eq!(infos_after, infos_before, "qemu-img info of the backing layers after a cancel");
    assert_clean(&rig.link(0), true);
    assert_same_chain(&rig.link(1), &oracle(1), "the chain below the top after a cancelled commit");
    rig.wait_rounds(1);

    // 4. The active commit of v3 into v1, with a pivot.
    let mut top = 3;
    let mut active = None;
    if active_commit_enabled() {
        rig.copy_into(1, "oracle-active");
        rig.copy_into(0, "oracle-active");
        let t0 = Instant::now();
        rig.commit("active", 3, 1, 0);
        let ready = rig.wait_job("active", "ready", Duration::from_secs(120));
        let ready_ms = t0.elapsed().as_millis() as u64;
        eprintln!("active commit ready after {ready_ms} ms: {ready}");
        rig.wait_rounds(1);
        // Frozen: the top written back and synced; its copy is the guest's disk now.
        ctl(&rig.ctl_sock, "freeze", json!({"timeout-ms": 60_000}));
        let top_copy = rig.copy_into(3, "oracle-active");
        qemu_img_all(&["commit", "-q", "-f", "qcow2", s(&top_copy)]);
        let t1 = Instant::now();
        ctl(&rig.ctl_sock, "job-complete", json!({"id": "active"}));
        let j = rig.wait_job("active", "concluded", Duration::from_secs(60));
        let pivot_ms = t1.elapsed().as_millis() as u64;
        assert_eq!(j["outcome"], "completed", "{j}");
        assert_eq!(rig.chain(), rig.links(&[1, 0]), "the base is the top");
        assert_eq!(rig.thin_volume(), VOLS[1], "the thin control follows the base's volume");
        // Still frozen: the new top written back, then compared.
        ctl(&rig.ctl_sock, "freeze", json!({"timeout-ms": 60_000}));
        assert_same_chain(&rig.link(1), &rig.dir.path("oracle-active").join(VOLS[1]), "the pivoted base");
        ctl(&rig.ctl_sock, "thaw", json!({}));
        ctl(&rig.ctl_sock, "job-dismiss", json!({"id": "active"}));
        rig.set_top(1);
        top = 1;
        active = Some((ready_ms, pivot_ms));
        rig.wait_rounds(1);
    } else {
        eprintln!("step 4 (active commit) skipped: ACTIVE_COMMIT is false");
    }

    // 5. The guest's verdict, a clean stop, clean images, the chain as qemu-img replays it.
    let console = rig.finish_guest();
    let d = rig.daemon.take().expect("daemon");
    common::stop_clean(d);
    rig.final_checks(top);
    if active.is_some() {
        // The merged old top is not served read-write again; the base is, by a restart.
        let child = Command::new(env!("CARGO_BIN_EXE_thinblk"))
            .arg("--socket-path")
            .arg(rig.dir.path("refused.sock"))
            .args(["--image", s(&rig.link(3)), "--format", "qcow2", "--backing-files", "devices"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run thinblk");
        let mut d = Daemon { child, socket: rig.dir.path("refused.sock") };
        let code = d.wait_exit(Duration::from_secs(10));
        assert!(code.is_some_and(|c| c != 0), "thinblk served the merged old top read-write (exit {code:?})");
        let d = Daemon::start(&rig.dir.path("restart.sock"), &["--image", s(&rig.link(1)), "--format", "qcow2", "--backing-files", "devices"]);
        common::stop_clean(d);
    }
    if active.is_none() {
        let final_top = rig.copy_into(3, "oracle");
        assert_same_chain(&rig.link(3), &final_top, "the final chain");
    }
    let (rate, rounds) = fio_rate(&console);
    eprintln!(
        "CHAIN-GUEST-REPORT test=merges snapshot_pause_us={pauses:?} internal_commit_ms={merge_ms} internal_commit_mib={:.1} \
         cancelled_after_mib={:.1} active_commit={} volumes_mib={:?} guest_rounds={rounds} guest_fio_write_kib_s={rate:.0} elapsed_s={}",
        merge_bytes as f64 / MIB as f64,
        cancelled_at as f64 / MIB as f64,
        active.map(|(r, p)| format!("ready_ms={r},pivot_ms={p}")).unwrap_or_else(|| "skipped".into()),
        rig.volume_sizes(),
        started.elapsed().as_secs()
    );
}

/// The seed of the kill points: `THINBLK_CHAIN_SEED`, else the clock.
fn seed() -> u64 {
    match std::env::var("THINBLK_CHAIN_SEED") {
        Ok(v) => v.trim().parse().expect("THINBLK_CHAIN_SEED must be a number"),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1) | 1,
    }
}

/// `qemu-img check --output=json` of an image nothing holds: exit code and report.
fn check_json(image: &Path) -> (i32, Value) {
    let out = Command::new("qemu-img").args(["check", "--output=json"]).arg(image).output().expect("run qemu-img");
    let text = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("qemu-img check json ({e}): {text}{}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), v)
}

/// `qemu-img check` of a base a killed commit left: clean (0), or leaks only (3), proven by
/// repairing a copy with `-r leaks` that then checks clean. Returns the leaked clusters and
/// the image's end offset.
fn check_killed_base(rig: &Rig, k: usize) -> (u64, u64) {
    let (code, v) = check_json(&rig.link(k));
    assert_eq!(v["corruptions"].as_u64().unwrap_or(0), 0, "corruption in the base: {v}");
    assert_eq!(v["check-errors"].as_u64().unwrap_or(0), 0, "qemu-img check could not finish: {v}");
    let end = v["image-end-offset"].as_u64().unwrap_or(0);
    match code {
        0 => (0, end),
        3 => {
            let leaks = v["leaks"].as_u64().unwrap_or(0);
            assert!(leaks > 0, "exit 3 without leaks: {v}");
            let copy = rig.copy_into(k, "leaks");
            let (code, out) = qemu_img_status(&["check", "-r", "leaks", s(&copy)]);
            assert_eq!(code, 0, "repairing the leaks of a copy: {out}");
            assert_clean(&copy, false);
            let _ = std::fs::remove_file(&copy);
            (leaks, end)
        }
        other => panic!("qemu-img check of the base after a kill: exit {other}: {v}"),
    }
}

/// A control connection kept open, for polling.
struct CtlConn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl CtlConn {
    fn open(path: &Path) -> CtlConn {
        let writer = UnixStream::connect(path).expect("connect to the control socket");
        writer.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut reader = BufReader::new(writer.try_clone().expect("clone"));
        let mut greeting = String::new();
        reader.read_line(&mut greeting).expect("greeting");
        assert!(greeting.contains("QMP"), "greeting: {greeting}");
        CtlConn { reader, writer }
    }

    /// Runs `command` (no arguments); returns its `return`, skipping events.
    fn call(&mut self, command: &str) -> Value {
        writeln!(self.writer, "{}", json!({"execute": command})).expect("send");
        let mut line = String::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("reply");
            let v: Value = serde_json::from_str(line.trim()).expect("json reply");
            if v.get("event").is_none() {
                assert!(v.get("error").is_none(), "{command}: {v}");
                return v["return"].clone();
            }
        }
    }
}

/// Starts the daemon again after a kill, on the same top, and waits until the guest's
/// requests reach it.
fn restart_after_kill(rig: &mut Rig) {
    let served = rig.first_requests().len();
    rig.start_daemon();
    let deadline = Instant::now() + Duration::from_secs(60);
    while rig.first_requests().len() <= served {
        assert!(Instant::now() < deadline, "the guest did not come back after a kill:\n{}", tail(&rig.console()));
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn commits_killed_at_random_points_under_a_verifying_guest() {
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let seed = seed();
    eprintln!("CHAIN-GUEST seed={seed} (THINBLK_CHAIN_SEED={seed} repeats these kill points)");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut rig = Rig::new("chain-guest-kill", 128);
    rig.set_top(0);
    rig.start_daemon();
    rig.boot();
    rig.wait_round(1, BOOT_LIMIT);
    let mut pauses = Vec::new();
    for k in 1..=2 {
        pauses.push(rig.snapshot(k));
        rig.wait_rounds(1);
    }
    // v1 and v0 are backing layers now: their copies are what every commit merges.
    for k in 0..=1 {
        rig.copy_into(k, "pre");
        rig.copy_into(k, "oracle");
    }
    qemu_img_all(&["commit", "-q", "-f", "qcow2", s(&rig.dir.path("oracle").join(VOLS[1]))]);
    let base_end = check_json(&rig.dir.path("pre").join(VOLS[0])).1["image-end-offset"].as_u64().unwrap_or(0);

    let mut speed = 0;
    let mut kills = Vec::new();
    let mut points = Vec::new();
    let mut leaks = Vec::new();
    let mut ends = Vec::new();
    for round in 0..5 {
        let id = format!("kill-{round}");
        let t0 = Instant::now();
        rig.commit(&id, 1, 0, if speed == 0 { 256 << 10 } else { speed });
        let total = rig.wait_job(&id, "running", Duration::from_secs(10))["total-progress"].as_u64().unwrap_or(0);
        assert!(total > MIB, "v1 holds too little to merge slowly: {total} bytes");
        if speed == 0 {
            // About three seconds of copying.
            speed = (total / 3).max(256 << 10);
            ctl(&rig.ctl_sock, "job-set-speed", json!({"id": id, "speed": speed}));
        }
        let copy_ms = total * 1000 / speed;
        let at_ms = copy_ms * (50 + rng.below(850)) / 1000;
        std::thread::sleep(Duration::from_millis(at_ms).saturating_sub(t0.elapsed()));
        let j = rig.job(&id);
        assert_eq!(j["status"], "running", "the commit ended before its kill: {j}");
        kills.push(rig.kill_daemon());
        points.push((t0.elapsed().as_millis() as u64, j["current-progress"].as_u64().unwrap_or(0), total));
        // While the daemon is down (the guest waits): the base has leaks at most, and the
        // chain reads as before the commits.
        let (leaked, end) = check_killed_base(&rig, 0);
        leaks.push(leaked);
        ends.push(end);
        assert_clean(&rig.link(1), false);
        assert_same_chain(&rig.link(1), &rig.dir.path("pre").join(VOLS[1]), "the chain after a killed commit");
        restart_after_kill(&mut rig);
        assert_eq!(rig.chain(), rig.links(&[2, 1, 0]), "the restarted daemon serves the whole chain");
        eprintln!(
            "kill {round}: {} ms into the commit, {}/{total} bytes copied; the base: {} leaked clusters, image end {} MiB (before the commits: {} MiB)",
            points[round].0,
            points[round].1,
            leaks[round],
            end / MIB,
            base_end / MIB
        );
    }
    rig.wait_rounds(1);

    // A sixth kill, aimed at the commit's finish (the base closed, the child rebased, the
    // merged layer dropped): the copy at full speed, the job polled until it leaves
    // `running`, then SIGKILL a random 0-149 ms later. On either side of the rebase the chain
    // reads the same.
    // One connection for the polling: each new one would hold one of the daemon's 16 control
    // slots for up to 200 ms after it closed.
    let mut poll = CtlConn::open(&rig.ctl_sock);
    let t0 = Instant::now();
    rig.commit("kill-finish", 1, 0, 0);
    let deadline = Instant::now() + Duration::from_secs(120);
    let seen = loop {
        let jobs = poll.call("query-jobs");
        let j = jobs.as_array().and_then(|a| a.iter().find(|j| j["id"] == "kill-finish").cloned()).unwrap_or(Value::Null);
        if j["status"] != "running" {
            break j["status"].as_str().unwrap_or("?").to_string();
        }
        assert!(Instant::now() < deadline, "the commit did not finish: {j}");
    };
    // The finish (write-back and close of the base, the rebase, the layer dropped) takes
    // about 100 ms: the kill falls anywhere in it, or just after.
    let after_ms = rng.below(150);
    std::thread::sleep(Duration::from_millis(after_ms));
    kills.push(rig.kill_daemon());
    let aimed_ms = t0.elapsed().as_millis() as u64;
    let (leaked, end) = check_killed_base(&rig, 0);
    leaks.push(leaked);
    ends.push(end);
    let merged = match info(&rig.link(2))["backing-filename"].as_str() {
        Some(b) if b == VOLS[1] => {
            assert_clean(&rig.link(1), false);
            assert_same_chain(&rig.link(1), &rig.dir.path("pre").join(VOLS[1]), "the chain after a kill at the finish");
            false
        }
        Some(b) if b == VOLS[0] => true,
        other => panic!("the top names {other:?} after a kill at the finish"),
    };
    restart_after_kill(&mut rig);
    eprintln!("kill 5 (aimed at the finish): {aimed_ms} ms into the commit, {after_ms} ms after the job was seen {seen}; the base: {leaked} leaked clusters; the merge {}", if merged { "had happened" } else { "had not happened" });

    // The commit that completes (unless the aimed kill came after the rebase), with the
    // base's leaks given back at its open.
    let t0 = Instant::now();
    let mut final_ms = None;
    if !merged {
        assert_eq!(rig.chain(), rig.links(&[2, 1, 0]));
        rig.commit("final", 1, 0, 0);
        let j = rig.wait_job("final", "concluded", Duration::from_secs(120));
        final_ms = Some(t0.elapsed().as_millis() as u64);
        assert_eq!(j["outcome"], "completed", "{j}");
    }
    assert_eq!(rig.chain(), rig.links(&[2, 0]));
    assert_eq!(info(&rig.link(2))["backing-filename"], VOLS[0]);
    assert_clean(&rig.link(0), true);
    assert_same_chain(&rig.link(0), &rig.dir.path("oracle").join(VOLS[0]), "the base after killed commits and a completed one");
    rig.wait_rounds(1);

    let console = rig.finish_guest();
    let d = rig.daemon.take().expect("daemon");
    common::stop_clean(d);
    rig.final_checks(2);
    let final_top = rig.copy_into(2, "oracle");
    assert_same_chain(&rig.link(2), &final_top, "the final chain");

    let firsts = rig.first_requests();
    let gaps: Vec<u64> = kills.iter().filter_map(|&k| firsts.iter().find(|&&f| f > k).map(|f| f - k)).collect();
    let (rate, rounds) = fio_rate(&console);
    eprintln!(
        "CHAIN-GUEST-REPORT test=kills seed={seed} snapshot_pause_us={pauses:?} commit_speed_kib_s={} kill_points_ms_copied_total={points:?} \
         base_leaks={leaks:?} base_end_mib_before={} base_end_mib_after_kills={:?} sigkill_to_first_request_ms={gaps:?} aimed_kill={seen}+{after_ms}ms,merged={merged} final_commit_ms={final_ms:?} volumes_mib={:?} \
         guest_rounds={rounds} guest_fio_write_kib_s={rate:.0} elapsed_s={}",
        speed / 1024,
        base_end / MIB,
        ends.iter().map(|e| e / MIB).collect::<Vec<_>>(),
        rig.volume_sizes(),
        started.elapsed().as_secs()
    );
}

#[test]
fn fio_rates_parse() {
    assert_eq!(parse_bw("1234KiB/s"), Some(1234.0));
    assert_eq!(parse_bw("2.5MiB/s"), Some(2560.0));
    assert_eq!(parse_bw("fast"), None);
    let c = "guest: round 1 done file=f1 write-bw=1024KiB/s\nnoise\nguest: round 2 done file=f2 write-bw=3MiB/s\n";
    assert_eq!(rounds_on(c), vec![(1, Some(1024.0)), (2, Some(3072.0))]);
}

//! Live migration of a VM whose disk is being written (issue 21). Two QEMUs on this host play
//! two hosts: the source, and a destination started with `-incoming defer` that listens on a
//! unix socket. Each has its own QMP socket and its own serial console file: what the guest
//! prints after the switch-over lands on the destination's, so the verdict is read there.
//! The guest (tests/vm/guest-init, `thinblk_test=migrate`) runs rounds of verifying fio on
//! ext4 while the VM moves, then prints the longest completion fio saw and its verdict.
//!
//! One scenario, [`migrate_while_fio_runs`], serves every disk kind ([`DiskKind`]): QEMU's own
//! virtio-blk over a qcow2 image (the baseline: QEMU hands the image over itself) and
//! vhost-user-blk served by one thinblk daemon per QEMU on the same image, the destination's
//! started with `--incoming`. Variants (a thin volume extended during the migration, storage
//! failing under retry, a cancelled attempt) hook in through its `before_hop` closure and the
//! [`Rig`]'s fields instead of copying it.
//!
//! The guest's clock stops while the VM is stopped (TCG: the virtual clock is paused and
//! migrated), so the guest's max stall is what the guest saw of the migration around the
//! stop (IO slowed by the live phase, a destination slow to serve its first requests), not
//! the downtime itself, which `query-migrate` reports.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::qmp::Qmp;
use common::vm::{assert_pass, assets, qemu_tcg, tail};
use common::faultfs::FaultMount;
use common::{log_time_ms, Daemon, LoopDev, TestDir};

/// fio rounds the guest runs (16 MiB each, a few seconds under TCG): enough for two hops with
/// a round before each and the switch-overs well before the end.
const ROUNDS: u32 = 6;
/// From QEMU's start to the guest's `guest: fio started`.
const BOOT_LIMIT: Duration = Duration::from_secs(150);
/// For one round of fio to complete on the current host.
const ROUND_LIMIT: Duration = Duration::from_secs(120);
/// For one migration, from `migrate` to `completed`.
const MIGRATION_LIMIT: Duration = Duration::from_secs(90);
/// From the last switch-over to the guest's verdict and poweroff.
const FINISH_LIMIT: Duration = Duration::from_secs(240);

/// What serves the guest's disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DiskKind {
    /// QEMU's virtio-blk-pci on its own qcow2 driver: QEMU inactivates the image on the
    /// source and activates it on the destination itself.
    VirtioBlk,
    /// vhost-user-blk-pci (2 queues), one thinblk daemon per QEMU on the same image; a
    /// destination's daemon is started with `--incoming`.
    Thinblk,
}

impl DiskKind {
    fn label(self) -> &'static str {
        match self {
            DiskKind::VirtioBlk => "virtio-blk",
            DiskKind::Thinblk => "thinblk",
        }
    }
}

/// The rig: a test directory, the image both sides open, and how to start a VM on a side.
/// A variant changes the fields before the scenario (another image, daemon arguments).
struct Rig {
    kind: DiskKind,
    /// The qcow2 image every VM of the rig opens (a file or a block device).
    image: PathBuf,
    /// What every thinblk daemon serves: `--image`, `--format` and their options (an error
    /// policy, a thin volume's); the rig adds queues, serial, journal and `--incoming`.
    daemon_args: Vec<String>,
    /// The guest's kernel command line.
    append: String,
    assets: PathBuf,
    /// VMs started so far (numbers their names: a1, b2, a3, ...).
    started: usize,
    /// The FUSE fixture the image lies on, if a variant put it there: it records which
    /// process modified the image, and when, and injects storage faults.
    mount: Option<FaultMount>,
    /// What a thin-volume variant keeps alive: the SPM, then the loop device.
    thin: Option<(Daemon, LoopDev)>,
    /// Last, so that it is removed after the fixture is unmounted and the SPM and loop device
    /// are gone (fields drop in order; a mounted directory cannot be removed).
    dir: TestDir,
}

/// One QEMU of the rig (and its thinblk daemon); QEMU is killed when dropped, then the daemon.
struct Vm {
    /// `a1`, `b2`, ...: host and start order; names its files in the test directory.
    name: String,
    /// `a` or `b`.
    host: &'static str,
    qemu: Child,
    qmp: Qmp,
    console: PathBuf,
    /// QEMU's own stdout and stderr.
    qemu_log: PathBuf,
    /// Where a destination listens for the migration stream.
    incoming: Option<PathBuf>,
    daemon: Option<Daemon>,
    /// The daemon's log and control socket (thinblk).
    daemon_log: Option<PathBuf>,
    control: Option<PathBuf>,
}

/// What `query-migrate` on the source said at the end of one migration.
#[derive(Clone, Debug)]
struct Migration {
    /// `completed`, `failed`, `cancelled`, or `refused` (the `migrate` command failed) or
    /// `timeout` (cancelled by the rig after its limit).
    status: String,
    total_ms: u64,
    downtime_ms: u64,
    setup_ms: u64,
    /// RAM sent (MiB) and the rate at the end (`ram.mbps`, Mbit/s).
    ram_mib: u64,
    mbps: f64,
    /// QEMU's `error-desc`, or the refusal.
    error: Option<String>,
}

/// What one scenario measured.
#[derive(Debug)]
struct Report {
    migrations: Vec<Migration>,
    /// Per migration, from the source's STOP event to the destination's RESUME (their QMP
    /// timestamps; one host, one clock): the pause as seen from outside, the destination's
    /// loading of the device state included (QEMU starts devices after RESUME).
    pauses_ms: Vec<u64>,
    /// The guest's `max-stall-ms`: its longest fio completion over the whole run.
    guest_max_stall_ms: u64,
    /// The longest completion of the rounds that were running at a switch-over (the first
    /// round each destination finished).
    switch_rounds_max_ms: u64,
    /// The longest completion of the other rounds (the same guest without a migration).
    other_rounds_max_ms: u64,
    elapsed: Duration,
}

/// A QMP event's timestamp in microseconds since the epoch.
fn event_us(e: &Value) -> Option<u64> {
    let t = e.get("timestamp")?;
    Some(t.get("seconds")?.as_u64()? * 1_000_000 + t.get("microseconds")?.as_u64()?)
}

fn read_lossy(p: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
}

/// Rounds the guest reported on this console: (round, max-clat-ms) per `guest: round` line.
fn rounds_on(console: &str) -> Vec<(u32, u64)> {
    console
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("guest: round ")?;
            let round = rest.split('/').next()?.parse().ok()?;
            let ms = rest.split("max-clat-ms=").nth(1)?.trim().parse().ok()?;
            Some((round, ms))
        })
        .collect()
}

impl Rig {
    /// A rig for `kind` in a fresh test directory `name`, with a new 1 GiB qcow2 image and a
    /// guest that runs `rounds` rounds of fio.
    fn new(name: &str, kind: DiskKind, rounds: u32) -> Rig {
        let dir = TestDir::new(name);
        let image = dir.path("disk.qcow2");
        let out = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("1G").output().expect("run qemu-img");
        assert!(out.status.success(), "qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
        let daemon_args = vec!["--image".to_string(), image.to_str().expect("utf-8 path").to_string(), "--format".into(), "qcow2".into()];
        let append = format!("console=ttyS0 panic=-1 loglevel=4 thinblk_test=migrate thinblk_rounds={rounds}");
        Rig { dir, kind, image, daemon_args, append, assets: assets(), started: 0, mount: None, thin: None }
    }

    /// Starts a VM on `host` ("a" or "b"): for thinblk its daemon first (with `--incoming`
    /// for a destination; its journal in the host's own directory, as on two hosts), then
    /// QEMU, whose QMP is connected with migration events on. A destination (`incoming`)
    /// waits for the migration stream on a unix socket before this returns.
    fn start_vm(&mut self, host: &'static str, incoming: bool) -> Vm {
        self.started += 1;
        let name = format!("{host}{}", self.started);
        let image = self.image.to_str().expect("utf-8 path").to_string();
        let console = self.dir.path(&format!("console-{name}.log"));
        let qemu_log = self.dir.path(&format!("qemu-{name}.log"));
        let qmp_path = self.dir.path(&format!("qmp-{name}.sock"));
        let initrd = self.assets.join("initramfs-fio.cpio.gz");
        let mut cmd = qemu_tcg(&self.assets, &initrd, &self.append, &console);
        cmd.args(["-m", "512M", "-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-numa", "node,memdev=mem"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        let mut daemon = None;
        let (mut daemon_log, mut ctl_path) = (None, None);
        match self.kind {
            DiskKind::VirtioBlk => {
                use std::os::unix::fs::FileTypeExt;
                let block = std::fs::metadata(&self.image).is_ok_and(|m| m.file_type().is_block_device());
                let driver = if block { "host_device" } else { "file" };
                cmd.arg("-blockdev")
                    .arg(format!("driver={driver},filename={image},node-name=f0"))
                    .args(["-blockdev", "driver=qcow2,file=f0,node-name=d0"])
                    .args(["-device", "virtio-blk-pci,drive=d0,num-queues=2,serial=guest-disk-1,id=disk0"]);
            }
            DiskKind::Thinblk => {
                let sock = self.dir.path(&format!("vhost-{name}.sock"));
                let journal = self.dir.path(&format!("journal-{host}"));
                std::fs::create_dir_all(&journal).expect("journal dir");
                let journal = journal.to_str().expect("utf-8 path").to_string();
                // Each host has its own mailbox identity (host id and lock) on a thin volume.
                let per_host: Vec<String> = self
                    .daemon_args
                    .iter()
                    .scan(None::<String>, |prev, a| {
                        let out = match (prev.as_deref(), host) {
                            (Some("--host-id"), "b") => format!("{}", a.parse::<u32>().unwrap_or(2) + 1),
                            (Some("--mailbox-lock"), "b") => format!("{a}.b"),
                            _ => a.clone(),
                        };
                        *prev = Some(a.clone());
                        Some(out)
                    })
                    .collect();
                let control = self.dir.path(&format!("ctl-{name}.sock"));
                let control_arg = control.to_str().expect("utf-8 path").to_string();
                ctl_path = Some(control);
                let mut args: Vec<&str> = per_host.iter().map(String::as_str).collect();
                args.extend_from_slice(&["--num-queues", "2", "--serial", "guest-disk-1", "--journal-dir", &journal, "--control", &control_arg]);
                if incoming {
                    args.push("--incoming");
                }
                let log = self.dir.path(&format!("daemon-{name}.log"));
                daemon = Some(Daemon::start_logging(&sock, &args, Some(&log)));
                daemon_log = Some(log);
                cmd.arg("-chardev")
                    .arg(format!("socket,id=blk0,path={}", sock.display()))
                    .args(["-device", "vhost-user-blk-pci,chardev=blk0,num-queues=2,id=disk0"]);
            }
        }
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let out = std::fs::File::create(&qemu_log).expect("qemu log");
        cmd.stdout(Stdio::from(out.try_clone().expect("qemu log"))).stderr(Stdio::from(out));
        let qemu = cmd.spawn().unwrap_or_else(|e| panic!("qemu-system-x86_64 not runnable ({e})"));
        // The QMP socket appears once QEMU has set its machine up; a QEMU that refused its
        // command line has exited by then.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut vm_qemu = qemu;
        while !qmp_path.exists() {
            if let Ok(Some(st)) = vm_qemu.try_wait() {
                panic!("QEMU {name} exited at start ({st}): {}", read_lossy(&qemu_log));
            }
            if Instant::now() > deadline {
                let _ = vm_qemu.kill();
                let _ = vm_qemu.wait();
                panic!("QEMU {name} made no QMP socket in 30 s: {}", read_lossy(&qemu_log));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let qmp = match Qmp::connect(&qmp_path, Duration::from_secs(10)) {
            Ok(q) => q,
            Err(e) => {
                let _ = vm_qemu.kill();
                let _ = vm_qemu.wait();
                panic!("QMP of {name}: {e}");
            }
        };
        let mut vm = Vm { name, host, qemu: vm_qemu, qmp, console, qemu_log, incoming: None, daemon, daemon_log, control: ctl_path };
        vm.qmp
            .execute("migrate-set-capabilities", json!({ "capabilities": [{ "capability": "events", "state": true }] }))
            .expect("migration events on");
        if incoming {
            let path = self.dir.path(&format!("migrate-{}.sock", vm.name));
            vm.qmp.execute("migrate-incoming", json!({ "uri": format!("unix:{}", path.display()) })).expect("migrate-incoming");
            let deadline = Instant::now() + Duration::from_secs(10);
            while !path.exists() {
                assert!(Instant::now() < deadline, "{}: no incoming migration socket", vm.name);
                std::thread::sleep(Duration::from_millis(20));
            }
            vm.incoming = Some(path);
        }
        vm
    }
}

/// A daemon at one hop: its pid and log, for the checks after the source retired.
struct Turn {
    name: String,
    pid: u32,
    log: PathBuf,
}

/// The first line of `log` containing `what`, as wall-clock ms.
fn logged_at(log: &str, what: &str) -> Option<u64> {
    log.lines().find(|l| l.contains(what)).and_then(log_time_ms)
}

/// What one switch-over must show: the source handed the image over (its log) before the
/// destination started taking it; the source asked for no extension after it; and, with the
/// image on the FUSE fixture, the source's process wrote nothing after its handover (its
/// stop included) and the destination's nothing before it started taking the image.
fn handover_checks(rig: &Rig, out: &Turn, into: &Turn) {
    let (out_log, in_log) = (read_lossy(&out.log), read_lossy(&into.log));
    let handed = logged_at(&out_log, "image inactivated").unwrap_or_else(|| panic!("{}: no handover in its log:\n{}", out.name, tail(&out_log)));
    let taking = logged_at(&in_log, "taking it over").unwrap_or_else(|| panic!("{}: no take-over in its log:\n{}", into.name, tail(&in_log)));
    assert!(in_log.contains("image activated"), "{}: the take-over did not complete:\n{}", into.name, tail(&in_log));
    assert!(taking >= handed, "{} started taking the image ({taking}) before {} handed it over ({handed})", into.name, out.name);
    // How long the handover took on each side (the daemons log it).
    let ms_of = |log: &str, what: &str| -> Option<u64> {
        let line = log.lines().find(|l| l.contains(what))?;
        line.split_whitespace().find_map(|w| w.strip_prefix("ms=")).and_then(|v| v.parse().ok())
    };
    eprintln!(
        "HANDOVER-REPORT {} -> {}: source hand-over {:?} ms, destination take-over {:?} ms",
        out.name,
        into.name,
        ms_of(&out_log, "the image was handed over"),
        ms_of(&in_log, "the image was taken over")
    );
    let late: Vec<&str> = out_log.lines().filter(|l| l.contains("extension requested") && log_time_ms(l).is_some_and(|t| t > handed)).collect();
    assert!(late.is_empty(), "{} asked for extensions after its handover: {late:?}", out.name);
    if let Some(m) = &rig.mount {
        let mods = m.faults.modifications();
        let count = |pid: u32, keep: &dyn Fn(u64) -> bool| mods.iter().filter(|(p, t)| *p == pid && keep(*t)).count();
        let (before, after) = (count(out.pid, &|t| t <= handed), count(out.pid, &|t| t > handed));
        let (early, served) = (count(into.pid, &|t| t < taking), count(into.pid, &|t| t >= taking));
        eprintln!("image writes: {} {before} before its handover, {after} after; {} {early} before taking the image, {served} since", out.name, into.name);
        assert_eq!(after, 0, "{} wrote the image after it handed it over", out.name);
        // Whoever it was (a thread whose process could not be told): nobody writes between
        // the handover and the take-over.
        let between = mods.iter().filter(|(_, t)| *t > handed && *t < taking).count();
        assert_eq!(between, 0, "the image was written between {}'s handover and {}'s take-over", out.name, into.name);
        assert_eq!(early, 0, "{} wrote the image before it took it", into.name);
    }
}

impl Vm {
    /// The daemon's pid and log (thinblk).
    fn turn(&self) -> Option<Turn> {
        let d = self.daemon.as_ref()?;
        Some(Turn { name: self.name.clone(), pid: d.child.id(), log: self.daemon_log.clone()? })
    }

    fn console_text(&self) -> String {
        read_lossy(&self.console)
    }

    /// Waits up to `limit` until the console satisfies `ready`; panics (console and QEMU's
    /// log shown) if QEMU exits first or the limit passes.
    fn wait_console(&mut self, what: &str, ready: impl Fn(&str) -> bool, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.console_text();
            if ready(&text) {
                return;
            }
            if let Ok(Some(st)) = self.qemu.try_wait() {
                panic!("{}: QEMU exited ({st}) while waiting for {what}; console:\n{}\nQEMU: {}", self.name, tail(&text), read_lossy(&self.qemu_log));
            }
            if Instant::now() > deadline {
                panic!("{}: no {what} within {limit:?}; console:\n{}", self.name, tail(&text));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits up to `limit` for QEMU to exit.
    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(st)) = self.qemu.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ends a source after its migration: QMP `quit`, QEMU's exit, then its daemon's stop,
    /// which must be clean (exit 0).
    fn retire(mut self) {
        // QEMU may close the connection before it answers.
        let _ = self.qmp.execute("quit", Value::Null);
        assert!(self.wait_exit(Duration::from_secs(20)).is_some(), "{}: QEMU did not quit", self.name);
        let said = read_lossy(&self.qemu_log);
        if !said.trim().is_empty() {
            eprintln!("QEMU {} said: {}", self.name, said.trim());
        }
        if let Some(mut d) = self.daemon.take() {
            d.signal(libc::SIGTERM);
            assert_eq!(d.wait_exit(Duration::from_secs(20)), Some(0), "{}: the source's daemon did not stop cleanly", self.name);
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.qemu.try_wait() {
            let _ = self.qemu.kill();
        }
        let _ = self.qemu.wait();
        // The daemon (a field) is killed after QEMU is gone.
    }
}

/// Starts migrating `src` to the socket `dst` listens on (`migrate` with a `uri`).
fn migrate_start(src: &mut Vm, dst: &Vm) -> Result<(), String> {
    let path = dst.incoming.as_ref().ok_or_else(|| format!("{} is not a destination", dst.name))?;
    src.qmp.execute("migrate", json!({ "uri": format!("unix:{}", path.display()) })).map(|_| ())
}

/// Polls `query-migrate` on `src` every 100 ms until the migration completes, fails or is
/// cancelled. After `limit` the rig cancels it and reports `timeout`.
fn migrate_wait(src: &mut Vm, limit: Duration) -> Migration {
    let deadline = Instant::now() + limit;
    let ms = |v: &Value, key: &str| v.get(key).and_then(Value::as_u64).unwrap_or(0);
    loop {
        let v = src.qmp.execute("query-migrate", Value::Null).unwrap_or_else(|e| panic!("{}: {e}", src.name));
        let status = v.get("status").and_then(Value::as_str).unwrap_or("none").to_string();
        let done = matches!(status.as_str(), "completed" | "failed" | "cancelled");
        if done || Instant::now() > deadline {
            if !done {
                let _ = migrate_cancel(src);
            }
            return Migration {
                status: if done { status } else { "timeout".into() },
                total_ms: ms(&v, "total-time"),
                downtime_ms: ms(&v, "downtime"),
                setup_ms: ms(&v, "setup-time"),
                ram_mib: v.get("ram").map(|r| ms(r, "transferred") >> 20).unwrap_or(0),
                mbps: v.get("ram").and_then(|r| r.get("mbps")).and_then(Value::as_f64).unwrap_or(0.0),
                error: v.get("error-desc").and_then(Value::as_str).map(str::to_string),
            };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Cancels `src`'s migration (`migrate_cancel`); the source keeps running.
fn migrate_cancel(src: &mut Vm) -> Result<(), String> {
    src.qmp.execute("migrate_cancel", Value::Null).map(|_| ())
}

/// Migrates `src` to `dst` and waits for the end (at most `limit`). A `migrate` command that
/// fails (a migration blocker) is a `refused` migration.
fn migrate(src: &mut Vm, dst: &Vm, limit: Duration) -> Migration {
    match migrate_start(src, dst) {
        Ok(()) => migrate_wait(src, limit),
        Err(e) => Migration { status: "refused".into(), total_ms: 0, downtime_ms: 0, setup_ms: 0, ram_mib: 0, mbps: 0.0, error: Some(e) },
    }
}

/// The scenario every migration test shares, on a rig the test made (and changed: another
/// image, daemon arguments). Boots the guest on host a; once fio runs,
/// migrates it `hops` times between hosts a and b (a→b, b→a, ...): for each hop, after a
/// round of fio completed on the current host, a fresh destination VM (and daemon) starts on
/// the other host, `before_hop(rig, hop, source)` runs (a variant's fault, volume extension
/// or cancelled attempt), the VM migrates, and the old source is retired (QEMU quit, daemon
/// stopped) once the destination runs. Asserts that every migration completed while fio was
/// still running and the guest was not rebooted, the guest's PASS on the last destination,
/// a clean `qemu-img check` and, for thinblk, every daemon's clean exit. Prints the
/// `MIGRATION-REPORT` line (comma-separated values: one per hop).
fn migrate_while_fio_runs(rig: &mut Rig, hops: usize, mut before_hop: impl FnMut(&mut Rig, usize, &mut Vm)) -> Report {
    // One scenario at a time: each runs two or three TCG QEMUs on a 2-core machine, and the
    // timings it reports are meant to be compared.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    let kind = rig.kind;
    let mut src = rig.start_vm("a", false);
    src.wait_console("`guest: fio started`", |c| c.contains("guest: fio started"), BOOT_LIMIT);
    eprintln!("{:>5.1} s: fio started on {}", t0.elapsed().as_secs_f64(), src.name);
    let mut migrations = Vec::new();
    let mut pauses = Vec::new();
    // The consoles of the retired sources, in order.
    let mut consoles = Vec::new();
    for hop in 0..hops {
        src.wait_console("a round of fio", |c| !rounds_on(c).is_empty(), ROUND_LIMIT);
        let other = if src.host == "a" { "b" } else { "a" };
        let mut dst = rig.start_vm(other, true);
        before_hop(rig, hop, &mut src);
        eprintln!("{:>5.1} s: hop {}: {} → {}", t0.elapsed().as_secs_f64(), hop + 1, src.name, dst.name);
        let m = migrate(&mut src, &dst, MIGRATION_LIMIT);
        eprintln!("{:>5.1} s: {m:?}", t0.elapsed().as_secs_f64());
        assert_eq!(
            m.status,
            "completed",
            "migration {} → {}: {}\nsource QEMU: {}",
            src.name,
            dst.name,
            m.error.as_deref().unwrap_or("no error given"),
            read_lossy(&src.qemu_log)
        );
        let resumed = dst.qmp.wait_event("RESUME", Duration::from_secs(30)).unwrap_or_else(|e| panic!("{}: {e}", dst.name));
        let stopped = src.qmp.wait_event("STOP", Duration::from_secs(10)).unwrap_or_else(|e| panic!("{}: {e}", src.name));
        pauses.push(event_us(&resumed).zip(event_us(&stopped)).map_or(0, |(r, s)| r.saturating_sub(s) / 1000));
        let st = dst.qmp.execute("query-status", Value::Null).expect("query-status");
        assert_eq!(st.get("status").and_then(Value::as_str), Some("running"), "{}: {st}", dst.name);
        let text = src.console_text();
        assert!(!text.contains("guest: fio done"), "fio ended on {} before the switch-over of hop {}: raise the rounds", src.name, hop + 1);
        consoles.push((src.name.clone(), text));
        let turns = (src.turn(), dst.turn());
        src.retire();
        if let (Some(out), Some(into)) = turns {
            handover_checks(rig, &out, &into);
        }
        migrations.push(m);
        src = dst;
    }
    let status = src.wait_exit(FINISH_LIMIT);
    eprintln!("{:>5.1} s: {} exited ({status:?})", t0.elapsed().as_secs_f64(), src.name);
    let log = src.console_text();
    for (n, text) in &consoles {
        eprintln!("--- {n}:\n{}", text.lines().filter(|l| l.starts_with("guest:")).collect::<Vec<_>>().join("\n"));
    }
    eprintln!("--- {} (last):", src.name);
    assert!(status.is_some(), "{}: the guest did not finish within {FINISH_LIMIT:?}; console:\n{}", src.name, tail(&log));
    assert_pass(&log);
    // guest-init prints the disk's queues once, at boot.
    if hops > 0 {
        assert!(!log.contains("guest: vda queues"), "the guest booted again on {}:\n{}", src.name, tail(&log));
    }
    if let Some(d) = src.daemon.take() {
        common::stop_clean(d);
    }
    let qemu_said = read_lossy(&src.qemu_log);
    if !qemu_said.trim().is_empty() {
        eprintln!("QEMU {} said: {}", src.name, qemu_said.trim());
    }
    drop(src);
    let check = Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&rig.image).output().expect("run qemu-img check");
    let text = format!("{}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
    assert!(check.status.success() && text.contains("No errors were found"), "qemu-img check: {text}");

    // Rounds: the first one each destination finished was running at its switch-over.
    consoles.push((String::new(), log.clone()));
    let (mut switch, mut other) = (0, 0);
    for (i, (_, text)) in consoles.iter().enumerate() {
        for (j, (_, ms)) in rounds_on(text).into_iter().enumerate() {
            if i > 0 && j == 0 {
                switch = switch.max(ms);
            } else {
                other = other.max(ms);
            }
        }
    }
    let guest_max_stall_ms = log
        .lines()
        .find_map(|l| l.trim().strip_prefix("guest: max-stall-ms="))
        .and_then(|v| v.trim().parse().ok())
        .expect("the guest printed no max-stall-ms");
    let report = Report { migrations, pauses_ms: pauses, guest_max_stall_ms, switch_rounds_max_ms: switch, other_rounds_max_ms: other, elapsed: t0.elapsed() };
    let list = |f: fn(&Migration) -> u64| report.migrations.iter().map(|m| f(m).to_string()).collect::<Vec<_>>().join(",");
    eprintln!(
        "MIGRATION-REPORT {}: total_ms={} downtime_ms={} pause_ms={} setup_ms={} ram_mib={} mbps={} guest_max_stall_ms={} switch_round_max_ms={} other_rounds_max_ms={} test_s={}",
        kind.label(),
        list(|m| m.total_ms),
        list(|m| m.downtime_ms),
        report.pauses_ms.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
        list(|m| m.setup_ms),
        list(|m| m.ram_mib),
        report.migrations.iter().map(|m| format!("{:.0}", m.mbps)).collect::<Vec<_>>().join(","),
        report.guest_max_stall_ms,
        report.switch_rounds_max_ms,
        report.other_rounds_max_ms,
        report.elapsed.as_secs()
    );
    report
}

/// The baseline: QEMU's own virtio-blk on a qcow2 image both QEMUs open, one migration while
/// the guest's fio verifies.
#[test]
fn virtio_blk_on_qcow2_migrates_while_fio_verifies() {
    let mut rig = Rig::new("mig-virtio-blk", DiskKind::VirtioBlk, ROUNDS);
    let r = migrate_while_fio_runs(&mut rig, 1, |_, _, _| {});
    assert_eq!(r.migrations.len(), 1);
}

/// thinblk: one daemon per QEMU on the same qcow2 image; the VM migrates there (a→b) and
/// back (b→a, to a fresh daemon and QEMU on host a) while the guest's fio verifies.
#[test]
fn thinblk_on_qcow2_migrates_there_and_back_while_fio_verifies() {
    let mut rig = Rig::new("mig-thinblk", DiskKind::Thinblk, ROUNDS);
    let r = migrate_while_fio_runs(&mut rig, 2, |_, _, _| {});
    assert_eq!(r.migrations.len(), 2);
}

/// A 1 GiB qcow2 image on the FUSE fixture (which records who writes it and injects faults)
/// served under `--werror retry`: hop 1 is first attempted and cancelled (the source keeps
/// serving; the aborted destination never takes or writes the image), then migrates while
/// the storage fails every write for 3 s (the guest sees no error); hop 2 goes back.
#[test]
fn thinblk_migrates_through_a_cancelled_attempt_and_a_storage_outage() {
    let mut rig = Rig::new("mig-thinblk-faults", DiskKind::Thinblk, ROUNDS);
    let backing = rig.dir.path("backing.img");
    common::sparse_file(&backing, 0);
    let mount = FaultMount::new(&backing, &rig.dir.path("mnt"));
    let image = mount.disk();
    let out = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("1G").output().expect("run qemu-img");
    assert!(out.status.success(), "qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
    let img = image.to_str().expect("utf-8 path").to_string();
    rig.daemon_args = ["--image", &img, "--format", "qcow2", "--werror", "retry", "--retry-interval", "200", "--retry-timeout", "60000"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    rig.image = image;
    rig.mount = Some(mount);
    let r = migrate_while_fio_runs(&mut rig, 2, |rig, hop, src| {
        if hop != 0 {
            return;
        }
        let other = if src.host == "a" { "b" } else { "a" };
        let extra = rig.start_vm(other, true);
        migrate_start(src, &extra).expect("migrate (to be cancelled)");
        std::thread::sleep(Duration::from_millis(700));
        migrate_cancel(src).expect("migrate_cancel");
        let m = migrate_wait(src, MIGRATION_LIMIT);
        assert_eq!(m.status, "cancelled", "{m:?}");
        let st = src.qmp.execute("query-status", Value::Null).expect("query-status");
        assert_eq!(st.get("status").and_then(Value::as_str), Some("running"), "the source after a cancelled migration: {st}");
        let turn = extra.turn().expect("a daemon");
        drop(extra);
        let log = read_lossy(&turn.log);
        assert!(!log.contains("taking it over"), "{}: a cancelled destination took the image:\n{}", turn.name, tail(&log));
        let wrote = rig.mount.as_ref().map_or(0, |m| m.faults.modifications().iter().filter(|(p, _)| *p == turn.pid).count());
        assert_eq!(wrote, 0, "the cancelled destination wrote the image");
        eprintln!("cancelled attempt: {m:?}; the source runs on, the destination wrote nothing");
        // The storage fails every write for 3 s from now: the migration runs into it.
        let faults = rig.mount.as_ref().expect("the fixture").faults.clone();
        std::thread::spawn(move || {
            faults.fail_writes(libc::EIO);
            std::thread::sleep(Duration::from_secs(3));
            faults.clear();
        });
    });
    assert_eq!(r.migrations.len(), 2);
    let failed = rig.mount.as_ref().map_or(0, |m| m.faults.writes_failed.load(std::sync::atomic::Ordering::SeqCst));
    eprintln!("writes failed during the outage (retried): {failed}");
}

/// A 1 GiB qcow2 image on a 128 MiB thin loop volume, grown 64 MiB at a time by an SPM that
/// answers after 4 s: the VM migrates while the source's extension is in flight. The
/// destination (its own host id) refreshes the volume when it takes the image and asks again
/// for what is still missing; the source asks for nothing after its handover; the guest
/// sees no error.
#[test]
fn thinblk_migrates_while_its_thin_volume_is_extended() {
    const DOMAIN: &str = "8adbc85e-e554-4ae0-b318-8a5465fe5fe1";
    const VOLUME: &str = "d772f1c6-3ebb-43c3-a42e-73fcd8255a5f";
    let mut rig = Rig::new("mig-thinblk-thin", DiskKind::Thinblk, ROUNDS + 2);
    let (inbox, outbox) = (rig.dir.path("inbox"), rig.dir.path("outbox"));
    common::sparse_file(&inbox, 16 << 20);
    common::sparse_file(&outbox, 16 << 20);
    let vols = rig.dir.path("volumes");
    std::fs::create_dir_all(vols.join(DOMAIN)).expect("volume dir");
    let backing = vols.join(DOMAIN).join(VOLUME);
    let out = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&backing).arg("1G").output().expect("run qemu-img");
    assert!(out.status.success(), "qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::OpenOptions::new().write(true).open(&backing).and_then(|f| f.set_len(128 << 20)).expect("size the volume");
    let lv = LoopDev::attach(&backing);
    let spm = common::spm_process(&inbox, &outbox, &vols, &["--delay-ms", "4000"], Some(&rig.dir.path("spm.log")));
    let dev = lv.0.to_str().expect("utf-8 path").to_string();
    let lock = rig.dir.path("host.lock");
    rig.daemon_args = [
        "--image", &dev, "--format", "qcow2", "--thin", "--chunk-mb", "64", "--utilization-percent", "50",
        "--spm-inbox", inbox.to_str().expect("utf-8"), "--spm-outbox", outbox.to_str().expect("utf-8"),
        "--host-id", "2", "--domain-uuid", DOMAIN, "--volume-uuid", VOLUME, "--mailbox-lock", lock.to_str().expect("utf-8"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    rig.image = lv.0.clone();
    rig.thin = Some((spm, lv));
    let mut in_flight = None;
    let r = migrate_while_fio_runs(&mut rig, 1, |_, _, src| {
        // Wait for the source to have an extension outstanding (asked, not yet grown).
        let control = src.control.clone().expect("a control socket");
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let t = common::ctl(&control, "query-status", json!({}))["thin"].clone();
            let n = |k: &str| t[k].as_u64().unwrap_or(0);
            if n("requests") > n("completed") + n("failed") {
                in_flight = Some(t);
                return;
            }
            assert!(Instant::now() < deadline, "no extension was requested on the source within 90 s: {t}");
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    assert_eq!(r.migrations.len(), 1);
    eprintln!("the source's volume at the switch-over: {}", in_flight.unwrap_or_default());
    let size = std::fs::metadata(&backing).expect("volume").len();
    assert!(size > 128 << 20, "the volume never grew ({} MiB)", size >> 20);
    let dst_log = read_lossy(&rig.dir.path("daemon-b2.log"));
    assert!(dst_log.contains("the volume is refreshed"), "the destination did not refresh the volume when it took the image:\n{}", tail(&dst_log));
}

//! libvirt, the way most users start VMs: the domain XML of docs/operating.md ("libvirt") is
//! defined and started by a real libvirtd (the unprivileged session instance, private to the
//! test: its config, sockets and logs live in the test's directory), with the guest kernel
//! and initramfs of tests/guest_qemu.rs; the guest runs its verifying file-system workload on a
//! thinblk disk (a qcow2 on a thin loop volume that `thinblk spm` grows). Two such instances
//! play two hosts for `virsh migrate --live` (issue 21; docs/operating.md, "Live migration").

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::vm::{assert_pass, assets, tail};
use common::{Daemon, TestDir};

/// Upper bound for the guest run (boot + workload + poweroff under TCG).
const LIMIT: Duration = Duration::from_secs(420);
/// The unprivileged user libvirtd and QEMU run as (nobody).
const USER: u32 = 65534;

/// The first ```xml block after "## libvirt" in docs/operating.md.
fn documented_xml() -> String {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operating.md")).expect("docs/operating.md");
    let section = doc.split("\n## libvirt").nth(1).expect("a libvirt section");
    let block = section.split("```xml\n").nth(1).expect("an xml block");
    block.split("\n```").next().expect("end of block").to_string()
}

/// Replaces `from` (which must occur once) by `to`.
fn substitute(xml: &str, from: &str, to: &str) -> String {
    assert_eq!(xml.matches(from).count(), 1, "the documented XML should hold `{from}` once");
    xml.replacen(from, to, 1)
}

/// A session libvirtd of its own as an unprivileged user, killed (with its domain) on drop.
/// Two of them play two hosts: each has its own directories (`home`) and so its own sockets,
/// and its own `host_uuid` (libvirt refuses to migrate a domain to a host whose UUID is its
/// own).
struct Libvirt {
    home: PathBuf,
    daemon: Child,
    domain: String,
}

impl Libvirt {
    /// Starts libvirtd in `home`; `host_uuid` goes into its libvirtd.conf if given (else
    /// libvirt reads the host's SMBIOS or machine id).
    fn start(home: &Path, domain: &str, host_uuid: Option<&str>) -> Libvirt {
        let conf = home.join("config/libvirt");
        std::fs::create_dir_all(&conf).expect("libvirt config dir");
        // Console and QEMU logs to plain files (no virtlogd to spawn and clean up).
        std::fs::write(conf.join("qemu.conf"), "stdio_handler = \"file\"\n").expect("qemu.conf");
        if let Some(uuid) = host_uuid {
            std::fs::write(conf.join("libvirtd.conf"), format!("host_uuid = \"{uuid}\"\n")).expect("libvirtd.conf");
        }
        chown_tree(home);
        let daemon = Self::command(home, "libvirtd")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(home.join("libvirtd.log")).expect("libvirtd log"))
            .spawn()
            .unwrap_or_else(|e| panic!("libvirtd not runnable ({e}): install libvirt-daemon-driver-qemu (.ci/run does)"));
        let lv = Libvirt { home: home.to_path_buf(), daemon, domain: domain.to_string() };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !lv.virsh(&["version"]).status.success() {
            assert!(Instant::now() < deadline, "libvirtd did not answer; log:\n{}", lv.log());
            std::thread::sleep(Duration::from_millis(200));
        }
        lv
    }

    /// `program` as the unprivileged user with the session's private directories.
    fn command(home: &Path, program: &str) -> Command {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", &USER.to_string(), "--regid", &USER.to_string(), "--clear-groups", "env", "-i"])
            .arg(format!("HOME={}", home.display()))
            .arg(format!("XDG_CONFIG_HOME={}", home.join("config").display()))
            .arg(format!("XDG_RUNTIME_DIR={}", home.join("run").display()))
            .arg(format!("XDG_CACHE_HOME={}", home.join("cache").display()))
            .arg(format!("XDG_DATA_HOME={}", home.join("data").display()))
            .arg("PATH=/usr/sbin:/usr/bin:/sbin:/bin")
            .arg(program)
            .stdin(Stdio::null());
        c
    }

    /// This instance's URI: the session URI with its own socket, so that a client of the other
    /// instance (virsh migrate) reaches it too.
    fn uri(&self) -> String {
        format!("qemu:///session?socket={}", self.home.join("run/libvirt/libvirt-sock").display())
    }

    /// virsh on this instance (`-c` [`Libvirt::uri`]).
    fn virsh_command(&self) -> Command {
        let mut c = Self::command(&self.home, "virsh");
        c.arg("-c").arg(self.uri());
        c
    }

    fn virsh(&self, args: &[&str]) -> Output {
        self.virsh_command().args(args).output().expect("virsh")
    }

    /// virsh's stdout, asserting that it succeeded.
    fn virsh_ok(&self, args: &[&str]) -> String {
        let out = self.virsh(args);
        assert!(out.status.success(), "virsh {}: {}\nlibvirtd:\n{}", args.join(" "), String::from_utf8_lossy(&out.stderr), tail(&self.log()));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The domain's state (`running`, `shut off`, ...), or `gone` if this instance no longer
    /// knows it (a transient domain that ended).
    fn state(&self) -> String {
        let out = self.virsh(&["domstate", &self.domain]);
        if out.status.success() {
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        } else {
            "gone".to_string()
        }
    }

    /// Waits up to `limit` for the domain to end (on_poweroff=destroy: the guest's poweroff).
    fn wait_shut_off(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if matches!(self.state().as_str(), "shut off" | "gone") {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// libvirtd's log, without its complaints about /dev/kvm (the test machines run TCG).
    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.home.join("libvirtd.log")).unwrap_or_default();
        log.lines().filter(|l| !l.contains("/dev/kvm")).collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        let _ = self.virsh(&["destroy", &self.domain]);
        let _ = self.virsh(&["undefine", &self.domain]);
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// The documented domain XML as the tests run it: TCG, the test's name and socket, the test
/// kernel and `initrd` booted with `cmdline`, the serial console to the file `console`.
fn test_xml(name: &str, sock: &Path, assets: &Path, initrd: &str, cmdline: &str, console: &Path) -> String {
    let mut xml = documented_xml();
    xml = substitute(&xml, "<domain type='kvm'>", "<domain type='qemu'>");
    xml = substitute(&xml, "<name>vm1</name>", &format!("<name>{name}</name>"));
    xml = substitute(&xml, "/run/thinblk/vm1-disk0.sock", sock.to_str().expect("utf-8"));
    xml = substitute(
        &xml,
        "<boot dev='hd'/>",
        &format!(
            "<kernel>{}</kernel><initrd>{}</initrd><cmdline>{cmdline}</cmdline>",
            assets.join("vmlinuz").display(),
            assets.join(initrd).display()
        ),
    );
    substitute(&xml, "<serial type='pty'/>", &format!("<serial type='file'><source path='{}'/></serial>", console.display()))
}

/// Opens the test directory to the unprivileged user (traversal) and a daemon's socket to it
/// (QEMU connects as that user; docs/operating.md, "libvirt").
fn open_to_user(dir: &TestDir, sock: &Path) {
    let st = Command::new("chmod").arg("755").arg(&dir.0).status().expect("chmod");
    assert!(st.success());
    let st = Command::new("chown").arg(format!("{USER}:{USER}")).arg(sock).status().expect("chown socket");
    assert!(st.success());
}

/// Hands `dir` and everything in it to the unprivileged user.
fn chown_tree(dir: &Path) {
    let st = Command::new("chown").args(["-R", &format!("{USER}:{USER}")]).arg(dir).status().expect("chown");
    assert!(st.success(), "chown {}", dir.display());
}

#[test]
fn libvirt_boots_the_documented_domain_on_a_thinblk_disk() {
    let assets = assets();
    let dir = TestDir::new("libvirt");
    let (mut args, _lv, _spm, backing) = common::thin_volume(&dir);
    args.extend(["--num-queues", "2", "--serial", "vm1-disk0"].iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let sock = dir.path("vm1-disk0.sock");
    let mut daemon = Daemon::start(&sock, &args);
    open_to_user(&dir, &sock);

    let home = dir.path("libvirt");
    let console = home.join("console.log");
    let name = format!("thinblk-test-{}", std::process::id());
    let xml = test_xml(&name, &sock, &assets, "initramfs.cpio.gz", "console=ttyS0 panic=-1 loglevel=4 thinblk_test=fs", &console);
    std::fs::create_dir_all(&home).expect("libvirt home");
    let xml_path = home.join("domain.xml");
    std::fs::write(&xml_path, &xml).expect("domain xml");

    let libvirt = Libvirt::start(&home, &name, None);
    libvirt.virsh_ok(&["define", xml_path.to_str().expect("utf-8")]);
    let started = Instant::now();
    libvirt.virsh_ok(&["start", &name]);
    // on_poweroff=destroy: the guest's poweroff ends the domain.
    let finished = libvirt.wait_shut_off(LIMIT);
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(finished, "domain still running after {LIMIT:?}; console:\n{}", tail(&log));
    eprintln!("libvirt guest run: {:.0} s", started.elapsed().as_secs_f64());
    assert_pass(&log);
    assert!(log.contains("queues=2"), "guest did not see 2 queues:\n{}", tail(&log));
    assert!(log.contains("serial=vm1-disk0"), "GET_ID serial not seen by the guest:\n{}", tail(&log));
    drop(libvirt);
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(20)), Some(0));
    let check = Command::new("qemu-img").arg("check").arg(&backing).output().expect("qemu-img check");
    assert!(check.status.success(), "qemu-img check: {}", String::from_utf8_lossy(&check.stdout));
}

/// From `virsh migrate` to its return.
const MIGRATION_LIMIT: Duration = Duration::from_secs(120);
/// From the domain's start to the guest's first fio round done on the source.
const ROUND_LIMIT: Duration = Duration::from_secs(270);

/// A `<key>: <n> ms` line of `virsh domjobinfo`.
fn job_ms(info: &str, key: &str) -> Option<u64> {
    let line = info.lines().find(|l| l.trim_start().starts_with(key))?;
    line.split(':').nth(1)?.split_whitespace().next()?.parse().ok()
}

/// `virsh migrate --live` between two session libvirtds on this host, each with its own
/// `host_uuid` and its own thinblk daemon on the same qcow2 image (the destination's started
/// with `--incoming` before the migration); the destination's domain XML is the source's
/// migratable XML with the destination's socket (and console file). The guest runs rounds of
/// verifying fio on ext4 through the switch-over and prints its verdict on the destination.
#[test]
fn libvirt_migrates_a_vm_with_a_thinblk_disk_live() {
    let assets = assets();
    let dir = TestDir::new("lvmig");
    let image = dir.path("disk.qcow2");
    let out = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("1G").output().expect("run qemu-img");
    assert!(out.status.success(), "qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
    // Short paths: QEMU's monitor socket lies deep in each libvirt's directory (at most 107
    // bytes for a unix socket's path).
    // One daemon per host, each with its own journal directory and log.
    let daemon_on = |host: &str, incoming: bool| {
        let sock = dir.path(&format!("vhost-{host}.sock"));
        let journal = dir.path(&format!("journal-{host}"));
        std::fs::create_dir_all(&journal).expect("journal dir");
        let mut args = vec!["--image", image.to_str().expect("utf-8"), "--format", "qcow2", "--num-queues", "2", "--serial", "vm1-disk0"];
        args.extend(["--journal-dir", journal.to_str().expect("utf-8")]);
        if incoming {
            args.push("--incoming");
        }
        let log = dir.path(&format!("daemon-{host}.log"));
        let d = Daemon::start_logging(&sock, &args, Some(&log));
        open_to_user(&dir, &sock);
        (d, sock, log)
    };
    let (daemon_a, sock_a, log_a) = daemon_on("a", false);

    let name = format!("thinblk-test-{}", std::process::id());
    let (home_a, home_b) = (dir.path("a"), dir.path("b"));
    let (console_a, console_b) = (home_a.join("console.log"), home_b.join("console.log"));
    let cmdline = "console=ttyS0 panic=-1 loglevel=4 thinblk_test=migrate thinblk_rounds=4";
    let xml = test_xml(&name, &sock_a, &assets, "initramfs-fio.cpio.gz", cmdline, &console_a);
    std::fs::create_dir_all(&home_a).expect("libvirt home");
    std::fs::write(home_a.join("domain.xml"), &xml).expect("domain xml");
    let src = Libvirt::start(&home_a, &name, Some("5c1d2a8e-0a7b-4f0e-9e51-6a0c2f3b1a01"));
    let dst = Libvirt::start(&home_b, &name, Some("5c1d2a8e-0a7b-4f0e-9e51-6a0c2f3b1a02"));
    src.virsh_ok(&["define", home_a.join("domain.xml").to_str().expect("utf-8")]);
    let t0 = Instant::now();
    src.virsh_ok(&["start", &name]);
    let console = |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    while !console(&console_a).contains("guest: round 1/") {
        assert!(t0.elapsed() < ROUND_LIMIT, "no fio round done on the source within {ROUND_LIMIT:?}; console:\n{}", tail(&console(&console_a)));
        assert_eq!(src.state(), "running", "the domain ended on the source; console:\n{}", tail(&console(&console_a)));
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("{:>5.1} s: a fio round done on the source", t0.elapsed().as_secs_f64());

    // The destination host: its daemon first (--incoming), then the domain's XML for it: the
    // source's, with this host's socket and console file (live and persistent definitions).
    let (daemon_b, sock_b, log_b) = daemon_on("b", true);
    let for_b = |xml: String| {
        let xml = substitute(&xml, sock_a.to_str().expect("utf-8"), sock_b.to_str().expect("utf-8"));
        xml.replace(console_a.to_str().expect("utf-8"), console_b.to_str().expect("utf-8"))
    };
    let live_b = home_b.join("migrate.xml");
    let persistent_b = home_b.join("persistent.xml");
    std::fs::write(&live_b, for_b(src.virsh_ok(&["dumpxml", "--migratable", &name]))).expect("xml");
    std::fs::write(&persistent_b, for_b(src.virsh_ok(&["dumpxml", "--inactive", "--migratable", &name]))).expect("xml");

    let migrate_args = [
        "migrate", "--live", "--persistent", "--undefinesource", &name, &dst.uri(),
        "--xml", live_b.to_str().expect("utf-8"), "--persistent-xml", persistent_b.to_str().expect("utf-8"),
        "--migrateuri", "tcp://127.0.0.1", "--listen-address", "127.0.0.1",
    ];
    eprintln!("{:>5.1} s: virsh -c {} {}", t0.elapsed().as_secs_f64(), src.uri(), migrate_args.join(" "));
    let started = Instant::now();
    let mut virsh = src.virsh_command().args(migrate_args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("virsh migrate");
    let status = loop {
        if let Some(st) = virsh.try_wait().expect("wait virsh") {
            break st;
        }
        if started.elapsed() > MIGRATION_LIMIT {
            let _ = virsh.kill();
            let _ = virsh.wait();
            let _ = src.virsh(&["domjobabort", &name]);
            panic!("virsh migrate did not return within {MIGRATION_LIMIT:?}; libvirtd (source):\n{}", tail(&src.log()));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = started.elapsed();
    let out = virsh.wait_with_output().expect("virsh output");
    assert!(
        status.success(),
        "virsh migrate: {}\nsource libvirtd:\n{}\ndestination libvirtd:\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&src.log()),
        tail(&dst.log())
    );
    assert_eq!(dst.state(), "running", "the domain on the destination after the migration");
    assert_eq!(src.state(), "gone", "the source still knows the domain after --undefinesource");
    let job = dst.virsh_ok(&["domjobinfo", "--completed", &name]);
    let (total, downtime) = (job_ms(&job, "Time elapsed:"), job_ms(&job, "Total downtime:"));
    eprintln!(
        "{:>5.1} s: migrated in {:.1} s (virsh); libvirt: total {total:?} ms, downtime {downtime:?} ms",
        t0.elapsed().as_secs_f64(),
        took.as_secs_f64()
    );
    let text_a = console(&console_a);
    assert!(!text_a.contains("guest: fio done"), "fio ended on the source before the switch-over: raise the rounds");
    // The destination keeps the persistent definition it was given: its own socket.
    let inactive = dst.virsh_ok(&["dumpxml", "--inactive", &name]);
    assert!(inactive.contains(sock_b.to_str().expect("utf-8")), "the destination's persistent XML:\n{inactive}");

    // The source's QEMU is gone: its daemon has handed the image over and stops cleanly.
    common::stop_clean(daemon_a);
    let finished = dst.wait_shut_off(LIMIT);
    let text_b = console(&console_b);
    eprintln!("{:>5.1} s: the guest ended on the destination", t0.elapsed().as_secs_f64());
    eprintln!("--- source:\n{}\n--- destination:", text_a.lines().filter(|l| l.starts_with("guest:")).collect::<Vec<_>>().join("\n"));
    assert!(finished, "domain still running on the destination after {LIMIT:?}; console:\n{}", tail(&text_b));
    assert_pass(&text_b);
    assert!(!text_b.contains("guest: vda queues"), "the guest booted again on the destination:\n{}", tail(&text_b));
    drop(dst);
    drop(src);
    common::stop_clean(daemon_b);
    let (said_a, said_b) = (console(&log_a), console(&log_b));
    assert!(said_a.contains("image inactivated"), "the source's daemon did not hand the image over:\n{}", tail(&said_a));
    assert!(said_b.contains("image activated"), "the destination's daemon did not take the image:\n{}", tail(&said_b));
    let check = Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&image).output().expect("run qemu-img check");
    let text = format!("{}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
    assert!(check.status.success() && text.contains("No errors were found"), "qemu-img check: {text}");
    eprintln!("test: {:.0} s", t0.elapsed().as_secs_f64());
}

//! Guest assets for the QEMU tests: a Debian kernel and initramfs images built once
//! (tests/vm/build-assets.sh), and console log helpers.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds the guest kernel and initramfs images once per test process (the script also locks).
pub fn assets() -> PathBuf {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = root.join("target/vm-assets");
        let st = Command::new("bash").arg(root.join("tests/vm/build-assets.sh")).arg(&out).status();
        match st {
            Ok(s) if s.success() => Ok(out),
            other => Err(format!("{other:?}")),
        }
    });
    match built {
        Ok(p) => p.clone(),
        Err(e) => panic!("building guest assets failed ({e}); needs busybox-static, e2fsprogs, cpio, fio, lvm2: see .ci/run"),
    }
}

/// The last 60 lines of a console log.
pub fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// The line a guest prints last: `THINBLK-GUEST-RESULT: PASS` or `... FAIL why`.
pub const VERDICT: &str = "THINBLK-GUEST-RESULT: ";

/// QEMU under TCG (q35, 2 CPUs, no display, network or reboot) booting the test kernel with
/// `initrd` and `append`, its serial console into `console`; the caller adds memory and disks.
pub fn qemu_tcg(assets: &Path, initrd: &Path, append: &str, console: &Path) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "2"])
        .args(["-display", "none", "-monitor", "none", "-nic", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(assets.join("vmlinuz"))
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(append)
        .stdin(std::process::Stdio::null());
    c
}

/// Starts `cmd` (QEMU) and waits until it exits or `limit` passes (then kills it); returns
/// the console log, asserting that it exited.
pub fn run_to_end(mut cmd: Command, console: &Path, limit: std::time::Duration) -> String {
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("qemu-system-x86_64 not runnable ({e}): install qemu-system-x86 from bookworm-backports (.ci/run does)"));
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait qemu") {
            break Some(s);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let log = std::fs::read_to_string(console).unwrap_or_default();
    assert!(status.is_some(), "guest did not finish within {limit:?}; console:\n{}", tail(&log));
    log
}

/// Prints the guest's `guest:` lines and verdict, and asserts the verdict is PASS.
pub fn assert_pass(log: &str) {
    eprintln!("{}", log.lines().filter(|l| l.starts_with("guest:") || l.contains(VERDICT)).collect::<Vec<_>>().join("\n"));
    let verdict = log.lines().find_map(|l| l.trim().strip_prefix(VERDICT)).map(str::to_string);
    assert_eq!(verdict.as_deref(), Some("PASS"), "guest verdict; console:\n{}", tail(log));
}

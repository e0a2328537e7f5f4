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

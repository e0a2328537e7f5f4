//! What this crate's unit tests share: a directory removed when dropped, and the
//! qemu-utils tools as the oracle.

use std::path::PathBuf;
use std::process::Command;

/// A fresh directory under the temp dir, removed when dropped (also when a test fails).
pub(crate) struct Dir(pub(crate) PathBuf);

impl Dir {
    /// `thinblk-<name>-<pid>` under the temp dir, emptied first.
    pub(crate) fn fresh(name: &str) -> Dir {
        let dir = Dir(std::env::temp_dir().join(format!("thinblk-{name}-{}", std::process::id())));
        let _ = std::fs::remove_dir_all(&dir.0);
        std::fs::create_dir_all(&dir.0).expect("test directory");
        dir
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `tool` (from qemu-utils), which must succeed; returns its stdout.
pub(crate) fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().expect("qemu-utils are needed");
    assert!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `qemu-img`, which must succeed; returns its stdout.
pub(crate) fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

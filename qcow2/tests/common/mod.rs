//! Shared by the qcow2 integration tests: a PRNG, a test directory, running the qemu-img oracle.
#![allow(dead_code)]

/// A small deterministic PRNG (xorshift64), so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    /// Next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Fills `b` with random bytes.
    pub fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

use std::path::{Path, PathBuf};
use std::process::Command;

/// A test directory, removed when dropped.
pub struct Dir(pub PathBuf);

impl Dir {
    /// A fresh directory named after the test.
    pub fn new(name: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("thinblk-qcow2-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("test directory");
        Dir(p)
    }

    /// A path inside it.
    pub fn path(&self, n: &str) -> PathBuf {
        self.0.join(n)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `cmd`: its exit code and its output (stdout then stderr).
pub fn run(cmd: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e} (install qemu-utils)"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// Runs `cmd`, which must succeed; its output.
pub fn ok(cmd: &str, args: &[&str]) -> String {
    let (code, text) = run(cmd, args);
    assert_eq!(code, 0, "{cmd} {args:?}: {text}");
    text
}

/// A path as a string argument.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

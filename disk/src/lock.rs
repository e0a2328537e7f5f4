//! Image ownership locks that QEMU understands.
//!
//! QEMU's `file` driver (block/file-posix.c) marks what an open of an image does with
//! open-file-description (OFD) byte-range locks, all of them shared (`F_RDLCK`), one byte per
//! block permission: byte `100 + bit` for each permission the open *holds*, byte `200 + bit`
//! for each permission it does *not share* with other users. Before it proceeds, an open looks
//! for the two kinds of conflict: a permission it wants whose "not shared" byte someone else
//! holds, and a permission it does not share whose "held" byte someone else holds. thinblk
//! takes the same bytes, so QEMU, qemu-img, qemu-io, qemu-storage-daemon and other thinblk
//! processes see it as one of their own, in both directions.
//!
//! The locks belong to an open file description: [`ImageLock`] opens the image's file again
//! (through `/proc/self/fd`, so the very same inode, whatever happened to the path) and keeps
//! that description, which nothing else uses, for as long as the image is served. Not the
//! image's own description: io_uring holds that one through its registered files, and after
//! the daemon dies the kernel drops it only once the ring is torn down, asynchronously; the
//! locks would outlive the process for a moment, and a `qemu-img check` run right after a
//! SIGKILL would be refused (seen in `concurrent_flushes_all_complete_and_persist`).
//! [`ImageLock::change`] moves from one [`Access`] to another the way QEMU changes a node's
//! permissions (take the union, check, then drop what is no longer needed): an image opened
//! inactive for an incoming live migration ([`Access::inactive`]: no byte) takes the writer's
//! access that way when it is activated, and drops back to no byte when it hands over.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::ImageError;

/// First lock byte of the permissions an open holds (QEMU's `RAW_LOCK_PERM_BASE`).
pub const PERM_BASE: u64 = 100;
/// First lock byte of the permissions an open does not share (QEMU's `RAW_LOCK_SHARED_BASE`).
pub const SHARED_BASE: u64 = 200;

/// How often [`ImageLock::change_waiting`] tries again while another open refuses the change.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(20);

/// How long [`ImageLock::acquire`] waits for a conflicting lock that no running process holds
/// (the files of a process that just exited can be released a little later, e.g. those its
/// io_uring still referenced).
pub const LINGER_LIMIT: Duration = Duration::from_secs(5);

/// One QEMU block permission; the discriminant is its bit number (`BLK_PERM_*` in QEMU's
/// include/block/block-common.h: 0x01, 0x02, 0x04, 0x08).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Perm {
    /// `BLK_PERM_CONSISTENT_READ`: reads see consistent contents.
    ConsistentRead = 0,
    /// `BLK_PERM_WRITE`: the visible contents change.
    Write = 1,
    /// `BLK_PERM_WRITE_UNCHANGED`: writes that leave the visible contents as they are.
    WriteUnchanged = 2,
    /// `BLK_PERM_RESIZE`: the size changes.
    Resize = 3,
}

impl Perm {
    /// Every permission, by bit number.
    pub const ALL: [Perm; 4] = [Perm::ConsistentRead, Perm::Write, Perm::WriteUnchanged, Perm::Resize];

    /// The permission's name as QEMU prints it in lock errors.
    pub fn name(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "consistent read",
            Perm::Write => "write",
            Perm::WriteUnchanged => "write unchanged",
            Perm::Resize => "resize",
        }
    }

    /// The byte locked by an open holding this permission.
    pub fn held_byte(self) -> u64 {
        PERM_BASE + self as u64
    }

    /// The byte locked by an open not sharing this permission.
    pub fn unshared_byte(self) -> u64 {
        SHARED_BASE + self as u64
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of [`Perm`]s (QEMU's permission mask).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Perms(u8);

impl Perms {
    /// No permission.
    pub const NONE: Perms = Perms(0);
    /// Every permission (`BLK_PERM_ALL`, 0x0f since QEMU 6.2).
    pub const ALL: Perms = Perms(0x0f);

    /// The set of `perms`.
    pub fn of(perms: &[Perm]) -> Perms {
        Perms(perms.iter().fold(0, |m, p| m | p.bit()))
    }

    /// Whether `p` is in the set.
    pub fn has(self, p: Perm) -> bool {
        self.0 & p.bit() != 0
    }

    /// Both sets together.
    pub fn union(self, o: Perms) -> Perms {
        Perms(self.0 | o.0)
    }

    /// Every permission not in the set.
    pub fn complement(self) -> Perms {
        Perms(!self.0 & Perms::ALL.0)
    }
}

/// What an open does with an image file and what it lets others do: QEMU's `perm` and
/// `shared_perm` of the file node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// Permissions held.
    pub perm: Perms,
    /// Permissions shared with other opens.
    pub shared: Perms,
}

impl Access {
    /// No permission held, everything shared: no lock byte at all.
    pub const NONE: Access = Access { perm: Perms::NONE, shared: Perms::ALL };

    /// The file of a qcow2 image served as a guest disk. As QEMU's qcow2 node under a
    /// virtio-blk device or a block export: the format driver writes metadata and grows the
    /// file when writable, and never lets others write or resize a file whose metadata it
    /// caches (block.c, `bdrv_default_perms_for_storage`). Writable: holds consistent read,
    /// write, resize; shares consistent read and write unchanged. Read-only: holds consistent
    /// read; shares the same.
    pub fn qcow2(writable: bool) -> Access {
        let mut perm = vec![Perm::ConsistentRead];
        if writable {
            perm.extend([Perm::Write, Perm::Resize]);
        }
        Access { perm: Perms::of(&perm), shared: Perms::of(&[Perm::ConsistentRead, Perm::WriteUnchanged]) }
    }

    /// A raw image served as a guest disk: the file gets the device's permissions unchanged,
    /// as under QEMU's virtio-blk (hw/block/block.c, `blkconf_apply_backend_options`, without
    /// `share-rw`): holds consistent read (and write when writable); shares consistent read,
    /// write unchanged and resize.
    pub fn raw(writable: bool) -> Access {
        let mut perm = vec![Perm::ConsistentRead];
        if writable {
            perm.push(Perm::Write);
        }
        Access {
            perm: Perms::of(&perm),
            shared: Perms::of(&[Perm::ConsistentRead, Perm::WriteUnchanged, Perm::Resize]),
        }
    }

    /// A backing file (qcow2 or raw) under an image: as QEMU's backing node (block.c,
    /// `bdrv_default_perms_for_cow`, then the storage rules): holds consistent read; shares
    /// consistent read and write unchanged.
    pub fn backing() -> Access {
        Access::qcow2(false)
    }

    /// An image that is inactive here: the destination of an incoming live migration before
    /// it takes over, or the source once it has handed the image over. Nothing held,
    /// everything shared, so no lock byte at all: what QEMU 10.0 holds for an inactive node
    /// (file-posix.c leaves the bytes of an inactive file node alone, and both an image opened
    /// inactive and one inactivated by `blockdev-set-active` hold none, seen in
    /// /proc/PID/fdinfo). An active writer (thinblk, QEMU, qemu-io) coexists with it.
    pub fn inactive() -> Access {
        Access::NONE
    }

    /// The permissions not shared (the `200 + bit` bytes).
    pub fn unshared(self) -> Perms {
        self.shared.complement()
    }
}

/// `--image-locking`: whether images are locked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Locking {
    /// Take QEMU's locks; where the file system has no OFD locks, warn and go on unlocked
    /// (QEMU's `locking=auto`).
    #[default]
    On,
    /// Take none (QEMU's `locking=off`).
    Off,
}

/// Which of QEMU's two conflicts refused a lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conflict {
    /// We want the permission; another open does not share it (its `200 + bit` byte).
    Wanted,
    /// We do not share the permission; another open holds it (its `100 + bit` byte).
    Unshared,
}

/// A process holding a conflicting lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// Its pid.
    pub pid: u32,
    /// Its `/proc/PID/comm`.
    pub comm: String,
}

/// Errors of image locking.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another open of the image conflicts.
    #[error("{}", conflict_message(*.perm, *.conflict, .holders))]
    Refused {
        /// The permission refused.
        perm: Perm,
        /// Which conflict.
        conflict: Conflict,
        /// Who holds the conflicting byte, where we could see it (empty: nobody visible).
        holders: Vec<Holder>,
    },
    /// The file system does not support OFD locks.
    #[error("the file system does not support OFD locks (byte {byte}): {source}")]
    Unsupported {
        /// The byte.
        byte: u64,
        /// The kernel's answer.
        source: io::Error,
    },
    /// Locking, unlocking or testing a byte failed otherwise.
    #[error("locking byte {byte} failed: {source}")]
    Io {
        /// The byte.
        byte: u64,
        /// The kernel's answer.
        source: io::Error,
    },
}

fn conflict_message(perm: Perm, conflict: Conflict, holders: &[Holder]) -> String {
    let who = if holders.is_empty() {
        "an open of the image that no running process visible to us has (a process that just exited?)".to_string()
    } else {
        holders.iter().map(|h| format!("pid {} ({})", h.pid, h.comm)).collect::<Vec<_>>().join(", ")
    };
    let name = perm.name();
    let (lock, what, byte) = match conflict {
        Conflict::Wanted => ("", format!("has the image open without sharing \"{name}\""), perm.unshared_byte()),
        Conflict::Unshared => ("shared ", format!("has the image open with \"{name}\" permission"), perm.held_byte()),
    };
    format!(
        "Failed to get {lock}\"{name}\" lock: {who} {what} (lock byte {byte}). Is another process using the image? \
         (--image-locking off skips this check)"
    )
}

/// QEMU-compatible locks held on one image file (see the module doc).
#[derive(Debug)]
pub struct ImageLock {
    /// The image's file opened again: an open file description of its own.
    file: File,
    /// The access in force.
    access: Access,
    /// Bytes `100 + bit` we hold.
    locked_perm: Perms,
    /// Bytes `200 + bit` we hold.
    locked_unshared: Perms,
    /// The image's own descriptor (not a holder to report).
    image_fd: RawFd,
}

impl ImageLock {
    /// Locks `file` (an open image) for `want`, as QEMU opens a file node. A conflict with a
    /// lock that no running process holds is waited out for up to [`LINGER_LIMIT`].
    pub fn acquire(file: &File, want: Access) -> Result<ImageLock, LockError> {
        let dup = reopen(file).map_err(|source| LockError::Io { byte: PERM_BASE, source })?;
        let mut lock = ImageLock {
            file: dup,
            access: Access::NONE,
            locked_perm: Perms::NONE,
            locked_unshared: Perms::NONE,
            image_fd: file.as_raw_fd(),
        };
        let started = Instant::now();
        loop {
            match lock.change(want) {
                Err(LockError::Refused { holders, .. }) if holders.is_empty() && started.elapsed() < LINGER_LIMIT => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                r => return r.map(|()| lock),
            }
        }
    }

    /// The access in force.
    pub fn access(&self) -> Access {
        self.access
    }

    /// Moves to `want`: its bytes are added to ours, the conflicts checked, then the bytes
    /// `want` does not need released. On an error the previous access stays in force.
    pub fn change(&mut self, want: Access) -> Result<(), LockError> {
        self.change_naming(want, true)
    }

    /// [`ImageLock::change`], tried again every [`RETRY_INTERVAL`] while another open refuses
    /// it, for up to `wait`: the last refusal is returned, naming the holders (they are looked
    /// up only then, not at every try). Any other error is returned at once.
    pub fn change_waiting(&mut self, want: Access, wait: Duration) -> Result<(), LockError> {
        let deadline = Instant::now() + wait;
        loop {
            let last = Instant::now() >= deadline;
            match self.change_naming(want, last) {
                Err(LockError::Refused { .. }) if !last => {
                    std::thread::sleep(RETRY_INTERVAL.min(deadline.saturating_duration_since(Instant::now())));
                }
                done => return done,
            }
        }
    }

    /// [`ImageLock::change`]; a refusal names its holders only with `name_holders` (the
    /// lookup walks /proc).
    fn change_naming(&mut self, want: Access, name_holders: bool) -> Result<(), LockError> {
        let (old_perm, old_unshared) = (self.locked_perm, self.locked_unshared);
        let applied = self
            .apply(old_perm.union(want.perm), old_unshared.union(want.unshared()), false)
            .and_then(|()| self.check(want, name_holders));
        if let Err(e) = applied {
            if let Err(u) = self.apply(old_perm, old_unshared, true) {
                tracing::warn!(error = %u, "releasing image lock bytes failed");
            }
            return Err(e);
        }
        if let Err(u) = self.apply(want.perm, want.unshared(), true) {
            tracing::warn!(error = %u, "releasing image lock bytes failed");
        }
        self.access = want;
        Ok(())
    }

    /// Locks the bytes of `perm` and `unshared` we do not hold yet; with `release`, unlocks
    /// those we hold beyond them.
    fn apply(&mut self, perm: Perms, unshared: Perms, release: bool) -> Result<(), LockError> {
        for p in Perm::ALL {
            for (want, held, byte) in [
                (perm.has(p), self.locked_perm.has(p), p.held_byte()),
                (unshared.has(p), self.locked_unshared.has(p), p.unshared_byte()),
            ] {
                let change = if want && !held {
                    libc::F_RDLCK
                } else if release && held && !want {
                    libc::F_UNLCK
                } else {
                    continue;
                };
                ofd_setlk(&self.file, byte, change).map_err(|source| match source.raw_os_error() {
                    Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS) => LockError::Unsupported { byte, source },
                    _ => LockError::Io { byte, source },
                })?;
                let set = if byte >= SHARED_BASE { &mut self.locked_unshared } else { &mut self.locked_perm };
                *set = if change == libc::F_UNLCK { Perms(set.0 & !p.bit()) } else { Perms(set.0 | p.bit()) };
            }
        }
        Ok(())
    }

    /// QEMU's two conflicts, in its order: a permission we want that someone does not share,
    /// then a permission we do not share that someone holds.
    fn check(&self, want: Access, name_holders: bool) -> Result<(), LockError> {
        let wanted = Perm::ALL.into_iter().filter(|p| want.perm.has(*p)).map(|p| (p, Conflict::Wanted, p.unshared_byte()));
        let unshared = Perm::ALL.into_iter().filter(|p| want.unshared().has(*p)).map(|p| (p, Conflict::Unshared, p.held_byte()));
        for (perm, conflict, byte) in wanted.chain(unshared) {
            if ofd_conflicts(&self.file, byte).map_err(|source| LockError::Io { byte, source })? {
                let holders =
                    if name_holders { holders(&self.file, byte, &[self.file.as_raw_fd(), self.image_fd]) } else { Vec::new() };
                return Err(LockError::Refused { perm, conflict, holders });
            }
        }
        Ok(())
    }
}

/// The file open as `file` opened again, read-only: a new open file description of the same
/// inode (checked), or, where `/proc` is missing, a duplicate of `file`'s.
fn reopen(file: &File) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let reopened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()));
    match reopened {
        Ok(f) => {
            let (a, b) = (file.metadata()?, f.metadata()?);
            if (a.dev(), a.ino(), a.rdev()) != (b.dev(), b.ino(), b.rdev()) {
                return Err(io::Error::other("the image's file changed while it was opened again for locking"));
            }
            Ok(f)
        }
        Err(_) => file.try_clone(),
    }
}

/// Locks `file` for `want` under `mode`: None when locking is off, or (with a warning) when
/// the file system has no OFD locks.
pub fn lock_image(file: &File, path: &Path, want: Access, mode: Locking) -> Result<Option<ImageLock>, LockError> {
    if mode == Locking::Off {
        return Ok(None);
    }
    match ImageLock::acquire(file, want) {
        Ok(l) => Ok(Some(l)),
        Err(LockError::Unsupported { source, .. }) => {
            tracing::warn!(image = %path.display(), error = %source,
                "the file system does not support OFD locks: the image is not locked against other users");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Moves an image's lock (None: not locked, as with `--image-locking off`) to `want`, waiting
/// up to `wait` while another open refuses it ([`ImageLock::change_waiting`]); an error names
/// the image.
pub fn change_lock(lock: Option<&mut ImageLock>, path: &Path, want: Access, wait: Duration) -> Result<(), ImageError> {
    match lock {
        Some(l) => l.change_waiting(want, wait).map_err(|source| ImageError::Lock { path: path.to_path_buf(), source }),
        None => Ok(()),
    }
}

fn flock_at(byte: u64, kind: libc::c_int) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value (l_pid must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl
}

/// Sets (F_RDLCK) or clears (F_UNLCK) our OFD lock on one byte, without waiting.
fn ofd_setlk(file: &File, byte: u64, kind: libc::c_int) -> io::Result<()> {
    let fl = flock_at(byte, kind);
    // SAFETY: `fl` is a valid flock that outlives the call; the fd is open.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Whether another open file description holds any lock on `byte` (QEMU's
/// `qemu_lock_fd_test(..., exclusive)`: an exclusive lock would conflict).
fn ofd_conflicts(file: &File, byte: u64) -> io::Result<bool> {
    let mut fl = flock_at(byte, libc::F_WRLCK);
    // SAFETY: `fl` is a valid flock the kernel fills in; the fd is open.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// The processes with an open of `file`'s inode that locks `byte`. The kernel names no pid
/// for OFD locks (`F_OFD_GETLK` and /proc/locks say -1), but /proc/PID/fdinfo/FD lists the
/// locks of each open file description; our own descriptors in `skip` are left out.
fn holders(file: &File, byte: u64, skip: &[RawFd]) -> Vec<Holder> {
    let Ok(meta) = file.metadata() else { return Vec::new() };
    let key = LockKey::of(meta.dev(), meta.ino());
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return out };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else { continue };
        for fd in fds.flatten() {
            let Some(n) = fd.file_name().to_str().and_then(|n| n.parse::<RawFd>().ok()) else { continue };
            if pid == me && skip.contains(&n) {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(fd.path()) else { continue };
            if text.lines().any(|l| key.covered_by(l, byte)) {
                let comm = std::fs::read_to_string(p.path().join("comm")).map(|c| c.trim().to_string()).unwrap_or_default();
                out.push(Holder { pid, comm });
                break;
            }
        }
        if out.len() >= 4 {
            break;
        }
    }
    out
}

/// An inode as the kernel prints it in lock lines: `MAJ:MIN:INODE` (device in hex).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LockKey {
    major: u64,
    minor: u64,
    ino: u64,
}

impl LockKey {
    /// The key of an inode on device `dev` (the kernel's encoding of st_dev).
    fn of(dev: u64, ino: u64) -> LockKey {
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        LockKey { major, minor, ino }
    }

    /// Whether `line` of an fdinfo file (`lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:123 100 101`)
    /// is a byte-range lock on this inode covering `byte`.
    fn covered_by(&self, line: &str, byte: u64) -> bool {
        let Some(rest) = line.strip_prefix("lock:") else { return false };
        let toks: Vec<&str> = rest.split_whitespace().collect();
        if !matches!(toks.get(1), Some(&"OFDLCK") | Some(&"POSIX")) {
            return false;
        }
        let Some(i) = toks.iter().position(|t| t.matches(':').count() == 2) else { return false };
        let mut parts = toks[i].split(':');
        let (Some(ma), Some(mi), Some(ino)) = (parts.next(), parts.next(), parts.next()) else { return false };
        let parsed = (u64::from_str_radix(ma, 16), u64::from_str_radix(mi, 16), ino.parse::<u64>());
        let (Ok(major), Ok(minor), Ok(ino)) = parsed else { return false };
        if (LockKey { major, minor, ino }) != *self {
            return false;
        }
        let start = toks.get(i + 1).and_then(|s| s.parse::<u64>().ok());
        let end = toks.get(i + 2).map(|s| if *s == "EOF" { Some(u64::MAX) } else { s.parse::<u64>().ok() });
        matches!((start, end), (Some(s), Some(Some(e))) if s <= byte && byte <= e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn new(name: &str) -> TempFile {
            let p = std::env::temp_dir().join(format!("thinblk-lock-{name}-{}", std::process::id()));
            std::fs::write(&p, vec![0u8; 4096]).expect("create file");
            TempFile(p)
        }
        fn open(&self) -> File {
            std::fs::OpenOptions::new().read(true).write(true).open(&self.0).expect("open file")
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn refused(r: Result<ImageLock, LockError>) -> (Perm, Conflict, Vec<Holder>) {
        match r {
            Err(LockError::Refused { perm, conflict, holders }) => (perm, conflict, holders),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn qemu_bytes_for_each_role() {
        let bytes = |a: Access| {
            let mut v: Vec<u64> = Perm::ALL.into_iter().filter(|p| a.perm.has(*p)).map(Perm::held_byte).collect();
            v.extend(Perm::ALL.into_iter().filter(|p| a.unshared().has(*p)).map(Perm::unshared_byte));
            v
        };
        // What qemu-storage-daemon 10.0 takes for a qcow2 export and its backing file.
        assert_eq!(bytes(Access::qcow2(true)), vec![100, 101, 103, 201, 203]);
        assert_eq!(bytes(Access::qcow2(false)), vec![100, 201, 203]);
        assert_eq!(bytes(Access::backing()), vec![100, 201, 203]);
        assert_eq!(bytes(Access::raw(true)), vec![100, 101, 201]);
        assert_eq!(bytes(Access::raw(false)), vec![100, 201]);
        assert_eq!(bytes(Access::NONE), Vec::<u64>::new());
        // An inactive image (a migration not handed over yet): none, as QEMU 10.0.
        assert_eq!(bytes(Access::inactive()), Vec::<u64>::new());
    }

    #[test]
    fn two_descriptions_in_one_process_conflict_as_qemu_says() {
        let t = TempFile::new("conflict");
        let (fa, fb, fc) = (t.open(), t.open(), t.open());
        let a = ImageLock::acquire(&fa, Access::qcow2(true)).expect("first writer");
        // A second writer wants "write", which the first does not share.
        let (perm, conflict, holders) = refused(ImageLock::acquire(&fb, Access::qcow2(true)));
        assert_eq!((perm, conflict), (Perm::Write, Conflict::Wanted));
        assert!(holders.iter().any(|h| h.pid == std::process::id()), "holder not found: {holders:?}");
        // A reader does not share "write", which the writer holds.
        let (perm, conflict, _) = refused(ImageLock::acquire(&fb, Access::backing()));
        assert_eq!((perm, conflict), (Perm::Write, Conflict::Unshared));
        let msg = refused(ImageLock::acquire(&fb, Access::qcow2(false)));
        let text = LockError::Refused { perm: msg.0, conflict: msg.1, holders: msg.2 }.to_string();
        assert!(text.starts_with("Failed to get shared \"write\" lock: pid "), "{text}");
        // A reader that shares everything (qemu-img info -U) coexists; the refusals left no byte.
        let c = ImageLock::acquire(&fc, Access { perm: Perms::of(&[Perm::ConsistentRead]), shared: Perms::ALL })
            .expect("force-share reader");
        drop(c);
        drop(fc);
        // The writer's locks live on a description of their own: they go with the lock (the
        // served image keeps it as long as it is open), whatever happens to `fa`.
        drop(fa);
        assert!(matches!(ImageLock::acquire(&fb, Access::backing()), Err(LockError::Refused { .. })));
        drop(a);
        let b = ImageLock::acquire(&fb, Access::qcow2(true)).expect("writer after the first closed");
        assert_eq!(b.access(), Access::qcow2(true));
    }

    #[test]
    fn readers_share_and_change_upgrades_or_keeps_the_old_access() {
        let t = TempFile::new("change");
        let (fa, fb) = (t.open(), t.open());
        let mut a = ImageLock::acquire(&fa, Access::backing()).expect("reader a");
        let b = ImageLock::acquire(&fb, Access::backing()).expect("reader b");
        // a cannot become a writer while b reads without sharing "write"...
        let e = a.change(Access::qcow2(true)).expect_err("upgrade while b reads");
        assert!(matches!(e, LockError::Refused { perm: Perm::Write, conflict: Conflict::Wanted, .. }), "{e}");
        assert_eq!(a.access(), Access::backing());
        // ...and keeps its reader bytes only: a third reader is still welcome.
        let fc = t.open();
        ImageLock::acquire(&fc, Access::backing()).expect("third reader");
        drop(fc);
        drop(b);
        drop(fb);
        a.change(Access::qcow2(true)).expect("upgrade once alone");
        let fd = t.open();
        let (perm, conflict, _) = refused(ImageLock::acquire(&fd, Access::backing()));
        assert_eq!((perm, conflict), (Perm::Write, Conflict::Unshared));
        // Back to reader: the write bytes are released.
        a.change(Access::backing()).expect("downgrade");
        ImageLock::acquire(&fd, Access::backing()).expect("reader after the downgrade");
    }

    #[test]
    fn locking_off_takes_nothing() {
        let t = TempFile::new("off");
        let (fa, fb) = (t.open(), t.open());
        assert!(lock_image(&fa, &t.0, Access::qcow2(true), Locking::Off).expect("off").is_none());
        let _b = lock_image(&fb, &t.0, Access::qcow2(true), Locking::On).expect("on").expect("a lock");
    }

    #[test]
    fn fdinfo_lock_lines() {
        let key = LockKey::of(0xfe00, 10010787);
        assert_eq!((key.major, key.minor), (0xfe, 0));
        let line = "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:10010787 100 101";
        assert!(key.covered_by(line, 100) && key.covered_by(line, 101));
        assert!(!key.covered_by(line, 103));
        assert!(!LockKey::of(0xfe00, 10010788).covered_by(line, 100));
        assert!(key.covered_by("lock:\t2: POSIX  ADVISORY  WRITE 77 fe:00:10010787 0 EOF", 201));
        assert!(!key.covered_by("lock:\t3: FLOCK  ADVISORY  WRITE 77 fe:00:10010787 0 EOF", 201));
        assert!(!key.covered_by("pos:\t0", 100));
        // A large device number (major 259, minor 300).
        let dev = (259u64 << 8) | (300 & 0xff) | ((300 & !0xff) << 12);
        let big = LockKey::of(dev, 5);
        assert!(big.covered_by("lock:\t1: OFDLCK ADVISORY  READ -1 103:12c:5 200 200", 200));
    }
}

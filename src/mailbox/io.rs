//! The mailbox volumes on storage (spec §1.15): whole 4 KiB blocks with O_DIRECT, and a
//! per-host lock file (`flock`) serializing the request block's read-modify-write among the
//! thinblk processes of one host.
//!
//! The lock file is ours alone: created 0600 in a directory created 0700, refused when another
//! user owns it, and taken with a timeout, so no local user can hold every extension (or a
//! shutdown) hostage by locking it.
//!
//! Next to it, each process holds a per-volume lock file (`<host lock>.<volume uuid>`) for its
//! whole life: the kernel drops the `flock` when the process dies, so another process of the
//! host can tell a request of a live process from one a dead process left (docs/mailbox.md,
//! "Stale slots"). The files are never removed (removing a lock file races with its takers).
//! A second mailbox of the same process (a merge job's, growing a base the daemon's own
//! mailbox once claimed) is opened [`FileMailbox::sharing_claims`]: it shares a volume lock
//! this process already holds instead of being refused by it, and the lock is released when
//! the last mailbox holding it is gone.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::client::{MailboxIo, Owner};
use super::wire::{block_offset, Uuid, BLOCK_LEN};

/// A 4 KiB block aligned for O_DIRECT.
#[repr(C, align(4096))]
struct AlignedBlock([u8; BLOCK_LEN]);

/// How long the lock is waited for before the attempt fails (and is retried at the next tick).
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(2);

/// Opens (creating) the per-host lock file: its directory is created 0700, the file 0600,
/// and a file another user owns, or others may write, is refused.
pub(crate) fn open_lock(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        }
    }
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path)?;
    let meta = file.metadata()?;
    // SAFETY: geteuid has no failure mode and no memory effects.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("mailbox lock {} is owned by uid {}, not by us (uid {me}): remove it", path.display(), meta.uid()),
        ));
    }
    if meta.mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

/// Takes `lock` exclusively, giving up after `timeout` (`TimedOut`).
pub(crate) fn lock_with_timeout(lock: &File, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: flock on a file we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) && e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, format!("mailbox lock held by another process for {timeout:?}")));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// How long a volume claim waits for its lock (another process probing it holds it for
/// microseconds; a live process serving the same volume holds it for good).
const CLAIM_TIMEOUT: Duration = Duration::from_millis(100);

/// The volume locks this process holds (by lock file), shared by its mailboxes.
static HELD: Mutex<Vec<(PathBuf, Weak<File>)>> = Mutex::new(Vec::new());

/// Takes the volume lock at `path`; with `share`, the one a mailbox of this process already
/// holds is shared instead (without, it refuses the claim as another process's would).
fn claim_volume(path: &Path, volume: Uuid, share: bool) -> io::Result<Arc<File>> {
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    held.retain(|(_, w)| w.strong_count() > 0);
    if let Some(f) = held.iter().find(|(p, _)| share && p == path).and_then(|(_, w)| w.upgrade()) {
        return Ok(f);
    }
    let file = open_lock(path)?;
    lock_with_timeout(&file, CLAIM_TIMEOUT).map_err(|e| match e.kind() {
        io::ErrorKind::TimedOut => io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("another live process serves volume {volume} on this host (it holds {})", path.display()),
        ),
        _ => e,
    })?;
    let file = Arc::new(file);
    held.push((path.to_path_buf(), Arc::downgrade(&file)));
    Ok(file)
}

/// The per-volume lock file next to the host lock `lock_path`.
pub fn volume_lock_path(lock_path: &Path, volume: Uuid) -> PathBuf {
    let mut p = lock_path.as_os_str().to_owned();
    p.push(format!(".{volume}"));
    PathBuf::from(p)
}

/// Whether the per-volume lock at `path` is held: [`Owner::Gone`] when it exists, is ours and
/// nobody holds it; [`Owner::Unknown`] when there is none (or it is not ours).
pub(crate) fn probe_owner(path: &Path) -> Owner {
    let Ok(file) = OpenOptions::new().read(true).write(true).open(path) else { return Owner::Unknown };
    // SAFETY: geteuid has no failure mode and no memory effects.
    let me = unsafe { libc::geteuid() };
    if file.metadata().map(|m| m.uid() != me).unwrap_or(true) {
        return Owner::Unknown;
    }
    // SAFETY: flock on a file we opened.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        // SAFETY: as above (closing the file would release it too).
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
        return Owner::Gone;
    }
    if io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK) {
        Owner::Alive
    } else {
        Owner::Unknown
    }
}

/// One host's view of the two mailbox volumes.
pub struct FileMailbox {
    /// The SPM's inbox: we write our requests (and the doorbell) here.
    spm_inbox: File,
    /// The SPM's outbox: replies arrive here.
    spm_outbox: File,
    host: u16,
    lock: File,
    lock_path: PathBuf,
    /// Our volumes' locks, held while this process lives (a snapshot adds the new top's).
    claimed: Vec<(Uuid, Arc<File>)>,
    /// Claims share the locks other mailboxes of this process hold.
    share: bool,
    buf: Box<AlignedBlock>,
}

/// Opens a mailbox volume with O_DIRECT (buffered where the file system refuses it).
pub(crate) fn open_volume(path: &Path, write: bool) -> io::Result<File> {
    let open = |direct: bool| {
        let mut o = OpenOptions::new();
        o.read(true).write(write);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(path)
    };
    match open(true) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open(false),
        other => other,
    }
}

impl FileMailbox {
    /// Opens the mailbox volumes for host `host`, locking through `lock_path`.
    pub fn open(spm_inbox: &Path, spm_outbox: &Path, host: u16, lock_path: &Path) -> io::Result<FileMailbox> {
        Ok(FileMailbox {
            spm_inbox: open_volume(spm_inbox, true)?,
            spm_outbox: open_volume(spm_outbox, false)?,
            host,
            lock: open_lock(lock_path)?,
            lock_path: lock_path.to_path_buf(),
            claimed: Vec::new(),
            share: false,
            buf: Box::new(AlignedBlock([0; BLOCK_LEN])),
        })
    }

    /// This mailbox is a second one of the process: a volume this process already claimed
    /// through another mailbox is shared, not refused.
    pub fn sharing_claims(mut self) -> FileMailbox {
        self.share = true;
        self
    }

    fn read_block(&mut self, outbox: bool, offset: u64) -> io::Result<[u8; BLOCK_LEN]> {
        let f = if outbox { &self.spm_outbox } else { &self.spm_inbox };
        let n = f.read_at(&mut self.buf.0, offset)?;
        if n != BLOCK_LEN {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("short mailbox read ({n} bytes)")));
        }
        Ok(self.buf.0)
    }

    fn write_block(&mut self, block: &[u8; BLOCK_LEN], offset: u64) -> io::Result<()> {
        self.buf.0.copy_from_slice(block);
        self.spm_inbox.write_all_at(&self.buf.0, offset)
    }
}

impl MailboxIo for FileMailbox {
    fn read_replies(&mut self) -> io::Result<[u8; BLOCK_LEN]> {
        self.read_block(true, block_offset(self.host))
    }

    fn read_requests(&mut self) -> io::Result<[u8; BLOCK_LEN]> {
        self.read_block(false, block_offset(self.host))
    }

    fn write_requests(&mut self, block: &[u8; BLOCK_LEN]) -> io::Result<()> {
        self.write_block(block, block_offset(self.host))
    }

    fn write_event(&mut self, block: &[u8; BLOCK_LEN]) -> io::Result<()> {
        self.write_block(block, 0)
    }

    fn lock(&mut self) -> io::Result<()> {
        lock_with_timeout(&self.lock, LOCK_TIMEOUT)
    }

    fn unlock(&mut self) {
        // SAFETY: flock on a file we own.
        unsafe { libc::flock(self.lock.as_raw_fd(), libc::LOCK_UN) };
    }

    fn claim(&mut self, volume: Uuid) -> io::Result<()> {
        if self.claimed.iter().any(|(v, _)| *v == volume) {
            return Ok(());
        }
        let file = claim_volume(&volume_lock_path(&self.lock_path, volume), volume, self.share)?;
        self.claimed.push((volume, file));
        Ok(())
    }

    fn owner(&mut self, volume: Uuid) -> Owner {
        probe_owner(&volume_lock_path(&self.lock_path, volume))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::client::Client;
    use crate::mailbox::spm::Spm;
    use crate::mailbox::wire::{Extend, Uuid, CLEAN, SPM_REGION_LEN};

    #[test]
    fn handshake_through_files_with_two_processes() {
        let dir = std::env::temp_dir().join(format!("thinblk-mbox-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let inbox = dir.join("inbox");
        let outbox = dir.join("outbox");
        std::fs::write(&inbox, vec![0u8; 16 << 20]).unwrap();
        std::fs::write(&outbox, vec![0u8; 16 << 20]).unwrap();
        let lock = dir.join("host-5.lock");
        let domain = Uuid::parse("8adbc85e-e554-4ae0-b318-8a5465fe5fe1").unwrap();
        let vols = [
            Uuid::parse("d772f1c6-3ebb-43c3-a42e-73fcd8255a5f").unwrap(),
            Uuid::parse("11111111-2222-3333-4444-555555555555").unwrap(),
        ];
        let mut ios: Vec<FileMailbox> = (0..2).map(|_| FileMailbox::open(&inbox, &outbox, 5, &lock).unwrap()).collect();
        let mut clients: Vec<Client> = vols.iter().map(|v| Client::new(*v, Box::new(|| [9; 16]))).collect();
        for (c, io) in clients.iter_mut().zip(ios.iter_mut()) {
            c.start(io).unwrap();
        }
        for (k, (c, io)) in clients.iter_mut().zip(ios.iter_mut()).enumerate() {
            c.submit(Extend { domain, volume: vols[k], size_mib: 1000 + k as u64 }).unwrap();
            c.poll(io).unwrap();
        }
        // The SPM side, reading and writing the files directly.
        let mut spm = Spm::new();
        let region = std::fs::read(&inbox).unwrap();
        let scan = spm.scan(&region[..SPM_REGION_LEN]);
        assert_eq!(scan.requests.len(), 2);
        let out = OpenOptions::new().write(true).open(&outbox).unwrap();
        for (id, req) in &scan.requests {
            let (off, block) = spm.reply(*id, req, true).unwrap();
            out.write_all_at(&block, off).unwrap();
        }
        for (k, (c, io)) in clients.iter_mut().zip(ios.iter_mut()).enumerate() {
            let done = c.poll(io).unwrap();
            assert_eq!(done.len(), 1);
            assert_eq!(done[0].request.size_mib, 1000 + k as u64);
        }
        let region = std::fs::read(&inbox).unwrap();
        assert_eq!(&region[5 * 4096..5 * 4096 + 64], &CLEAN[..]);
        assert_eq!(&region[5 * 4096 + 64..5 * 4096 + 128], &CLEAN[..]);
        assert_eq!(&region[..4], &[0, b'e', b'v', b't'][..], "doorbell");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn volume_locks_tell_live_processes_from_gone_ones() {
        let dir = std::env::temp_dir().join(format!("thinblk-mbvol-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (inbox, outbox) = (dir.join("inbox"), dir.join("outbox"));
        std::fs::write(&inbox, vec![0u8; 1 << 20]).unwrap();
        std::fs::write(&outbox, vec![0u8; 1 << 20]).unwrap();
        let lock = dir.join("run/host-2.lock");
        let a = Uuid::parse("d772f1c6-3ebb-43c3-a42e-73fcd8255a5f").unwrap();
        let b = Uuid::parse("11111111-2222-3333-4444-555555555555").unwrap();
        let mut pa = FileMailbox::open(&inbox, &outbox, 2, &lock).unwrap();
        let mut pb = FileMailbox::open(&inbox, &outbox, 2, &lock).unwrap();
        pa.claim(a).unwrap();
        assert_eq!(pa.owner(b), Owner::Unknown, "b never ran here");
        pb.claim(b).unwrap();
        pb.claim(b).unwrap();
        assert!(volume_lock_path(&lock, b).ends_with("host-2.lock.11111111-2222-3333-4444-555555555555"));
        assert_eq!(pa.owner(b), Owner::Alive);
        // A second process for the same volume is refused while the first lives.
        let mut pb2 = FileMailbox::open(&inbox, &outbox, 2, &lock).unwrap();
        assert_eq!(pb2.claim(b).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        drop(pb);
        assert_eq!(pa.owner(b), Owner::Gone, "the lock died with its process");
        pb2.claim(b).unwrap();
        assert_eq!(pa.owner(b), Owner::Alive);
        // A second mailbox of the process that holds it (a merge job's) shares the claim; the
        // lock lives on until the last of them is gone.
        let mut job = FileMailbox::open(&inbox, &outbox, 2, &lock).unwrap().sharing_claims();
        job.claim(b).unwrap();
        drop(pb2);
        assert_eq!(pa.owner(b), Owner::Alive, "the job's mailbox still holds it");
        drop(job);
        assert_eq!(pa.owner(b), Owner::Gone);
        // Sharing takes the lock itself when no mailbox of the process holds it.
        let mut job = FileMailbox::open(&inbox, &outbox, 2, &lock).unwrap().sharing_claims();
        job.claim(b).unwrap();
        assert_eq!(pa.owner(b), Owner::Alive);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_lock_is_private_and_never_waited_for_forever() {
        let dir = std::env::temp_dir().join(format!("thinblk-mblock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("run/host-3.lock");
        let f = open_lock(&path).unwrap();
        assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777, 0o700);
        assert_eq!(f.metadata().unwrap().mode() & 0o777, 0o600);
        // Someone else holds it (flock is per open file description): we give up in time.
        let other = open_lock(&path).unwrap();
        lock_with_timeout(&other, Duration::from_secs(1)).unwrap();
        let t = Instant::now();
        let e = lock_with_timeout(&f, Duration::from_millis(200)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(2));
        drop(other);
        lock_with_timeout(&f, Duration::from_millis(200)).unwrap();
        // A lock file others may write is narrowed; one owned by another user is refused.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        drop(open_lock(&path).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        // SAFETY: chown of our own test file.
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        if unsafe { libc::chown(c.as_ptr(), 65534, 65534) } == 0 {
            let e = open_lock(&path).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

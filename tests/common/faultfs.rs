//! A fault-injection FUSE file system for tests: it serves one file, `disk`, backed by a real
//! file, and on command fails reads and/or writes with an errno, delays them, or hangs them.
//! It runs outside the daemon, so the daemon's io_uring sees real kernel errors.
//! Opened files bypass the page cache (FOPEN_DIRECT_IO): every IO reaches the fixture.
//!
//! In log-writes mode it also records every write (with its data), every zeroing fallocate,
//! every size change and every fsync, in the order they completed (the session is one thread),
//! so a test can rebuild the file as a power loss at any point could have left it. Each
//! logged event also takes a number from one counter shared by every mount of the process
//! ([`global_seq`]), so the logs of several mounts (one file each) merge into the order
//! their events completed in.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    BackgroundSession, FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow,
};

const ROOT: u64 = 1;
const DISK: u64 = 2;
const TTL: Duration = Duration::from_secs(0);
const FOPEN_DIRECT_IO: u32 = 1;

/// The next number a logged event takes, shared by every mount of the process.
static SEQ: AtomicU64 = AtomicU64::new(0);

/// How many events every mount of the process logged so far: an event logged from now on
/// takes this number or a later one, every event logged before took a smaller one.
pub fn global_seq() -> u64 {
    SEQ.load(Ordering::SeqCst)
}

/// What the fixture does to IO right now (0 errno: no fault).
#[derive(Default)]
pub struct Faults {
    /// Fail reads with this errno.
    pub read_errno: AtomicI32,
    /// Fail writes (and fsync, fallocate) with this errno.
    pub write_errno: AtomicI32,
    /// Delay every IO this long.
    pub delay_ms: AtomicU64,
    /// Hold every IO until cleared.
    pub hang: AtomicBool,
    /// Reads failed so far.
    pub reads_failed: AtomicU64,
    /// Writes failed so far.
    pub writes_failed: AtomicU64,
    /// fsync succeeds even while writes fail (storage that drops writes but acks syncs).
    pub sync_ok: AtomicBool,
    /// The write log, each event with its number from [`global_seq`] (None: not logging).
    log: std::sync::Mutex<Option<Vec<(u64, LogEvent)>>>,
    /// Events logged so far (readable without the lock).
    logged: AtomicU64,
    /// Every modification (write, zeroing, size change) as (pid of the calling process,
    /// wall-clock milliseconds since the epoch), always kept: who wrote the file, and when.
    writers: std::sync::Mutex<Vec<(u32, u64)>>,
}

/// One completed modification of the served file.
#[derive(Clone, Debug)]
pub enum LogEvent {
    /// Bytes written at an offset.
    Write(u64, Vec<u8>),
    /// A range that reads zeroes from now on (punch hole, zero range).
    Zero(u64, u64),
    /// The file's size was set.
    SetLen(u64),
    /// An fsync/fdatasync completed: every event before it is durable.
    Sync,
}

impl Faults {
    /// Fails writes with `errno` (0 clears).
    pub fn fail_writes(&self, errno: i32) {
        self.write_errno.store(errno, Ordering::SeqCst);
    }
    /// Fails reads with `errno` (0 clears).
    pub fn fail_reads(&self, errno: i32) {
        self.read_errno.store(errno, Ordering::SeqCst);
    }
    /// Starts logging every modification (clearing an earlier log).
    pub fn start_log(&self) {
        if let Ok(mut l) = self.log.lock() {
            *l = Some(Vec::new());
        }
        self.logged.store(0, Ordering::SeqCst);
    }
    /// Stops logging and returns the log.
    pub fn take_log(&self) -> Vec<LogEvent> {
        self.take_numbered_log().into_iter().map(|(_, e)| e).collect()
    }
    /// Stops logging and returns the log, each event with its process-wide number (rising).
    pub fn take_numbered_log(&self) -> Vec<(u64, LogEvent)> {
        self.log.lock().ok().and_then(|mut l| l.take()).unwrap_or_default()
    }
    /// Events logged so far.
    pub fn log_len(&self) -> u64 {
        self.logged.load(Ordering::SeqCst)
    }
    fn record(&self, ev: LogEvent) {
        if let Ok(mut l) = self.log.lock() {
            if let Some(v) = l.as_mut() {
                // Numbered once the operation is done and before it is answered: an event the
                // daemon caused after seeing another's reply takes a larger number.
                v.push((SEQ.fetch_add(1, Ordering::SeqCst), ev));
                self.logged.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    /// Records a modification by thread `tid` (FUSE reports the calling thread: a queue
    /// thread, an io_uring worker) as one by its process, looked up while the call is in
    /// progress (so the thread exists).
    fn modified_by(&self, tid: u32) {
        let ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let pid = std::fs::read_to_string(format!("/proc/{tid}/status"))
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Tgid:").and_then(|v| v.trim().parse().ok())))
            .unwrap_or(tid);
        self.writers.lock().unwrap_or_else(|e| e.into_inner()).push((pid, ms));
    }

    /// The modifications so far: (pid, wall-clock ms since the epoch), oldest first.
    pub fn modifications(&self) -> Vec<(u32, u64)> {
        self.writers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Clears every fault.
    pub fn clear(&self) {
        self.fail_writes(0);
        self.fail_reads(0);
        self.sync_ok.store(false, Ordering::SeqCst);
        self.delay_ms.store(0, Ordering::SeqCst);
        self.hang.store(false, Ordering::SeqCst);
    }
}

struct FaultFs {
    backing: File,
    faults: Arc<Faults>,
}

impl FaultFs {
    fn attr(&self, ino: u64) -> FileAttr {
        let (kind, perm, size) = if ino == ROOT {
            (FileType::Directory, 0o755, 0)
        } else {
            (FileType::RegularFile, 0o644, self.backing.metadata().map(|m| m.len()).unwrap_or(0))
        };
        let t = SystemTime::UNIX_EPOCH;
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Delays or holds an IO as configured.
    fn stall(&self) {
        let d = self.faults.delay_ms.load(Ordering::SeqCst);
        if d > 0 {
            std::thread::sleep(Duration::from_millis(d));
        }
        while self.faults.hang.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn write_fault(&self) -> Option<i32> {
        match self.faults.write_errno.load(Ordering::SeqCst) {
            0 => None,
            e => {
                self.faults.writes_failed.fetch_add(1, Ordering::SeqCst);
                Some(e)
            }
        }
    }
}

impl Filesystem for FaultFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT && name == "disk" {
            reply.entry(&TTL, &self.attr(DISK), 0);
        } else {
            reply.error(libc::ENOENT);
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        reply.attr(&TTL, &self.attr(ino));
    }

    fn setattr(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        if let Some(s) = size {
            if let Err(e) = self.backing.set_len(s) {
                return reply.error(e.raw_os_error().unwrap_or(libc::EIO));
            }
            self.faults.modified_by(req.pid());
            self.faults.record(LogEvent::SetLen(s));
        }
        reply.attr(&TTL, &self.attr(ino));
    }

    fn open(&mut self, _req: &Request<'_>, _ino: u64, _flags: i32, reply: ReplyOpen) {
        reply.opened(0, FOPEN_DIRECT_IO);
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        self.stall();
        match self.faults.read_errno.load(Ordering::SeqCst) {
            0 => {}
            e => {
                self.faults.reads_failed.fetch_add(1, Ordering::SeqCst);
                return reply.error(e);
            }
        }
        let mut buf = vec![0u8; size as usize];
        let mut n = 0;
        while n < buf.len() {
            match self.backing.read_at(&mut buf[n..], offset as u64 + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => return reply.error(e.raw_os_error().unwrap_or(libc::EIO)),
            }
        }
        reply.data(&buf[..n]);
    }

    fn write(
        &mut self,
        req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyWrite,
    ) {
        self.stall();
        if let Some(e) = self.write_fault() {
            return reply.error(e);
        }
        match self.backing.write_all_at(data, offset as u64) {
            Ok(()) => {
                self.faults.modified_by(req.pid());
                self.faults.record(LogEvent::Write(offset as u64, data.to_vec()));
                reply.written(data.len() as u32)
            }
            Err(e) => reply.error(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }

    fn fallocate(&mut self, req: &Request<'_>, _ino: u64, _fh: u64, offset: i64, length: i64, mode: i32, reply: ReplyEmpty) {
        use std::os::fd::AsRawFd;
        self.stall();
        if let Some(e) = self.write_fault() {
            return reply.error(e);
        }
        let before = self.backing.metadata().map(|m| m.len()).unwrap_or(0);
        // SAFETY: plain syscall on the fixture's own backing fd.
        if unsafe { libc::fallocate(self.backing.as_raw_fd(), mode, offset, length) } != 0 {
            return reply.error(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO));
        }
        if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
            self.faults.modified_by(req.pid());
            self.faults.record(LogEvent::Zero(offset as u64, length as u64));
        }
        let after = self.backing.metadata().map(|m| m.len()).unwrap_or(0);
        if after != before {
            self.faults.record(LogEvent::SetLen(after));
        }
        reply.ok();
    }

    fn fsync(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        self.stall();
        if !self.faults.sync_ok.load(Ordering::SeqCst) {
            if let Some(e) = self.write_fault() {
                return reply.error(e);
            }
        }
        match self.backing.sync_data() {
            Ok(()) => {
                self.faults.record(LogEvent::Sync);
                reply.ok()
            }
            Err(e) => reply.error(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock_owner: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _flags: i32, _lock: Option<u64>, _flush: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        if ino != ROOT {
            return reply.error(libc::ENOTDIR);
        }
        let entries = [(ROOT, FileType::Directory, "."), (ROOT, FileType::Directory, ".."), (DISK, FileType::RegularFile, "disk")];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as i64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A mounted fixture; unmounted when dropped.
pub struct FaultMount {
    session: Option<BackgroundSession>,
    dir: PathBuf,
    /// The fault switches.
    pub faults: Arc<Faults>,
}

impl FaultMount {
    /// Mounts the fixture at `mountpoint` (created), serving `backing` as `disk`.
    pub fn new(backing: &Path, mountpoint: &Path) -> FaultMount {
        std::fs::create_dir_all(mountpoint).expect("mountpoint");
        let file = std::fs::OpenOptions::new().read(true).write(true).open(backing).expect("open backing file");
        let faults = Arc::new(Faults::default());
        let fs = FaultFs { backing: file, faults: faults.clone() };
        let opts = [MountOption::FSName("thinblk-faultfs".into()), MountOption::AllowOther];
        let session = fuser::spawn_mount2(fs, mountpoint, &opts).expect("mount the fault fixture (needs /dev/fuse and root)");
        FaultMount { session: Some(session), dir: mountpoint.to_path_buf(), faults }
    }

    /// The served file.
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk")
    }
}

impl Drop for FaultMount {
    fn drop(&mut self) {
        self.faults.clear();
        // Unmount ourselves (lazily, so a straggler cannot keep it busy): dropping fuser's
        // session alone left the mount behind. Declare the mount before the daemon using it,
        // so the daemon is gone first.
        if let Ok(path) = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes()) {
            // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
            if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
                eprintln!("faultfs: unmounting {}: {}", self.dir.display(), std::io::Error::last_os_error());
            }
        }
        drop(self.session.take());
    }
}

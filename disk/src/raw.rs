//! Raw images: a regular file or a block device, byte for byte the guest's disk.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::disk::*;
use crate::error::ImageError;
use crate::lock::{change_lock, lock_image, Access, ImageLock, LockError, Locking};
use crate::sys::{image_identity, open_direct};

/// A raw image.
#[derive(Debug)]
pub struct RawImage {
    file: File,
    path: PathBuf,
    capacity: u64,
    alignment: u32,
    physical_block_size: u32,
    identity: String,
    discard_unmap: bool,
    read_only: bool,
    /// Serves IO here (false: inactive, see [`Disk::activate`]).
    active: AtomicBool,
    /// QEMU-compatible locks, once [`RawImage::lock`] took them; the mutex also serializes
    /// activation and inactivation.
    lock: Mutex<Option<ImageLock>>,
}

impl RawImage {
    /// Opens `path` for zero-copy IO (see [`open_direct`]); `discard_unmap` lets discards
    /// (and write-zeroes with unmap) release host space.
    pub fn open(path: &Path, read_only: bool, discard_unmap: bool) -> Result<Self, ImageError> {
        let (file, info) = open_direct(path, read_only)?;
        Ok(RawImage {
            file,
            path: path.to_path_buf(),
            capacity: info.size,
            alignment: info.alignment,
            physical_block_size: info.physical_block_size,
            identity: image_identity(path),
            discard_unmap,
            read_only,
            active: AtomicBool::new(true),
            lock: Mutex::new(None),
        })
    }

    /// Makes the image start inactive (an incoming migration's destination): it takes only
    /// [`Access::inactive`] locks and serves no IO until [`Disk::activate`]. Call before
    /// [`RawImage::lock`].
    pub fn inactive(self) -> Self {
        self.active.store(false, Ordering::Release);
        self
    }

    /// The access this image's state calls for.
    fn access(&self, active: bool) -> Access {
        if active { Access::raw(!self.read_only) } else { Access::inactive() }
    }

    /// Takes the locks QEMU takes on a raw image under a virtio-blk device
    /// ([`Access::raw`]; [`Access::inactive`] while inactive), for as long as the image
    /// stays open.
    pub fn lock(&mut self, path: &Path, mode: Locking) -> Result<(), LockError> {
        let want = self.access(self.active.load(Ordering::Acquire));
        let taken = lock_image(&self.file, path, want, mode)?;
        match self.lock.get_mut() {
            Ok(slot) => *slot = taken,
            Err(poisoned) => *poisoned.into_inner() = taken,
        }
        Ok(())
    }

    /// Fails unless the image is active: one atomic load on the data path.
    fn check_active(&self) -> Result<(), ImageError> {
        if self.active.load(Ordering::Acquire) { Ok(()) } else { Err(ImageError::Inactive) }
    }
}

fn poisoned() -> ImageError {
    ImageError::Io(std::io::Error::other("image lock state poisoned"))
}

impl Disk for RawImage {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn files(&self) -> Vec<RawFd> {
        vec![self.file.as_raw_fd()]
    }

    fn io_alignment(&self) -> u32 {
        self.alignment
    }

    fn physical_block_size(&self) -> u32 {
        self.physical_block_size
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn map_read(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), ImageError> {
        self.check_active()?;
        out.push(Extent { req_off: 0, len, target: Target::Host { file: 0, offset } });
        Ok(())
    }

    fn map_write(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<WriteTicket, ImageError> {
        self.map_read(offset, len, out)?;
        Ok(WriteTicket::default())
    }

    fn map_zero(&self, offset: u64, len: u64, req: ZeroRequest, out: &mut Vec<HostZero>) -> Result<WriteTicket, ImageError> {
        self.check_active()?;
        let mode = match (req, self.discard_unmap) {
            // Discard with host discard disabled: nothing to do (contents are unspecified).
            (ZeroRequest::Discard, false) => return Ok(WriteTicket::default()),
            (r, true) if r.may_unmap() => ZeroMode::PunchHole,
            _ => ZeroMode::ZeroRange,
        };
        out.push(HostZero { file: 0, offset, len, mode });
        Ok(WriteTicket::default())
    }

    fn activate(&self, wait: Duration) -> Result<(), ImageError> {
        let mut lock = self.lock.lock().map_err(|_| poisoned())?;
        if self.active.load(Ordering::Acquire) {
            return Ok(());
        }
        let started = Instant::now();
        change_lock(lock.as_mut(), &self.path, self.access(true), wait)?;
        self.active.store(true, Ordering::Release);
        tracing::info!(image = %self.path.display(), lock_wait_ms = started.elapsed().as_millis() as u64, "image activated");
        Ok(())
    }

    fn inactivate(&self) -> Result<(), ImageError> {
        let mut lock = self.lock.lock().map_err(|_| poisoned())?;
        if !self.active.load(Ordering::Acquire) {
            return Ok(());
        }
        let started = Instant::now();
        // SAFETY: the fd belongs to the image, which is alive for this call.
        if unsafe { libc::fdatasync(self.file.as_raw_fd()) } != 0 {
            return Err(ImageError::Io(std::io::Error::last_os_error()));
        }
        let synced = started.elapsed();
        self.active.store(false, Ordering::Release);
        // Dropping locks cannot conflict: only a kernel error fails here, and the image is
        // inactive all the same (it writes nothing more).
        let downgraded = change_lock(lock.as_mut(), &self.path, self.access(false), Duration::ZERO);
        tracing::info!(image = %self.path.display(), sync_ms = synced.as_millis() as u64, "image inactivated");
        downgraded
    }

    fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    fn close(&self) -> Result<(), ImageError> {
        // An inactive image (an incoming migration, or a source after its switch-over) was
        // synced when it was handed over and is written by another process now: nothing to do.
        if !self.is_active() {
            return Ok(());
        }
        // SAFETY: the fd belongs to the image, which is alive for this call.
        if unsafe { libc::fdatasync(self.file.as_raw_fd()) } != 0 {
            return Err(ImageError::Io(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_maps_one_to_one() {
        let dir = std::env::temp_dir().join(format!("thinblk-raw-{}", std::process::id()));
        std::fs::write(&dir, vec![0u8; 8192]).unwrap();
        struct Cleanup(std::path::PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let _cleanup = Cleanup(dir.clone());
        let img = RawImage::open(&dir, false, true).unwrap();
        assert_eq!(img.capacity(), 8192);
        let mut ext = Vec::new();
        img.map_read(4096, 512, &mut ext).unwrap();
        assert_eq!(ext, vec![Extent { req_off: 0, len: 512, target: Target::Host { file: 0, offset: 4096 } }]);
        let mut z = Vec::new();
        img.map_zero(0, 4096, ZeroRequest::Discard, &mut z).unwrap();
        assert_eq!(z[0].mode, ZeroMode::PunchHole);
        z.clear();
        img.map_zero(0, 4096, ZeroRequest::WriteZeroes { may_unmap: false }, &mut z).unwrap();
        assert_eq!(z[0].mode, ZeroMode::ZeroRange);
        let ignore = RawImage::open(&dir, false, false).unwrap();
        z.clear();
        ignore.map_zero(0, 4096, ZeroRequest::Discard, &mut z).unwrap();
        assert!(z.is_empty());
        ignore.map_zero(0, 4096, ZeroRequest::WriteZeroes { may_unmap: true }, &mut z).unwrap();
        assert_eq!(z[0].mode, ZeroMode::ZeroRange);
    }

    #[test]
    fn a_raw_image_hands_its_write_lock_over_and_back() {
        let path = std::env::temp_dir().join(format!("thinblk-raw-migrate-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 8192]).expect("create image");
        struct Cleanup(std::path::PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let _cleanup = Cleanup(path.clone());
        // Two opens in one process are two open file descriptions: their locks conflict as
        // two processes' do.
        let mut a = RawImage::open(&path, false, false).expect("open a");
        a.lock(&path, Locking::On).expect("lock a");
        let mut b = RawImage::open(&path, false, false).expect("open b").inactive();
        b.lock(&path, Locking::On).expect("an inactive open coexists with a writer");
        let mut ext = Vec::new();
        let mut z = Vec::new();
        assert!(matches!(b.map_read(0, 512, &mut ext), Err(ImageError::Inactive)));
        assert!(matches!(b.map_write(0, 512, &mut ext), Err(ImageError::Inactive)));
        assert!(matches!(b.map_zero(0, 512, ZeroRequest::WriteZeroes { may_unmap: false }, &mut z), Err(ImageError::Inactive)));
        assert!(ext.is_empty() && z.is_empty());
        let started = std::time::Instant::now();
        match b.activate(Duration::from_millis(100)) {
            Err(ImageError::Lock { source: LockError::Refused { holders, .. }, .. }) => {
                assert!(holders.iter().any(|h| h.pid == std::process::id()), "holder not named: {holders:?}");
            }
            other => panic!("activation while a writes: {other:?}"),
        }
        assert!(started.elapsed() >= Duration::from_millis(100), "gave up before the wait");
        assert!(!b.is_active());
        a.inactivate().expect("a hands over");
        a.inactivate().expect("twice is nothing");
        assert!(matches!(a.map_read(0, 512, &mut ext), Err(ImageError::Inactive)));
        b.activate(Duration::from_secs(5)).expect("b takes over");
        b.activate(Duration::ZERO).expect("twice is nothing");
        b.map_read(0, 512, &mut ext).expect("b serves");
        assert!(matches!(a.activate(Duration::ZERO), Err(ImageError::Lock { .. })));
        b.inactivate().expect("b hands back");
        a.activate(Duration::ZERO).expect("a takes back");
        assert!(a.is_active() && !b.is_active());
    }
}

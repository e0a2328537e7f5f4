//! Raw images: a regular file or a block device, byte for byte the guest's disk.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use crate::disk::*;
use crate::error::ImageError;
use crate::lock::{lock_image, Access, ImageLock, LockError, Locking};
use crate::sys::{image_identity, open_direct};

/// A raw image.
#[derive(Debug)]
pub struct RawImage {
    file: File,
    capacity: u64,
    alignment: u32,
    physical_block_size: u32,
    identity: String,
    discard_unmap: bool,
    read_only: bool,
    /// QEMU-compatible locks, once [`RawImage::lock`] took them.
    lock: Option<ImageLock>,
}

impl RawImage {
    /// Opens `path` for zero-copy IO (see [`open_direct`]); `discard_unmap` lets discards
    /// (and write-zeroes with unmap) release host space.
    pub fn open(path: &Path, read_only: bool, discard_unmap: bool) -> Result<Self, ImageError> {
        let (file, info) = open_direct(path, read_only)?;
        Ok(RawImage {
            file,
            capacity: info.size,
            alignment: info.alignment,
            physical_block_size: info.physical_block_size,
            identity: image_identity(path),
            discard_unmap,
            read_only,
            lock: None,
        })
    }

    /// Takes the locks QEMU takes on a raw image under a virtio-blk device
    /// ([`Access::raw`]), for as long as the image stays open.
    pub fn lock(&mut self, path: &Path, mode: Locking) -> Result<(), LockError> {
        self.lock = lock_image(&self.file, path, Access::raw(!self.read_only), mode)?;
        Ok(())
    }
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
        out.push(Extent { req_off: 0, len, target: Target::Host { file: 0, offset } });
        Ok(())
    }

    fn map_write(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<WriteTicket, ImageError> {
        self.map_read(offset, len, out)?;
        Ok(WriteTicket::default())
    }

    fn map_zero(&self, offset: u64, len: u64, req: ZeroRequest, out: &mut Vec<HostZero>) -> Result<WriteTicket, ImageError> {
        let mode = match (req, self.discard_unmap) {
            // Discard with host discard disabled: nothing to do (contents are unspecified).
            (ZeroRequest::Discard, false) => return Ok(WriteTicket::default()),
            (r, true) if r.may_unmap() => ZeroMode::PunchHole,
            _ => ZeroMode::ZeroRange,
        };
        out.push(HostZero { file: 0, offset, len, mode });
        Ok(WriteTicket::default())
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
}

//! The image-format layer: it turns a guest request into host IO on the image's files.
//!
//! The virtio layer above knows nothing of formats; the ring below knows nothing of guest
//! requests. A format maps a guest byte range to *extents*: pieces that live at some host
//! offset of one of its files, or that read as zeroes. Raw images map one to one; qcow2
//! maps through its L1/L2 tables and allocates on write.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::error::ImageError;

/// Where one stretch of a guest request lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// At `offset` of the format's file number `file` (index into [`ImageFormat::files`]).
    Host {
        /// Index of the file.
        file: u32,
        /// Byte offset in that file.
        offset: u64,
    },
    /// Nothing is stored: reads return zeroes.
    Zero,
    /// The format produced the bytes itself (e.g. a decompressed cluster): the read
    /// copies `data[offset..offset + len]`.
    Bytes {
        /// The bytes.
        data: std::sync::Arc<Vec<u8>>,
        /// Where the extent starts in `data`.
        offset: usize,
    },
}

/// A piece of a guest request: `len` bytes starting `req_off` bytes into its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Offset within the request's data buffers.
    pub req_off: u64,
    /// Length in bytes.
    pub len: u64,
    /// Where the bytes live.
    pub target: Target,
}

/// How a host range is to be zeroed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroMode {
    /// Deallocate if possible; reads return zeroes afterwards.
    PunchHole,
    /// Zero in place, keep the allocation.
    ZeroRange,
    /// Write zeroes (extends a file like any write; for small ranges of new clusters).
    WriteZeroes,
}

/// A host-side zeroing operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostZero {
    /// Index of the file.
    pub file: u32,
    /// Byte offset in that file.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
    /// How.
    pub mode: ZeroMode,
}

/// What kind of zeroing the guest asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroRequest {
    /// DISCARD: contents become unspecified; host space may be released.
    Discard,
    /// WRITE_ZEROES: must read zeroes afterwards; `may_unmap` allows releasing space.
    WriteZeroes {
        /// The guest set the unmap flag.
        may_unmap: bool,
    },
}

impl ZeroRequest {
    /// Whether host space may be released (when the operator allows it).
    pub fn may_unmap(self) -> bool {
        matches!(self, ZeroRequest::Discard | ZeroRequest::WriteZeroes { may_unmap: true })
    }
}

/// What a mapped write (or zeroing) must report back once its host IO has ended: the
/// format-private list of allocations it made. Empty (and free) for raw images.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WriteTicket(pub Vec<u64>);

/// A disk image format, shared by every queue's worker.
///
/// Implementations must be cheap to call from the data path and never block on another
/// queue's IO. Mapping calls may do synchronous metadata IO; data IO is left to the ring.
pub trait ImageFormat: Send + Sync {
    /// Virtual disk size in bytes.
    fn capacity(&self) -> u64;
    /// Files that data IO targets, registered with every worker's ring in this order.
    fn files(&self) -> Vec<RawFd>;
    /// Required memory and offset alignment for zero-copy IO (O_DIRECT), in bytes.
    fn io_alignment(&self) -> u32;
    /// Physical block size of the storage, in bytes.
    fn physical_block_size(&self) -> u32;
    /// A stable identity, used to derive the default serial.
    fn identity(&self) -> String;
    /// Maps a read of `len` bytes at `offset` into `out`.
    fn map_read(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), ImageError>;
    /// Maps a write; the returned extents all have `Target::Host`.
    fn map_write(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<WriteTicket, ImageError>;
    /// Called once the host IO of a mapped write or zeroing has ended, for metadata updates.
    fn write_done(&self, _ticket: WriteTicket, _ok: bool) -> Result<(), ImageError> {
        Ok(())
    }
    /// Maps a discard or write-zeroes to host zeroing operations.
    fn map_zero(&self, offset: u64, len: u64, req: ZeroRequest, out: &mut Vec<HostZero>) -> Result<WriteTicket, ImageError>;
    /// Writes dirty metadata before the files are synced by a FLUSH.
    fn prepare_flush(&self) -> Result<(), ImageError> {
        Ok(())
    }
    /// Moves whenever metadata that links completed writes changes: a FLUSH may share an
    /// earlier FLUSH's metadata write-back only while this has not moved (0: no metadata).
    fn metadata_epoch(&self) -> u64 {
        0
    }
    /// At shutdown: writes every dirty table back and syncs every file; an error means the
    /// image may lack completed writes (the daemon exits non-zero).
    fn close(&self) -> Result<(), ImageError> {
        for fd in self.files() {
            // SAFETY: the fd belongs to the image, which is alive for this call.
            if unsafe { libc::fdatasync(fd) } != 0 {
                return Err(ImageError::Io(io::Error::last_os_error()));
            }
        }
        Ok(())
    }
    /// One past the last host byte the image uses, for formats that allocate (None: raw).
    fn allocation(&self) -> Option<u64> {
        None
    }
    /// Metadata cache hits and misses, for formats that cache metadata (None: raw).
    fn cache_stats(&self) -> Option<(u64, u64)> {
        None
    }
}

/// A raw image: a regular file or a block device, byte for byte the guest's disk.
#[derive(Debug)]
pub struct RawImage {
    file: File,
    capacity: u64,
    alignment: u32,
    physical_block_size: u32,
    identity: String,
    discard_unmap: bool,
}

/// `_IOR(0x12, 114, u64)`: size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 123)`: physical block size of a block device.
const BLKPBSZGET: libc::c_ulong = 0x127b;
/// `statx` mask bit for direct-IO alignment (Linux 6.1).
const STATX_DIOALIGN: u32 = 0x2000;

/// What [`open_direct`] learned about an opened image file.
#[derive(Debug, Clone, Copy)]
pub struct OpenedFile {
    /// O_DIRECT is in effect.
    pub direct: bool,
    /// Memory/offset alignment direct IO needs (1 when buffered).
    pub alignment: u32,
    /// Size in bytes (BLKGETSIZE64 for block devices).
    pub size: u64,
    /// Physical block size of the storage.
    pub physical_block_size: u32,
    /// The path is a block device.
    pub is_block: bool,
}

/// Opens an image file or block device for zero-copy IO: O_DIRECT, falling back to
/// buffered IO (with a warning) where the file system refuses it.
pub fn open_direct(path: &Path, read_only: bool) -> Result<(File, OpenedFile), ImageError> {
    let open = |direct: bool| {
        let mut o = OpenOptions::new();
        o.read(true).write(!read_only);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(path)
    };
    let (file, direct) = match open(true) {
        Ok(f) => (f, true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(path = %path.display(), "O_DIRECT refused; using buffered IO");
            (open(false)?, false)
        }
        Err(e) => return Err(e.into()),
    };
    let meta = file.metadata()?;
    let is_block = meta.file_type().is_block_device();
    let size = if is_block { blk_ioctl_u64(&file, BLKGETSIZE64)? } else { meta.len() };
    let physical_block_size =
        if is_block { blk_ioctl_u32(&file, BLKPBSZGET).unwrap_or(512).max(512) } else { 4096 };
    let alignment = if direct { dio_alignment(&file).unwrap_or(512) } else { 1 };
    Ok((file, OpenedFile { direct, alignment, size, physical_block_size, is_block }))
}

/// The path as the operator named it, made absolute with symlinks kept (/dev/VG/LV is
/// stable where the dm-N it points to is not).
pub fn image_identity(path: &Path) -> String {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()).display().to_string()
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
        })
    }
}

fn blk_ioctl_u64(file: &File, req: libc::c_ulong) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: `req` is a read ioctl that writes one u64 into `v`, which outlives the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), req, &mut v as *mut u64) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(v) }
}

fn blk_ioctl_u32(file: &File, req: libc::c_ulong) -> io::Result<u32> {
    let mut v: libc::c_uint = 0;
    // SAFETY: `req` is a read ioctl that writes one unsigned int into `v`, which outlives the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), req, &mut v as *mut libc::c_uint) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(v) }
}

/// Memory alignment O_DIRECT needs on this file (statx DIOALIGN), at least 512.
fn dio_alignment(file: &File) -> io::Result<u32> {
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: the path is a valid C string, `stx` is a valid out-pointer for the call.
    let r = unsafe {
        libc::statx(file.as_raw_fd(), empty.as_ptr(), libc::AT_EMPTY_PATH, STATX_DIOALIGN, &mut stx)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let align = stx.stx_dio_mem_align.max(stx.stx_dio_offset_align);
    Ok(if stx.stx_mask & STATX_DIOALIGN != 0 && align > 0 { align.max(512) } else { 512 })
}

impl ImageFormat for RawImage {
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

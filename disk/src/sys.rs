//! Opening image files and asking the kernel about them: O_DIRECT with its alignment
//! (statx), block device size and physical block size (ioctls). One copy for every format.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::error::ImageError;

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

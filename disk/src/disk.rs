//! The format seam: a disk turns a guest byte range into host extents on its files.
//!
//! The virtio layer above knows nothing of formats; the ring below knows nothing of guest
//! requests. A format maps a guest byte range to *extents*: pieces that live at some host
//! offset of one of its files, or that read as zeroes. Raw images map one to one; qcow2
//! maps through its L1/L2 tables and allocates on write.

use std::io;
use std::os::fd::RawFd;
use std::sync::Weak;
use std::time::Duration;

use crate::error::ImageError;

/// Where one stretch of a guest request lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// At `offset` of the format's file number `file` (index into [`Disk::files`]).
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
/// format-private list of allocations it made, and the guest range it changed while an
/// active commit tracks changes (marked when the write ends, so a copy that read the range
/// before the data landed copies it again). Empty (and free) for raw images.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WriteTicket(pub Vec<u64>, pub Option<(u64, u64)>);

/// Told when an image's file table changes (a snapshot adds the new top's file to an empty
/// slot; a merge empties the slots of dropped layers). The image calls it before any extent
/// names a new slot, and after no new extent names an emptied one.
pub trait FileListener: Send + Sync {
    /// The table is now `table` (slot → fd, -1: empty): register it before returning. An
    /// error refuses the change (the image keeps its table).
    fn files_changed(&self, table: &[RawFd]) -> io::Result<()>;
}

/// A disk image format, shared by every queue's worker.
///
/// Implementations must be cheap to call from the data path and never block on another
/// queue's IO. Mapping calls may do synchronous metadata IO; data IO is left to the ring.
pub trait Disk: Send + Sync {
    /// Virtual disk size in bytes.
    fn capacity(&self) -> u64;
    /// Files that data IO targets, by slot (the `file` of an extent), registered with every
    /// worker's ring in this order; -1 marks an empty slot.
    fn files(&self) -> Vec<RawFd>;
    /// How many slots every ring registers: the most files the image may use at once (a
    /// chain that gains a layer online fills an empty slot; see [`FileListener`]).
    fn file_slots(&self) -> usize {
        self.files().len()
    }
    /// Slots a FLUSH syncs: the files written through the rings.
    fn sync_files(&self) -> Vec<u32> {
        self.files().iter().enumerate().filter(|(_, fd)| **fd >= 0).map(|(i, _)| i as u32).collect()
    }
    /// Subscribes `listener` to changes of the file table; it is called with the table as it
    /// is now before this returns (an image whose table never changes only does that).
    fn listen_files(&self, listener: Weak<dyn FileListener>) -> io::Result<()> {
        match listener.upgrade() {
            Some(l) => l.files_changed(&self.files()),
            None => Ok(()),
        }
    }
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
        for fd in self.files().into_iter().filter(|fd| *fd >= 0) {
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
    /// Takes the image over (live migration: the destination, or a source whose migration
    /// failed): the locks of a writer, waiting up to `wait` while another process still holds
    /// them, then the image's state read afresh from the storage. Nothing if already active.
    fn activate(&self, _wait: Duration) -> Result<(), ImageError> {
        Ok(())
    }
    /// Hands the image over (live migration's source, with no IO in flight): everything
    /// written back and synced, closed clean, the writer's locks dropped; map calls then fail
    /// with [`ImageError::Inactive`]. On an error the image stays active. Nothing if inactive.
    fn inactivate(&self) -> Result<(), ImageError> {
        Ok(())
    }
    /// Whether the image serves IO here (see [`Disk::activate`]).
    fn is_active(&self) -> bool {
        true
    }
    /// The files of the chain served, the top first.
    fn chain(&self) -> Vec<std::path::PathBuf> {
        Vec::new()
    }
    /// Online snapshot: `overlay` (whose backing is the current top) becomes the top; with
    /// `limit`, its allocation limit. `hold` is called right before the switch: the caller
    /// holds guest writes there, and releases them once this returns.
    fn snapshot(
        &self,
        _overlay: &std::path::Path,
        _limit: Option<u64>,
        _hold: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<crate::snapshot::SnapshotReport, ImageError> {
        Err(ImageError::Refused("only a qcow2 image takes snapshots".into()))
    }
    /// Starts merging `top` into `base` (live merge): the job is driven by its caller.
    /// `backing_name` overrides the name the layer above `top` gives `base` (an internal
    /// commit). An active commit (`top` is the served top) calls `hold` before it starts
    /// tracking the guest's writes; the caller releases them once this returns.
    fn commit(
        self: std::sync::Arc<Self>,
        _top: &std::path::Path,
        _base: &std::path::Path,
        _backing_name: Option<String>,
        _hold: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<Box<dyn crate::commit::CommitJob>, ImageError> {
        Err(ImageError::Refused("only a qcow2 chain can be merged".into()))
    }
}

/// Reads `len` bytes at guest `offset` through the mapping, synchronously, as a worker does
/// with its ring (for tools and tests; the data path never calls it).
pub fn read_mapped(d: &dyn Disk, offset: u64, len: usize) -> Result<Vec<u8>, ImageError> {
    let mut ext = Vec::new();
    d.map_read(offset, len as u64, &mut ext)?;
    let mut out = vec![0u8; len];
    let files = d.files();
    for e in ext {
        let range = e.req_off as usize..(e.req_off + e.len) as usize;
        let dst = out.get_mut(range).ok_or_else(|| ImageError::Refused("extent outside the request".into()))?;
        match e.target {
            Target::Host { file, offset: host } => {
                let fd = *files.get(file as usize).ok_or_else(|| ImageError::Refused("extent on an unknown file".into()))?;
                let buf = crate::aligned::AlignedBuf::zeroed(dst.len(), 4096).map_err(ImageError::Io)?;
                // SAFETY: the buffer holds `dst.len()` bytes and outlives the call; the fd is the image's.
                let n = unsafe { libc::pread(fd, buf.ptr().cast(), dst.len(), host as libc::off_t) };
                if n != dst.len() as isize {
                    return Err(ImageError::Io(if n < 0 { io::Error::last_os_error() } else { io::Error::from(io::ErrorKind::UnexpectedEof) }));
                }
                dst.copy_from_slice(buf.as_slice());
            }
            Target::Zero => dst.fill(0),
            Target::Bytes { data, offset } => {
                let src = data.get(offset..offset + dst.len()).ok_or_else(|| ImageError::Refused("inline extent too short".into()))?;
                dst.copy_from_slice(src);
            }
        }
    }
    Ok(out)
}

/// Writes `data` at guest `offset` through the mapping, synchronously, as a worker does: the
/// write mapped, the host extents written, the ticket reported (for tools and tests; the
/// data path never calls it). Offsets and lengths must suit the image's O_DIRECT alignment.
pub fn write_mapped(d: &dyn Disk, offset: u64, data: &[u8]) -> Result<(), ImageError> {
    let mut ext = Vec::new();
    let ticket = d.map_write(offset, data.len() as u64, &mut ext)?;
    let files = d.files();
    let mut result = Ok(());
    for e in ext {
        let Target::Host { file, offset: host } = e.target else {
            result = Err(ImageError::Refused("a write mapped to a non-host extent".into()));
            break;
        };
        let (Some(&fd), Some(src)) = (files.get(file as usize), data.get(e.req_off as usize..(e.req_off + e.len) as usize)) else {
            result = Err(ImageError::Refused("extent outside the request or on an unknown file".into()));
            break;
        };
        let mut buf = crate::aligned::AlignedBuf::zeroed(src.len(), 4096).map_err(ImageError::Io)?;
        buf.as_mut_slice().copy_from_slice(src);
        // SAFETY: the buffer holds `src.len()` bytes and outlives the call; the fd is the image's.
        let n = unsafe { libc::pwrite(fd, buf.ptr().cast(), src.len(), host as libc::off_t) };
        if n != src.len() as isize {
            result = Err(ImageError::Io(if n < 0 { io::Error::last_os_error() } else { io::Error::from(io::ErrorKind::WriteZero) }));
            break;
        }
    }
    let done = d.write_done(ticket, result.is_ok());
    result.and(done)
}

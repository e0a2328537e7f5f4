//! Synchronous positional IO for metadata. Data IO does not come through here: the caller
//! moves data between guest memory and the host offsets the engine maps.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Where an image (or a backing file) lives.
pub trait Storage: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`; bytes past the end read as zeroes.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes completed writes durable.
    fn flush(&self) -> io::Result<()>;
    /// Current size in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Zeroes `len` bytes at `offset` (the default writes a zero buffer).
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zero_buffer(self, offset, len)
    }
    /// Allocates `len` bytes at `offset` that already read as zeroes (a file's holes), keeping
    /// the size: later writes there find space allocated. The default does nothing.
    fn allocate(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// The image will soon use bytes up to `end`: a regular file may grow (sparsely) ahead of
    /// time so data writes land inside it. Block devices, and the default, do nothing.
    fn reserve(&self, _end: u64) -> io::Result<()> {
        Ok(())
    }
}

/// Zeroes a range by writing zeroes, 1 MiB at a time.
fn write_zero_buffer<S: Storage + ?Sized>(st: &S, offset: u64, len: u64) -> io::Result<()> {
    let chunk = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(chunk.len() as u64) as usize;
        st.write_at(&chunk[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// A file or block device opened without O_DIRECT, or with it (then every access goes
/// through an aligned bounce buffer, widened to `align`).
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    align: usize,
    /// Regular files grow ahead of use up to here (0 for block devices: never).
    grown_to: std::sync::atomic::AtomicU64,
    /// A regular file (zeroed and allocated with `fallocate`), not a block device.
    regular: bool,
    /// Grown ahead of use ([`Storage::reserve`]): a regular file not made [`FileStorage::fixed_size`].
    growable: bool,
}

/// How far ahead of use a regular file is grown: writes inside the file's size are plain
/// overwrites of sparse space, which the kernel completes asynchronously with O_DIRECT;
/// writes that extend the file are not.
const GROW_STEP: u64 = 64 << 20;

impl FileStorage {
    /// Wraps `file`; `align` is its direct-IO alignment (1 for buffered files).
    pub fn new(file: File, align: usize) -> FileStorage {
        let meta = file.metadata().ok();
        let regular = meta.as_ref().map(|m| m.file_type().is_file()).unwrap_or(false);
        let len = meta.map(|m| m.len()).unwrap_or(0);
        FileStorage { file, align: align.max(1), grown_to: std::sync::atomic::AtomicU64::new(len), regular, growable: regular }
    }

    /// Never grows the file (a file standing in for a fixed-size volume).
    pub fn fixed_size(mut self) -> FileStorage {
        self.growable = false;
        self
    }

    /// `fallocate(2)` with `mode` over `len` bytes at `offset` (EFBIG past i64).
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        };
        // SAFETY: plain syscall on our own fd.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, n) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn read_raw(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A zero-initialised heap buffer with a given alignment, for O_DIRECT IO.
pub struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    /// `len` zero bytes aligned to `align` (a power of two).
    pub fn new(len: usize, align: usize) -> io::Result<Aligned> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), align.max(1))
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        Ok(Aligned { ptr, layout })
    }
    /// The bytes.
    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live, zero-initialised allocation of layout.size() bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

// SAFETY: the buffer is plain owned memory.
unsafe impl Send for Aligned {}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.align <= 1 {
            return self.read_raw(buf, offset);
        }
        let a = self.align as u64;
        let start = offset / a * a;
        let end = (offset + buf.len() as u64).div_ceil(a) * a;
        let mut tmp = Aligned::new((end - start) as usize, self.align)?;
        self.read_raw(tmp.bytes(), start)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&tmp.bytes()[skip..skip + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let a = self.align as u64;
        if self.align <= 1 {
            return self.file.write_all_at(buf, offset);
        }
        let start = offset / a * a;
        let end = (offset + buf.len() as u64).div_ceil(a) * a;
        let mut tmp = Aligned::new((end - start) as usize, self.align)?;
        if start != offset || end != offset + buf.len() as u64 {
            // Read-modify-write of the partial edge blocks (metadata only: callers serialize).
            self.read_raw(tmp.bytes(), start)?;
        }
        let skip = (offset - start) as usize;
        tmp.bytes()[skip..skip + buf.len()].copy_from_slice(buf);
        self.file.write_all_at(tmp.bytes(), start)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn size(&self) -> io::Result<u64> {
        use std::io::{Seek, SeekFrom};
        // Works for block devices too, unlike metadata().len().
        (&self.file).seek(SeekFrom::End(0))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let aligned = offset % 512 == 0 && len % 512 == 0;
        if aligned && !self.regular {
            // BLKZEROOUT: the device zeroes (or unmaps with zeroing) without a data transfer.
            const BLKZEROOUT: libc::c_ulong = 0x127f;
            let range = [offset, len];
            // SAFETY: BLKZEROOUT reads a [u64; 2] (start, length) that outlives the call.
            if unsafe { libc::ioctl(self.file.as_raw_fd(), BLKZEROOUT, range.as_ptr()) } == 0 {
                return Ok(());
            }
        } else if aligned && self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len).is_ok() {
            return Ok(());
        }
        // Not supported here: write a zero buffer.
        write_zero_buffer(self, offset, len)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.regular {
            return Ok(());
        }
        self.fallocate(libc::FALLOC_FL_KEEP_SIZE, offset, len)
    }

    fn reserve(&self, end: u64) -> io::Result<()> {
        use std::sync::atomic::Ordering;
        if !self.growable || end <= self.grown_to.load(Ordering::Acquire) {
            return Ok(());
        }
        let target = end.div_ceil(GROW_STEP) * GROW_STEP + GROW_STEP;
        let current = self.file.metadata()?.len();
        if target > current {
            self.file.set_len(target)?;
        }
        self.grown_to.fetch_max(target.max(current), Ordering::AcqRel);
        Ok(())
    }
}

/// An in-memory image, for tests and fuzzing.
#[derive(Debug, Default)]
pub struct MemStorage {
    data: std::sync::Mutex<Vec<u8>>,
}

impl MemStorage {
    /// A storage holding `bytes`.
    pub fn new(bytes: Vec<u8>) -> MemStorage {
        MemStorage { data: std::sync::Mutex::new(bytes) }
    }
    /// A copy of the current contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.lock().map(|d| d.clone()).unwrap_or_default()
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.data.lock().map_err(|_| io::Error::other("poisoned"))?;
        buf.fill(0);
        let off = usize::try_from(offset).unwrap_or(usize::MAX);
        if off < d.len() {
            let n = (d.len() - off).min(buf.len());
            buf[..n].copy_from_slice(&d[off..off + n]);
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.data.lock().map_err(|_| io::Error::other("poisoned"))?;
        let off = usize::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let end = off.checked_add(buf.len()).ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        if d.len() < end {
            d.resize(end, 0);
        }
        d[off..end].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.data.lock().map(|d| d.len() as u64).unwrap_or(0))
    }
}

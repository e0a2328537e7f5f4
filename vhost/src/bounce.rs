//! Staging for guest buffers the storage cannot take directly (O_DIRECT alignment): a small
//! per-queue pool of aligned chunks, and the chunk-by-chunk progress of one staged request.
//!
//! Memory stays bounded whatever the guest sends: a staged request uses one chunk of
//! [`CHUNK`] bytes however large it is (its data moves through the chunk in turn), and a
//! queue has at most [`POOL_CHUNKS`] chunks. A request that finds the pool empty waits (the
//! worker keeps it until a chunk is returned) instead of allocating.
//!
//! Proof: `the_pool_lends_at_most_its_cap_and_takes_chunks_back_on_drop` (below); `tests/blkio_qcow2.rs`
//! `large_unaligned_requests_move_through_bounded_chunks`.

use std::io;
use std::sync::{Arc, Mutex};

use vm_memory::Bytes;

pub use crate::disk::aligned::AlignedBuf;
use crate::disk::image::Extent;
use crate::request::Segment;
use crate::context::Mem;

/// Bytes staged at a time for one request.
pub const CHUNK: usize = 1 << 20;
/// Chunks one queue may have at once.
pub const POOL_CHUNKS: usize = 8;
/// Alignment of every chunk (covers any logical block size we serve).
const CHUNK_ALIGN: usize = 4096;

/// Shared state of a pool: idle chunks and how many exist.
struct PoolState {
    idle: Vec<AlignedBuf>,
    count: usize,
}

/// A queue's chunk pool.
#[derive(Clone)]
pub struct BouncePool {
    state: Arc<Mutex<PoolState>>,
    cap: usize,
}

/// A chunk lent by the pool; it goes back when dropped, wherever that happens.
pub struct Chunk {
    buf: Option<AlignedBuf>,
    pool: BouncePool,
}

impl Chunk {
    /// The chunk's start.
    pub fn ptr(&self) -> *mut u8 {
        self.buf.as_ref().map(|b| b.ptr()).unwrap_or(std::ptr::null_mut())
    }

    /// The chunk.
    pub fn as_slice(&self) -> &[u8] {
        self.buf.as_ref().map(|b| b.as_slice()).unwrap_or(&[])
    }

    /// The chunk, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match self.buf.as_mut() {
            Some(b) => b.as_mut_slice(),
            None => &mut [],
        }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        if let (Some(b), Ok(mut s)) = (self.buf.take(), self.pool.state.lock()) {
            s.idle.push(b);
        }
    }
}

impl BouncePool {
    /// A pool of at most `cap` chunks.
    pub fn new(cap: usize) -> BouncePool {
        BouncePool { state: Arc::new(Mutex::new(PoolState { idle: Vec::new(), count: 0 })), cap }
    }

    /// Lends a chunk; `Ok(None)` when all are lent.
    pub fn take(&self) -> io::Result<Option<Chunk>> {
        let mut s = self.state.lock().map_err(|_| io::Error::other("bounce pool lock poisoned"))?;
        let buf = match s.idle.pop() {
            Some(b) => b,
            None if s.count < self.cap => {
                let b = AlignedBuf::zeroed(CHUNK, CHUNK_ALIGN)?;
                s.count += 1;
                b
            }
            None => return Ok(None),
        };
        Ok(Some(Chunk { buf: Some(buf), pool: self.clone() }))
    }

    /// Whether a chunk can be lent now.
    pub fn available(&self) -> bool {
        self.state.lock().map(|s| !s.idle.is_empty() || s.count < self.cap).unwrap_or(false)
    }

    /// Chunks allocated and not lent.
    pub fn idle(&self) -> usize {
        self.state.lock().map(|s| s.idle.len()).unwrap_or(0)
    }

    /// Bytes allocated for chunks (lent or idle).
    pub fn allocated_bytes(&self) -> usize {
        self.state.lock().map(|s| s.count * CHUNK).unwrap_or(0)
    }
}

/// A request whose data moves through a chunk, [`CHUNK`] bytes at a time.
pub struct Staged {
    /// The chunk.
    pub chunk: Chunk,
    /// Where the request's bytes live on the host.
    pub extents: Vec<Extent>,
    /// A write (guest → chunk → storage) or a read (storage → chunk → guest).
    pub write: bool,
    /// Write-through.
    pub dsync: bool,
    /// Request offset of the chunk's current contents.
    pub pos: u64,
    /// Bytes of the request currently in the chunk.
    pub len: u64,
}

/// Copies guest bytes `[off, off + out.len())` of the request's data into `out`.
pub fn copy_range_from_guest(mem: &Mem, segments: &[Segment], off: u64, out: &mut [u8]) -> io::Result<()> {
    let mut skip = off;
    let mut out = out;
    for s in segments {
        if out.is_empty() {
            break;
        }
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(out.len());
        let (head, tail) = out.split_at_mut(n);
        let at = s.addr.0.checked_add(skip).ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
        mem.read_slice(head, vm_memory::GuestAddress(at)).map_err(|_| io::Error::from_raw_os_error(libc::EFAULT))?;
        out = tail;
        skip = 0;
    }
    Ok(())
}

/// Copies `data` into guest bytes `[off, off + data.len())` of the request's data.
pub fn copy_range_to_guest(mem: &Mem, segments: &[Segment], off: u64, data: &[u8]) -> io::Result<()> {
    let mut skip = off;
    let mut data = data;
    for s in segments {
        if data.is_empty() {
            break;
        }
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(data.len());
        let at = s.addr.0.checked_add(skip).ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
        mem.write_slice(&data[..n], vm_memory::GuestAddress(at)).map_err(|_| io::Error::from_raw_os_error(libc::EFAULT))?;
        data = &data[n..];
        skip = 0;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn the_pool_lends_at_most_its_cap_and_takes_chunks_back_on_drop() {
        let pool = BouncePool::new(2);
        let a = pool.take().ok().flatten();
        let b = pool.take().ok().flatten();
        assert!(a.is_some() && b.is_some());
        assert!(pool.take().ok().flatten().is_none());
        assert!(!pool.available());
        drop(a);
        assert!(pool.available());
        assert!(pool.take().ok().flatten().is_some());
        assert_eq!(pool.allocated_bytes(), 2 * CHUNK);
    }

    #[test]
    fn ranged_copies_cross_segments() {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap_or_default();
        let segs = [Segment { addr: GuestAddress(0x100), len: 10 }, Segment { addr: GuestAddress(0x1000), len: 10 }];
        let data: Vec<u8> = (0..20).collect();
        assert!(copy_range_to_guest(&mem, &segs, 0, &data).is_ok());
        let mut out = [0u8; 6];
        assert!(copy_range_from_guest(&mem, &segs, 7, &mut out).is_ok());
        assert_eq!(out, [7, 8, 9, 10, 11, 12]);
        assert!(copy_range_to_guest(&mem, &segs, 18, &[99, 98]).is_ok());
        let mut tail = [0u8; 2];
        assert!(mem.read_slice(&mut tail, GuestAddress(0x1008)).is_ok());
        assert_eq!(tail, [99, 98]);
    }
}

//! The one aligned buffer type: heap memory aligned for O_DIRECT, freed on drop.

use std::alloc::{self, Layout};
use std::io;

/// An aligned heap buffer, zeroed at allocation.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to `align`.
    pub fn zeroed(len: usize, align: usize) -> io::Result<AlignedBuf> {
        let layout = Layout::from_size_align(len.max(1), align.max(1))
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        Ok(AlignedBuf { ptr, layout })
    }

    /// The start of the buffer (for iovecs handed to the kernel).
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The buffer.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of layout.size() initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    /// The buffer, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of layout.size() bytes, uniquely borrowed here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr, self.layout) }
    }
}

// SAFETY: the buffer is plain owned memory, only touched by the worker that owns it.
unsafe impl Send for AlignedBuf {}

//! iovec arithmetic over guest memory: translation, slicing, advancing after a short
//! transfer, alignment, and staging a request's next bounce chunk.

use super::*;

/// Whether every iovec meets the storage's O_DIRECT alignment (address and length).
pub(super) fn aligned_for(iovs: &[libc::iovec], align: usize) -> bool {
    iovs.iter().all(|v| (v.iov_base as usize) % align == 0 && v.iov_len % align == 0)
}

/// Whether a request's guest buffers must be staged through a bounce chunk.
pub(super) fn needs_bounce(mem: &Mem, segments: &[Segment], align: usize) -> bool {
    match host_iovecs(mem, segments) {
        Ok(iovs) => !aligned_for(&iovs, align),
        // Unreachable memory fails later, with its own error; it needs no chunk.
        Err(_) => false,
    }
}

/// Advances a staged request's chunk: hands a finished read chunk to the guest, then
/// selects the next range and, for a write, fills it from the guest. `st.len` is 0 when
/// the request has no bytes left.
pub(super) fn stage_next(p: &Pending, st: &mut Staged) -> io::Result<()> {
    if st.len > 0 && !st.write {
        copy_range_to_guest(&p.mem, &p.req.segments, st.pos, &st.chunk.as_slice()[..st.len as usize])?;
    }
    st.pos += st.len;
    st.len = p.req.data_len.saturating_sub(st.pos).min(CHUNK as u64);
    if st.len > 0 && st.write {
        let n = st.len as usize;
        copy_range_from_guest(&p.mem, &p.req.segments, st.pos, &mut st.chunk.as_mut_slice()[..n])?;
    }
    Ok(())
}

/// The iovecs covering bytes `[off, off + len)` of the concatenation of `iovs`.
pub(super) fn sub_iovecs(iovs: &[libc::iovec], off: u64, len: u64) -> Vec<libc::iovec> {
    let mut out = Vec::new();
    let mut skip = off as usize;
    let mut want = len as usize;
    for v in iovs {
        if want == 0 {
            break;
        }
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - skip).min(want);
        // SAFETY: `skip < iov_len`, so the pointer stays inside the same buffer.
        let base = unsafe { v.iov_base.cast::<u8>().add(skip) };
        out.push(libc::iovec { iov_base: base.cast(), iov_len: n });
        want -= n;
        skip = 0;
    }
    out
}

/// Drops the first `n` bytes of an iovec list (after a short transfer).
pub(super) fn advance_iovecs(iov: &mut Vec<libc::iovec>, mut n: usize) {
    let mut first = 0;
    while first < iov.len() && n >= iov[first].iov_len {
        n -= iov[first].iov_len;
        first += 1;
    }
    iov.drain(..first);
    if let Some(v) = iov.first_mut() {
        // SAFETY: `n < iov_len` here, so the pointer stays inside the same buffer.
        v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
        v.iov_len -= n;
    }
}

pub(super) fn copy_to_guest(mem: &Mem, segments: &[Segment], mut data: &[u8]) -> Result<(), vm_memory::GuestMemoryError> {
    for s in segments {
        if data.is_empty() {
            break;
        }
        let n = (s.len as usize).min(data.len());
        mem.write_slice(&data[..n], s.addr)?;
        data = &data[n..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(base: usize, len: usize) -> libc::iovec {
        libc::iovec { iov_base: base as *mut libc::c_void, iov_len: len }
    }

    #[test]
    fn sub_iovecs_slices_across_buffers() {
        let v = [iov(0x1000, 512), iov(0x4000, 1024)];
        let s = sub_iovecs(&v, 256, 512);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].iov_base as usize, s[0].iov_len), (0x1100, 256));
        assert_eq!((s[1].iov_base as usize, s[1].iov_len), (0x4000, 256));
        assert!(sub_iovecs(&v, 2000, 100).is_empty());
    }

    #[test]
    fn advance_after_short_transfer() {
        let mut v = vec![iov(0x1000, 512), iov(0x4000, 1024)];
        advance_iovecs(&mut v, 700);
        assert_eq!(v.len(), 1);
        assert_eq!((v[0].iov_base as usize, v[0].iov_len), (0x4000 + 188, 836));
    }
}

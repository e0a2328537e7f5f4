//! Turning a virtqueue descriptor chain into a validated virtio-blk request.
//!
//! Framing is not assumed beyond what the spec requires: the 16-byte header is the first
//! device-readable bytes (over one descriptor or several), the status byte ends the last
//! (device-writable) one, and everything in between is data, wherever the descriptor
//! boundaries fall. A chain cut short (bad `next`, loop) is returned with nothing written.
//!
//! Proof: `malformed_chains_get_the_right_status`, `indirect_table_is_followed_and_bad_one_rejected`,
//! `random_chains_never_panic` (below); `tests/hostile.rs` ring cases (nothing written outside what
//! was lent).

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::config::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR_SIZE};
use crate::error::RequestError;

/// Length of the request header (type, reserved, sector).
pub const HEADER_LEN: u32 = 16;
/// Length of one discard / write-zeroes range record.
const RANGE_LEN: u64 = 16;
/// The write-zeroes `unmap` flag.
const FLAG_UNMAP: u32 = 1;
/// Bytes a GET_ID request returns at most.
pub const ID_LEN: usize = 20;

/// What a request asks the device to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read from the disk into guest buffers.
    Read,
    /// Write guest buffers to the disk.
    Write,
    /// Make completed writes durable.
    Flush,
    /// Return the device serial.
    GetId,
    /// Discard ranges (contents become unspecified; we return zeroes).
    Discard,
    /// Zero ranges, optionally deallocating them.
    WriteZeroes,
}

/// A piece of guest memory that carries request data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// One discard or write-zeroes range, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZeroRange {
    /// Byte offset on the disk.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
    /// The driver allows deallocation (write-zeroes only).
    pub unmap: bool,
}

/// A validated request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: RequestType,
    /// Byte offset on the disk (reads and writes).
    pub offset: u64,
    /// Data buffers in guest memory, in order.
    pub segments: Vec<Segment>,
    /// Total bytes in `segments`.
    pub data_len: u64,
    /// Ranges of a discard or write-zeroes request.
    pub ranges: Vec<ZeroRange>,
}

/// The limits a request is validated against.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Disk size in bytes.
    pub capacity: u64,
    /// Logical block size in bytes.
    pub logical_block_size: u32,
    /// Most data segments per request.
    pub seg_max: u32,
    /// Most data bytes per request.
    pub max_bytes: u64,
    /// Writes are refused.
    pub read_only: bool,
}

/// The result of parsing one chain: what to answer, and where.
#[derive(Debug)]
pub struct Parsed {
    /// Head descriptor index, for the used ring.
    pub head: u16,
    /// Where the status byte goes, if the chain has a valid place for it.
    pub status: Option<GuestAddress>,
    /// The request, or why it was rejected.
    pub request: Result<Request, RequestError>,
}

/// A descriptor, reduced to what parsing needs.
#[derive(Clone, Copy)]
struct Desc {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

/// Parses and validates one descriptor chain. Never panics; every problem is a `RequestError`.
pub fn parse<M, G>(chain: DescriptorChain<M>, limits: &Limits) -> Parsed
where
    M: Deref<Target = G> + Clone,
    G: GuestMemory + ?Sized,
{
    let head = chain.head_index();
    let mem: &G = chain.memory();
    // The chain iterator bounds itself by the queue size and the indirect table size.
    let max_descs = limits.seg_max as usize + 2;
    let mut descs: Vec<Desc> = Vec::with_capacity(4);
    let mut too_many = false;
    let mut cut = false;
    for d in chain.clone() {
        if descs.len() == max_descs {
            too_many = true;
            break;
        }
        // The iterator ends early, silently, on a `next` past the table, a loop (its TTL)
        // or an unreadable indirect table: the last descriptor then still says "next".
        cut = d.has_next();
        descs.push(Desc { addr: d.addr(), len: d.len(), writable: d.is_write_only() });
    }
    if cut && !too_many {
        // Where the chain really ends is unknown: writing a status into what we saw last
        // could land in a data buffer. The chain is returned with nothing written.
        return Parsed { head, status: None, request: Err(RequestError::BrokenChain(descs.len())) };
    }

    let status = descs.last().and_then(|last| status_addr(mem, last, descs.len()));
    let request = if too_many {
        Err(RequestError::TooManySegments(descs.len(), limits.seg_max))
    } else {
        status
            .ok_or(RequestError::NoStatus)
            .and_then(|_| build(mem, &descs, limits))
    };
    Parsed { head, status, request }
}

fn status_addr<G: GuestMemory + ?Sized>(mem: &G, last: &Desc, count: usize) -> Option<GuestAddress> {
    if count < 2 || !last.writable || last.len == 0 {
        return None;
    }
    let addr = last.addr.checked_add(u64::from(last.len) - 1)?;
    mem.check_range(addr, 1, Permissions::Write).then_some(addr)
}

fn build<G: GuestMemory + ?Sized>(
    mem: &G,
    descs: &[Desc],
    limits: &Limits,
) -> Result<Request, RequestError> {
    if descs.len() < 2 {
        return Err(RequestError::ChainTooShort(descs.len()));
    }
    // The header is the first 16 device-readable bytes, over as many descriptors as the
    // driver chose (virtio does not fix the framing).
    let mut header = [0u8; HEADER_LEN as usize];
    let mut got = 0usize;
    for d in descs {
        if got == header.len() {
            break;
        }
        if d.writable {
            return Err(RequestError::BadHeader { len: got as u32, write_only: true });
        }
        let n = (header.len() - got).min(d.len as usize);
        mem.read_slice(&mut header[got..got + n], d.addr).map_err(|_| outside(d.addr, n as u64))?;
        got += n;
    }
    if got < header.len() {
        return Err(RequestError::BadHeader { len: got as u32, write_only: false });
    }
    let rtype = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);

    let segments = data_segments(descs)?;
    let kind = match rtype {
        VIRTIO_BLK_T_IN => RequestType::Read,
        VIRTIO_BLK_T_OUT => RequestType::Write,
        VIRTIO_BLK_T_FLUSH => RequestType::Flush,
        VIRTIO_BLK_T_GET_ID => RequestType::GetId,
        VIRTIO_BLK_T_DISCARD => RequestType::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
        other => return Err(RequestError::Unsupported(other)),
    };
    if segments.len() > limits.seg_max as usize {
        return Err(RequestError::TooManySegments(segments.len(), limits.seg_max));
    }
    let data_len: u64 = segments.iter().map(|(s, _)| u64::from(s.len)).sum();
    let device_writes = matches!(kind, RequestType::Read | RequestType::GetId);
    for (seg, writable) in &segments {
        if *writable != device_writes && !(kind == RequestType::Flush) {
            return Err(RequestError::WrongDirection);
        }
        let access = if *writable { Permissions::Write } else { Permissions::Read };
        if !mem.check_range(seg.addr, seg.len as usize, access) {
            return Err(outside(seg.addr, u64::from(seg.len)));
        }
    }
    let segments: Vec<Segment> = segments.into_iter().map(|(s, _)| s).collect();

    if matches!(kind, RequestType::Write | RequestType::Discard | RequestType::WriteZeroes)
        && limits.read_only
    {
        return Err(RequestError::ReadOnly);
    }

    let mut req = Request { kind, offset: 0, segments, data_len, ranges: Vec::new() };
    match kind {
        RequestType::Read | RequestType::Write => {
            if data_len > limits.max_bytes {
                return Err(RequestError::TooLarge(data_len, limits.max_bytes));
            }
            let offset = sector
                .checked_mul(SECTOR_SIZE)
                .ok_or(RequestError::OutOfRange { offset: u64::MAX, len: data_len, capacity: limits.capacity })?;
            check_extent(offset, data_len, limits)?;
            req.offset = offset;
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            req.ranges = read_ranges(mem, &req, limits)?;
        }
        RequestType::Flush | RequestType::GetId => {}
    }
    Ok(req)
}

/// Everything between the header and the status byte, with each piece's direction.
fn data_segments(descs: &[Desc]) -> Result<Vec<(Segment, bool)>, RequestError> {
    let last_idx = descs.len() - 1;
    let mut out = Vec::with_capacity(descs.len());
    let mut header_left = HEADER_LEN;
    for (i, d) in descs.iter().enumerate() {
        let mut start = d.addr;
        let mut len = d.len;
        if header_left > 0 {
            let n = header_left.min(len);
            len -= n;
            header_left -= n;
            start = start.checked_add(u64::from(n)).ok_or(outside(d.addr, u64::from(d.len)))?;
        }
        if i == last_idx {
            len = len.saturating_sub(1);
        }
        if len > 0 {
            out.push((Segment { addr: start, len }, d.writable));
        }
    }
    Ok(out)
}

fn check_extent(offset: u64, len: u64, limits: &Limits) -> Result<(), RequestError> {
    let lbs = u64::from(limits.logical_block_size);
    if offset % lbs != 0 || len % lbs != 0 {
        return Err(RequestError::Misaligned { offset, len, lbs: limits.logical_block_size });
    }
    match offset.checked_add(len) {
        Some(end) if end <= limits.capacity => Ok(()),
        _ => Err(RequestError::OutOfRange { offset, len, capacity: limits.capacity }),
    }
}

/// Reads the `virtio_blk_discard_write_zeroes` records of a discard / write-zeroes request.
fn read_ranges<G: GuestMemory + ?Sized>(
    mem: &G,
    req: &Request,
    limits: &Limits,
) -> Result<Vec<ZeroRange>, RequestError> {
    if req.data_len == 0 || req.data_len % RANGE_LEN != 0 {
        return Err(RequestError::BadRanges("payload not a whole number of 16-byte records"));
    }
    let count = req.data_len / RANGE_LEN;
    if count > u64::from(MAX_DISCARD_SEG) {
        return Err(RequestError::BadRanges("more ranges than max_discard_seg"));
    }
    let mut payload = Vec::with_capacity(req.data_len as usize);
    for seg in &req.segments {
        let mut buf = vec![0u8; seg.len as usize];
        mem.read_slice(&mut buf, seg.addr).map_err(|_| outside(seg.addr, u64::from(seg.len)))?;
        payload.extend_from_slice(&buf);
    }
    let mut ranges = Vec::with_capacity(count as usize);
    for rec in payload.chunks_exact(RANGE_LEN as usize) {
        let mut s = [0u8; 8];
        s.copy_from_slice(&rec[0..8]);
        let sector = u64::from_le_bytes(s);
        let num = u32::from_le_bytes([rec[8], rec[9], rec[10], rec[11]]);
        let flags = u32::from_le_bytes([rec[12], rec[13], rec[14], rec[15]]);
        let allowed = if req.kind == RequestType::WriteZeroes { FLAG_UNMAP } else { 0 };
        if flags & !allowed != 0 {
            return Err(RequestError::UnsupportedFlags(flags));
        }
        if num > MAX_DISCARD_SECTORS {
            return Err(RequestError::BadRanges("range longer than the advertised maximum"));
        }
        let len = u64::from(num) * SECTOR_SIZE;
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or(RequestError::OutOfRange {
            offset: u64::MAX,
            len,
            capacity: limits.capacity,
        })?;
        check_extent(offset, len, limits)?;
        ranges.push(ZeroRange { offset, len, unmap: flags & FLAG_UNMAP != 0 });
    }
    Ok(ranges)
}

fn outside(addr: GuestAddress, len: u64) -> RequestError {
    RequestError::OutsideMemory { addr: addr.raw_value(), len }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{virtio_status, Outcome};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDesc, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestMemoryMmap, GuestMemoryBackend};

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const MEM_END: u64 = 0x40_0000;

    fn limits() -> Limits {
        Limits { capacity: 1 << 20, logical_block_size: 512, seg_max: 8, max_bytes: 1 << 20, read_only: false }
    }

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_END as usize)]).unwrap()
    }

    fn d(addr: u64, len: u32, write: bool) -> RawDescriptor {
        let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        RawDescriptor::from(SplitDesc::new(addr, len, flags, 0))
    }

    fn header(m: &GuestMemoryMmap<()>, rtype: u32, sector: u64) {
        m.write_obj(rtype.to_le(), GuestAddress(HDR)).unwrap();
        m.write_obj(sector.to_le(), GuestAddress(HDR + 8)).unwrap();
    }

    fn run(m: &GuestMemoryMmap<()>, descs: &[RawDescriptor], l: &Limits) -> Parsed {
        let q = MockSplitQueue::new(m, 32);
        let chain = q.build_desc_chain(descs).unwrap();
        parse(chain, l)
    }

    fn status_of(p: &Parsed) -> u8 {
        match &p.request {
            Ok(_) => 0,
            Err(e) => virtio_status(&Outcome::Invalid(e.clone())),
        }
    }

    #[test]
    fn read_request_parses() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 8);
        let p = run(&m, &[d(HDR, 16, false), d(DATA, 4096, true), d(STATUS, 1, true)], &limits());
        let r = p.request.unwrap();
        assert_eq!(r.kind, RequestType::Read);
        assert_eq!(r.offset, 4096);
        assert_eq!(r.data_len, 4096);
        assert_eq!(p.status, Some(GuestAddress(STATUS)));
    }

    #[test]
    fn header_data_and_status_may_share_descriptors() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        // header + 512 bytes of data in one readable descriptor, status alone.
        let p = run(&m, &[d(HDR, 16 + 512, false), d(STATUS, 1, true)], &limits());
        let r = p.request.unwrap();
        assert_eq!(r.segments, vec![Segment { addr: GuestAddress(HDR + 16), len: 512 }]);
        // read data and status in one writable descriptor
        header(&m, VIRTIO_BLK_T_IN, 0);
        let p = run(&m, &[d(HDR, 16, false), d(DATA, 513, true)], &limits());
        assert_eq!(p.request.unwrap().data_len, 512);
        assert_eq!(p.status, Some(GuestAddress(DATA + 512)));
    }

    #[test]
    fn malformed_chains_get_the_right_status() {
        let m = mem();
        let l = limits();
        header(&m, VIRTIO_BLK_T_IN, 0);
        // wrong direction: device-readable buffer for a read
        let p = run(&m, &[d(HDR, 16, false), d(DATA, 512, false), d(STATUS, 1, true)], &l);
        assert_eq!(p.request.as_ref().unwrap_err(), &RequestError::WrongDirection);
        assert_eq!(status_of(&p), 1);
        // status descriptor not writable: nowhere to answer
        let p = run(&m, &[d(HDR, 16, false), d(DATA, 512, true), d(STATUS, 1, false)], &l);
        assert_eq!(p.status, None);
        assert_eq!(p.request.unwrap_err(), RequestError::NoStatus);
        // header too short
        let p = run(&m, &[d(HDR, 8, false), d(STATUS, 1, true)], &l);
        assert!(matches!(p.request, Err(RequestError::BadHeader { .. })));
        // header split over two readable descriptors: framing is the driver's choice
        let p = run(&m, &[d(HDR, 8, false), d(HDR + 8, 8, false), d(DATA, 512, true), d(STATUS, 1, true)], &l);
        let r = p.request.expect("a split header is a header");
        assert_eq!((r.kind, r.data_len), (RequestType::Read, 512));
        assert_eq!(r.segments, vec![Segment { addr: GuestAddress(DATA), len: 512 }]);
        // header writable
        let p = run(&m, &[d(HDR, 16, true), d(STATUS, 1, true)], &l);
        assert!(matches!(p.request, Err(RequestError::BadHeader { .. })));
        // a single descriptor
        let p = run(&m, &[d(HDR, 16, true)], &l);
        assert_eq!(p.status, None);
        // data outside guest memory
        let p = run(&m, &[d(HDR, 16, false), d(MEM_END - 256, 512, true), d(STATUS, 1, true)], &l);
        assert!(matches!(p.request, Err(RequestError::OutsideMemory { .. })));
        // status outside guest memory
        let p = run(&m, &[d(HDR, 16, false), d(DATA, 512, true), d(MEM_END + 4096, 1, true)], &l);
        assert_eq!(p.status, None);
        // header outside guest memory
        let p = run(&m, &[d(MEM_END + 4096, 16, false), d(STATUS, 1, true)], &l);
        assert!(matches!(p.request, Err(RequestError::OutsideMemory { .. })));
    }

    #[test]
    fn range_and_alignment_checks() {
        let m = mem();
        let mut l = limits();
        // past the end
        header(&m, VIRTIO_BLK_T_IN, (1 << 20) / 512);
        let p = run(&m, &[d(HDR, 16, false), d(DATA, 512, true), d(STATUS, 1, true)], &l);
        assert!(matches!(p.request, Err(RequestError::OutOfRange { .. })));
        assert_eq!(status_of(&p), 1);
        // straddling the end
        header(&m, VIRTIO_BLK_T_OUT, (1 << 20) / 512 - 1);
        let p = run(&m, &[d(HDR, 16, false), d(DATA, 1024, false), d(STATUS, 1, true)], &l);
        assert!(matches!(p.request, Err(RequestError::OutOfRange { .. })));
        // sector overflow
        header(&m, VIRTIO_BLK_T_IN, u64::MAX);
        let p = run(&m, &[d(HDR, 16, false), d(DATA, 512, true), d(STATUS, 1, true)], &l);
        assert!(matches!(p.request, Err(RequestError::OutOfRange { .. })));
        // length not a multiple of the block size
        header(&m, VIRTIO_BLK_T_IN, 0);
        let p = run(&m, &[d(HDR, 16, false), d(DATA, 100, true), d(STATUS, 1, true)], &l);
        assert!(matches!(p.request, Err(RequestError::Misaligned { .. })));
        // 4k logical blocks: sector 1 is misaligned
        l.logical_block_size = 4096;
        header(&m, VIRTIO_BLK_T_IN, 1);
        let p = run(&m, &[d(HDR, 16, false), d(DATA, 4096, true), d(STATUS, 1, true)], &l);
        assert!(matches!(p.request, Err(RequestError::Misaligned { .. })));
        // too many segments
        let l = Limits { seg_max: 2, ..limits() };
        header(&m, VIRTIO_BLK_T_IN, 0);
        let descs = [d(HDR, 16, false), d(DATA, 512, true), d(DATA + 512, 512, true), d(DATA + 1024, 512, true), d(STATUS, 1, true)];
        assert!(matches!(run(&m, &descs, &l).request, Err(RequestError::TooManySegments(..))));
        // too large
        let l = Limits { max_bytes: 1024, ..limits() };
        let p = run(&m, &[d(HDR, 16, false), d(DATA, 2048, true), d(STATUS, 1, true)], &l);
        assert!(matches!(p.request, Err(RequestError::TooLarge(..))));
    }

    #[test]
    fn unsupported_type_and_read_only() {
        let m = mem();
        header(&m, 0xdead, 0);
        let p = run(&m, &[d(HDR, 16, false), d(STATUS, 1, true)], &limits());
        assert_eq!(status_of(&p), 2);
        let ro = Limits { read_only: true, ..limits() };
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let p = run(&m, &[d(HDR, 16, false), d(DATA, 512, false), d(STATUS, 1, true)], &ro);
        assert_eq!(p.request.as_ref().unwrap_err(), &RequestError::ReadOnly);
        assert_eq!(status_of(&p), 1);
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        assert!(run(&m, &[d(HDR, 16, false), d(STATUS, 1, true)], &ro).request.is_ok());
        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let p = run(&m, &[d(HDR, 16, false), d(DATA, 20, true), d(STATUS, 1, true)], &ro);
        assert_eq!(p.request.unwrap().kind, RequestType::GetId);
    }

    fn range_record(m: &GuestMemoryMmap<()>, at: u64, sector: u64, num: u32, flags: u32) {
        m.write_obj(sector.to_le(), GuestAddress(at)).unwrap();
        m.write_obj(num.to_le(), GuestAddress(at + 8)).unwrap();
        m.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
    }

    #[test]
    fn discard_and_write_zeroes_payloads() {
        let m = mem();
        let l = limits();
        header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        range_record(&m, DATA, 8, 16, 1);
        range_record(&m, DATA + 16, 64, 8, 0);
        let p = run(&m, &[d(HDR, 16, false), d(DATA, 32, false), d(STATUS, 1, true)], &l);
        let r = p.request.unwrap();
        assert_eq!(r.ranges, vec![
            ZeroRange { offset: 4096, len: 8192, unmap: true },
            ZeroRange { offset: 32768, len: 4096, unmap: false },
        ]);
        // discard with the unmap flag: unsupported
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        let p = run(&m, &[d(HDR, 16, false), d(DATA, 16, false), d(STATUS, 1, true)], &l);
        assert_eq!(status_of(&p), 2);
        // reserved flag bits on write-zeroes: unsupported
        header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        range_record(&m, DATA, 8, 16, 4);
        let p = run(&m, &[d(HDR, 16, false), d(DATA, 16, false), d(STATUS, 1, true)], &l);
        assert_eq!(status_of(&p), 2);
        // a partial record
        let p = run(&m, &[d(HDR, 16, false), d(DATA, 12, false), d(STATUS, 1, true)], &l);
        assert!(matches!(p.request, Err(RequestError::BadRanges(_))));
        // range past the end
        range_record(&m, DATA, (1 << 20) / 512, 8, 0);
        let p = run(&m, &[d(HDR, 16, false), d(DATA, 16, false), d(STATUS, 1, true)], &l);
        assert!(matches!(p.request, Err(RequestError::OutOfRange { .. })));
    }

    #[test]
    fn indirect_table_is_followed_and_bad_one_rejected() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        // An indirect table at 0x50000 with header, data, status.
        let table = 0x5_0000u64;
        let entries = [
            SplitDesc::new(HDR, 16, 1 /* NEXT */, 1),
            SplitDesc::new(DATA, 512, (VRING_DESC_F_WRITE | 1) as u16, 2),
            SplitDesc::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (i, e) in entries.iter().enumerate() {
            m.write_obj(RawDescriptor::from(*e), GuestAddress(table + 16 * i as u64)).unwrap();
        }
        let ind = RawDescriptor::from(SplitDesc::new(table, 48, VRING_DESC_F_INDIRECT as u16, 0));
        let p = run(&m, &[ind], &limits());
        assert_eq!(p.request.unwrap().data_len, 512);
        // A table length that is not a multiple of 16 ends the chain: no status, no panic.
        let bad = RawDescriptor::from(SplitDesc::new(table, 47, VRING_DESC_F_INDIRECT as u16, 0));
        let p = run(&m, &[bad], &limits());
        assert!(p.request.is_err());
        // A `next` past the table, and a loop: the chain is cut, nothing is written.
        let broken = [
            SplitDesc::new(HDR, 16, 1, 1),
            SplitDesc::new(DATA, 512, (VRING_DESC_F_WRITE | 1) as u16, 7),
            SplitDesc::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        let looping = [
            SplitDesc::new(HDR, 16, 1, 1),
            SplitDesc::new(DATA, 512, (VRING_DESC_F_WRITE | 1) as u16, 2),
            SplitDesc::new(STATUS, 1, (VRING_DESC_F_WRITE | 1) as u16, 1),
        ];
        for table_entries in [broken, looping] {
            for (i, e) in table_entries.iter().enumerate() {
                m.write_obj(RawDescriptor::from(*e), GuestAddress(table + 16 * i as u64)).unwrap();
            }
            let p = run(&m, &[ind], &limits());
            assert!(matches!(p.request, Err(RequestError::BrokenChain(_))), "{:?}", p.request);
            assert_eq!(p.status, None);
        }
        let _ = m.num_regions();
    }

    #[test]
    fn random_chains_never_panic() {
        let m = mem();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let types = [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
                     VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES, 3, 0xffff_ffff];
        for _ in 0..3000 {
            header(&m, types[(rnd() % 8) as usize], rnd() % (1 << 12));
            range_record(&m, DATA, rnd() % 4096, (rnd() % 64) as u32, (rnd() % 4) as u32);
            let n = 1 + rnd() % 6;
            let descs: Vec<RawDescriptor> = (0..n)
                .map(|i| {
                    let addr = match rnd() % 4 {
                        0 => rnd(),
                        1 => MEM_END - rnd() % 64,
                        _ if i == 0 => HDR,
                        _ => DATA + (rnd() % 8) * 512,
                    };
                    let len = match rnd() % 4 {
                        0 => rnd() as u32,
                        1 => 0,
                        _ => (rnd() % 9) as u32 * 256 + (rnd() % 2) as u32 * 16,
                    };
                    let flags = (rnd() % 2) as u16 * VRING_DESC_F_WRITE as u16;
                    RawDescriptor::from(SplitDesc::new(addr, len, flags, 0))
                })
                .collect();
            let p = run(&m, &descs, &limits());
            if let Ok(r) = &p.request {
                assert!(p.status.is_some());
                assert!(r.offset + r.data_len <= limits().capacity || r.kind != RequestType::Read);
            }
        }
    }
}

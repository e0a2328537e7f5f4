//! Fuzzes descriptor-chain parsing: guest memory whose first bytes (descriptor table,
//! indirect tables, request headers, discard ranges) come from the fuzzer, a split virtqueue
//! over it with heads the fuzzer publishes, and every chain popped as the worker pops it
//! (`pop_descriptor_chain` over `Arc<Mem>`) handed to `request::parse`.
//!
//! Input, 8 bytes then the heads then guest memory:
//! - byte 0: queue size 2^(bits 0-3 mod 11); memory layout (bits 4-5); read-only (bit 6);
//!   4 KiB logical blocks (bit 7);
//! - byte 1: heads published (the avail index runs this far ahead of `next_avail`);
//! - bytes 2-5: capacity in 4 KiB units; bytes 6-7: the ring's starting `next_avail`;
//! - one u16 head per published slot (at most the queue size);
//! - the rest: guest memory from address 0 (the descriptor table is at 0).
//!
//! Checked: parse never panics; a head past the table gets no status; an accepted request has its status byte and every data
//! segment inside guest memory, no more segments or bytes than the limits, an extent inside
//! the disk, aligned; a broken chain gets no status address.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use thinblk_vhost::config::{BlkGeometry, MAX_DISCARD_SEG};
use thinblk_vhost::context::Mem;
use thinblk_vhost::error::RequestError;
use thinblk_vhost::request::{parse, Limits, RequestType};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

/// Size of the first region, which holds the rings and the fuzzer's bytes.
const REGION: usize = 64 << 10;
/// Available ring (the descriptor table is at 0, at most 16 KiB).
const AVAIL: u64 = 0xa000;
/// Used ring (at most 8 KiB + 6).
const USED: u64 = 0xb000;
/// Largest queue size (`BlkGeometry::seg_max` allows up to 1024).
const MAX_QUEUE: u16 = 1024;

/// The guest memory layouts: one region, or a second one adjacent, past a hole (2 MiB, so
/// that one buffer can exceed `max_bytes`), or near the top of the address space (a region
/// may not end at 2^64). Mapped once: an input rewrites all of the first region, and nothing
/// writes the second.
fn memory(layout: u8) -> Arc<Mem> {
    static LAYOUTS: OnceLock<Vec<Arc<Mem>>> = OnceLock::new();
    let all = LAYOUTS.get_or_init(|| {
        [None, Some((REGION as u64, REGION)), Some((REGION as u64 + 0x4000, 2 << 20)), Some((0xffff_ffff_fffe_0000, REGION))]
            .into_iter()
            .map(|second| {
                let mut ranges = vec![(GuestAddress(0), REGION)];
                ranges.extend(second.map(|(a, len)| (GuestAddress(a), len)));
                Arc::new(Mem::from_ranges(&ranges).unwrap())
            })
            .collect()
    });
    all[usize::from(layout & 3)].clone()
}

fuzz_target!(|data: &[u8]| {
    let Some(ctl) = data.get(..8) else { return };
    let size = 1u16 << ((ctl[0] & 0xf) % 11);
    let geometry = BlkGeometry {
        capacity_bytes: u64::from(u32::from_le_bytes([ctl[2], ctl[3], ctl[4], ctl[5]])) << 12,
        logical_block_size: if ctl[0] & 0x80 != 0 { 4096 } else { 512 },
        physical_block_size: 4096,
        num_queues: 1,
        queue_size: size,
        read_only: ctl[0] & 0x40 != 0,
    };
    // As Context::limits builds them.
    let limits = Limits {
        capacity: geometry.capacity_bytes,
        logical_block_size: geometry.logical_block_size,
        seg_max: geometry.seg_max(),
        max_bytes: geometry.max_request_bytes(),
        read_only: geometry.read_only,
    };
    let published = u16::from(ctl[1]);
    let next_avail = u16::from_le_bytes([ctl[6], ctl[7]]);
    let nheads = usize::from(published.min(size));
    let heads = data.get(8..8 + 2 * nheads).unwrap_or(&[]);
    let image = &data[(8 + 2 * nheads).min(data.len())..];

    let mem = memory(ctl[0] >> 4);
    let mut first = vec![0u8; REGION];
    let n = image.len().min(REGION);
    first[..n].copy_from_slice(&image[..n]);
    mem.write_slice(&first, GuestAddress(0)).unwrap();
    // The avail ring: its index, then the heads in the slots from next_avail on (its flags
    // and the other slots are what the image left there).
    let avail_idx = next_avail.wrapping_add(published);
    mem.write_obj(avail_idx.to_le(), GuestAddress(AVAIL + 2)).unwrap();
    for (i, h) in heads.chunks_exact(2).enumerate() {
        let slot = u64::from(next_avail.wrapping_add(i as u16) % size);
        mem.write_slice(h, GuestAddress(AVAIL + 4 + 2 * slot)).unwrap();
    }
    let mut q = Queue::new(MAX_QUEUE).unwrap();
    q.set_size(size);
    q.try_set_desc_table_address(GuestAddress(0)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
    q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    q.set_ready(true);
    assert!(q.is_valid(mem.as_ref()));
    q.set_next_avail(next_avail);

    for _ in 0..=published {
        let Some(chain) = q.pop_descriptor_chain(mem.clone()) else { break };
        let head = chain.head_index();
        let p = parse(chain, &limits);
        assert_eq!(p.head, head);
        if head >= size {
            // virtio-queue hands out a head past the table as a chain with no descriptor.
            assert!(p.status.is_none() && p.request.is_err());
            continue;
        }
        if let Some(s) = p.status {
            assert!(mem.check_range(s, 1, Permissions::Write));
        }
        let r = match p.request {
            Ok(r) => r,
            Err(RequestError::BrokenChain(_)) => {
                assert!(p.status.is_none());
                continue;
            }
            Err(_) => continue,
        };
        assert!(p.status.is_some());
        assert!(r.segments.len() <= limits.seg_max as usize);
        let mut total = 0u64;
        for s in &r.segments {
            assert!(s.len > 0);
            assert!(mem.check_range(s.addr, s.len as usize, Permissions::Read));
            total += u64::from(s.len);
        }
        assert_eq!(total, r.data_len);
        let lbs = u64::from(limits.logical_block_size);
        if limits.read_only {
            assert!(matches!(r.kind, RequestType::Read | RequestType::Flush | RequestType::GetId));
        }
        match r.kind {
            RequestType::Read | RequestType::Write => {
                assert!(r.data_len <= limits.max_bytes);
                assert_eq!(r.offset % lbs, 0);
                assert_eq!(r.data_len % lbs, 0);
                assert!(r.offset + r.data_len <= limits.capacity);
                assert!(r.ranges.is_empty());
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                assert!(!r.ranges.is_empty() && r.ranges.len() <= MAX_DISCARD_SEG as usize);
                assert_eq!(r.ranges.len() as u64 * 16, r.data_len);
                for z in &r.ranges {
                    assert_eq!(z.offset % lbs, 0);
                    assert_eq!(z.len % lbs, 0);
                    assert!(z.offset + z.len <= limits.capacity);
                    assert!(!z.unmap || r.kind == RequestType::WriteZeroes);
                }
            }
            RequestType::Flush | RequestType::GetId => assert!(r.ranges.is_empty()),
        }
    }
});

//! virtio-blk feature bits and the device configuration space (virtio 1.2, 5.2.4).

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Size of one virtio sector: request offsets are always in these units.
pub const SECTOR_SIZE: u64 = 512;
/// Byte offset of the `writeback` field, the only one a driver may write.
pub const WRITEBACK_OFFSET: u32 = 32;
/// Length of the configuration layout this device fills in.
pub const CONFIG_LEN: usize = 60;
/// Largest data segment we advertise (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most discard or write-zeroes ranges accepted in one request.
pub const MAX_DISCARD_SEG: u32 = 16;
/// Largest discard or write-zeroes range, in sectors (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;

/// The vhost-user "protocol features" virtio bit (not a virtio-blk bit, but required).
const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

/// The device's fixed properties, from which features and config space derive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkGeometry {
    /// Disk size in bytes (a multiple of `logical_block_size`).
    pub capacity_bytes: u64,
    /// Logical block size the guest must align to: 512 or 4096.
    pub logical_block_size: u32,
    /// Physical block size of the backing storage (>= logical).
    pub physical_block_size: u32,
    /// Number of request queues.
    pub num_queues: u16,
    /// Descriptors per queue.
    pub queue_size: u16,
    /// Writes are refused and `VIRTIO_BLK_F_RO` is offered.
    pub read_only: bool,
}

impl BlkGeometry {
    /// Most data segments one request may carry (`seg_max`): the queue minus header and status.
    pub fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).clamp(1, 1024 - 2)
    }

    /// Largest data payload one request may carry, in bytes.
    pub fn max_request_bytes(&self) -> u64 {
        u64::from(SIZE_MAX) * u64::from(self.seg_max())
    }

    /// The virtio feature bits this device offers.
    pub fn features(&self) -> u64 {
        let mut bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VHOST_USER_F_PROTOCOL_FEATURES,
        ]
        .iter()
        .fold(0u64, |acc, b| acc | (1u64 << b));
        if self.read_only {
            bits |= 1 << VIRTIO_BLK_F_RO;
        }
        bits
    }

    /// Encodes the configuration space, little-endian, for a given write-cache mode.
    pub fn config_bytes(&self, writeback: bool) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let lbs = self.logical_block_size.max(512);
        let sectors_per_block = lbs / SECTOR_SIZE as u32;
        let phys_exp = (self.physical_block_size.max(lbs) / lbs).trailing_zeros() as u8;
        put(&mut c, 0, &(self.capacity_bytes / SECTOR_SIZE).to_le_bytes());
        put(&mut c, 8, &SIZE_MAX.to_le_bytes());
        put(&mut c, 12, &self.seg_max().to_le_bytes());
        // 16..20: legacy geometry, left zero.
        put(&mut c, 20, &lbs.to_le_bytes());
        c[24] = phys_exp; // physical_block_exp
        c[25] = 0; // alignment_offset
        put(&mut c, 26, &1u16.to_le_bytes()); // min_io_size, in logical blocks
        put(&mut c, 28, &0u32.to_le_bytes()); // opt_io_size: no preference
        c[32] = u8::from(writeback);
        put(&mut c, 34, &self.num_queues.to_le_bytes());
        put(&mut c, 36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(&mut c, 40, &MAX_DISCARD_SEG.to_le_bytes());
        put(&mut c, 44, &sectors_per_block.to_le_bytes()); // discard_sector_alignment
        put(&mut c, 48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(&mut c, 52, &MAX_DISCARD_SEG.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Returns the `size` bytes at `offset` of `config`, zero beyond its end (GET_CONFIG).
pub fn config_slice(config: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    let start = offset as usize;
    if start < config.len() {
        let end = config.len().min(start.saturating_add(size as usize));
        out[..end - start].copy_from_slice(&config[start..end]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> BlkGeometry {
        BlkGeometry {
            capacity_bytes: 1 << 30,
            logical_block_size: 4096,
            physical_block_size: 4096,
            num_queues: 2,
            queue_size: 256,
            read_only: false,
        }
    }

    #[test]
    fn layout_matches_virtio_spec_offsets() {
        let c = geo().config_bytes(true);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), (1 << 30) / 512);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(c[32], 1);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        assert_eq!(c[56], 1);
        assert_eq!(geo().config_bytes(false)[32], 0);
    }

    #[test]
    fn read_only_adds_ro_bit() {
        let mut g = geo();
        assert_eq!(g.features() & (1 << VIRTIO_BLK_F_RO), 0);
        g.read_only = true;
        assert_ne!(g.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(g.features() & (1 << VIRTIO_F_VERSION_1), 0);
    }

    #[test]
    fn config_slice_pads_and_clips() {
        let c = geo().config_bytes(true);
        assert_eq!(config_slice(&c, 0, 8), c[0..8].to_vec());
        assert_eq!(config_slice(&c, 56, 8), vec![1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(config_slice(&c, 200, 4), vec![0; 4]);
        assert_eq!(config_slice(&c, u32::MAX, 4), vec![0; 4]);
    }
}

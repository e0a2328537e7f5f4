//! What every worker of a device reads: the image, the fixed geometry, the guest memory
//! (swapped by the session as the frontend changes its memory table) and the flags the
//! frontend or the daemon set.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};

use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::config::BlkGeometry;
use crate::image::ImageFormat;
use crate::park::ParkHub;
use crate::request::{Limits, ID_LEN};

/// Guest memory as we map it (no dirty-page log).
pub type Mem = GuestMemoryMmap<()>;
/// The shared, swappable guest memory handle.
pub type AtomicMem = GuestMemoryAtomic<Mem>;

/// What every worker reads: the image, the limits, the guest memory, the cache mode.
pub struct Context {
    /// The image format serving this disk.
    pub image: Arc<dyn ImageFormat>,
    /// Fixed device properties.
    pub geometry: BlkGeometry,
    /// GET_ID payload, NUL padded.
    pub serial: [u8; ID_LEN],
    /// Write-back cache enabled (the guest may clear it through the config space).
    pub writeback: AtomicBool,
    /// VIRTIO_RING_F_EVENT_IDX negotiated.
    pub event_idx: AtomicBool,
    /// Set at shutdown: no new chains are popped.
    pub stopping: AtomicBool,
    /// Parked requests' hub.
    pub park: Arc<ParkHub>,
    pub(crate) mem: RwLock<Option<AtomicMem>>,
}

impl Context {
    /// A context for in-process worker tests: `image`, guest memory `mem`, hub `park`.
    #[cfg(test)]
    pub(crate) fn for_test(image: Arc<dyn ImageFormat>, mem: AtomicMem, park: Arc<ParkHub>) -> Context {
        let capacity = image.capacity();
        Context {
            image,
            geometry: BlkGeometry {
                capacity_bytes: capacity,
                logical_block_size: 512,
                physical_block_size: 512,
                num_queues: 1,
                queue_size: 16,
                read_only: false,
            },
            serial: [0; ID_LEN],
            writeback: AtomicBool::new(true),
            event_idx: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            park,
            mem: RwLock::new(Some(mem)),
        }
    }

    /// The current guest memory, pinned for as long as the returned Arc lives.
    pub fn memory(&self) -> Option<Arc<Mem>> {
        let guard = self.mem.read().ok()?;
        guard.as_ref().map(|m| m.memory().into_inner())
    }

    /// Validation limits for requests.
    pub fn limits(&self) -> Limits {
        Limits {
            capacity: self.geometry.capacity_bytes,
            logical_block_size: self.geometry.logical_block_size,
            seg_max: self.geometry.seg_max(),
            max_bytes: self.geometry.max_request_bytes(),
            read_only: self.geometry.read_only,
        }
    }
}

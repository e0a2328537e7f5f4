//! thinblk's vhost-user-blk device.
//!
//! The data path, one module per step: [`device`] (vhost-user backend, one worker per
//! virtqueue) → [`request`] (descriptor chain → validated request) → [`image`] (format
//! layer: guest range → host extents) → [`uring`] (per-worker io_uring) → [`worker`]
//! (submission and completion). [`park`] holds requests that must wait (a full thin volume).
//! [`stats`] counts requests per queue and operation for the metrics endpoint.
//! [`error`] maps every outcome to a virtio status.

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod bounce;
pub mod config;
pub mod context;
pub mod device;
pub mod error;
pub mod guard;
pub mod guest_write;
pub mod inflight;
pub mod ownership;
pub mod park;
pub mod protocol;
pub mod request;
pub mod seccomp;
pub mod stats;
pub mod vring;
pub mod worker;

/// The disk layer this device maps requests onto (re-exported: `image`, `engine`, `uring`).
pub use thinblk_disk as disk;
pub use thinblk_disk::{engine, image, uring};

pub use device::{BlkDevice, DeviceConfig};
pub use stats::DeviceStats;
pub use park::{FaultAction, FaultOp, FaultPolicy, ParkCause, ParkHub, ParkListener};
pub use image::{image_identity, open_direct, Disk, OpenedFile, RawImage};

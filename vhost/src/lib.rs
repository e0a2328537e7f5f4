//! thinblk's vhost-user-blk device.
//!
//! The data path, one module per step: [`device`] (vhost-user backend, one worker per
//! virtqueue) → [`request`] (descriptor chain → validated request) → [`image`] (format
//! layer: guest range → host extents) → [`uring`] (per-worker io_uring) → [`worker`]
//! (submission and completion). [`error`] maps every outcome to a virtio status.

pub mod config;
pub mod device;
pub mod error;
pub mod image;
pub mod request;
pub mod uring;
pub mod worker;

pub use device::{BlkDevice, DeviceConfig};
pub use image::{image_identity, open_direct, ImageFormat, OpenedFile, RawImage};

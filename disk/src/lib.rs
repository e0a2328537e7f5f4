//! Where the bytes live: the [`disk::Disk`] trait a virtio device maps requests
//! through (extents, opaque write tickets), raw and qcow2 images behind it, opening files
//! for O_DIRECT ([`sys`]), and the engine that runs host IO ([`engine`], [`uring`]).
//!
//! Dependencies run one way: the vhost-user device uses this crate; this crate uses the
//! qcow2 format rules; nothing here knows about virtqueues or vhost-user.

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod aligned;
pub mod chain;
pub mod commit;
pub mod disk;
pub mod engine;
pub mod error;
pub mod lock;
pub mod mirror;
pub mod qcow2;
pub mod raw;
pub mod snapshot;
pub mod sys;
#[cfg(test)]
mod test_util;
pub mod uring;

/// The format seam under its old path (the device code says `image::`).
pub mod image {
    pub use crate::disk::*;
    pub use crate::raw::RawImage;
    pub use crate::sys::{image_identity, open_direct, OpenedFile};
}

pub use disk::Disk;
pub use error::ImageError;
pub use raw::RawImage;
pub use sys::{image_identity, open_direct, OpenedFile};

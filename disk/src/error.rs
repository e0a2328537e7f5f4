//! The disk layer's errors.

use std::io;

/// Errors of the disk layer (raw and qcow2 images).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Host IO on the image failed.
    #[error("image IO failed: {0}")]
    Io(#[from] io::Error),
    /// An allocation would pass the volume's size: the request waits for the volume to grow.
    #[error("volume full: allocation up to {needed} passes its size {limit}")]
    NoSpace {
        /// Where the allocation would end (bytes).
        needed: u64,
        /// The volume's size (bytes).
        limit: u64,
    },
    /// The image cannot serve this request (e.g. it is read-only).
    #[error("image refuses the request: {0}")]
    Refused(String),
}

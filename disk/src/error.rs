//! The disk layer's errors.

use std::io;
use std::path::PathBuf;

use crate::lock::LockError;

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
    /// The image is inactive in this process (an incoming migration's destination before it
    /// takes over, or a source that handed it over): no mapping, nothing touches the storage.
    #[error("the image is inactive (not taken over yet, or handed over to another process)")]
    Inactive,
    /// Another process uses the image in a way the wanted access excludes.
    #[error("{}: {source}", path.display())]
    Lock {
        /// The image.
        path: PathBuf,
        /// Why (naming the holders).
        source: LockError,
    },
    /// The qcow2 engine refused the image when activating it (the same refusals as a start).
    #[error("{}: {source}", path.display())]
    Qcow2 {
        /// The image.
        path: PathBuf,
        /// Why.
        source: thinblk_qcow2::Qcow2Error,
    },
}

//! Errors of the qcow2 engine. Every problem an image can have is a variant, never a panic.

use std::io;

/// What went wrong opening, mapping or updating an image.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// Host IO on the image or a backing file failed.
    #[error("IO error: {0}")]
    Io(#[from] io::Error),
    /// Not a qcow2 image at all.
    #[error("not a qcow2 image (bad magic {0:#010x})")]
    BadMagic(u32),
    /// A valid qcow2 feature this engine does not implement.
    #[error("unsupported qcow2 image: {0}")]
    Unsupported(String),
    /// The image contradicts the format (tables past the end, overlaps, absurd sizes...).
    #[error("corrupt qcow2 image: {0}")]
    Corrupt(String),
    /// The image may be read but not written, for the stated reason.
    #[error("image is read-only: {0}")]
    ReadOnly(String),
    /// A guest request outside the virtual disk.
    #[error("request {offset}+{len} outside the virtual size {size}")]
    OutOfRange {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// Virtual size.
        size: u64,
    },
    /// An allocation would end past the volume's current size (a thin volume to extend).
    /// Nothing was changed: retry once the volume has grown.
    #[error("allocation up to {needed} passes the volume size {limit}")]
    VolumeFull {
        /// Where the allocation would end (bytes).
        needed: u64,
        /// The current limit (the volume's size, bytes).
        limit: u64,
    },
    /// A metadata journal of an unclean stop exists but does not belong to the image's
    /// present state: refused, never replayed or dropped silently (the text says what to do).
    #[error("journal refused: {0}")]
    JournalMismatch(String),
    /// The header cannot be rewritten as asked (no room in the first cluster, a name QEMU
    /// would refuse, or a change that cannot be made crash-safe in place); nothing was written.
    #[error("cannot rewrite the header: {0}")]
    HeaderRewrite(String),
    /// The image was merged into its backing file by an active commit (thinblk's owner
    /// extension says so): its writes went on in the base; serving it would roll them back.
    #[error("image was merged into its backing file by an active commit; serve the base instead (or, to use this image anyway, open it once with qemu-img/QEMU, which drops the mark)")]
    Merged,
    /// The image cannot grow any further (refcount table or offset limits).
    #[error("image full: {0}")]
    NoSpace(String),
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, Qcow2Error>;

pub(crate) fn corrupt<T>(msg: impl Into<String>) -> Result<T> {
    Err(Qcow2Error::Corrupt(msg.into()))
}

pub(crate) fn unsupported<T>(msg: impl Into<String>) -> Result<T> {
    Err(Qcow2Error::Unsupported(msg.into()))
}

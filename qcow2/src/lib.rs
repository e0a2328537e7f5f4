//! thinblk's qcow2 engine: the format and its rules, with no vhost and no runtime in it.
//!
//! It opens and validates images, maps guest ranges to host offsets for a caller that moves
//! the data itself (zero-copy), allocates clusters with an append-only bump pointer whose
//! high-water mark is the image's *allocation*, and writes metadata in QEMU's order.

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod backing;
pub mod check;
pub mod create;
pub mod error;
pub mod header;
pub mod image;
pub mod journal;
pub mod stats;
pub mod storage;
pub mod table;

pub use backing::change_backing_file;
pub use check::{check, CheckReport};
pub use create::{create, CreateOptions};
pub use error::{Qcow2Error, Result};
pub use header::{Header, Owner};
pub use image::{AllocationObserver, BackingReader, JournalOptions, MappedRange, Mapping, OpenOptions, Qcow2};
pub use journal::{journal_file_name, legacy_journal_pending, ReplayReport, DEFAULT_SEGMENT_BYTES};
pub use stats::CacheStats;
pub use storage::{Aligned, FileStorage, MemStorage, Storage};

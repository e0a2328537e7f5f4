//! thinblk: engine glue, the daemon loop and the command line around the vhost-user-blk
//! device of the `thinblk-vhost` crate.

pub mod chain;
pub mod cli;
pub mod ctl;
pub mod daemon;
pub mod fault;
pub mod handover;
/// The image formats (the disk crate's qcow2 and raw adapters), under their old name.
pub use thinblk_disk::qcow2 as format;
pub mod mailbox;
pub mod metrics;
pub mod thin;

//! Thin volumes: the extension policy (spec §2) and, later, the volume and its growth.

pub mod monitor;
pub mod policy;
pub mod volume;

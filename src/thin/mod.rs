//! Thin volumes: the extension policy (spec §2) and, later, the volume and its growth.

pub mod policy;
pub mod volume;

//! Storage error policies: what a request whose host IO failed becomes (spec §3). QEMU's
//! `werror` / `rerror` values plus openEuler's `retry`, with `retry_interval` and
//! `retry_timeout`, implemented in the backend since no QEMU block layer sits in the path.

pub mod policy;
pub mod state;

pub use policy::{decide, ErrorPolicy, Settings, SettingsError};
pub use state::FaultState;

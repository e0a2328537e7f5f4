//! The in-process client of oVirt vdsm's storage mailbox (spec §1): the wire format, the
//! HSM client's slot handshake, and the SPM's side (our responder and test double).

pub mod client;
pub mod io;
pub mod responder;
pub mod spm;
pub mod wire;


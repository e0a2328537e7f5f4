//! The in-process client of oVirt vdsm's storage mailbox (spec §1). This module holds the
//! wire format; the client and the SPM responder build on it.

pub mod wire;

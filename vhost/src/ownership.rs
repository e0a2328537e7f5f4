//! Who may write the image: the device takes it before its rings start and hands it over
//! when a live migration stops them (QEMU's active and inactive block nodes).
//!
//! The device decides *when* (`protocol::session`): a ring that starts while the image is
//! inactive activates it first (the destination after the switch-over, or a source whose
//! migration failed); the last ring stopped while dirty logging is on (the source's
//! switch-over) inactivates it once every request has completed. The daemon decides *what*
//! (image locks, journal, write-back, the thin volume's monitor, status and metrics): it
//! implements [`Ownership`]. Without one, the device is always active ([`AlwaysActive`]).

use std::time::Duration;


/// Takes and hands over the image.
pub trait Ownership: Send + Sync {
    /// Whether this process may write the image now.
    fn is_active(&self) -> bool;
    /// Takes the image (write lock, metadata read afresh, journal); waits at most `wait`
    /// for the previous owner to let go.
    fn activate(&self, wait: Duration) -> Result<(), String>;
    /// Hands the image over (the caller has no request in flight): metadata written back
    /// and synced, journal removed, write lock dropped.
    fn inactivate(&self) -> Result<(), String>;
    /// The device's rings changed: `running` rings are started (or starting), `in_hand`
    /// requests are not completed (a management command may hand the image over only when
    /// both are 0). Serialised with such a command: a ring start reports before it looks at
    /// [`Ownership::is_active`].
    fn rings(&self, _running: usize, _in_hand: usize) {}
}

/// The default for a device whose daemon does not migrate: always active, nothing to do.
pub struct AlwaysActive;

impl Ownership for AlwaysActive {
    fn is_active(&self) -> bool {
        true
    }

    fn activate(&self, _wait: Duration) -> Result<(), String> {
        Ok(())
    }

    fn inactivate(&self) -> Result<(), String> {
        Ok(())
    }
}

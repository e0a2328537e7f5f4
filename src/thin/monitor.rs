//! The per-drive extension state machine of spec §2.3–§2.5: what to do on a periodic tick, on
//! a threshold crossing (or ENOSPC), and after an extension completed and the volume was
//! refreshed. Pure: time is passed in, actions are returned.

use std::time::{Duration, Instant};

use super::policy::{Decision, Policy};

/// Re-send an unanswered extension after this long (`[thinp] extend_timeout`).
pub const EXTEND_TIMEOUT: Duration = Duration::from_secs(2);

/// A drive's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriveState {
    /// No threshold armed.
    Unset,
    /// A threshold is armed at this many bytes.
    Set(u64),
    /// The threshold was crossed (or ENOSPC seen): extending.
    Exceeded,
    /// The volume is at its maximum size.
    Disabled,
}

impl DriveState {
    /// Every state's name, in a fixed order (the `state` label of the metrics).
    pub const NAMES: [&'static str; 4] = ["unset", "set", "exceeded", "disabled"];

    /// This state's name.
    pub fn name(self) -> &'static str {
        match self {
            DriveState::Unset => "unset",
            DriveState::Set(_) => "set",
            DriveState::Exceeded => "exceeded",
            DriveState::Disabled => "disabled",
        }
    }
}

/// What the caller must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    None,
    /// Arm the write threshold at this many bytes.
    Arm(u64),
    /// Send an extend request for this size (bytes, whole MiB).
    Extend(u64),
    /// The allocation cannot be explained: stop the disk and report (spec §2.7).
    Improbable,
}

/// The state machine of one drive.
#[derive(Debug)]
pub struct Monitor {
    policy: Policy,
    capacity: u64,
    state: DriveState,
    last_sent: Option<Instant>,
    requested: Option<u64>,
}

impl Monitor {
    /// A drive of `capacity` bytes, with nothing armed yet.
    pub fn new(policy: Policy, capacity: u64) -> Monitor {
        Monitor { policy, capacity, state: DriveState::Unset, last_sent: None, requested: None }
    }

    /// The disk's virtual size.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The current state.
    pub fn state(&self) -> DriveState {
        self.state
    }

    /// The size last asked for, if an extension is outstanding.
    pub fn requested(&self) -> Option<u64> {
        self.requested
    }

    fn send(&mut self, now: Instant, physical: u64) -> Action {
        if !self.policy.can_extend(physical, self.capacity) {
            self.state = DriveState::Disabled;
            return Action::None;
        }
        let size = self.policy.next_size(physical, self.capacity);
        self.state = DriveState::Exceeded;
        self.last_sent = Some(now);
        self.requested = Some(size);
        Action::Extend(size)
    }

    /// Decides for a drive without an armed threshold.
    fn evaluate(&mut self, now: Instant, physical: u64, allocation: u64) -> Action {
        match self.policy.evaluate(physical, allocation, self.capacity) {
            Decision::Improbable => Action::Improbable,
            Decision::Arm(t) => {
                self.state = DriveState::Set(t);
                self.requested = None;
                Action::Arm(t)
            }
            Decision::Disabled => {
                self.state = DriveState::Disabled;
                Action::None
            }
            Decision::Extend(_) => self.send(now, physical),
        }
    }

    /// The periodic check (every 2 s): only UNSET and EXCEEDED drives do anything.
    pub fn on_tick(&mut self, now: Instant, physical: u64, allocation: u64) -> Action {
        match self.state {
            DriveState::Unset => self.evaluate(now, physical, allocation),
            DriveState::Exceeded => {
                let recent = self.last_sent.is_some_and(|t| now.duration_since(t) < EXTEND_TIMEOUT);
                if recent && self.policy.can_extend(physical, self.capacity) {
                    Action::None
                } else {
                    self.send(now, physical)
                }
            }
            DriveState::Set(_) | DriveState::Disabled => Action::None,
        }
    }

    /// The armed threshold was crossed, or a write failed with ENOSPC: extend now (urgent:
    /// not held back by a recent request).
    pub fn on_exceeded(&mut self, now: Instant, physical: u64) -> Action {
        match self.state {
            DriveState::Disabled => Action::None,
            _ => self.send(now, physical),
        }
    }

    /// An extension completed and the volume was refreshed to `physical` bytes.
    pub fn on_refreshed(&mut self, now: Instant, physical: u64, allocation: u64) -> Action {
        match self.requested {
            // Still too small (the SPM failed, or the refresh does not show it yet): stay
            // EXCEEDED; the next tick after the timeout re-sends.
            Some(want) if physical < want => Action::None,
            _ => {
                self.state = DriveState::Unset;
                self.evaluate(now, physical, allocation)
            }
        }
    }

    /// The disk was resized: start over.
    pub fn on_resize(&mut self, capacity: u64) {
        self.capacity = capacity;
        self.state = DriveState::Unset;
        self.requested = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::thin::policy::MIB;

    const GIB: u64 = 1 << 30;

    #[test]
    fn unset_arms_when_there_is_room_and_extends_when_not() {
        let t0 = Instant::now();
        let mut m = Monitor::new(Policy::default(), 100 * GIB);
        assert_eq!(m.on_tick(t0, 5 * GIB, GIB), Action::Arm(3 * GIB));
        assert_eq!(m.state(), DriveState::Set(3 * GIB));
        assert_eq!(m.on_tick(t0, 5 * GIB, 4 * GIB), Action::None, "SET drives are not polled");
        let mut m = Monitor::new(Policy::default(), 100 * GIB);
        assert_eq!(m.on_tick(t0, 2560 * MIB, 2 * GIB), Action::Extend(5120 * MIB));
        assert_eq!(m.state(), DriveState::Exceeded);
    }

    #[test]
    fn exceeded_resends_every_extend_timeout_and_events_bypass_it() {
        let t0 = Instant::now();
        let mut m = Monitor::new(Policy::default(), 100 * GIB);
        m.on_tick(t0, 5 * GIB, GIB);
        assert_eq!(m.on_exceeded(t0, 5 * GIB), Action::Extend(7680 * MIB));
        assert_eq!(m.on_tick(t0 + Duration::from_millis(1999), 5 * GIB, 4 * GIB), Action::None);
        assert_eq!(m.on_tick(t0 + Duration::from_millis(2000), 5 * GIB, 4 * GIB), Action::Extend(7680 * MIB));
        // An event right after a send still sends (urgent).
        assert_eq!(m.on_exceeded(t0 + Duration::from_millis(2001), 5 * GIB), Action::Extend(7680 * MIB));
    }

    #[test]
    fn completion_rearms_from_the_refreshed_size_or_waits() {
        let t0 = Instant::now();
        let mut m = Monitor::new(Policy::default(), 100 * GIB);
        m.on_exceeded(t0, 5 * GIB);
        assert_eq!(m.requested(), Some(7680 * MIB));
        // The refresh does not show the new size yet: stay EXCEEDED.
        assert_eq!(m.on_refreshed(t0, 5 * GIB, 4 * GIB), Action::None);
        assert_eq!(m.state(), DriveState::Exceeded);
        // Extent rounding may give more than asked: the threshold follows the real size.
        assert_eq!(m.on_refreshed(t0, 7808 * MIB, 4 * GIB), Action::Arm(7808 * MIB - 2 * GIB));
        assert_eq!(m.requested(), None);
        // Refreshed, but the allocation already ran past the new threshold: extend again.
        let mut m = Monitor::new(Policy::default(), 100 * GIB);
        m.on_exceeded(t0, 5 * GIB);
        assert_eq!(m.on_refreshed(t0, 7680 * MIB, 7 * GIB), Action::Extend(10240 * MIB));
    }

    #[test]
    fn maximum_size_disables_and_resize_restarts() {
        let t0 = Instant::now();
        let mut m = Monitor::new(Policy::default(), 10 * GIB);
        assert_eq!(m.on_exceeded(t0, 10 * GIB), Action::Extend(11264 * MIB));
        assert_eq!(m.on_refreshed(t0, 11264 * MIB, 11264 * MIB - 1), Action::None);
        assert_eq!(m.state(), DriveState::Disabled);
        assert_eq!(m.on_exceeded(t0, 11264 * MIB), Action::None);
        m.on_resize(20 * GIB);
        assert_eq!(m.state(), DriveState::Unset);
        assert_eq!(m.on_tick(t0, 11264 * MIB, 11264 * MIB - 1), Action::Extend(11264 * MIB + 2560 * MIB));
    }

    #[test]
    fn improbable_allocation_stops_instead_of_extending() {
        let mut m = Monitor::new(Policy::default(), 100 * GIB);
        assert_eq!(m.on_tick(Instant::now(), 5 * GIB, 7680 * MIB + 1), Action::Improbable);
    }
}

//! The per-drive extension state machine of spec §2.3–§2.5: what to do on a periodic tick, on
//! a threshold crossing (or ENOSPC), and after an extension completed and the volume was
//! refreshed. Pure: time is passed in, actions are returned.
//!
//! Rate-aware sizing ([`RateSettings`]) works on top of the spec, which stays the floor: the
//! allocation rate (fast attack, then an exponentially weighted decay over a few seconds,
//! metadata included; sampled every 250 ms)
//! and the extension round trip (request → refreshed size, from the last extensions) set how
//! much free space must remain when a request goes out — enough for `margin` round trips at
//! the current rate — and how big the request is — room for two such spans, capped. When the
//! rate drops the averages decay and the spec's limit and chunk apply again.

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

/// Rate-aware sizing settings (`--thin-rate-aware`, `--extend-guess-ms`, `--max-extend-mb`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateSettings {
    /// The round trip assumed before the first extension is timed.
    pub rtt_guess: Duration,
    /// Round trips of writing at the current rate the free space must cover when a request
    /// goes out.
    pub margin: f64,
    /// The largest single extension (bytes).
    pub max_step: u64,
}

impl Default for RateSettings {
    fn default() -> Self {
        RateSettings { rtt_guess: Duration::from_millis(1500), margin: 2.0, max_step: 10 << 30 }
    }
}

/// Time constant of the allocation-rate average.
const RATE_TAU_S: f64 = 4.0;

/// The allocation rate and extension round trip, as last observed.
#[derive(Debug, Clone, Copy)]
struct RateModel {
    settings: RateSettings,
    last: Option<(Instant, u64)>,
    bytes_per_s: f64,
    rtt_s: f64,
}

impl RateModel {
    fn new(settings: RateSettings) -> RateModel {
        RateModel { settings, last: None, bytes_per_s: 0.0, rtt_s: settings.rtt_guess.as_secs_f64() }
    }

    /// A sample of the allocation mark.
    fn observe(&mut self, now: Instant, allocation: u64) {
        match self.last {
            Some((t, a)) => {
                let dt = now.saturating_duration_since(t).as_secs_f64();
                if dt < 0.05 {
                    return;
                }
                let inst = allocation.saturating_sub(a) as f64 / dt;
                let alpha = 1.0 - (-dt / RATE_TAU_S).exp();
                // Fast attack, slow release: a writer that speeds up is followed at once (it
                // is the one that runs out of space), one that slows down only gradually.
                self.bytes_per_s = if inst > self.bytes_per_s { inst } else { self.bytes_per_s + alpha * (inst - self.bytes_per_s) };
                self.last = Some((now, allocation));
            }
            None => self.last = Some((now, allocation)),
        }
    }

    /// A timed extension: a slower one counts at once, faster ones pull the estimate down
    /// slowly (what matters is not being caught out by the slow ones).
    fn observe_rtt(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        self.rtt_s = if s > self.rtt_s { s } else { 0.7 * self.rtt_s + 0.3 * s };
    }

    /// Free space needed when a request goes out.
    fn need(&self) -> u64 {
        (self.bytes_per_s * self.rtt_s * self.settings.margin) as u64
    }
}

/// The state machine of one drive.
#[derive(Debug)]
pub struct Monitor {
    policy: Policy,
    capacity: u64,
    state: DriveState,
    last_sent: Option<Instant>,
    requested: Option<u64>,
    /// Rate-aware sizing (None: the spec alone).
    rate: Option<RateModel>,
}

impl Monitor {
    /// A drive of `capacity` bytes, with nothing armed yet.
    pub fn new(policy: Policy, capacity: u64) -> Monitor {
        Monitor { policy, capacity, state: DriveState::Unset, last_sent: None, requested: None, rate: None }
    }

    /// Turns rate-aware sizing on.
    pub fn with_rate(mut self, settings: RateSettings) -> Monitor {
        self.rate = Some(RateModel::new(settings));
        self
    }

    /// The allocation rate (bytes/s) and extension round trip (s) rate-aware sizing uses.
    pub fn rate(&self) -> Option<(f64, f64)> {
        self.rate.map(|r| (r.bytes_per_s, r.rtt_s))
    }

    /// The minimum free space now: the spec's limit, or more at a high rate.
    fn limit(&self) -> u64 {
        let spec = self.policy.limit();
        self.rate.map(|r| r.need().max(spec)).unwrap_or(spec)
    }

    /// The next volume size: the spec's chunk more, or room for two spans at the rate.
    fn next_size(&self, physical: u64) -> u64 {
        let spec = self.policy.next_size(physical, self.capacity);
        let Some(r) = self.rate else { return spec };
        // Whole chunks: volumes keep growing in the operator's steps (extent-aligned on LVM).
        let chunk = self.policy.chunk().max(1);
        let step = r.need().saturating_mul(2).min(r.settings.max_step).max(chunk).div_ceil(chunk).saturating_mul(chunk);
        let rated = super::policy::ceil_to(physical.saturating_add(step), super::policy::MIB).min(super::policy::max_size(self.capacity));
        rated.max(spec)
    }

    /// The threshold to arm now for a volume of `physical` bytes.
    fn threshold(&self, physical: u64) -> u64 {
        physical.saturating_sub(self.limit()).max(1)
    }

    fn log_decision(&self, what: &'static str, physical: u64, allocation: Option<u64>, value: u64) {
        if let Some(r) = self.rate {
            tracing::info!(
                decision = what,
                rate_mib_s = (r.bytes_per_s / 1048576.0).round() as u64,
                rtt_ms = (r.rtt_s * 1000.0).round() as u64,
                free_mib = allocation.map(|a| physical.saturating_sub(a) >> 20),
                limit_mib = self.limit() >> 20,
                value_mib = value >> 20,
                "thin sizing"
            );
        }
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
        let size = self.next_size(physical);
        self.state = DriveState::Exceeded;
        self.last_sent = Some(now);
        self.requested = Some(size);
        self.log_decision("extend", physical, None, size);
        Action::Extend(size)
    }

    /// Decides for a drive without an armed threshold.
    fn evaluate(&mut self, now: Instant, physical: u64, allocation: u64) -> Action {
        let decision = match self.policy.evaluate(physical, allocation, self.capacity) {
            // At a high rate the spec's limit is not enough: extend now rather than arm.
            Decision::Arm(_) if physical.saturating_sub(allocation) < self.limit() && self.policy.can_extend(physical, self.capacity) => {
                Decision::Extend(0)
            }
            Decision::Arm(_) => Decision::Arm(self.threshold(physical)),
            d => d,
        };
        match decision {
            Decision::Improbable => Action::Improbable,
            Decision::Arm(t) => {
                self.state = DriveState::Set(t);
                self.requested = None;
                self.log_decision("arm", physical, Some(allocation), t);
                Action::Arm(t)
            }
            Decision::Disabled => {
                self.state = DriveState::Disabled;
                Action::None
            }
            Decision::Extend(_) => self.send(now, physical),
        }
    }

    /// A rate sample between ticks (every 250 ms): with rate-aware sizing, moves an armed
    /// threshold earlier, or extends now, when the rate has risen; otherwise nothing.
    pub fn on_sample(&mut self, now: Instant, physical: u64, allocation: u64) -> Action {
        let Some(r) = self.rate.as_mut() else { return Action::None };
        r.observe(now, allocation);
        match self.state {
            DriveState::Set(t) if self.threshold(physical) + super::policy::MIB < t => self.move_earlier(now, physical, allocation),
            _ => Action::None,
        }
    }

    fn move_earlier(&mut self, now: Instant, physical: u64, allocation: u64) -> Action {
        let earlier = self.threshold(physical);
        if allocation >= earlier && self.policy.can_extend(physical, self.capacity) {
            self.send(now, physical)
        } else {
            self.state = DriveState::Set(earlier);
            self.log_decision("re-arm earlier", physical, Some(allocation), earlier);
            Action::Arm(earlier)
        }
    }

    /// The periodic check (every 2 s): only UNSET and EXCEEDED drives do anything.
    pub fn on_tick(&mut self, now: Instant, physical: u64, allocation: u64) -> Action {
        if let Some(r) = self.rate.as_mut() {
            r.observe(now, allocation);
        }
        match self.state {
            DriveState::Unset => self.evaluate(now, physical, allocation),
            // The rate rose: the armed threshold is too late, move it earlier (or extend now).
            DriveState::Set(t) if self.rate.is_some() && self.threshold(physical) + super::policy::MIB < t => {
                self.move_earlier(now, physical, allocation)
            }
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
        self.on_exceeded_at(now, physical, None)
    }

    /// [`Monitor::on_exceeded`], with the allocation mark when known (a rate sample).
    pub fn on_exceeded_at(&mut self, now: Instant, physical: u64, allocation: Option<u64>) -> Action {
        if let (Some(r), Some(a)) = (self.rate.as_mut(), allocation) {
            r.observe(now, a);
        }
        match self.state {
            DriveState::Disabled => Action::None,
            _ => self.send(now, physical),
        }
    }

    /// An extension completed and the volume was refreshed to `physical` bytes.
    pub fn on_refreshed(&mut self, now: Instant, physical: u64, allocation: u64) -> Action {
        if let Some(r) = self.rate.as_mut() {
            r.observe(now, allocation);
            if let (Some(want), Some(sent)) = (self.requested, self.last_sent) {
                if physical >= want {
                    r.observe_rtt(now.saturating_duration_since(sent));
                }
            }
        }
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
    fn a_high_rate_extends_earlier_and_bigger_and_a_low_one_falls_back_to_the_spec() {
        let t0 = Instant::now();
        let rate = RateSettings { rtt_guess: Duration::from_millis(1100), margin: 2.0, max_step: 10 * GIB };
        let mut m = Monitor::new(Policy::default(), 100 * GIB).with_rate(rate);
        // Idle: the spec's threshold (free space 2 GiB = 80 % of a 2560 MiB chunk).
        assert_eq!(m.on_tick(t0, 5 * GIB, GIB), Action::Arm(3 * GIB));
        // Writing 1.5 GiB/s for a while (ticks every 2 s): need = 1.5 GiB/s × 1.1 s × 2 = 3.3 GiB.
        let mut alloc = GIB;
        let mut now = t0;
        let mut last = Action::None;
        for _ in 0..8 {
            now += Duration::from_secs(2);
            alloc += 3 * GIB;
            last = m.on_tick(now, 100 * GIB, alloc.min(40 * GIB));
        }
        let (bps, rtt) = m.rate().expect("rate-aware");
        assert!(bps > 1.2 * GIB as f64 && (rtt - 1.1).abs() < 1e-9, "rate {bps} rtt {rtt}");
        assert!(m.limit() > 3 * GIB, "limit {} MiB", m.limit() >> 20);
        let _ = last;
        // From UNSET now: the threshold leaves the larger free space, the extension is bigger.
        let mut m2 = Monitor::new(Policy::default(), 100 * GIB).with_rate(rate);
        m2.rate = m.rate;
        // 3 GiB free is more than the spec's 2 GiB, less than the 3.2 GiB the rate needs.
        match m2.on_tick(now, 10 * GIB, 7 * GIB) {
            Action::Extend(size) => assert!(size >= 10 * GIB + 6 * GIB, "extension of {} MiB", (size - 10 * GIB) >> 20),
            other => panic!("expected an extension at 3 GiB free, got {other:?}"),
        }
        // The rate drops to nothing: after a while the spec's sizes are back.
        for _ in 0..20 {
            now += Duration::from_secs(2);
            m.on_tick(now, 100 * GIB, 40 * GIB);
        }
        assert_eq!(m.limit(), Policy::default().limit());
        assert_eq!(m.next_size(5 * GIB), Policy::default().next_size(5 * GIB, 100 * GIB));
    }

    #[test]
    fn a_rising_rate_moves_an_armed_threshold_earlier() {
        let t0 = Instant::now();
        let mut m = Monitor::new(Policy::default(), 100 * GIB).with_rate(RateSettings::default());
        assert_eq!(m.on_tick(t0, 20 * GIB, GIB), Action::Arm(18 * GIB));
        let mut now = t0;
        let mut alloc = GIB;
        let mut moved = None;
        for _ in 0..6 {
            now += Duration::from_secs(2);
            alloc += 2 * GIB;
            if let Action::Arm(t) = m.on_tick(now, 20 * GIB, alloc) {
                moved = Some(t);
            }
        }
        let t = moved.expect("re-armed earlier");
        assert!(t < 18 * GIB, "threshold {} MiB", t >> 20);
    }

    #[test]
    fn extension_round_trips_are_timed() {
        let t0 = Instant::now();
        let mut m = Monitor::new(Policy::default(), 100 * GIB).with_rate(RateSettings::default());
        assert_eq!(m.on_exceeded(t0, 5 * GIB), Action::Extend(7680 * MIB));
        m.on_refreshed(t0 + Duration::from_millis(3000), 7680 * MIB, 5 * GIB);
        assert!((m.rate().map(|r| r.1).unwrap_or(0.0) - 3.0).abs() < 1e-6, "a slower round trip counts at once");
    }

    #[test]
    fn improbable_allocation_stops_instead_of_extending() {
        let mut m = Monitor::new(Policy::default(), 100 * GIB);
        assert_eq!(m.on_tick(Instant::now(), 5 * GIB, 7680 * MIB + 1), Action::Improbable);
    }
}

//! A disk's error-policy state: the settings (changeable at run time), the per-disk retry
//! clock (first failure, reset by any success), the one-shot retry timer that resumes every
//! parked request, and the rate-limited BLOCK_IO_ERROR event stream.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use thinblk_vhost::inflight::{boottime_ns, FailureClock};
use thinblk_vhost::{FaultAction, FaultOp, FaultPolicy, ParkHub};

use super::policy::{decide, ErrorPolicy, Settings};

/// At most one event per (operation, action) this often; the rest are counted as suppressed.
pub const EVENT_INTERVAL: Duration = Duration::from_secs(1);
/// Added to the failure clock so that 0 can mean "no failure".
const CLOCK_BIAS: u64 = 1 << 40;
/// Events a slow subscriber may lag behind before events are dropped for it.
const EVENT_BACKLOG: usize = 64;

/// A BLOCK_IO_ERROR-like event (spec §3.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoErrorEvent {
    /// `read` or `write`.
    pub operation: &'static str,
    /// `report`, `ignore`, `stop` or `retry`.
    pub action: &'static str,
    /// The errno.
    pub errno: i32,
    /// errno == ENOSPC.
    pub nospace: bool,
    /// strerror text (not for parsing).
    pub reason: String,
    /// Events of the same kind suppressed by the rate limit since the previous one.
    pub suppressed: u64,
    /// Wall-clock time, microseconds since the epoch.
    pub timestamp_us: u64,
}

/// Counters for status queries and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounters {
    /// Failed requests seen (each attempt counts).
    pub errors: u64,
    /// Failures reported to the guest.
    pub reported: u64,
    /// Failures completed as success.
    pub ignored: u64,
    /// Failures parked.
    pub parked: u64,
}

struct Limiter {
    last: [(Option<Instant>, u64); 8],
}

/// One disk's fault state; implements the data path's [`FaultPolicy`].
pub struct FaultState {
    settings: Mutex<Settings>,
    epoch: Instant,
    /// [`FaultState::now_ns`] of the first unrecovered failure; 0: none.
    first_failure: AtomicU64,
    timer: Mutex<Option<Instant>>,
    timer_cv: Condvar,
    stop: AtomicBool,
    hub: Arc<ParkHub>,
    errors: AtomicU64,
    reported: AtomicU64,
    ignored: AtomicU64,
    parked: AtomicU64,
    limiter: Mutex<Limiter>,
    /// Event channels, each with the liveness of its [`Subscription`] (pruned when it is gone).
    subscribers: Mutex<Vec<(SyncSender<IoErrorEvent>, std::sync::Weak<()>)>>,
    /// The first failure as the frontend keeps it across our restarts (its inflight region).
    carried: Mutex<Option<FailureClock>>,
}

/// Keeps the retry timer thread; stops it when dropped.
pub struct RetryTimer {
    state: Arc<FaultState>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for RetryTimer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.state.timer_cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn action_name(policy: ErrorPolicy, action: FaultAction) -> &'static str {
    match (action, policy) {
        (FaultAction::Report, _) => "report",
        (FaultAction::Ignore, _) => "ignore",
        (FaultAction::Park, ErrorPolicy::Retry) => "retry",
        (FaultAction::Park, _) => "stop",
    }
}

impl FaultState {
    /// State for a disk whose parked requests live in `hub`.
    pub fn new(settings: Settings, hub: Arc<ParkHub>) -> Arc<FaultState> {
        Arc::new(FaultState {
            settings: Mutex::new(settings),
            epoch: Instant::now(),
            first_failure: AtomicU64::new(0),
            timer: Mutex::new(None),
            timer_cv: Condvar::new(),
            stop: AtomicBool::new(false),
            hub,
            errors: AtomicU64::new(0),
            reported: AtomicU64::new(0),
            ignored: AtomicU64::new(0),
            parked: AtomicU64::new(0),
            limiter: Mutex::new(Limiter { last: [(None, 0); 8] }),
            subscribers: Mutex::new(Vec::new()),
            carried: Mutex::new(None),
        })
    }

    /// Starts the retry timer thread.
    pub fn start_timer(self: &Arc<Self>) -> std::io::Result<RetryTimer> {
        let state = self.clone();
        let thread = std::thread::Builder::new().name("retry-timer".into()).spawn(move || state.timer_loop())?;
        Ok(RetryTimer { state: self.clone(), thread: Some(thread) })
    }

    fn timer_loop(&self) {
        loop {
            let Ok(mut armed) = self.timer.lock() else { return };
            loop {
                if self.stop.load(Ordering::SeqCst) {
                    return;
                }
                match *armed {
                    Some(at) if Instant::now() >= at => {
                        *armed = None;
                        break;
                    }
                    Some(at) => {
                        let wait = at.saturating_duration_since(Instant::now());
                        armed = match self.timer_cv.wait_timeout(armed, wait) {
                            Ok((g, _)) => g,
                            Err(_) => return,
                        };
                    }
                    None => {
                        armed = match self.timer_cv.wait(armed) {
                            Ok(g) => g,
                            Err(_) => return,
                        };
                    }
                }
            }
            drop(armed);
            tracing::debug!(parked = self.hub.parked(), "retry interval elapsed: resubmitting parked IO");
            self.hub.resume();
        }
    }

    /// Arms the one-shot retry timer at `now + interval` unless it is already armed.
    fn arm(&self, interval: Duration) {
        if let Ok(mut t) = self.timer.lock() {
            if t.is_none() {
                *t = Some(Instant::now() + interval);
                self.timer_cv.notify_all();
            }
        }
    }

    /// The current settings.
    pub fn settings(&self) -> Settings {
        self.settings.lock().map(|s| *s).unwrap_or_default()
    }

    /// Replaces the settings at run time; parked requests are retried under the new ones.
    pub fn set_settings(&self, s: Settings) {
        if let Ok(mut cur) = self.settings.lock() {
            *cur = s;
        }
        tracing::info!(werror = s.werror.name(), rerror = s.rerror.name(), interval_ms = s.interval.as_millis() as u64,
            timeout_ms = s.timeout.as_millis() as u64, "error policy changed");
        self.hub.resume();
    }

    /// A monotonic clock in nanoseconds, never 0 (offset so stamps can be moved back in tests).
    fn now_ns(&self) -> u64 {
        (self.epoch.elapsed().as_nanos() as u64).saturating_add(CLOCK_BIAS)
    }

    /// How long ago the first unrecovered failure was, if there is one.
    pub fn first_failure(&self) -> Option<Duration> {
        match self.first_failure.load(Ordering::SeqCst) {
            0 => None,
            ns => Some(Duration::from_nanos(self.now_ns().saturating_sub(ns))),
        }
    }

    /// Records the first failure (`since_first` ago) in the carried clock if it holds none.
    fn carry_out(&self, since_first: Duration) {
        if let Ok(c) = self.carried.lock() {
            if let Some(c) = c.as_ref() {
                if c.load() == 0 {
                    c.store(boottime_ns().saturating_sub(since_first.as_nanos() as u64).max(1));
                }
            }
        }
    }

    /// Resubmits every parked request now (the operator's `cont`).
    pub fn cont(&self) {
        tracing::info!(parked = self.hub.parked(), "cont: resubmitting parked IO");
        self.hub.resume();
    }

    /// The counters.
    pub fn counters(&self) -> FaultCounters {
        FaultCounters {
            errors: self.errors.load(Ordering::Relaxed),
            reported: self.reported.load(Ordering::Relaxed),
            ignored: self.ignored.load(Ordering::Relaxed),
            parked: self.parked.load(Ordering::Relaxed),
        }
    }

    /// A stream of BLOCK_IO_ERROR events (rate-limited; a subscriber that falls behind loses
    /// events rather than slowing the data path).
    /// Dropping the subscription unsubscribes (nothing stays behind per connection).
    pub fn subscribe(&self) -> Subscription {
        let (tx, rx) = sync_channel(EVENT_BACKLOG);
        let alive = Arc::new(());
        if let Ok(mut s) = self.subscribers.lock() {
            s.retain(|(_, a)| a.strong_count() > 0);
            s.push((tx, Arc::downgrade(&alive)));
        }
        Subscription { rx, _alive: alive }
    }

    /// Live event subscriptions (tests, diagnostics).
    pub fn subscribers(&self) -> usize {
        self.subscribers.lock().map(|mut s| {
            s.retain(|(_, a)| a.strong_count() > 0);
            s.len()
        }).unwrap_or(0)
    }

    fn emit(&self, op: FaultOp, errno: i32, action: &'static str) {
        let operation = if op == FaultOp::Read { "read" } else { "write" };
        let key = usize::from(op == FaultOp::Write) * 4
            + match action {
                "report" => 0,
                "ignore" => 1,
                "stop" => 2,
                _ => 3,
            };
        let suppressed = {
            let Ok(mut l) = self.limiter.lock() else { return };
            let now = Instant::now();
            let (last, skipped) = &mut l.last[key];
            if last.is_some_and(|t| now.duration_since(t) < EVENT_INTERVAL) {
                *skipped += 1;
                return;
            }
            *last = Some(now);
            std::mem::take(skipped)
        };
        let reason = std::io::Error::from_raw_os_error(errno).to_string();
        tracing::warn!(operation, action, errno, nospace = errno == libc::ENOSPC, reason = %reason, suppressed, "BLOCK_IO_ERROR");
        let timestamp_us = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0);
        let ev = IoErrorEvent { operation, action, errno, nospace: errno == libc::ENOSPC, reason, suppressed, timestamp_us };
        if let Ok(mut subs) = self.subscribers.lock() {
            // Full: that subscriber misses this one. Disconnected: forget it.
            subs.retain(|(s, a)| {
                a.strong_count() > 0 && !matches!(s.try_send(ev.clone()), Err(std::sync::mpsc::TrySendError::Disconnected(_)))
            });
        }
    }
}

/// A stream of BLOCK_IO_ERROR events from [`FaultState::subscribe`].
pub struct Subscription {
    rx: Receiver<IoErrorEvent>,
    _alive: Arc<()>,
}

impl Subscription {
    /// The next event, waiting at most `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<IoErrorEvent, std::sync::mpsc::RecvTimeoutError> {
        self.rx.recv_timeout(timeout)
    }

    /// The events waiting now, without blocking.
    pub fn try_iter(&self) -> std::sync::mpsc::TryIter<'_, IoErrorEvent> {
        self.rx.try_iter()
    }
}

impl FaultPolicy for FaultState {
    fn on_error(&self, op: FaultOp, errno: i32) -> FaultAction {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let s = self.settings();
        let policy = if op == FaultOp::Read { s.rerror } else { s.werror };
        let now = self.now_ns();
        let since_first = if policy == ErrorPolicy::Retry {
            let first = match self.first_failure.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => now,
                Err(f) => f,
            };
            Duration::from_nanos(now.saturating_sub(first))
        } else {
            Duration::ZERO
        };
        if policy == ErrorPolicy::Retry {
            self.carry_out(since_first);
        }
        let action = decide(policy, errno, since_first, s.timeout);
        match action {
            FaultAction::Report => self.reported.fetch_add(1, Ordering::Relaxed),
            FaultAction::Ignore => self.ignored.fetch_add(1, Ordering::Relaxed),
            FaultAction::Park => self.parked.fetch_add(1, Ordering::Relaxed),
        };
        if action == FaultAction::Park && policy == ErrorPolicy::Retry {
            self.arm(s.interval);
        }
        self.emit(op, errno, action_name(policy, action));
        action
    }

    fn on_success(&self) {
        if self.first_failure.load(Ordering::Relaxed) != 0 {
            self.first_failure.store(0, Ordering::SeqCst);
            if let Ok(c) = self.carried.lock() {
                if let Some(c) = c.as_ref() {
                    c.store(0);
                }
            }
        }
    }

    fn carry(&self, clock: Option<FailureClock>) {
        let Ok(mut slot) = self.carried.lock() else { return };
        if let Some(c) = &clock {
            let (at, now) = (c.load(), boottime_ns());
            // An instant in the future is not ours (a frontend may write anything): ignore it.
            if at != 0 && at <= now {
                let ago = now - at;
                let local = self.now_ns().saturating_sub(ago).max(1);
                // Keep the older of the two first failures.
                let mine = self.first_failure.load(Ordering::SeqCst);
                if mine == 0 || local < mine {
                    self.first_failure.store(local, Ordering::SeqCst);
                }
                tracing::info!(first_failure_ms_ago = ago / 1_000_000, "retry deadline carried over from the previous daemon");
            } else if at != 0 {
                c.store(0);
            }
        }
        *slot = clock;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::policy::ErrorPolicy::*;

    fn state(w: ErrorPolicy, r: ErrorPolicy, interval_ms: u64, timeout_ms: u64) -> Arc<FaultState> {
        let s = Settings::new(w, r, Some(interval_ms), Some(timeout_ms)).unwrap();
        FaultState::new(s, ParkHub::new(1).unwrap())
    }

    #[test]
    fn subscriptions_leave_nothing_behind() {
        let st = state(Retry, Report, 1000, 0);
        for _ in 0..100 {
            drop(st.subscribe());
        }
        let keep = st.subscribe();
        assert_eq!(st.subscribers(), 1, "a dropped subscription stayed subscribed");
        drop(keep);
        assert_eq!(st.subscribers(), 0);
    }

    #[test]
    fn timeline_interval_1000_timeout_5000() {
        // A persistent fault from t=0: parked and retried every second; the first failure
        // strictly after 5 s is reported, so the guest sees IOERR between 5 and 6 s. Time is
        // simulated by moving the first-failure stamp back.
        let st = state(Retry, Report, 1000, 5000);
        let fail_at = |t_ms: u64| {
            // Pretend the first failure was t_ms ago.
            if st.first_failure.load(Ordering::SeqCst) != 0 {
                st.first_failure.store(st.now_ns() - t_ms * 1_000_000, Ordering::SeqCst);
            }
            st.on_error(FaultOp::Write, libc::EIO)
        };
        assert_eq!(fail_at(0), FaultAction::Park);
        for t in [1000, 2000, 3000, 4000, 4999] {
            assert_eq!(fail_at(t), FaultAction::Park, "retry at {t} ms");
        }
        assert_eq!(fail_at(5001), FaultAction::Report, "first failure after 5 s is reported");
        assert_eq!(fail_at(6000), FaultAction::Report, "and every one after, until a success");
        st.on_success();
        assert_eq!(st.first_failure(), None);
        assert_eq!(fail_at(0), FaultAction::Park, "a success restarted the clock");
        assert_eq!(st.counters(), FaultCounters { errors: 9, reported: 2, ignored: 0, parked: 7 });
    }

    #[test]
    fn the_retry_deadline_counts_from_a_first_failure_carried_over_a_restart() {
        use thinblk_vhost::inflight::{InflightInfo, InflightRegion};
        let info = InflightInfo { mmap_size: 0, mmap_offset: 0, num_queues: 1, queue_size: 16 };
        let region = InflightRegion::create(info, 1).unwrap();
        let clock = || region.failure_clock().unwrap();
        // The previous daemon's first failure was 6 s ago; timeout 5 s: report at once.
        clock().store(boottime_ns() - 6_000_000_000);
        let st = state(Retry, Report, 1000, 5000);
        st.carry(Some(clock()));
        assert!(st.first_failure().is_some_and(|d| d >= Duration::from_secs(6)));
        assert_eq!(st.on_error(FaultOp::Write, libc::EIO), FaultAction::Report);
        // A success clears both clocks; the next failure starts them again.
        st.on_success();
        assert_eq!((st.first_failure(), clock().load()), (None, 0));
        assert_eq!(st.on_error(FaultOp::Write, libc::EIO), FaultAction::Park);
        assert!(clock().load() > 0, "the new first failure is carried out");
        // An instant in the future (a frontend wrote it) is ignored and cleared.
        let st = state(Retry, Report, 1000, 5000);
        clock().store(boottime_ns() + 60_000_000_000);
        st.carry(Some(clock()));
        assert_eq!((st.first_failure(), clock().load()), (None, 0));
    }

    #[test]
    fn zero_timeout_never_reports_and_policies_are_per_direction() {
        let st = state(Retry, Report, 1000, 0);
        st.first_failure.store(1, Ordering::SeqCst);
        assert_eq!(st.on_error(FaultOp::Write, libc::EIO), FaultAction::Park);
        assert_eq!(st.on_error(FaultOp::Read, libc::EIO), FaultAction::Report, "reads follow rerror");
        st.set_settings(Settings::new(Report, Retry, None, None).unwrap());
        assert_eq!(st.on_error(FaultOp::Write, libc::EIO), FaultAction::Report);
        assert_eq!(st.on_error(FaultOp::Read, libc::EIO), FaultAction::Park);
    }

    #[test]
    fn retry_timer_resumes_after_the_interval() {
        let st = state(Retry, Report, 100, 0);
        let _timer = st.start_timer().unwrap();
        let before = st.hub.resumes();
        let t0 = Instant::now();
        assert_eq!(st.on_error(FaultOp::Write, libc::EIO), FaultAction::Park);
        while st.hub.resumes() == before {
            assert!(t0.elapsed() < Duration::from_secs(5), "timer never fired");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(t0.elapsed() >= Duration::from_millis(100), "fired early: {:?}", t0.elapsed());
    }

    #[test]
    fn events_are_rate_limited_per_kind() {
        let st = state(Retry, Report, 1000, 0);
        let rx = st.subscribe();
        for _ in 0..5 {
            st.on_error(FaultOp::Write, libc::EIO);
        }
        st.on_error(FaultOp::Read, libc::ENOSPC);
        let evs: Vec<IoErrorEvent> = rx.try_iter().collect();
        assert_eq!(evs.len(), 2, "{evs:?}");
        assert_eq!((evs[0].operation, evs[0].action, evs[0].nospace), ("write", "retry", false));
        assert_eq!((evs[1].operation, evs[1].action, evs[1].nospace), ("read", "report", true));
    }
}

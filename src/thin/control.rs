//! The thin-volume control thread: reacts within a millisecond to a threshold crossing or a
//! refused allocation (signalled inline from the allocator and the workers), drives the
//! [`Monitor`], sends extend requests through the mailbox client, refreshes the volume when
//! the SPM answers, raises the allocation limit and resumes parked IO.
//!
//! The IO workers never block on it: they only bump an atomic and write an eventfd.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thinblk_qcow2::{AllocationObserver, Qcow2};
use thinblk_vhost::{ParkCause, ParkHub, ParkListener};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::monitor::{Action, DriveState, Monitor};
use super::policy::{wire_mib, WriteThreshold};
use super::volume::Volume;
use crate::mailbox::client::{Client, MailboxIo};
use crate::mailbox::wire::{Extend, Uuid};

/// The periodic check of UNSET and EXCEEDED drives (`vm_watermark_interval`).
pub const TICK: Duration = Duration::from_secs(2);
/// Rate samples between ticks (rate-aware sizing).
pub const SAMPLE: Duration = Duration::from_millis(250);
/// How often replies are polled while a request is outstanding (`events_interval`).
pub const REPLY_POLL: Duration = Duration::from_millis(500);
/// Back-off after more than 9 consecutive failed mailbox polls.
pub const MAILBOX_BACKOFF: Duration = Duration::from_secs(60);

/// What the data path signals to the control thread, lock-free.
pub struct Signals {
    threshold: WriteThreshold,
    wake: EventFd,
    urgent: AtomicBool,
    /// Nanoseconds since `epoch` of the first unhandled signal (0: none).
    since: AtomicU64,
    epoch: Instant,
    allocation: AtomicU64,
    /// Held while the mailbox is written, and by a handover while the image goes inactive:
    /// nothing is sent once the image was handed over (checked again under it).
    pub turn: Mutex<()>,
}

impl Signals {
    /// Fresh signals, nothing armed.
    pub fn new() -> io::Result<Arc<Signals>> {
        Ok(Arc::new(Signals {
            threshold: WriteThreshold::default(),
            wake: EventFd::new(EFD_NONBLOCK)?,
            urgent: AtomicBool::new(false),
            since: AtomicU64::new(0),
            epoch: Instant::now(),
            allocation: AtomicU64::new(0),
            turn: Mutex::new(()),
        }))
    }

    /// The armed write threshold.
    pub fn threshold(&self) -> Option<u64> {
        self.threshold.armed()
    }

    fn raise(&self) {
        let now = self.epoch.elapsed().as_nanos().max(1) as u64;
        let _ = self.since.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
        self.urgent.store(true, Ordering::SeqCst);
        if let Err(e) = self.wake.write(1) {
            tracing::error!(error = %e, "waking the thin control thread failed");
        }
    }

    /// Wakes the control thread for a look at the image's state (it was activated or handed
    /// over), without a threshold signal.
    pub fn wake(&self) {
        if let Err(e) = self.wake.write(1) {
            tracing::error!(error = %e, "waking the thin control thread failed");
        }
    }

    /// Takes the pending signal: whether there was one, and when it was raised.
    fn take(&self) -> Option<Instant> {
        let _ = self.wake.read();
        if !self.urgent.swap(false, Ordering::SeqCst) {
            return None;
        }
        let ns = self.since.swap(0, Ordering::SeqCst);
        Some(self.epoch + Duration::from_nanos(ns))
    }
}

impl AllocationObserver for Signals {
    fn allocated(&self, end: u64) {
        self.allocation.store(end, Ordering::Relaxed);
        if self.threshold.check(end).is_some() {
            self.raise();
        }
    }

    fn refused(&self, _needed: u64, _limit: u64) {
        self.raise();
    }
}

impl ParkListener for Signals {
    fn parked(&self, _queue: usize, cause: ParkCause) {
        if cause.is_no_space() {
            self.raise();
        }
    }
}

/// Identity of the volume on the mailbox.
#[derive(Clone, Copy, Debug)]
pub struct MailboxIdentity {
    /// Storage domain (the VG).
    pub domain: Uuid,
    /// Volume (the LV).
    pub volume: Uuid,
}

/// A snapshot made a new top: the volume to follow from now on.
pub struct Switch {
    /// The new top's volume.
    pub volume: Volume,
    /// Its UUID on the mailbox.
    pub uuid: crate::mailbox::wire::Uuid,
    /// Told once the control thread follows it.
    pub done: std::sync::mpsc::Sender<()>,
}

/// The control thread's state.
pub struct Control {
    engine: Arc<dyn ThinEngine>,
    volume: Volume,
    monitor: Monitor,
    signals: Arc<Signals>,
    hub: Arc<ParkHub>,
    client: Client,
    io: Box<dyn MailboxIo + Send>,
    id: MailboxIdentity,
    /// When the outstanding extension was first requested, and the physical size then.
    started: Option<(Instant, u64)>,
    failures: u32,
    next_poll: Instant,
    improbable_logged: bool,
    stats: Arc<Mutex<ThinStats>>,
    /// The image was active at the last look (live migration hands it between daemons).
    active: bool,
    /// New tops to follow (snapshots), and how a new top's monitor is made.
    switches: Option<(std::sync::mpsc::Receiver<Switch>, FreshMonitor)>,
    /// Set while a new top waits to be followed: the volume here is no longer the top's, so
    /// its size must not become the engine's limit.
    superseded: Arc<AtomicBool>,
}

/// Makes the monitor of a new top.
pub type FreshMonitor = Box<dyn Fn() -> Monitor + Send>;

/// What the engine offers the control thread (the qcow2 engine in production).
pub trait ThinEngine: Send + Sync {
    /// The allocation mark.
    fn allocation(&self) -> u64;
    /// Sets the host offset no allocation may pass.
    fn set_limit(&self, limit: u64);
    /// Whether this process owns the image now (an inactive image, before a migration's
    /// switch-over or after it handed the image over, extends nothing).
    fn active(&self) -> bool {
        true
    }
}

impl ThinEngine for Qcow2 {
    fn allocation(&self) -> u64 {
        Qcow2::allocation(self)
    }
    fn set_limit(&self, limit: u64) {
        Qcow2::set_limit(self, limit)
    }
}

/// Upper bounds (seconds) of the extension-duration histogram buckets (an unbounded one
/// follows).
pub const EXTENSION_BOUNDS_S: [f64; 11] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// What the control thread publishes for the metrics endpoint, the control socket and tests.
#[derive(Clone, Debug, Default)]
pub struct ThinStats {
    /// Extension requests sent (re-sends included).
    pub requests: u64,
    /// Extensions completed (the volume grew).
    pub completed: u64,
    /// SPM replies that did not grow the volume enough.
    pub failed: u64,
    /// The volume's size.
    pub physical: u64,
    /// The volume's UUID (a snapshot moves it to the new top's).
    pub volume: String,
    /// The drive state, as text.
    pub state: String,
    /// The drive state's name (one of [`DriveState::NAMES`]).
    pub state_name: &'static str,
    /// The armed write threshold, if one is.
    pub threshold: Option<u64>,
    /// The disk's virtual size.
    pub capacity: u64,
    /// The largest size the volume is extended to.
    pub max_size: u64,
    /// Mailbox slots our requests hold.
    pub slots_in_use: u64,
    /// Requests waiting for a free mailbox slot.
    pub queued: u64,
    /// Writes of the host's mailbox block that failed (retried at the next poll).
    pub mailbox_write_errors: u64,
    /// Stale slots of the host's mailbox block this process freed.
    pub mailbox_slots_reclaimed: u64,
    /// Completed extensions per duration bucket of [`EXTENSION_BOUNDS_S`] and an unbounded
    /// one (not cumulative); the duration runs from the first request to the grown volume.
    pub duration_buckets: [u64; EXTENSION_BOUNDS_S.len() + 1],
    /// Sum of completed extension durations (seconds).
    pub duration_sum: f64,
    /// The allocation rate rate-aware sizing sees (bytes/s; 0 without it).
    pub rate_bps: f64,
    /// The extension round trip rate-aware sizing assumes (seconds; 0 without it).
    pub round_trip_s: f64,
}

impl ThinStats {
    /// Counts a completed extension that took `seconds`.
    fn observe_extension(&mut self, seconds: f64) {
        let b = EXTENSION_BOUNDS_S.iter().position(|&bound| seconds <= bound).unwrap_or(EXTENSION_BOUNDS_S.len());
        self.duration_buckets[b] += 1;
        self.duration_sum += seconds;
    }
}

impl Control {
    /// Sets up control of `volume` for `engine`, with the mailbox `io` and `client`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: Arc<dyn ThinEngine>,
        volume: Volume,
        monitor: Monitor,
        signals: Arc<Signals>,
        hub: Arc<ParkHub>,
        client: Client,
        io: Box<dyn MailboxIo + Send>,
        id: MailboxIdentity,
    ) -> Control {
        engine.set_limit(volume.physical());
        let active = engine.active();
        Control {
            engine,
            volume,
            monitor,
            signals,
            hub,
            client,
            io,
            id,
            started: None,
            failures: 0,
            next_poll: Instant::now(),
            improbable_logged: false,
            stats: Arc::new(Mutex::new(ThinStats::default())),
            active,
            switches: None,
            superseded: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Follows new tops sent on `rx` (each with a fresh monitor from `monitor`).
    pub fn with_switches(mut self, rx: std::sync::mpsc::Receiver<Switch>, monitor: FreshMonitor, superseded: Arc<AtomicBool>) -> Control {
        self.switches = Some((rx, monitor));
        self.superseded = superseded;
        self
    }

    /// Takes the switches sent so far: the last one wins; each earlier volume is dropped.
    fn follow_switches(&mut self, now: Instant) {
        let Some((rx, fresh)) = &self.switches else { return };
        let mut latest = None;
        while let Ok(sw) = rx.try_recv() {
            latest = Some(sw);
        }
        let Some(sw) = latest else { return };
        let monitor = fresh();
        self.superseded.store(false, Ordering::SeqCst);
        let old = self.id.volume;
        if let Err(e) = self.io.claim(sw.uuid) {
            // The claim guards only the reclaim of stale slots by other processes of the host.
            tracing::warn!(volume = %sw.uuid, error = %e, "claiming the new top's volume on this host failed");
        }
        self.volume = sw.volume;
        self.id.volume = sw.uuid;
        self.client.set_volume(sw.uuid);
        self.monitor = monitor;
        self.started = None;
        self.failures = 0;
        self.improbable_logged = false;
        self.engine.set_limit(self.volume.physical());
        tracing::info!(old_volume = %old, volume = %sw.uuid, physical = self.volume.physical(), allocation = self.engine.allocation(),
            outstanding = self.client.active(), "thin volume switched to the new top (snapshot); a request for the old one in flight is left to its reply");
        let _ = sw.done.send(());
        self.tick(now);
    }

    /// Shared counters.
    pub fn stats(&self) -> Arc<Mutex<ThinStats>> {
        self.stats.clone()
    }

    /// Runs until `stop` becomes readable; then clears this process's mailbox slots.
    pub fn run(mut self, stop: &EventFd) {
        raise_io_priority();
        let mut next_tick = Instant::now();
        let mut next_sample = Instant::now();
        loop {
            let now = Instant::now();
            self.follow_switches(now);
            if !self.follow_owner(now) {
                // Inactive: nothing is requested, re-sent or polled (the daemon that owns the
                // image extends its volume); wait for activation or stop.
                let _ = self.signals.take();
                match wait(self.signals.wake.as_raw_fd(), stop.as_raw_fd(), TICK) {
                    Ok(true) => break,
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::error!(error = %e, "thin control wait failed");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                }
            }
            if now >= next_tick {
                self.tick(now);
                next_tick = now + TICK;
            }
            if now >= next_sample {
                // Rate samples between ticks (an atomic read; nothing happens without
                // rate-aware sizing).
                let action = self.monitor.on_sample(now, self.volume.physical(), self.engine.allocation());
                self.act(now, action, None);
                next_sample = now + SAMPLE;
            }
            if let Some(signalled) = self.signals.take() {
                self.exceeded(signalled);
            }
            if self.busy() && Instant::now() >= self.next_poll {
                self.poll_mailbox();
            }
            self.publish();
            let deadline = if self.busy() { self.next_poll.min(next_tick) } else { next_tick }.min(next_sample);
            let timeout = deadline.saturating_duration_since(Instant::now());
            match wait(self.signals.wake.as_raw_fd(), stop.as_raw_fd(), timeout) {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "thin control wait failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        if let Err(e) = self.client.stop(self.io.as_mut()) {
            tracing::warn!(error = %e, "clearing our mailbox slots at stop failed");
        }
    }

    /// Follows the image's owner: on activation (a migration's destination after the
    /// switch-over, or a source whose migration failed) the volume is refreshed first, as
    /// spec §2.5 asks of a destination, so an extension the other daemon obtained is seen,
    /// and the monitor looks at once: what is still missing is asked for again, under this
    /// host's id. Returns whether the image is active.
    fn follow_owner(&mut self, now: Instant) -> bool {
        let active = self.engine.active();
        if active && !self.active {
            let before = self.volume.physical();
            self.refresh(now, None);
            tracing::info!(physical_before = before, physical = self.volume.physical(), "image activated: the volume is refreshed and its extensions are ours");
            self.tick(now);
        } else if !active && self.active {
            tracing::info!(outstanding = self.client.active(), queued = self.client.queued(),
                "image handed over: no extension request is sent from here until it is active again");
        }
        self.active = active;
        active
    }

    /// Whether mailbox requests are outstanding (replies are then polled).
    fn busy(&self) -> bool {
        self.client.active() > 0 || self.client.queued() > 0
    }

    fn publish(&self) {
        if let Ok(mut s) = self.stats.lock() {
            s.physical = self.volume.physical();
            s.volume = self.id.volume.to_string();
            s.state = format!("{:?}", self.monitor.state());
            s.state_name = self.monitor.state().name();
            s.threshold = self.signals.threshold();
            s.capacity = self.monitor.capacity();
            s.max_size = super::policy::max_size(s.capacity);
            s.slots_in_use = self.client.active() as u64;
            s.queued = self.client.queued() as u64;
            let c = self.client.stats();
            s.mailbox_write_errors = c.write_errors;
            s.mailbox_slots_reclaimed = c.reclaimed;
            let (rate, rtt) = self.monitor.rate().unwrap_or((0.0, 0.0));
            s.rate_bps = rate;
            s.round_trip_s = rtt;
        }
    }

    /// The periodic check: UNSET drives are evaluated, EXCEEDED ones re-send every
    /// `extend_timeout`, and the volume is re-read in case it grew without a reply.
    fn tick(&mut self, now: Instant) {
        if self.monitor.state() == DriveState::Exceeded {
            self.refresh(now, None);
        }
        let allocation = self.engine.allocation();
        let action = self.monitor.on_tick(now, self.volume.physical(), allocation);
        self.act(now, action, None);
    }

    /// The threshold was crossed or an allocation refused: extend now.
    fn exceeded(&mut self, signalled: Instant) {
        let now = Instant::now();
        tracing::debug!(allocation = self.engine.allocation(), physical = self.volume.physical(), "threshold crossed or volume full");
        let action = self.monitor.on_exceeded_at(now, self.volume.physical(), Some(self.engine.allocation()));
        self.act(now, action, Some(signalled));
    }

    fn act(&mut self, now: Instant, action: Action, signalled: Option<Instant>) {
        match action {
            Action::None => {}
            Action::Arm(t) => {
                self.signals.threshold.arm(t);
                tracing::debug!(threshold = t, physical = self.volume.physical(), "write threshold armed");
                // The allocation may have passed it before it was armed.
                if self.engine.allocation() > t && self.signals.threshold.check(self.engine.allocation()).is_some() {
                    self.signals.raise();
                }
            }
            Action::Extend(size) => self.request(now, size, signalled),
            Action::Improbable if self.improbable_logged => {}
            Action::Improbable => {
                self.improbable_logged = true;
                tracing::error!(
                    allocation = self.engine.allocation(),
                    physical = self.volume.physical(),
                    "allocation cannot be explained by the volume's growth (corrupt image?); not extending"
                );
            }
        }
    }

    fn request(&mut self, now: Instant, size: u64, signalled: Option<Instant>) {
        let picked_up = Instant::now();
        let size_mib = match wire_mib(size) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(size, error = %e, "extension size cannot be sent");
                return;
            }
        };
        let req = Extend { domain: self.id.domain, volume: self.id.volume, size_mib };
        if self.started.is_none() {
            self.started = Some((now, self.volume.physical()));
        }
        self.volume.extension_requested(size);
        if matches!(self.client.submit(req), Ok(crate::mailbox::client::Submitted::Folded)) {
            // The same request is already waiting for its reply (a re-signal while parked).
            tracing::debug!(requested = size, parked = self.hub.parked(), "extension request folded into the outstanding one");
            return;
        }
        if let Ok(mut s) = self.stats.lock() {
            s.requests += 1;
        }
        let turn = self.signals.turn.lock().unwrap_or_else(|e| e.into_inner());
        if !self.engine.active() {
            // Handed over since this pass began: the request stays queued, for a later
            // activation here; the new owner asks for itself.
            tracing::info!(requested = size, "extension not sent: the image was handed over");
            return;
        }
        let placed = self.client.place(self.io.as_mut());
        drop(turn);
        let written = match placed {
            Ok(w) => w,
            Err(e) if self.client.writes_failing() => {
                // The client logged the episode; the request stays queued.
                tracing::debug!(error = %e, "writing the extend request failed; retrying at the next poll");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "writing the extend request failed; retrying at the next poll");
                false
            }
        };
        self.next_poll = Instant::now() + REPLY_POLL;
        let at = self.client.last_write().filter(|_| written);
        let latency_us = signalled.zip(at).map(|(t, w)| w.saturating_duration_since(t).as_micros() as u64);
        let wake_us = signalled.map(|t| picked_up.saturating_duration_since(t).as_micros() as u64);
        tracing::info!(
            allocation = self.engine.allocation(),
            physical = self.volume.physical(),
            threshold = ?self.signals.threshold(),
            requested = size,
            parked = self.hub.parked(),
            signal_to_inbox_us = latency_us,
            wake_us,
            size_state = ?self.volume.state(),
            "extension requested"
        );
    }

    fn poll_mailbox(&mut self) {
        let pause = if self.failures > 9 { MAILBOX_BACKOFF } else { REPLY_POLL };
        self.next_poll = Instant::now() + pause;
        let turn = self.signals.turn.lock().unwrap_or_else(|e| e.into_inner());
        if !self.engine.active() {
            return;
        }
        let polled = self.client.poll(self.io.as_mut());
        drop(turn);
        match polled {
            Ok(done) => {
                self.failures = 0;
                for c in done {
                    let now = Instant::now();
                    if c.request.volume != self.id.volume {
                        // The SPM answered for an earlier top (before a snapshot): that volume
                        // is no longer written; nothing here depends on its size.
                        tracing::info!(volume = %c.request.volume, size_mib = c.request.size_mib, reply_mib = c.reply_mib,
                            "SPM replied for an earlier top's volume (a snapshot followed the request); nothing to do");
                        continue;
                    }
                    tracing::debug!(size_mib = c.request.size_mib, reply_mib = c.reply_mib, "SPM replied");
                    self.volume.extended(c.request.size_mib.saturating_mul(super::policy::MIB));
                    self.refresh(now, Some(c.reply_mib));
                }
            }
            // A block write that failed (a path failover) is retried at the normal pace, not
            // after vdsm's 60 s back-off for failed reads; the client logs the episode.
            Err(e) if self.client.writes_failing() => tracing::debug!(error = %e, "mailbox block write failed"),
            Err(e) => {
                self.failures += 1;
                if self.failures <= 10 || self.failures % 100 == 0 {
                    tracing::warn!(error = %e, failures = self.failures, "mailbox poll failed");
                }
            }
        }
    }

    /// Refreshes the volume; if it grew enough, raises the limit, re-arms and resumes IO.
    fn refresh(&mut self, now: Instant, reply_mib: Option<u64>) {
        let before = self.volume.physical();
        let physical = match self.volume.refresh() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "refreshing the volume failed");
                return;
            }
        };
        if self.superseded.load(Ordering::SeqCst) {
            // A snapshot or a pivot made another volume the top's; it is followed next.
            return;
        }
        if physical > before {
            self.engine.set_limit(physical);
        }
        let requested = self.monitor.requested();
        let allocation = self.engine.allocation();
        let action = self.monitor.on_refreshed(now, physical, allocation);
        let grown = self.monitor.state() != DriveState::Exceeded;
        if let Some(outcome) = outcome(grown, self.started.is_some(), reply_mib.is_some()) {
            let (t0, from) = self.started.unwrap_or((now, before));
            tracing::info!(
                allocation,
                physical_before = from,
                physical,
                requested = ?requested,
                reply_mib = ?reply_mib,
                threshold = ?self.signals.threshold(),
                outcome,
                duration_ms = now.duration_since(t0).as_millis() as u64,
                parked = self.hub.parked(),
                parked_total = self.hub.parked_total(),
                size_state = ?self.volume.state(),
                "extension"
            );
            if let Ok(mut s) = self.stats.lock() {
                // An extension completes once, when its growth is first seen (`started` is set
                // from its request until then): a tick that re-reads the grown volume before
                // the reply is polled already counted it, and the reply then counts nothing.
                if grown {
                    s.completed += 1;
                    s.observe_extension(now.duration_since(t0).as_secs_f64());
                } else {
                    s.failed += 1;
                }
            }
        } else if grown && reply_mib.is_some() {
            tracing::debug!(physical, reply_mib = ?reply_mib, "SPM replied for an extension whose growth a refresh already saw");
        }
        if grown {
            self.started = None;
        }
        self.act(now, action, None);
        if physical > before || grown {
            self.hub.resume();
        }
    }
}

/// The outcome a refresh logs and counts for an extension: "extended" the first time its
/// growth is seen (`in_flight`: requested and not yet seen grown), "volume still too small"
/// when the SPM replied and the volume did not grow enough; nothing when the growth was
/// already seen (a tick re-read the volume before the reply was polled) or nothing was asked.
fn outcome(grown: bool, in_flight: bool, replied: bool) -> Option<&'static str> {
    match (grown, in_flight, replied) {
        (true, true, _) => Some("extended"),
        (false, _, true) => Some("volume still too small"),
        _ => None,
    }
}

/// Puts this thread's IO (the mailbox's) ahead of the data IO queued on the same storage:
/// real-time class where allowed (root), else the highest best-effort level. IO schedulers
/// that honour priorities (mq-deadline, bfq) then dispatch the mailbox IO first.
fn raise_io_priority() {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const CLASS_SHIFT: u32 = 13;
    const RT: libc::c_long = 1 << CLASS_SHIFT;
    const BE: libc::c_long = 2 << CLASS_SHIFT;
    for (class, name) in [(RT, "realtime"), (BE, "best-effort 0")] {
        // SAFETY: ioprio_set on the calling thread (who = 0) takes plain integers.
        let r = unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0 as libc::c_long, class) };
        if r == 0 {
            tracing::debug!(class = name, "mailbox IO priority raised");
            return;
        }
    }
    tracing::debug!(error = %io::Error::last_os_error(), "could not raise the mailbox IO priority");
}

/// Waits for the wake eventfd (false) or the stop eventfd (true), at most `timeout`.
fn wait(wake: i32, stop: i32, timeout: Duration) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd { fd: wake, events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop, events: libc::POLLIN, revents: 0 },
    ];
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
    }
    Ok(fds[1].revents != 0)
}

impl ThinEngine for crate::format::Qcow2Format {
    fn allocation(&self) -> u64 {
        crate::format::Qcow2Format::allocation(self)
    }
    fn set_limit(&self, limit: u64) {
        crate::format::Qcow2Format::set_limit(self, limit)
    }
    fn active(&self) -> bool {
        thinblk_vhost::Disk::is_active(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::spm::Spm;
    use crate::mailbox::wire::{slot, BLOCK_LEN, SPM_REGION_LEN};
    use crate::thin::policy::{Policy, MIB};

    #[derive(Default)]
    struct Engine {
        allocation: AtomicU64,
        limit: AtomicU64,
    }

    impl ThinEngine for Engine {
        fn allocation(&self) -> u64 {
            self.allocation.load(Ordering::SeqCst)
        }
        fn set_limit(&self, limit: u64) {
            self.limit.store(limit, Ordering::SeqCst);
        }
    }

    /// The two mailbox volumes in memory: (SPM inbox, SPM outbox).
    type Boxes = Arc<Mutex<(Vec<u8>, Vec<u8>)>>;

    struct MemIo {
        host: usize,
        boxes: Boxes,
    }

    impl MemIo {
        fn block(v: &[u8], host: usize) -> [u8; BLOCK_LEN] {
            let mut b = [0u8; BLOCK_LEN];
            b.copy_from_slice(&v[host * BLOCK_LEN..(host + 1) * BLOCK_LEN]);
            b
        }
    }

    impl MailboxIo for MemIo {
        fn read_replies(&mut self) -> io::Result<[u8; BLOCK_LEN]> {
            Ok(Self::block(&self.boxes.lock().unwrap().1, self.host))
        }
        fn read_requests(&mut self) -> io::Result<[u8; BLOCK_LEN]> {
            Ok(Self::block(&self.boxes.lock().unwrap().0, self.host))
        }
        fn write_requests(&mut self, block: &[u8; BLOCK_LEN]) -> io::Result<()> {
            let o = self.host * BLOCK_LEN;
            self.boxes.lock().unwrap().0[o..o + BLOCK_LEN].copy_from_slice(block);
            Ok(())
        }
        fn write_event(&mut self, block: &[u8; BLOCK_LEN]) -> io::Result<()> {
            self.boxes.lock().unwrap().0[..BLOCK_LEN].copy_from_slice(block);
            Ok(())
        }
        fn lock(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn unlock(&mut self) {}
    }

    /// The SPM's side: answers every new request, growing `file` when `grow`.
    fn spm_answer(spm: &mut Spm, boxes: &Boxes, file: &std::path::Path, grow: bool) -> usize {
        let inbox = boxes.lock().unwrap().0.clone();
        let scan = spm.scan(&inbox[..SPM_REGION_LEN]);
        let n = scan.requests.len();
        for (id, req) in scan.requests {
            if grow {
                std::fs::OpenOptions::new().write(true).open(file).unwrap().set_len(req.size_mib * MIB).unwrap();
            }
            let (off, block) = spm.reply(id, &req, grow).unwrap();
            boxes.lock().unwrap().1[off as usize..off as usize + BLOCK_LEN].copy_from_slice(&block);
        }
        if scan.rewrite_all {
            let region = spm.reply_region().to_vec();
            boxes.lock().unwrap().1[..SPM_REGION_LEN].copy_from_slice(&region);
        }
        n
    }

    struct TempFile(std::path::PathBuf);
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A control thread over a 64 MiB file volume (50 %, 64 MiB chunks) and in-memory mailboxes.
    fn rig(name: &str) -> (TempFile, Arc<Engine>, Arc<Signals>, Arc<ParkHub>, Boxes, Control) {
        let file = TempFile(std::env::temp_dir().join(format!("thinblk-control-{name}-{}", std::process::id())));
        std::fs::File::create(&file.0).unwrap().set_len(64 * MIB).unwrap();
        let engine = Arc::new(Engine::default());
        engine.allocation.store(MIB, Ordering::SeqCst);
        let signals = Signals::new().unwrap();
        let hub = ParkHub::new(1).unwrap();
        let boxes: Boxes = Arc::new(Mutex::new((vec![0; SPM_REGION_LEN], vec![0; SPM_REGION_LEN])));
        let id = MailboxIdentity {
            domain: Uuid::parse("8adbc85e-e554-4ae0-b318-8a5465fe5fe1").unwrap(),
            volume: Uuid::parse("d772f1c6-3ebb-43c3-a42e-73fcd8255a5f").unwrap(),
        };
        let c = Control::new(
            engine.clone(),
            Volume::open(&file.0).unwrap(),
            Monitor::new(Policy::new(50, 64).unwrap(), 1 << 30),
            signals.clone(),
            hub.clone(),
            Client::new(id.volume, Box::new(|| [7; 16])),
            Box::new(MemIo { host: 4, boxes: boxes.clone() }),
            id,
        );
        (file, engine, signals, hub, boxes, c)
    }

    #[test]
    fn an_extension_seen_by_the_tick_before_its_reply_counts_once() {
        let (file, engine, signals, _hub, boxes, mut c) = rig("once");
        c.tick(Instant::now());
        engine.allocation.store(33 * MIB, Ordering::SeqCst);
        signals.allocated(33 * MIB);
        c.exceeded(signals.take().expect("crossing"));
        // The SPM grows the volume; the tick re-reads it before the reply is polled.
        let mut spm = Spm::new();
        assert_eq!(spm_answer(&mut spm, &boxes, &file.0, true), 1);
        c.tick(Instant::now());
        assert_eq!(engine.limit.load(Ordering::SeqCst), 128 * MIB, "the tick saw the growth");
        c.poll_mailbox();
        let s = c.stats().lock().unwrap().clone();
        assert_eq!((s.requests, s.completed, s.failed), (1, 1, 0), "one request, one extension");
        assert_eq!(s.duration_buckets.iter().sum::<u64>(), 1, "one duration observed");
    }

    #[test]
    fn an_extension_is_reported_once_and_a_reply_after_its_growth_reports_nothing() {
        assert_eq!(outcome(true, true, false), Some("extended"), "a tick sees the growth first");
        assert_eq!(outcome(true, true, true), Some("extended"), "the reply comes first");
        assert_eq!(outcome(true, false, true), None, "the reply after a tick saw the growth");
        assert_eq!(outcome(true, false, false), None, "a refresh with nothing asked (an activation)");
        assert_eq!(outcome(false, true, true), Some("volume still too small"));
        assert_eq!(outcome(false, true, false), None, "a tick while the SPM is still at work");
    }

    #[test]
    fn crossing_extends_at_once_and_completion_raises_the_limit_and_resumes() {
        let (file, engine, signals, hub, boxes, mut c) = rig("extend");
        assert_eq!(engine.limit.load(Ordering::SeqCst), 64 * MIB, "the limit is the volume's size");
        let t0 = Instant::now();
        c.tick(t0);
        assert_eq!(signals.threshold(), Some(32 * MIB), "armed at physical - (100-50)% of 64 MiB");

        // The allocator passes the threshold: one signal, an immediate request in our block.
        signals.allocated(32 * MIB);
        assert!(signals.take().is_none(), "ending exactly at the threshold does not fire");
        signals.allocated(32 * MIB + 4096);
        signals.allocated(33 * MIB);
        let when = signals.take().expect("crossing signalled");
        assert!(signals.take().is_none(), "one-shot");
        c.exceeded(when);
        let block = MemIo::block(&boxes.lock().unwrap().0, 4);
        let msg = slot(&block, 0).unwrap();
        assert_eq!(Extend::decode(&msg).unwrap().size_mib, 128, "request for physical + one chunk");
        assert_eq!(c.volume.state(), super::super::volume::SizeState::ExtensionRequested(128 * MIB));

        // The SPM grows the volume and replies; the next poll completes the extension.
        let mut spm = Spm::new();
        assert_eq!(spm_answer(&mut spm, &boxes, &file.0, true), 1);
        let resumes = hub.resumes();
        c.poll_mailbox();
        assert_eq!(engine.limit.load(Ordering::SeqCst), 128 * MIB);
        assert_eq!(signals.threshold(), Some(96 * MIB), "re-armed from the refreshed size");
        assert_eq!(hub.resumes(), resumes + 1, "parked IO resumed");
        assert_eq!(c.stats().lock().unwrap().completed, 1);

        // An SPM that fails: the volume stays, nothing resumes, the tick re-sends after 2 s.
        engine.allocation.store(97 * MIB, Ordering::SeqCst);
        signals.allocated(97 * MIB);
        let when = signals.take().expect("second crossing");
        c.exceeded(when);
        c.poll_mailbox(); // ack of the first reply's clean marker round
        assert!(spm_answer(&mut spm, &boxes, &file.0, false) >= 1);
        let resumes = hub.resumes();
        c.poll_mailbox();
        assert_eq!(engine.limit.load(Ordering::SeqCst), 128 * MIB, "no growth, no new limit");
        assert_eq!(hub.resumes(), resumes);
        assert_eq!(c.monitor.state(), DriveState::Exceeded);
        assert_eq!(c.stats().lock().unwrap().failed, 1);
        let sent = c.stats().lock().unwrap().requests;
        c.tick(Instant::now() + EXTEND_TIMEOUT_FOR_TEST);
        assert_eq!(c.stats().lock().unwrap().requests, sent + 1, "re-sent after extend_timeout");
    }

    const EXTEND_TIMEOUT_FOR_TEST: Duration = super::super::monitor::EXTEND_TIMEOUT;
}

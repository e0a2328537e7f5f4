//! Long chain operations as jobs (QEMU's `job.c` in spirit): a thread per job that drives
//! the disk crate's mover, with progress, a speed limit, cancel, and a log line per state
//! change. `ctl query-jobs`, `job-cancel`, `job-set-speed` and `job-dismiss` act on them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thinblk_vhost::disk::commit::{CommitJob, STEP_BYTES};
use thinblk_vhost::disk::ImageError;

use super::extend::BaseExtender;

/// A job's state, with QEMU's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Copying.
    Running,
    /// An active commit that (nearly) caught up: it mirrors the guest's writes until
    /// `job-complete` (the pivot) or `job-cancel`.
    Ready,
    /// Finishing (the chain is being changed).
    Pending,
    /// Ended (completed, cancelled or failed); kept for `query-jobs` until dismissed.
    Concluded,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Ready => "ready",
            Status::Pending => "pending",
            Status::Concluded => "concluded",
        }
    }
}

/// How a job ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Everything done: the chain changed.
    Completed,
    /// Cancelled: the chain as it was.
    Cancelled,
    /// Failed: the chain as it was; why.
    Failed(String),
}

/// One job, shared between its thread and the control socket.
pub struct Job {
    /// Its id.
    pub id: String,
    /// `commit` or `active-commit`.
    pub kind: &'static str,
    /// The top and base it merges.
    pub top: String,
    /// The base.
    pub base: String,
    status: Mutex<(Status, Option<Outcome>)>,
    current: AtomicU64,
    total: AtomicU64,
    /// Bytes per second; 0: no limit.
    speed: AtomicU64,
    cancel: AtomicBool,
    /// `job-complete` asked for the pivot.
    complete: AtomicBool,
    started: Instant,
}

impl Job {
    /// The job as `query-jobs` shows it.
    pub fn json(&self) -> Value {
        let (status, outcome) = self.status.lock().map(|g| g.clone()).unwrap_or((Status::Concluded, None));
        let mut v = json!({
            "id": self.id,
            "type": self.kind,
            "status": status.name(),
            "top": self.top,
            "base": self.base,
            "current-progress": self.current.load(Ordering::Relaxed),
            "total-progress": self.total.load(Ordering::Relaxed),
            "speed": self.speed.load(Ordering::Relaxed),
            "elapsed-ms": self.started.elapsed().as_millis() as u64,
        });
        if let Some(o) = v.as_object_mut() {
            match outcome {
                Some(Outcome::Completed) => {
                    o.insert("outcome".into(), json!("completed"));
                }
                Some(Outcome::Cancelled) => {
                    o.insert("outcome".into(), json!("cancelled"));
                }
                Some(Outcome::Failed(e)) => {
                    o.insert("outcome".into(), json!("failed"));
                    o.insert("error".into(), json!(e));
                }
                None => {}
            }
        }
        v
    }

    /// Its status now.
    pub fn status(&self) -> Status {
        self.status.lock().map(|g| g.0).unwrap_or(Status::Concluded)
    }

    /// Asks the job to stop (the chain stays as it was); false once it is past copying.
    pub fn cancel(&self) -> bool {
        let st = self.status();
        if matches!(st, Status::Running | Status::Ready) {
            self.cancel.store(true, Ordering::SeqCst);
            return true;
        }
        false
    }

    /// Asks an active commit in `ready` to pivot; false otherwise.
    pub fn complete(&self) -> bool {
        if self.kind == "active-commit" && self.status() == Status::Ready {
            self.complete.store(true, Ordering::SeqCst);
            return true;
        }
        false
    }

    /// Sets the speed limit (bytes per second, 0: none).
    pub fn set_speed(&self, speed: u64) {
        self.speed.store(speed, Ordering::SeqCst);
    }

    fn set(&self, status: Status, outcome: Option<Outcome>) {
        if let Ok(mut g) = self.status.lock() {
            *g = (status, outcome);
        }
        tracing::info!(job = %self.id, status = status.name(), current = self.current.load(Ordering::Relaxed),
            total = self.total.load(Ordering::Relaxed), "job state");
    }
}

/// Counters of all jobs (for metrics).
#[derive(Debug, Default)]
pub struct JobStats {
    /// Jobs completed.
    pub completed: AtomicU64,
    /// Jobs cancelled.
    pub cancelled: AtomicU64,
    /// Jobs failed.
    pub failed: AtomicU64,
    /// Bytes copied by all jobs.
    pub bytes: AtomicU64,
    /// Jobs running now.
    pub running: AtomicU64,
}

/// What a job's pivot needs from the daemon: the guest's writes held and released, and (in
/// thin mode) the base's volume followed as the new top's.
pub struct PivotHooks {
    /// Holds the guest's writes (returns whether this call holds them: release then).
    pub hold: Box<dyn Fn() -> Result<bool, String> + Send>,
    /// Releases what `hold` held.
    pub release: Box<dyn Fn() + Send>,
    /// The new top's allocation limit (its volume's size), if it has one.
    pub limit: Box<dyn Fn() -> Option<u64> + Send>,
    /// Called after the pivot (the thin control follows the base's volume).
    pub after: Box<dyn Fn() + Send>,
}

/// Starts a job thread over `mover`.
pub fn start(
    id: String,
    mover: Box<dyn CommitJob>,
    speed: u64,
    extender: Option<BaseExtender>,
    hooks: PivotHooks,
    stats: Arc<JobStats>,
) -> std::io::Result<Arc<Job>> {
    let (top, base) = mover.names();
    let job = Arc::new(Job {
        id,
        kind: if mover.is_active() { "active-commit" } else { "commit" },
        top: top.display().to_string(),
        base: base.display().to_string(),
        status: Mutex::new((Status::Running, None)),
        current: AtomicU64::new(0),
        total: AtomicU64::new(mover.total()),
        speed: AtomicU64::new(speed),
        cancel: AtomicBool::new(false),
        complete: AtomicBool::new(false),
        started: Instant::now(),
    });
    let j = job.clone();
    stats.running.fetch_add(1, Ordering::SeqCst);
    tracing::info!(job = %job.id, top = %job.top, base = %job.base, total = mover.total(), speed, "job state: created");
    std::thread::Builder::new().name(format!("job-{}", job.id)).spawn(move || {
        // A panic in the mover ends the job as failed (the mover's drop gives up the merge:
        // the chain as it was) instead of leaving it running for ever.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&j, mover, extender, &hooks, &stats)))
            .unwrap_or_else(|_| Outcome::Failed("internal error (a panic in the merge; see the log)".into()));
        match &outcome {
            Outcome::Completed => stats.completed.fetch_add(1, Ordering::Relaxed),
            Outcome::Cancelled => stats.cancelled.fetch_add(1, Ordering::Relaxed),
            Outcome::Failed(e) => {
                tracing::error!(job = %j.id, error = %e, "job failed; the chain is as it was");
                stats.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
        stats.running.fetch_sub(1, Ordering::SeqCst);
        j.set(Status::Concluded, Some(outcome));
    })?;
    Ok(job)
}

/// How often a job whose base is full retries after asking for more room.
const FULL_RETRY: Duration = Duration::from_millis(200);
/// How long a job waits for its base to grow before it fails.
const FULL_LIMIT: Duration = Duration::from_secs(120);

/// How long a ready job sleeps when the guest changed nothing.
const READY_IDLE: Duration = Duration::from_millis(20);

/// An active commit is ready, and pivots after `job-complete`, once what is left to copy is
/// at most this: the pivot copies it with the guest's writes held, so this bounds the pause.
/// Waiting for nothing left at all may wait for ever under a guest that keeps writing.
const PIVOT_BACKLOG: u64 = 2 * STEP_BYTES;
/// How long an active commit whose first pass is done waits for the backlog to fall to
/// [`PIVOT_BACKLOG`] before it turns ready with a larger one, and how long `job-complete`
/// waits for it before the pivot copies a larger one with the writes held: a guest writing
/// faster than the copy sees one longer pause instead of a merge that never ends.
const PIVOT_PATIENCE: Duration = if cfg!(test) { Duration::from_secs(1) } else { Duration::from_secs(5) };
/// The largest backlog ever copied with the guest's writes held (the longest pause): above it
/// the job stays `running`, or `ready` after `job-complete`, and says so every
/// [`BACKLOG_WARNING`].
const PIVOT_MAX_BACKLOG: u64 = 64 << 20;
/// How often a job whose backlog stays above [`PIVOT_MAX_BACKLOG`] says so.
const BACKLOG_WARNING: Duration = Duration::from_secs(10);

fn run(job: &Job, mut mover: Box<dyn CommitJob>, mut extender: Option<BaseExtender>, hooks: &PivotHooks, stats: &JobStats) -> Outcome {
    job.set(Status::Running, None);
    if let Err(e) = mover.prepare() {
        mover.abandon();
        return Outcome::Failed(format!("listing what to copy: {e}"));
    }
    job.total.store(mover.total(), Ordering::Relaxed);
    if let Some(x) = extender.as_mut() {
        // Sized ahead, as vdsm extends the base before a merge: what it holds plus what it
        // will receive (and its metadata).
        if let Err(e) = x.ensure(mover.as_ref(), mover.total(), FULL_LIMIT, &job.cancel) {
            mover.abandon();
            return Outcome::Failed(format!("extending the base before the merge: {e}"));
        }
    }
    let mut window = (Instant::now(), 0u64);
    let mut full_since: Option<Instant> = None;
    let mut convergence = Convergence::default();
    loop {
        if job.cancel.load(Ordering::SeqCst) {
            mover.abandon();
            return Outcome::Cancelled;
        }
        let before = mover.done();
        match mover.step(STEP_BYTES) {
            Ok(more) => {
                full_since = None;
                let n = mover.done() - before;
                stats.bytes.fetch_add(n, Ordering::Relaxed);
                job.current.store(mover.done(), Ordering::Relaxed);
                job.total.store(mover.total(), Ordering::Relaxed);
                throttle(job, &mut window, n);
                if !mover.is_active() {
                    if !more {
                        break;
                    }
                    continue;
                }
                // An active commit is ready once it (nearly) caught up; it keeps copying what
                // the guest changes until the pivot.
                let backlog = mover.total().saturating_sub(mover.done());
                if convergence.pivot_due(job, backlog, mover.first_pass_done()) {
                    if let Some(x) = extender.as_mut().filter(|_| backlog > 0) {
                        // The backlog may land on clusters the base does not have yet: room
                        // for it is asked for now, not found missing with the writes held.
                        let asked = Instant::now();
                        if let Err(e) = x.ensure(mover.as_ref(), backlog + STEP_BYTES, FULL_LIMIT, &job.cancel) {
                            tracing::warn!(job = %job.id, error = %e, backlog, "extending the base before the pivot failed; the pivot waits");
                            std::thread::sleep(FULL_RETRY);
                            continue;
                        }
                        if asked.elapsed() > READY_IDLE {
                            // The SPM took its time: the backlog is looked at again first.
                            continue;
                        }
                    }
                    if backlog > 0 {
                        tracing::info!(job = %job.id, backlog, waited_ms = convergence.complete_waited().as_millis() as u64,
                            "pivoting while the guest writes: the backlog is copied with its writes held");
                    }
                    // The base's mailbox client lets go of the base's volume: after the
                    // pivot the thin control thread claims it as the top's.
                    drop(extender.take());
                    return pivot(job, mover.as_mut(), hooks);
                }
                if !more {
                    std::thread::sleep(READY_IDLE);
                }
            }
            Err(ImageError::NoSpace { needed, limit }) => {
                let Some(x) = extender.as_mut() else {
                    mover.abandon();
                    return Outcome::Failed(format!("the base is full ({needed} bytes needed, limit {limit})"));
                };
                if full_since.is_none() {
                    // The extension sized ahead fell short (or the base's metadata grew more
                    // than foreseen): the copy waits for more room.
                    tracing::warn!(job = %job.id, needed, limit, copied = mover.done(), "merge: the base is full; asking the SPM for more room");
                }
                let since = *full_since.get_or_insert_with(Instant::now);
                if since.elapsed() > FULL_LIMIT {
                    mover.abandon();
                    return Outcome::Failed(format!("the base did not grow within {} s", FULL_LIMIT.as_secs()));
                }
                if let Err(e) = x.ensure(mover.as_ref(), mover.total() - mover.done() + STEP_BYTES, FULL_LIMIT, &job.cancel) {
                    tracing::warn!(job = %job.id, error = %e, "extending the base failed; retrying");
                }
                // Never a busy loop: the volume may look big enough while the copy still finds
                // the base full (its limit follows at the next refresh).
                std::thread::sleep(FULL_RETRY);
            }
            Err(e) => {
                mover.abandon();
                return Outcome::Failed(e.to_string());
            }
        }
    }
    if job.cancel.load(Ordering::SeqCst) {
        mover.abandon();
        return Outcome::Cancelled;
    }
    job.set(Status::Pending, None);
    match mover.complete() {
        Ok(()) => {
            settle(job, mover.as_mut());
            Outcome::Completed
        }
        Err(e) => {
            mover.abandon();
            Outcome::Failed(e.to_string())
        }
    }
}

/// Whether an active commit turns ready (`waited`: since its first pass ended), or pivots
/// after `job-complete` (`waited`: since it was asked): (nearly) caught up, or patience ran out
/// with a backlog it may still copy with the writes held. (A step that found nothing to copy
/// leaves no backlog.)
fn settled(backlog: u64, waited: Option<Duration>) -> bool {
    backlog <= PIVOT_BACKLOG || (waited.is_some_and(|d| d >= PIVOT_PATIENCE) && backlog <= PIVOT_MAX_BACKLOG)
}

/// What an active commit waits for between its steps: to turn ready, then to pivot.
#[derive(Default)]
struct Convergence {
    /// When the first pass ended.
    first_pass: Option<Instant>,
    /// When `job-complete` was first seen.
    complete_seen: Option<Instant>,
    /// When a backlog too large to pivot on was last reported.
    warned: Option<Instant>,
}

impl Convergence {
    /// After a step that left `backlog` to copy: turns the job ready when it is settled, and
    /// says whether the pivot is due (`job-complete` asked and settled).
    fn pivot_due(&mut self, job: &Job, backlog: u64, first_pass_done: bool) -> bool {
        if first_pass_done {
            self.first_pass.get_or_insert_with(Instant::now);
        }
        if job.status() == Status::Running {
            let waited = self.first_pass.map(|t| t.elapsed());
            if !settled(backlog, waited) {
                self.warn(job, backlog, waited);
                return false;
            }
            if backlog > PIVOT_BACKLOG {
                tracing::info!(job = %job.id, backlog, "the guest rewrites faster than the copy: ready with a backlog, copied at the pivot with its writes held");
            }
            job.set(Status::Ready, None);
        }
        if job.status() != Status::Ready || !job.complete.load(Ordering::SeqCst) {
            return false;
        }
        let waited = Some(self.complete_seen.get_or_insert_with(Instant::now).elapsed());
        if settled(backlog, waited) {
            return true;
        }
        self.warn(job, backlog, waited);
        false
    }

    /// How long `job-complete` has waited for the pivot.
    fn complete_waited(&self) -> Duration {
        self.complete_seen.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// Says, every [`BACKLOG_WARNING`], that patience ran out with a backlog too large for
    /// one pause.
    fn warn(&mut self, job: &Job, backlog: u64, waited: Option<Duration>) {
        if backlog > PIVOT_MAX_BACKLOG && waited.is_some_and(|w| w >= PIVOT_PATIENCE) && self.warned.is_none_or(|t| t.elapsed() >= BACKLOG_WARNING) {
            self.warned = Some(Instant::now());
            tracing::warn!(job = %job.id, backlog, max = PIVOT_MAX_BACKLOG, status = job.status().name(),
                "the guest rewrites faster than the copy: the job waits for the backlog to fall (a speed limit below the guest's write rate keeps it this way)");
        }
    }
}

/// The pivot of an active commit, with the guest's writes held around it.
fn pivot(job: &Job, mover: &mut dyn CommitJob, hooks: &PivotHooks) -> Outcome {
    job.set(Status::Pending, None);
    let mut ours = false;
    let limit = (hooks.limit)();
    let started = Instant::now();
    let r = mover.pivot(
        &mut || {
            ours = (hooks.hold)()?;
            Ok(())
        },
        limit,
    );
    // The thin control follows the base before the guest's writes resume on it.
    if r.is_ok() {
        (hooks.after)();
    }
    if ours {
        (hooks.release)();
    }
    match r {
        Ok(()) => {
            tracing::info!(job = %job.id, pause_us = started.elapsed().as_micros() as u64, "pivot done: the base serves the guest");
            settle(job, mover);
            Outcome::Completed
        }
        Err(e) => {
            // Whatever failed, the old chain serves: the job ends; a new commit starts over.
            mover.abandon();
            Outcome::Failed(format!("pivot: {e}"))
        }
    }
}

/// How long a job retries closing the files that left the chain.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// Closes the files that left the chain, retrying while a ring still holds one (its LV can be
/// deactivated only once closed).
fn settle(job: &Job, mover: &mut dyn CommitJob) {
    let started = Instant::now();
    loop {
        let left = mover.settle();
        if left == 0 {
            return;
        }
        if started.elapsed() > SETTLE_LIMIT {
            tracing::warn!(job = %job.id, files = left, "files that left the chain are still held by a ring; they close at the next chain change");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sleeps as long as the speed limit asks after `n` more bytes (the window restarts when the
/// limit changes or a second has passed).
fn throttle(job: &Job, window: &mut (Instant, u64), n: u64) {
    let speed = job.speed.load(Ordering::Relaxed);
    window.1 += n;
    if speed == 0 {
        *window = (Instant::now(), 0);
        return;
    }
    let due = Duration::from_secs_f64(window.1 as f64 / speed as f64);
    let spent = window.0.elapsed();
    if due > spent {
        let mut left = due - spent;
        // In slices, so that a cancel or a new speed is seen soon.
        while left > Duration::ZERO && !job.cancel.load(Ordering::SeqCst) && job.speed.load(Ordering::Relaxed) == speed {
            let slice = left.min(Duration::from_millis(50));
            std::thread::sleep(slice);
            left = left.saturating_sub(slice);
        }
    }
    if window.0.elapsed() > Duration::from_secs(1) {
        *window = (Instant::now(), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// An active commit whose guest rewrites `refill` bytes during every step once it is
    /// ready, so that `backlog` bytes are always left after a step: it never catches up.
    struct Busy {
        done: u64,
        backlog: u64,
        refill: u64,
        ready: bool,
        pivoted: Arc<AtomicBool>,
    }

    impl CommitJob for Busy {
        fn total(&self) -> u64 {
            self.done + self.backlog
        }
        fn done(&self) -> u64 {
            self.done
        }
        fn step(&mut self, max: u64) -> Result<bool, ImageError> {
            if !self.ready {
                // The first pass ends with the backlog the guest left.
                self.ready = true;
                return Ok(self.backlog > 0);
            }
            // A copy takes time (and the test leaves the other core to CI).
            std::thread::sleep(Duration::from_micros(200));
            self.backlog += self.refill;
            let n = max.min(self.backlog);
            self.done += n;
            self.backlog -= n;
            Ok(self.backlog > 0)
        }
        fn names(&self) -> (PathBuf, PathBuf) {
            (PathBuf::from("top"), PathBuf::from("base"))
        }
        fn complete(&mut self) -> Result<(), ImageError> {
            Err(ImageError::Refused("an active commit pivots".into()))
        }
        fn is_active(&self) -> bool {
            true
        }
        fn first_pass_done(&self) -> bool {
            self.ready
        }
        fn pivot(&mut self, hold: &mut dyn FnMut() -> Result<(), String>, _limit: Option<u64>) -> Result<(), ImageError> {
            hold().map_err(ImageError::Refused)?;
            // What is left is copied with the writes held: no refill now.
            self.done += self.backlog;
            self.backlog = 0;
            self.pivoted.store(true, Ordering::SeqCst);
            Ok(())
        }
        fn abandon(&mut self) {}
        fn base_allocation(&self) -> u64 {
            0
        }
        fn settle(&mut self) -> usize {
            0
        }
        fn set_base_limit(&self, _limit: u64) {}
    }

    /// Runs a busy active commit to ready, asks it to complete, and returns how long it took
    /// to turn ready, how long the pivot took to come, the job's final state and whether the
    /// mover pivoted.
    fn complete_under_writes(backlog: u64) -> (Duration, Duration, Value, bool) {
        let pivoted = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicU64::new(0));
        let h = held.clone();
        let hooks = PivotHooks {
            hold: Box::new(move || {
                h.fetch_add(1, Ordering::SeqCst);
                Ok(true)
            }),
            release: Box::new(|| {}),
            limit: Box::new(|| None),
            after: Box::new(|| {}),
        };
        let mover = Busy { done: 0, backlog, refill: STEP_BYTES, ready: false, pivoted: pivoted.clone() };
        let started = Instant::now();
        let job = start("busy".into(), Box::new(mover), 0, None, hooks, Arc::new(JobStats::default())).expect("job thread");
        let deadline = started + PIVOT_PATIENCE + Duration::from_secs(10);
        while job.status() != Status::Ready {
            assert!(Instant::now() < deadline, "never ready under steady writes: {}", job.json());
            std::thread::sleep(Duration::from_millis(5));
        }
        let ready = started.elapsed();
        assert!(job.complete(), "a ready active commit accepts job-complete");
        let asked = Instant::now();
        let deadline = asked + PIVOT_PATIENCE + Duration::from_secs(10);
        while job.status() != Status::Concluded {
            assert!(Instant::now() < deadline, "job-complete never pivoted under steady writes: {}", job.json());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(held.load(Ordering::SeqCst), 1, "the pivot held the writes once");
        (ready, asked.elapsed(), job.json(), pivoted.load(Ordering::SeqCst))
    }

    #[test]
    fn a_small_backlog_under_steady_writes_is_ready_and_pivots_at_once() {
        let (ready, took, j, pivoted) = complete_under_writes(STEP_BYTES / 2);
        assert!(pivoted, "{j}");
        assert_eq!(j["outcome"], "completed", "{j}");
        assert!(ready < PIVOT_PATIENCE, "ready without waiting for patience: {ready:?}");
        assert!(took < PIVOT_PATIENCE, "the small backlog did not wait for patience: {took:?}");
    }

    #[test]
    fn a_backlog_that_never_shrinks_is_ready_and_pivots_once_patience_runs_out() {
        let (ready, took, j, pivoted) = complete_under_writes(4 * STEP_BYTES);
        assert!(pivoted, "{j}");
        assert_eq!(j["outcome"], "completed", "{j}");
        assert!(ready >= PIVOT_PATIENCE, "ready before the backlog shrank or patience ran out: {ready:?}");
        assert!(took >= PIVOT_PATIENCE, "pivoted before the backlog shrank or patience ran out: {took:?}");
    }

    #[test]
    fn a_backlog_too_large_for_one_pause_keeps_the_job_running_and_cancellable() {
        let mover = Busy { done: 0, backlog: PIVOT_MAX_BACKLOG + STEP_BYTES, refill: STEP_BYTES, ready: false, pivoted: Arc::new(AtomicBool::new(false)) };
        let hooks = PivotHooks { hold: Box::new(|| Ok(true)), release: Box::new(|| {}), limit: Box::new(|| None), after: Box::new(|| {}) };
        let job = start("huge".into(), Box::new(mover), 0, None, hooks, Arc::new(JobStats::default())).expect("job thread");
        std::thread::sleep(PIVOT_PATIENCE * 2);
        assert_eq!(job.status(), Status::Running, "{}", job.json());
        assert!(job.cancel());
        let deadline = Instant::now() + Duration::from_secs(10);
        while job.status() != Status::Concluded {
            assert!(Instant::now() < deadline, "the cancel was not seen: {}", job.json());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(job.json()["outcome"], "cancelled");
    }

    #[test]
    fn settled_needs_a_caught_up_copy_or_patience_and_a_bounded_backlog() {
        assert!(settled(0, None));
        assert!(settled(PIVOT_BACKLOG, None));
        assert!(!settled(PIVOT_BACKLOG + 1, None), "still on the first pass");
        assert!(!settled(PIVOT_BACKLOG + 1, Some(PIVOT_PATIENCE / 2)));
        assert!(settled(PIVOT_MAX_BACKLOG, Some(PIVOT_PATIENCE)));
        assert!(!settled(PIVOT_MAX_BACKLOG + 1, Some(PIVOT_PATIENCE * 100)), "never a pause longer than the largest backlog");
    }
}

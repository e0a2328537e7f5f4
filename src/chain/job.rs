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
    /// Finishing (the chain is being changed).
    Pending,
    /// Ended (completed, cancelled or failed); kept for `query-jobs` until dismissed.
    Concluded,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::Running => "running",
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
    /// `commit`.
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
        self.cancel.store(true, Ordering::SeqCst);
        self.status() == Status::Running
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

/// Starts a job thread over `mover`.
pub fn start(id: String, mover: Box<dyn CommitJob>, speed: u64, extender: Option<BaseExtender>, stats: Arc<JobStats>) -> std::io::Result<Arc<Job>> {
    let (top, base) = mover.names();
    let job = Arc::new(Job {
        id,
        kind: "commit",
        top: top.display().to_string(),
        base: base.display().to_string(),
        status: Mutex::new((Status::Running, None)),
        current: AtomicU64::new(0),
        total: AtomicU64::new(mover.total()),
        speed: AtomicU64::new(speed),
        cancel: AtomicBool::new(false),
        started: Instant::now(),
    });
    let j = job.clone();
    stats.running.fetch_add(1, Ordering::SeqCst);
    tracing::info!(job = %job.id, top = %job.top, base = %job.base, total = mover.total(), speed, "job state: created");
    std::thread::Builder::new().name(format!("job-{}", job.id)).spawn(move || {
        let outcome = run(&j, mover, extender, &stats);
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

fn run(job: &Job, mut mover: Box<dyn CommitJob>, mut extender: Option<BaseExtender>, stats: &JobStats) -> Outcome {
    job.set(Status::Running, None);
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
                if !more {
                    break;
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
                    std::thread::sleep(FULL_RETRY);
                }
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
        Ok(()) => Outcome::Completed,
        Err(e) => {
            mover.abandon();
            Outcome::Failed(e.to_string())
        }
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

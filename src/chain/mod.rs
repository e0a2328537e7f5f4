//! The chain's lifecycle on a running VM, above the disk crate's chain: online snapshots
//! (`ctl snapshot`) and live merges (`ctl commit`, run as jobs: [`job`]), and the counters
//! and log lines around them. The disk crate moves the top and the data; this module holds
//! the guest's writes around a snapshot, makes the thin control thread follow a new top's
//! volume, grows a merge's base through the mailbox ([`extend`]), and keeps the jobs.

pub mod extend;
pub mod job;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};
use thinblk_vhost::{Disk, ParkHub};

use crate::mailbox::wire::Uuid;
use crate::thin::volume::Volume;
use crate::thin::{ThinOptions, ThinSwitch};

/// How long a snapshot waits for writes at the storage before it gives up (and changes
/// nothing): a storage that stalls this long would stall the guest anyway.
pub const SNAPSHOT_DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Holds the guest's writes for a chain change and waits until none is at the storage
/// (true: released with `ParkHub::release`). Separate from `freeze`: a backup's `thaw`, or its
/// freeze's timeout, cannot release it.
fn hold(hub: &ParkHub) -> Result<bool, String> {
    hub.hold(SNAPSHOT_DRAIN_LIMIT)?;
    Ok(true)
}

/// Counters of chain operations (for metrics).
#[derive(Debug, Default)]
pub struct ChainStats {
    /// Snapshots taken.
    pub snapshots: AtomicU64,
    /// Snapshots refused or failed (the chain unchanged).
    pub snapshot_failures: AtomicU64,
    /// The last snapshot's pause of guest writes, in microseconds.
    pub last_pause_us: AtomicU64,
}

/// Concluded jobs kept for `query-jobs` until dismissed (the oldest go first).
const KEEP_CONCLUDED: usize = 16;

/// Chain operations on the served image.
pub struct ChainControl {
    image: Arc<dyn Disk>,
    hub: Arc<ParkHub>,
    thin: Option<(ThinSwitch, ThinOptions)>,
    /// One chain operation at a time.
    serial: Mutex<()>,
    stats: Arc<ChainStats>,
    jobs: Mutex<Vec<Arc<job::Job>>>,
    job_stats: Arc<job::JobStats>,
    next_id: AtomicU64,
}

impl ChainControl {
    /// Chain operations on `image`, holding writes through `hub`; in thin mode, `thin` follows
    /// new tops' volumes and its options' mailbox grows merge bases.
    pub fn new(image: Arc<dyn Disk>, hub: Arc<ParkHub>, thin: Option<(ThinSwitch, ThinOptions)>) -> Arc<ChainControl> {
        Arc::new(ChainControl {
            image,
            hub,
            thin,
            serial: Mutex::new(()),
            stats: Arc::new(ChainStats::default()),
            jobs: Mutex::new(Vec::new()),
            job_stats: Arc::new(job::JobStats::default()),
            next_id: AtomicU64::new(1),
        })
    }

    /// The counters.
    pub fn stats(&self) -> Arc<ChainStats> {
        self.stats.clone()
    }

    /// The jobs' counters.
    pub fn job_stats(&self) -> Arc<job::JobStats> {
        self.job_stats.clone()
    }

    fn running_job(&self) -> Option<Arc<job::Job>> {
        self.jobs.lock().ok()?.iter().find(|j| j.status() != job::Status::Concluded).cloned()
    }

    fn find_job(&self, args: &Value) -> Result<Arc<job::Job>, String> {
        let id = args.get("id").and_then(Value::as_str).ok_or("id (a job's id) is required")?;
        let jobs = self.jobs.lock().map_err(|_| "job list poisoned".to_string())?;
        jobs.iter().find(|j| j.id == id).cloned().ok_or_else(|| format!("no job {id}"))
    }

    /// `ctl commit {"top": PATH, "base": PATH, "speed": BYTES_PER_S, "job-id": ID,
    /// "backing-file": NAME, "base-volume-uuid": UUID}`: starts a live merge as a job.
    pub fn commit_command(&self, args: &Value) -> Result<Value, String> {
        let Some(obj) = args.as_object() else { return Err("arguments must be an object".into()) };
        for k in obj.keys() {
            if !["top", "base", "speed", "job-id", "backing-file", "base-volume-uuid"].contains(&k.as_str()) {
                return Err(format!("unknown argument {k}"));
            }
        }
        let path = |k: &str| obj.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).map(PathBuf::from).ok_or(format!("{k} (a path) is required"));
        let (top, base) = (path("top")?, path("base")?);
        let speed = match obj.get("speed") {
            None => 0,
            Some(v) => v.as_u64().ok_or("speed must be a number of bytes per second (0: no limit)")?,
        };
        let backing = match obj.get("backing-file") {
            None => None,
            Some(v) => Some(v.as_str().filter(|s| !s.is_empty() && s.len() < 1024).ok_or("backing-file must be a name")?.to_string()),
        };
        let uuid = match obj.get("base-volume-uuid") {
            None => None,
            Some(v) => Some(v.as_str().and_then(|s| Uuid::parse(s).ok()).ok_or("base-volume-uuid must be a UUID")?),
        };
        let _one = self.serial.lock().map_err(|_| "chain state poisoned".to_string())?;
        if let Some(j) = self.running_job() {
            return Err(format!("job {} is running on this chain", j.id));
        }
        let id = match obj.get("job-id") {
            None => format!("commit-{}", self.next_id.fetch_add(1, Ordering::Relaxed)),
            Some(v) => v.as_str().filter(|s| !s.is_empty() && s.len() <= 64).ok_or("job-id must be a short string")?.to_string(),
        };
        if self.jobs.lock().map_err(|_| "job list poisoned".to_string())?.iter().any(|j| j.id == id) {
            return Err(format!("a job {id} exists; dismiss it first"));
        }
        let extender = match (&self.thin, uuid) {
            (Some(_), None) => return Err("the daemon serves a thin volume: base-volume-uuid (the base's volume) is required".into()),
            (None, Some(_)) => return Err("base-volume-uuid is for thin mode (--thin) only".into()),
            (None, None) => None,
            (Some((_, opts)), Some(u)) => Some(
                extend::BaseExtender::open(opts, &base, u, self.image.capacity()).map_err(|e| format!("the base's volume {}: {e}", base.display()))?,
            ),
        };
        // An active commit starts tracking the guest's writes with them held for a moment.
        let mut held = false;
        let hub = self.hub.clone();
        let mover = self.image.clone().commit(&top, &base, backing, &mut || {
            held = hold(&hub)?;
            Ok(())
        });
        if held {
            self.hub.release();
        }
        let mover = mover.map_err(|e| e.to_string())?;
        let hooks = self.pivot_hooks(&base, uuid);
        let j = job::start(id.clone(), mover, speed, extender, hooks, self.job_stats.clone()).map_err(|e| format!("starting the job: {e}"))?;
        let mut jobs = self.jobs.lock().map_err(|_| "job list poisoned".to_string())?;
        jobs.push(j);
        let concluded: Vec<usize> = jobs.iter().enumerate().filter(|(_, j)| j.status() == job::Status::Concluded).map(|(i, _)| i).collect();
        if concluded.len() > KEEP_CONCLUDED {
            jobs.remove(concluded[0]);
        }
        Ok(json!({"id": id}))
    }

    /// What a pivot onto `base` (volume `uuid` in thin mode) needs from the daemon.
    fn pivot_hooks(&self, base: &std::path::Path, uuid: Option<Uuid>) -> job::PivotHooks {
        let (h1, h2) = (self.hub.clone(), self.hub.clone());
        let thin = self.thin.as_ref().map(|(t, _)| t.clone());
        let (b1, b2) = (base.to_path_buf(), base.to_path_buf());
        let with_thin = thin.is_some();
        job::PivotHooks {
            hold: Box::new(move || hold(&h1)),
            release: Box::new(move || h2.release()),
            limit: Box::new(move || if with_thin { Volume::open(&b1).ok().map(|v| v.physical()) } else { None }),
            after: Box::new(move || {
                if let (Some(t), Some(u)) = (&thin, uuid) {
                    match Volume::open(&b2) {
                        Ok(v) => {
                            if !t.switch_volume(v, u) {
                                tracing::warn!(volume = %u, "the thin control thread has not followed the pivot's new top yet (busy at the storage); it will once back");
                            }
                        }
                        Err(e) => tracing::error!(volume = %u, error = %e, "the new top's volume cannot be opened: its extensions are not monitored"),
                    }
                }
            }),
        }
    }

    /// `ctl job-complete {"id"}`: an active commit in `ready` pivots.
    pub fn job_complete(&self, args: &Value) -> Result<Value, String> {
        let j = self.find_job(args)?;
        if !j.complete() {
            return Err(format!("job {} is a {} in status {}; only an active commit that is ready completes", j.id, j.kind, j.json()["status"]));
        }
        Ok(json!({}))
    }

    /// At shutdown: every running job is cancelled (its base closed clean, the chain as it
    /// was) and waited for, at most `limit` in all.
    pub fn shutdown(&self, limit: std::time::Duration) {
        let running: Vec<Arc<job::Job>> = self.jobs.lock().map(|j| j.iter().filter(|j| j.status() != job::Status::Concluded).cloned().collect()).unwrap_or_default();
        let deadline = Instant::now() + limit;
        for j in running {
            if j.cancel() {
                tracing::info!(job = %j.id, "shutdown: job cancelled");
            }
            while j.status() != job::Status::Concluded && Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }

    /// `ctl query-jobs`.
    pub fn query_jobs(&self) -> Value {
        json!(self.jobs.lock().map(|j| j.iter().map(|j| j.json()).collect::<Vec<_>>()).unwrap_or_default())
    }

    /// `ctl job-cancel {"id"}`: the chain stays as it was.
    pub fn job_cancel(&self, args: &Value) -> Result<Value, String> {
        let j = self.find_job(args)?;
        if !j.cancel() {
            return Err(format!("job {} is {}; it cannot be cancelled now", j.id, j.json()["status"]));
        }
        Ok(json!({}))
    }

    /// `ctl job-set-speed {"id", "speed"}`.
    pub fn job_set_speed(&self, args: &Value) -> Result<Value, String> {
        let j = self.find_job(args)?;
        let speed = args.get("speed").and_then(Value::as_u64).ok_or("speed must be a number of bytes per second (0: no limit)")?;
        j.set_speed(speed);
        Ok(json!({}))
    }

    /// `ctl job-dismiss {"id"}`: forgets a concluded job.
    pub fn job_dismiss(&self, args: &Value) -> Result<Value, String> {
        let j = self.find_job(args)?;
        if j.status() != job::Status::Concluded {
            return Err(format!("job {} has not concluded", j.id));
        }
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.retain(|x| x.id != j.id);
        }
        Ok(json!({}))
    }

    /// The chain served, top first.
    pub fn chain_json(&self) -> Value {
        json!(self.image.chain().iter().map(|p| p.display().to_string()).collect::<Vec<_>>())
    }

    /// `ctl snapshot {"overlay": PATH, "volume-uuid": UUID}`: see [`ChainControl::snapshot`].
    pub fn snapshot_command(&self, args: &Value) -> Result<Value, String> {
        let Some(obj) = args.as_object() else { return Err("arguments must be an object".into()) };
        for k in obj.keys() {
            if !["overlay", "volume-uuid"].contains(&k.as_str()) {
                return Err(format!("unknown argument {k}"));
            }
        }
        let overlay = obj.get("overlay").and_then(Value::as_str).filter(|s| !s.is_empty()).ok_or("overlay (a path) is required")?;
        let uuid = match obj.get("volume-uuid") {
            None => None,
            Some(v) => Some(v.as_str().and_then(|s| Uuid::parse(s).ok()).ok_or("volume-uuid must be a UUID")?),
        };
        self.snapshot(PathBuf::from(overlay), uuid)
    }

    /// Makes `overlay` the top: writes held (as `freeze` holds them) while the disk switches,
    /// then released; in thin mode the new top's volume (`uuid`) is the one that grows.
    pub fn snapshot(&self, overlay: PathBuf, uuid: Option<Uuid>) -> Result<Value, String> {
        let r = self.snapshot_inner(&overlay, uuid);
        if let Err(e) = &r {
            self.stats.snapshot_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(overlay = %overlay.display(), error = %e, "snapshot refused; the chain is unchanged");
        }
        r
    }

    fn snapshot_inner(&self, overlay: &std::path::Path, uuid: Option<Uuid>) -> Result<Value, String> {
        let _one = self.serial.lock().map_err(|_| "chain state poisoned".to_string())?;
        // The new top's volume, read before anything is held.
        let volume = match (&self.thin, uuid) {
            (Some(_), None) => return Err("the daemon serves a thin volume: volume-uuid (the new top's volume) is required".into()),
            (None, Some(_)) => return Err("volume-uuid is for thin mode (--thin) only".into()),
            (None, None) => None,
            (Some((t, _)), Some(u)) => {
                if t.served_elsewhere(u) {
                    return Err(format!("volume {u} is served by another live process on this host"));
                }
                let v = Volume::open(overlay).map_err(|e| format!("the new top's volume {}: {e}", overlay.display()))?;
                Some((v, u))
            }
        };
        let limit = volume.as_ref().map(|(v, _)| v.physical());
        // Writes held right before the switch (the disk prepares what it can first); a
        // freeze already in place (a backup's) holds them and stays.
        let mut held: Option<(Instant, bool)> = None;
        let hub = self.hub.clone();
        let mut hold_now = || -> Result<(), String> {
            let t = Instant::now();
            held = Some((t, hold(&hub)?));
            Ok(())
        };
        let switched = self.image.snapshot(overlay, limit, &mut hold_now);
        let followed = match (&switched, volume, &self.thin) {
            (Ok(_), Some((v, u)), Some((t, _))) => Some(t.switch_volume(v, u)),
            _ => None,
        };
        let (started, ours) = held.unwrap_or((Instant::now(), false));
        let drained = held.map(|(t, _)| t);
        if ours {
            self.hub.release();
        }
        let pause = started.elapsed();
        let _ = drained;
        let report = switched.map_err(|e| e.to_string())?;
        self.stats.snapshots.fetch_add(1, Ordering::Relaxed);
        self.stats.last_pause_us.store(pause.as_micros() as u64, Ordering::Relaxed);
        if followed == Some(false) {
            tracing::warn!(volume = ?uuid.map(|u| u.to_string()), "the thin control thread has not followed the new top yet (busy at the storage); it will once back");
        }
        tracing::info!(new_top = %report.new_top.display(), old_top = %report.old_top.display(), depth = report.depth,
            pause_us = pause.as_micros() as u64, switch_us = report.switch_us,
            "snapshot taken: restart this daemon with --image {} (and its volume UUID) from now on", report.new_top.display());
        Ok(json!({
            "top": report.new_top.display().to_string(),
            "chain": self.chain_json(),
            "pause-us": pause.as_micros() as u64,
            "switch-us": report.switch_us,
            "thin-followed": followed,
        }))
    }
}

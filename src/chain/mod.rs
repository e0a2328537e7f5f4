//! The chain's lifecycle on a running VM, above the disk crate's chain: online snapshots
//! (`ctl snapshot`), and the counters and log lines around them. The disk crate moves the
//! top; this module holds the guest's writes around the move, and makes the thin control
//! thread follow the new top's volume.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};
use thinblk_vhost::{Disk, ParkHub};

use crate::mailbox::wire::Uuid;
use crate::thin::volume::Volume;
use crate::thin::ThinSwitch;

/// How long a snapshot waits for writes at the storage before it gives up (and changes
/// nothing): a storage that stalls this long would stall the guest anyway.
pub const SNAPSHOT_DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

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

/// Chain operations on the served image.
pub struct ChainControl {
    image: Arc<dyn Disk>,
    hub: Arc<ParkHub>,
    thin: Option<ThinSwitch>,
    /// One chain operation at a time.
    serial: Mutex<()>,
    stats: Arc<ChainStats>,
}

impl ChainControl {
    /// Chain operations on `image`, holding writes through `hub`; `thin` follows new tops'
    /// volumes in thin mode.
    pub fn new(image: Arc<dyn Disk>, hub: Arc<ParkHub>, thin: Option<ThinSwitch>) -> Arc<ChainControl> {
        Arc::new(ChainControl { image, hub, thin, serial: Mutex::new(()), stats: Arc::new(ChainStats::default()) })
    }

    /// The counters.
    pub fn stats(&self) -> Arc<ChainStats> {
        self.stats.clone()
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
            (Some(t), Some(u)) => {
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
        let mut hold = || -> Result<(), String> {
            let ours = !hub.frozen();
            let t = Instant::now();
            if ours {
                hub.freeze(SNAPSHOT_DRAIN_LIMIT)?;
            }
            held = Some((t, ours));
            Ok(())
        };
        let switched = self.image.snapshot(overlay, limit, &mut hold);
        let followed = match (&switched, volume, &self.thin) {
            (Ok(_), Some((v, u)), Some(t)) => Some(t.switch_volume(v, u)),
            _ => None,
        };
        let (started, ours) = held.unwrap_or((Instant::now(), false));
        let drained = held.map(|(t, _)| t);
        if ours {
            self.hub.thaw();
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

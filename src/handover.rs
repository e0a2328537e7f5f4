//! The image's owner across a live migration: this daemon's side of the handover, as the
//! device asks for it ([`thinblk_vhost::ownership`]), with what an operator needs to see.
//!
//! A daemon started with `--incoming` (the migration's destination) opens the image
//! inactive and takes it when its rings start after the switch-over. A daemon serving the
//! image (the source) hands it over when its rings stop while the frontend logs dirty pages
//! (the switch-over), and takes it back if its rings start again (a failed or cancelled
//! migration). Each change is logged, counted (metrics) and shown by `ctl query-status`;
//! the thin volume's control thread is woken so that it refreshes the volume and takes over
//! extensions (or stops sending them).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thinblk_vhost::ownership::Ownership;
use thinblk_vhost::Disk;

use crate::thin::control::Signals;

/// What the handover did so far.
#[derive(Clone, Debug, Default)]
pub struct HandoverStatus {
    /// This daemon may write the image now.
    pub active: bool,
    /// Started with `--incoming` (the destination of a migration).
    pub incoming: bool,
    /// Times the image was taken (at a ring start).
    pub activations: u64,
    /// Times the image was handed over (at a migration's switch-over).
    pub handovers: u64,
    /// Activations or handovers that failed.
    pub failures: u64,
    /// When the state last changed.
    pub changed: Option<Instant>,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// Rings the frontend has started, and requests not completed, as the device last said.
    pub rings_running: usize,
    /// Requests taken and not completed at the last ring change.
    pub in_hand: usize,
}

impl HandoverStatus {
    /// Where this daemon stands: `serving`, `incoming` (waiting for the switch-over) or
    /// `handed-over` (a source after its switch-over).
    pub fn role(&self) -> &'static str {
        match (self.active, self.handovers > 0 || !self.incoming) {
            (true, _) => "serving",
            (false, false) => "incoming",
            (false, true) => "handed-over",
        }
    }

    /// The status as `ctl query-status` shows it.
    pub fn json(&self) -> Value {
        json!({
            "role": self.role(),
            "active": self.active,
            "incoming": self.incoming,
            "activations": self.activations,
            "handovers": self.handovers,
            "failures": self.failures,
            "changed-ms-ago": self.changed.map(|t| t.elapsed().as_millis() as u64),
            "last-error": self.last_error,
            "rings-running": self.rings_running,
        })
    }
}

/// This daemon's side of the handover.
pub struct Handover {
    image: Arc<dyn Disk>,
    thin: Option<Arc<Signals>>,
    status: Mutex<HandoverStatus>,
    /// Serialises `ctl hand-over` with the device's ring reports: a ring that starts is
    /// counted before it looks at the image, so the command either sees it or came first.
    gate: Mutex<()>,
}

impl Handover {
    /// The handover of `image`; `incoming`: it was opened inactive (`--incoming`); `thin`:
    /// the thin volume's control thread to wake on a change.
    pub fn new(image: Arc<dyn Disk>, incoming: bool, thin: Option<Arc<Signals>>) -> Arc<Handover> {
        let status = HandoverStatus { active: image.is_active(), incoming, ..Default::default() };
        if incoming {
            tracing::info!("incoming migration: the image is open inactive (shared lock, nothing written) until this daemon's rings start");
        }
        Arc::new(Handover { image, thin, status: Mutex::new(status), gate: Mutex::new(()) })
    }

    /// A copy of the status.
    pub fn status(&self) -> HandoverStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut HandoverStatus)) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s);
    }

    /// `ctl hand-over`: hands the image over while the VM is stopped. QEMU tells the backend
    /// nothing when a VM that was already paused migrates (its rings stopped at the pause,
    /// without dirty logging), so the management layer says it. Refused while a ring runs
    /// or a request is not completed.
    pub fn hand_over_stopped(&self) -> Result<(), String> {
        let _gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        let s = self.status();
        if !s.active {
            return Ok(());
        }
        if s.rings_running > 0 || s.in_hand > 0 {
            return Err(format!(
                "the device is running ({} rings started, {} requests in hand): stop the VM first; during a live migration QEMU stops the rings and the image is handed over by itself",
                s.rings_running, s.in_hand
            ));
        }
        Ownership::inactivate(self)
    }

    /// Counts and logs a failed activation or handover; returns the message.
    fn failed(&self, msg: String, what: &'static str, since: Instant) -> String {
        self.update(|s| {
            s.failures += 1;
            s.last_error = Some(msg.clone());
        });
        tracing::error!(error = %msg, ms = since.elapsed().as_millis() as u64, "{what}");
        msg
    }

    fn wake_thin(&self) {
        if let Some(t) = &self.thin {
            t.wake();
        }
    }
}

impl Ownership for Handover {
    fn is_active(&self) -> bool {
        self.image.is_active()
    }

    fn activate(&self, wait: Duration) -> Result<(), String> {
        let t = Instant::now();
        let first = self.status().activations == 0;
        match self.image.activate(wait) {
            Ok(()) => {
                self.update(|s| {
                    s.active = true;
                    s.activations += 1;
                    s.changed = Some(Instant::now());
                });
                let side = if self.status().incoming && first { "destination: the migration's switch-over is done" } else { "the image is served here again" };
                tracing::info!(ms = t.elapsed().as_millis() as u64, "image activated ({side}): lock taken, metadata read afresh, journal started");
                self.wake_thin();
                Ok(())
            }
            Err(e) => Err(self.failed(e.to_string(), "activating the image failed", t)),
        }
    }

    fn rings(&self, running: usize, in_hand: usize) {
        let _gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        self.update(|s| {
            s.rings_running = running;
            s.in_hand = in_hand;
        });
    }

    fn inactivate(&self) -> Result<(), String> {
        let t = Instant::now();
        // The thin control thread writes the mailbox only under this, checking that the image
        // is active: once it is not, the source sends nothing.
        let turn = self.thin.as_ref().map(|s| s.turn.lock().unwrap_or_else(|e| e.into_inner()));
        let result = self.image.inactivate();
        drop(turn);
        match result {
            Ok(()) => {
                self.update(|s| {
                    s.active = false;
                    s.handovers += 1;
                    s.changed = Some(Instant::now());
                });
                tracing::info!(ms = t.elapsed().as_millis() as u64,
                    "image inactivated (source: handed over at the switch-over): metadata written back and synced, journal removed, lock dropped; nothing is written here until a ring starts again");
                self.wake_thin();
                Ok(())
            }
            Err(e) => Err(self.failed(e.to_string(), "inactivating the image failed: it stays active here", t)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_management_hand_over_waits_for_stopped_rings() {
        let path = std::env::temp_dir().join(format!("thinblk-handover-unit-{}", std::process::id()));
        std::fs::File::create(&path).and_then(|f| f.set_len(1 << 20)).expect("image");
        let image: Arc<dyn Disk> = Arc::new(thinblk_vhost::RawImage::open(&path, false, false).expect("raw image"));
        let h = Handover::new(image, false, None);
        // A ring reported as starting (the session does so before it looks at the image).
        h.rings(1, 0);
        assert!(h.hand_over_stopped().is_err(), "handed over under a starting ring");
        h.rings(0, 2);
        assert!(h.hand_over_stopped().is_err(), "handed over with requests in hand");
        h.rings(0, 0);
        assert!(h.hand_over_stopped().is_ok());
        assert_eq!((h.status().active, h.status().handovers, h.status().role()), (false, 1, "handed-over"));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn roles_follow_the_handovers() {
        let mut s = HandoverStatus { incoming: true, ..Default::default() };
        assert_eq!(s.role(), "incoming");
        s.active = true;
        s.activations = 1;
        assert_eq!(s.role(), "serving");
        s.active = false;
        s.handovers = 1;
        assert_eq!(s.role(), "handed-over");
        let source = HandoverStatus { active: true, ..Default::default() };
        assert_eq!(source.role(), "serving");
        assert_eq!(source.json()["role"], "serving");
    }
}

//! Thin volumes: the extension policy (spec §2), the per-drive monitor, the volume and its
//! refresh, and the control thread that ties them to the allocator and the mailbox.

pub mod control;
pub mod monitor;
pub mod policy;
pub mod volume;

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use thinblk_vhost::ParkHub;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::mailbox::client::Client;
use crate::mailbox::io::FileMailbox;
use crate::mailbox::wire::Uuid;
use control::{Control, MailboxIdentity, Signals, ThinEngine, ThinStats};
use monitor::Monitor;
use policy::Policy;
use volume::Volume;

/// Everything thin mode needs, resolved from the command line.
#[derive(Clone, Debug)]
pub struct ThinOptions {
    /// The volume the image lives on (the image path itself).
    pub volume: PathBuf,
    /// Extension policy.
    pub policy: Policy,
    /// The SPM's inbox (we write).
    pub spm_inbox: PathBuf,
    /// The SPM's outbox (we read).
    pub spm_outbox: PathBuf,
    /// Mailbox host id (1..249).
    pub host_id: u16,
    /// Storage domain.
    pub domain: Uuid,
    /// Volume.
    pub volume_uuid: Uuid,
    /// Per-host lock file.
    pub lock: PathBuf,
    /// Rate-aware sizing on top of the spec (None: the spec alone).
    pub rate: Option<monitor::RateSettings>,
}

/// The running control thread.
pub struct ThinHandle {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    stats: Arc<Mutex<ThinStats>>,
    switches: Mutex<std::sync::mpsc::Sender<control::Switch>>,
    signals: Arc<Signals>,
    lock: PathBuf,
    superseded: Arc<std::sync::atomic::AtomicBool>,
}

/// Hands the control thread a snapshot's new top.
#[derive(Clone)]
pub struct ThinSwitch {
    tx: Option<std::sync::mpsc::Sender<control::Switch>>,
    signals: Arc<Signals>,
    lock: PathBuf,
    superseded: Arc<std::sync::atomic::AtomicBool>,
}

impl ThinSwitch {
    /// Whether a live process of this host serves volume `uuid` (its per-volume lock is held).
    pub fn served_elsewhere(&self, uuid: Uuid) -> bool {
        crate::mailbox::io::probe_owner(&crate::mailbox::io::volume_lock_path(&self.lock, uuid)) == crate::mailbox::client::Owner::Alive
    }

    /// Makes the control thread follow `volume` (a snapshot's new top, UUID `uuid`): its
    /// size, its extensions, its monitor. Whether the thread took it within a few seconds
    /// (if not, it takes it when it comes back from the storage).
    pub fn switch_volume(&self, volume: Volume, uuid: Uuid) -> bool {
        let (done, seen) = std::sync::mpsc::channel();
        let Some(tx) = &self.tx else { return false };
        self.superseded.store(true, std::sync::atomic::Ordering::SeqCst);
        if tx.send(control::Switch { volume, uuid, done }).is_err() {
            return false;
        }
        self.signals.wake();
        seen.recv_timeout(SWITCH_WAIT).is_ok()
    }
}

/// How long a snapshot waits for the control thread to follow its new top (it may be inside
/// a mailbox read on storage that does not answer; it follows once out).
const SWITCH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl ThinHandle {
    /// A snapshot of the counters.
    pub fn stats(&self) -> ThinStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The live counters (shared with the control thread).
    pub fn stats_handle(&self) -> Arc<Mutex<ThinStats>> {
        self.stats.clone()
    }

    /// What a snapshot uses to make the control thread follow its new top.
    pub fn switcher(&self) -> ThinSwitch {
        ThinSwitch {
            tx: self.switches.lock().map(|t| t.clone()).ok(),
            signals: self.signals.clone(),
            lock: self.lock.clone(),
            superseded: self.superseded.clone(),
        }
    }

    /// Stops the control thread (clearing our mailbox slots) and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ThinHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Opens the volume and the mailbox and starts the control thread for `engine`.
pub fn start(
    opts: &ThinOptions,
    engine: Arc<dyn ThinEngine>,
    capacity: u64,
    signals: Arc<Signals>,
    hub: Arc<ParkHub>,
) -> io::Result<ThinHandle> {
    let volume = Volume::open(&opts.volume)?;
    if let Some(dir) = opts.lock.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let io = FileMailbox::open(&opts.spm_inbox, &opts.spm_outbox, opts.host_id, &opts.lock)
        .map_err(|e| io::Error::new(e.kind(), format!("opening the mailbox: {e}")))?;
    let client = Client::new(opts.volume_uuid, Box::new(random_nonce));
    tracing::info!(
        volume = %opts.volume.display(),
        kind = ?volume.kind(),
        physical = volume.physical(),
        allocation = engine.allocation(),
        capacity,
        limit = opts.policy.limit(),
        chunk = opts.policy.chunk(),
        max_size = policy::max_size(capacity),
        host_id = opts.host_id,
        "thin volume monitored"
    );
    let id = MailboxIdentity { domain: opts.domain, volume: opts.volume_uuid };
    let monitor = match opts.rate {
        Some(r) => Monitor::new(opts.policy, capacity).with_rate(r),
        None => Monitor::new(opts.policy, capacity),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let (policy, rate) = (opts.policy, opts.rate);
    let fresh: control::FreshMonitor = Box::new(move || match rate {
        Some(r) => Monitor::new(policy, capacity).with_rate(r),
        None => Monitor::new(policy, capacity),
    });
    let signals_for_switch = signals.clone();
    let superseded = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let control = Control::new(engine, volume, monitor, signals, hub, client, Box::new(io), id).with_switches(rx, fresh, superseded.clone());
    let stats = control.stats();
    let stop = EventFd::new(EFD_NONBLOCK)?;
    let stop_rx = stop.try_clone()?;
    let thread = std::thread::Builder::new().name("thin-control".into()).spawn(move || control.run(&stop_rx))?;
    Ok(ThinHandle { stop, thread: Some(thread), stats, switches: Mutex::new(tx), signals: signals_for_switch, lock: opts.lock.clone(), superseded })
}

/// 16 random bytes for a doorbell (uniqueness is all that matters).
pub(crate) fn random_nonce() -> [u8; 16] {
    let mut b = [0u8; 16];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Fall back to the clock: a doorbell only has to differ from the previous one.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        b.copy_from_slice(&t.to_le_bytes());
    }
    b
}

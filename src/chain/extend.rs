//! Growing a merge's base on a thin volume: the job asks the SPM through its own mailbox
//! client (under the base's volume UUID; the host's lock file keeps it and the top's client
//! apart, as it keeps two processes apart; the base's volume lock is shared with the daemon's
//! client when that one claimed it), sized ahead from what the base will receive, as vdsm
//! extends the base before a live merge.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use thinblk_vhost::disk::commit::CommitJob;

use crate::mailbox::client::Client;
use crate::mailbox::io::FileMailbox;
use crate::mailbox::wire::{Extend, Uuid};
use crate::thin::policy::{max_size, wire_mib, MIB};
use crate::thin::volume::Volume;
use crate::thin::ThinOptions;

/// How often replies are polled while an extension is outstanding.
const POLL: Duration = Duration::from_millis(100);

/// The base's volume and the mailbox client that grows it.
pub struct BaseExtender {
    volume: Volume,
    uuid: Uuid,
    domain: Uuid,
    client: Client,
    io: FileMailbox,
    chunk: u64,
    capacity: u64,
}

impl BaseExtender {
    /// For the base at `path` (volume `uuid`), on the mailbox of `opts`.
    pub fn open(opts: &ThinOptions, path: &std::path::Path, uuid: Uuid, capacity: u64) -> std::io::Result<BaseExtender> {
        let volume = Volume::open(path)?;
        // The daemon's own mailbox may hold the base's volume lock (it served the base once).
        let io = FileMailbox::open(&opts.spm_inbox, &opts.spm_outbox, opts.host_id, &opts.lock)?.sharing_claims();
        let client = Client::new(uuid, Box::new(crate::thin::random_nonce));
        Ok(BaseExtender { volume, uuid, domain: opts.domain, client, io, chunk: opts.policy.chunk().max(MIB), capacity })
    }

    /// Makes the base's volume hold what it has plus `incoming` bytes (and their metadata),
    /// asking the SPM if it does not; the base's limit follows the volume's size.
    pub fn ensure(&mut self, mover: &dyn CommitJob, incoming: u64, limit: Duration, cancel: &AtomicBool) -> Result<(), String> {
        // Metadata: an L2 entry per cluster and refcounts come to well under 1/64 of the data.
        let need = mover.base_allocation().saturating_add(incoming).saturating_add(incoming / 64).saturating_add(4 * MIB);
        let target = need.div_ceil(self.chunk).saturating_mul(self.chunk).min(max_size(self.capacity));
        let physical = self.volume.refresh().map_err(|e| format!("refreshing the base's volume: {e}"))?;
        if target <= physical {
            mover.set_base_limit(physical);
            return Ok(());
        }
        let size_mib = wire_mib(target).map_err(|e| e.to_string())?;
        let req = Extend { domain: self.domain, volume: self.uuid, size_mib };
        self.volume.extension_requested(target);
        self.client.submit(req).map_err(|e| e.to_string())?;
        let started = Instant::now();
        tracing::info!(volume = %self.uuid, physical, requested = target, allocation = mover.base_allocation(), incoming, "merge: base extension requested");
        self.client.place(&mut self.io).map_err(|e| format!("writing the extend request: {e}"))?;
        loop {
            if cancel.load(Ordering::SeqCst) {
                return Err("cancelled".into());
            }
            if started.elapsed() > limit {
                return Err(format!("the SPM did not extend the base within {} s", limit.as_secs()));
            }
            std::thread::sleep(POLL);
            let done = match self.client.poll(&mut self.io) {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(error = %e, "merge: mailbox poll failed; polling again");
                    continue;
                }
            };
            if done.iter().any(|c| c.request.volume == self.uuid) {
                let physical = self.volume.refresh().map_err(|e| format!("refreshing the base's volume: {e}"))?;
                tracing::info!(volume = %self.uuid, physical, requested = target, ms = started.elapsed().as_millis() as u64, "merge: base extended");
                mover.set_base_limit(physical);
                if physical >= target {
                    return Ok(());
                }
                return Err(format!("the SPM left the base at {physical} bytes ({target} asked)"));
            }
        }
    }
}

impl Drop for BaseExtender {
    fn drop(&mut self) {
        if let Err(e) = self.client.stop(&mut self.io) {
            tracing::warn!(error = %e, "clearing the merge's mailbox slots failed");
        }
    }
}

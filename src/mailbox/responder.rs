//! The SPM responder (`thinblk spm`, spec §1.12): polls the request region every 2 s and the
//! doorbell every 0.5 s, extends volumes, and replies. It is the standalone SPM for clusters
//! without oVirt, and the test double of the mailbox client.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use thinblk_qcow2::Aligned;

use super::io::open_volume;
use super::spm::Spm;
use super::wire::{event_nonce, Extend, BLOCK_LEN, SPM_REGION_LEN};
use crate::thin::policy::MIB;

/// Full poll interval.
pub const MONITOR_INTERVAL: Duration = Duration::from_secs(2);
/// Doorbell check interval.
pub const EVENT_INTERVAL: Duration = Duration::from_millis(500);

/// How the SPM extends a volume.
#[derive(Clone, Debug)]
pub enum Backend {
    /// `lvextend --autobackup n --driverloaded n --size <N>m <domain>/<volume>`.
    Lvm,
    /// Grow the file `DIR/<domain-uuid>/<volume-uuid>` (a loop device's backing file).
    File(PathBuf),
}

impl Backend {
    /// Extends the request's volume to at least `size_mib` MiB.
    pub fn extend(&self, req: &Extend) -> Result<(), String> {
        let want = req.size_mib.checked_mul(MIB).ok_or("size overflows")?;
        match self {
            Backend::File(dir) => {
                let path = dir.join(req.domain.to_string()).join(req.volume.to_string());
                let f = OpenOptions::new().write(true).open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                let have = f.metadata().map_err(|e| e.to_string())?.len();
                if have < want {
                    f.set_len(want).map_err(|e| format!("{}: {e}", path.display()))?;
                }
                Ok(())
            }
            Backend::Lvm => {
                let lv = format!("{}/{}", req.domain, req.volume);
                if lv_size(&lv).map(|s| s >= want).unwrap_or(false) {
                    return Ok(());
                }
                let out = Command::new("lvextend")
                    .args(["--autobackup", "n", "--driverloaded", "n", "--size"])
                    .arg(format!("{}m", req.size_mib))
                    .arg(&lv)
                    .output()
                    .map_err(|e| format!("lvextend: {e}"))?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
                }
            }
        }
    }
}

fn lv_size(lv: &str) -> Option<u64> {
    let out = Command::new("lvs").args(["--noheadings", "--nosuffix", "--units", "b", "-o", "lv_size", lv]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// The SPM: its view of the mailbox volumes and the extension backend.
pub struct Responder {
    inbox: File,
    outbox: File,
    spm: Spm,
    backend: Backend,
    region: Aligned,
    block: Aligned,
    last_event: Option<[u8; 16]>,
    delay: Duration,
    /// Hosts whose block had a bad checksum at the last poll (logged once per episode).
    bad_hosts: Vec<u16>,
}

impl Responder {
    /// Opens the mailbox volumes and zeroes the reply region (spec §1.12: every request
    /// already present is then answered).
    pub fn open(inbox: &Path, outbox: &Path, backend: Backend) -> io::Result<Responder> {
        let mut r = Responder {
            inbox: open_volume(inbox, false)?,
            outbox: open_volume(outbox, true)?,
            spm: Spm::new(),
            backend,
            region: Aligned::new(SPM_REGION_LEN, 4096)?,
            block: Aligned::new(BLOCK_LEN, 4096)?,
            last_event: None,
            delay: Duration::ZERO,
            bad_hosts: Vec::new(),
        };
        r.outbox.write_all_at(r.region.bytes(), 0)?;
        r.outbox.sync_data()?;
        Ok(r)
    }

    /// Answers every batch of new requests `delay` late (a slow SPM, for tests and drills).
    pub fn set_delay(&mut self, delay: Duration) {
        self.delay = delay;
    }

    /// One full poll: reads every host's requests, extends, replies. Returns the requests handled.
    pub fn poll_once(&mut self) -> io::Result<usize> {
        let n = self.inbox.read_at(self.region.bytes(), 0)?;
        if n != SPM_REGION_LEN {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("short mailbox read ({n} bytes)")));
        }
        let scan = self.spm.scan(self.region.bytes());
        for host in &scan.bad_checksum {
            if !self.bad_hosts.contains(host) {
                tracing::warn!(host, "mailbox block with a bad checksum ignored (until it changes)");
            }
        }
        self.bad_hosts = scan.bad_checksum.clone();
        for (msg_id, e) in &scan.ignored {
            tracing::warn!(msg_id, error = %e, "mailbox message ignored");
        }
        let handled = scan.requests.len();
        if handled > 0 && !self.delay.is_zero() {
            tracing::info!(requests = handled, delay_ms = self.delay.as_millis() as u64, "answering late on purpose");
            std::thread::sleep(self.delay);
        }
        for (msg_id, req) in scan.requests {
            let started = Instant::now();
            let result = self.backend.extend(&req);
            let ok = result.is_ok();
            match &result {
                Ok(()) => tracing::info!(msg_id, volume = %req.volume, size_mib = req.size_mib, ms = started.elapsed().as_millis() as u64, "extended"),
                Err(e) => tracing::error!(msg_id, volume = %req.volume, size_mib = req.size_mib, error = %e, "extension failed"),
            }
            let (off, reply) = self.spm.reply(msg_id, &req, ok).map_err(io::Error::other)?;
            self.block.bytes().copy_from_slice(&reply);
            self.outbox.write_all_at(self.block.bytes(), off)?;
        }
        if scan.rewrite_all {
            self.region.bytes().copy_from_slice(self.spm.reply_region());
            self.outbox.write_all_at(self.region.bytes(), 0)?;
        }
        Ok(handled)
    }

    /// Whether the doorbell rang since the last check.
    pub fn doorbell(&mut self) -> io::Result<bool> {
        self.inbox.read_at(self.block.bytes(), 0)?;
        let nonce = event_nonce(self.block.bytes());
        let rang = nonce.is_some() && nonce != self.last_event;
        if rang {
            self.last_event = nonce;
        }
        Ok(rang)
    }

    /// Serves until `stop` is set.
    pub fn run(&mut self, stop: &AtomicBool) {
        let mut next_poll = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            let rang = self.doorbell().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "reading the doorbell failed");
                false
            });
            if rang || Instant::now() >= next_poll {
                if let Err(e) = self.poll_once() {
                    tracing::warn!(error = %e, "mailbox poll failed");
                }
                next_poll = Instant::now() + MONITOR_INTERVAL;
            }
            std::thread::sleep(EVENT_INTERVAL);
        }
    }
}

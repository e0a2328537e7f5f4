//! The HSM side of the mailbox (spec §1.10, §1.11): slots, the three-step handshake,
//! duplicate folding, the queue beyond 63 outstanding requests, the start-up baseline.
//! IO goes through [`MailboxIo`]; timing and threads belong to the caller.

use std::collections::VecDeque;
use std::io;

use super::wire::{event_block, put_slot, seal, slot, Extend, WireError, BLOCK_LEN, CLEAN, HEADER_LEN, MESSAGE_LEN, SLOTS};

/// The mailbox volumes as one host's client sees them. Several processes (one per disk)
/// share the host's blocks: request-block updates happen between [`MailboxIo::lock`] and
/// [`MailboxIo::unlock`] (a per-host lock file in production).
pub trait MailboxIo {
    /// Reads this host's block of the SPM's outbox (where replies arrive).
    fn read_replies(&mut self) -> io::Result<[u8; BLOCK_LEN]>;
    /// Reads this host's block of the SPM's inbox (requests of every process of the host).
    fn read_requests(&mut self) -> io::Result<[u8; BLOCK_LEN]>;
    /// Writes this host's block of the SPM's inbox.
    fn write_requests(&mut self, block: &[u8; BLOCK_LEN]) -> io::Result<()>;
    /// Writes the doorbell block (offset 0 of the SPM's inbox).
    fn write_event(&mut self, block: &[u8; BLOCK_LEN]) -> io::Result<()>;
    /// Takes the host-wide lock for a read-modify-write of the request block.
    fn lock(&mut self) -> io::Result<()>;
    /// Releases it.
    fn unlock(&mut self);
}

/// What became of a submitted request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submitted {
    /// Queued (it goes into a slot at the next poll).
    Queued,
    /// An identical message is already outstanding: folded into it.
    Folded,
}

/// A reply the SPM sent for one of our requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The request as sent.
    pub request: Extend,
    /// The size in the reply (MiB; 0 = the SPM reports failure). Not to be trusted either
    /// way: the volume's real size decides.
    pub reply_mib: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Free,
    /// Request written; waiting for the reply.
    Waiting([u8; MESSAGE_LEN], Extend),
    /// We wrote the clean marker; waiting for the SPM to mirror it.
    Acked,
}

/// One process's mailbox client (the process serves one volume; other processes of the
/// same host may hold other slots of the same block).
pub struct Client {
    volume: super::wire::Uuid,
    slots: [Slot; SLOTS],
    queue: VecDeque<Extend>,
    last_replies: [u8; BLOCK_LEN],
    started: bool,
    /// When our block was last written (a request reached the inbox).
    last_write: Option<std::time::Instant>,
    /// Where fresh doorbell nonces come from.
    nonce: Box<dyn FnMut() -> [u8; 16] + Send>,
}

impl Client {
    /// A client for `volume`; `nonce` yields the random 16 bytes of each doorbell.
    pub fn new(volume: super::wire::Uuid, nonce: Box<dyn FnMut() -> [u8; 16] + Send>) -> Client {
        Client {
            volume,
            slots: [Slot::Free; SLOTS],
            queue: VecDeque::new(),
            last_replies: [0; BLOCK_LEN],
            started: false,
            last_write: None,
            nonce,
        }
    }

    /// Start-up (spec §1.11): the current replies become the baseline, so stale replies of an
    /// earlier run are not acted upon; requests for our volume left by an earlier run of
    /// this process are cleared (never another process's). Retry on error.
    pub fn start(&mut self, io: &mut dyn MailboxIo) -> io::Result<()> {
        self.last_replies = io.read_replies()?;
        io.lock()?;
        let result = (|| -> io::Result<()> {
            let mut block = io.read_requests()?;
            let mut changed = false;
            for i in 0..SLOTS {
                let Some(m) = slot(&block, i) else { continue };
                if m[0] != 0 && Extend::decode(&m).map(|e| e.volume == self.volume).unwrap_or(false) {
                    put_slot(&mut block, i, &[0; MESSAGE_LEN]).map_err(io::Error::other)?;
                    changed = true;
                }
            }
            if changed {
                seal(&mut block);
                io.write_requests(&block)?;
            }
            Ok(())
        })();
        io.unlock();
        result?;
        self.started = true;
        Ok(())
    }

    /// Whether [`Client::start`] succeeded.
    pub fn started(&self) -> bool {
        self.started
    }

    /// Submits an extend request.
    pub fn submit(&mut self, req: Extend) -> Result<Submitted, WireError> {
        let msg = req.encode()?;
        let outstanding = self.slots.iter().any(|s| matches!(s, Slot::Waiting(m, _) if *m == msg));
        if outstanding || self.queue.contains(&req) {
            return Ok(Submitted::Folded);
        }
        self.queue.push_back(req);
        Ok(Submitted::Queued)
    }

    /// Slots in use (waiting for a reply or for the SPM's clean marker).
    pub fn active(&self) -> usize {
        self.slots.iter().filter(|s| **s != Slot::Free).count()
    }

    /// Requests waiting for a free slot.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// One poll (spec §1.11 steps 2–4): read replies and run the handshake on our slots,
    /// place queued requests, and update our slots of the shared block (read-modify-write
    /// under the host lock) and ring the doorbell if anything changed.
    pub fn poll(&mut self, io: &mut dyn MailboxIo) -> io::Result<Vec<Completion>> {
        if !self.started {
            self.start(io)?;
        }
        let mut done = Vec::new();
        // Our slot changes: (slot, new content).
        let mut writes: Vec<(usize, [u8; MESSAGE_LEN])> = Vec::new();
        if self.active() > 0 {
            let replies = io.read_replies()?;
            for i in 0..SLOTS {
                let (Some(now), Some(before)) = (slot(&replies, i), slot(&self.last_replies, i)) else { continue };
                match self.slots[i] {
                    Slot::Waiting(msg, req) if now[0] != 0 && now != before && now != CLEAN => {
                        // Step 3: a reply. Ack it whatever it says; complete only if it matches.
                        if now[..HEADER_LEN] == msg[..HEADER_LEN] {
                            let reply_mib = Extend::decode(&now).map(|r| r.size_mib).unwrap_or(0);
                            done.push(Completion { request: req, reply_mib });
                        } else {
                            tracing::error!(slot = i, "mailbox reply does not match its request; dropped");
                        }
                        writes.push((i, CLEAN));
                        self.slots[i] = Slot::Acked;
                    }
                    Slot::Acked if now == CLEAN => {
                        // Step 5: the SPM saw our ack; the slot is free again.
                        writes.push((i, [0; MESSAGE_LEN]));
                        self.slots[i] = Slot::Free;
                    }
                    _ => {}
                }
            }
            self.last_replies = replies;
        }
        if writes.is_empty() && self.queue.is_empty() {
            return Ok(done);
        }
        self.write_and_ring(io, &writes)?;
        Ok(done)
    }

    /// Places queued requests in free slots now, without reading replies (the urgent path:
    /// one read and one write of our block under the lock, then the doorbell). Returns
    /// whether our block was written.
    pub fn place(&mut self, io: &mut dyn MailboxIo) -> io::Result<bool> {
        if !self.started {
            self.start(io)?;
        }
        if self.queue.is_empty() {
            return Ok(false);
        }
        self.write_and_ring(io, &[])
    }

    /// When our block was last written.
    pub fn last_write(&self) -> Option<std::time::Instant> {
        self.last_write
    }

    fn write_and_ring(&mut self, io: &mut dyn MailboxIo, writes: &[(usize, [u8; MESSAGE_LEN])]) -> io::Result<bool> {
        io.lock()?;
        let result = self.update_block(io, writes);
        io.unlock();
        let written = result?;
        if written {
            self.last_write = Some(std::time::Instant::now());
            if let Err(e) = io.write_event(&event_block((self.nonce)())) {
                // Only a wake-up: the SPM finds the request at its next poll anyway.
                tracing::warn!(error = %e, "mailbox doorbell write failed");
            }
        }
        Ok(written)
    }

    /// Under the host lock: applies our slot writes and places queued requests in slots no
    /// process uses. Returns whether the block was written.
    fn update_block(&mut self, io: &mut dyn MailboxIo, writes: &[(usize, [u8; MESSAGE_LEN])]) -> io::Result<bool> {
        let mut block = io.read_requests()?;
        let mut changed = false;
        for (i, m) in writes {
            put_slot(&mut block, *i, m).map_err(io::Error::other)?;
            changed = true;
        }
        while !self.queue.is_empty() {
            let Some(i) = self.free_slot(&block) else { break };
            let Some(req) = self.queue.pop_front() else { break };
            let Ok(msg) = req.encode() else { continue };
            put_slot(&mut block, i, &msg).map_err(io::Error::other)?;
            self.slots[i] = Slot::Waiting(msg, req);
            changed = true;
        }
        if changed {
            seal(&mut block);
            io.write_requests(&block)?;
        }
        Ok(changed)
    }

    /// The lowest slot free in the shared block and ours to take. Slots whose reply side still
    /// holds an old reply are avoided: a new reply identical to it (the same request again,
    /// e.g. after a restart) could never be told apart from it.
    fn free_slot(&self, block: &[u8; BLOCK_LEN]) -> Option<usize> {
        let free = |i: &usize| self.slots[*i] == Slot::Free && slot(block, *i).map(|m| m == [0; MESSAGE_LEN]).unwrap_or(false);
        let reply_idle = |i: &usize| slot(&self.last_replies, *i).map(|r| r[0] == 0 || r == CLEAN).unwrap_or(true);
        (0..SLOTS).filter(free).find(reply_idle).or_else(|| (0..SLOTS).find(free))
    }

    /// Stop: our slots cleared (spec §1.11 zeroes the block; other processes' slots stay).
    pub fn stop(&mut self, io: &mut dyn MailboxIo) -> io::Result<()> {
        let writes: Vec<(usize, [u8; MESSAGE_LEN])> =
            (0..SLOTS).filter(|&i| self.slots[i] != Slot::Free).map(|i| (i, [0; MESSAGE_LEN])).collect();
        self.slots = [Slot::Free; SLOTS];
        self.queue.clear();
        io.lock()?;
        let r = self.update_block(io, &writes);
        io.unlock();
        r.map(|_| ())
    }
}

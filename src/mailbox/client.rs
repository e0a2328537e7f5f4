//! The HSM side of the mailbox (spec §1.10, §1.11): slots, the three-step handshake,
//! duplicate folding, the queue beyond 63 outstanding requests, the start-up baseline.
//! IO goes through [`MailboxIo`]; timing and threads belong to the caller.

use std::collections::VecDeque;
use std::io;

use super::wire::{event_block, put_slot, seal, slot, Extend, WireError, BLOCK_LEN, CLEAN, HEADER_LEN, MESSAGE_LEN, SLOTS};

/// The mailbox volumes as one host's client sees them.
pub trait MailboxIo {
    /// Reads this host's block of the SPM's outbox (where replies arrive).
    fn read_replies(&mut self) -> io::Result<[u8; BLOCK_LEN]>;
    /// Writes this host's block of the SPM's inbox (where requests go).
    fn write_requests(&mut self, block: &[u8; BLOCK_LEN]) -> io::Result<()>;
    /// Writes the doorbell block (offset 0 of the SPM's inbox).
    fn write_event(&mut self, block: &[u8; BLOCK_LEN]) -> io::Result<()>;
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

/// One host's mailbox client.
pub struct Client {
    slots: [Slot; SLOTS],
    queue: VecDeque<Extend>,
    requests: [u8; BLOCK_LEN],
    last_replies: [u8; BLOCK_LEN],
    started: bool,
    /// Where fresh doorbell nonces come from.
    nonce: Box<dyn FnMut() -> [u8; 16] + Send>,
}

impl Client {
    /// A client; `nonce` yields the random 16 bytes of each doorbell.
    pub fn new(nonce: Box<dyn FnMut() -> [u8; 16] + Send>) -> Client {
        Client {
            slots: [Slot::Free; SLOTS],
            queue: VecDeque::new(),
            requests: [0; BLOCK_LEN],
            last_replies: [0; BLOCK_LEN],
            started: false,
            nonce,
        }
    }

    /// Start-up (spec §1.11): the current replies become the baseline, so stale replies of an
    /// earlier run are not acted upon; our request block is zeroed. Retry on error.
    pub fn start(&mut self, io: &mut dyn MailboxIo) -> io::Result<()> {
        self.last_replies = io.read_replies()?;
        self.requests = [0; BLOCK_LEN];
        io.write_requests(&self.requests)?;
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

    /// One poll (spec §1.11 steps 2–4): place queued requests, read replies, run the
    /// handshake, and write our block (and ring the doorbell) if anything changed.
    pub fn poll(&mut self, io: &mut dyn MailboxIo) -> io::Result<Vec<Completion>> {
        if !self.started {
            self.start(io)?;
        }
        let mut changed = self.place_queued();
        let replies = if self.active() > 0 { Some(io.read_replies()?) } else { None };
        let mut done = Vec::new();
        if let Some(replies) = replies {
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
                        put_slot(&mut self.requests, i, &CLEAN).map_err(io::Error::other)?;
                        self.slots[i] = Slot::Acked;
                        changed = true;
                    }
                    Slot::Acked if now == CLEAN => {
                        // Step 5: the SPM saw our ack; the slot is free again.
                        put_slot(&mut self.requests, i, &[0; MESSAGE_LEN]).map_err(io::Error::other)?;
                        self.slots[i] = Slot::Free;
                        changed = true;
                    }
                    _ => {}
                }
            }
            self.last_replies = replies;
        }
        if self.place_queued() {
            changed = true;
        }
        if changed {
            seal(&mut self.requests);
            io.write_requests(&self.requests)?;
            let nonce = (self.nonce)();
            if let Err(e) = io.write_event(&event_block(nonce)) {
                // Only a wake-up: the SPM finds the request at its next poll anyway.
                tracing::warn!(error = %e, "mailbox doorbell write failed");
            }
        }
        Ok(done)
    }

    /// Moves queued requests into the lowest free slots; true if any moved. Slots whose
    /// reply side still holds an old reply are avoided: a new reply identical to it (same
    /// request again, e.g. after a restart) would never be seen as a change.
    fn place_queued(&mut self) -> bool {
        let mut moved = false;
        while !self.queue.is_empty() {
            let reply_idle = |i: usize| {
                slot(&self.last_replies, i).map(|r| r[0] == 0 || r == CLEAN).unwrap_or(true)
            };
            let free = |i: &usize| self.slots[*i] == Slot::Free;
            let Some(i) = (0..SLOTS).filter(free).find(|&i| reply_idle(i)).or_else(|| (0..SLOTS).find(free)) else {
                break;
            };
            let Some(req) = self.queue.pop_front() else { break };
            let Ok(msg) = req.encode() else { continue };
            if put_slot(&mut self.requests, i, &msg).is_ok() {
                self.slots[i] = Slot::Waiting(msg, req);
                moved = true;
            }
        }
        moved
    }

    /// Stop: an all-zero request block (spec §1.11).
    pub fn stop(&mut self, io: &mut dyn MailboxIo) -> io::Result<()> {
        self.requests = [0; BLOCK_LEN];
        self.slots = [Slot::Free; SLOTS];
        io.write_requests(&self.requests)
    }
}

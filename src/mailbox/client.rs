//! The HSM side of the mailbox (spec §1.10, §1.11): slots, the three-step handshake,
//! duplicate folding, the queue beyond 63 outstanding requests, the start-up baseline, and
//! the reclaim of stale slots of this host's block (docs/mailbox.md, "Stale slots").
//! IO goes through [`MailboxIo`]; timing and threads belong to the caller.
//!
//! Every update of the shared block is one transaction under the host lock: read the block,
//! plan our changes on a copy, write it, and only then record the new slot states. A failed
//! write changes nothing: a request stays queued, a reply stays unacknowledged (and is seen
//! again at the next poll), a marker stays to be freed.

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use super::wire::{event_block, put_slot, seal, slot, Extend, Uuid, WireError, BLOCK_LEN, CLEAN, HEADER_LEN, MESSAGE_LEN, SLOTS};

/// An all-zero (free) slot.
const EMPTY: [u8; MESSAGE_LEN] = [0; MESSAGE_LEN];

/// A request of ours (or a marker we left) outstanding this long has timed out: a reclaim
/// pass runs, and runs again at most this often while one stays outstanding. Five times
/// vdsm's `extend_timeout`, above the 2.2–6.2 s extensions take on real systems.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// While a queued request finds no free slot, a reclaim pass runs at most this often (the
/// SPM's poll interval).
pub const RECLAIM_BLOCKED_INTERVAL: Duration = Duration::from_secs(2);
/// A clean marker the SPM has not mirrored after this long (30 of its polls) is stale.
pub const CLEAN_STALE_AFTER: Duration = Duration::from_secs(60);

/// Whether the process serving a volume on this host is alive, as its volume lock says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// Its lock is held: a live process serves the volume.
    Alive,
    /// Its lock exists and nobody holds it: the process is gone.
    Gone,
    /// No lock to ask (never reclaimed).
    Unknown,
}

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
    /// Marks `volume` as served by this process for as long as it lives (a per-volume lock
    /// other processes of the host can probe); fails while another live process holds it.
    fn claim(&mut self, _volume: Uuid) -> io::Result<()> {
        Ok(())
    }
    /// Whether a live process of this host serves `volume` (asked under the host lock).
    fn owner(&mut self, _volume: Uuid) -> Owner {
        Owner::Unknown
    }
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

/// What the client has counted since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Writes of the host block that failed (each attempt counts).
    pub write_errors: u64,
    /// Stale slots of the host block freed (markers and requests of gone processes).
    pub reclaimed: u64,
    /// Requests of ours found erased from their slot and sent again.
    pub resent: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Free,
    /// Our request is on storage (since `since`); waiting for the reply.
    Waiting { msg: [u8; MESSAGE_LEN], req: Extend, since: Instant },
    /// Our clean marker is on storage; waiting for the SPM to mirror it.
    Acked { since: Instant },
}

/// A change poll wants to make to one of our slots.
#[derive(Clone, Copy, Debug)]
enum Intent {
    /// A reply arrived: acknowledge it (and complete the request if it matches).
    Ack([u8; MESSAGE_LEN]),
    /// The SPM mirrored our marker: free the slot.
    Free,
}

/// One process's mailbox client (the process serves one volume; other processes of the
/// same host may hold other slots of the same block).
pub struct Client {
    volume: Uuid,
    slots: [Slot; SLOTS],
    /// Requests not yet on storage, with their encoded messages.
    queue: VecDeque<(Extend, [u8; MESSAGE_LEN])>,
    last_replies: [u8; BLOCK_LEN],
    started: bool,
    /// When our block was last written (a request reached the inbox).
    last_write: Option<Instant>,
    /// Where fresh doorbell nonces come from.
    nonce: Box<dyn FnMut() -> [u8; 16] + Send>,
    /// The clock of timeouts and stale-slot ages (tests move it).
    clock: Box<dyn Fn() -> Instant + Send>,
    /// Each slot's content as last read, and since when it has held it.
    seen: [Option<([u8; MESSAGE_LEN], Instant)>; SLOTS],
    /// Slots whose content we could not attribute were logged (until it changes).
    noted: [bool; SLOTS],
    /// The last update found no free slot for a queued request.
    blocked: bool,
    /// When the last reclaim pass ran.
    last_reclaim: Option<Instant>,
    /// Block writes failed in a row (0: the last one worked).
    failing: u64,
    stats: ClientStats,
}

/// What one update of the host block does, decided before it is written.
struct Plan {
    /// New states of our slots, recorded once the block is written.
    commits: Vec<(usize, Slot)>,
    /// Queued requests placed (in queue order): slot and message.
    placed: Vec<(usize, [u8; MESSAGE_LEN], Extend)>,
    /// Stale slots freed, and why.
    reclaimed: Vec<(usize, String)>,
    done: Vec<Completion>,
    /// Slots whose reply did not match the request.
    mismatched: Vec<usize>,
    /// Requests of ours overwritten before they were answered: queued again.
    resend: Vec<(Extend, [u8; MESSAGE_LEN])>,
}

impl Client {
    /// A client for `volume`; `nonce` yields the random 16 bytes of each doorbell.
    pub fn new(volume: Uuid, nonce: Box<dyn FnMut() -> [u8; 16] + Send>) -> Client {
        Client {
            volume,
            slots: [Slot::Free; SLOTS],
            queue: VecDeque::new(),
            last_replies: [0; BLOCK_LEN],
            started: false,
            last_write: None,
            nonce,
            clock: Box::new(Instant::now),
            seen: [None; SLOTS],
            noted: [false; SLOTS],
            blocked: false,
            last_reclaim: None,
            failing: 0,
            stats: ClientStats::default(),
        }
    }

    /// The same client on another clock (for tests of timeouts).
    pub fn with_clock(mut self, clock: Box<dyn Fn() -> Instant + Send>) -> Client {
        self.clock = clock;
        self
    }

    /// Start-up (spec §1.11): claims our volume on this host, takes the current replies as
    /// the baseline (stale replies of an earlier run are not acted upon) and runs a reclaim
    /// pass over the host block: our own leftovers, and stale slots of processes that are
    /// gone (never the whole block, as single-process vdsm does). Retry on error.
    pub fn start(&mut self, io: &mut dyn MailboxIo) -> io::Result<()> {
        io.claim(self.volume)?;
        let replies = io.read_replies()?;
        self.last_replies = replies;
        let now = (self.clock)();
        self.update(io, &[], &replies, true, false, now)?;
        self.started = true;
        Ok(())
    }

    /// Serves `volume` from now on (a snapshot's new top): new requests are for it, and a
    /// request for it found in a slot of another process's is an earlier run's. Requests
    /// for the earlier volume still in our slots wait for their replies as before.
    pub fn set_volume(&mut self, volume: Uuid) {
        self.volume = volume;
    }

    /// Whether [`Client::start`] succeeded.
    pub fn started(&self) -> bool {
        self.started
    }

    /// Submits an extend request.
    pub fn submit(&mut self, req: Extend) -> Result<Submitted, WireError> {
        let msg = req.encode()?;
        let outstanding = self.slots.iter().any(|s| matches!(s, Slot::Waiting { msg: m, .. } if *m == msg));
        if outstanding || self.queue.iter().any(|(_, m)| *m == msg) {
            return Ok(Submitted::Folded);
        }
        self.queue.push_back((req, msg));
        Ok(Submitted::Queued)
    }

    /// Slots in use (waiting for a reply or for the SPM's clean marker).
    pub fn active(&self) -> usize {
        self.slots.iter().filter(|s| **s != Slot::Free).count()
    }

    /// Requests waiting for a free slot (or for a block write that works).
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// What the client has counted.
    pub fn stats(&self) -> ClientStats {
        self.stats
    }

    /// Whether the last write of the host block failed (it is retried at the next poll).
    pub fn writes_failing(&self) -> bool {
        self.failing > 0
    }

    /// One poll (spec §1.11 steps 2–4): read replies and run the handshake on our slots,
    /// place queued requests, reclaim stale slots when a request timed out, and update our
    /// slots of the shared block (read-modify-write under the host lock) and ring the
    /// doorbell if anything changed. On an error nothing changed: poll again.
    pub fn poll(&mut self, io: &mut dyn MailboxIo) -> io::Result<Vec<Completion>> {
        if !self.started {
            self.start(io)?;
        }
        let now = (self.clock)();
        let reclaim = self.reclaim_due(now);
        let mut intents: Vec<(usize, Intent)> = Vec::new();
        let replies = if self.active() > 0 || reclaim { io.read_replies()? } else { self.last_replies };
        for i in 0..SLOTS {
            let (Some(now_msg), Some(before)) = (slot(&replies, i), slot(&self.last_replies, i)) else { continue };
            match self.slots[i] {
                // Step 3: a reply (whatever it says).
                Slot::Waiting { .. } if now_msg[0] != 0 && now_msg != before && now_msg != CLEAN => intents.push((i, Intent::Ack(now_msg))),
                // Step 5: the SPM saw our ack.
                Slot::Acked { .. } if now_msg == CLEAN => intents.push((i, Intent::Free)),
                _ => {}
            }
        }
        if intents.is_empty() && self.queue.is_empty() && !reclaim {
            self.last_replies = replies;
            return Ok(Vec::new());
        }
        let (_, done) = self.update(io, &intents, &replies, reclaim, true, now)?;
        // Only now: a reply whose ack was not written must look new at the next poll.
        self.last_replies = replies;
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
        let now = (self.clock)();
        let replies = self.last_replies;
        self.update(io, &[], &replies, false, true, now).map(|(written, _)| written)
    }

    /// When our block was last written.
    pub fn last_write(&self) -> Option<Instant> {
        self.last_write
    }

    /// Whether a reclaim pass is due: a queued request found no free slot, or a slot of
    /// ours has been outstanding for [`REQUEST_TIMEOUT`].
    fn reclaim_due(&self, now: Instant) -> bool {
        let overdue = self.slots.iter().any(|s| match s {
            Slot::Waiting { since, .. } | Slot::Acked { since } => now.saturating_duration_since(*since) >= REQUEST_TIMEOUT,
            Slot::Free => false,
        });
        let gap = if self.blocked { RECLAIM_BLOCKED_INTERVAL } else { REQUEST_TIMEOUT };
        ((self.blocked && !self.queue.is_empty()) || overdue)
            && self.last_reclaim.map(|t| now.saturating_duration_since(t) >= gap).unwrap_or(true)
    }

    /// One transaction on the host block under the host lock (placing queued requests when
    /// `place`), then the doorbell if it was written. Returns whether it was written, and the
    /// completions it made.
    fn update(
        &mut self,
        io: &mut dyn MailboxIo,
        intents: &[(usize, Intent)],
        replies: &[u8; BLOCK_LEN],
        reclaim: bool,
        place: bool,
        now: Instant,
    ) -> io::Result<(bool, Vec<Completion>)> {
        io.lock()?;
        let result = self.update_locked(io, intents, replies, reclaim, place, now);
        io.unlock();
        let (written, done) = result?;
        if written {
            self.last_write = Some(Instant::now());
            if let Err(e) = io.write_event(&event_block((self.nonce)())) {
                // Only a wake-up: the SPM finds the request at its next poll anyway.
                tracing::warn!(error = %e, "mailbox doorbell write failed");
            }
        }
        Ok((written, done))
    }

    #[allow(clippy::too_many_arguments)]
    fn update_locked(
        &mut self,
        io: &mut dyn MailboxIo,
        intents: &[(usize, Intent)],
        replies: &[u8; BLOCK_LEN],
        reclaim: bool,
        place: bool,
        now: Instant,
    ) -> io::Result<(bool, Vec<Completion>)> {
        let block = io.read_requests()?;
        self.observe(&block, now);
        self.check_ours(&block, intents, now);
        let mut new = block;
        let mut plan = Plan { commits: Vec::new(), placed: Vec::new(), reclaimed: Vec::new(), done: Vec::new(), mismatched: Vec::new(), resend: Vec::new() };
        self.plan_intents(&block, &mut new, intents, now, &mut plan)?;
        // What the block shows, whatever becomes of the write: queued again.
        for (req, msg) in std::mem::take(&mut plan.resend) {
            tracing::warn!(size_mib = req.size_mib, "our mailbox request was overwritten before the SPM answered it (another writer of this host's block?); sending it again");
            self.stats.resent += 1;
            if !self.queue.iter().any(|(_, q)| *q == msg) {
                self.queue.push_front((req, msg));
            }
        }
        for i in 0..SLOTS {
            if self.slots[i] != Slot::Free || plan.commits.iter().any(|(j, _)| *j == i) {
                continue;
            }
            let Some(m) = slot(&new, i) else { continue };
            if m == EMPTY {
                continue;
            }
            if let Some(why) = self.stale(io, i, &m, replies, reclaim, now) {
                put_slot(&mut new, i, &EMPTY).map_err(io::Error::other)?;
                plan.reclaimed.push((i, why));
            }
        }
        // Ours to take: slots we hold nothing in, or free from this update on.
        let mut usable = [false; SLOTS];
        for (i, u) in usable.iter_mut().enumerate() {
            *u = match plan.commits.iter().rev().find(|(j, _)| *j == i) {
                Some((_, s)) => *s == Slot::Free,
                None => self.slots[i] == Slot::Free,
            };
        }
        for (req, msg) in self.queue.iter().filter(|_| place) {
            let Some(i) = self.free_slot(&new, replies, &usable) else { break };
            usable[i] = false;
            put_slot(&mut new, i, msg).map_err(io::Error::other)?;
            plan.placed.push((i, *msg, *req));
        }
        let written = new != block;
        if written {
            seal(&mut new);
            if let Err(e) = io.write_requests(&new) {
                self.write_failed(&e);
                return Err(e);
            }
            self.write_worked();
        }
        Ok((written, self.commit(plan, reclaim, place, now)))
    }

    /// Records what the written block now holds.
    fn commit(&mut self, plan: Plan, reclaim: bool, place: bool, now: Instant) -> Vec<Completion> {
        for (i, s) in plan.commits {
            self.slots[i] = s;
        }
        for i in plan.mismatched {
            tracing::error!(slot = i, "mailbox reply does not match its request; dropped");
        }
        for (i, msg, req) in plan.placed {
            self.slots[i] = Slot::Waiting { msg, req, since: now };
            self.queue.pop_front();
        }

        for (i, why) in plan.reclaimed {
            tracing::info!(slot = i, held = %why, "stale mailbox slot of this host reclaimed");
            self.stats.reclaimed += 1;
            self.seen[i] = Some((EMPTY, now));
        }
        if place {
            self.blocked = !self.queue.is_empty();
        }
        if reclaim {
            self.last_reclaim = Some(now);
        }
        plan.done
    }

    /// Keeps each slot's content and since when it has held it.
    fn observe(&mut self, block: &[u8; BLOCK_LEN], now: Instant) {
        for i in 0..SLOTS {
            let Some(m) = slot(block, i) else { continue };
            if self.seen[i].map(|(c, _)| c != m).unwrap_or(true) {
                self.seen[i] = Some((m, now));
                self.noted[i] = false;
            }
        }
    }

    /// Our slots as the block shows them (those with an intent are settled by it): a
    /// request no longer in its slot (another writer erased it) goes back to the queue; a
    /// marker no longer in its slot (reclaimed after the SPM mirrored it) frees the slot.
    fn check_ours(&mut self, block: &[u8; BLOCK_LEN], intents: &[(usize, Intent)], now: Instant) {
        for i in 0..SLOTS {
            if intents.iter().any(|(j, _)| *j == i) {
                continue;
            }
            let Some(m) = slot(block, i) else { continue };
            match self.slots[i] {
                Slot::Waiting { msg, req, .. } if m != msg => {
                    tracing::warn!(slot = i, size_mib = req.size_mib, "our mailbox request is no longer in its slot (another writer of this host's block?); sending it again");
                    self.stats.resent += 1;
                    if !self.queue.iter().any(|(_, q)| *q == msg) {
                        self.queue.push_front((req, msg));
                    }
                    // A marker there is our own ack, written although its write reported an error.
                    self.slots[i] = if m == CLEAN { Slot::Acked { since: now } } else { Slot::Free };
                }
                Slot::Acked { .. } if m != CLEAN => self.slots[i] = Slot::Free,
                _ => {}
            }
        }
    }

    /// Applies poll's intents to the copy, touching only slots that still hold what we left.
    fn plan_intents(&self, block: &[u8; BLOCK_LEN], new: &mut [u8; BLOCK_LEN], intents: &[(usize, Intent)], now: Instant, plan: &mut Plan) -> io::Result<()> {
        for &(i, intent) in intents {
            let Some(m) = slot(block, i) else { continue };
            match (self.slots[i], intent) {
                (Slot::Waiting { msg, req, .. }, Intent::Ack(reply)) => {
                    // Ack it whatever it says; complete only if it matches.
                    let matches = reply[..HEADER_LEN] == msg[..HEADER_LEN];
                    if matches {
                        let reply_mib = Extend::decode(&reply).map(|r| r.size_mib).unwrap_or(0);
                        plan.done.push(Completion { request: req, reply_mib });
                    }
                    if m == msg {
                        put_slot(new, i, &CLEAN).map_err(io::Error::other)?;
                        plan.commits.push((i, Slot::Acked { since: now }));
                    } else if m == CLEAN {
                        plan.commits.push((i, Slot::Acked { since: now }));
                    } else {
                        // Our request was overwritten (the reply is then someone else's): the
                        // slot is not ours to ack; an unanswered request is sent again.
                        plan.commits.push((i, Slot::Free));
                        if !matches {
                            plan.resend.push((req, msg));
                        }
                        continue;
                    }
                    if !matches {
                        plan.mismatched.push(i);
                    }
                }
                (Slot::Acked { .. }, Intent::Free) => {
                    if m == CLEAN {
                        put_slot(new, i, &EMPTY).map_err(io::Error::other)?;
                    }
                    plan.commits.push((i, Slot::Free));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Why slot `i` (not ours, holding `m`) may be freed, if it may (docs/mailbox.md, "Stale
    /// slots"). Always: a request for our own volume (only this process writes those: an
    /// earlier run's, or one whose write reported an error yet landed) and bytes the SPM
    /// reads as empty. In a reclaim pass also: a request whose volume's process is provably
    /// gone, a marker the SPM has mirrored, a marker left unmirrored for [`CLEAN_STALE_AFTER`].
    fn stale(&mut self, io: &mut dyn MailboxIo, i: usize, m: &[u8; MESSAGE_LEN], replies: &[u8; BLOCK_LEN], reclaim: bool, now: Instant) -> Option<String> {
        if m[0] == 0 {
            return Some("bytes in a slot the SPM reads as empty".into());
        }
        if let Ok(e) = Extend::decode(m) {
            if e.volume == self.volume {
                return Some(format!("request of our volume for {} MiB from an earlier run or an unconfirmed write", e.size_mib));
            }
            if !reclaim {
                return None;
            }
            return match io.owner(e.volume) {
                Owner::Gone => Some(format!("request of volume {} whose process is gone", e.volume)),
                Owner::Alive => None,
                Owner::Unknown => {
                    self.note(i, "request of a volume with no owner lock on this host; left alone");
                    None
                }
            };
        }
        if *m != CLEAN {
            if reclaim {
                self.note(i, "unknown content; left alone");
            }
            return None;
        }
        if !reclaim {
            return None;
        }
        if slot(replies, i) == Some(CLEAN) {
            return Some("clean marker the SPM has mirrored".into());
        }
        let held = self.seen[i].filter(|(c, _)| c == m).map(|(_, t)| now.saturating_duration_since(t)).unwrap_or_default();
        (held >= CLEAN_STALE_AFTER).then(|| format!("clean marker left unmirrored for {} s", held.as_secs()))
    }

    fn note(&mut self, i: usize, what: &str) {
        if !self.noted[i] {
            self.noted[i] = true;
            tracing::warn!(slot = i, "mailbox slot of this host not reclaimed: {what}");
        }
    }

    fn write_failed(&mut self, e: &io::Error) {
        self.stats.write_errors += 1;
        self.failing += 1;
        if self.failing == 1 {
            tracing::warn!(error = %e, "writing this host's mailbox block failed; our slots are unchanged, retrying at each poll");
        }
    }

    fn write_worked(&mut self) {
        if self.failing > 0 {
            tracing::info!(failed = self.failing, "writing this host's mailbox block works again");
            self.failing = 0;
        }
    }

    /// The lowest slot empty in the block and `usable` by us. Slots whose reply side still
    /// holds an old reply are avoided: a new reply identical to it (the same request again,
    /// e.g. after a restart) could never be told apart from it.
    fn free_slot(&self, block: &[u8; BLOCK_LEN], replies: &[u8; BLOCK_LEN], usable: &[bool; SLOTS]) -> Option<usize> {
        let free = |i: &usize| usable[*i] && slot(block, *i) == Some(EMPTY);
        let reply_idle = |i: &usize| slot(replies, *i).map(|r| r[0] == 0 || r == CLEAN).unwrap_or(true);
        (0..SLOTS).filter(free).find(reply_idle).or_else(|| (0..SLOTS).find(free))
    }

    /// Stop: our slots cleared where they still hold what we left (spec §1.11 zeroes the
    /// block; other processes' slots stay).
    pub fn stop(&mut self, io: &mut dyn MailboxIo) -> io::Result<()> {
        io.lock()?;
        let result = (|| -> io::Result<()> {
            let mut block = io.read_requests()?;
            let mut changed = false;
            for i in 0..SLOTS {
                let mine = match self.slots[i] {
                    Slot::Waiting { msg, .. } => msg,
                    Slot::Acked { .. } => CLEAN,
                    Slot::Free => continue,
                };
                if slot(&block, i) == Some(mine) {
                    put_slot(&mut block, i, &EMPTY).map_err(io::Error::other)?;
                    changed = true;
                }
            }
            if changed {
                seal(&mut block);
                if let Err(e) = io.write_requests(&block) {
                    self.write_failed(&e);
                    return Err(e);
                }
            }
            Ok(())
        })();
        io.unlock();
        result?;
        self.slots = [Slot::Free; SLOTS];
        self.queue.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::spm::Spm;
    use crate::mailbox::wire::SPM_REGION_LEN;
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::rc::Rc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    const HOST: usize = 4;

    /// Both mailbox volumes in memory, with the faults and process liveness a test sets.
    #[derive(Default)]
    struct Boxes {
        inbox: Vec<u8>,
        outbox: Vec<u8>,
        /// The next this many request-block writes fail...
        fail_writes: u32,
        /// ...after landing on storage (an error reported for a write that reached it).
        fail_after_landing: bool,
        writes: u32,
        /// Volume locks of this host: true = held by a live process.
        owners: HashMap<Uuid, bool>,
    }

    #[derive(Clone)]
    struct MemIo(Rc<RefCell<Boxes>>);

    impl MemIo {
        fn new() -> MemIo {
            MemIo(Rc::new(RefCell::new(Boxes { inbox: vec![0; SPM_REGION_LEN], outbox: vec![0; SPM_REGION_LEN], ..Default::default() })))
        }
        fn inbox_slot(&self, i: usize) -> [u8; MESSAGE_LEN] {
            let o = HOST * BLOCK_LEN + i * MESSAGE_LEN;
            self.0.borrow().inbox[o..o + MESSAGE_LEN].try_into().unwrap()
        }
        fn set_inbox_slot(&self, i: usize, m: &[u8; MESSAGE_LEN]) {
            let o = HOST * BLOCK_LEN;
            let mut b = self.0.borrow_mut();
            b.inbox[o + i * MESSAGE_LEN..o + (i + 1) * MESSAGE_LEN].copy_from_slice(m);
            let mut block: [u8; BLOCK_LEN] = b.inbox[o..o + BLOCK_LEN].try_into().unwrap();
            seal(&mut block);
            b.inbox[o..o + BLOCK_LEN].copy_from_slice(&block);
        }
        fn set_outbox_slot(&self, i: usize, m: &[u8; MESSAGE_LEN]) {
            let o = HOST * BLOCK_LEN + i * MESSAGE_LEN;
            self.0.borrow_mut().outbox[o..o + MESSAGE_LEN].copy_from_slice(m);
        }
        /// Slots of our block holding `m`.
        fn holding(&self, m: &[u8; MESSAGE_LEN]) -> usize {
            (0..SLOTS).filter(|&i| self.inbox_slot(i) == *m).count()
        }
        fn fail_next_write(&self) {
            self.0.borrow_mut().fail_writes = 1;
        }
    }

    impl MailboxIo for MemIo {
        fn read_replies(&mut self) -> io::Result<[u8; BLOCK_LEN]> {
            Ok(self.0.borrow().outbox[HOST * BLOCK_LEN..(HOST + 1) * BLOCK_LEN].try_into().unwrap())
        }
        fn read_requests(&mut self) -> io::Result<[u8; BLOCK_LEN]> {
            Ok(self.0.borrow().inbox[HOST * BLOCK_LEN..(HOST + 1) * BLOCK_LEN].try_into().unwrap())
        }
        fn write_requests(&mut self, block: &[u8; BLOCK_LEN]) -> io::Result<()> {
            let mut b = self.0.borrow_mut();
            b.writes += 1;
            let fail = b.fail_writes > 0;
            if !fail || b.fail_after_landing {
                b.inbox[HOST * BLOCK_LEN..(HOST + 1) * BLOCK_LEN].copy_from_slice(block);
            }
            if fail {
                b.fail_writes -= 1;
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            Ok(())
        }
        fn write_event(&mut self, block: &[u8; BLOCK_LEN]) -> io::Result<()> {
            self.0.borrow_mut().inbox[..BLOCK_LEN].copy_from_slice(block);
            Ok(())
        }
        fn lock(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn unlock(&mut self) {}
        fn owner(&mut self, volume: Uuid) -> Owner {
            match self.0.borrow().owners.get(&volume) {
                Some(true) => Owner::Alive,
                Some(false) => Owner::Gone,
                None => Owner::Unknown,
            }
        }
    }

    /// One SPM poll over the in-memory volumes; returns the requests it answered.
    fn spm_poll(spm: &mut Spm, io: &MemIo) -> usize {
        let scan = spm.scan(&io.0.borrow().inbox);
        let n = scan.requests.len();
        for (id, req) in scan.requests {
            let (off, block) = spm.reply(id, &req, true).unwrap();
            io.0.borrow_mut().outbox[off as usize..off as usize + BLOCK_LEN].copy_from_slice(&block);
        }
        if scan.rewrite_all {
            let region = spm.reply_region().to_vec();
            io.0.borrow_mut().outbox.copy_from_slice(&region);
        }
        n
    }

    fn uuid(s: &str) -> Uuid {
        Uuid::parse(s).unwrap()
    }

    fn ours() -> Uuid {
        uuid("d772f1c6-3ebb-43c3-a42e-73fcd8255a5f")
    }

    fn req(volume: Uuid, mib: u64) -> Extend {
        Extend { domain: uuid("8adbc85e-e554-4ae0-b318-8a5465fe5fe1"), volume, size_mib: mib }
    }

    /// A clock the test moves by hand.
    #[derive(Clone)]
    struct Clock(Instant, Arc<AtomicU64>);

    impl Clock {
        fn new() -> Clock {
            Clock(Instant::now(), Arc::new(AtomicU64::new(0)))
        }
        fn advance(&self, d: Duration) {
            self.1.fetch_add(d.as_millis() as u64, Ordering::SeqCst);
        }
    }

    fn client_on(volume: Uuid, clock: &Clock) -> Client {
        let c = clock.clone();
        Client::new(volume, Box::new(|| [3; 16])).with_clock(Box::new(move || c.0 + Duration::from_millis(c.1.load(Ordering::SeqCst))))
    }

    /// Polls until a completion arrives, the SPM answering between polls (at most 10 rounds).
    fn complete(c: &mut Client, io: &mut MemIo, spm: &mut Spm) -> Vec<Completion> {
        for _ in 0..10 {
            spm_poll(spm, io);
            let done = c.poll(io).unwrap();
            if !done.is_empty() {
                return done;
            }
        }
        panic!("no completion after 10 polls");
    }

    #[test]
    fn a_request_whose_write_fails_is_sent_at_the_next_poll() {
        let clock = Clock::new();
        let mut io = MemIo::new();
        let mut c = client_on(ours(), &clock);
        let mut spm = Spm::new();
        c.start(&mut io).unwrap();
        let r = req(ours(), 128);
        let msg = r.encode().unwrap();
        assert_eq!(c.submit(r), Ok(Submitted::Queued));
        io.fail_next_write();
        assert!(c.place(&mut io).is_err(), "EIO reported");
        assert!(c.writes_failing());
        assert_eq!((c.active(), c.queued()), (0, 1), "still queued, no slot recorded");
        assert_eq!(io.holding(&msg), 0);
        // The re-send of the monitor folds into the queued request, not a phantom slot.
        assert_eq!(c.submit(r), Ok(Submitted::Folded));
        assert_eq!(spm_poll(&mut spm, &io), 0, "nothing reached the SPM");
        // The next poll writes it.
        assert!(c.poll(&mut io).unwrap().is_empty());
        assert_eq!(io.inbox_slot(0), msg);
        assert_eq!((c.active(), c.queued()), (1, 0));
        assert!(!c.writes_failing());
        let done = complete(&mut c, &mut io, &mut spm);
        assert_eq!(done, vec![Completion { request: r, reply_mib: 128 }]);
        assert_eq!(c.stats().write_errors, 1);
    }

    #[test]
    fn a_reply_whose_ack_fails_is_acked_again_and_completes_once() {
        let clock = Clock::new();
        let mut io = MemIo::new();
        let mut c = client_on(ours(), &clock);
        let mut spm = Spm::new();
        let r = req(ours(), 256);
        c.submit(r).unwrap();
        c.poll(&mut io).unwrap();
        assert_eq!(spm_poll(&mut spm, &io), 1);
        io.fail_next_write();
        assert!(c.poll(&mut io).is_err(), "the ack's write failed");
        assert_eq!(io.inbox_slot(0), r.encode().unwrap(), "no marker on storage");
        // Seen again at the next poll: acked and completed, once.
        assert_eq!(c.poll(&mut io).unwrap(), vec![Completion { request: r, reply_mib: 256 }]);
        assert_eq!(io.inbox_slot(0), CLEAN);
        assert!(c.poll(&mut io).unwrap().is_empty(), "no second completion");
        spm_poll(&mut spm, &io);
        assert!(c.poll(&mut io).unwrap().is_empty());
        assert_eq!(io.inbox_slot(0), EMPTY);
        assert_eq!(c.active(), 0);
    }

    #[test]
    fn a_marker_whose_free_fails_is_freed_again_and_no_slot_leaks() {
        let clock = Clock::new();
        let mut io = MemIo::new();
        let mut c = client_on(ours(), &clock);
        let mut spm = Spm::new();
        c.submit(req(ours(), 64)).unwrap();
        c.poll(&mut io).unwrap();
        complete(&mut c, &mut io, &mut spm);
        spm_poll(&mut spm, &io);
        io.fail_next_write();
        assert!(c.poll(&mut io).is_err(), "the free's write failed");
        assert_eq!(io.inbox_slot(0), CLEAN);
        assert!(c.poll(&mut io).unwrap().is_empty());
        assert_eq!(io.inbox_slot(0), EMPTY, "the marker was left on storage");
        assert_eq!(c.active(), 0);
        // All 63 slots are ours again.
        for mib in 1000..1063 {
            c.submit(req(ours(), mib)).unwrap();
        }
        c.poll(&mut io).unwrap();
        assert_eq!((c.active(), c.queued()), (63, 0));
    }

    #[test]
    fn a_write_that_fails_yet_lands_leaves_no_second_copy() {
        let clock = Clock::new();
        let mut io = MemIo::new();
        let mut c = client_on(ours(), &clock);
        let mut spm = Spm::new();
        c.start(&mut io).unwrap();
        let r = req(ours(), 512);
        c.submit(r).unwrap();
        io.0.borrow_mut().fail_after_landing = true;
        io.fail_next_write();
        assert!(c.place(&mut io).is_err());
        assert_eq!(io.holding(&r.encode().unwrap()), 1, "the write landed");
        // The next write takes the unconfirmed copy back before placing the request again.
        c.poll(&mut io).unwrap();
        assert_eq!(io.holding(&r.encode().unwrap()), 1, "one copy in the block");
        assert_eq!(c.active(), 1);
        assert_eq!(complete(&mut c, &mut io, &mut spm).len(), 1);
    }

    /// Volumes of other processes of this host.
    fn other(n: u8) -> Uuid {
        uuid(&format!("11111111-2222-3333-4444-5555555555{n:02x}"))
    }

    #[test]
    fn dead_slots_filling_the_block_are_reclaimed_at_start() {
        let clock = Clock::new();
        let mut io = MemIo::new();
        let mut spm = Spm::new();
        let dead = other(1);
        let alive = other(2);
        let unknown = other(3);
        io.0.borrow_mut().owners.insert(dead, false);
        io.0.borrow_mut().owners.insert(alive, true);
        // 63 slots taken: markers the SPM mirrored, requests of a dead process, an earlier
        // run's requests of our own volume; one live process's request; one of a volume
        // nobody registered; one marker the SPM has not mirrored (yet).
        for i in 0..SLOTS {
            let m = match i {
                0..=19 => CLEAN,
                20..=39 => req(dead, i as u64).encode().unwrap(),
                40..=59 => req(ours(), i as u64).encode().unwrap(),
                60 => req(alive, 60).encode().unwrap(),
                61 => req(unknown, 61).encode().unwrap(),
                _ => CLEAN,
            };
            io.set_inbox_slot(i, &m);
        }
        spm_poll(&mut spm, &io); // answers the requests, mirrors the markers
        io.set_outbox_slot(62, &EMPTY); // ...but not this one
        let mut c = client_on(ours(), &clock);
        c.start(&mut io).unwrap();
        assert_eq!(c.stats().reclaimed, 60);
        assert_eq!(io.inbox_slot(60), req(alive, 60).encode().unwrap(), "a live process's request was freed");
        assert_eq!(io.inbox_slot(61), req(unknown, 61).encode().unwrap(), "a request of no provable owner was freed");
        assert_eq!(io.inbox_slot(62), CLEAN, "an unmirrored marker was freed at once");
        let r = req(ours(), 2048);
        c.submit(r).unwrap();
        c.poll(&mut io).unwrap();
        assert_eq!(c.active(), 1, "no slot for the new request");
        assert_eq!(complete(&mut c, &mut io, &mut spm), vec![Completion { request: r, reply_mib: 2048 }]);
    }

    #[test]
    fn dead_slots_appearing_later_are_reclaimed_when_a_request_times_out() {
        let clock = Clock::new();
        let mut io = MemIo::new();
        let mut spm = Spm::new();
        let mut c = client_on(ours(), &clock);
        c.start(&mut io).unwrap();
        // After we started, another process filled the block and died: its requests (the
        // SPM answered them) and markers the SPM never mirrored (it was down then).
        let dead = other(9);
        for i in 0..SLOTS {
            let m = if i % 2 == 0 { req(dead, i as u64).encode().unwrap() } else { CLEAN };
            io.set_inbox_slot(i, &m);
        }
        let r = req(ours(), 300);
        c.submit(r).unwrap();
        c.poll(&mut io).unwrap();
        assert_eq!((c.active(), c.queued()), (0, 1), "no free slot");
        // Its process is still alive: nothing is reclaimed.
        io.0.borrow_mut().owners.insert(dead, true);
        clock.advance(RECLAIM_BLOCKED_INTERVAL);
        c.poll(&mut io).unwrap();
        assert_eq!((c.stats().reclaimed, c.queued()), (0, 1));
        // It dies: its requests go at the next pass; the unmirrored markers once they are old.
        io.0.borrow_mut().owners.insert(dead, false);
        clock.advance(RECLAIM_BLOCKED_INTERVAL);
        c.poll(&mut io).unwrap();
        assert_eq!(c.stats().reclaimed, 32);
        assert_eq!((c.active(), c.queued()), (1, 0), "placed in a reclaimed slot");
        assert_eq!(io.holding(&CLEAN), 31);
        clock.advance(CLEAN_STALE_AFTER);
        c.poll(&mut io).unwrap();
        assert_eq!(io.holding(&CLEAN), 0, "markers unmirrored for {CLEAN_STALE_AFTER:?} stay");
        assert_eq!(complete(&mut c, &mut io, &mut spm), vec![Completion { request: r, reply_mib: 300 }]);
    }

    #[test]
    fn a_marker_reclaimed_under_its_live_owner_is_never_freed_over_a_new_request() {
        let clock = Clock::new();
        let mut io = MemIo::new();
        let mut spm = Spm::new();
        let mut a = client_on(ours(), &clock);
        a.submit(req(ours(), 10)).unwrap();
        a.poll(&mut io).unwrap();
        complete(&mut a, &mut io, &mut spm);
        spm_poll(&mut spm, &io); // a's marker mirrored; a has not freed it yet
        // b starts meanwhile, reclaims the mirrored marker and takes the slot.
        let vol_b = other(4);
        let mut b = client_on(vol_b, &clock);
        b.start(&mut io).unwrap();
        b.submit(req(vol_b, 20)).unwrap();
        b.poll(&mut io).unwrap();
        assert_eq!(io.inbox_slot(0), req(vol_b, 20).encode().unwrap());
        // a's free must not erase b's request.
        a.poll(&mut io).unwrap();
        assert_eq!(a.active(), 0);
        assert_eq!(io.inbox_slot(0), req(vol_b, 20).encode().unwrap(), "a freed over b's request");
        assert_eq!(complete(&mut b, &mut io, &mut spm).len(), 1);
    }

    #[test]
    fn a_request_overwritten_and_answered_for_another_is_not_acked_and_is_sent_again() {
        let clock = Clock::new();
        let mut io = MemIo::new();
        let mut spm = Spm::new();
        let mut c = client_on(ours(), &clock);
        let r = req(ours(), 700);
        c.submit(r).unwrap();
        c.poll(&mut io).unwrap();
        // A vdsm on the same host id writes its own request over slot 0; the SPM answers it.
        let theirs = req(other(7), 5).encode().unwrap();
        io.set_inbox_slot(0, &theirs);
        assert_eq!(spm_poll(&mut spm, &io), 1);
        assert!(c.poll(&mut io).unwrap().is_empty(), "someone else's reply completed our request");
        assert_eq!(io.inbox_slot(0), theirs, "we acked into a slot that is not ours");
        assert_eq!(io.holding(&r.encode().unwrap()), 1, "our request was not sent again");
        assert_eq!(complete(&mut c, &mut io, &mut spm), vec![Completion { request: r, reply_mib: 700 }]);
    }

    #[test]
    fn an_erased_request_is_sent_again_when_it_times_out() {
        let clock = Clock::new();
        let mut io = MemIo::new();
        let mut spm = Spm::new();
        let mut c = client_on(ours(), &clock);
        let r = req(ours(), 4096);
        c.submit(r).unwrap();
        c.poll(&mut io).unwrap();
        // Another writer of this host's block (a vdsm sharing the host id) zeroes it.
        io.0.borrow_mut().inbox[HOST * BLOCK_LEN..(HOST + 1) * BLOCK_LEN].fill(0);
        assert_eq!(spm_poll(&mut spm, &io), 0);
        c.poll(&mut io).unwrap();
        assert_eq!(io.holding(&r.encode().unwrap()), 0, "nothing notices before the timeout");
        clock.advance(REQUEST_TIMEOUT);
        c.poll(&mut io).unwrap();
        assert_eq!(io.holding(&r.encode().unwrap()), 1, "sent again");
        assert_eq!(c.stats().resent, 1);
        assert_eq!(complete(&mut c, &mut io, &mut spm).len(), 1);
    }
}

//! Step 1, the virtqueue: a kick pops chains (in order, under back-pressure), parses each
//! into a request and starts it; FLUSHes in one batch may share one sync.

use super::*;

/// Chains started in one pass before what they queued is handed to the kernel, without
/// waiting for the end of the pass: the storage starts on the first requests of a large
/// batch while the rest are parsed, instead of receiving the whole batch at once. On this
/// machine's disk at QD32 that took 4k random reads from ~92 k to ~113–122 k IOPS and writes
/// from ~62 k to ~80–87 k (docs/benchmarks.md); every 1, 2, 4 and 8 chains measured alike,
/// and 8 costs the fewest system calls. Only the queue thread runs a pass, so it stays the submitter.
pub(super) const SUBMIT_EVERY: usize = 8;

/// Why a pop takes nothing (see [`Worker::refusal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Host ops in flight are at their cap: a completion pops again.
    Throttled,
    /// Requests a stop gave up on (this connection's or the previous one's) are still at the
    /// storage, or the gate is shut: nothing new runs before they end (their completion pops).
    Stale,
    /// The ring is not started, is disabled, or the device is stopping.
    NotServing,
    /// The frontend broke the ring: nothing is popped until it resets it.
    Broken,
    /// The per-ring budget of chains in hand is spent: a completion frees it.
    NoBudget,
}

impl Worker {
    /// Handles a kick: processes every available chain of `vring`. Runs on the queue
    /// thread only (it submits on the way: see [`SUBMIT_EVERY`]).
    pub fn on_kick(&mut self, ctx: &Context, vring: &Vring) -> io::Result<()> {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        if self.in_hand.is_stale() {
            // Requests a stop gave up on that hold no host IO (parked, waiting for a bounce
            // chunk) end here, uncompleted (the inflight region keeps them), so the fence
            // clears as soon as the storage answers what is at it.
            self.drop_parked(ctx);
            self.drop_starved();
        }
        let event_idx = ctx.event_idx.load(Ordering::Relaxed);
        let mut started = 0usize;
        loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            let stopping = ctx.stopping.load(Ordering::SeqCst);
            // The memory map is fetched per chain: the frontend may add a region (acked)
            // and use it in its next request while this loop is still running.
            while let Some((chain, mem)) = self.pop(ctx, vring, stopping) {
                if started == SUBMIT_EVERY {
                    started = 0;
                    self.submit_on_the_way();
                }
                started += 1;
                ctx.note_first_io();
                let clock = Clock { started: self.stats.as_ref().map(|_| Instant::now()), parked_since: None };
                let parsed = parse(chain, &ctx.limits());
                match (parsed.request, parsed.status) {
                    (Ok(req), Some(status))
                        if req.kind == RequestType::Flush && self.join_flush(ctx.image.metadata_epoch(), parsed.head, status) => {}
                    (Ok(req), Some(status)) => self.start(ctx, &mem, parsed.head, status, req, clock),
                    (Err(e), status) => {
                        self.rejected += 1;
                        // Rate-limited: a guest must not be able to flood the log.
                        if self.rejected <= 10 || self.rejected % 1000 == 0 {
                            let regions = if matches!(e, crate::error::RequestError::OutsideMemory { .. }) {
                                use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
                                mem.iter()
                                    .map(|r| format!("{:#x}+{:#x}", r.start_addr().0, r.len()))
                                    .collect::<Vec<_>>()
                                    .join(",")
                            } else {
                                String::new()
                            };
                            tracing::warn!(queue = self.queue, error = %e, total = self.rejected, regions, "rejected request");
                        } else {
                            tracing::debug!(queue = self.queue, error = %e, "rejected request");
                        }
                        let outcome = Outcome::Invalid(e);
                        let rec = Rec { op: StatOp::Invalid, started: clock.started, bytes: 0 };
                        self.finish_sync(vring, &mem, parsed.head, status, &[], &outcome, 0, rec);
                    }
                    (Ok(req), None) => self.finish_sync(vring, &mem, parsed.head, None, &[], &Outcome::Ok, 0, Rec::of(&req, clock)),
                }
            }
            if self.throttled() || self.held_back {
                // Chains stay in the ring; the completions that free room (host ops, or
                // budget) pop them. A broken ring pops nothing until the frontend resets it.
                break;
            }
            // Polling mode leaves kicks off while the thread polls: they are asked for again
            // only before it sleeps (`before_sleep`).
            if !event_idx || self.polling || !vring.enable_notification().unwrap_or(false) {
                break;
            }
        }
        self.flush_batch = None;
        self.unstarve(ctx);
        // Submitted by the queue thread's next wait (one system call for both), or here
        // for engines that are not waited on that way.
        if !self.ring.waitable() {
            self.ring.submit()?;
        }
        self.signal(vring);
        Ok(())
    }

    /// Hands what the chains started so far queued to the kernel while the batch goes on
    /// (see [`SUBMIT_EVERY`]). A FLUSH submitted now can no longer be joined: its sync may
    /// start before a write another queue completes next, which a later FLUSH must cover.
    /// A failed submission leaves the entries queued for the wait that ends the pass.
    fn submit_on_the_way(&mut self) {
        self.flush_batch = None;
        if let Err(e) = self.ring.submit() {
            tracing::debug!(queue = self.queue, error = %e, "submission during a batch failed; the queue thread's wait submits");
        }
    }

    /// Lets a FLUSH share the sync of one queued earlier in this batch; false if none can.
    /// `epoch` is the format's metadata epoch now: if it moved since the earlier FLUSH wrote
    /// metadata back, a write completed meanwhile (on any queue) may not be covered.
    pub(super) fn join_flush(&mut self, epoch: u64, head: u16, status: GuestAddress) -> bool {
        let Some((slot, at)) = self.flush_batch else { return false };
        if at != epoch {
            return false;
        }
        let Some(p) = self.pending.get_mut(slot) else { return false };
        if p.req.kind != RequestType::Flush {
            return false;
        }
        p.joined.push((head, status));
        tracing::trace!(queue = self.queue, joined = p.joined.len(), "FLUSH joined a queued FLUSH");
        true
    }

    /// Why a pop would take nothing now, whatever the ring holds (None: it may take a
    /// chain). The one list of questions, asked by `pop_with` and by the polling check
    /// (`chains_to_take`), in the order `pop_with` has always asked them.
    pub(super) fn refusal(&self, state: &crate::vring::VringState, stopping: bool, gate: &crate::context::Gate) -> Option<Refusal> {
        if self.throttled() {
            return Some(Refusal::Throttled);
        }
        // Read under the ring lock (see `finish_sync`).
        if self.in_hand.is_stale() || !gate.open() {
            return Some(Refusal::Stale);
        }
        if !state.get_queue().ready() || !state.is_enabled() || stopping {
            return Some(Refusal::NotServing);
        }
        if state.is_broken() {
            return Some(Refusal::Broken);
        }
        // The budget is checked before anything is taken from the ring: resubmissions after
        // a restart count against it like any pop.
        if !self.budget.room(state.get_queue().size()) {
            return Some(Refusal::NoBudget);
        }
        None
    }

    pub(super) fn pop(&mut self, ctx: &Context, vring: &Vring, stopping: bool) -> Option<(virtio_queue::DescriptorChain<Arc<Mem>>, Arc<Mem>)> {
        self.pop_with(|| ctx.memory(), vring, stopping, &ctx.gate)
    }

    /// Pops the next chain. The avail index is read first; the memory table the chain is
    /// checked against is taken only *after* it. A frontend adds a region (and waits for
    /// our acknowledgement) before publishing a chain that uses it, so once the index shows
    /// the chain, the table taken next has the region (a table taken before the index was read
    /// could be older than the chain: the rare "outside guest memory" EIO).
    pub(super) fn pop_with(
        &mut self,
        memory: impl Fn() -> Option<Arc<Mem>>,
        vring: &Vring,
        stopping: bool,
        gate: &crate::context::Gate,
    ) -> Option<(virtio_queue::DescriptorChain<Arc<Mem>>, Arc<Mem>)> {
        self.held_back = false;
        let mut state = vring.lock();
        match self.refusal(&state, stopping, gate) {
            None => {}
            Some(Refusal::Throttled | Refusal::NotServing) => return None,
            Some(Refusal::Broken) => {
                self.held_back = true;
                self.kicked_while_broken();
                return None;
            }
            Some(Refusal::Stale | Refusal::NoBudget) => {
                self.held_back = true;
                return None;
            }
        }
        let size = state.get_queue().size();
        // A recovered inflight region: what the previous daemon had taken and not completed
        // goes first, oldest first (still marked in flight in the region). A head leaves the
        // list only once its chain is in hand: a missing memory table keeps it queued.
        while let Some(head) = state.peek_resubmit() {
            if self.budget.holds(head) {
                // Only a recovery re-run on a running ring could list it (it no longer is:
                // session.rs swaps the kick of a started ring without recovering again).
                state.next_resubmit();
                tracing::error!(queue = self.queue, head, "cannot resubmit a request taken before the restart: its head is in hand already");
                continue;
            }
            let mem = memory()?;
            match chain_at(state.get_queue(), &mem, head) {
                Some((chain, mem)) => {
                    state.next_resubmit();
                    self.take(head);
                    self.final_stop = false;
                    tracing::debug!(queue = self.queue, head, "resubmitting a request taken before the restart");
                    return Some((chain, mem));
                }
                None => {
                    // Left listed and marked in the region: the guest is told the ring is
                    // broken (error eventfd) rather than left waiting for a head we dropped.
                    self.held_back = true;
                    self.ring_broken(&mut state, Misbehaviour::Unresubmittable(head));
                    return None;
                }
            }
        }
        {
            let probe = memory()?;
            let queue = state.get_queue();
            let avail = queue.avail_idx(probe.as_ref(), Ordering::Acquire).ok()?;
            if avail.0 == queue.next_avail() {
                return None;
            }
            // More heads published and not yet returned than the ring has descriptors.
            let outstanding = avail.0.wrapping_sub(queue.next_used());
            if outstanding > size {
                self.held_back = true;
                self.ring_broken(&mut state, Misbehaviour::Overrun { outstanding, size });
                return None;
            }
        }
        let mem = memory()?;
        let chain = state.get_queue_mut().pop_descriptor_chain(mem.clone())?;
        let head = chain.head_index();
        // No descriptor has an index past the ring (no chain to answer, no used entry could
        // name it), and a head in hand cannot be taken twice (no completion could be right
        // for it): either is left in the ring and breaks it.
        let wrong = if head >= size {
            Some(Misbehaviour::HeadOutOfRange { head, size })
        } else if self.budget.holds(head) {
            Some(Misbehaviour::HeadInHand(head))
        } else {
            None
        };
        if let Some(what) = wrong {
            let queue = state.get_queue_mut();
            queue.set_next_avail(queue.next_avail().wrapping_sub(1));
            self.held_back = true;
            self.ring_broken(&mut state, what);
            return None;
        }
        state.mark_taken(head);
        // Counted while the vring lock is held, so stop_vring never misses it.
        self.take(head);
        // Serving again: requests may park again.
        self.final_stop = false;
        Some((chain, mem))
    }

    pub(super) fn start(&mut self, ctx: &Context, mem: &Arc<Mem>, head: u16, status: GuestAddress, req: Request, clock: Clock) {
        let rec = Rec::of(&req, clock);
        let result = match req.kind {
            RequestType::GetId => {
                let n = (req.data_len as usize).min(ID_LEN);
                let ok = copy_to_guest(mem, &req.segments, &ctx.serial[..n]).is_ok();
                let out = if ok { Outcome::Ok } else { Outcome::HostIo(libc::EFAULT) };
                let vring = self.vring.clone();
                if let Some(v) = vring {
                    self.finish_sync(&v, mem, head, Some(status), &[], &out, n as u32, rec);
                }
                return;
            }
            _ if req.data_len == 0 && matches!(req.kind, RequestType::Read | RequestType::Write) => {
                if let Some(v) = self.vring.clone() {
                    self.finish_sync(&v, mem, head, Some(status), &[], &Outcome::Ok, 0, rec);
                }
                return;
            }
            _ if writes(req.kind) => {
                // Counted before the freeze flag is read: a freeze either sees this write
                // at the storage (and waits for it) or this check sees the freeze (and holds).
                ctx.park.write_begin();
                if ctx.park.frozen() {
                    ctx.park.write_end();
                    self.hold(ctx, mem, head, status, req, clock);
                    return;
                }
                self.submit_request(ctx, mem, head, status, req, clock)
            }
            _ => self.submit_request(ctx, mem, head, status, req, clock),
        };
        if let Err((slot, outcome)) = result {
            self.submit_failed(ctx, mem, head, status, slot, outcome, rec);
        }
    }

    /// Holds a write while the disk is frozen (parked, resumed by the thaw).
    fn hold(&mut self, ctx: &Context, mem: &Arc<Mem>, head: u16, status: GuestAddress, req: Request, clock: Clock) {
        if self.parked.is_empty() {
            tracing::info!(queue = self.queue, "disk frozen: holding writes until the thaw");
        }
        self.enter_parked(ctx, head, status, req, mem, clock, ParkCause::Frozen);
        self.publish_parked(0);
    }


    /// Completes a request whose host ops have all ended.
    /// Starts requests that waited for a bounce chunk, while chunks are available. Called
    /// from the entry points (kick, completion, resume, drain), never from inside a
    /// completion, so a chain of instant completions cannot recurse.
    pub(super) fn unstarve(&mut self, ctx: &Context) {
        while self.pool.available() {
            let Some(r) = self.starved.pop_front() else { return };
            self.start(ctx, &r.mem, r.head, r.status, r.req, r.clock);
        }
    }
}

/// The chain of descriptor `head` of `queue`, although `head` is not at the ring's next
/// available slot (resubmission after a restart). virtio-queue builds chains only from the
/// available ring, so a one-entry available ring naming `head` is placed in a private page
/// added to (a copy of) the memory map, above every region of the guest (the frontend chooses
/// where its regions lie, so no fixed address is free for certain); the descriptors themselves
/// are the guest's. Returns the chain and the memory map it reads (the guest's plus that page);
/// `None` only if the guest's memory reaches the top of the address space.
pub(super) fn chain_at(queue: &virtio_queue::Queue, mem: &Arc<Mem>, head: u16) -> Option<(virtio_queue::DescriptorChain<Arc<Mem>>, Arc<Mem>)> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};
    const PAGE: u64 = 4096;
    let top = mem.iter().map(|r| r.start_addr().0.saturating_add(r.len())).max().unwrap_or(0);
    let at = top.checked_add(PAGE - 1)? & !(PAGE - 1);
    at.checked_add(PAGE)?;
    let page = GuestRegionMmap::<crate::guest_write::LogBitmap>::from_range(GuestAddress(at), PAGE as usize, None).ok()?;
    let aug = Arc::new(mem.insert_region(Arc::new(page)).ok()?);
    aug.write_obj(1u16.to_le(), GuestAddress(at + 2)).ok()?;
    aug.write_obj(head.to_le(), GuestAddress(at + 4)).ok()?;
    let mut q = virtio_queue::Queue::new(queue.max_size()).ok()?;
    q.set_size(queue.size());
    q.try_set_desc_table_address(GuestAddress(queue.desc_table())).ok()?;
    q.try_set_avail_ring_address(GuestAddress(at)).ok()?;
    q.try_set_used_ring_address(GuestAddress(at + PAGE / 2)).ok()?;
    q.set_ready(true);
    let chain = q.pop_descriptor_chain(aug.clone())?;
    Some((chain, aug))
}

/// Requests that change the disk (what a freeze holds).
pub(super) fn writes(kind: RequestType) -> bool {
    matches!(kind, RequestType::Write | RequestType::Discard | RequestType::WriteZeroes)
}

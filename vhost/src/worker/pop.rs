//! Step 1, the virtqueue: a kick pops chains (in order, under back-pressure), parses each
//! into a request and starts it; FLUSHes in one batch may share one sync.

use super::*;

impl Worker {
    /// Handles a kick: processes every available chain of `vring`.
    pub fn on_kick(&mut self, ctx: &Context, vring: &Vring) -> io::Result<()> {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        let event_idx = ctx.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            let stopping = ctx.stopping.load(Ordering::SeqCst);
            // The memory map is fetched per chain: the frontend may add a region (acked)
            // and use it in its next request while this loop is still running.
            while let Some((chain, mem)) = self.pop(ctx, vring, stopping) {
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
                        self.finish_sync(vring, &mem, parsed.head, status, &outcome, 0, rec);
                    }
                    (Ok(req), None) => self.finish_sync(vring, &mem, parsed.head, None, &Outcome::Ok, 0, Rec::of(&req, clock)),
                }
            }
            if self.throttled() {
                // Chains stay in the ring; the completions that free room pop them.
                break;
            }
            if !event_idx || !vring.enable_notification().unwrap_or(false) {
                break;
            }
        }
        self.flush_batch = None;
        self.unstarve(ctx);
        self.ring.submit()?;
        self.signal(vring);
        Ok(())
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

    pub(super) fn pop(&mut self, ctx: &Context, vring: &Vring, stopping: bool) -> Option<(virtio_queue::DescriptorChain<Arc<Mem>>, Arc<Mem>)> {
        self.pop_with(|| ctx.memory(), vring, stopping)
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
    ) -> Option<(virtio_queue::DescriptorChain<Arc<Mem>>, Arc<Mem>)> {
        if self.throttled() {
            return None;
        }
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() || stopping {
            return None;
        }
        let queue = state.get_queue_mut();
        {
            let probe = memory()?;
            let avail = queue.avail_idx(probe.as_ref(), Ordering::Acquire).ok()?;
            if avail.0 == queue.next_avail() {
                return None;
            }
        }
        let mem = memory()?;
        let chain = queue.pop_descriptor_chain(mem.clone())?;
        // Counted while the vring lock is held, so stop_vring never misses it.
        self.inflight.add();
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
                    self.finish_sync(&v, mem, head, Some(status), &out, n as u32, rec);
                }
                return;
            }
            _ if req.data_len == 0 && matches!(req.kind, RequestType::Read | RequestType::Write) => {
                if let Some(v) = self.vring.clone() {
                    self.finish_sync(&v, mem, head, Some(status), &Outcome::Ok, 0, rec);
                }
                return;
            }
            _ => self.submit_request(ctx, mem, head, status, req, clock),
        };
        if let Err((slot, outcome)) = result {
            self.submit_failed(ctx, mem, head, status, slot, outcome, rec);
        }
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

//! Step 5, completion: write-back of what the request linked, the status byte, the used
//! ring and the notification.

use super::*;

impl Worker {
    pub(super) fn complete(&mut self, ctx: &Context, slot: usize, publish: bool) {
        let Some(mut p) = self.pending.remove(slot) else { return };
        // The chunk goes back to the pool (its data, if any, was handed over already).
        p.staged = None;
        let mut errno = p.errno;
        for ticket in p.tickets.drain(..) {
            if let Err(e) = ctx.image.write_done(ticket, errno.is_none()) {
                tracing::error!(queue = self.queue, error = %e, "metadata update after write failed");
                errno.get_or_insert(libc::EIO);
            }
        }
        // Only once its tickets are back: a freeze that sees no write at the storage then
        // finds every write linked in the metadata (and, under an active commit, marked).
        if super::pop::writes(p.req.kind) {
            ctx.park.write_end();
        }
        match errno {
            None => ctx.park.on_success(),
            // A fenced request is never parked again: it ends, so the fence can clear.
            Some(e) if publish && !self.in_hand.is_stale() => match self.fate(ctx, &p.req, &Outcome::HostIo(e)) {
                Fate::Park(cause) => {
                    self.park(ctx, p, cause);
                    return;
                }
                Fate::Ignore => errno = None,
                Fate::Report => {}
            },
            // The frontend is gone: nothing to decide, the request is dropped below.
            Some(_) => {}
        }
        if errno.is_none()
            && matches!(p.req.kind, RequestType::Write | RequestType::Discard | RequestType::WriteZeroes)
            && !ctx.writeback.load(Ordering::Relaxed)
        {
            // Write-through: the metadata that makes this write reachable is durable too.
            if let Err(e) = ctx.image.prepare_flush() {
                tracing::error!(queue = self.queue, error = %e, "write-through metadata flush failed");
                errno = Some(libc::EIO);
            }
        }
        let outcome = match errno {
            None => Outcome::Ok,
            Some(e) => {
                tracing::warn!(queue = self.queue, kind = ?p.req.kind, offset = p.req.offset, errno = e, "request failed");
                Outcome::HostIo(e)
            }
        };
        let data = if p.req.kind == RequestType::Read && errno.is_none() { p.req.data_len as u32 } else { 0 };
        let vring = if publish { self.vring.clone() } else { None };
        let rec = Rec::of(&p.req, p.clock);
        let mut filled = filled(&p.req);
        for (head, status) in std::iter::once((p.head, p.status)).chain(p.joined.iter().copied()) {
            match &vring {
                Some(v) => self.finish_sync(v, &p.mem, head, Some(status), std::mem::take(&mut filled), &outcome, data, rec),
                None => {
                    self.flush_batch = None;
                    self.release(head);
                }
            }
        }
    }

    /// Writes the status byte, returns the chain to the guest and counts the request.
    /// `filled`: the request's device-writable buffers that were handed out as raw pointers
    /// (a read's data, see [`filled`]); they are marked in the dirty log before the used
    /// element is published (`crate::guest_write`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish_sync(
        &mut self,
        vring: &Vring,
        mem: &Arc<Mem>,
        head: u16,
        status: Option<GuestAddress>,
        filled: &[Segment],
        outcome: &Outcome,
        data_len: u32,
        rec: Rec,
    ) {
        // The fence is read under the ring lock, which GET_VRING_BASE takes after fencing:
        // a completion either is published before the stop answers, or sees the fence.
        let mut ring = vring.lock();
        if self.in_hand.is_stale() {
            // A stop answered without this request: its ring may be another ring now.
            // Nothing of it reaches guest memory; the frontend resubmits it (inflight
            // region) once every stale request has ended.
            drop(ring);
            tracing::debug!(queue = self.queue, head, "a request the stop gave up on ended: released without a completion");
            self.release(head);
            return;
        }
        // Whatever the outcome: a failed read may have filled part of its buffers. (Writes
        // through `mem` below, the status byte and the used ring, mark the log themselves.)
        mark_filled(mem, filled);
        let mut used = 0;
        if let Some(addr) = status {
            if mem.write_obj(virtio_status(outcome), addr).is_ok() {
                used = data_len.saturating_add(1);
            }
        }
        // Counted before the guest can see it (a fenced request, above, is not a completion):
        // a frontend that saw the used element, then scrapes, finds it counted.
        if let (Some(s), Some(t)) = (&self.stats, rec.started) {
            s.record(rec.op, t, rec.bytes, error_class(outcome));
        }
        let published = ring.add_used(head, used);
        drop(ring);
        if let Err(e) = published {
            tracing::error!(queue = self.queue, error = ?e, "could not add to the used ring");
        }
        // A completion the guest can see: a later FLUSH may have to cover it.
        self.flush_batch = None;
        self.needs_signal = true;
        self.release(head);
    }

    pub(super) fn signal(&mut self, vring: &Vring) {
        if !self.needs_signal {
            return;
        }
        self.needs_signal = false;
        if vring.needs_notification().unwrap_or(true) {
            if let Err(e) = vring.signal_used_queue() {
                tracing::debug!(queue = self.queue, error = %e, "could not signal the guest");
            }
        }
    }
}

/// The buffers of `req` the device may have filled through raw pointers (io_uring reads,
/// inline copies): a read's data segments; nothing for other requests (GET_ID is copied
/// through guest memory's own writes, which mark the log themselves).
pub(super) fn filled(req: &Request) -> &[Segment] {
    if req.kind == RequestType::Read {
        &req.segments
    } else {
        &[]
    }
}

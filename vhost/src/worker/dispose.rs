//! Step 4, disposal: the one place a failed request's fate is decided (report, ignore, or
//! park) from its outcome and the error policy.

use super::*;

/// What becomes of a failed request.
pub(super) enum Fate {
    /// Completed with its error status.
    Report,
    /// Completed as success (policy `ignore`).
    Ignore,
    /// Held until resumed.
    Park(ParkCause),
}

impl Worker {
    /// A request could not be submitted (whole or in part): park it, or complete it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn submit_failed(&mut self, ctx: &Context, mem: &Arc<Mem>, head: u16, status: GuestAddress, slot: Option<usize>, outcome: Outcome, rec: Rec) {
        let Some(slot) = slot else {
            if let Some(v) = self.vring.clone() {
                // Nothing was submitted (no slot): no buffer was filled.
                self.finish_sync(&v, mem, head, Some(status), &[], &outcome, 0, rec);
            }
            return;
        };
        if let Some(p) = self.pending.get_mut(slot) {
            if p.ops > 0 {
                // Some ops are queued: the request completes (through the policy) with them.
                let errno = match &outcome {
                    Outcome::HostIo(e) => *e,
                    Outcome::Image(ImageError::Io(e)) => e.raw_os_error().unwrap_or(libc::EIO),
                    _ => libc::EIO,
                };
                p.errno.get_or_insert(errno);
                return;
            }
        }
        let Some(mut p) = self.pending.remove(slot) else { return };
        // Its tickets go back first: a hold that sees no write at the storage finds none out.
        self.release_tickets(ctx, &mut p);
        if super::pop::writes(p.req.kind) {
            ctx.park.write_end();
        }
        match self.fate(ctx, &p.req, &outcome) {
            Fate::Park(cause) => self.park(ctx, p, cause),
            Fate::Ignore => {
                self.release_tickets(ctx, &mut p);
                if let Some(v) = self.vring.clone() {
                    self.finish_sync(&v, mem, head, Some(status), super::complete::filled(&p.req), &Outcome::Ok, 0, rec);
                }
            }
            Fate::Report => {
                self.release_tickets(ctx, &mut p);
                if let Some(v) = self.vring.clone() {
                    self.finish_sync(&v, mem, head, Some(status), super::complete::filled(&p.req), &outcome, 0, rec);
                }
            }
        }
    }

    /// The one decision for a failed request: report it, complete it as if it succeeded
    /// (policy `ignore`, logged), or park it until the hub resumes the worker.
    pub(super) fn fate(&self, ctx: &Context, req: &Request, outcome: &Outcome) -> Fate {
        let op = if req.kind == RequestType::Read { FaultOp::Read } else { FaultOp::Write };
        let errno = match outcome {
            // The allocator refused: only a thin volume (a listener) can cure that.
            Outcome::Image(ImageError::NoSpace { needed, limit }) => {
                return if ctx.park.enabled() {
                    Fate::Park(ParkCause::VolumeFull { needed: *needed, limit: *limit })
                } else {
                    Fate::Report
                };
            }
            // EFAULT is the guest's memory, not the storage: never retried.
            Outcome::HostIo(e) if *e == libc::EFAULT => return Fate::Report,
            Outcome::HostIo(e) => *e,
            // Metadata IO of the format failed (e.g. an L2 table read): a storage fault.
            Outcome::Image(ImageError::Io(e)) => e.raw_os_error().unwrap_or(libc::EIO),
            // Refused, or sent to an image that is not active here (a migration's destination
            // before it takes over, a source after): nothing to retry.
            Outcome::Ok
            | Outcome::Invalid(_)
            | Outcome::Image(ImageError::Refused(_) | ImageError::Inactive | ImageError::Lock { .. } | ImageError::Qcow2 { .. }) => {
                return Fate::Report
            }
        };
        match ctx.park.on_error(op, errno) {
            // Held until resumed (retry timer, `cont`, or the thin volume grown). Any new
            // clusters are released first: the retry maps the request afresh.
            FaultAction::Park => Fate::Park(ParkCause::Failed { op, errno }),
            FaultAction::Ignore => {
                tracing::error!(queue = self.queue, kind = ?req.kind, offset = req.offset, errno,
                    "request FAILED and the error policy is ignore: completed as success, data lost");
                Fate::Ignore
            }
            FaultAction::Report => Fate::Report,
        }
    }

    /// Tells the format that a request's allocations will not be written.
    pub(super) fn release_tickets(&self, ctx: &Context, p: &mut Pending) {
        for ticket in p.tickets.drain(..) {
            if let Err(e) = ctx.image.write_done(ticket, false) {
                tracing::error!(queue = self.queue, error = %e, "releasing an allocation failed");
            }
        }
    }
}

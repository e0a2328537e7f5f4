//! Requests that wait: parked until the hub resumes the worker (a full thin volume, a
//! failure under a retrying policy), reported after a stop's grace.

use super::*;

impl Worker {
    /// Holds a request (and FLUSHes joined to it) until the hub resumes this worker; after
    /// the stop grace ([`Worker::final_stop`]), reports it with an IO error instead.
    pub(super) fn park(&mut self, ctx: &Context, mut p: Pending, cause: ParkCause) {
        self.release_tickets(ctx, &mut p);
        if self.final_stop {
            tracing::error!(queue = self.queue, ?cause, kind = ?p.req.kind, offset = p.req.offset,
                "queue stopping: request reported with an IO error instead of parked again");
            let rec = Rec::of(&p.req, p.clock);
            let heads: Vec<_> = std::iter::once((p.head, p.status)).chain(p.joined.drain(..)).collect();
            match self.vring.clone() {
                Some(v) => {
                    let mut filled = super::complete::filled(&p.req);
                    for (head, status) in heads {
                        self.finish_sync(&v, &p.mem, head, Some(status), std::mem::take(&mut filled), &Outcome::HostIo(libc::EIO), 0, rec);
                    }
                    self.signal(&v);
                }
                None => heads.into_iter().for_each(|(head, _)| self.release(head)),
            }
            return;
        }
        if self.parked.is_empty() {
            tracing::info!(queue = self.queue, ?cause, kind = ?p.req.kind, offset = p.req.offset, "parking IO until resumed");
        }
        let flush = Request { kind: RequestType::Flush, offset: 0, segments: Vec::new(), data_len: 0, ranges: Vec::new() };
        for (head, status) in p.joined.drain(..) {
            self.enter_parked(ctx, head, status, flush.clone(), &p.mem, p.clock, cause);
        }
        self.enter_parked(ctx, p.head, p.status, p.req, &p.mem, p.clock, cause);
        self.publish_parked(0);
    }

    /// Puts one request in the parked list (its first stint starts the parked clock) and
    /// tells the hub why.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn enter_parked(&mut self, ctx: &Context, head: u16, status: GuestAddress, req: Request, mem: &Arc<Mem>, clock: Clock, cause: ParkCause) {
        let entered = self.stats.as_ref().map(|_| Instant::now());
        let mut clock = clock;
        if clock.parked_since.is_none() {
            clock.parked_since = entered;
        }
        self.parked.push_back(Parked { head, status, req, mem: mem.clone(), clock, entered });
        ctx.park.on_park(self.queue, cause);
    }

    /// Updates the parked gauges after requests whose stints add up to `stints_ns` left.
    pub(super) fn publish_parked(&self, stints_ns: u64) {
        if let Some(s) = &self.stats {
            let oldest = self.parked.iter().filter_map(|r| r.clock.parked_since).min();
            s.set_parked(self.parked.len(), stints_ns, oldest);
        }
    }

    /// Takes every parked request out of the list, accounting for the time they spent in it.
    pub(super) fn take_parked(&mut self) -> std::collections::VecDeque<Parked> {
        let parked = std::mem::take(&mut self.parked);
        if self.stats.is_some() {
            let now = Instant::now();
            let ns: u128 = parked.iter().filter_map(|r| r.entered).map(|t| now.saturating_duration_since(t).as_nanos()).sum();
            self.publish_parked(u64::try_from(ns).unwrap_or(u64::MAX));
        }
        parked
    }

    /// The hub says the cause may have cleared: retries every parked request (each may park
    /// again).
    pub fn on_resume(&mut self, ctx: &Context) -> io::Result<()> {
        if self.parked.is_empty() {
            return Ok(());
        }
        let parked = self.take_parked();
        ctx.park.on_unpark(parked.len());
        tracing::info!(queue = self.queue, requests = parked.len(), "retrying parked IO");
        for r in parked {
            self.start(ctx, &r.mem, r.head, r.status, r.req, r.clock);
        }
        match self.vring.clone() {
            // Requests that completed at once returned their budget: pop what waits behind
            // them (the kick also starts starved requests, submits and signals).
            Some(v) => self.on_kick(ctx, &v),
            None => {
                self.unstarve(ctx);
                self.ring.submit()
            }
        }
    }

    /// Requests parked on this queue.
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// Completes every parked request with an IO error (the frontend stops the queue, or the
    /// daemon stops, and the cause did not clear in time), and reports rather than parks
    /// whatever fails from now until the queue serves again. Nothing is completed as success.
    pub fn fail_parked(&mut self, ctx: &Context) {
        self.final_stop = true;
        let n = self.parked.len();
        if n == 0 {
            return;
        }
        tracing::error!(queue = self.queue, requests = n, "parked IO completed with an IO error: the queue or the daemon is stopping");
        let parked = self.take_parked();
        ctx.park.on_unpark(n);
        if let Some(v) = self.vring.clone() {
            for r in parked {
                let rec = Rec::of(&r.req, r.clock);
                self.finish_sync(&v, &r.mem, r.head, Some(r.status), super::complete::filled(&r.req), &Outcome::HostIo(libc::EIO), 0, rec);
            }
            self.signal(&v);
        } else {
            for r in parked {
                self.release(r.head);
            }
        }
    }

    /// Forgets parked requests without completing them (the frontend is gone, or the daemon
    /// stops): none was acknowledged, so nothing acknowledged is lost.
    pub fn drop_parked(&mut self, ctx: &Context) {
        let n = self.parked.len();
        if n > 0 {
            tracing::warn!(queue = self.queue, requests = n, "parked IO dropped uncompleted (never acknowledged to the guest)");
            for r in self.take_parked() {
                self.release(r.head);
            }
            ctx.park.on_unpark(n);
        }
    }
}

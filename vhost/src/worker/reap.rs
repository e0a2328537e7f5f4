//! Step 3, reaping: engine completions are matched to their ops; short transfers and
//! unsupported zeroing are continued; a request whose ops have all ended goes on to
//! completion.

use super::*;

impl Worker {
    /// Handles what the ring has after a wait: completes every request whose host IO
    /// ended, with one notification for the batch, and says whether the queue thread's event
    /// set became ready. What this queues is submitted by the thread's next wait.
    pub fn on_completion(&mut self, ctx: &Context) -> io::Result<bool> {
        self.reap(ctx, true)?;
        self.unstarve(ctx);
        if let Some(v) = self.vring.clone() {
            self.signal(&v);
        }
        Ok(self.ring.events_fired())
    }

    /// Waits for every in-flight host op; `publish` says whether to complete requests to
    /// the guest (false after a disconnect: the frontend re-submits what it saw unfinished).
    ///
    /// Waits at most until `deadline`: storage that does not answer leaves ops in flight
    /// (`Ok(false)`); such a worker, once dropped, leaks their buffers rather than free memory
    /// the kernel may still write.
    pub fn drain(&mut self, ctx: &Context, publish: bool, deadline: Instant) -> io::Result<bool> {
        loop {
            if publish {
                self.unstarve(ctx);
            }
            if self.ops.len() == 0 {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.ring.submit_and_wait_one_for(left)? {
                tracing::error!(queue = self.queue, ops = self.ops.len(), "storage does not answer: host IO still in flight after the drain limit");
                return Ok(false);
            }
            self.reap(ctx, publish)?;
        }
        if !publish {
            self.drop_parked(ctx);
            self.drop_starved();
        }
        if publish {
            if let Some(v) = self.vring.clone() {
                self.signal(&v);
            }
        }
        Ok(true)
    }

    pub(super) fn reap(&mut self, ctx: &Context, publish: bool) -> io::Result<()> {
        while let Some((id, res)) = self.ring.pop() {
            let Some(mut op) = self.ops.remove(id as usize) else { continue };
            let slot = op.slot;
            let outcome = self.op_result(&mut op, res);
            match outcome {
                OpResult::Resubmit => {
                    // The ended op is replaced by its continuation before it is counted off,
                    // so the request cannot complete in between.
                    if let Err(e) = self.queue_op(slot, op) {
                        self.op_failed(slot, e.raw_os_error().unwrap_or(libc::EIO));
                    }
                    self.op_finished(ctx, slot, publish);
                }
                OpResult::Done => self.op_finished(ctx, slot, publish),
                OpResult::Failed(errno) => {
                    self.op_failed(slot, errno);
                    self.op_finished(ctx, slot, publish);
                }
                OpResult::FallbackWriteZeroes { offset, len } => {
                    let r = self.queue_zero_writes(slot, op.file, offset, len);
                    if let Err(e) = r {
                        self.op_failed(slot, e.raw_os_error().unwrap_or(libc::EIO));
                    }
                    self.op_finished(ctx, slot, publish);
                }
            }
        }
        Ok(())
    }

    /// Decides what a completion means for its op (advancing it on a short transfer).
    pub(super) fn op_result(&mut self, op: &mut Op, res: i32) -> OpResult {
        if res == -libc::EINTR || res == -libc::EAGAIN {
            return OpResult::Resubmit;
        }
        match op.kind {
            OpKind::Read | OpKind::Write { .. } => {
                if res < 0 {
                    return OpResult::Failed(-res);
                }
                let want: usize = op.iov.iter().map(|v| v.iov_len).sum();
                let got = res as usize;
                if got >= want {
                    return OpResult::Done;
                }
                if got == 0 {
                    // A write that stops at the volume's end ran out of space; a read that
                    // does means the image is shorter than its declared capacity.
                    let errno = if matches!(op.kind, OpKind::Write { .. }) { libc::ENOSPC } else { libc::EIO };
                    return OpResult::Failed(errno);
                }
                advance_iovecs(&mut op.iov, got);
                op.offset += got as u64;
                OpResult::Resubmit
            }
            OpKind::Sync => if res < 0 { OpResult::Failed(-res) } else { OpResult::Done },
            OpKind::Zero { mode, len } => {
                if res >= 0 {
                    return OpResult::Done;
                }
                let unsupported = res == -libc::EOPNOTSUPP || res == -libc::EINVAL || res == -libc::ENODEV;
                match (unsupported, mode) {
                    // Deallocation is not possible here: zero in place instead.
                    (true, ZeroMode::PunchHole) => {
                        op.kind = OpKind::Zero { mode: ZeroMode::ZeroRange, len };
                        OpResult::Resubmit
                    }
                    (true, ZeroMode::ZeroRange | ZeroMode::WriteZeroes) => {
                        OpResult::FallbackWriteZeroes { offset: op.offset, len }
                    }
                    _ => OpResult::Failed(-res),
                }
            }
        }
    }

    pub(super) fn op_failed(&mut self, slot: usize, errno: i32) {
        if let Some(p) = self.pending.get_mut(slot) {
            p.errno.get_or_insert(errno);
        }
    }

    pub(super) fn op_finished(&mut self, ctx: &Context, slot: usize, publish: bool) {
        let (done, staged) = match self.pending.get_mut(slot) {
            Some(p) => {
                p.ops = p.ops.saturating_sub(1);
                (p.ops == 0, p.staged.is_some() && p.errno.is_none())
            }
            None => (false, false),
        };
        if done && staged {
            // A staged request moves on to its next chunk, if it has one.
            if let Err(e) = self.next_chunk(slot) {
                self.op_failed(slot, e.raw_os_error().unwrap_or(libc::EIO));
            }
            if self.pending.get_mut(slot).map(|p| p.ops > 0).unwrap_or(false) {
                return;
            }
        }
        if done {
            self.complete(ctx, slot, publish);
        }
    }

    /// Drops the requests waiting for a bounce chunk, uncompleted (they hold no host IO).
    pub(super) fn drop_starved(&mut self) {
        let n = self.starved.len();
        if n > 0 {
            tracing::warn!(queue = self.queue, requests = n, "IO waiting for a bounce buffer dropped uncompleted (never acknowledged to the guest)");
            for r in std::mem::take(&mut self.starved) {
                self.release(r.head);
            }
        }
    }
}

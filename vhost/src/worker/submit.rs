//! Step 2, submission: the image format maps the request to host extents, which become
//! engine ops over guest memory (or a bounce chunk, one chunk of the request at a time).

use super::*;

impl Worker {
    /// Builds and queues the host ops of a request.
    pub(super) fn submit_request(
        &mut self,
        ctx: &Context,
        mem: &Arc<Mem>,
        head: u16,
        status: GuestAddress,
        req: Request,
        clock: Clock,
    ) -> Result<(), (Option<usize>, Outcome)> {
        let image = &ctx.image;
        let align = image.io_alignment().max(1) as usize;
        if matches!(req.kind, RequestType::Read | RequestType::Write)
            // (The pool first: while it has a chunk, nothing walks the segments twice.)
            && !self.pool.available()
            && needs_bounce(mem, &req.segments, align)
        {
            // Waits for a chunk; completions that return one start it (and count it again).
            if super::pop::writes(req.kind) {
                ctx.park.write_end();
            }
            self.starved.push_back(Starved { head, status, req, mem: mem.clone(), clock });
            return Ok(());
        }
        let ranges = if matches!(req.kind, RequestType::Discard | RequestType::WriteZeroes) { req.ranges.clone() } else { Vec::new() };
        let (kind, offset, data_len) = (req.kind, req.offset, req.data_len);
        let slot = self.pending.insert(Pending {
            head,
            status,
            req,
            ops: 0,
            errno: None,
            staged: None,
            mem: mem.clone(),
            tickets: Vec::new(),
            joined: Vec::new(),
            clock,
        });
        let fail = |slot: usize, e: ImageError| (Some(slot), Outcome::Image(e));
        match kind {
            RequestType::Read | RequestType::Write => {
                let write = kind == RequestType::Write;
                self.extents.clear();
                let mut extents = std::mem::take(&mut self.extents);
                let mapped = if write {
                    image.map_write(offset, data_len, &mut extents).map(Some)
                } else {
                    image.map_read(offset, data_len, &mut extents).map(|_| None)
                };
                match mapped {
                    Err(e) => {
                        self.extents = extents;
                        return Err(fail(slot, e));
                    }
                    Ok(Some(ticket)) => {
                        if let Some(p) = self.pending.get_mut(slot) {
                            p.tickets.push(ticket);
                        }
                    }
                    Ok(None) => {}
                }
                let r = self.queue_rw(ctx, mem, slot, write, &extents, align);
                self.extents = extents;
                r.map_err(|e| (Some(slot), Outcome::HostIo(e.raw_os_error().unwrap_or(libc::EIO))))?;
            }
            RequestType::Flush => {
                // The epoch is read before the write-back: a change racing with it makes a
                // later FLUSH write back again rather than join.
                let epoch = image.metadata_epoch();
                image.prepare_flush().map_err(|e| fail(slot, e))?;
                self.flush_batch = Some((slot, epoch));
                for file in image.sync_files() {
                    self.queue_op(slot, Op { slot, kind: OpKind::Sync, file, offset: 0, iov: Vec::new() })
                        .map_err(|e| (Some(slot), Outcome::HostIo(e.raw_os_error().unwrap_or(libc::EIO))))?;
                }
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                let mut zeros = std::mem::take(&mut self.zeros);
                zeros.clear();
                for r in &ranges {
                    let zr = if kind == RequestType::Discard {
                        ZeroRequest::Discard
                    } else {
                        ZeroRequest::WriteZeroes { may_unmap: r.unmap }
                    };
                    match image.map_zero(r.offset, r.len, zr, &mut zeros) {
                        Err(e) => {
                            self.zeros = zeros;
                            return Err(fail(slot, e));
                        }
                        Ok(ticket) => {
                            if let Some(p) = self.pending.get_mut(slot) {
                                p.tickets.push(ticket);
                            }
                        }
                    }
                }
                for z in &zeros {
                    if z.mode == ZeroMode::WriteZeroes {
                        if let Err(e) = self.queue_zero_writes(slot, z.file, z.offset, z.len) {
                            self.zeros = zeros;
                            return Err((Some(slot), Outcome::HostIo(e.raw_os_error().unwrap_or(libc::EIO))));
                        }
                        continue;
                    }
                    let op = Op { slot, kind: OpKind::Zero { mode: z.mode, len: z.len }, file: z.file, offset: z.offset, iov: Vec::new() };
                    if let Err(e) = self.queue_op(slot, op) {
                        self.zeros = zeros;
                        return Err((Some(slot), Outcome::HostIo(e.raw_os_error().unwrap_or(libc::EIO))));
                    }
                }
                self.zeros = zeros;
            }
            RequestType::GetId => {}
        }
        if self.pending.get_mut(slot).map(|p| p.ops == 0).unwrap_or(false) {
            // Nothing to do on the host (e.g. a read of an unallocated range).
            self.complete(ctx, slot, true);
        }
        Ok(())
    }

    pub(super) fn queue_rw(
        &mut self,
        ctx: &Context,
        mem: &Arc<Mem>,
        slot: usize,
        write: bool,
        extents: &[Extent],
        align: usize,
    ) -> io::Result<()> {
        let Some(p) = self.pending.get_mut(slot) else { return Err(io::Error::from_raw_os_error(libc::EIO)) };
        let iovs = host_iovecs(mem, &p.req.segments)?;
        let dsync = write && !ctx.writeback.load(Ordering::Relaxed);
        if !aligned_for(&iovs, align) {
            let chunk = self.pool.take()?.ok_or_else(|| io::Error::from_raw_os_error(libc::ENOBUFS))?;
            p.staged = Some(Staged { chunk, extents: extents.to_vec(), write, dsync, pos: 0, len: 0 });
            return self.next_chunk(slot);
        }
        let dsync = write && !ctx.writeback.load(Ordering::Relaxed);
        for ext in extents {
            let sub = sub_iovecs(&iovs, ext.req_off, ext.len);
            match &ext.target {
                Target::Host { file, offset } => {
                    let kind = if write { OpKind::Write { dsync } } else { OpKind::Read };
                    // A request over many memory regions may exceed what one op can carry.
                    let mut at = *offset;
                    for part in sub.chunks(IOV_MAX) {
                        let bytes: u64 = part.iter().map(|v| v.iov_len as u64).sum();
                        self.queue_op(slot, Op { slot, kind, file: *file, offset: at, iov: part.to_vec() })?;
                        at += bytes;
                    }
                }
                Target::Bytes { data, offset } if !write => {
                    let mut src = data.get(*offset..).unwrap_or(&[]);
                    for v in &sub {
                        let n = v.iov_len.min(src.len());
                        // SAFETY: the iovec covers guest memory (or the bounce buffer) lent to
                        // us for writing, kept mapped through `mem`; `src` has at least n bytes.
                        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), v.iov_base.cast::<u8>(), n) };
                        src = &src[n..];
                    }
                }
                Target::Zero if !write => {
                    for v in &sub {
                        // SAFETY: each iovec covers guest memory (or the bounce buffer) that
                        // the request lent us for writing and that stays mapped through `mem`.
                        unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
                    }
                }
                Target::Zero | Target::Bytes { .. } => return Err(io::Error::from_raw_os_error(libc::EIO)),
            }
        }
        Ok(())
    }

    /// Moves a staged request on by one chunk: hands the finished chunk of a read to the
    /// guest, fills the next one (from the guest for a write, from zero or inline extents for
    /// a read) and queues its host ops. Returns with no op queued when the request is done.
    pub(super) fn next_chunk(&mut self, slot: usize) -> io::Result<()> {
        loop {
            let Some(p) = self.pending.get_mut(slot) else { return Err(io::Error::from_raw_os_error(libc::EIO)) };
            let Some(mut st) = p.staged.take() else { return Ok(()) };
            let r = stage_next(p, &mut st);
            let base = st.chunk.ptr();
            let (write, dsync, pos, len) = (st.write, st.dsync, st.pos, st.len);
            let mut ops = Vec::new();
            if r.is_ok() && len > 0 {
                for ext in &st.extents {
                    let s = ext.req_off.max(pos);
                    let e = (ext.req_off + ext.len).min(pos + len);
                    if s >= e {
                        continue;
                    }
                    let within = (s - pos) as usize;
                    let n = (e - s) as usize;
                    match &ext.target {
                        Target::Host { file, offset } => {
                            let kind = if write { OpKind::Write { dsync } } else { OpKind::Read };
                            // SAFETY: within + n <= len <= CHUNK: inside the chunk.
                            let at = unsafe { base.add(within) };
                            let iov = vec![libc::iovec { iov_base: at.cast(), iov_len: n }];
                            ops.push(Op { slot, kind, file: *file, offset: offset + (s - ext.req_off), iov });
                        }
                        Target::Bytes { data, offset } if !write => {
                            let from = offset + (s - ext.req_off) as usize;
                            let dst = &mut st.chunk.as_mut_slice()[within..within + n];
                            let src = data.get(from..).unwrap_or(&[]);
                            let k = src.len().min(n);
                            dst[..k].copy_from_slice(&src[..k]);
                            dst[k..].fill(0);
                        }
                        Target::Zero if !write => st.chunk.as_mut_slice()[within..within + n].fill(0),
                        Target::Zero | Target::Bytes { .. } => return Err(io::Error::from_raw_os_error(libc::EIO)),
                    }
                }
            }
            if let Some(p) = self.pending.get_mut(slot) {
                p.staged = Some(st);
            }
            r?;
            if len == 0 {
                return Ok(());
            }
            let issued = !ops.is_empty();
            for op in ops {
                self.queue_op(slot, op)?;
            }
            if issued {
                return Ok(());
            }
        }
    }

    pub(super) fn queue_op(&mut self, slot: usize, op: Op) -> io::Result<()> {
        let host = match op.kind {
            OpKind::Read => HostOp::Readv { file: op.file, iov: op.iov.as_ptr(), iov_len: op.iov.len() as u32, offset: op.offset },
            OpKind::Write { dsync } => HostOp::Writev {
                file: op.file,
                iov: op.iov.as_ptr(),
                iov_len: op.iov.len() as u32,
                offset: op.offset,
                dsync,
            },
            OpKind::Sync => HostOp::Fdatasync { file: op.file },
            OpKind::Zero { mode, len } => {
                let m = match mode {
                    ZeroMode::PunchHole => libc::FALLOC_FL_PUNCH_HOLE,
                    ZeroMode::ZeroRange | ZeroMode::WriteZeroes => libc::FALLOC_FL_ZERO_RANGE,
                };
                HostOp::Fallocate { file: op.file, offset: op.offset, len, mode: m | libc::FALLOC_FL_KEEP_SIZE }
            }
        };
        let id = self.ops.insert(op);
        // SAFETY: the iovec array lives in `self.ops[id]` (heap storage that does not move) and
        // points into guest memory kept mapped by the request's `Pending::mem`, or into its
        // bounce buffer; both live until this op's completion is reaped.
        unsafe { self.ring.push(host, id as u64) };
        if let Some(p) = self.pending.get_mut(slot) {
            p.ops += 1;
        }
        Ok(())
    }

    /// Zeroes a host range by writing a zero buffer, for storage with no zeroing primitive.
    pub(super) fn queue_zero_writes(&mut self, slot: usize, file: u32, offset: u64, len: u64) -> io::Result<()> {
        if self.zero.is_none() {
            self.zero = Some(AlignedBuf::zeroed(ZERO_CHUNK, 4096)?);
        }
        let base = self.zero.as_ref().map(|z| z.ptr()).unwrap_or(std::ptr::null_mut());
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK as u64) as usize;
            let iov = vec![libc::iovec { iov_base: base.cast(), iov_len: n }];
            self.queue_op(slot, Op { slot, kind: OpKind::Write { dsync: false }, file, offset: offset + done, iov })?;
            done += n as u64;
        }
        Ok(())
    }
}

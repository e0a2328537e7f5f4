//! Write mapping: choosing the host cluster of a write, the pending/fill protocol, and linking
//! clusters once their data landed (`write_done`).

use super::*;

impl Qcow2 {
    pub(super) fn writable(&self) -> Result<()> {
        match &self.read_only {
            Some(r) => Err(Qcow2Error::ReadOnly(r.clone())),
            None => Ok(()),
        }
    }

    /// Maps a guest write of `len` bytes at `offset` to host ranges, allocating clusters that
    /// cannot be written in place. Returns the guest clusters whose allocation this write
    /// joined: pass them to [`Qcow2::write_done`] once the data has landed (or failed).
    pub fn map_write(&self, offset: u64, len: u64, out: &mut Vec<MappedRange>) -> Result<Vec<u64>> {
        let mut ticket = Vec::new();
        if !self.begin_update(offset, len)? {
            return Ok(ticket);
        }
        let start = out.len();
        match self.map_write_pieces(offset, len, out, &mut ticket) {
            Ok(()) => Ok(ticket),
            Err(e) => {
                // Clusters this request allocated before the failure go back (unlinked).
                out.truncate(start);
                self.write_done(&ticket, false)?;
                Err(e)
            }
        }
    }

    fn map_write_pieces(&self, offset: u64, len: u64, out: &mut Vec<MappedRange>, ticket: &mut Vec<u64>) -> Result<()> {
        let cs = self.cluster_size;
        let last_ci = (offset + len - 1) / cs;
        for Piece { pos, ci, in_off, n } in pieces(offset, len, cs) {
            let (host, pending) = loop {
                let (target, hint) = {
                    let mut m = self.meta.write().map_err(|_| poisoned())?;
                    let t = self.cluster_for_write(&mut m, ci, in_off, n, last_ci - ci + 1)?;
                    self.publish_allocation(m.next_free);
                    (t, m.allocate_hint.take())
                };
                if let Some((off, len)) = hint {
                    // Only a hint (the space reads zeroes either way): outside the lock, where
                    // a file system that waits for direct IO in flight stalls this writer only.
                    let _ = self.storage.allocate(off, len);
                }
                match target {
                    WriteTarget::Ready(host, pending) => break (host, pending),
                    WriteTarget::Wait => self.wait_for_fill(),
                    WriteTarget::Fill { host, raw, fresh } => {
                        // The IO runs with no lock held; joiners wait on `filling`.
                        let filled = self.fill_cluster(raw, ci, host, in_off, n, fresh);
                        let mut m = self.meta.write().map_err(|_| poisoned())?;
                        if let Err(e) = filled {
                            // Nobody else can have joined: drop the allocation (a cluster
                            // written in place stays with its zero-flagged entry).
                            if let Some(p) = m.pending.remove(&ci) {
                                if !p.in_place {
                                    self.release(&mut m, host)?;
                                }
                            }
                            drop(m);
                            self.signal_fill();
                            return Err(e);
                        }
                        if let Some(p) = m.pending.get_mut(&ci) {
                            p.filling = false;
                        }
                        drop(m);
                        self.signal_fill();
                        break (host, true);
                    }
                }
            };
            if pending {
                ticket.push(ci);
            }
            push_merged(out, MappedRange { guest: pos, len: n, mapping: Mapping::Data(host + in_off) });
            // A request spanning many tables must not pile them up beyond the cache size.
            self.relieve()?;
        }
        Ok(())
    }

    /// Checks a write-like request and caches its L2 tables; false if there is nothing to do.
    pub(super) fn begin_update(&self, offset: u64, len: u64) -> Result<bool> {
        self.writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(false);
        }
        // Metadata owed a write-back (dirty over the bounds, releases piling up while
        // write-backs fail) is written before anything new is allocated: a failure here
        // fails the request before it changed anything, and the error policy parks it.
        self.relieve()?;
        // A sealed journal may lack the link this write depends on (an in-place write into
        // a cluster linked since the seal): the image gets it first. (`write_done` looks
        // again, for a seal between this and the write's completion.)
        self.write_through_if_gated()?;
        self.preload_l2(offset, len, true)?;
        Ok(true)
    }

    fn wait_for_fill(&self) {
        let (mx, cv) = &self.fill_done;
        if let Ok(g) = mx.lock() {
            // Bounded: a fill that ends between our check and this wait is caught on retry.
            let _ = cv.wait_timeout(g, std::time::Duration::from_millis(1));
        }
    }

    fn signal_fill(&self) {
        let (mx, cv) = &self.fill_done;
        let _g = mx.lock();
        cv.notify_all();
    }

    /// What a write to guest cluster `ci` must do: write in place, join a pending
    /// allocation, wait for one being filled, or fill a fresh one.
    /// `remaining` counts the guest clusters of the request from `ci` on: the first
    /// allocation checks there is room for all of them, so a request is refused whole.
    fn cluster_for_write(&self, m: &mut Meta, ci: u64, in_off: u64, n: u64, remaining: u64) -> Result<WriteTarget> {
        if let Some(p) = m.pending.get_mut(&ci) {
            if p.filling {
                return Ok(WriteTarget::Wait);
            }
            p.writers += 1;
            return Ok(WriteTarget::Ready(p.host, true));
        }
        let raw = self.l2_entry_locked(m, ci)?;
        let old = decode_l2(raw, self.cluster_bits);
        let partial = in_off > 0 || n < self.cluster_size;
        match old {
            L2Entry::Normal { host, copied } => {
                if copied || self.refcount(m, host)? == 1 {
                    return Ok(WriteTarget::Ready(host, false));
                }
                return Err(Qcow2Error::ReadOnly(format!(
                    "guest cluster {ci} is shared (refcount > 1); copy-on-write of shared clusters is not implemented"
                )));
            }
            // A zero-flagged entry that still owns its cluster (a discard, write-zeroes or
            // preallocation): write into that cluster, as QEMU does. No allocation and no
            // refcount change, so churn never grows the image, and no refcount ever drops
            // while an L2 entry on disk may still point at its cluster. The rest of a partial
            // write is zeroed (the cluster may hold data from before the discard).
            L2Entry::Zero { host } if host != 0 && (raw & COPIED != 0 || self.refcount(m, host)? == 1) => {
                m.pending.insert(ci, Pending { host, writers: 1, linked: false, in_place: true, filling: partial });
                return Ok(if partial { WriteTarget::Fill { host, raw, fresh: false } } else { WriteTarget::Ready(host, true) });
            }
            _ => {}
        }
        self.check_room(m, self.worst_case(m, ci, remaining))?;
        self.ensure_l2_table(m, ci)?;
        // Bytes of the new cluster the write does not cover must hold the old contents,
        // unless they are zeroes and the host is known to read zeroes there: a cluster from
        // the bump pointer past the file's size at open, or one this engine zeroed ahead of
        // the bump pointer. A reused one may hold anything.
        let zeroes_around = matches!(old, L2Entry::Zero { .. }) || (old == L2Entry::Unallocated && self.backing.is_none());
        if m.free.is_empty() {
            self.prepare_ahead(m, partial && zeroes_around);
        }
        let (host, fresh) = self.alloc_one(m)?;
        let cs = self.cluster_size;
        let zero_known = fresh
            && zeroes_around
            && (host >= self.zeroes_from || (host >= m.zeroed.0 && host.saturating_add(cs) <= m.zeroed.1));
        let filling = partial && !zero_known;
        m.pending.insert(ci, Pending { host, writers: 1, linked: false, in_place: false, filling });
        Ok(if filling { WriteTarget::Fill { host, raw, fresh } } else { WriteTarget::Ready(host, true) })
    }

    /// Prepares [`ZERO_AHEAD`] bytes at the bump pointer for the fresh cluster about to be
    /// taken there, unless that was done already:
    /// - where the host is not known to read zeroes (a block device, space a file already
    ///   had), and the write needs zeroes around it (`needs_zeroes`), zeroes them;
    /// - where it is (a file's sparse space), allocates them, so that writes land in
    ///   allocated space instead of filling holes, which the kernel does not complete
    ///   without blocking (io_uring hands them to worker threads).
    ///
    /// Only space at or past the bump pointer is zeroed, which no cluster of the image uses
    /// and which is handed out only after the zeroing completed (the metadata lock is held
    /// throughout); never past the allocation limit or the storage's size. A failed zeroing
    /// records nothing: the writer then fills its cluster itself, and reports that fill's
    /// error. The allocation is left to the writer, outside the lock: it only allocates
    /// space that reads zeroes anyway, never changing a byte, so writes landing there
    /// meanwhile are safe, and a failed one changes nothing the image relies on.
    fn prepare_ahead(&self, m: &mut Meta, needs_zeroes: bool) {
        let cs = self.cluster_size;
        let start = m.next_free;
        if start >= m.zeroed.0 && start.saturating_add(cs) <= m.zeroed.1 {
            return;
        }
        let known = start >= self.zeroes_from;
        if !known && !needs_zeroes {
            return;
        }
        let Ok(size) = self.storage.size() else { return };
        let end = start.saturating_add(ZERO_AHEAD).min(self.limit()).min(size) / cs * cs;
        // One cluster alone gains nothing over the writer's own fill (so clusters of 1 MiB
        // or more keep the per-cluster fill).
        if end < start.saturating_add(2 * cs) {
            return;
        }
        if known {
            // Past `zeroes_from` the whole range reads zeroes, allocated or not: the writer
            // allocates it after releasing the lock (`map_write_pieces`).
            m.allocate_hint = Some((start, end - start));
            m.zeroed = (start, end);
        } else if self.storage.write_zeroes(start, end - start).is_ok() {
            m.zeroed = (start, end);
        }
    }

    /// Writes the old contents of guest cluster `ci` around `[in_off, in_off+n)` into `host`
    /// (`fresh`: from the bump pointer, so zeroes past `zeroes_from` need no writing).
    fn fill_cluster(&self, raw: u64, ci: u64, host: u64, in_off: u64, n: u64, fresh: bool) -> Result<()> {
        let cs = self.cluster_size;
        let mut buf = match decode_l2(raw, self.cluster_bits) {
            L2Entry::Compressed { .. } => self.read_compressed(raw)?,
            L2Entry::Unallocated if self.backing.is_some() => {
                let mut b = vec![0u8; cs as usize];
                if let Some(bk) = &self.backing {
                    bk.read(&mut b, ci * cs)?;
                }
                b
            }
            _ => {
                // Zeroes: nothing to write where the host is known to read zeroes; elsewhere
                // the storage zeroes without moving data where it can.
                if fresh && host >= self.zeroes_from {
                    return Ok(());
                }
                if in_off > 0 {
                    self.storage.write_zeroes(host, in_off)?;
                }
                if in_off + n < cs {
                    self.storage.write_zeroes(host + in_off + n, cs - in_off - n)?;
                }
                return Ok(());
            }
        };
        let (a, b) = (in_off as usize, (in_off + n) as usize);
        if a > 0 {
            self.storage.write_at(&buf[..a], host)?;
        }
        if b < cs as usize {
            self.storage.write_at(&buf[b..], host + b as u64)?;
        }
        buf.clear();
        Ok(())
    }

    /// Guest clusters with a mapped write whose [`Qcow2::write_done`] has not come yet (a
    /// chain change waits for none: their links belong to this engine).
    pub fn pending_writes(&self) -> usize {
        self.meta.read().map(|m| m.pending.len()).unwrap_or(usize::MAX)
    }

    /// This engine, closed, as a read-only layer under a new top (a snapshot): its caches
    /// stay warm, and any write it is asked for is refused.
    pub fn sealed(mut self, reason: &str) -> Qcow2 {
        self.read_only = Some(reason.to_string());
        self
    }

    /// Reports that the data of a mapped write (its `ticket`) has landed (`ok`) or failed:
    /// new clusters are linked into their L2 tables only now.
    ///
    /// The link is recorded in the journal before this returns, so once the caller publishes
    /// the completion, a daemon crash cannot lose it (the daemon-crash contract).
    pub fn write_done(&self, ticket: &[u64], ok: bool) -> Result<()> {
        if ticket.is_empty() {
            // A write in place: the journal may have sealed between its mapping and now,
            // before recording the link it depends on.
            return self.write_through_if_gated();
        }
        {
            let mut m = self.meta.write().map_err(|_| poisoned())?;
            for &ci in ticket {
                let Some(p) = m.pending.get_mut(&ci) else { continue };
                p.writers = p.writers.saturating_sub(1);
                let link = ok && !p.linked;
                if link {
                    p.linked = true;
                }
                let (host, finished, linked, in_place) = (p.host, p.writers == 0, p.linked, p.in_place);
                if link {
                    let old = self.l2_entry_locked(&mut m, ci)?;
                    self.set_l2_entry(&mut m, ci, host | COPIED)?;
                    if let L2Entry::Compressed { host: data, len } = decode_l2(old, self.cluster_bits) {
                        // Each host cluster the compressed bytes touch loses a reference.
                        let cs = self.cluster_size;
                        let mut c = data / cs * cs;
                        while c < data + len.max(1) {
                            m.unref.push(c);
                            c += cs;
                        }
                    }
                }
                if finished {
                    m.pending.remove(&ci);
                    if !linked && !in_place {
                        // Nothing landed: the new cluster is free again (reused once that is durable).
                        self.release(&mut m, host)?;
                    }
                }
            }
        }
        self.relieve()?;
        // The journal could not record a change (sealed): the completion waits for a
        // write-back that started after it, so the guest is never told of a change that
        // neither the image nor the journal holds.
        self.write_through_if_gated()
    }

    /// Sets the refcount of an unreferenced cluster to 0; it is reused once the release is
    /// durable and the journal no longer holds records of its earlier use.
    pub(super) fn release(&self, m: &mut Meta, host: u64) -> Result<()> {
        self.set_refcount(m, host, 0)?;
        let gen = m.journal.as_ref().map(|j| j.generation()).unwrap_or(0);
        m.freed.push((host, gen));
        if m.freed.len() >= MAX_PENDING_RELEASES {
            self.relief.store(true, Ordering::Release);
        }
        Ok(())
    }
}

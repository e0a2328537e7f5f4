//! Live merge, the mover: what the layers from `top` down to just above `base` allocate is
//! copied into `base`, then those layers leave the chain. The job around it (a thread,
//! progress, speed, cancel) lives in the binary crate; this module only moves data and
//! changes the chain, each step in an order that a crash at any point survives.
//!
//! Internal commit (`top` below the active layer), as QEMU's `block-commit` does it:
//! 1. `base` is opened read-write (its lock upgraded to a writer's; refused while another
//!    process reads it as a backing file), with the layers under it as its backing reader.
//! 2. Every range allocated in `top`..(just above `base`) is read as `top` sees it and written
//!    into `base`. Nothing the guest sees changes: each such range is still shadowed by the
//!    layer that allocated it, so a crash here leaves a chain that reads as before (the data
//!    already in `base` is harmless; a commit is restartable, not atomic).
//! 3. `base` is written back, synced and closed clean.
//! 4. The layer above `top` is rebased onto `base`: its header's backing name rewritten in one
//!    write and synced ([`thinblk_qcow2::change_backing_file`], or the active engine's
//!    [`thinblk_qcow2::Qcow2::change_backing`]). Before this write the old chain is on the
//!    storage, after it the new one; both read the same.
//! 5. In memory, under the engine's exclusive lock: the merged layers leave the chain, and
//!    `base` is served by the engine that wrote it (sealed read-only, its caches current).
//!    Their slots are emptied, their locks dropped, their files closed.
//!
//! Cancelling before step 4 closes `base` clean and leaves the chain exactly as it was.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use thinblk_qcow2::{FileStorage, Mapping, OpenOptions, Qcow2, Storage};

use crate::chain::{Chain, ChainReader, Layer};
use crate::error::ImageError;
use crate::lock::Access;
use crate::qcow2::{poisoned, storage_for, Qcow2Format};
use crate::sys::open_direct;

/// Most bytes one [`CommitJob::step`] copies.
pub const STEP_BYTES: u64 = 1 << 20;

/// A merge in progress, driven by the job thread of the binary crate.
pub trait CommitJob: Send {
    /// Bytes to copy, as known now (an active commit adds what the guest rewrites).
    fn total(&self) -> u64;
    /// Bytes copied so far.
    fn done(&self) -> u64;
    /// Copies at most `max` bytes; false once nothing is left to copy. An error leaves the
    /// range to be copied again by the next step (e.g. after the base's volume grew).
    fn step(&mut self, max: u64) -> Result<bool, ImageError>;
    /// The files involved, for logs: (top, base).
    fn names(&self) -> (PathBuf, PathBuf);
    /// Finishes an internal commit (steps 3 to 5 of the module doc). Only once every step
    /// returned false.
    fn complete(&mut self) -> Result<(), ImageError>;
    /// Gives up: the base closed clean, the chain as it was.
    fn abandon(&mut self);
    /// One past the last host byte the base uses (its volume must hold it).
    fn base_allocation(&self) -> u64;
    /// The host offset no allocation in the base may pass (its volume's size).
    fn set_base_limit(&self, limit: u64);
}

fn refused(msg: impl Into<String>) -> ImageError {
    ImageError::Refused(msg.into())
}

/// Whether the layer (or top) opened at `a` is the file `b` names.
fn same(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) if x.file_type().is_block_device() && y.file_type().is_block_device() => x.rdev() == y.rdev(),
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// What the layers `layers[from..to]` allocate, over a disk of `size` bytes, coalesced.
fn allocated(layers: &[Arc<Layer>], from: usize, to: usize, size: u64) -> Result<Vec<(u64, u64)>, ImageError> {
    const WINDOW: u64 = 1 << 30;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut off = 0;
    while off < size {
        let len = WINDOW.min(size - off);
        // Per window, the union of every layer's allocated ranges, at 512-byte resolution
        // of the smallest cluster (ranges come cluster-aligned from each layer).
        let mut marks: Vec<(u64, u64)> = Vec::new();
        for l in layers.get(from..to).unwrap_or(&[]) {
            match &**l {
                Layer::Qcow2 { img, .. } => {
                    let n = img.size().saturating_sub(off).min(len);
                    if n == 0 {
                        continue;
                    }
                    let mut ranges = Vec::new();
                    img.map_read(off, n, &mut ranges).map_err(|e| refused(e.to_string()))?;
                    marks.extend(ranges.iter().filter(|r| !matches!(r.mapping, Mapping::Backing)).map(|r| (r.guest, r.len)));
                }
                Layer::Raw { .. } => return Err(refused("a raw image above the base cannot be merged")),
            }
        }
        marks.sort_unstable();
        for (o, l) in marks {
            match out.last_mut() {
                Some(last) if o <= last.0 + last.1 => {
                    let end = (last.0 + last.1).max(o + l);
                    last.1 = end - last.0;
                }
                _ => out.push((o, l)),
            }
        }
        off += len;
    }
    Ok(out)
}

/// Writes `data` at guest `offset` of the engine `img` on `st` (a merge's base): zeroes as
/// zero clusters where whole, data elsewhere.
fn write_into(img: &Qcow2, st: &dyn Storage, offset: u64, data: &[u8]) -> Result<(), ImageError> {
    let io = |e: thinblk_qcow2::Qcow2Error| match e {
        thinblk_qcow2::Qcow2Error::Io(e) => ImageError::Io(e),
        thinblk_qcow2::Qcow2Error::VolumeFull { needed, limit } => ImageError::NoSpace { needed, limit },
        other => refused(other.to_string()),
    };
    let mut ranges = Vec::new();
    if data.iter().all(|&b| b == 0) {
        let mut flagged = Vec::new();
        let ticket = img.zero_range(offset, data.len() as u64, &mut ranges, &mut flagged).map_err(io)?;
        let mut result = Ok(());
        for r in &ranges {
            if let Mapping::Data(h) = r.mapping {
                if let Err(e) = st.write_at(&vec![0u8; r.len as usize], h) {
                    result = Err(ImageError::Io(e));
                    break;
                }
            }
        }
        let done = img.write_done(&ticket, result.is_ok()).map_err(io);
        return result.and(done);
    }
    let ticket = img.map_write(offset, data.len() as u64, &mut ranges).map_err(io)?;
    let mut result = Ok(());
    for r in &ranges {
        let Mapping::Data(h) = r.mapping else {
            result = Err(refused("a write mapped to a non-data range"));
            break;
        };
        let s = (r.guest - offset) as usize;
        if let Err(e) = st.write_at(&data[s..s + r.len as usize], h) {
            result = Err(ImageError::Io(e));
            break;
        }
    }
    let done = img.write_done(&ticket, result.is_ok()).map_err(io);
    result.and(done)
}

/// An internal commit of a served chain.
pub struct InternalCommit {
    image: Arc<Qcow2Format>,
    /// The chain when the commit started (the layers it reads do not change under it).
    chain: Arc<Chain>,
    /// Index in `chain` of `top` and of `base`.
    top: usize,
    base: usize,
    /// The base opened read-write, and its storage.
    engine: Option<Qcow2>,
    storage: Arc<FileStorage>,
    /// What is left to copy, and the totals.
    ranges: std::collections::VecDeque<(u64, u64)>,
    total: u64,
    done: u64,
    /// The backing name the layer above `top` gets, with its format.
    backing_name: String,
    backing_format: String,
    finished: bool,
}

impl Qcow2Format {
    /// Starts an internal commit of `top` into `base` (both backing layers of the served
    /// chain, `base` below `top`); `backing_name` overrides the name the layer above `top`
    /// will give `base` (by default: the name `base`'s child gives it now).
    pub fn commit_internal(self: &Arc<Self>, top: &Path, base: &Path, backing_name: Option<String>) -> Result<InternalCommit, ImageError> {
        let _serial = self.transition.lock().map_err(|_| poisoned())?;
        if !crate::disk::Disk::is_active(&**self) {
            return Err(ImageError::Inactive);
        }
        let mut job = self.commit_job.lock().map_err(|_| poisoned())?;
        if *job {
            return Err(refused("a commit is already running on this chain"));
        }
        let f = self.top_file()?;
        if same(&f.path, top) {
            return Err(refused(format!("{} is the active layer: an active commit is needed", top.display())));
        }
        let find = |p: &Path| f.backing.layers.iter().position(|l| same(l.path(), p));
        let t = find(top).ok_or_else(|| refused(format!("{} is not in the chain", top.display())))?;
        let b = find(base).ok_or_else(|| refused(format!("{} is not in the chain", base.display())))?;
        if b <= t {
            return Err(refused(format!("{} is not below {}", base.display(), top.display())));
        }
        let base_path = match &*f.backing.layers[b] {
            Layer::Qcow2 { path, .. } => path.clone(),
            Layer::Raw { .. } => return Err(refused("merging into a raw base is not supported")),
        };
        // The name the child of `base` gives it now, unless told otherwise.
        let (name, format) = match &*f.backing.layers[b - 1] {
            Layer::Qcow2 { img, .. } => (img.header().backing_file.clone(), img.header().backing_format.clone()),
            Layer::Raw { .. } => (None, None),
        };
        let backing_name = match backing_name.or(name) {
            Some(n) => n,
            None => return Err(refused("the base's name cannot be found (give backing-file)")),
        };
        // 1. The base opened read-write under a writer's lock.
        self.change_backing_lock(&base_path, Access::qcow2(true))?;
        let opened = (|| {
            let (file, info) = open_direct(&base_path, false)?;
            let storage = if self.engine_opts.fixed_size { Arc::new(FileStorage::new(file, info.alignment as usize).fixed_size()) } else { storage_for(file, &info) };
            let mut engine = Qcow2::open(storage.clone(), OpenOptions { read_only: false, ..Default::default() })
                .map_err(|e| refused(format!("{}: {e}", base_path.display())))?;
            if let Some(reason) = engine.read_only_reason() {
                return Err(refused(format!("{}: {reason}", base_path.display())));
            }
            let below: Vec<Arc<Layer>> = f.backing.layers[b + 1..].to_vec();
            if !below.is_empty() {
                engine.set_backing(Arc::new(ChainReader(Arc::new(Chain { layers: below }))));
            }
            let ranges = allocated(&f.backing.layers, t, b, crate::disk::Disk::capacity(&**self))?;
            Ok((engine, storage, ranges))
        })();
        let (engine, storage, ranges) = match opened {
            Ok(o) => o,
            Err(e) => {
                let _ = self.change_backing_lock(&base_path, Access::backing());
                return Err(e);
            }
        };
        let total = ranges.iter().map(|r| r.1).sum();
        *job = true;
        tracing::info!(top = %top.display(), base = %base_path.display(), bytes = total, "commit started");
        Ok(InternalCommit {
            image: self.clone(),
            chain: f.backing.clone(),
            top: t,
            base: b,
            engine: Some(engine),
            storage,
            ranges: ranges.into(),
            total,
            done: 0,
            backing_name,
            backing_format: format.unwrap_or_else(|| "qcow2".into()),
            finished: false,
        })
    }

    /// Moves the lock of the backing layer at `path` to `want`.
    pub(crate) fn change_backing_lock(&self, path: &Path, want: Access) -> Result<(), ImageError> {
        let mut locks = self.backing_locks.lock().map_err(|_| poisoned())?;
        for (p, l) in locks.iter_mut() {
            if same(p, path) {
                return l.change(want).map_err(|source| ImageError::Lock { path: path.to_path_buf(), source });
            }
        }
        Ok(())
    }
}

impl InternalCommit {
    fn layer_path(&self, k: usize) -> PathBuf {
        self.chain.layers.get(k).map(|l| l.path().to_path_buf()).unwrap_or_default()
    }

    /// Ends the job's claim on the chain and gives the base back its reader's lock.
    fn release(&mut self) {
        if let Ok(mut j) = self.image.commit_job.lock() {
            *j = false;
        }
        let base = self.layer_path(self.base);
        if let Err(e) = self.image.change_backing_lock(&base, Access::backing()) {
            tracing::warn!(base = %base.display(), error = %e, "giving the base back its reader's lock failed");
        }
    }

    /// Step 4: the layer above `top` names `base`.
    fn rebase_child(&self) -> Result<(), ImageError> {
        let backing = Some((self.backing_name.as_str(), self.backing_format.as_str()));
        if self.top == 0 {
            let g = self.image.top.read().map_err(|_| poisoned())?;
            let engine = g.engine.as_ref().ok_or(ImageError::Inactive)?;
            return engine.change_backing(backing).map_err(|e| refused(format!("rebasing the active layer: {e}")));
        }
        let child = self.layer_path(self.top - 1);
        self.image.change_backing_lock(&child, Access::qcow2(true))?;
        let result = (|| {
            let (file, info) = open_direct(&child, false)?;
            let st = storage_for(file, &info);
            thinblk_qcow2::change_backing_file(st.as_ref(), backing).map_err(|e| refused(format!("rebasing {}: {e}", child.display())))
        })();
        if let Err(e) = self.image.change_backing_lock(&child, Access::backing()) {
            tracing::warn!(image = %child.display(), error = %e, "giving a rebased layer back its reader's lock failed");
        }
        result
    }
}

impl CommitJob for InternalCommit {
    fn total(&self) -> u64 {
        self.total
    }

    fn done(&self) -> u64 {
        self.done
    }

    fn names(&self) -> (PathBuf, PathBuf) {
        (self.layer_path(self.top), self.layer_path(self.base))
    }

    fn base_allocation(&self) -> u64 {
        self.engine.as_ref().map(|e| e.allocation()).unwrap_or(0)
    }

    fn set_base_limit(&self, limit: u64) {
        if let Some(e) = self.engine.as_ref() {
            e.set_limit(limit);
        }
    }

    fn step(&mut self, max: u64) -> Result<bool, ImageError> {
        let Some(&(off, len)) = self.ranges.front() else { return Ok(false) };
        let engine = self.engine.as_ref().ok_or_else(|| refused("the commit has ended"))?;
        let n = len.min(max.clamp(4096, STEP_BYTES));
        let mut buf = vec![0u8; n as usize];
        self.chain.read(self.top, &mut buf, off).map_err(|e| refused(format!("reading {}: {e}", self.layer_path(self.top).display())))?;
        write_into(engine, self.storage.as_ref(), off, &buf)?;
        if let Some(front) = self.ranges.front_mut() {
            if n == len {
                self.ranges.pop_front();
            } else {
                *front = (off + n, len - n);
            }
        }
        self.done += n;
        Ok(!self.ranges.is_empty())
    }

    fn complete(&mut self) -> Result<(), ImageError> {
        if !self.ranges.is_empty() || self.finished {
            return Err(refused("the commit has not copied everything yet"));
        }
        // 3. The base written back, synced, closed clean.
        let engine = self.engine.as_ref().ok_or_else(|| refused("the commit has ended"))?;
        engine.close().map_err(|e| refused(format!("closing the base: {e}")))?;
        // 4. The child of `top` names `base` (one synced header write).
        self.rebase_child()?;
        // 5. The merged layers leave the served chain.
        let Some(engine) = self.engine.take() else { return Err(refused("the commit has ended")) };
        let sealed = engine.sealed("a backing layer (merged into)");
        let (slot, st, path) = match &*self.chain.layers[self.base] {
            Layer::Qcow2 { slot, st, path, .. } => (*slot, st.clone(), path.clone()),
            Layer::Raw { .. } => return Err(refused("raw base")),
        };
        let dropped: Vec<Arc<Layer>> = self.chain.layers[self.top..self.base].to_vec();
        {
            let mut g = self.image.top.write().map_err(|_| poisoned())?;
            let mut layers: Vec<Arc<Layer>> = g.file.backing.layers.iter().take(self.top).cloned().collect();
            layers.push(Arc::new(Layer::Qcow2 { img: sealed, st, slot, path }));
            layers.extend(self.chain.layers[self.base + 1..].iter().cloned());
            let backing = Arc::new(Chain { layers });
            if let Some(e) = g.engine.as_mut() {
                e.set_backing(Arc::new(ChainReader(backing.clone())));
            }
            let old = g.file.clone();
            g.file = Arc::new(crate::qcow2::TopFile {
                path: old.path.clone(),
                storage: old.storage.clone(),
                slot: old.slot,
                backing,
                is_block: old.is_block,
            });
        }
        self.finished = true;
        self.release();
        self.image.retire(dropped);
        let (top, base) = (self.layer_path(self.top), self.layer_path(self.base));
        tracing::info!(top = %top.display(), base = %base.display(), bytes = self.done, "commit completed: the merged layers left the chain");
        Ok(())
    }

    fn abandon(&mut self) {
        if self.finished {
            return;
        }
        if let Some(engine) = self.engine.take() {
            if let Err(e) = engine.close() {
                tracing::warn!(error = %e, "closing the base after a cancelled commit failed (its in-use flag stays set)");
            }
        }
        self.finished = true;
        self.release();
        tracing::info!(copied = self.done, "commit cancelled: the chain is as it was");
    }
}

impl Drop for InternalCommit {
    fn drop(&mut self) {
        self.abandon();
    }
}

/// Layers that left the chain: their slots emptied (once every ring could take the change),
/// their locks dropped, their files closed.
pub(crate) struct Retired {
    layers: Mutex<Vec<Arc<Layer>>>,
}

impl Default for Retired {
    fn default() -> Self {
        Retired { layers: Mutex::new(Vec::new()) }
    }
}

impl Qcow2Format {
    /// Retires `dropped` (and any layer an earlier try could not retire yet).
    pub(crate) fn retire(&self, dropped: Vec<Arc<Layer>>) {
        let Ok(mut waiting) = self.retired.layers.lock() else { return };
        waiting.extend(dropped);
        let mut kept = Vec::new();
        for l in waiting.drain(..) {
            let slot = match &*l {
                Layer::Qcow2 { slot, .. } | Layer::Raw { slot, .. } => *slot,
            };
            match self.files.remove(slot) {
                Ok(()) => {
                    if let Ok(mut locks) = self.backing_locks.lock() {
                        locks.retain(|(p, _)| !same(p, l.path()));
                    }
                    tracing::info!(image = %l.path().display(), slot, "layer closed: it left the chain");
                }
                Err(e) => {
                    tracing::warn!(image = %l.path().display(), slot, error = %e, "a merged layer stays open until the rings can let go of it");
                    kept.push(l);
                }
            }
        }
        *waiting = kept;
    }
}

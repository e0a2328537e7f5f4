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
pub const STEP_BYTES: u64 = 4 << 20;

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
    /// Whether this is an active commit (it mirrors the guest's writes until its pivot).
    fn is_active(&self) -> bool {
        false
    }
    /// Whether an active commit copied everything listed at its start (what is left is what
    /// the guest rewrote since).
    fn first_pass_done(&self) -> bool {
        false
    }
    /// Lists what is to be copied, if not done at the start (the job thread calls it first).
    fn prepare(&mut self) -> Result<(), ImageError> {
        Ok(())
    }
    /// The pivot of an active commit: with the guest's writes held by `hold` (released by
    /// the caller afterwards), what is left is copied, the top is closed marked merged and
    /// the base becomes the top (with `limit`, its allocation limit).
    fn pivot(&mut self, _hold: &mut dyn FnMut() -> Result<(), String>, _limit: Option<u64>) -> Result<(), ImageError> {
        Err(refused("only an active commit pivots"))
    }
    /// Gives up: the base closed clean, the chain as it was.
    fn abandon(&mut self);
    /// One past the last host byte the base uses (its volume must hold it).
    fn base_allocation(&self) -> u64;
    /// Retires again the files that left the chain but that a ring still held (a busy
    /// backlog, a bounced read in hand); how many still wait.
    fn settle(&mut self) -> usize;
    /// The host offset no allocation in the base may pass (its volume's size).
    fn set_base_limit(&self, limit: u64);
}

fn refused(msg: impl Into<String>) -> ImageError {
    ImageError::Refused(msg.into())
}

/// The backing name `child` gives `base` by default: the file name when both sit in one
/// directory, else `base`'s absolute path.
fn default_backing_name(child: &Path, base: &Path) -> Result<String, ImageError> {
    let absolute = |p: &Path| std::path::absolute(p).map_err(ImageError::Io);
    let (c, b) = (absolute(child)?, absolute(base)?);
    let name = match (c.parent(), b.parent(), b.file_name()) {
        (Some(cd), Some(bd), Some(n)) if cd == bd => n.to_string_lossy().into_owned(),
        _ => b.to_string_lossy().into_owned(),
    };
    if name.is_empty() || name.len() > 1023 {
        return Err(refused(format!("no backing name for {} (give backing-file)", base.display())));
    }
    Ok(name)
}

/// Whether the layer (or top) opened at `a` is the file `b` names.
pub(crate) fn same_file_path(a: &Path, b: &Path) -> bool {
    same(a, b)
}

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
    let mut engines = Vec::new();
    for l in layers.get(from..to).unwrap_or(&[]) {
        match &**l {
            Layer::Qcow2 { img, .. } => engines.push(img),
            Layer::Raw { .. } => return Err(refused("a raw image above the base cannot be merged")),
        }
    }
    allocated_in(&engines, size)
}

/// What any of `engines` allocates (data, zero or compressed clusters), coalesced.
fn allocated_in(engines: &[&Qcow2], size: u64) -> Result<Vec<(u64, u64)>, ImageError> {
    const WINDOW: u64 = 1 << 30;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut off = 0;
    while off < size {
        let len = WINDOW.min(size - off);
        let mut marks: Vec<(u64, u64)> = Vec::new();
        for img in engines {
            let n = img.size().saturating_sub(off).min(len);
            if n == 0 {
                continue;
            }
            let mut ranges = Vec::new();
            img.map_read(off, n, &mut ranges).map_err(|e| refused(e.to_string()))?;
            marks.extend(ranges.iter().filter(|r| !matches!(r.mapping, Mapping::Backing)).map(|r| (r.guest, r.len)));
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
        let (_serial, mut job, f) = self.begin_commit()?;
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
        // The name the child of `top` will give `base`, unless told otherwise: as oVirt and
        // qemu-img name backing files, the base's file name when both sit in one directory
        // (oVirt: the bare volume UUID), else the base's absolute path. (Not a name read from
        // a header: a layer rebased by an earlier merge is served with its header as opened.)
        let child = if t == 0 { f.path.clone() } else { f.backing.layers[t - 1].path().to_path_buf() };
        let backing_name = match backing_name {
            Some(n) => n,
            None => default_backing_name(&child, &base_path)?,
        };
        let format = "qcow2".to_string();
        // 1. The base opened read-write under a writer's lock.
        self.change_backing_lock(&base_path, Access::qcow2(true))?;
        let opened = self.open_base(&f, b, &base_path).and_then(|(engine, storage)| {
            let ranges = allocated(&f.backing.layers, t, b, crate::disk::Disk::capacity(&**self))?;
            Ok((engine, storage, ranges))
        });
        let (engine, storage, ranges) = match opened {
            Ok(o) => o,
            Err(e) => {
                let _ = self.change_backing_lock(&base_path, Access::backing());
                return Err(e);
            }
        };
        *job = true;
        let c = InternalCommit::new(self.clone(), f.backing.clone(), (t, b), (engine, storage), ranges, (backing_name, format));
        tracing::info!(top = %top.display(), base = %base_path.display(), bytes = c.total, "commit started");
        Ok(c)
    }

    /// A commit's start: chain changes held off, no other commit, the image active; the
    /// served top and chain.
    #[allow(clippy::type_complexity)]
    fn begin_commit(&self) -> Result<(std::sync::MutexGuard<'_, ()>, std::sync::MutexGuard<'_, bool>, Arc<crate::qcow2::TopFile>), ImageError> {
        let serial = self.transition.lock().map_err(|_| poisoned())?;
        if !crate::disk::Disk::is_active(self) {
            return Err(ImageError::Inactive);
        }
        let job = self.commit_job.lock().map_err(|_| poisoned())?;
        if *job {
            return Err(refused("a commit is already running on this chain"));
        }
        Ok((serial, job, self.top_file()?))
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
    /// A merge of `chain`'s layers `top..base` (indices) into the base opened as `opened`,
    /// `ranges` to copy, the child renaming the base `backing` (name, format).
    fn new(image: Arc<Qcow2Format>, chain: Arc<Chain>, (top, base): (usize, usize), opened: (Qcow2, Arc<FileStorage>), ranges: Vec<(u64, u64)>, backing: (String, String)) -> InternalCommit {
        InternalCommit {
            image,
            chain,
            top,
            base,
            engine: Some(opened.0),
            storage: opened.1,
            total: ranges.iter().map(|r| r.1).sum(),
            ranges: ranges.into(),
            done: 0,
            backing_name: backing.0,
            backing_format: backing.1,
            finished: false,
        }
    }

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

    fn settle(&mut self) -> usize {
        self.image.retire(Vec::new())
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
        let _ = self.image.retire(dropped.into_iter().map(RetiredFile::layer).collect());
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

/// Files that left the chain: their slots emptied once every ring could let go of them
/// (retried at each later retirement), their locks dropped, then their files closed.
#[derive(Default)]
pub(crate) struct Retired {
    files: Mutex<Vec<RetiredFile>>,
}

/// One file leaving the chain, kept open until its slot is emptied.
pub(crate) struct RetiredFile {
    /// Its slot.
    pub(crate) slot: u32,
    /// Where it was opened.
    pub(crate) path: PathBuf,
    /// What keeps its descriptor open (held for its drop).
    pub(crate) _keep: Box<dyn std::any::Any + Send + Sync>,
}

impl RetiredFile {
    /// A layer leaving the chain.
    pub(crate) fn layer(l: Arc<Layer>) -> RetiredFile {
        let (slot, path) = match &*l {
            Layer::Qcow2 { slot, path, .. } | Layer::Raw { slot, path, .. } => (*slot, path.clone()),
        };
        RetiredFile { slot, path, _keep: Box::new(l) }
    }
}

impl Qcow2Format {
    /// Retires `dropped` (and any file an earlier try could not retire yet); how many files
    /// still wait for the rings.
    pub(crate) fn retire(&self, dropped: Vec<RetiredFile>) -> usize {
        let Ok(mut waiting) = self.retired.files.lock() else { return dropped.len() };
        waiting.extend(dropped);
        let mut kept = Vec::new();
        for f in waiting.drain(..) {
            match self.files.remove(f.slot) {
                Ok(()) => {
                    if let Ok(mut locks) = self.backing_locks.lock() {
                        locks.retain(|(p, _)| !same(p, &f.path));
                    }
                    tracing::info!(image = %f.path.display(), slot = f.slot, "file closed: it left the chain");
                }
                Err(e) => {
                    tracing::warn!(image = %f.path.display(), slot = f.slot, error = %e, "a file that left the chain stays open until the rings can let go of it");
                    kept.push(f);
                }
            }
        }
        *waiting = kept;
        waiting.len()
    }
}

/// An active commit: the top (the layer the guest writes) and the layers down to just above
/// `base` are copied into `base` while the guest writes; what the guest changes meanwhile is
/// marked ([`crate::mirror::Dirty`]) and copied again, until the pivot makes `base` the top.
///
/// Order of the pivot, with the guest's writes held:
/// 1. What is still marked is copied (nothing new can be marked); `base` is written back,
///    synced and closed clean; its read-write file goes into a free slot of every ring, and
///    an engine is opened on it as a top (marked in use, its journal started).
/// 2. Under the engine's exclusive lock: the old top is closed *marked merged* (thinblk's
///    owner extension): from here on the guest's writes go to `base`, and a thinblk started
///    on the old top by mistake refuses it instead of serving data that is now stale. Then
///    `base` is served, its lock becomes the top's.
/// 3. The old top and the merged layers leave the chain (slots, locks, files).
///
/// Before step 2, a crash or a cancel leaves the old chain serving, `base` with harmless
/// extra data; after it, `base` is the top. No header changes: the old top's backing name is
/// left as it was (vdsm drops the leaf from its chain metadata).
pub struct ActiveCommit {
    inner: InternalCommit,
    dirty: Arc<crate::mirror::Dirty>,
    /// The top when the commit started.
    top_path: PathBuf,
    /// What lies above the base was listed (the first step does it).
    listed: bool,
}

impl Qcow2Format {
    /// Starts an active commit of the served top into `base` (a backing layer); `hold` is
    /// called before the change tracking starts (the caller holds the guest's writes there
    /// and releases them after this returns).
    pub fn commit_active(self: &Arc<Self>, base: &Path, hold: &mut dyn FnMut() -> Result<(), String>) -> Result<ActiveCommit, ImageError> {
        let (_serial, mut job, f) = self.begin_commit()?;
        let b = f.backing.layers.iter().position(|l| same(l.path(), base)).ok_or_else(|| refused(format!("{} is not in the chain", base.display())))?;
        let base_path = match &*f.backing.layers[b] {
            Layer::Qcow2 { path, img, .. } => {
                if img.size() != crate::disk::Disk::capacity(&**self) {
                    return Err(refused(format!("{} has virtual size {}, the disk {}: resize it first", path.display(), img.size(), crate::disk::Disk::capacity(&**self))));
                }
                path.clone()
            }
            Layer::Raw { .. } => return Err(refused("merging into a raw base is not supported")),
        };
        self.change_backing_lock(&base_path, Access::qcow2(true))?;
        let opened = self.open_base(&f, b, &base_path);
        let (engine, storage) = match opened {
            Ok(o) => o,
            Err(e) => {
                let _ = self.change_backing_lock(&base_path, Access::backing());
                return Err(e);
            }
        };
        let gran = engine.cluster_size().max(1 << 16);
        let dirty = Arc::new(crate::mirror::Dirty::new(crate::disk::Disk::capacity(&**self), gran));
        // With the guest's writes held (none in flight, every ticket back), tracking starts:
        // each later write is marked as it ends, each earlier one is allocated above the base,
        // which the first step lists (outside the hold: on a large disk the listing reads
        // every L2 table).
        let started = hold().map_err(|e| refused(format!("holding writes: {e}"))).and_then(|()| {
            let mut g = self.top.write().map_err(|_| poisoned())?;
            if g.engine.is_none() {
                return Err(ImageError::Inactive);
            }
            g.mirror = Some(dirty.clone());
            Ok(())
        });
        if let Err(e) = started {
            let _ = engine.close();
            let _ = self.change_backing_lock(&base_path, Access::backing());
            return Err(e);
        }
        *job = true;
        tracing::info!(top = %f.path.display(), base = %base_path.display(), granularity = gran, "active commit started: the guest's writes are tracked");
        Ok(ActiveCommit {
            inner: InternalCommit::new(self.clone(), f.backing.clone(), (0, b), (engine, storage), Vec::new(), (String::new(), String::new())),
            dirty,
            top_path: f.path.clone(),
            listed: false,
        })
    }

    /// Opens the base `layers[b]` of `f` read-write, with the layers under it as its backing.
    fn open_base(&self, f: &crate::qcow2::TopFile, b: usize, base_path: &Path) -> Result<(Qcow2, Arc<FileStorage>), ImageError> {
        let (file, info) = open_direct(base_path, false)?;
        let storage = if self.engine_opts.fixed_size { Arc::new(FileStorage::new(file, info.alignment as usize).fixed_size()) } else { storage_for(file, &info) };
        let mut engine = Qcow2::open(storage.clone(), OpenOptions { read_only: false, ..Default::default() }).map_err(|e| refused(format!("{}: {e}", base_path.display())))?;
        if let Some(reason) = engine.read_only_reason() {
            return Err(refused(format!("{}: {reason}", base_path.display())));
        }
        let below: Vec<Arc<Layer>> = f.backing.layers[b + 1..].to_vec();
        if !below.is_empty() {
            engine.set_backing(Arc::new(ChainReader(Arc::new(Chain { layers: below }))));
        }
        Ok((engine, storage))
    }
}

impl ActiveCommit {
    /// Lists what the top and the layers down to just above the base allocate (what was
    /// written before the tracking started is among it).
    fn list(&mut self) -> Result<(), ImageError> {
        let image = self.inner.image.clone();
        let g = image.top.read().map_err(|_| poisoned())?;
        let top = g.engine.as_ref().ok_or(ImageError::Inactive)?;
        let mut engines = vec![top];
        for l in &self.inner.chain.layers[..self.inner.base] {
            match &**l {
                Layer::Qcow2 { img, .. } => engines.push(img),
                Layer::Raw { .. } => return Err(refused("a raw image above the base cannot be merged")),
            }
        }
        let ranges = allocated_in(&engines, crate::disk::Disk::capacity(&*image))?;
        drop(g);
        self.inner.total = ranges.iter().map(|r| r.1).sum();
        tracing::info!(top = %self.top_path.display(), bytes = self.inner.total, "active commit: what lies above the base is listed");
        self.inner.ranges = ranges.into();
        self.listed = true;
        Ok(())
    }

    /// Copies one range as the guest sees it now (through the served chain) into the base.
    fn copy(&mut self, off: u64, n: u64) -> Result<(), ImageError> {
        let engine = self.inner.engine.as_ref().ok_or_else(|| refused("the commit has ended"))?;
        let data = crate::disk::read_mapped(&*self.inner.image, off, n as usize)?;
        write_into(engine, self.inner.storage.as_ref(), off, &data)?;
        self.inner.done += n;
        Ok(())
    }

    /// Takes the mirror off the served image.
    fn untrack(&self) {
        if let Ok(mut g) = self.inner.image.top.write() {
            g.mirror = None;
        }
    }

    /// Steps 1 to 3 of the pivot (writes held).
    fn switch(&mut self, limit: Option<u64>) -> Result<(), ImageError> {
        // 1. What is left, then the base closed clean and opened as a top on a new slot.
        while self.step(STEP_BYTES)? {}
        while let Some((off, len)) = self.dirty.take(STEP_BYTES) {
            self.copy(off, len)?;
        }
        let engine = self.inner.engine.as_ref().ok_or_else(|| refused("the commit has ended"))?;
        engine.close().map_err(|e| refused(format!("closing the base: {e}")))?;
        let image = self.inner.image.clone();
        let base_path = self.inner.layer_path(self.inner.base);
        let (file, info) = open_direct(&base_path, false)?;
        let storage = if image.engine_opts.fixed_size { Arc::new(FileStorage::new(file, info.alignment as usize).fixed_size()) } else { storage_for(file, &info) };
        let slot = image.files.add(std::os::fd::AsRawFd::as_raw_fd(storage.file())).map_err(ImageError::Io)?;
        let below: Vec<Arc<Layer>> = self.inner.chain.layers[self.inner.base + 1..].to_vec();
        let new_top = crate::qcow2::TopFile { path: base_path.clone(), storage, slot, backing: Arc::new(Chain { layers: below }), is_block: info.is_block };
        let opened = image.open_engine(&new_top).map_err(ImageError::from);
        let new_engine = match opened {
            Ok(e) => e,
            Err(e) => {
                let _ = image.files.remove(slot);
                return Err(e);
            }
        };
        // 2. The old top closed marked merged; the base served.
        let old_file = {
            let mut g = image.top.write().map_err(|_| poisoned())?;
            let marked = match g.engine.as_ref() {
                None => Err(ImageError::Inactive),
                Some(_) if image.tickets_out.load(std::sync::atomic::Ordering::SeqCst) > 0 => Err(refused("writes in flight at the pivot")),
                Some(_) if self.dirty.count() > 0 => Err(refused("the guest wrote during the pivot")),
                Some(top) => top.close_merged().map_err(|e| refused(format!("closing the old top: {e}"))),
            };
            if let Err(e) = marked {
                drop(g);
                let _ = new_engine.close();
                let _ = image.files.remove(slot);
                return Err(e);
            }
            if let Some(l) = limit {
                image.limit.store(l, std::sync::atomic::Ordering::SeqCst);
            }
            if let Some(old) = g.engine.take() {
                image.epoch_base.fetch_add(old.metadata_epoch() + 1, std::sync::atomic::Ordering::SeqCst);
            }
            g.mirror = None;
            let old_file = std::mem::replace(&mut g.file, Arc::new(new_top));
            image.install(&mut g, new_engine);
            old_file
        };
        self.inner.engine = None;
        self.inner.finished = true;
        // Locks: the base's (a writer's since the start) is the top's now.
        let base_lock = image.backing_locks.lock().ok().and_then(|mut locks| {
            let i = locks.iter().position(|(p, _)| same(p, &base_path))?;
            Some(locks.remove(i).1)
        });
        if let Ok(mut top_lock) = image.top_lock.lock() {
            *top_lock = base_lock;
        }
        if let Ok(mut j) = image.commit_job.lock() {
            *j = false;
        }
        // 3. The old top, the merged layers and the base's read-only file leave.
        let mut gone = vec![RetiredFile { slot: old_file.slot, path: old_file.path.clone(), _keep: Box::new(old_file.clone()) }];
        gone.extend(self.inner.chain.layers[..=self.inner.base].iter().cloned().map(RetiredFile::layer));
        let _ = image.retire(gone);
        tracing::info!(old_top = %self.top_path.display(), top = %base_path.display(), bytes = self.inner.done, "active commit pivoted: the base is the top");
        Ok(())
    }
}

impl CommitJob for ActiveCommit {
    fn total(&self) -> u64 {
        self.inner.done + self.inner.ranges.iter().map(|r| r.1).sum::<u64>() + self.dirty.bytes()
    }

    fn done(&self) -> u64 {
        self.inner.done
    }

    fn names(&self) -> (PathBuf, PathBuf) {
        (self.top_path.clone(), self.inner.layer_path(self.inner.base))
    }

    fn base_allocation(&self) -> u64 {
        self.inner.base_allocation()
    }

    fn settle(&mut self) -> usize {
        self.inner.settle()
    }

    fn set_base_limit(&self, limit: u64) {
        self.inner.set_base_limit(limit)
    }

    fn is_active(&self) -> bool {
        true
    }

    fn prepare(&mut self) -> Result<(), ImageError> {
        if self.listed {
            return Ok(());
        }
        self.list()
    }

    fn first_pass_done(&self) -> bool {
        self.listed && self.inner.ranges.is_empty()
    }

    fn step(&mut self, max: u64) -> Result<bool, ImageError> {
        if !self.listed {
            self.list()?;
            return Ok(true);
        }
        if let Some(&(off, len)) = self.inner.ranges.front() {
            let n = len.min(max.clamp(4096, STEP_BYTES));
            self.copy(off, n)?;
            if let Some(front) = self.inner.ranges.front_mut() {
                if n == len {
                    self.inner.ranges.pop_front();
                } else {
                    *front = (off + n, len - n);
                }
            }
            return Ok(true);
        }
        // At least one chunk (a base with 2 MiB clusters has 2 MiB chunks, above a step).
        match self.dirty.take(max.min(STEP_BYTES).max(self.dirty.granularity())) {
            Some((off, len)) => {
                if let Err(e) = self.copy(off, len) {
                    // Not copied: marked again, for the next step.
                    self.dirty.mark(off, len);
                    return Err(e);
                }
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn complete(&mut self) -> Result<(), ImageError> {
        Err(refused("an active commit completes with its pivot"))
    }

    fn pivot(&mut self, hold: &mut dyn FnMut() -> Result<(), String>, limit: Option<u64>) -> Result<(), ImageError> {
        if self.inner.finished {
            return Err(refused("the commit has ended"));
        }
        hold().map_err(|e| refused(format!("holding writes: {e}")))?;
        self.switch(limit)
    }

    fn abandon(&mut self) {
        if self.inner.finished {
            return;
        }
        self.untrack();
        self.inner.abandon();
    }
}

impl Drop for ActiveCommit {
    fn drop(&mut self) {
        self.abandon();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{read_mapped, write_mapped, Disk, Target};
    use crate::qcow2::ImageOptions;
    use crate::test_util::{qemu_img, run, Dir};

    const MIB: u64 = 1 << 20;

    /// base ← s1 ← top, 16 MiB, in a fresh directory (s1 holding 2 MiB of 0x5a); the chain
    /// served from `top`.
    fn chain(name: &str) -> (Dir, Arc<Qcow2Format>) {
        let dir = Dir::fresh(&format!("commit-{name}"));
        let p = |n: &str| dir.0.join(n).to_str().expect("utf-8").to_string();
        qemu_img(&["create", "-q", "-f", "qcow2", &p("base"), "16M"]);
        qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", "base", "-F", "qcow2", &p("s1"), "16M"]);
        qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", "s1", "-F", "qcow2", &p("top"), "16M"]);
        run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x5a 0 2M", &p("s1")]);
        let q = Arc::new(Qcow2Format::open(&dir.0.join("top"), &ImageOptions::default()).expect("open"));
        (dir, q)
    }

    #[test]
    fn a_write_that_lands_after_its_chunk_was_copied_is_copied_again_before_the_pivot() {
        let (dir, q) = chain("mirror");
        let a = vec![0xaau8; 65536];
        write_mapped(&*q, 0, &a).expect("write a");
        let mut job = q.commit_active(&dir.0.join("base"), &mut || Ok(())).expect("start");
        while job.step(STEP_BYTES).expect("step") {}
        assert_eq!(job.done(), 2 * MIB, "the top's cluster and s1's 2 MiB (overlapping) copied");
        // A guest write mapped now, whose data lands only after the copier read the chunk:
        // the copier finds nothing marked (the write has not ended), the write then ends.
        let mut ext = Vec::new();
        let ticket = q.map_write(0, 65536, &mut ext).expect("map");
        assert!(ticket.1.is_some(), "the ticket carries the range while tracking");
        assert!(!job.step(STEP_BYTES).expect("step"), "nothing marked before the write ends");
        let Target::Host { file, offset } = ext[0].target else { panic!("host extent") };
        let b = crate::aligned::AlignedBuf::zeroed(65536, 4096).expect("buf");
        let mut b = b;
        b.as_mut_slice().fill(0xbb);
        // SAFETY: the buffer outlives the call; the fd is the image's.
        assert_eq!(unsafe { libc::pwrite(q.files()[file as usize], b.ptr().cast(), 65536, offset as libc::off_t) }, 65536);
        q.write_done(ticket, true).expect("done");
        assert!(job.step(STEP_BYTES).expect("step"), "the ended write is copied again");
        job.pivot(&mut || Ok(()), None).expect("pivot");
        assert_eq!(q.chain(), vec![dir.0.join("base")]);
        assert_eq!(read_mapped(&*q, 0, 65536).expect("read"), vec![0xbbu8; 65536], "the base serves the last write");
        assert!(q.map_write(0, 4096, &mut Vec::new()).expect("map").1.is_none(), "no tracking after the pivot");
        q.close().expect("close");
        drop(job);
        drop(q);
        let again = Qcow2Format::open(&dir.0.join("top"), &ImageOptions::default());
        assert!(matches!(again, Err(crate::qcow2::FormatError::Qcow2 { source: thinblk_qcow2::Qcow2Error::Merged, .. })), "the merged top is refused");
    }

    #[test]
    fn an_internal_commit_rebases_the_child_and_a_cancel_changes_nothing() {
        let (dir, q) = chain("internal");
        let data = vec![0x5au8; 2 * MIB as usize];
        let (top, s1) = (dir.0.join("top"), dir.0.join("s1"));
        let mut cancelled = q.commit_internal(&s1, &dir.0.join("base"), None).expect("start");
        assert!(q.commit_internal(&s1, &dir.0.join("base"), None).is_err(), "one commit at a time");
        assert!(cancelled.step(MIB).expect("step"));
        cancelled.abandon();
        assert_eq!(q.chain().len(), 3, "a cancel changes nothing");
        drop(cancelled);
        let mut job = q.commit_internal(&s1, &dir.0.join("base"), None).expect("start again");
        assert_eq!(job.total(), 2 * MIB);
        while job.step(MIB).expect("step") {}
        job.complete().expect("complete");
        assert_eq!(q.chain(), vec![top.clone(), dir.0.join("base")]);
        assert_eq!(read_mapped(&*q, 0, 2 * MIB as usize).expect("read"), data);
        assert_eq!(q.top.read().expect("top").engine.as_ref().map(|e| e.header().backing_file), Some(Some("base".to_string())));
        q.close().expect("close");
    }
}

#[cfg(test)]
mod second_merge {
    use super::*;
    use crate::disk::{read_mapped, Disk};
    use crate::qcow2::ImageOptions;
    use crate::test_util::{run, Dir};

    #[test]
    fn a_second_merge_names_the_base_the_first_one_gave_a_lower_layer() {
        let tmp = Dir::fresh("commit-second");
        let dir = &tmp.0;
        let p = |n: &str| dir.join(n).to_str().expect("utf-8").to_string();
        // D (served) → C → B → A, each lower layer holding its own byte at its own MiB.
        run("qemu-img", &["create", "-q", "-f", "qcow2", &p("A"), "8M"]);
        for (n, parent) in [("B", "A"), ("C", "B"), ("D", "C")] {
            run("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", parent, "-F", "qcow2", &p(n), "8M"]);
        }
        for (i, n) in ["A", "B", "C"].iter().enumerate() {
            run("qemu-io", &["-f", "qcow2", "-c", &format!("write -P {} {}M 1M", 0x41 + i, i), &p(n)]);
        }
        let q = Arc::new(Qcow2Format::open(&dir.join("D"), &ImageOptions::default()).expect("open"));
        for top in ["B", "C"] {
            let mut job = q.commit_internal(&dir.join(top), &dir.join("A"), None).expect("start");
            while job.step(STEP_BYTES).expect("step") {}
            job.complete().expect("complete");
        }
        assert_eq!(q.chain(), vec![dir.join("D"), dir.join("A")]);
        q.close().expect("close");
        drop(q);
        // On disk, D names A (not B, which the first merge removed from C's header only).
        let again = Qcow2Format::open(&dir.join("D"), &ImageOptions::default()).expect("reopen");
        assert_eq!(again.chain(), vec![dir.join("D"), dir.join("A")]);
        for i in 0..3u64 {
            assert_eq!(read_mapped(&again, i << 20, 1 << 20).expect("read"), vec![0x41 + i as u8; 1 << 20]);
        }
    }
}

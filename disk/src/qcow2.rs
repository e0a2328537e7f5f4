//! Engine glue: opening an image by its (explicit) format, and the qcow2 engine behind the
//! vhost crate's `Disk`, with its backing chain.
//!
//! Backing policy: a qcow2 image's backing file is opened read-only, with the format recorded
//! in the image (`qemu-img create -F` / `rebase -F`). An image whose backing format is not
//! recorded is refused: formats are never probed. Chains are at most [`MAX_CHAIN`] deep.
//! Which names an image may give is [`BackingFiles`] (`--backing-files`): by default a name
//! relative to the image's own directory that stays inside it and names a regular file, so
//! an image cannot make the daemon open `/etc/shadow` or another VM's disk.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use thinblk_qcow2::{AllocationObserver, FileStorage, Mapping, OpenOptions, Qcow2, Qcow2Error, Storage};
use crate::error::ImageError;
use crate::disk::{Extent, FileListener, HostZero, Disk, Target, WriteTicket, ZeroMode, ZeroRequest};
use crate::lock::{change_lock, lock_image, Access, ImageLock, LockError, Locking};
use crate::chain::{Chain, ChainReader, FileTable, Layer, FILE_SLOTS};
use crate::raw::RawImage;
use crate::sys::{image_identity, open_direct, OpenedFile};

/// Deepest backing chain accepted.
pub const MAX_CHAIN: usize = 16;

/// Image formats; always given explicitly, never probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The file is the disk.
    Raw,
    /// qcow2.
    Qcow2,
}

/// Which backing file names an image may give (`--backing-files`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackingFiles {
    /// Relative names inside the image's directory (no `..`), regular files only.
    #[default]
    Local,
    /// As `local`, and block devices too (oVirt block domains: `/dev/<domain>/<volume>`
    /// links to device-mapper devices).
    Devices,
    /// Any local path, absolute names included (trusted images only).
    Any,
}

/// Options for opening an image.
#[derive(Clone, Debug)]
pub struct ImageOptions {
    /// Open read-only.
    pub read_only: bool,
    /// qcow2 L2 cache size in bytes (None: the default policy).
    pub l2_cache_bytes: Option<u64>,
    /// Pass discards to the host (release space): `--discard unmap`.
    pub discard_unmap: bool,
    /// The image file is a fixed-size volume (thin mode): never grow it.
    pub fixed_size: bool,
    /// Directory of the qcow2 metadata journal (None: no journal).
    pub journal_dir: Option<PathBuf>,
    /// Bytes per journal segment (the file is twice this, preallocated).
    pub journal_segment_bytes: usize,
    /// Clean qcow2 refcount blocks kept in memory (None: the engine's default).
    pub refcount_cache_blocks: Option<usize>,
    /// Which backing file names images may give.
    pub backing_files: BackingFiles,
    /// QEMU-compatible image locks on every file of the chain (`--image-locking`).
    pub locking: Locking,
    /// Open for the destination of an incoming live migration: the files are opened as
    /// usual (their descriptors serve once active), but only [`Access::inactive`] locks are
    /// taken, no journal is looked at, nothing is written, and only what the checks need is
    /// read; IO waits for [`Disk::activate`].
    pub inactive: bool,
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions {
            read_only: false,
            l2_cache_bytes: None,
            discard_unmap: false,
            fixed_size: false,
            journal_dir: None,
            journal_segment_bytes: thinblk_qcow2::DEFAULT_SEGMENT_BYTES,
            refcount_cache_blocks: None,
            backing_files: BackingFiles::default(),
            locking: Locking::default(),
            inactive: false,
        }
    }
}

/// Errors opening an image.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Opening a file failed.
    #[error("{path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: ImageError,
    },
    /// The qcow2 engine refused the image.
    #[error("{path}: {source}")]
    Qcow2 {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Qcow2Error,
    },
    /// Another process uses the image (or a file of its chain) in a way ours excludes.
    #[error("{path}: {source}")]
    Lock {
        /// The file.
        path: PathBuf,
        /// Why.
        source: LockError,
    },
    /// The backing chain cannot be followed.
    #[error("{path}: {reason}")]
    Backing {
        /// The image whose backing file is the problem.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl From<FormatError> for ImageError {
    fn from(e: FormatError) -> ImageError {
        match e {
            FormatError::Open { source, .. } => source,
            FormatError::Qcow2 { path, source } => ImageError::Qcow2 { path, source },
            FormatError::Lock { path, source } => ImageError::Lock { path, source },
            FormatError::Backing { path, reason } => ImageError::Refused(format!("{}: {reason}", path.display())),
        }
    }
}

fn qerr(path: &Path) -> impl Fn(Qcow2Error) -> FormatError + '_ {
    move |source| FormatError::Qcow2 { path: path.to_path_buf(), source }
}

fn open_err(path: &Path) -> impl Fn(ImageError) -> FormatError + '_ {
    move |source| FormatError::Open { path: path.to_path_buf(), source }
}

/// Locks an opened file of the chain for `want` (see [`crate::lock`]).
pub(crate) fn lock_file(file: &File, path: &Path, want: Access, mode: Locking) -> Result<Option<ImageLock>, FormatError> {
    lock_image(file, path, want, mode).map_err(|source| FormatError::Lock { path: path.to_path_buf(), source })
}

/// Opens `path` as `format`.
pub fn open_image(path: &Path, format: Format, opts: &ImageOptions) -> Result<Arc<dyn Disk>, FormatError> {
    match format {
        Format::Raw => {
            let mut raw = RawImage::open(path, opts.read_only, opts.discard_unmap).map_err(open_err(path))?;
            if opts.inactive {
                raw = raw.inactive();
            }
            raw.lock(path, opts.locking).map_err(|source| FormatError::Lock { path: path.to_path_buf(), source })?;
            Ok(Arc::new(raw))
        }
        Format::Qcow2 => Qcow2Format::open(path, opts).map(|q| Arc::new(q) as Arc<dyn Disk>),
    }
}

/// A qcow2 image (and its backing chain) served through the vhost crate's format layer.
///
/// The image is *active* (an engine serves it) or *inactive* (live migration: a destination
/// before it takes over, a source after it handed over; no engine, nothing cached, nothing
/// written). [`Disk::activate`] and [`Disk::inactivate`] move between the two over the same
/// files and descriptors.
pub struct Qcow2Format {
    /// What is served: the top's file and chain, and its engine while active. Map calls take
    /// it shared (uncontended but for the transitions and chain changes, which take it
    /// exclusively).
    pub(crate) top: RwLock<Served>,
    /// The rings' file table: every layer's file in its slot.
    pub(crate) files: FileTable,
    pub(crate) alignment: u32,
    physical_block_size: u32,
    identity: String,
    discard_unmap: bool,
    /// How the top engine is opened, at the start, at an activation or a snapshot.
    pub(crate) engine_opts: EngineOptions,
    /// Which backing names images may give (a snapshot's overlay is checked too).
    pub(crate) backing_files: BackingFiles,
    /// Whether files are locked.
    pub(crate) locking: Locking,
    /// The virtual size, as the last engine (or the inactive open's check) read it.
    capacity: AtomicU64,
    /// The allocation mark while inactive: the last engine's.
    allocation: AtomicU64,
    /// Added to the engine's metadata epoch, so it never goes back across activations.
    pub(crate) epoch_base: AtomicU64,
    /// L2 cache hits and misses of the engines before the current one.
    pub(crate) cache_base: (AtomicU64, AtomicU64),
    /// The allocation limit, given to every engine.
    pub(crate) limit: AtomicU64,
    /// The allocation observer, given to every engine.
    observer: OnceLock<Arc<dyn AllocationObserver>>,
    /// The top image's locks (None: not locked).
    pub(crate) top_lock: Mutex<Option<ImageLock>>,
    /// Held across an activation, an inactivation or a chain change: one at a time.
    pub(crate) transition: Mutex<()>,
    /// The backing files' locks, by path: a backing reader's, active or not (only a
    /// commit writes one, its base, under a writer's lock for the while).
    pub(crate) backing_locks: Mutex<Vec<(PathBuf, ImageLock)>>,
    /// A commit job holds the chain (snapshots and other commits wait for its end).
    pub(crate) commit_job: Mutex<bool>,
    /// Mapped writes and zeroings whose tickets have not come back: a chain change waits for
    /// none (their links and marks belong to the engine that mapped them).
    pub(crate) tickets_out: AtomicU64,
    /// Layers that left the chain and wait for the rings to let go of their slots.
    pub(crate) retired: crate::commit::Retired,
}

/// What a chain serves: the top's file with the chain under it, and the top's engine while
/// the image is active.
pub(crate) struct Served {
    /// The engine of the top image (None: inactive).
    pub(crate) engine: Option<Qcow2>,
    /// The top's file and the chain under it.
    pub(crate) file: Arc<TopFile>,
    /// While an active commit runs: where the guest's writes land, marked as they end.
    pub(crate) mirror: Option<Arc<crate::mirror::Dirty>>,
}

/// The top image's file and the read-only chain under it.
pub(crate) struct TopFile {
    /// Where the top was opened.
    pub(crate) path: PathBuf,
    /// Its file.
    pub(crate) storage: Arc<FileStorage>,
    /// Its slot in the file table.
    pub(crate) slot: u32,
    /// The layers under it.
    pub(crate) backing: Arc<Chain>,
    /// The top is a block device (its size says nothing of what reads as zeroes).
    pub(crate) is_block: bool,
}

/// What the top engine is opened with.
pub(crate) struct EngineOptions {
    pub(crate) read_only: bool,
    pub(crate) l2_cache_bytes: Option<u64>,
    pub(crate) journal_dir: Option<PathBuf>,
    pub(crate) journal_segment_bytes: usize,
    pub(crate) refcount_cache_blocks: Option<usize>,
    /// The top lives on a fixed-size volume (thin mode): never grown.
    pub(crate) fixed_size: bool,
}

pub(crate) fn storage_for(file: File, info: &OpenedFile) -> Arc<FileStorage> {
    Arc::new(FileStorage::new(file, info.alignment as usize))
}

pub(crate) fn poisoned() -> ImageError {
    ImageError::Io(std::io::Error::other("qcow2 image state poisoned"))
}

impl Qcow2Format {
    /// Opens a qcow2 image and its backing chain (inactive with [`ImageOptions::inactive`]).
    pub fn open(path: &Path, opts: &ImageOptions) -> Result<Qcow2Format, FormatError> {
        let (file, info) = open_direct(path, opts.read_only).map_err(open_err(path))?;
        // Locked before the first read (and the journal replay's writes).
        let want = if opts.inactive { Access::inactive() } else { Access::qcow2(!opts.read_only) };
        let top_lock = lock_file(&file, path, want, opts.locking)?;
        let top_storage = if opts.fixed_size {
            Arc::new(FileStorage::new(file, info.alignment as usize).fixed_size())
        } else {
            storage_for(file, &info)
        };
        // Everything that can refuse the image is checked on a read-only open first (its
        // backing chain, the policy, the alignment): a refused start leaves the image as it
        // was. Only then does the read-write open mark it in use (and replay a journal). An
        // inactive open stops after these checks: it reads, and writes nothing.
        let peek = Qcow2::open(top_storage.clone(), OpenOptions { read_only: true, ..Default::default() }).map_err(qerr(path))?;
        let mut files = vec![top_storage.file().as_raw_fd()];
        let mut alignment = info.alignment;
        let mut layers = Vec::new();
        let mut backing_locks = Vec::new();
        let mut next = backing_of(path, &peek.header(), opts.backing_files)?;
        while let Some((bpath, bformat)) = next.take() {
            if layers.len() + 1 >= MAX_CHAIN {
                return Err(FormatError::Backing { path: path.to_path_buf(), reason: format!("backing chain deeper than {MAX_CHAIN}") });
            }
            let (bfile, binfo) = open_direct(&bpath, true).map_err(open_err(&bpath))?;
            if let Some(l) = lock_file(&bfile, &bpath, Access::backing(), opts.locking)? {
                backing_locks.push((bpath.clone(), l));
            }
            alignment = alignment.max(binfo.alignment);
            let slot = files.len() as u32;
            files.push(bfile.as_raw_fd());
            let st = storage_for(bfile, &binfo);
            match bformat {
                Format::Raw => layers.push(Arc::new(Layer::Raw { st, size: binfo.size, slot, path: bpath })),
                Format::Qcow2 => {
                    let img = Qcow2::open(st.clone(), OpenOptions { read_only: true, ..Default::default() })
                        .map_err(qerr(&bpath))?;
                    next = backing_of(&bpath, &img.header(), opts.backing_files)?;
                    layers.push(Arc::new(Layer::Qcow2 { img, st, slot, path: bpath }));
                }
            }
        }
        // Clusters start wherever the cluster size puts them: below the storage's O_DIRECT
        // alignment, data IO into them would fail with EINVAL.
        for cs in std::iter::once(peek.cluster_size()).chain(layers.iter().filter_map(|l| match &**l {
            Layer::Qcow2 { img, .. } => Some(img.cluster_size()),
            Layer::Raw { .. } => None,
        })) {
            if cs < u64::from(alignment) {
                return Err(FormatError::Qcow2 {
                    path: path.to_path_buf(),
                    source: Qcow2Error::Unsupported(format!(
                        "cluster size {cs} is below the storage's O_DIRECT alignment {alignment}: recreate the image with clusters of at least {alignment} bytes"
                    )),
                });
            }
        }
        let (capacity, allocation) = (peek.size(), peek.allocation());
        drop(peek);
        let image = Qcow2Format {
            top: RwLock::new(Served {
                engine: None,
                mirror: None,
                file: Arc::new(TopFile {
                    path: path.to_path_buf(),
                    storage: top_storage,
                    slot: 0,
                    backing: Arc::new(Chain { layers }),
                    is_block: info.is_block,
                }),
            }),
            files: FileTable::new(files),
            alignment,
            physical_block_size: info.physical_block_size,
            identity: image_identity(path),
            discard_unmap: opts.discard_unmap,
            backing_files: opts.backing_files,
            locking: opts.locking,
            engine_opts: EngineOptions {
                read_only: opts.read_only,
                l2_cache_bytes: opts.l2_cache_bytes,
                journal_dir: opts.journal_dir.clone(),
                journal_segment_bytes: opts.journal_segment_bytes,
                refcount_cache_blocks: opts.refcount_cache_blocks,
                fixed_size: opts.fixed_size,
            },
            capacity: AtomicU64::new(capacity),
            allocation: AtomicU64::new(allocation),
            epoch_base: AtomicU64::new(0),
            cache_base: (AtomicU64::new(0), AtomicU64::new(0)),
            limit: AtomicU64::new(u64::MAX),
            observer: OnceLock::new(),
            top_lock: Mutex::new(top_lock),
            transition: Mutex::new(()),
            backing_locks: Mutex::new(backing_locks),
            commit_job: Mutex::new(false),
            tickets_out: AtomicU64::new(0),
            retired: Default::default(),
        };
        if !opts.inactive {
            let file = image.top_file().map_err(open_err(path))?;
            let top = image.open_engine(&file)?;
            let mut slot = image.top.write().map_err(|_| FormatError::Open { path: path.to_path_buf(), source: poisoned() })?;
            image.install(&mut slot, top);
        }
        Ok(image)
    }

    /// The top's file and the chain under it.
    pub(crate) fn top_file(&self) -> Result<Arc<TopFile>, ImageError> {
        Ok(self.top.read().map_err(|_| poisoned())?.file.clone())
    }

    /// Opens the engine of the top image `f` read-write (or read-only): the journal found,
    /// replayed or refused, the image marked in use. Everything is read from the storage;
    /// nothing comes from an earlier engine.
    pub(crate) fn open_engine(&self, f: &TopFile) -> Result<Qcow2, FormatError> {
        let path = f.path.as_path();
        let o = &self.engine_opts;
        let journal = match &o.journal_dir {
            Some(dir) if !o.read_only => {
                let legacy = legacy_journal_path(dir, path, f.storage.file()).map_err(open_err(path))?;
                if thinblk_qcow2::legacy_journal_pending(&legacy) {
                    return Err(FormatError::Qcow2 {
                        path: path.to_path_buf(),
                        source: Qcow2Error::JournalMismatch(format!(
                            "{} is the metadata journal of an earlier thinblk version that did not stop clean; start that version once on this image (it replays the journal and stops clean on SIGTERM), then this one",
                            legacy.display()
                        )),
                    });
                }
                Some(thinblk_qcow2::JournalOptions { dir: dir.clone(), segment_bytes: o.journal_segment_bytes })
            }
            _ => None,
        };
        // Read as zeroes past the file's end as it is now: another process may have grown it
        // since this one opened it.
        let zeroes_from = if f.is_block {
            u64::MAX
        } else {
            f.storage.file().metadata().map_err(|e| FormatError::Open { path: path.to_path_buf(), source: e.into() })?.len()
        };
        let mut top = Qcow2::open(
            f.storage.clone(),
            OpenOptions {
                read_only: o.read_only,
                l2_cache_bytes: o.l2_cache_bytes,
                zeroes_from,
                journal,
                refcount_cache_blocks: o.refcount_cache_blocks,
            },
        )
        .map_err(qerr(path))?;
        if let Some(r) = top.replayed() {
            if r.stale_boot {
                tracing::warn!(image = %path.display(), "metadata journal from an earlier boot discarded (the host restarted: the image's own write-back order holds)");
            } else if r.records > 0 {
                tracing::warn!(image = %path.display(), records = r.records, bytes = r.bytes,
                    "replayed the metadata journal of a daemon that did not stop clean: completed writes kept");
            }
            if r.skipped_segments > 0 {
                tracing::info!(image = %path.display(), segments = r.skipped_segments, "journal segments the image already held were not replayed");
            }
            if r.unclean && r.records == 0 && !r.stale_boot {
                if r.journal_found {
                    // A daemon killed with nothing unwritten in its journal (say, while the
                    // guest only read): no metadata changed since its last write-back.
                    tracing::warn!(image = %path.display(), "the image was not closed clean; its metadata journal held nothing the image lacked");
                } else {
                    tracing::warn!(image = %path.display(), "the image was not closed clean and no journal was found (host crash, or no journal kept)");
                }
            }
            if r.leaks_repaired > 0 {
                tracing::warn!(image = %path.display(), clusters = r.leaks_repaired,
                    "gave back clusters allocated for writes that never completed (the last stop was not clean)");
            }
        }
        if let (Some(why), Some(dir)) = (top.journal_unavailable(), &o.journal_dir) {
            tracing::warn!(image = %path.display(), dir = %dir.display(), "no metadata journal for this image: {why}; completed writes are durable only after a FLUSH");
        }
        if let Some(reason) = top.read_only_reason() {
            if !o.read_only {
                return Err(FormatError::Qcow2 { path: path.to_path_buf(), source: Qcow2Error::ReadOnly(reason.to_string()) });
            }
        }
        if !f.backing.layers.is_empty() {
            top.set_backing(Arc::new(ChainReader(f.backing.clone())));
        }
        Ok(top)
    }

    /// Makes `top` the engine, in `slot` (the engine's place, held exclusively): it gets the
    /// limit and the observer set so far. `set_limit` and `set_observer` store before they
    /// look for an engine, so a value set during the activation is either read here or finds
    /// the engine installed.
    pub(crate) fn install(&self, slot: &mut Served, top: Qcow2) {
        top.set_limit(self.limit.load(Ordering::SeqCst));
        if let Some(o) = self.observer.get() {
            top.set_observer(o.clone());
        }
        self.capacity.store(top.size(), Ordering::SeqCst);
        slot.engine = Some(top);
    }

    /// Moves the top image's lock to `want`, waiting up to `wait` for another process.
    fn change_top_lock(&self, want: Access, wait: Duration) -> Result<(), ImageError> {
        let path = self.top_file()?.path.clone();
        let mut lock = self.top_lock.lock().map_err(|_| poisoned())?;
        change_lock(lock.as_mut(), &path, want, wait)
    }

    /// The allocation mark: one past the last host byte the image uses (while inactive, the
    /// last engine's, or what the inactive open read).
    pub fn allocation(&self) -> u64 {
        match self.top.read() {
            Ok(g) => match g.engine.as_ref() {
                Some(top) => top.allocation(),
                None => self.allocation.load(Ordering::SeqCst),
            },
            Err(_) => self.allocation.load(Ordering::SeqCst),
        }
    }

    /// Sets the host offset no allocation may pass (the volume's size), for this engine and
    /// every later one.
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::SeqCst);
        // An activation installs its engine under the write lock, after giving it the limit:
        // either it read this value or this finds its engine.
        if let Ok(g) = self.top.read() {
            if let Some(top) = g.engine.as_ref() {
                top.set_limit(limit);
            }
        }
    }

    /// Attaches the observer of the allocation mark (once; later calls are ignored), for this
    /// engine and every later one.
    pub fn set_observer(&self, observer: Arc<dyn AllocationObserver>) {
        let _ = self.observer.set(observer);
        if let (Ok(g), Some(o)) = (self.top.read(), self.observer.get()) {
            if let Some(top) = g.engine.as_ref() {
                top.set_observer(o.clone());
            }
        }
    }

    /// Maps `[offset, offset+len)` of layer `k` (0 = `top`, on `f`), `req_off` bytes into the request.
    #[allow(clippy::too_many_arguments)]
    fn map_layer(&self, top: &Qcow2, f: &TopFile, k: usize, offset: u64, len: u64, req_off: u64, out: &mut Vec<Extent>) -> Result<(), ImageError> {
        let (img, file) = match k {
            0 => (Some(top), f.slot),
            _ => match f.backing.layers.get(k - 1).map(|l| &**l) {
                Some(Layer::Qcow2 { img, slot, .. }) => (Some(img), *slot),
                Some(Layer::Raw { size, slot, .. }) => {
                    let n = size.saturating_sub(offset).min(len);
                    if n > 0 {
                        out.push(Extent { req_off, len: n, target: Target::Host { file: *slot, offset } });
                    }
                    if n < len {
                        out.push(Extent { req_off: req_off + n, len: len - n, target: Target::Zero });
                    }
                    return Ok(());
                }
                None => (None, 0),
            },
        };
        let Some(img) = img else {
            out.push(Extent { req_off, len, target: Target::Zero });
            return Ok(());
        };
        let n = img.size().saturating_sub(offset).min(len);
        if n < len {
            out.push(Extent { req_off: req_off + n, len: len - n, target: Target::Zero });
        }
        let mut ranges = Vec::new();
        img.map_read(offset, n, &mut ranges).map_err(to_image_error)?;
        let cs = img.cluster_size();
        for r in ranges {
            let ro = req_off + (r.guest - offset);
            match r.mapping {
                Mapping::Data(h) => out.push(Extent { req_off: ro, len: r.len, target: Target::Host { file, offset: h } }),
                Mapping::Zero => out.push(Extent { req_off: ro, len: r.len, target: Target::Zero }),
                Mapping::Backing => self.map_layer(top, f, k + 1, r.guest, r.len, ro, out)?,
                Mapping::Compressed(e) => {
                    let data = Arc::new(img.read_compressed(e).map_err(to_image_error)?);
                    out.push(Extent { req_off: ro, len: r.len, target: Target::Bytes { data, offset: (r.guest % cs) as usize } });
                }
            }
        }
        Ok(())
    }
}

/// Where the journal of the image at `path` (open as `file`) lived before journals were
/// named by the image's uuid: `DIR/thinblk-<key>.journal`, the key hashing (FNV-1a) the path
/// as given and the file's device and inode (a block device's own number). Only looked at to
/// refuse starting over such a journal with records in it.
fn legacy_journal_path(dir: &Path, path: &Path, file: &File) -> Result<PathBuf, ImageError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = file.metadata().map_err(ImageError::Io)?;
    let (dev, ino) = if meta.file_type().is_block_device() { (meta.rdev(), 0) } else { (meta.dev(), meta.ino()) };
    let mut key = 0xcbf2_9ce4_8422_2325u64;
    for b in path.as_os_str().as_encoded_bytes().iter().chain(&dev.to_le_bytes()).chain(&ino.to_le_bytes()) {
        key = (key ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    Ok(dir.join(format!("thinblk-{key:016x}.journal")))
}

fn to_image_error(e: Qcow2Error) -> ImageError {
    match e {
        Qcow2Error::Io(io) => ImageError::Io(io),
        Qcow2Error::VolumeFull { needed, limit } => ImageError::NoSpace { needed, limit },
        other => ImageError::Refused(other.to_string()),
    }
}

/// Appends a host zeroing op, merged into the previous one when it continues it (same file
/// and mode, contiguous): one discard of a contiguous image becomes one op, not one per cluster.
fn push_coalesced(out: &mut Vec<HostZero>, z: HostZero) {
    if let Some(last) = out.last_mut() {
        if last.file == z.file && last.mode == z.mode && last.offset.checked_add(last.len) == Some(z.offset) {
            last.len += z.len;
            return;
        }
    }
    out.push(z);
}

/// The backing file of an image and its recorded format, if it has one.
pub(crate) fn backing_of(path: &Path, h: &thinblk_qcow2::Header, policy: BackingFiles) -> Result<Option<(PathBuf, Format)>, FormatError> {
    let Some(name) = &h.backing_file else { return Ok(None) };
    let fail = |reason: String| FormatError::Backing { path: path.to_path_buf(), reason };
    let format = match h.backing_format.as_deref() {
        Some("raw") => Format::Raw,
        Some("qcow2") => Format::Qcow2,
        Some(other) => return Err(fail(format!("backing file {name} has format '{other}', which is not supported"))),
        None => {
            return Err(fail(format!(
                "backing file {name} has no recorded format; thinblk never probes (qemu-img rebase -u -F raw|qcow2)"
            )))
        }
    };
    if name.contains("://") || name.starts_with("json:") {
        return Err(fail(format!("backing file {name} is not a local path")));
    }
    let p = Path::new(name);
    let resolved = if p.is_absolute() { p.to_path_buf() } else { path.parent().unwrap_or(Path::new(".")).join(p) };
    check_backing(name, &resolved, policy).map_err(fail)?;
    Ok(Some((resolved, format)))
}

/// Applies the backing policy to the name `name` (resolved to `resolved`).
fn check_backing(name: &str, resolved: &Path, policy: BackingFiles) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    use std::path::Component;
    let hint = "(--backing-files devices|any allows more)";
    if policy != BackingFiles::Any {
        let p = Path::new(name);
        if p.is_absolute() {
            return Err(format!("backing file {name} is an absolute name; only names inside the image's directory are allowed {hint}"));
        }
        if p.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(format!("backing file {name} leaves the image's directory {hint}"));
        }
    }
    let meta = std::fs::metadata(resolved).map_err(|e| format!("backing file {name} ({}): {e}", resolved.display()))?;
    let kind = meta.file_type();
    // `devices` and `any` accept the same file types; they differ in the names above.
    let allowed = kind.is_file() || (policy != BackingFiles::Local && kind.is_block_device());
    if !allowed {
        let what = if kind.is_block_device() { "a block device" } else if kind.is_dir() { "a directory" } else { "not a regular file" };
        return Err(format!("backing file {name} is {what} {hint}"));
    }
    Ok(())
}

impl Qcow2Format {
    /// The engine's place, held shared: uncontended on the data path (only the two
    /// transitions take it exclusively).
    fn engine(&self) -> Result<std::sync::RwLockReadGuard<'_, Served>, ImageError> {
        self.top.read().map_err(|_| poisoned())
    }
}

/// The engine in its place, or [`ImageError::Inactive`].
fn active(g: &Served) -> Result<&Qcow2, ImageError> {
    g.engine.as_ref().ok_or(ImageError::Inactive)
}

impl Disk for Qcow2Format {
    fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::SeqCst)
    }

    fn allocation(&self) -> Option<u64> {
        Some(Qcow2Format::allocation(self))
    }

    fn cache_stats(&self) -> Option<(u64, u64)> {
        let (h, m) = (self.cache_base.0.load(Ordering::SeqCst), self.cache_base.1.load(Ordering::SeqCst));
        let s = self.top.read().ok()?.engine.as_ref().map(|t| t.cache_stats()).unwrap_or_default();
        Some((h + s.hits, m + s.misses))
    }

    fn files(&self) -> Vec<RawFd> {
        self.files.files()
    }

    fn file_slots(&self) -> usize {
        FILE_SLOTS
    }

    fn sync_files(&self) -> Vec<u32> {
        // Only the top is written through the rings; the layers under it are read-only.
        self.top.read().map(|g| vec![g.file.slot]).unwrap_or_default()
    }

    fn listen_files(&self, listener: std::sync::Weak<dyn FileListener>) -> std::io::Result<()> {
        self.files.listen(listener)
    }

    fn io_alignment(&self) -> u32 {
        self.alignment
    }

    fn physical_block_size(&self) -> u32 {
        self.physical_block_size
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn map_read(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), ImageError> {
        let g = self.engine()?;
        self.map_layer(active(&g)?, &g.file, 0, offset, len, 0, out)
    }

    fn map_write(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<WriteTicket, ImageError> {
        let g = self.engine()?;
        let top = active(&g)?;
        let mut ranges = Vec::new();
        let ticket = top.map_write(offset, len, &mut ranges).map_err(to_image_error)?;
        let tracked = g.mirror.is_some().then_some((offset, len));
        for r in ranges {
            let Mapping::Data(h) = r.mapping else {
                // The engine's pending clusters go back with the refusal.
                let _ = top.write_done(&ticket, false);
                return Err(ImageError::Refused("write mapped to a non-data range".into()));
            };
            out.push(Extent { req_off: r.guest - offset, len: r.len, target: Target::Host { file: g.file.slot, offset: h } });
        }
        self.tickets_out.fetch_add(1, Ordering::SeqCst);
        Ok(WriteTicket(ticket, tracked))
    }

    fn write_done(&self, ticket: WriteTicket, ok: bool) -> Result<(), ImageError> {
        let g = self.engine()?;
        let _ = self.tickets_out.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| Some(n.saturating_sub(1)));
        let r = active(&g)?.write_done(&ticket.0, ok).map_err(to_image_error);
        if let (Some((off, len)), Some(m)) = (ticket.1, g.mirror.as_ref()) {
            m.mark(off, len);
        }
        r
    }

    fn map_zero(&self, offset: u64, len: u64, req: ZeroRequest, out: &mut Vec<HostZero>) -> Result<WriteTicket, ImageError> {
        let g = self.engine()?;
        let top = active(&g)?;
        // Whole clusters get the zero flag and keep their cluster (no reuse while open);
        // partial ones are zeroed on the host through freshly mapped writes. With
        // `--discard unmap` the flagged clusters' host space is released too.
        let mut partial = Vec::new();
        let mut flagged = Vec::new();
        let ticket = top.zero_range(offset, len, &mut partial, &mut flagged).map_err(to_image_error)?;
        let tracked = g.mirror.is_some().then_some((offset, len));
        self.tickets_out.fetch_add(1, Ordering::SeqCst);
        if self.discard_unmap && req.may_unmap() {
            let cs = top.cluster_size();
            for h in flagged {
                push_coalesced(out, HostZero { file: g.file.slot, offset: h, len: cs, mode: ZeroMode::PunchHole });
            }
        }
        for r in partial {
            if let Mapping::Data(h) = r.mapping {
                push_coalesced(out, HostZero { file: g.file.slot, offset: h, len: r.len, mode: ZeroMode::WriteZeroes });
            }
        }
        Ok(WriteTicket(ticket, tracked))
    }

    fn prepare_flush(&self) -> Result<(), ImageError> {
        let g = self.engine()?;
        active(&g)?.flush_metadata().map_err(to_image_error)
    }

    fn metadata_epoch(&self) -> u64 {
        let base = self.epoch_base.load(Ordering::SeqCst);
        match self.top.read() {
            Ok(g) => base + g.engine.as_ref().map(|t| t.metadata_epoch()).unwrap_or(0),
            Err(_) => base,
        }
    }

    fn close(&self) -> Result<(), ImageError> {
        let g = self.top.read().map_err(|_| poisoned())?;
        // Inactive: the image belongs to another process (or to nobody yet); nothing to do.
        let Some(top) = g.engine.as_ref() else { return Ok(()) };
        let (read, evicted) = top.refcount_cache_stats();
        tracing::info!(refcount_blocks_read = read, refcount_blocks_evicted = evicted, "closing the qcow2 image");
        top.close().map_err(to_image_error)
    }

    fn activate(&self, wait: Duration) -> Result<(), ImageError> {
        let _serial = self.transition.lock().map_err(|_| poisoned())?;
        if self.top.read().map_err(|_| poisoned())?.engine.is_some() {
            return Ok(());
        }
        let file = self.top_file()?;
        let started = Instant::now();
        self.change_top_lock(Access::qcow2(!self.engine_opts.read_only), wait)?;
        let waited = started.elapsed();
        // The same path as a start: everything read again from the storage, the journal
        // found (replayed or refused), the image marked in use.
        let top = match self.open_engine(&file) {
            Ok(t) => t,
            Err(e) => {
                if let Err(d) = self.change_top_lock(Access::inactive(), Duration::ZERO) {
                    tracing::warn!(image = %file.path.display(), error = %d, "dropping the image's write locks after a failed activation failed");
                }
                return Err(e.into());
            }
        };
        let end = top.allocation();
        {
            let mut slot = self.top.write().map_err(|_| poisoned())?;
            self.install(&mut slot, top);
        }
        // The allocation mark may have moved under another process: the thin volume's
        // controller looks again.
        if let Some(o) = self.observer.get() {
            o.allocated(end);
        }
        tracing::info!(image = %file.path.display(), lock_wait_ms = waited.as_millis() as u64,
            open_ms = (started.elapsed() - waited).as_millis() as u64, "image activated");
        Ok(())
    }

    fn inactivate(&self) -> Result<(), ImageError> {
        let _serial = self.transition.lock().map_err(|_| poisoned())?;
        if *self.commit_job.lock().map_err(|_| poisoned())? {
            // The merge writes its base and tracks the top: it would go on under the new owner.
            return Err(ImageError::Refused("a merge job runs on this chain: cancel it (or let it finish) before the image is handed over".into()));
        }
        let started = Instant::now();
        {
            let mut slot = self.top.write().map_err(|_| poisoned())?;
            let Some(top) = slot.engine.as_ref() else { return Ok(()) };
            // Everything written back and synced, the in-use flag cleared, the journal
            // removed; on an error the engine stays and the image stays active.
            top.close().map_err(to_image_error)?;
            self.allocation.store(top.allocation(), Ordering::SeqCst);
            self.capacity.store(top.size(), Ordering::SeqCst);
            self.epoch_base.fetch_add(top.metadata_epoch() + 1, Ordering::SeqCst);
            let stats = top.cache_stats();
            self.cache_base.0.fetch_add(stats.hits, Ordering::SeqCst);
            self.cache_base.1.fetch_add(stats.misses, Ordering::SeqCst);
            // Nothing of it is kept: an activation reads the image afresh.
            slot.engine = None;
        }
        let written = started.elapsed();
        // Dropping locks conflicts with nobody: only a kernel error can fail it, and the
        // image is inactive all the same (closed clean, it writes nothing more).
        let downgraded = self.change_top_lock(Access::inactive(), Duration::ZERO);
        tracing::info!(image = %self.top_file().map(|f| f.path.display().to_string()).unwrap_or_default(), writeback_ms = written.as_millis() as u64, "image inactivated");
        downgraded
    }

    fn is_active(&self) -> bool {
        self.top.read().map(|g| g.engine.is_some()).unwrap_or(false)
    }

    fn chain(&self) -> Vec<PathBuf> {
        match self.top_file() {
            Ok(f) => std::iter::once(f.path.clone()).chain(f.backing.layers.iter().map(|l| l.path().to_path_buf())).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn snapshot(&self, overlay: &Path, limit: Option<u64>, hold: &mut dyn FnMut() -> Result<(), String>) -> Result<crate::snapshot::SnapshotReport, ImageError> {
        Qcow2Format::snapshot(self, overlay, limit, hold)
    }

    fn commit(
        self: Arc<Self>,
        top: &Path,
        base: &Path,
        backing_name: Option<String>,
        hold: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<Box<dyn crate::commit::CommitJob>, ImageError> {
        let served = self.top_file()?;
        if crate::commit::same_file_path(&served.path, top) {
            if backing_name.is_some() {
                return Err(ImageError::Refused("backing-file is for an internal commit (the active layer names no backing after its pivot)".into()));
            }
            return Ok(Box::new(self.commit_active(base, hold)?));
        }
        Ok(Box::new(self.commit_internal(top, base, backing_name)?))
    }
}

impl Drop for Qcow2Format {
    fn drop(&mut self) {
        // Normally a no-op after `close`; an image dropped without it (a failed start) still
        // writes its metadata back. The journal goes with it once that leaves it empty (the
        // image is marked in use until a `close`, so the next open still repairs leaks). An
        // inactive image writes nothing.
        let top = match self.top.get_mut() {
            Ok(t) => t,
            Err(p) => p.into_inner(),
        };
        if let Some(engine) = top.engine.as_ref() {
            if let Err(e) = engine.flush_metadata() {
                tracing::error!(error = %e, "flushing qcow2 metadata at close failed");
            }
            let _ = top.file.storage.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thinblk_qcow2::CreateOptions;

    const CLUSTER: u64 = 65536;

    /// A qcow2 image made by the engine's own `create` in the temporary directory.
    struct TempImage(PathBuf);

    impl TempImage {
        fn new(name: &str) -> TempImage {
            let p = std::env::temp_dir().join(format!("thinblk-disk-{name}-{}.qcow2", std::process::id()));
            let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).expect("create image file");
            let st = FileStorage::new(file, 1);
            thinblk_qcow2::create(&st, &CreateOptions { size: 16 << 20, cluster_size: CLUSTER, backing: None }).expect("create qcow2");
            TempImage(p)
        }
    }

    impl Drop for TempImage {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }



    #[derive(Default)]
    struct Seen(Mutex<Vec<u64>>);

    impl AllocationObserver for Seen {
        fn allocated(&self, end: u64) {
            self.0.lock().expect("seen").push(end);
        }
        fn refused(&self, _needed: u64, _limit: u64) {}
    }

    #[test]
    fn an_inactive_image_maps_nothing_and_its_limit_and_observer_carry_over() {
        let t = TempImage::new("inactive");
        let before = std::fs::read(&t.0).expect("read image");
        let q = Qcow2Format::open(&t.0, &ImageOptions { inactive: true, ..Default::default() }).expect("inactive open");
        assert!(!q.is_active());
        assert_eq!(q.capacity(), 16 << 20, "GET_CONFIG is answered before activation");
        let mut ext = Vec::new();
        let mut zeroes = Vec::new();
        assert!(matches!(q.map_read(0, 4096, &mut ext), Err(ImageError::Inactive)));
        assert!(matches!(q.map_write(0, 4096, &mut ext), Err(ImageError::Inactive)));
        assert!(matches!(q.map_zero(0, CLUSTER, ZeroRequest::Discard, &mut zeroes), Err(ImageError::Inactive)));
        assert!(matches!(q.write_done(WriteTicket::default(), true), Err(ImageError::Inactive)));
        assert!(matches!(q.prepare_flush(), Err(ImageError::Inactive)));
        assert!(ext.is_empty() && zeroes.is_empty());
        q.inactivate().expect("inactivating an inactive image does nothing");
        q.close().expect("closing an inactive image does nothing");
        assert_eq!(std::fs::read(&t.0).expect("read image"), before, "an inactive image wrote");

        // Set before the activation: the engine it opens gets them.
        let seen = Arc::new(Seen::default());
        q.set_observer(seen.clone());
        let end = q.allocation();
        q.set_limit(end);
        q.activate(Duration::ZERO).expect("activate");
        assert!(q.is_active());
        assert_eq!(*seen.0.lock().expect("seen"), vec![end], "the observer hears of the mark at activation");
        let data = vec![0x5au8; 8192];
        assert!(matches!(crate::disk::write_mapped(&q, CLUSTER, &data), Err(ImageError::NoSpace { .. })), "the limit carried over");
        q.set_limit(u64::MAX);
        crate::disk::write_mapped(&q, CLUSTER, &data).expect("write");
        assert!(seen.0.lock().expect("seen").last().is_some_and(|e| *e > end), "the observer carried over");
        q.activate(Duration::ZERO).expect("activating an active image does nothing");
        assert_eq!(crate::disk::read_mapped(&q, CLUSTER, 8192).expect("read"), data);

        // Handed over and taken back: a fresh engine reads what the first one wrote.
        q.inactivate().expect("inactivate");
        assert!(!q.is_active());
        assert!(matches!(q.map_read(0, 4096, &mut ext), Err(ImageError::Inactive)));
        let closed = std::fs::read(&t.0).expect("read image");
        q.activate(Duration::ZERO).expect("activate again");
        assert_eq!(crate::disk::read_mapped(&q, CLUSTER, 8192).expect("read"), data);
        assert_eq!(crate::disk::read_mapped(&q, 0, 4096).expect("read"), vec![0u8; 4096]);
        q.close().expect("close");
        drop(q);
        let header = thinblk_qcow2::Header::parse(&closed, closed.len() as u64).expect("header");
        assert!(header.owner.is_some_and(|o| o.flags & thinblk_qcow2::Owner::IN_USE == 0), "inactivate closes clean");
    }

    #[test]
    fn contiguous_zeroing_ops_merge() {
        let mut out = Vec::new();
        let z = |offset, len, mode| HostZero { file: 0, offset, len, mode };
        for i in 0..262_144u64 {
            push_coalesced(&mut out, z((1 << 20) + i * 65536, 65536, ZeroMode::PunchHole));
        }
        assert_eq!(out, vec![z(1 << 20, 262_144 * 65536, ZeroMode::PunchHole)], "16 GiB of clusters: one op");
        push_coalesced(&mut out, z(0, 512, ZeroMode::PunchHole));
        push_coalesced(&mut out, z(512, 512, ZeroMode::WriteZeroes));
        assert_eq!(out.len(), 3, "a gap or another mode starts a new op");
    }
}

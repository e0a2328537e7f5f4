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
use std::sync::Arc;

use thinblk_qcow2::{BackingReader, FileStorage, Mapping, OpenOptions, Qcow2, Qcow2Error, Storage};
use crate::error::ImageError;
use crate::disk::{Extent, HostZero, Disk, Target, WriteTicket, ZeroMode, ZeroRequest};
use crate::lock::{lock_image, Access, ImageLock, LockError, Locking};
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

fn qerr(path: &Path) -> impl Fn(Qcow2Error) -> FormatError + '_ {
    move |source| FormatError::Qcow2 { path: path.to_path_buf(), source }
}

fn open_err(path: &Path) -> impl Fn(ImageError) -> FormatError + '_ {
    move |source| FormatError::Open { path: path.to_path_buf(), source }
}

/// Locks an opened file of the chain for `want` (see [`crate::lock`]).
fn lock_file(file: &File, path: &Path, want: Access, mode: Locking) -> Result<Option<ImageLock>, FormatError> {
    lock_image(file, path, want, mode).map_err(|source| FormatError::Lock { path: path.to_path_buf(), source })
}

/// Opens `path` as `format`.
pub fn open_image(path: &Path, format: Format, opts: &ImageOptions) -> Result<Arc<dyn Disk>, FormatError> {
    match format {
        Format::Raw => {
            let mut raw = RawImage::open(path, opts.read_only, opts.discard_unmap).map_err(open_err(path))?;
            raw.lock(path, opts.locking).map_err(|source| FormatError::Lock { path: path.to_path_buf(), source })?;
            Ok(Arc::new(raw))
        }
        Format::Qcow2 => Qcow2Format::open(path, opts).map(|q| Arc::new(q) as Arc<dyn Disk>),
    }
}

/// One layer of a chain: file index = position in the chain. (At most 16 per image, built
/// once at open: the size difference between variants does not matter.)
#[allow(clippy::large_enum_variant)]
enum Layer {
    Qcow2(Qcow2, Arc<FileStorage>),
    Raw(Arc<FileStorage>, u64),
}

/// The read-only layers under the served image, readable synchronously (for filling
/// partial writes of clusters the backing file provides).
struct Chain {
    layers: Vec<Layer>,
}

impl Chain {
    /// Synchronous read of `buf.len()` bytes at guest `offset`, starting at layer `k`.
    fn read(&self, k: usize, buf: &mut [u8], offset: u64) -> thinblk_qcow2::Result<()> {
        let Some(layer) = self.layers.get(k) else {
            buf.fill(0);
            return Ok(());
        };
        match layer {
            Layer::Raw(st, size) => {
                let n = size.saturating_sub(offset).min(buf.len() as u64) as usize;
                st.read_at(&mut buf[..n], offset)?;
                buf[n..].fill(0);
            }
            Layer::Qcow2(img, st) => {
                let n = img.size().saturating_sub(offset).min(buf.len() as u64) as usize;
                buf[n..].fill(0);
                let mut ranges = Vec::new();
                img.map_read(offset, n as u64, &mut ranges)?;
                let cs = img.cluster_size();
                for r in ranges {
                    let s = (r.guest - offset) as usize;
                    let dst = &mut buf[s..s + r.len as usize];
                    match r.mapping {
                        Mapping::Data(h) => st.read_at(dst, h)?,
                        Mapping::Zero => dst.fill(0),
                        Mapping::Backing => self.read(k + 1, dst, r.guest)?,
                        Mapping::Compressed(e) => {
                            let c = img.read_compressed(e)?;
                            let a = (r.guest % cs) as usize;
                            dst.copy_from_slice(&c[a..a + dst.len()]);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

struct ChainReader(Arc<Chain>);

impl BackingReader for ChainReader {
    fn read(&self, buf: &mut [u8], offset: u64) -> thinblk_qcow2::Result<()> {
        self.0.read(0, buf, offset)
    }
}

/// A qcow2 image (and its backing chain) served through the vhost crate's format layer.
pub struct Qcow2Format {
    top: Qcow2,
    top_storage: Arc<FileStorage>,
    backing: Arc<Chain>,
    files: Vec<RawFd>,
    alignment: u32,
    physical_block_size: u32,
    identity: String,
    discard_unmap: bool,
    /// Image locks of the chain's files, top first: held while the image is open.
    _locks: Vec<ImageLock>,
}

fn storage_for(file: File, info: &OpenedFile) -> Arc<FileStorage> {
    Arc::new(FileStorage::new(file, info.alignment as usize))
}

impl Qcow2Format {
    /// Opens a qcow2 image and its backing chain.
    pub fn open(path: &Path, opts: &ImageOptions) -> Result<Qcow2Format, FormatError> {
        let (file, info) = open_direct(path, opts.read_only).map_err(open_err(path))?;
        // Locked before the first read (and the journal replay's writes).
        let mut locks: Vec<ImageLock> = lock_file(&file, path, Access::qcow2(!opts.read_only), opts.locking)?.into_iter().collect();
        let top_storage = if opts.fixed_size {
            Arc::new(FileStorage::new(file, info.alignment as usize).fixed_size())
        } else {
            storage_for(file, &info)
        };
        let zeroes_from = if info.is_block { u64::MAX } else { info.size };
        let journal = match &opts.journal_dir {
            Some(dir) if !opts.read_only => {
                let legacy = legacy_journal_path(dir, path, top_storage.file()).map_err(open_err(path))?;
                if thinblk_qcow2::legacy_journal_pending(&legacy) {
                    return Err(FormatError::Qcow2 {
                        path: path.to_path_buf(),
                        source: Qcow2Error::JournalMismatch(format!(
                            "{} is the metadata journal of an earlier thinblk version that did not stop clean; start that version once on this image (it replays the journal and stops clean on SIGTERM), then this one",
                            legacy.display()
                        )),
                    });
                }
                Some(thinblk_qcow2::JournalOptions { dir: dir.clone(), segment_bytes: opts.journal_segment_bytes })
            }
            _ => None,
        };
        // Everything that can refuse the image is checked on a read-only open first (its
        // backing chain, the policy, the alignment): a refused start leaves the image as it
        // was. Only then does the read-write open mark it in use (and replay a journal).
        let peek = Qcow2::open(top_storage.clone(), OpenOptions { read_only: true, ..Default::default() }).map_err(qerr(path))?;
        let mut files = vec![top_storage.file().as_raw_fd()];
        let mut alignment = info.alignment;
        let mut layers = Vec::new();
        let mut next = backing_of(path, peek.header(), opts.backing_files)?;
        while let Some((bpath, bformat)) = next.take() {
            if layers.len() + 1 >= MAX_CHAIN {
                return Err(FormatError::Backing { path: path.to_path_buf(), reason: format!("backing chain deeper than {MAX_CHAIN}") });
            }
            let (bfile, binfo) = open_direct(&bpath, true).map_err(open_err(&bpath))?;
            locks.extend(lock_file(&bfile, &bpath, Access::backing(), opts.locking)?);
            alignment = alignment.max(binfo.alignment);
            files.push(bfile.as_raw_fd());
            let st = storage_for(bfile, &binfo);
            match bformat {
                Format::Raw => layers.push(Layer::Raw(st, binfo.size)),
                Format::Qcow2 => {
                    let img = Qcow2::open(st.clone(), OpenOptions { read_only: true, ..Default::default() })
                        .map_err(qerr(&bpath))?;
                    next = backing_of(&bpath, img.header(), opts.backing_files)?;
                    layers.push(Layer::Qcow2(img, st));
                }
            }
        }
        // Clusters start wherever the cluster size puts them: below the storage's O_DIRECT
        // alignment, data IO into them would fail with EINVAL.
        for cs in std::iter::once(peek.cluster_size()).chain(layers.iter().filter_map(|l| match l {
            Layer::Qcow2(img, _) => Some(img.cluster_size()),
            Layer::Raw(..) => None,
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
        drop(peek);
        let mut top = Qcow2::open(
            top_storage.clone(),
            OpenOptions {
                read_only: opts.read_only,
                l2_cache_bytes: opts.l2_cache_bytes,
                zeroes_from,
                journal,
                refcount_cache_blocks: opts.refcount_cache_blocks,
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
                tracing::warn!(image = %path.display(), "the image was not closed clean and no journal was found (host crash, or no journal kept)");
            }
            if r.leaks_repaired > 0 {
                tracing::warn!(image = %path.display(), clusters = r.leaks_repaired,
                    "gave back clusters allocated for writes that never completed (the last stop was not clean)");
            }
        }
        if let (Some(why), Some(dir)) = (top.journal_unavailable(), &opts.journal_dir) {
            tracing::warn!(image = %path.display(), dir = %dir.display(), "no metadata journal for this image: {why}; completed writes are durable only after a FLUSH");
        }
        if let Some(reason) = top.read_only_reason() {
            if !opts.read_only {
                return Err(FormatError::Qcow2 { path: path.to_path_buf(), source: Qcow2Error::ReadOnly(reason.to_string()) });
            }
        }
        let backing = Arc::new(Chain { layers });
        if !backing.layers.is_empty() {
            top.set_backing(Arc::new(ChainReader(backing.clone())));
        }
        Ok(Qcow2Format {
            top,
            top_storage,
            backing,
            files,
            alignment,
            physical_block_size: info.physical_block_size,
            identity: image_identity(path),
            discard_unmap: opts.discard_unmap,
            _locks: locks,
        })
    }

    /// The engine serving the top image.
    pub fn engine(&self) -> &Qcow2 {
        &self.top
    }

    /// Maps `[offset, offset+len)` of layer `k` (0 = top), `req_off` bytes into the request.
    fn map_layer(&self, k: usize, offset: u64, len: u64, req_off: u64, out: &mut Vec<Extent>) -> Result<(), ImageError> {
        let (img, file) = match k {
            0 => (Some(&self.top), 0u32),
            _ => match self.backing.layers.get(k - 1) {
                Some(Layer::Qcow2(img, _)) => (Some(img), k as u32),
                Some(Layer::Raw(_, size)) => {
                    let n = size.saturating_sub(offset).min(len);
                    if n > 0 {
                        out.push(Extent { req_off, len: n, target: Target::Host { file: k as u32, offset } });
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
                Mapping::Backing => self.map_layer(k + 1, r.guest, r.len, ro, out)?,
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
fn backing_of(path: &Path, h: &thinblk_qcow2::Header, policy: BackingFiles) -> Result<Option<(PathBuf, Format)>, FormatError> {
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

impl Disk for Qcow2Format {
    fn capacity(&self) -> u64 {
        self.top.size()
    }

    fn allocation(&self) -> Option<u64> {
        Some(self.top.allocation())
    }

    fn cache_stats(&self) -> Option<(u64, u64)> {
        let s = self.top.cache_stats();
        Some((s.hits, s.misses))
    }

    fn files(&self) -> Vec<RawFd> {
        self.files.clone()
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
        self.map_layer(0, offset, len, 0, out)
    }

    fn map_write(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<WriteTicket, ImageError> {
        let mut ranges = Vec::new();
        let ticket = self.top.map_write(offset, len, &mut ranges).map_err(to_image_error)?;
        for r in ranges {
            let Mapping::Data(h) = r.mapping else {
                return Err(ImageError::Refused("write mapped to a non-data range".into()));
            };
            out.push(Extent { req_off: r.guest - offset, len: r.len, target: Target::Host { file: 0, offset: h } });
        }
        Ok(WriteTicket(ticket))
    }

    fn write_done(&self, ticket: WriteTicket, ok: bool) -> Result<(), ImageError> {
        self.top.write_done(&ticket.0, ok).map_err(to_image_error)
    }

    fn map_zero(&self, offset: u64, len: u64, req: ZeroRequest, out: &mut Vec<HostZero>) -> Result<WriteTicket, ImageError> {
        // Whole clusters get the zero flag and keep their cluster (no reuse while open);
        // partial ones are zeroed on the host through freshly mapped writes. With
        // `--discard unmap` the flagged clusters' host space is released too.
        let mut partial = Vec::new();
        let mut flagged = Vec::new();
        let ticket = self.top.zero_range(offset, len, &mut partial, &mut flagged).map_err(to_image_error)?;
        if self.discard_unmap && req.may_unmap() {
            let cs = self.top.cluster_size();
            for h in flagged {
                push_coalesced(out, HostZero { file: 0, offset: h, len: cs, mode: ZeroMode::PunchHole });
            }
        }
        for r in partial {
            if let Mapping::Data(h) = r.mapping {
                push_coalesced(out, HostZero { file: 0, offset: h, len: r.len, mode: ZeroMode::WriteZeroes });
            }
        }
        Ok(WriteTicket(ticket))
    }

    fn prepare_flush(&self) -> Result<(), ImageError> {
        self.top.flush_metadata().map_err(to_image_error)
    }

    fn metadata_epoch(&self) -> u64 {
        self.top.metadata_epoch()
    }

    fn close(&self) -> Result<(), ImageError> {
        let (read, evicted) = self.top.refcount_cache_stats();
        tracing::info!(refcount_blocks_read = read, refcount_blocks_evicted = evicted, "closing the qcow2 image");
        self.top.close().map_err(to_image_error)
    }
}

impl Drop for Qcow2Format {
    fn drop(&mut self) {
        // Normally a no-op after `close`; an image dropped without it (a failed start) still
        // writes its metadata back. The journal goes with it once that leaves it empty (the
        // image is marked in use until a `close`, so the next open still repairs leaks).
        if let Err(e) = self.top.flush_metadata() {
            tracing::error!(error = %e, "flushing qcow2 metadata at close failed");
        }
        let _ = self.top_storage.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

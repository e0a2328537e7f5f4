//! Online snapshot: the served chain gains a new top (an overlay the management layer made
//! beforehand, whose backing is the current top), while the guest runs.
//!
//! Order, and why (each step's failure leaves the chain as it was):
//! 1. The overlay is opened, locked as a writer, and checked read-only: a qcow2 whose backing
//!    names the current top (same file, format qcow2), of the same virtual size, within the
//!    backing-file policy, the storage's alignment and the chain depth. Nothing served changes.
//! 2. Its file goes into a free slot of the file table, registered with every device's rings
//!    before any extent can name it.
//! 3. Under the engine's exclusive lock (no map call runs), with no allocating write waiting
//!    for its link (the caller holds writes first, as `ctl freeze` does): the old top's
//!    metadata is written back and synced, then the old top is closed clean (in-use flag
//!    cleared, journal removed); its engine, sealed read-only with its caches warm, becomes
//!    the overlay's first backing layer, and the overlay's engine (opened read-write ahead of
//!    the hold: marked in use, its journal started) takes its place.
//! 4. The overlay's lock becomes the top's; the old top's drops to a backing reader's.
//!
//! A crash anywhere leaves a chain that reads back every completed write: until step 3 ends
//! the old top holds them all (synced); after it, the overlay sits on a clean old top.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use thinblk_qcow2::{FileStorage, OpenOptions, Qcow2};

use crate::chain::{Chain, ChainReader, Layer};
use crate::error::ImageError;
use crate::lock::Access;
use crate::qcow2::{backing_of, lock_file, poisoned, storage_for, Format, Qcow2Format, TopFile, MAX_CHAIN};
use crate::sys::open_direct;

/// What a snapshot did.
#[derive(Clone, Debug)]
pub struct SnapshotReport {
    /// The top before the snapshot (now the overlay's backing file, read-only).
    pub old_top: PathBuf,
    /// The new top.
    pub new_top: PathBuf,
    /// Layers in the chain now, the top included.
    pub depth: usize,
    /// How long map calls were held (the engine's exclusive lock), in microseconds.
    pub switch_us: u64,
    /// Of which: making the old top a layer under the overlay.
    pub open_us: u64,
    /// Of which: writing the old top back, syncing it and closing it clean.
    pub close_us: u64,
}

/// Where a switch's time went, in microseconds.
struct SwitchTimes {
    total: u64,
    open: u64,
    close: u64,
}

fn refused(msg: impl Into<String>) -> ImageError {
    ImageError::Refused(msg.into())
}

/// Whether `path` names the file open as `file` (the same inode, or the same block device).
fn same_file(path: &Path, file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let (a, b) = (std::fs::metadata(path)?, file.metadata()?);
    Ok(if a.file_type().is_block_device() || b.file_type().is_block_device() {
        a.file_type().is_block_device() && b.file_type().is_block_device() && a.rdev() == b.rdev()
    } else {
        a.dev() == b.dev() && a.ino() == b.ino()
    })
}

impl Qcow2Format {
    /// Makes `overlay` the top of the served chain (see the module doc for the order). With
    /// `limit`, the new top's allocation limit (its volume's size, in thin mode) replaces the
    /// old one. `hold` is called once everything that can be done ahead is done, right
    /// before the switch: the caller holds guest writes there (and releases them after this
    /// returns, whatever it returns); an allocating write still waiting for its link refuses
    /// the snapshot.
    pub fn snapshot(&self, overlay: &Path, limit: Option<u64>, hold: &mut dyn FnMut() -> Result<(), String>) -> Result<SnapshotReport, ImageError> {
        let _serial = self.transition.lock().map_err(|_| poisoned())?;
        if self.engine_opts.read_only {
            return Err(refused("the image is served read-only"));
        }
        if *self.commit_job.lock().map_err(|_| poisoned())? {
            return Err(refused("a commit is running on this chain; snapshot once it ends"));
        }
        let cur = self.top_file()?;
        if !crate::disk::Disk::is_active(self) {
            return Err(ImageError::Inactive);
        }
        if cur.backing.layers.len() + 2 > MAX_CHAIN {
            return Err(refused(format!("the chain would be deeper than {MAX_CHAIN}")));
        }
        // 1. Open, lock and check the overlay.
        let (file, info) = open_direct(overlay, false)?;
        let lock = lock_file(&file, overlay, Access::qcow2(true), self.locking)?;
        if info.alignment > self.alignment {
            return Err(refused(format!(
                "{} needs O_DIRECT alignment {}, above the {} the device was set up with",
                overlay.display(),
                info.alignment,
                self.alignment
            )));
        }
        let storage =
            if self.engine_opts.fixed_size { Arc::new(FileStorage::new(file, info.alignment as usize).fixed_size()) } else { storage_for(file, &info) };
        let peek = Qcow2::open(storage.clone(), OpenOptions { read_only: true, ..Default::default() })
            .map_err(|e| refused(format!("{}: {e}", overlay.display())))?;
        let capacity = crate::disk::Disk::capacity(self);
        if peek.size() != capacity {
            return Err(refused(format!(
                "{} has virtual size {}, the disk {}: a snapshot keeps the size",
                overlay.display(),
                peek.size(),
                capacity
            )));
        }
        if peek.cluster_size() < u64::from(self.alignment) {
            return Err(refused(format!("{}: cluster size {} is below the alignment {}", overlay.display(), peek.cluster_size(), self.alignment)));
        }
        if let Some(why) = peek.header().write_blocker() {
            return Err(refused(format!("{}: {why}", overlay.display())));
        }
        match backing_of(overlay, &peek.header(), self.backing_files).map_err(|e| refused(e.to_string()))? {
            Some((bpath, Format::Qcow2)) if same_file(&bpath, cur.storage.file())? => {}
            Some((bpath, Format::Qcow2)) => {
                return Err(refused(format!(
                    "{}'s backing file {} is not the current top {}",
                    overlay.display(),
                    bpath.display(),
                    cur.path.display()
                )))
            }
            Some((_, Format::Raw)) => return Err(refused(format!("{}'s backing format is raw; the top is qcow2", overlay.display()))),
            None => return Err(refused(format!("{} has no backing file; it must be the current top", overlay.display()))),
        }
        drop(peek);

        // Ahead of the hold: the overlay's engine opened (marked in use, its journal made;
        // its backing reader comes at the switch), the old top's metadata written back so
        // that little is left for the switch, and the overlay's file in every ring.
        let staged = TopFile { path: overlay.to_path_buf(), storage, slot: u32::MAX, backing: Arc::new(Chain { layers: Vec::new() }), is_block: info.is_block };
        let engine = self.open_engine(&staged).map_err(ImageError::from)?;
        let discard = |engine: Qcow2| {
            // Never served: closed clean, it is as it was made.
            if let Err(c) = engine.close() {
                tracing::warn!(image = %overlay.display(), error = %c, "closing the unused overlay after a failed snapshot failed");
            }
        };
        let early = (|| {
            let g = self.top.read().map_err(|_| poisoned())?;
            g.engine.as_ref().ok_or(ImageError::Inactive)?.flush_metadata().map_err(|e| refused(format!("writing the old top's metadata back: {e}")))?;
            thinblk_qcow2::Storage::flush(cur.storage.as_ref()).map_err(|e| refused(format!("syncing the old top: {e}")))
        })();
        if let Err(e) = early {
            discard(engine);
            return Err(e);
        }
        let slot = match self.files.add(staged.storage.file().as_raw_fd()) {
            Ok(s) => s,
            Err(e) => {
                discard(engine);
                return Err(ImageError::Io(e));
            }
        };
        let mut ready = Some(engine);
        let switched = match hold() {
            Err(e) => Err(refused(format!("holding writes: {e}"))),
            Ok(()) => self.switch_top(&cur, TopFile { slot, ..staged }, &mut ready, limit),
        };
        let times = match switched {
            Ok(t) => t,
            Err(e) => {
                if let Some(engine) = ready {
                    discard(engine);
                }
                if let Err(r) = self.files.remove(slot) {
                    tracing::warn!(error = %r, "emptying the slot of a refused snapshot failed");
                }
                return Err(e);
            }
        };

        // 4. Locks: the overlay's is the top's now; the old top's drops to a reader's.
        let old_lock = std::mem::replace(&mut *self.top_lock.lock().map_err(|_| poisoned())?, lock);
        if let Some(mut l) = old_lock {
            if let Err(e) = l.change(Access::backing()) {
                tracing::warn!(image = %cur.path.display(), error = %e, "downgrading the old top's lock to a reader's failed");
            }
            self.backing_locks.lock().map_err(|_| poisoned())?.push((cur.path.clone(), l));
        }
        let depth = cur.backing.layers.len() + 2;
        tracing::info!(old_top = %cur.path.display(), new_top = %overlay.display(), depth, switch_us = times.total,
            open_us = times.open, close_us = times.close, "snapshot: the chain has a new top");
        Ok(SnapshotReport {
            old_top: cur.path.clone(),
            new_top: overlay.to_path_buf(),
            depth,
            switch_us: times.total,
            open_us: times.open,
            close_us: times.close,
        })
    }

    /// Step 3: the switch under the engine's exclusive lock (the overlay `top`, its opened
    /// engine in `staged`, taken only on success); where the time went.
    fn switch_top(&self, cur: &Arc<TopFile>, top: TopFile, staged: &mut Option<Qcow2>, limit: Option<u64>) -> Result<SwitchTimes, ImageError> {
        use std::sync::atomic::Ordering;
        let us = |t: Instant| t.elapsed().as_micros() as u64;
        let mut g = match self.top.write() {
            Ok(g) => g,
            Err(_) => return Err(poisoned()),
        };
        let held = Instant::now();
        let Some(old) = g.engine.as_ref() else { return Err(ImageError::Inactive) };
        let out = self.tickets_out.load(Ordering::SeqCst);
        if out > 0 {
            return Err(refused(format!("{out} writes have not ended; writes must be held first")));
        }
        // The old top written back, synced and closed clean; on an error it goes on serving
        // (its flag set again).
        if let Err(e) = old.close() {
            return Err(refused(format!("closing the old top: {e}")));
        }
        let close = us(held);
        let t = Instant::now();
        let Some(mut engine) = staged.take() else { return Err(refused("the overlay's engine is gone")) };
        let Some(old) = g.engine.take() else { return Err(ImageError::Inactive) };
        self.epoch_base.fetch_add(old.metadata_epoch() + 1, Ordering::SeqCst);
        let stats = old.cache_stats();
        self.cache_base.0.fetch_add(stats.hits, Ordering::SeqCst);
        self.cache_base.1.fetch_add(stats.misses, Ordering::SeqCst);
        // The closed engine is the new layer: what it holds is on the storage, and its caches
        // stay warm for the reads that now go through it.
        let ro = old.sealed("a backing layer since a snapshot");
        let mut layers = vec![Arc::new(Layer::Qcow2 { img: ro, st: cur.storage.clone(), slot: cur.slot, path: cur.path.clone() })];
        layers.extend(cur.backing.layers.iter().cloned());
        let backing = Arc::new(Chain { layers });
        engine.set_backing(Arc::new(ChainReader(backing.clone())));
        let new_file = Arc::new(TopFile { backing, ..top });
        let open = us(t);
        if let Some(l) = limit {
            self.limit.store(l, Ordering::SeqCst);
        }
        g.file = new_file;
        self.install(&mut g, engine);
        Ok(SwitchTimes { total: us(held), open, close })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{read_mapped, write_mapped, Disk, Extent, FileListener, Target};
    use crate::qcow2::ImageOptions;
    use crate::test_util::{qemu_img, Dir};
    use std::os::fd::RawFd;
    use std::sync::Mutex;

    const MIB: u64 = 1 << 20;

    #[derive(Default)]
    struct Tables(Mutex<Vec<Vec<RawFd>>>);

    impl FileListener for Tables {
        fn files_changed(&self, table: &[RawFd]) -> std::io::Result<()> {
            self.0.lock().expect("tables").push(table.to_vec());
            Ok(())
        }
    }

    #[test]
    fn a_snapshot_switches_the_top_under_a_listening_device_and_qemu_img_reads_the_chain() {
        let dir = Dir::fresh("snap");
        let (base, over, other) = (dir.0.join("base"), dir.0.join("over"), dir.0.join("other"));
        qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().expect("utf-8"), "16M"]);
        qemu_img(&["create", "-q", "-f", "qcow2", other.to_str().expect("utf-8"), "16M"]);
        let q = Qcow2Format::open(&base, &ImageOptions::default()).expect("open");
        let dev = Arc::new(Tables::default());
        let weak: std::sync::Weak<dyn FileListener> = Arc::downgrade(&dev) as std::sync::Weak<dyn FileListener>;
        q.listen_files(weak).expect("listen");
        let a = vec![0xaau8; 65536];
        write_mapped(&q, 0, &a).expect("write a");
        write_mapped(&q, 3 * MIB, &a).expect("write a at 3M");

        // Refused overlays change nothing.
        let bad = dir.0.join("bad");
        qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", "other", "-F", "qcow2", bad.to_str().expect("utf-8"), "16M"]);
        let e = q.snapshot(&bad, None, &mut || Ok(())).expect_err("backing is not the top");
        assert!(e.to_string().contains("is not the current top"), "{e}");
        let small = dir.0.join("small");
        qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", "base", "-F", "qcow2", small.to_str().expect("utf-8"), "8M"]);
        assert!(q.snapshot(&small, None, &mut || Ok(())).expect_err("size").to_string().contains("keeps the size"));
        assert_eq!(dev.0.lock().expect("tables").len(), 1, "no device heard of a refused snapshot");
        assert_eq!(q.chain(), vec![base.clone()]);

        qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", "base", "-F", "qcow2", over.to_str().expect("utf-8"), "16M"]);
        let r = q.snapshot(&over, None, &mut || Ok(())).expect("snapshot");
        assert_eq!((r.depth, r.new_top.clone()), (2, over.clone()));
        let tables = dev.0.lock().expect("tables").clone();
        assert_eq!(tables.len(), 2);
        assert_eq!(tables[1][0], tables[0][0], "the old top keeps its slot");
        assert!(tables[1][1] >= 0, "the overlay fills a new slot");
        assert_eq!(q.chain(), vec![over.clone(), base.clone()]);
        assert_eq!(q.sync_files(), vec![1], "FLUSH syncs the new top only");

        // Reads come through the old top; writes land in the overlay's slot.
        assert_eq!(read_mapped(&q, 0, 65536).expect("read"), a);
        let mut ext = Vec::new();
        q.map_read(0, 65536, &mut ext).expect("map");
        assert!(matches!(ext[..], [Extent { target: Target::Host { file: 0, .. }, .. }]), "{ext:?}");
        let b = vec![0xbbu8; 65536];
        write_mapped(&q, 0, &b).expect("write b");
        ext.clear();
        q.map_read(0, 65536, &mut ext).expect("map");
        assert!(matches!(ext[..], [Extent { target: Target::Host { file: 1, .. }, .. }]), "{ext:?}");
        assert_eq!(read_mapped(&q, 0, 65536).expect("read"), b);
        assert_eq!(read_mapped(&q, 3 * MIB, 65536).expect("read"), a);
        q.close().expect("close");
        drop(q);

        // qemu-img sees the chain, both images check clean, the base kept its data.
        let info = qemu_img(&["info", "--backing-chain", "--output=json", over.to_str().expect("utf-8")]);
        assert!(info.contains("\"backing-filename\": \"base\""), "{info}");
        qemu_img(&["check", "-q", over.to_str().expect("utf-8")]);
        qemu_img(&["check", "-q", base.to_str().expect("utf-8")]);
        let base_only = Qcow2Format::open(&base, &ImageOptions { read_only: true, ..Default::default() }).expect("base");
        assert_eq!(read_mapped(&base_only, 0, 65536).expect("read"), a);
        drop(base_only);
        let again = Qcow2Format::open(&over, &ImageOptions::default()).expect("reopen the new top");
        assert_eq!(read_mapped(&again, 0, 65536).expect("read"), b);
        assert_eq!(read_mapped(&again, 3 * MIB, 65536).expect("read"), a);
        again.close().expect("close");
    }
}

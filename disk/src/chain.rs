//! A qcow2 image's backing chain as the daemon serves it: the read-only layers under the
//! active top (each with its file's slot in the rings' file table), read synchronously for
//! partial writes, and the file table itself, which a chain change (a snapshot's new top)
//! fills slot by slot, telling every listening device before any extent names a new slot.
//!
//! A slot is emptied only once no extent can name it any more: the file has left the chain
//! (no map call returns it), and every ring refused the change until it had submitted what
//! named it and no bounced read in hand still did (`Engine::set_files`); emptied slots go to
//! the end of the free list, and the table has twice as many slots as the deepest chain.

use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock, Weak};

use thinblk_qcow2::{BackingReader, FileStorage, Mapping, Qcow2, Storage};

use crate::disk::FileListener;
use crate::qcow2::MAX_CHAIN;

/// Slots in every ring's file table for a qcow2 chain: twice the deepest chain, so that a
/// chain as deep as allowed can still gain a top while its old slots wait to be reused.
pub const FILE_SLOTS: usize = 2 * MAX_CHAIN;

/// One read-only layer of a chain. (At most [`MAX_CHAIN`] per image: the size difference
/// between variants does not matter.)
#[allow(clippy::large_enum_variant)]
pub(crate) enum Layer {
    /// A qcow2 layer, its engine opened read-only.
    Qcow2 {
        /// The engine (read-only).
        img: Qcow2,
        /// Its file.
        st: Arc<FileStorage>,
        /// Its slot in the file table.
        slot: u32,
        /// Where it was opened.
        path: PathBuf,
    },
    /// A raw layer.
    Raw {
        /// Its file.
        st: Arc<FileStorage>,
        /// Its size.
        size: u64,
        /// Its slot in the file table.
        slot: u32,
        /// Where it was opened.
        path: PathBuf,
    },
}

impl Layer {
    /// Where the layer's file was opened.
    pub(crate) fn path(&self) -> &std::path::Path {
        match self {
            Layer::Qcow2 { path, .. } | Layer::Raw { path, .. } => path,
        }
    }
}

/// The read-only layers under the served image, top-most first.
pub(crate) struct Chain {
    /// The layers, the top's backing file first (shared with the chains before a change).
    pub(crate) layers: Vec<Arc<Layer>>,
}

impl Chain {
    /// Synchronous read of `buf.len()` bytes at guest `offset`, starting at layer `k`.
    pub(crate) fn read(&self, k: usize, buf: &mut [u8], offset: u64) -> thinblk_qcow2::Result<()> {
        let Some(layer) = self.layers.get(k) else {
            buf.fill(0);
            return Ok(());
        };
        match &**layer {
            Layer::Raw { st, size, .. } => {
                let n = size.saturating_sub(offset).min(buf.len() as u64) as usize;
                st.read_at(&mut buf[..n], offset)?;
                buf[n..].fill(0);
            }
            Layer::Qcow2 { img, st, .. } => {
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

/// The top engine's view of what lies under it.
pub(crate) struct ChainReader(pub(crate) Arc<Chain>);

impl BackingReader for ChainReader {
    fn read(&self, buf: &mut [u8], offset: u64) -> thinblk_qcow2::Result<()> {
        self.0.read(0, buf, offset)
    }
}

/// The file table (slot → fd) and the devices that registered it.
pub(crate) struct FileTable {
    /// The table, read by every FLUSH and device creation.
    fds: RwLock<Vec<RawFd>>,
    /// Serialises changes and subscriptions; holds the listeners.
    change: Mutex<Listeners>,
}

struct Listeners {
    listeners: Vec<Weak<dyn FileListener>>,
    /// Slots emptied by a chain change, oldest first (reused last).
    freed: std::collections::VecDeque<u32>,
}

fn poisoned() -> io::Error {
    io::Error::other("file table state poisoned")
}

impl FileTable {
    /// A table holding `fds` in its first slots.
    pub(crate) fn new(fds: Vec<RawFd>) -> FileTable {
        FileTable { fds: RwLock::new(fds), change: Mutex::new(Listeners { listeners: Vec::new(), freed: Default::default() }) }
    }

    /// The table now.
    pub(crate) fn files(&self) -> Vec<RawFd> {
        self.fds.read().map(|t| t.clone()).unwrap_or_default()
    }

    /// Subscribes `l`, giving it the table now first (serialised with changes).
    pub(crate) fn listen(&self, l: Weak<dyn FileListener>) -> io::Result<()> {
        let mut g = self.change.lock().map_err(|_| poisoned())?;
        if let Some(strong) = l.upgrade() {
            strong.files_changed(&self.files())?;
            g.listeners.retain(|w| w.strong_count() > 0);
            g.listeners.push(l);
        }
        Ok(())
    }

    /// Puts `fd` into a free slot, registered with every listening device before this
    /// returns; the slot, or an error (no device changed, the table unchanged).
    pub(crate) fn add(&self, fd: RawFd) -> io::Result<u32> {
        let mut g = self.change.lock().map_err(|_| poisoned())?;
        let old = self.files();
        // A slot never used first, then the longest-freed one.
        let slot = if old.len() < FILE_SLOTS {
            old.len() as u32
        } else {
            g.freed.pop_front().ok_or_else(|| io::Error::other(format!("all {FILE_SLOTS} file slots are in use")))?
        };
        let mut new = old.clone();
        if new.len() <= slot as usize {
            new.resize(slot as usize + 1, -1);
        }
        new[slot as usize] = fd;
        Self::tell(&mut g, &old, &new)?;
        *self.fds.write().map_err(|_| poisoned())? = new;
        Ok(slot)
    }

    /// Empties `slot` (no extent names it any more), telling every listening device.
    pub(crate) fn remove(&self, slot: u32) -> io::Result<()> {
        let mut g = self.change.lock().map_err(|_| poisoned())?;
        let old = self.files();
        let mut new = old.clone();
        if let Some(f) = new.get_mut(slot as usize) {
            *f = -1;
        }
        Self::tell(&mut g, &old, &new)?;
        *self.fds.write().map_err(|_| poisoned())? = new;
        g.freed.push_back(slot);
        Ok(())
    }

    /// Gives `new` to every live listener; on an error those already told get `old` back.
    fn tell(g: &mut Listeners, old: &[RawFd], new: &[RawFd]) -> io::Result<()> {
        g.listeners.retain(|w| w.strong_count() > 0);
        let live: Vec<Arc<dyn FileListener>> = g.listeners.iter().filter_map(|w| w.upgrade()).collect();
        for (i, l) in live.iter().enumerate() {
            if let Err(e) = l.files_changed(new) {
                for done in &live[..i] {
                    if let Err(back) = done.files_changed(old) {
                        tracing::warn!(error = %back, "restoring a device's file table after a refused change failed");
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Seen(Mutex<Vec<Vec<RawFd>>>, bool);

    impl FileListener for Seen {
        fn files_changed(&self, table: &[RawFd]) -> io::Result<()> {
            self.0.lock().expect("seen").push(table.to_vec());
            if self.1 && table.contains(&99) {
                return Err(io::Error::other("refused"));
            }
            Ok(())
        }
    }

    #[test]
    fn listeners_hear_every_change_and_a_refusal_rolls_back() {
        let t = FileTable::new(vec![10, 11]);
        let a = Arc::new(Seen(Mutex::new(Vec::new()), false));
        let weak: Weak<dyn FileListener> = Arc::downgrade(&a) as Weak<dyn FileListener>;
        t.listen(weak).expect("listen");
        assert_eq!(t.add(12).expect("add"), 2);
        t.remove(1).expect("remove");
        assert_eq!(*a.0.lock().expect("seen"), vec![vec![10, 11], vec![10, 11, 12], vec![10, -1, 12]]);
        // A device that refuses: the table stays, the device told first gets the old one back.
        let b = Arc::new(Seen(Mutex::new(Vec::new()), true));
        let weak: Weak<dyn FileListener> = Arc::downgrade(&b) as Weak<dyn FileListener>;
        t.listen(weak).expect("listen");
        assert!(t.add(99).is_err());
        assert_eq!(t.files(), vec![10, -1, 12]);
        assert_eq!(a.0.lock().expect("seen").last(), Some(&vec![10, -1, 12]), "rolled back");
        // A freed slot is reused only when no never-used slot is left.
        drop(b);
        assert_eq!(t.add(13).expect("add"), 3);
        assert_eq!(t.files(), vec![10, -1, 12, 13]);
    }
}

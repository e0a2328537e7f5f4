//! Changing an image's backing file name and format in place, as `qemu-img rebase -u -b NAME
//! -F FORMAT` does: how a live merge points the layer above a merged one at the merge's base.
//!
//! # The crash-safety rule
//!
//! The caller first makes the NEW backing file's data durable (the commit base synced), and
//! keeps the OLD chain intact until the change returns; the change syncs the image
//! (`Storage::flush`, an fdatasync) before it returns. A crash at any instant then leaves
//! the image naming either its old backing file with the old format or the new one with the
//! new format, never a third chain:
//!
//! - Every byte that a reader of the header interprets and that changes (header fields
//!   8..20, the offset and length of the name; the backing format extension; any extension
//!   the change moves) must lie in the first [`ATOMIC_HEADER_BYTES`] bytes, and they change
//!   by ONE write at offset 0 of the bytes up to the last one that changes. A 512-byte
//!   sector is written whole or not at all (the assumption QEMU and file systems make of
//!   disks). Where the storage widens the write (an O_DIRECT bounce buffer, a 4 KiB sector, a
//!   page of a file's cache), every other byte it covers is already on disk as written.
//! - The name itself usually lies past byte 512: QEMU puts a 392-byte feature name table
//!   after the header, so its images name their backing file from byte 528 on. The new name
//!   goes where the current header reads nothing (past the extensions' end marker, off the
//!   current name) and is written and synced BEFORE the header write: a crash in between
//!   leaves the old header, which does not read those bytes.
//! - Anything else is refused with [`Qcow2Error::HeaderRewrite`] before a byte is written:
//!   a change that moves extensions past byte 512 (a format extension added after QEMU's
//!   feature table, or removed ahead of it; a format name of another padded length). One
//!   write spanning two sectors cannot be made safe: torn with the first sector new and the
//!   name's sector old, QEMU reads the zeroes there as an empty name, which it takes for no
//!   backing file at all, and the guest would read zeroes where the backing file had data.
//!   `qemu-img rebase -u` does such changes offline (it writes the whole header cluster in
//!   one write, and accepts its torn states).
//!
//! docs/decisions.md (*Backing file changes: the header commits in one sector*) records why.

use crate::error::{Qcow2Error, Result};
use crate::header::{autoclear, incompat, Header, Owner, MAX_BACKING_NAME};

/// Largest backing file name QEMU reads.
const MAX_NAME: usize = MAX_BACKING_NAME as usize;
use crate::storage::Storage;

/// The bytes at the start of an image whose write is assumed atomic: one sector.
pub const ATOMIC_HEADER_BYTES: usize = 512;

fn refuse<T>(why: impl Into<String>) -> Result<T> {
    Err(Qcow2Error::HeaderRewrite(why.into()))
}

/// How a header rewrite is written: `stage` (a byte range of the new bytes) first, where the
/// current header reads nothing, and synced; then the first `commit` new bytes at offset 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Bytes written and synced before the header changes.
    pub stage: Option<(usize, usize)>,
    /// Bytes written at offset 0 (at most [`ATOMIC_HEADER_BYTES`]); 0: none.
    pub commit: usize,
}

/// The writes that turn `first` (the first cluster as read, `header` parsed from it) into
/// `new` (from [`Header::with_backing`]) under the rule of this module, or why they cannot.
pub(crate) fn plan(first: &[u8], header: &Header, new: &[u8]) -> Result<Plan> {
    let Some((_, ext_end)) = header.extension_list(first) else {
        return refuse("the header extensions overrun the first cluster");
    };
    let name = Header::backing_name_range(first);
    let read = |i: usize| i < ext_end || name.is_some_and(|(at, len)| i >= at && i < at + len);
    let mut plan = Plan { stage: None, commit: 0 };
    for (i, (n, o)) in new.iter().zip(first).enumerate() {
        if n == o {
            continue;
        }
        if i < ATOMIC_HEADER_BYTES {
            plan.commit = i + 1;
        } else {
            plan.stage = Some(plan.stage.map_or((i, i + 1), |(s, _)| (s, i + 1)));
        }
    }
    if let Some((s, e)) = plan.stage {
        if (s..e).any(read) {
            return refuse(format!(
                "the change moves bytes past the first {ATOMIC_HEADER_BYTES} that the header reads now (its extensions end at byte {ext_end}), which cannot be written crash-safely in place; use qemu-img rebase -u while nothing uses the image"
            ));
        }
    }
    Ok(plan)
}

/// Why `backing` cannot be written at all, if it cannot.
fn check_request(backing: Option<(&str, &str)>) -> Result<()> {
    let Some((name, format)) = backing else { return Ok(()) };
    if name.is_empty() {
        return refuse("an empty backing file name (no backing file is None)");
    }
    if name.len() > MAX_NAME {
        return refuse(format!("a backing file name of {} bytes (QEMU reads at most {MAX_NAME})", name.len()));
    }
    if format.is_empty() {
        return refuse("an empty backing format");
    }
    if name.contains('\0') || format.contains('\0') {
        return refuse("a NUL byte in the backing file name or format");
    }
    Ok(())
}

/// Changes the backing file of the image on `storage` whose first cluster `first` (and the
/// `header` parsed from it) was just read, by the rule of this module: checks everything,
/// writes, syncs. Returns the header now on disk.
pub(crate) fn rewrite(storage: &dyn Storage, first: &[u8], header: &Header, backing: Option<(&str, &str)>) -> Result<Header> {
    check_request(backing)?;
    let Some(new) = header.with_backing(first, backing) else {
        return refuse(format!("no room for the backing file name and format in the first cluster ({} bytes)", header.cluster_size()));
    };
    let plan = plan(first, header, &new)?;
    // What the image will hold, checked before anything is written.
    let mut image = first.to_vec();
    image[..new.len()].copy_from_slice(&new);
    let after = Header::parse(&image, storage.size()?)?;
    if after.backing_file.as_deref() != backing.map(|b| b.0) || after.backing_format.as_deref() != backing.map(|b| b.1) {
        return refuse("the rewritten header does not read back as asked");
    }
    if let Some((s, e)) = plan.stage {
        storage.write_at(&new[s..e], s as u64)?;
        storage.flush()?;
    }
    if plan.commit > 0 {
        storage.write_at(&new[..plan.commit], 0)?;
    }
    storage.flush()?;
    Ok(after)
}

/// Changes the backing file name and format of the qcow2 image on `storage` (None: no
/// backing file), which no engine has open for writing, as `qemu-img rebase -u -b NAME -F
/// FORMAT` does, by the crash-safety rule of this module: the caller has synced the new
/// backing file's data and keeps the old chain until this returns, and holds the image so
/// that nobody else writes it (its write lock); the image is synced before this returns.
///
/// Refused, with nothing written: an image marked corrupt ([`Qcow2Error::ReadOnly`]), one
/// thinblk has open for writing or did not close clean (change it through that process's
/// [`crate::Qcow2::change_backing`], or open and close it once), and every change the rule
/// or the first cluster's room do not allow ([`Qcow2Error::HeaderRewrite`]).
pub fn change_backing_file(storage: &dyn Storage, backing: Option<(&str, &str)>) -> Result<()> {
    let (first, header) = crate::image::read_header(storage)?;
    if header.incompatible_features & incompat::CORRUPT != 0 {
        return Err(Qcow2Error::ReadOnly("marked corrupt; repair it with qemu-img check -r all".into()));
    }
    let in_use = header.autoclear_features & autoclear::THINBLK != 0 && header.owner.is_some_and(|o| o.flags & Owner::IN_USE != 0);
    if in_use {
        return refuse(
            "thinblk has the image open for writing, or did not close it clean: change it through that process, or open and close it once",
        );
    }
    rewrite(storage, &first, &header, backing).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{create, CreateOptions};
    use crate::storage::MemStorage;

    /// A QEMU-like header: 64 KiB clusters, the backing format extension first, a 384-byte
    /// feature name table, thinblk's owner extension, the end marker, then the name (so the
    /// name lies past byte 512, as in every image qemu-img makes).
    fn qemu_like(name: &str, format: &str) -> MemStorage {
        let st = MemStorage::new(vec![0u8; 4 << 16]);
        create(&st, &CreateOptions { size: 1 << 30, cluster_size: 65536, backing: None }).expect("create");
        let mut b = vec![0u8; 4096];
        st.read_at(&mut b, 0).expect("read");
        let mut at = 112;
        let mut put = |b: &mut Vec<u8>, kind: u32, data: &[u8]| {
            b[at..at + 4].copy_from_slice(&kind.to_be_bytes());
            b[at + 4..at + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
            b[at + 8..at + 8 + data.len()].copy_from_slice(data);
            at += 8 + data.len().div_ceil(8) * 8;
        };
        put(&mut b, 0xe279_2aca, format.as_bytes());
        let table: Vec<u8> = (0..384u32).map(|i| (i % 7) as u8 + 1).collect();
        put(&mut b, 0x6803_f857, &table);
        let owner = Owner { offset: 0, uuid: [3; 16], generation: 9, flags: 0 };
        put(&mut b, 0x7468_6e62, &owner.encode());
        b[at..at + 8].fill(0);
        at += 8;
        b[8..16].copy_from_slice(&(at as u64).to_be_bytes());
        b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        b[at..at + name.len()].copy_from_slice(name.as_bytes());
        b[88..96].copy_from_slice(&autoclear::THINBLK.to_be_bytes());
        st.write_at(&b, 0).expect("write");
        st
    }

    fn header_of(st: &dyn Storage) -> (Vec<u8>, Header) {
        crate::image::read_header(st).expect("header")
    }

    /// Writes (offset, bytes) and syncs (None), in order.
    type Log = Vec<Option<(u64, Vec<u8>)>>;

    /// Records writes and syncs, so every state a crash could leave can be rebuilt.
    struct Recorder {
        mem: MemStorage,
        log: std::sync::Mutex<Log>,
    }

    impl Storage for Recorder {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.mem.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.log.lock().expect("log").push(Some((offset, buf.to_vec())));
            self.mem.write_at(buf, offset)
        }
        fn flush(&self) -> std::io::Result<()> {
            self.log.lock().expect("log").push(None);
            Ok(())
        }
        fn size(&self) -> std::io::Result<u64> {
            self.mem.size()
        }
    }

    /// Every state a crash can leave: the writes before the last sync that preceded the
    /// crash applied, and of the ones after it any subset of their 512-byte sectors.
    fn crash_states(before: &[u8], log: &[Option<(u64, Vec<u8>)>]) -> Vec<Vec<u8>> {
        let mut states = Vec::new();
        let mut durable = before.to_vec();
        let mut pending: Vec<(u64, Vec<u8>)> = Vec::new();
        let apply = |img: &mut Vec<u8>, off: u64, data: &[u8], keep: &dyn Fn(usize) -> bool| {
            for (i, &byte) in data.iter().enumerate() {
                let at = off as usize + i;
                if keep(at / 512) {
                    img[at] = byte;
                }
            }
        };
        for ev in log.iter().chain(std::iter::once(&None)) {
            // A crash before this event: any subset of the pending writes' sectors.
            let sectors: Vec<usize> = {
                let mut s: Vec<usize> = pending
                    .iter()
                    .flat_map(|(off, d)| (*off as usize / 512)..(*off as usize + d.len()).div_ceil(512))
                    .collect();
                s.sort_unstable();
                s.dedup();
                s
            };
            assert!(sectors.len() <= 12, "too many sectors to enumerate");
            for mask in 0u32..(1 << sectors.len()) {
                let mut img = durable.clone();
                for (off, d) in &pending {
                    apply(&mut img, *off, d, &|s| sectors.iter().position(|&x| x == s).is_some_and(|k| mask & (1 << k) != 0));
                }
                states.push(img);
            }
            match ev {
                Some((off, d)) => pending.push((*off, d.clone())),
                None => {
                    for (off, d) in pending.drain(..) {
                        apply(&mut durable, off, &d, &|_| true);
                    }
                }
            }
        }
        states
    }

    /// Changes the backing of `st` and checks that every crash state reads as the old chain
    /// or the new one (or not at all), and that the header write is one write at offset 0
    /// within the first 512 bytes.
    fn change_and_crash(st: MemStorage, to: Option<(&str, &str)>) -> Result<()> {
        let before = st.snapshot();
        let (_, h0) = header_of(&st);
        let old = (h0.backing_file.clone(), h0.backing_format.clone());
        let rec = Recorder { mem: st, log: std::sync::Mutex::new(Vec::new()) };
        change_backing_file(&rec, to)?;
        let log = rec.log.lock().expect("log").clone();
        let writes: Vec<&(u64, Vec<u8>)> = log.iter().flatten().collect();
        let header_writes: Vec<_> = writes.iter().filter(|(off, _)| *off == 0).collect();
        assert_eq!(header_writes.len(), 1, "one write at offset 0");
        assert!(header_writes[0].1.len() <= ATOMIC_HEADER_BYTES);
        assert_eq!(log.last(), Some(&None), "synced before returning");
        let new = (to.map(|b| b.0.to_string()), to.map(|b| b.1.to_string()));
        for img in crash_states(&before, &log) {
            if let Ok(h) = Header::parse(&img, img.len() as u64) {
                let got = (h.backing_file.clone(), h.backing_format.clone());
                assert!(got == old || got == new, "a crash state names {got:?}");
                assert_eq!(h.owner.map(|o| o.uuid), h0.owner.map(|o| o.uuid), "owner extension intact");
            }
        }
        let (_, h1) = header_of(&rec.mem);
        assert_eq!((h1.backing_file, h1.backing_format), new);
        Ok(())
    }

    #[test]
    fn a_qemu_layout_rebase_stages_the_name_then_commits_in_one_sector() {
        let st = qemu_like("mid.qcow2", "qcow2");
        let (first, h) = header_of(&st);
        let new = h.with_backing(&first, Some(("base.qcow2", "qcow2"))).expect("fits");
        let p = plan(&first, &h, &new).expect("plan");
        let (s, e) = p.stage.expect("the name is staged");
        assert!(s >= 512 && e - s == "base.qcow2".len(), "{p:?}");
        assert_eq!(p.commit, 20, "only the offset and length of the name change in the header");
        change_and_crash(qemu_like("mid.qcow2", "qcow2"), Some(("base.qcow2", "qcow2"))).expect("changed");
        // Another format of the same padded length: in place, in the first sector.
        change_and_crash(qemu_like("mid.qcow2", "qcow2"), Some(("base.raw", "raw"))).expect("changed");
        // oVirt's names: bare volume uuids, all of one length.
        change_and_crash(
            qemu_like("6b2c1c1e-0d41-4bb4-b0a1-2f1f6b0e3a11", "qcow2"),
            Some(("0f6d8c4a-7b3e-4c1e-9b55-3c0d1e2f4a5b", "qcow2")),
        )
        .expect("changed");
    }

    #[test]
    fn changes_that_would_move_extensions_past_the_first_sector_are_refused_unwritten() {
        for to in [None, Some(("base.qcow2", "a-format-name-longer-than-8"))] {
            let st = qemu_like("mid.qcow2", "qcow2");
            let before = st.snapshot();
            let err = change_backing_file(&st, to).expect_err("refused");
            assert!(matches!(err, Qcow2Error::HeaderRewrite(_)), "{err}");
            assert!(st.snapshot() == before, "nothing written");
        }
    }

    #[test]
    fn a_header_within_one_sector_takes_any_change_in_one_write() {
        let st = || {
            let st = MemStorage::new(vec![0u8; 4 << 16]);
            let backing = Some(("mid.qcow2".to_string(), "qcow2".to_string()));
            create(&st, &CreateOptions { size: 1 << 30, cluster_size: 65536, backing }).expect("create");
            st
        };
        change_and_crash(st(), Some(("base.qcow2", "qcow2"))).expect("changed");
        change_and_crash(st(), Some(("base.img", "raw"))).expect("changed");
        change_and_crash(st(), None).expect("removed");
        let plain = MemStorage::new(vec![0u8; 4 << 16]);
        create(&plain, &CreateOptions { size: 1 << 30, cluster_size: 65536, backing: None }).expect("create");
        change_and_crash(plain, Some(("base.qcow2", "qcow2"))).expect("added");
    }

    #[test]
    fn bad_requests_and_images_in_use_are_refused() {
        let st = qemu_like("mid.qcow2", "qcow2");
        let long = "n".repeat(1024);
        for to in [Some(("", "qcow2")), Some((long.as_str(), "qcow2")), Some(("a\0b", "qcow2")), Some(("base", ""))] {
            assert!(matches!(change_backing_file(&st, to), Err(Qcow2Error::HeaderRewrite(_))), "{to:?}");
        }
        // The owner extension says a thinblk process has it open for writing.
        let mut flag = [0u8; 8];
        let (_, h) = header_of(&st);
        let o = h.owner.expect("owner");
        flag.copy_from_slice(&Owner::IN_USE.to_be_bytes());
        st.write_at(&flag, o.offset + 24).expect("write");
        let err = change_backing_file(&st, Some(("base.qcow2", "qcow2"))).expect_err("in use");
        assert!(err.to_string().contains("open for writing"), "{err}");
    }
}

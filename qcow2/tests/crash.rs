//! Crash consistency: every write and sync the engine (and the data path) issues is recorded;
//! copies of the image are rebuilt from random cut points — everything up to the last sync,
//! plus a random subset of the writes after it — and each copy must pass `qemu-img check`
//! with no corruption (leaks allowed), and every write acknowledged before the last completed
//! guest FLUSH must read back.

mod common;

use common::Rng;

use std::io;
use std::sync::{Arc, Mutex};

use thinblk_qcow2::{create, CreateOptions, Mapping, MemStorage, OpenOptions, Qcow2, Storage};

#[derive(Clone)]
enum Event {
    Write(u64, Vec<u8>),
    Sync,
    /// A guest FLUSH completed; the model (and which sectors it covers) at that moment.
    FlushDone(usize),
}

/// Records every write and sync on top of an in-memory image.
struct Recorder {
    live: MemStorage,
    log: Mutex<Vec<Event>>,
}

impl Storage for Recorder {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.live.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Ok(mut l) = self.log.lock() {
            l.push(Event::Write(offset, buf.to_vec()));
        }
        self.live.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        if let Ok(mut l) = self.log.lock() {
            l.push(Event::Sync);
        }
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        self.live.size()
    }
}


fn apply(img: &mut Vec<u8>, off: u64, data: &[u8]) {
    let end = off as usize + data.len();
    if img.len() < end {
        img.resize(end, 0);
    }
    img[off as usize..end].copy_from_slice(data);
}

fn read_guest(bytes: Vec<u8>, off: u64, len: usize) -> Vec<u8> {
    let st = Arc::new(MemStorage::new(bytes));
    let img = Qcow2::open(st.clone(), OpenOptions { read_only: true, ..Default::default() }).expect("reopen copy");
    let mut out = vec![0u8; len];
    let mut ranges = Vec::new();
    img.map_read(off, len as u64, &mut ranges).expect("map");
    for r in ranges {
        let s = (r.guest - off) as usize;
        let dst = &mut out[s..s + r.len as usize];
        match r.mapping {
            Mapping::Data(h) => st.read_at(dst, h).expect("read"),
            _ => dst.fill(0),
        }
    }
    out
}

/// A guest write through the engine: map, write the data, link.
fn write_op(img: &Qcow2, st: &dyn Storage, off: u64, data: &[u8]) {
    let mut ranges = Vec::new();
    let t = img.map_write(off, data.len() as u64, &mut ranges).expect("map_write");
    for r in &ranges {
        let Mapping::Data(h) = r.mapping else { panic!("write mapped to {:?}", r.mapping) };
        let s = (r.guest - off) as usize;
        st.write_at(&data[s..s + r.len as usize], h).unwrap();
    }
    img.write_done(&t, true).unwrap();
}

/// A guest discard / write-zeroes through the engine.
fn zero_op(img: &Qcow2, st: &dyn Storage, off: u64, len: u64) {
    let mut partial = Vec::new();
    let t = img.zero_range(off, len, &mut partial, &mut Vec::new()).expect("zero");
    for r in &partial {
        let Mapping::Data(h) = r.mapping else { panic!("zeroing mapped to {:?}", r.mapping) };
        st.write_at(&vec![0u8; r.len as usize], h).unwrap();
    }
    img.write_done(&t, true).unwrap();
}

fn scenario(cluster: u64, size: u64, ops: usize, cuts: usize, seed: u64) {
    let base = MemStorage::default();
    create(&base, &CreateOptions { size, cluster_size: cluster, backing: None }).expect("create");
    let initial = base.snapshot();
    let rec = Arc::new(Recorder { live: MemStorage::new(initial.clone()), log: Mutex::new(Vec::new()) });
    let img = Qcow2::open(rec.clone(), OpenOptions { zeroes_from: initial.len() as u64, ..Default::default() }).expect("open");
    let mut rng = Rng(seed);
    let mut model = vec![0u8; size as usize];
    let mut models: Vec<Vec<u8>> = Vec::new();
    // Guest-level modifications, by sector, with the log index at which they started.
    let mut touched: Vec<(usize, u64, u64)> = Vec::new();
    for i in 0..ops {
        let start_ev = rec.log.lock().unwrap().len();
        let sectors = 1 + rng.below(3 * cluster / 512 + 2);
        let off = rng.below(size / 512 - sectors) * 512;
        let len = sectors * 512;
        match rng.below(12) {
            0 => {
                zero_op(&img, rec.as_ref(), off, len);
                model[off as usize..(off + len) as usize].fill(0);
            }
            3 => {
                // Churn: discard, then rewrite the same range (in place since the fix).
                zero_op(&img, rec.as_ref(), off, len);
                let data: Vec<u8> = (0..len).map(|j| (i as u64 * 17 + j) as u8 | 1).collect();
                write_op(&img, rec.as_ref(), off, &data);
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            1 | 2 => {
                // Guest FLUSH: metadata in order, then the data path's fdatasync.
                img.flush_metadata().expect("flush");
                rec.flush().unwrap();
                models.push(model.clone());
                rec.log.lock().unwrap().push(Event::FlushDone(models.len() - 1));
                continue;
            }
            _ => {
                let data: Vec<u8> = (0..len).map(|j| (i as u64 * 31 + j) as u8 | 1).collect();
                write_op(&img, rec.as_ref(), off, &data);
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
        }
        touched.push((start_ev, off, len));
    }
    let log = rec.log.lock().unwrap().clone();
    let dir = std::env::temp_dir().join(format!("thinblk-crash-{}-{cluster}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Removed even when an assertion fails.
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let mut checked_flushes = 0;
    for n in 0..cuts {
        let cut = 1 + rng.below(log.len() as u64) as usize;
        let last_sync = log[..cut].iter().rposition(|e| matches!(e, Event::Sync));
        let mut copy = initial.clone();
        for (k, e) in log[..cut].iter().enumerate() {
            if let Event::Write(off, data) = e {
                let durable = last_sync.is_some_and(|s| k < s);
                if durable || rng.below(2) == 0 {
                    apply(&mut copy, *off, data);
                }
            }
        }
        let path = dir.join(format!("cut-{n}.qcow2"));
        std::fs::write(&path, &copy).unwrap();
        let out = std::process::Command::new("qemu-img").args(["check", path.to_str().unwrap()]).output().unwrap();
        let code = out.status.code().unwrap_or(-1);
        assert!(code == 0 || code == 3, "cut {cut}/{}: qemu-img check exit {code}:\n{}", log.len(), String::from_utf8_lossy(&out.stdout));
        std::fs::remove_file(&path).unwrap();
        // The last guest FLUSH that completed before the cut.
        let done = log[..cut].iter().rev().find_map(|e| match e {
            Event::FlushDone(m) => Some(*m),
            _ => None,
        });
        if let Some(m) = done {
            let flush_at = log.iter().position(|e| matches!(e, Event::FlushDone(x) if *x == m)).unwrap();
            let got = read_guest(copy, 0, size as usize);
            let want = &models[m];
            for s in 0..(size / 512) {
                let (a, b) = ((s * 512) as usize, (s * 512 + 512) as usize);
                let later = touched.iter().any(|&(ev, off, len)| ev > flush_at && ev < cut && off <= s * 512 && s * 512 < off + len);
                if !later {
                    assert!(got[a..b] == want[a..b], "cut {cut}: sector {s} lost data acknowledged before FLUSH {m}");
                }
            }
            checked_flushes += 1;
        }
    }
    assert!(checked_flushes > cuts / 4, "too few cuts after a completed flush ({checked_flushes})");
}

#[test]
fn small_clusters_with_refcount_growth() {
    // 512-byte clusters: refcount blocks and the refcount table grow during the run.
    scenario(512, 2 << 20, 400, 120, 0x1234_5678);
}

#[test]
fn four_k_clusters() {
    scenario(4096, 4 << 20, 300, 100, 0x9abc_def0);
}

//! The engine against qemu-img / qemu-io: images we write must check clean and compare
//! equal to a raw reference; images QEMU writes must read back exactly.

mod common;

use common::{run, Dir, Rng};

use std::path::Path;
use std::sync::Arc;

use thinblk_qcow2::{check, create, CreateOptions, FileStorage, Mapping, OpenOptions, Qcow2, Storage};

fn qemu_img_check(p: &Path) -> (i32, String) {
    run("qemu-img", &["check", p.to_str().unwrap()])
}

/// Moves data synchronously for the mapped ranges: a stand-in for the io_uring data path.
struct Disk {
    img: Qcow2,
    st: Arc<FileStorage>,
}

impl Disk {
    fn open(p: &Path, read_only: bool) -> Disk {
        let f = std::fs::OpenOptions::new().read(true).write(!read_only).open(p).unwrap();
        let size = f.metadata().unwrap().len();
        let st = Arc::new(FileStorage::new(f, 1));
        let img = Qcow2::open(st.clone(), OpenOptions { read_only, zeroes_from: size, ..Default::default() }).unwrap();
        Disk { img, st }
    }

    fn write(&self, off: u64, data: &[u8]) {
        let mut ranges = Vec::new();
        let ticket = self.img.map_write(off, data.len() as u64, &mut ranges).unwrap();
        for r in &ranges {
            let Mapping::Data(h) = r.mapping else { panic!("write mapped to {:?}", r.mapping) };
            let s = (r.guest - off) as usize;
            self.st.write_at(&data[s..s + r.len as usize], h).unwrap();
        }
        self.img.write_done(&ticket, true).unwrap();
    }

    fn read(&self, off: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        let mut ranges = Vec::new();
        self.img.map_read(off, len as u64, &mut ranges).unwrap();
        let cs = self.img.cluster_size();
        for r in &ranges {
            let s = (r.guest - off) as usize;
            let dst = &mut out[s..s + r.len as usize];
            match r.mapping {
                Mapping::Data(h) => self.st.read_at(dst, h).unwrap(),
                Mapping::Zero | Mapping::Backing => dst.fill(0),
                Mapping::Compressed(e) => {
                    let c = self.img.read_compressed(e).unwrap();
                    let a = (r.guest % cs) as usize;
                    dst.copy_from_slice(&c[a..a + r.len as usize]);
                }
            }
        }
        out
    }

    fn zero(&self, off: u64, len: u64) {
        let mut partial = Vec::new();
        let ticket = self.img.zero_range(off, len, &mut partial, &mut Vec::new()).unwrap();
        for r in &partial {
            let Mapping::Data(h) = r.mapping else { panic!() };
            self.st.write_at(&vec![0u8; r.len as usize], h).unwrap();
        }
        self.img.write_done(&ticket, true).unwrap();
    }
}


fn new_image(p: &Path, size: u64, cs: u64) {
    let f = std::fs::File::create(p).unwrap();
    let st = FileStorage::new(f, 1);
    create(&st, &CreateOptions { size, cluster_size: cs, backing: None }).unwrap();
}

#[test]
fn created_images_check_clean_and_match_qemu_info() {
    let d = Dir::new("create");
    for (size, cs) in [(1u64 << 30, 65536u64), (100 << 20, 512), (8 << 30, 2 << 20), (1 << 40, 65536)] {
        let p = d.path(&format!("c-{cs}.qcow2"));
        new_image(&p, size, cs);
        let (code, text) = qemu_img_check(&p);
        assert_eq!(code, 0, "size {size} cs {cs}: {text}");
        let (_, info) = run("qemu-img", &["info", p.to_str().unwrap()]);
        assert!(info.contains(&format!("({size} bytes)")), "{info}");
        assert!(info.contains(&format!("cluster_size: {cs}")), "{info}");
        let r = check(&FileStorage::new(std::fs::File::open(&p).unwrap(), 1)).unwrap();
        assert_eq!(r.exit_code(), 0, "{:?}", r.messages);
        let disk = Disk::open(&p, false);
        assert_eq!(disk.img.allocation(), r.image_end_offset);
    }
}

#[test]
fn random_workload_checks_clean_and_compares_equal() {
    let d = Dir::new("random");
    let size = 64u64 << 20;
    for cs in [4096u64, 65536] {
        let p = d.path("w.qcow2");
        let raw = d.path("ref.raw");
        new_image(&p, size, cs);
        let mut reference = vec![0u8; size as usize];
        let disk = Disk::open(&p, false);
        let mut rng = Rng(0xabcdef ^ cs);
        for i in 0..400 {
            let len = (1 + rng.next() % 64) * 512;
            let off = (rng.next() % ((size - len) / 512)) * 512;
            if i % 7 == 6 {
                disk.zero(off, len);
                reference[off as usize..(off + len) as usize].fill(0);
            } else {
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data);
                disk.write(off, &data);
                reference[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            if i % 50 == 0 {
                disk.img.flush_metadata().unwrap();
            }
        }
        disk.img.flush_metadata().unwrap();
        assert!(disk.read(0, size as usize) == reference, "read-back differs (cs {cs})");
        let alloc = disk.img.allocation();
        drop(disk);
        std::fs::write(&raw, &reference).unwrap();
        let (code, text) = qemu_img_check(&p);
        assert_eq!(code, 0, "cs {cs}: {text}");
        assert!(text.contains(&format!("Image end offset: {alloc}")), "allocation {alloc} vs {text}");
        let (code, text) = run("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", p.to_str().unwrap(), raw.to_str().unwrap()]);
        assert_eq!(code, 0, "cs {cs}: {text}");
    }
}

#[test]
fn refcount_table_grows() {
    // 512-byte clusters: one refcount block covers 256 clusters and the initial table 64
    // blocks, so 16 MiB of writes forces new blocks and a larger, relocated table.
    let d = Dir::new("grow");
    let p = d.path("g.qcow2");
    new_image(&p, 64 << 20, 512);
    let disk = Disk::open(&p, false);
    let data = vec![0x5au8; 1 << 20];
    for i in 0..24u64 {
        disk.write(i << 20, &data);
    }
    disk.img.flush_metadata().unwrap();
    drop(disk);
    let (code, text) = qemu_img_check(&p);
    assert_eq!(code, 0, "{text}");
    let disk = Disk::open(&p, true);
    assert_eq!(disk.read(23 << 20, 1 << 20), data);
}

#[test]
fn images_written_by_qemu_read_back_exactly() {
    let d = Dir::new("qemuwrites");
    let p = d.path("q.qcow2");
    let raw = d.path("q.raw");
    let ps = p.to_str().unwrap();
    assert_eq!(run("qemu-img", &["create", "-f", "qcow2", "-o", "cluster_size=65536", ps, "32M"]).0, 0);
    let script = [
        "write -P 0x11 0 1M",
        "write -P 0x22 3M 65536",
        "write -P 0x33 5000k 12k",
        "write -z 0 64k",
        "write -P 0x44 20M 4M",
        "discard 21M 1M",
    ];
    for cmd in script {
        let (code, text) = run("qemu-io", &["-f", "qcow2", "-c", cmd, ps]);
        assert_eq!(code, 0, "{cmd}: {text}");
    }
    assert_eq!(run("qemu-img", &["convert", "-O", "raw", ps, raw.to_str().unwrap()]).0, 0);
    let want = std::fs::read(&raw).unwrap();
    let disk = Disk::open(&p, true);
    assert!(disk.read(0, want.len()) == want);
}

#[test]
fn compressed_images_read_back_exactly() {
    let d = Dir::new("compressed");
    let src = d.path("src.raw");
    let c = d.path("c.qcow2");
    let mut rng = Rng(7);
    let mut data = vec![0u8; 8 << 20];
    // Compressible: runs of pattern, with random islands.
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i / 4096) as u8;
    }
    rng.fill(&mut data[1 << 20..(1 << 20) + 100_000]);
    std::fs::write(&src, &data).unwrap();
    let (code, text) = run("qemu-img", &["convert", "-c", "-O", "qcow2", src.to_str().unwrap(), c.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    let disk = Disk::open(&c, false);
    assert!(disk.read(0, data.len()) == data);
    // Overwrite part of a compressed cluster: the rest must survive.
    disk.write(4096 * 3, &[0xeeu8; 4096]);
    data[4096 * 3..4096 * 4].fill(0xee);
    disk.img.flush_metadata().unwrap();
    assert!(disk.read(0, data.len()) == data);
    // Replace every cluster of the first 2 MiB (several compressed clusters share host
    // clusters): each host cluster loses its references one by one, none leaks.
    for off in (0..2u64 << 20).step_by(65536) {
        disk.write(off, &[0x5au8; 65536]);
        data[off as usize..off as usize + 65536].fill(0x5a);
    }
    assert!(disk.read(0, data.len()) == data);
    // The drops reach the refcounts only after the write-back that unlinked them is durable;
    // one close must still leave them written (it once needed a second flush: a leak at exit).
    disk.img.close().unwrap();
    drop(disk);
    let (code, text) = qemu_img_check(&c);
    assert_eq!(code, 0, "overwritten compressed clusters must leave no leak: {text}");
    let (code, text) = run("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", c.to_str().unwrap(), src.to_str().unwrap()]);
    assert_eq!(code, 1, "the image should now differ from the source: {text}");
}

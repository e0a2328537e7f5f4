//! Corrupted images never panic the engine: thousands of mutations of a real image (written
//! by qemu-io, with compressed clusters and a backing name) through open, map, read, check.
//! The same property `fuzz/` explores with libFuzzer; this one runs in every CI run.

mod common;

use common::Rng;

use std::process::Command;
use std::sync::Arc;

use thinblk_qcow2::{check, Mapping, MemStorage, OpenOptions, Qcow2};

fn seed_image() -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("thinblk-mutate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let raw = dir.join("src.raw");
    let img = dir.join("m.qcow2");
    let data: Vec<u8> = (0..(2 << 20)).map(|i: u32| (i / 700) as u8).collect();
    std::fs::write(&raw, &data).unwrap();
    let run = |args: &[&str]| assert!(Command::new("qemu-img").args(args).status().unwrap().success());
    run(&["convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", raw.to_str().unwrap(), img.to_str().unwrap()]);
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5 1M 64k", "-c", "write -z 0 8k", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let bytes = std::fs::read(&img).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

fn exercise(bytes: Vec<u8>) {
    let storage = Arc::new(MemStorage::new(bytes));
    let _ = check(storage.as_ref());
    let opts = OpenOptions { read_only: true, l2_cache_bytes: Some(64 << 10), ..Default::default() };
    let Ok(img) = Qcow2::open(storage, opts) else { return };
    let size = img.size();
    let mut out = Vec::new();
    for off in [0, size / 2, size.saturating_sub(8192)] {
        out.clear();
        let len = 8192.min(size - off);
        if img.map_read(off, len, &mut out).is_ok() {
            for r in &out {
                if let Mapping::Compressed(e) = r.mapping {
                    let _ = img.read_compressed(e);
                }
            }
        }
    }
    let _ = img.map_read(size, 1, &mut out);
    let _ = img.map_read(u64::MAX - 10, 20, &mut out);
}


#[test]
fn mutated_images_never_panic() {
    let seed = seed_image();
    exercise(seed.clone());
    let mut rng = Rng(0xfeed_beef);
    let interesting = [0u8, 1, 0x7f, 0x80, 0xff];
    for i in 0..4000 {
        let mut b = seed.clone();
        let edits = 1 + rng.next() % 8;
        for _ in 0..edits {
            // Mostly the header and the tables right after it; sometimes anywhere.
            let limit = if rng.next() % 4 == 0 { b.len() } else { b.len().min(5 * 4096) };
            let at = (rng.next() as usize) % limit;
            b[at] = match rng.next() % 3 {
                0 => interesting[(rng.next() % 5) as usize],
                1 => b[at] ^ (1 << (rng.next() % 8)),
                _ => rng.next() as u8,
            };
        }
        if i % 500 == 0 {
            let cut = (rng.next() as usize) % b.len();
            b.truncate(cut);
        }
        exercise(b);
    }
}

//! qcow2 through the daemon with a real vhost-user client; qemu-img and qemu-io are the oracle.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{s, Client, Daemon, LoopDev, Rng, TestDir};

const MIB: u64 = 1 << 20;

fn run(cmd: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let (code, text) = run(cmd, args);
    assert_eq!(code, 0, "{cmd} {args:?}: {text}");
    text
}

fn serve(dir: &TestDir, image: &Path, extra: &[&str]) -> Daemon {
    let mut args = vec!["--image", s(image), "--format", "qcow2", "--num-queues", "2"];
    args.extend_from_slice(extra);
    Daemon::start(&dir.path("sock"), &args)
}

fn stop(mut d: Daemon) {
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(20)), Some(0));
}

#[test]
fn qemu_written_image_reads_back_exactly() {
    let dir = TestDir::new("q2-qemu");
    let img = dir.path("q.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    for cmd in ["write -P 0x61 0 2M", "write -P 0x62 10M 4k", "write -z 1M 64k", "write -P 0x63 63M 1M", "discard 10M 4k"] {
        ok("qemu-io", &["-f", "qcow2", "-c", cmd, s(&img)]);
    }
    let raw = dir.path("q.raw");
    ok("qemu-img", &["convert", "-O", "raw", s(&img), s(&raw)]);
    let want = std::fs::read(&raw).unwrap();
    let d = serve(&dir, &img, &["--read-only"]);
    let mut c = Client::connect_with(&dir.path("sock"), 2, true).expect("connect");
    for (i, chunk) in want.chunks(4 << 20).enumerate() {
        let got = c.read(i % 2, i as u64 * (4 << 20), chunk.len()).expect("read");
        assert!(got == chunk, "chunk {i} differs");
    }
    drop(c);
    stop(d);
}

#[test]
fn daemon_written_image_checks_clean_and_compares_equal() {
    let dir = TestDir::new("q2-write");
    let img = dir.path("w.qcow2");
    ok(env!("CARGO_BIN_EXE_thinblk"), &["create", s(&img), "64M"]);
    let d = serve(&dir, &img, &[]);
    let mut c = Client::connect(&dir.path("sock"), 2).expect("connect");
    let size = 64 * MIB;
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(42);
    for i in 0..300 {
        let sectors = 1 + rng.below(256);
        let len = sectors * 512;
        let off = rng.below(size / 512 - sectors) * 512;
        let q = i % 2;
        match rng.below(10) {
            0 => {
                assert_eq!(c.write_zeroes(q, off, len, i % 3 == 0), 0);
                model[off as usize..(off + len) as usize].fill(0);
            }
            1 => assert_eq!(c.flush(q), 0),
            _ => {
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data);
                assert_eq!(c.write(q, off, &data), 0);
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
        }
    }
    let back = c.read(0, 0, (4 * MIB) as usize).expect("read");
    assert!(back == model[..(4 * MIB) as usize]);
    drop(c);
    stop(d);
    let raw = dir.path("ref.raw");
    std::fs::write(&raw, &model).unwrap();
    let text = ok("qemu-img", &["check", s(&img)]);
    assert!(text.contains("No errors were found"), "{text}");
    ok("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", s(&img), s(&raw)]);
    // thinblk check agrees with qemu-img on the end offset.
    let ours = ok(env!("CARGO_BIN_EXE_thinblk"), &["check", s(&img)]);
    let end = |t: &str| t.lines().find(|l| l.starts_with("Image end offset:")).map(str::to_string);
    assert_eq!(end(&ours), end(&text), "ours: {ours}\nqemu: {text}");
}

#[test]
fn backing_chain_base_by_qemu_overlay_by_daemon() {
    let dir = TestDir::new("q2-chain");
    let base = dir.path("base.qcow2");
    let top = dir.path("top.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&base), "32M"]);
    ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x42 0 32M", s(&base)]);
    // Relative backing name, resolved against the overlay's directory.
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", s(&top)]);
    let d = serve(&dir, &top, &[]);
    let mut c = Client::connect(&dir.path("sock"), 1).expect("connect");
    // Partial-cluster writes: the rest of each new cluster must come from the base.
    assert_eq!(c.write(0, 4096, &[0x01u8; 512]), 0);
    assert_eq!(c.write(0, 5 * MIB + 1024, &[0x02u8; 8192]), 0);
    assert_eq!(c.read(0, 0, 8192).unwrap()[..4096], [0x42u8; 4096][..]);
    drop(c);
    stop(d);
    let text = ok("qemu-img", &["check", s(&top)]);
    assert!(text.contains("No errors were found"), "{text}");
    // The reference: the base's content plus the same writes.
    let refimg = dir.path("ref.raw");
    ok("qemu-img", &["convert", "-O", "raw", s(&base), s(&refimg)]);
    let mut r = std::fs::read(&refimg).unwrap();
    r[4096..4608].fill(0x01);
    r[(5 * MIB + 1024) as usize..(5 * MIB + 1024 + 8192) as usize].fill(0x02);
    std::fs::write(&refimg, &r).unwrap();
    ok("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", s(&top), s(&refimg)]);
}

#[test]
fn compressed_image_reads_back_exactly() {
    let dir = TestDir::new("q2-comp");
    let src = dir.path("src.raw");
    let img = dir.path("c.qcow2");
    let data: Vec<u8> = (0..8 * MIB as usize).map(|i| (i / 1000) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    ok("qemu-img", &["convert", "-c", "-O", "qcow2", s(&src), s(&img)]);
    let d = serve(&dir, &img, &["--read-only"]);
    let mut c = Client::connect_with(&dir.path("sock"), 1, true).expect("connect");
    assert!(c.read(0, 0, data.len()).unwrap() == data);
    drop(c);
    stop(d);
}

#[test]
fn internal_snapshots_are_never_corrupted() {
    let dir = TestDir::new("q2-snap");
    let img = dir.path("s.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x77 0 4M", s(&img)]);
    ok("qemu-img", &["snapshot", "-c", "snap1", s(&img)]);
    let before = dir.path("before.raw");
    ok("qemu-img", &["convert", "-l", "snap1", "-O", "raw", s(&img), s(&before)]);
    // Writing is refused, with a message that says why...
    let out = Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .args(["--socket-path", s(&dir.path("x.sock")), "--image", s(&img), "--format", "qcow2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("snapshot"), "{}", String::from_utf8_lossy(&out.stderr));
    // ...and read-only serving works and changes nothing.
    let d = serve(&dir, &img, &["--read-only"]);
    let mut c = Client::connect_with(&dir.path("sock"), 1, true).expect("connect");
    assert_eq!(c.read(0, 0, 4096).unwrap(), vec![0x77u8; 4096]);
    drop(c);
    stop(d);
    let text = ok("qemu-img", &["check", s(&img)]);
    assert!(text.contains("No errors were found"), "{text}");
    let after = dir.path("after.raw");
    ok("qemu-img", &["convert", "-l", "snap1", "-O", "raw", s(&img), s(&after)]);
    assert!(std::fs::read(&before).unwrap() == std::fs::read(&after).unwrap());
}

/// qemu-img's view of `image`'s chain: one JSON object per image, top first.
fn chain_info(image: &Path) -> Vec<serde_json::Value> {
    let out = Command::new("qemu-img").args(["info", "--backing-chain", "--output=json", s(image)]).output().expect("qemu-img");
    assert!(out.status.success(), "qemu-img info: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v.as_array().expect("an array").clone()
}

#[test]
fn create_with_a_backing_file() {
    let dir = TestDir::new("q2-create-backing");
    let bin = env!("CARGO_BIN_EXE_thinblk");
    let base = dir.path("base.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&base), "24M"]);
    ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 23M 1M", s(&base)]);
    let top = dir.path("top.qcow2");
    // No SIZE: the backing file's, read by thinblk's engine.
    let out = ok(bin, &["create", "--backing", "base.qcow2", "--backing-format", "qcow2", s(&top)]);
    assert!(out.contains("backing_file=base.qcow2 backing_fmt=qcow2 size=25165824"), "{out}");
    let chain = chain_info(&top);
    assert_eq!(chain.len(), 2, "{chain:#?}");
    assert_eq!(chain[0]["virtual-size"], 24 << 20);
    assert_eq!(chain[0]["backing-filename"], "base.qcow2");
    assert_eq!(chain[0]["backing-filename-format"], "qcow2");
    assert_eq!(chain[1]["filename"], s(&base));
    ok("qemu-img", &["check", s(&top)]);
    let reads = ok("qemu-io", &["-r", "-f", "qcow2", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0 1M 22M", "-c", "read -P 0xa5 23M 1M", s(&top)]);
    assert!(!reads.contains("verification failed"), "{reads}");
    // thinblk's own check and the daemon's chain agree.
    ok(bin, &["check", s(&top)]);

    // oVirt: volumes in one directory, a backing file named by the parent volume's bare uuid,
    // a raw base; thinblk run from elsewhere (the name is resolved against the image's
    // directory, not the working directory), with --preallocation metadata.
    let images = dir.path("images");
    std::fs::create_dir(&images).unwrap();
    let (base_uuid, top_uuid) = ("6a1f0c3e-2b4d-4e5f-8a9b-0c1d2e3f4a5b", "9e8d7c6b-5a4f-4e3d-9c2b-1a0f9e8d7c6b");
    let raw = images.join(base_uuid);
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&raw), "8M"]);
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x77 64k 64k", s(&raw)]);
    let overlay = images.join(top_uuid);
    let out = Command::new(bin)
        .current_dir("/")
        .args(["create", s(&overlay), "--backing", base_uuid, "--backing-format", "raw", "--preallocation", "metadata"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let chain = chain_info(&overlay);
    assert_eq!(chain.len(), 2, "{chain:#?}");
    assert_eq!(chain[0]["virtual-size"], 8 << 20);
    assert_eq!(chain[0]["backing-filename"], base_uuid);
    assert_eq!(chain[0]["backing-filename-format"], "raw");
    assert_eq!(chain[1]["format"], "raw");
    ok("qemu-img", &["check", s(&overlay)]);
    let reads = ok("qemu-io", &["-r", "-f", "qcow2", "-c", "read -P 0 0 64k", "-c", "read -P 0x77 64k 64k", s(&overlay)]);
    assert!(!reads.contains("verification failed"), "{reads}");
    // A SIZE given: the backing file is not opened (it may not be reachable yet).
    let later = images.join("later");
    ok(bin, &["create", s(&later), "1G", "--backing", "not-there-yet", "--backing-format", "qcow2"]);
    let (code, text) = run("qemu-img", &["info", "-U", s(&later)]);
    assert!(code == 0 && text.contains("backing file: not-there-yet"), "{text}");
    // Without SIZE a missing backing file is an error naming it; nothing is created.
    let missing = images.join("missing");
    let (code, text) = run(bin, &["create", s(&missing), "--backing", "nowhere", "--backing-format", "qcow2"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("backing file nowhere"), "{text}");
    assert!(!missing.exists());
    // An image is never its own backing file.
    let (code, text) = run(bin, &["create", s(&top), "--backing", "top.qcow2", "--backing-format", "qcow2"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("is the image itself"), "{text}");
    ok("qemu-img", &["check", s(&top)]);
}

#[test]
fn create_and_check_tools() {
    let dir = TestDir::new("q2-tools");
    let img = dir.path("t.qcow2");
    let bin = env!("CARGO_BIN_EXE_thinblk");
    ok(bin, &["create", s(&img), "1G", "--cluster-size", "64K", "--preallocation", "metadata"]);
    let info = ok("qemu-img", &["info", s(&img)]);
    assert!(info.contains("(1073741824 bytes)"), "{info}");
    let q = ok("qemu-img", &["check", s(&img)]);
    let ours = ok(bin, &["check", s(&img)]);
    let end = |t: &str| t.lines().find(|l| l.starts_with("Image end offset:")).map(str::to_string);
    assert_eq!(end(&ours), end(&q));
    // A leak: exit 3 from both.
    ok("qemu-io", &["-f", "qcow2", "-c", "write 0 64k", s(&img)]);
    let bytes = std::fs::read(&img).unwrap();
    let mut leaky = bytes.clone();
    // Drop the L2 entry of guest cluster 0: its data cluster leaks.
    let l1_off = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let l2_off = (u64::from_be_bytes(bytes[l1_off..l1_off + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    leaky[l2_off..l2_off + 8].fill(0);
    std::fs::write(&img, &leaky).unwrap();
    assert_eq!(run("qemu-img", &["check", s(&img)]).0, 3);
    assert_eq!(run(bin, &["check", s(&img)]).0, 3);
    // A corruption (refcount of the L1 table's cluster zeroed... via the header's L1 pointing
    // into the refcount table): exit 2 from ours, refused by the daemon.
    let mut bad = bytes.clone();
    let rb_off = {
        let rt = u64::from_be_bytes(bytes[48..56].try_into().unwrap()) as usize;
        u64::from_be_bytes(bytes[rt..rt + 8].try_into().unwrap()) as usize
    };
    let l1_cluster = l1_off / 65536;
    bad[rb_off + 2 * l1_cluster..rb_off + 2 * l1_cluster + 2].fill(0);
    std::fs::write(&img, &bad).unwrap();
    assert_eq!(run(bin, &["check", s(&img)]).0, 2);
    assert_eq!(run("qemu-img", &["check", s(&img)]).0, 2);
}

#[test]
fn corrupt_and_unsupported_images_are_refused_with_their_reason() {
    let dir = TestDir::new("q2-corrupt");
    let good = dir.path("good.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&good), "16M"]);
    let bytes = std::fs::read(&good).unwrap();
    type Edit = fn(&mut Vec<u8>);
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("bad magic", |b| b[0] = 0, "not a qcow2 image"),
        ("version 4", |b| b[7] = 4, "qcow2 version 4"),
        ("encrypted", |b| b[35] = 1, "encryption"),
        ("L1 past end", |b| b[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes()), "past the end"),
        ("refcount table unaligned", |b| b[48..56].copy_from_slice(&(65536u64 + 8).to_be_bytes()), "not cluster aligned"),
        ("external data file", |b| b[79] |= 4, "external data file"),
        ("extended L2", |b| b[79] |= 16, "extended L2"),
        ("truncated", |b| b.truncate(50), "too short"),
        ("corrupt bit", |b| b[79] |= 2, "marked corrupt"),
    ];
    for (name, edit, want) in cases {
        let p = dir.path(&format!("{}.qcow2", name.replace(' ', "-")));
        let mut b = bytes.clone();
        edit(&mut b);
        std::fs::write(&p, &b).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_thinblk"))
            .args(["--socket-path", s(&dir.path("x.sock")), "--image", s(&p), "--format", "qcow2"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(want), "{name}: want '{want}' in '{err}'");
        assert!(std::fs::read(&p).unwrap() == b, "{name}: the image was modified");
    }
}

#[test]
fn kill_9_during_writes_leaves_no_corruption_and_keeps_flushed_data() {
    let dir = TestDir::new("q2-kill");
    let img = dir.path("k.qcow2");
    ok(env!("CARGO_BIN_EXE_thinblk"), &["create", s(&img), "128M", "--cluster-size", "64K"]);
    for round in 0..3u64 {
        let mut d = serve(&dir, &img, &[]);
        let mut c = Client::connect(&dir.path("sock"), 2).expect("connect");
        // Flushed data: 8 MiB at a round-specific place.
        let flushed = vec![0x30u8 + round as u8; (8 * MIB) as usize];
        let base = round * 16 * MIB;
        for (i, chunk) in flushed.chunks(MIB as usize).enumerate() {
            assert_eq!(c.write(i % 2, base + i as u64 * MIB, chunk), 0);
        }
        assert_eq!(c.flush(0), 0);
        // Unflushed allocating writes all over the disk, then SIGKILL mid-stream.
        let pid = d.child.id() as i32;
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150 + 100 * round));
            // SAFETY: signalling the daemon child we started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let mut rng = Rng(round + 1);
        loop {
            let off = (64 * MIB + rng.below(64 * MIB / 4096 - 64) * 4096) & !4095;
            let data = vec![0x99u8; 4096 * (1 + rng.below(32)) as usize];
            match c.try_write((rng.below(2)) as usize, off, &data, Duration::from_secs(2)) {
                Some(0) => continue,
                _ => break,
            }
        }
        killer.join().unwrap();
        assert!(d.wait_exit(Duration::from_secs(10)).is_none(), "killed daemon reports an exit code");
        drop(c);
        drop(d);
        let (code, text) = run("qemu-img", &["check", s(&img)]);
        assert!(code == 0 || code == 3, "round {round}: corruption after kill -9:\n{text}");
        // Restart: the flushed data of every round so far is there.
        let d = serve(&dir, &img, &["--read-only"]);
        let mut c = Client::connect_with(&dir.path("sock"), 1, true).expect("reconnect");
        for r in 0..=round {
            let got = c.read(0, r * 16 * MIB, (8 * MIB) as usize).expect("read");
            assert!(got.iter().all(|&b| b == 0x30 + r as u8), "round {round}: flushed data of round {r} lost");
        }
        drop(c);
        stop(d);
    }
}

fn allocated_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn discard_marks_zero_and_releases_host_space_only_with_unmap() {
    for (mode, releases) in [("unmap", true), ("ignore", false)] {
        let dir = TestDir::new(&format!("q2-discard-{mode}"));
        let img = dir.path("d.qcow2");
        ok(env!("CARGO_BIN_EXE_thinblk"), &["create", s(&img), "64M"]);
        let d = serve(&dir, &img, &["--discard", mode]);
        let mut c = Client::connect(&dir.path("sock"), 1).expect("connect");
        for i in 0..16u64 {
            assert_eq!(c.write(0, i * MIB, &vec![0xabu8; MIB as usize]), 0);
        }
        assert_eq!(c.flush(0), 0);
        let before = allocated_bytes(&img);
        let end_before = ok(env!("CARGO_BIN_EXE_thinblk"), &["check", s(&img)]);
        // 8 MiB of whole clusters plus a partial cluster at each end.
        assert_eq!(c.discard(0, 4 * MIB - 4096, 8 * MIB + 8192), 0);
        assert_eq!(c.flush(0), 0);
        let mut back = Vec::new();
        for i in 0..4u64 {
            back.extend(c.read(0, i * 4 * MIB, (4 * MIB) as usize).unwrap());
        }
        let (a, b) = ((4 * MIB - 4096) as usize, (12 * MIB + 4096) as usize);
        assert!(back[a..b].iter().all(|&x| x == 0), "{mode}: discarded range does not read zeroes");
        assert!(back[..a].iter().chain(&back[b..]).all(|&x| x == 0xab), "{mode}: neighbours changed");
        drop(c);
        stop(d);
        let after = allocated_bytes(&img);
        if releases {
            assert!(before - after >= 7 * MIB, "{mode}: only {} bytes released", before.saturating_sub(after));
        } else {
            assert!(after + MIB >= before, "{mode}: host space released ({before} -> {after})");
        }
        let text = ok("qemu-img", &["check", s(&img)]);
        assert!(text.contains("No errors were found"), "{mode}: {text}");
        // Clusters keep their references: the allocation does not move.
        let end = |t: &str| t.lines().find(|l| l.starts_with("Image end offset:")).map(str::to_string);
        assert!(end(&text) >= end(&end_before), "{mode}");
    }
}

#[test]
fn concurrent_flushes_all_complete_and_persist() {
    let dir = TestDir::new("q2-flushes");
    let img = dir.path("f.qcow2");
    ok(env!("CARGO_BIN_EXE_thinblk"), &["create", s(&img), "32M"]);
    let d = serve(&dir, &img, &[]);
    let mut c = Client::connect(&dir.path("sock"), 2).expect("connect");
    for round in 0..5u64 {
        assert_eq!(c.write(0, round * MIB, &vec![round as u8 + 1; 65536]), 0);
        assert_eq!(c.write(1, round * MIB + 8 * MIB, &vec![round as u8 + 1; 4096]), 0);
        // Several FLUSHes in one batch share one metadata write-back and one sync.
        assert!(c.flush_many(0, 8).iter().all(|&r| r == 0));
        assert!(c.flush_many(1, 3).iter().all(|&r| r == 0));
    }
    drop(c);
    // No SIGTERM: whatever the flushes promised must already be on disk.
    let mut d = d;
    d.signal(libc::SIGKILL);
    let _ = d.wait_exit(Duration::from_secs(10));
    let text = ok("qemu-img", &["check", s(&img)]);
    assert!(text.contains("No errors were found"), "{text}");
    let raw = dir.path("f.raw");
    ok("qemu-img", &["convert", "-O", "raw", s(&img), s(&raw)]);
    let b = std::fs::read(&raw).unwrap();
    for round in 0..5usize {
        assert!(b[round << 20..(round << 20) + 65536].iter().all(|&x| x == round as u8 + 1));
        assert!(b[(round << 20) + (8 << 20)..(round << 20) + (8 << 20) + 4096].iter().all(|&x| x == round as u8 + 1));
    }
}

/// Reads the whole disk in 4 MiB pieces and compares it with `model`.
fn reads_back(c: &mut Client, model: &[u8], what: &str) {
    for (i, want) in model.chunks((4 * MIB) as usize).enumerate() {
        let got = c.read(0, i as u64 * 4 * MIB, want.len()).unwrap();
        assert!(got == want, "chunk {i}: {what}");
    }
}

#[test]
fn partial_writes_on_a_dirty_block_device_read_zeroes_around_them() {
    // A block device is not known to read zeroes: new clusters must be zero-filled around
    // partial writes. The "LV" is full of garbage to make a missing fill visible.
    let dir = TestDir::new("q2-dirtylv");
    let backing = dir.path("lv.img");
    std::fs::write(&backing, vec![0xaau8; (48 * MIB) as usize]).unwrap();
    let lv = LoopDev::attach(&backing);
    let dev = lv.0.to_str().unwrap().to_string();
    ok(env!("CARGO_BIN_EXE_thinblk"), &["create", &dev, "32M"]);
    let d = Daemon::start(&dir.path("sock"), &["--image", &dev, "--format", "qcow2"]);
    let mut c = Client::connect(&dir.path("sock"), 1).expect("connect");
    let mut model = vec![0u8; (32 * MIB) as usize];
    for (off, len, v) in [(8192u64, 4096usize, 1u8), (100 * 1024, 512, 2), (5 * MIB + 60 * 1024, 8192, 3), (31 * MIB, 65536, 4)] {
        assert_eq!(c.write(0, off, &vec![v; len]), 0);
        model[off as usize..off as usize + len].fill(v);
    }
    reads_back(&mut c, &model, "garbage around a partial write");
    drop(c);
    stop(d);
    let text = ok("qemu-img", &["check", "-f", "qcow2", &dev]);
    assert!(text.contains("No errors were found"), "{text}");
    let raw = dir.path("ref.raw");
    std::fs::write(&raw, &model).unwrap();
    ok("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", &dev, s(&raw)]);
}

#[test]
fn partial_writes_into_a_file_s_old_space_read_zeroes_around_them() {
    // An image file with 16 MiB of old bytes past the image's end (space a file already had
    // at open is not known to read zeroes): partial writes take clusters the engine zeroed
    // ahead of its bump pointer, and nothing of the old bytes shows through.
    let dir = TestDir::new("q2-oldspace");
    let img = dir.path("old.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "32M"]);
    // The old bytes start at the next cluster: the last cluster qemu-img wrote (a refcount
    // block) ends in bytes it left unwritten, which must read zeroes.
    let end = std::fs::metadata(&img).unwrap().len().next_multiple_of(65536);
    {
        use std::io::Write;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.set_len(end).unwrap();
        let mut f = std::fs::OpenOptions::new().append(true).open(&img).unwrap();
        f.write_all(&vec![0xaau8; (16 * MIB) as usize]).unwrap();
    }
    let d = serve(&dir, &img, &[]);
    let mut c = Client::connect(&dir.path("sock"), 1).expect("connect");
    let mut model = vec![0u8; (32 * MIB) as usize];
    for (i, off) in (0..30 * MIB).step_by((MIB / 4) as usize).enumerate() {
        let (off, len) = (off + 4096 * (i as u64 % 7) + 512, 512 * (i % 9 + 1));
        let v = i as u8 | 1;
        assert_eq!(c.write(0, off, &vec![v; len]), 0);
        model[off as usize..off as usize + len].fill(v);
    }
    reads_back(&mut c, &model, "old bytes around a partial write");
    drop(c);
    stop(d);
    let text = ok("qemu-img", &["check", s(&img)]);
    assert!(text.contains("No errors were found"), "{text}");
    let raw = dir.path("ref.raw");
    std::fs::write(&raw, &model).unwrap();
    ok("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", s(&img), s(&raw)]);
    // 120 clusters of 64 KiB were taken, inside the old bytes: zeroed ahead in ranges of
    // 1 MiB (16 clusters), so the space just past the image's new end, in the middle of the
    // last range, reads zeroes, not the old bytes (one queue and writes in order: the same
    // allocations every run).
    let new_end = common::check_end_offset(&img);
    let bytes = std::fs::read(&img).unwrap();
    assert!(new_end > end + 4 * MIB && new_end + 4096 < end + 16 * MIB, "image end {new_end}");
    assert!(bytes[new_end as usize..(new_end as usize + 4096).min(bytes.len())].iter().all(|&b| b == 0), "the space past the bump pointer was not zeroed ahead");
}

#[test]
fn churn_rewrites_in_place_and_does_not_grow_the_image() {
    // 20 rounds of write → discard → rewrite of a 256 MiB region: the image end offset after
    // the last round is within 5 % of the one after the first (QEMU's discard-no-unref
    // behaviour; a thin LV under the image stops growing).
    let dir = TestDir::new("q2-churn");
    let img = dir.path("churn.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "512M"]);
    let region = 256 * MIB;
    let chunk = 4 * MIB;
    let round = |c: &mut Client, r: u64| {
        for pass in 0..2u64 {
            let data = vec![(r * 2 + pass) as u8 | 1; chunk as usize];
            for off in (0..region).step_by(chunk as usize) {
                assert_eq!(c.write((off / chunk % 2) as usize, off, &data), 0);
            }
            if pass == 0 {
                assert_eq!(c.discard(0, 0, region), 0);
            }
        }
        assert_eq!(c.flush(0), 0);
    };
    let d = serve(&dir, &img, &["--discard", "unmap", "--journal-dir", s(&dir.0)]);
    let mut c = Client::connect(&dir.path("sock"), 2).expect("connect");
    round(&mut c, 0);
    drop(c);
    stop(d);
    let first = common::check_end_offset(&img);
    let d = serve(&dir, &img, &["--discard", "unmap", "--journal-dir", s(&dir.0)]);
    let mut c = Client::connect(&dir.path("sock"), 2).expect("connect");
    for r in 1..20 {
        round(&mut c, r);
    }
    let back = c.read(1, region - 4096, 4096).expect("read");
    assert!(back.iter().all(|&b| b == (19 * 2 + 1) as u8 | 1));
    drop(c);
    stop(d);
    let last = common::check_end_offset(&img);
    let growth = (last as f64 - first as f64) / first as f64 * 100.0;
    eprintln!("churn: image end offset {first} after round 1, {last} after round 20 ({growth:+.2} %)");
    assert!(last as f64 <= first as f64 * 1.05, "churn grew the image from {first} to {last}");
    ok("qemu-img", &["check", s(&img)]);
}

/// Runs the daemon on `image` expecting it to refuse to start; returns its stderr.
fn refused(dir: &TestDir, image: &Path, extra: &[&str]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_thinblk"));
    cmd.arg("--socket-path").arg(dir.path("refused.sock")).args(["--image", s(image), "--format", "qcow2"]).args(extra);
    let out = cmd.arg("--journal-dir").arg(&dir.0).stdin(std::process::Stdio::null()).output().expect("run thinblk");
    assert_eq!(out.status.code(), Some(1), "thinblk {extra:?} should refuse {}", image.display());
    assert!(!dir.path("refused.sock").exists(), "no socket after a refused start");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn backing_files_are_limited_by_policy() {
    let dir = TestDir::new("q2-backing-policy");
    let sub = dir.path("vm");
    std::fs::create_dir_all(&sub).unwrap();
    let base = dir.path("base.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&base), "16M"]);
    // An absolute name, and a relative one leaving the directory: refused by default.
    let abs = sub.join("abs.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", s(&base), "-F", "qcow2", s(&abs), "16M"]);
    assert!(refused(&dir, &abs, &[]).contains("absolute name"));
    let up = sub.join("up.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", "../base.qcow2", "-F", "qcow2", s(&up), "16M"]);
    assert!(refused(&dir, &up, &[]).contains("leaves the image's directory"));
    assert!(refused(&dir, &up, &["--backing-files", "devices"]).contains("leaves the image's directory"));
    // Allowed with `any`.
    for img in [&abs, &up] {
        let d = serve(&dir, img, &["--backing-files", "any"]);
        stop(d);
    }
    // A block device beside the image (as on oVirt block domains): only with devices/any.
    let lvfile = dir.path("lv.img");
    std::fs::write(&lvfile, vec![0u8; (16 * MIB) as usize]).unwrap();
    let lv = LoopDev::attach(&lvfile);
    ok(env!("CARGO_BIN_EXE_thinblk"), &["create", s(&lv.0), "16M"]);
    std::os::unix::fs::symlink(&lv.0, sub.join("basevol")).unwrap();
    let dev = sub.join("dev.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", "basevol", "-F", "qcow2", s(&dev), "16M"]);
    assert!(refused(&dir, &dev, &[]).contains("is a block device"));
    let d = serve(&dir, &dev, &["--backing-files", "devices"]);
    stop(d);
}

#[test]
fn storage_alignment_is_checked_at_open() {
    // A 4Kn disk (a loop device with 4096-byte sectors): 512-byte guest blocks or 512-byte
    // clusters could never be written with O_DIRECT. Refused at open, with what to do.
    let dir = TestDir::new("q2-4kn");
    let file = dir.path("4kn.img");
    std::fs::write(&file, vec![0u8; (32 * MIB) as usize]).unwrap();
    let out = Command::new("losetup").args(["-f", "--show", "--sector-size", "4096"]).arg(&file).output().expect("losetup");
    assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
    let lv = LoopDev(std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    ok(env!("CARGO_BIN_EXE_thinblk"), &["create", s(&lv.0), "16M", "--cluster-size", "512"]);
    assert!(refused(&dir, &lv.0, &["--logical-block-size", "4096"]).contains("cluster size 512 is below"));
    ok(env!("CARGO_BIN_EXE_thinblk"), &["create", s(&lv.0), "16M"]);
    let e = refused(&dir, &lv.0, &[]);
    assert!(e.contains("use --logical-block-size 4096"), "{e}");
    let d = serve(&dir, &lv.0, &["--logical-block-size", "4096"]);
    let mut c = Client::connect(&dir.path("sock"), 1).expect("connect");
    assert_eq!(c.write(0, 8192, &[7u8; 4096]), 0);
    assert_eq!(c.read(0, 8192, 4096).unwrap(), vec![7u8; 4096]);
    drop(c);
    stop(d);
}

/// Unaligned guest buffers larger than a bounce chunk, more of them at once than the pool
/// has chunks, over compressed, unallocated and allocated clusters: every byte right.
#[test]
fn large_unaligned_requests_move_through_bounded_chunks() {
    let dir = TestDir::new("q2-bounce");
    let src = dir.path("src.raw");
    let img = dir.path("b.qcow2");
    // 8 MiB: compressed data in the first half, holes (zero) in the second.
    let mut model: Vec<u8> = (0..8 * MIB as usize).map(|i| (i / 777) as u8).collect();
    model[4 * MIB as usize..].fill(0);
    std::fs::write(&src, &model).unwrap();
    ok("qemu-img", &["convert", "-c", "-O", "qcow2", "-o", "cluster_size=65536", s(&src), s(&img)]);
    ok("qemu-img", &["resize", "-q", s(&img), "32M"]);
    model.resize(32 * MIB as usize, 0);
    let d = serve(&dir, &img, &[]);
    let mut c = Client::connect(&dir.path("sock"), 1).expect("connect");
    let base = c.region.addr as *mut u8;
    // Sixteen 2.5 MiB writes at once from odd addresses: 16 requests, 8 chunks.
    let len = 5 * MIB as usize / 2;
    let mut rng = Rng(0xb0b0);
    let mut offsets = Vec::new();
    for i in 0..16u64 {
        let off = (i * 3 * MIB / 2) / 512 * 512;
        offsets.push(off);
    }
    // Each write's data comes from its own odd offset in the client's 8 MiB region; the
    // writes overlap on the disk, so issue them in two non-overlapping waves.
    for wave in [0usize, 1] {
        let mut n = 0;
        for (i, &off) in offsets.iter().enumerate().filter(|(i, _)| i % 2 == wave) {
            let at = 1 + (i % 3) * 7; // odd, < 64 bytes
            let mut data = vec![0u8; len];
            rng.fill(&mut data);
            // SAFETY: `at + len` stays inside the 8 MiB region, which is ours.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), base.add(at + (n % 2) * 3 * MIB as usize), len) };
            let _ = i;
            model[off as usize..off as usize + len].copy_from_slice(&data);
            // SAFETY: as above.
            let buf = unsafe { base.add(at + (n % 2) * 3 * MIB as usize) };
            c.queues[0].write(off, buf, len, 0, blkio::ReqFlags::empty());
            n += 1;
            // Two buffers in the region: wait for each pair before reusing them.
            if n % 2 == 0 {
                let mut comp = [const { std::mem::MaybeUninit::<blkio::Completion>::uninit() }; 2];
                let mut t = Duration::from_secs(30);
                assert_eq!(c.queues[0].do_io(&mut comp, 2, Some(&mut t), None).unwrap(), 2);
                for cpl in &comp {
                    // SAFETY: two completions were returned.
                    assert_eq!(unsafe { cpl.assume_init_ref() }.ret, 0);
                }
            }
        }
    }
    // Twelve 600 KiB reads in flight (more than the pool's chunks), then three of 2.5 MiB
    // (several chunks each), all into odd addresses, compared with the model.
    for (count, rlen) in [(12usize, 600 * 1024usize), (3, len)] {
        let mut pending = Vec::new();
        for i in 0..count {
            let off = (i as u64 * 2 * MIB + 512 * i as u64) / 512 * 512;
            let at = 3 + i * (rlen + 64);
            // SAFETY: count * (rlen + 64) + 3 < 8 MiB: inside the region.
            let buf = unsafe { base.add(at) };
            c.queues[0].read(off, buf, rlen, 0, blkio::ReqFlags::empty());
            pending.push((off, at));
        }
        let mut comp = [const { std::mem::MaybeUninit::<blkio::Completion>::uninit() }; 12];
        let mut t = Duration::from_secs(30);
        assert_eq!(c.queues[0].do_io(&mut comp, count, Some(&mut t), None).unwrap(), count);
        for cpl in &comp[..count] {
            // SAFETY: `count` completions were returned.
            assert_eq!(unsafe { cpl.assume_init_ref() }.ret, 0);
        }
        for (off, at) in pending {
            // SAFETY: the read completed into this range of our region.
            let got = unsafe { std::slice::from_raw_parts(base.add(at), rlen) };
            assert!(got == &model[off as usize..off as usize + rlen], "read of {rlen} at {off} differs");
        }
    }
    drop(c);
    stop(d);
    ok("qemu-img", &["check", s(&img)]);
    let back = dir.path("back.raw");
    ok("qemu-img", &["convert", "-O", "raw", s(&img), s(&back)]);
    assert!(std::fs::read(&back).unwrap() == model, "image differs from the model");
}

//! Changing the backing file of qemu-img's images, the step of a live merge that points the
//! layer above the merged one at the merge's base: qemu-img, qemu-io and the engine agree.

mod common;

use common::{ok, s, Dir};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use thinblk_qcow2::{change_backing_file, FileStorage, OpenOptions, Qcow2, Qcow2Error};


fn storage(p: &Path) -> Arc<FileStorage> {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(p).expect("open");
    Arc::new(FileStorage::new(f, 1))
}

/// base (0x11 in the first MiB) <- mid (0x22 in the second) <- top (0x33 in the third), in
/// `dir`, the backing files named as given; then mid committed into base, as a live merge
/// does before it changes top's backing file.
fn chain(dir: &Dir, base: &str, base_fmt: &str, mid: &str, top: &str) {
    let (b, m, t) = (dir.path(base), dir.path(mid), dir.path(top));
    ok("qemu-img", &["create", "-q", "-f", base_fmt, s(&b), "16M"]);
    ok("qemu-io", &["-f", base_fmt, "-c", "write -P 0x11 0 1M", s(&b)]);
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", base, "-F", base_fmt, s(&m)]);
    ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x22 1M 1M", s(&m)]);
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", s(&t)]);
    ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x33 2M 1M", s(&t)]);
    ok("qemu-img", &["commit", "-q", "-f", "qcow2", s(&m)]);
}

/// qemu-img sees top -> `base` (format `base_fmt`) and nothing else, checks top clean, and
/// reads every layer's data through it.
fn qemu_sees_top_on_base(dir: &Dir, top: &str, base: &str, base_fmt: &str, mid: &str) {
    let t = dir.path(top);
    let out = Command::new("qemu-img").args(["info", "--backing-chain", "--output=json", s(&t)]).output().expect("qemu-img");
    assert!(out.status.success(), "{out:?}");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let chain = info.as_array().expect("an array");
    assert_eq!(chain.len(), 2, "top and base: {info:#}");
    assert_eq!(chain[0]["backing-filename"], base);
    assert_eq!(chain[0]["backing-filename-format"], base_fmt);
    assert_eq!(chain[1]["filename"], s(&dir.path(base)));
    assert_eq!(chain[1]["format"], base_fmt);
    assert!(chain[1].get("backing-filename").is_none());
    assert!(!info.to_string().contains(mid), "the merged layer is gone from the chain: {info:#}");
    let check = ok("qemu-img", &["check", s(&t)]);
    assert!(check.contains("No errors were found"), "{check}");
    let reads = ok(
        "qemu-io",
        &["-r", "-f", "qcow2", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 1M 1M", "-c", "read -P 0x33 2M 1M", "-c", "read -P 0 3M 1M", s(&t)],
    );
    assert!(!reads.contains("verification failed"), "{reads}");
}

#[test]
fn the_free_function_points_top_at_base_as_qemu_img_rebase_would() {
    let dir = Dir::new("free");
    chain(&dir, "base.qcow2", "qcow2", "mid.qcow2", "top.qcow2");
    change_backing_file(storage(&dir.path("top.qcow2")).as_ref(), Some(("base.qcow2", "qcow2"))).expect("changed");
    qemu_sees_top_on_base(&dir, "top.qcow2", "base.qcow2", "qcow2", "mid.qcow2");
}

#[test]
fn ovirt_names_and_a_raw_base_change_format_too() {
    // oVirt names a backing file by the bare uuid of the parent volume, in the same directory.
    let (base, mid, top) =
        ("2d9e0a5c-3f1b-4b7e-8c6d-0e1f2a3b4c5d", "7a4c1e2b-9d3f-4e5a-b6c7-d8e9f0a1b2c3", "c1d2e3f4-a5b6-4c7d-8e9f-0a1b2c3d4e5f");
    let dir = Dir::new("ovirt");
    chain(&dir, base, "raw", mid, top);
    change_backing_file(storage(&dir.path(top)).as_ref(), Some((base, "raw"))).expect("changed");
    qemu_sees_top_on_base(&dir, top, base, "raw", mid);
}

#[test]
fn the_engine_changes_the_image_it_serves_and_keeps_the_change_at_close() {
    let dir = Dir::new("engine");
    chain(&dir, "base.qcow2", "qcow2", "mid.qcow2", "top.qcow2");
    let top = dir.path("top.qcow2");
    let img = Qcow2::open(storage(&top), OpenOptions::default()).expect("open");
    let owner = img.owner().expect("owner extension");
    // While the engine has it: the free function refuses, the engine changes it.
    let err = change_backing_file(storage(&top).as_ref(), Some(("base.qcow2", "qcow2"))).expect_err("in use");
    assert!(matches!(err, Qcow2Error::HeaderRewrite(_)), "{err}");
    img.change_backing(Some(("base.qcow2", "qcow2"))).expect("changed");
    assert_eq!(img.header().backing_file.as_deref(), Some("base.qcow2"));
    img.close().expect("close");
    drop(img);
    let h = Qcow2::open(storage(&top), OpenOptions { read_only: true, ..Default::default() }).expect("reopen").header();
    assert_eq!((h.backing_file.as_deref(), h.backing_format.as_deref()), (Some("base.qcow2"), Some("qcow2")));
    assert_eq!(h.owner.map(|o| (o.uuid, o.flags)), Some((owner.uuid, 0)), "owner extension kept, in-use cleared");
    qemu_sees_top_on_base(&dir, "top.qcow2", "base.qcow2", "qcow2", "mid.qcow2");
}

#[test]
fn changes_that_cannot_be_made_crash_safe_in_place_are_refused_and_leave_the_image_alone() {
    let dir = Dir::new("refused");
    chain(&dir, "base.qcow2", "qcow2", "mid.qcow2", "top.qcow2");
    let top = dir.path("top.qcow2");
    // Once thinblk has opened it, its owner extension follows qemu-img's feature name table,
    // past byte 512: dropping the format extension ahead of them would move both.
    Qcow2::open(storage(&top), OpenOptions::default()).expect("open").close().expect("close");
    let before = std::fs::read(&top).expect("read");
    let err = change_backing_file(storage(&top).as_ref(), None).expect_err("refused");
    assert!(matches!(err, Qcow2Error::HeaderRewrite(_)), "{err}");
    assert!(err.to_string().contains("qemu-img rebase -u"), "{err}");
    assert!(std::fs::read(&top).expect("read") == before, "nothing written");
    // Offline, qemu-img does it (the whole header cluster in one write).
    ok("qemu-img", &["rebase", "-u", "-b", "", s(&top)]);
    ok("qemu-img", &["check", s(&top)]);
}

#[test]
fn removing_the_backing_of_a_qemu_image_is_one_write_or_none() {
    let dir = Dir::new("remove");
    chain(&dir, "base.qcow2", "qcow2", "mid.qcow2", "top.qcow2");
    let top = dir.path("top.qcow2");
    let before = std::fs::read(&top).expect("read");
    // Without the format extension, qemu-img's feature name table moves up by 16 bytes: with
    // QEMU 10's table (ending at byte 520) everything it reads then ends by byte 512, so the
    // change is one write in the first sector; a longer table would be refused.
    match change_backing_file(storage(&top).as_ref(), None) {
        Ok(()) => {
            let after = std::fs::read(&top).expect("read");
            assert!(after[512..] == before[512..], "nothing past the first sector written");
            let info = ok("qemu-img", &["info", s(&top)]);
            assert!(!info.contains("backing file"), "{info}");
            ok("qemu-img", &["check", s(&top)]);
            ok("qemu-io", &["-r", "-f", "qcow2", "-c", "read -P 0x33 2M 1M", "-c", "read -P 0 0 2M", s(&top)]);
        }
        Err(e) => {
            assert!(matches!(e, Qcow2Error::HeaderRewrite(_)), "{e}");
            assert!(std::fs::read(&top).expect("read") == before, "nothing written");
        }
    }
}

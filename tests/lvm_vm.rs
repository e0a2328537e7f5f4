//! Real LVM, inside a VM: these machines have no device-mapper, a Debian guest kernel has.
//! QEMU (TCG) boots that kernel with an initramfs carrying lvm2, qemu-img, thinblk and its
//! verifying client (examples/vu_client.rs), and a virtio disk as the PV. tests/vm/lvm-init
//! builds oVirt's layout (VG with 128 MiB extents, inbox/outbox LVs, a volume LV holding a
//! qcow2), runs `thinblk spm --backend lvm` and the daemon with `--thin` on the LV, writes and
//! verifies past several extensions, takes a backup by LV snapshot under `ctl freeze`, and
//! checks the image and the snapshot with qemu-img. Then a live merge as oVirt does it on block
//! storage, on a second daemon and a chain of its own (the first volume keeps over a GiB free
//! after rate-aware sizing, so a merge into it would never need lvextend): a small base LV
//! written past one extension, a snapshot onto a new LV (a qcow2 whose backing is the base
//! LV's bare name) with `ctl snapshot`, more data, a second snapshot, and `ctl commit` of the
//! first overlay into the base LV, which `thinblk spm --backend lvm` lvextends for the job
//! before it copies while the client writes on; read back and qemu-img check again. The guest
//! prints facts and a verdict.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::vm::{assert_pass, assets, qemu_tcg, run_to_end, tail};
use common::{sparse_file, TestDir};

/// Upper bound for the whole guest run (boot, LVM setup, writes, snapshot, checks) under TCG.
const LIMIT: Duration = Duration::from_secs(1200);
const INITIAL_MIB: u64 = 512;
const CHUNK_MIB: u64 = 256;
/// The live merge's chain: its base LV (and each overlay LV) starts at one chunk; the base
/// receives BASE_MIB (it grows once as the top), the first overlay MERGE_MIB (merged into the
/// base, which must grow for it), the top LIVE_MIB while the merge runs.
const BASE_MIB: u64 = 160;
const MERGE_MIB: u64 = 384;
const LIVE_MIB: u64 = 64;

/// Appends to the base LVM initramfs an archive with thinblk, the client, the test's /init
/// and its settings (the kernel unpacks concatenated archives in order).
fn initrd(dir: &TestDir, assets: &Path, env: &str) -> std::path::PathBuf {
    let root = dir.path("overlay");
    std::fs::create_dir_all(root.join("opt")).expect("overlay dir");
    std::fs::create_dir_all(root.join("etc")).expect("overlay etc");
    let thinblk = env!("CARGO_BIN_EXE_thinblk");
    let client = Path::new(thinblk).parent().expect("target dir").join("examples/vu_client");
    assert!(client.exists(), "{} missing: cargo test builds the examples", client.display());
    for (from, name) in [(Path::new(thinblk), "thinblk"), (client.as_path(), "vu_client")] {
        // Debug info is most of a test build's size; the guest does not need it.
        let st = Command::new("objcopy").arg("--strip-debug").arg(from).arg(root.join("opt").join(name)).status();
        if !matches!(st, Ok(s) if s.success()) {
            std::fs::copy(from, root.join("opt").join(name)).expect("copy binary");
        }
    }
    let init = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vm/lvm-init");
    std::fs::copy(init, root.join("init")).expect("copy init");
    std::fs::set_permissions(root.join("init"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod init");
    std::fs::write(root.join("etc/thinblk-test.env"), env).expect("env");
    let overlay = dir.path("overlay.cpio.gz");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!("cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'", root.display(), overlay.display()))
        .status()
        .expect("cpio");
    assert!(st.success(), "packing the overlay failed");
    let out = dir.path("initrd.cpio.gz");
    let mut all = std::fs::read(assets.join("initramfs-lvm.cpio.gz")).expect("base initramfs");
    all.extend(std::fs::read(&overlay).expect("overlay"));
    std::fs::write(&out, all).expect("initrd");
    out
}

#[test]
fn lvm_volume_grows_by_lvextend_backs_up_by_snapshot_and_merges_a_snapshot_live() {
    let assets = assets();
    let dir = TestDir::new("lvm-vm");
    let env = format!(
        "DOMAIN=6c7a1e5e-1c5b-4b8e-9d1e-3f0b8f0e2a11\nVOLUME=0f2c9e4a-8d47-4a8f-b1a4-7e9c2d5b6a30\n\
         INITIAL_MIB={INITIAL_MIB}\nCHUNK_MIB={CHUNK_MIB}\nVIRTUAL_MIB=4096\nWRITE_MIB=2048\n\
         SNAPSHOT_AT_MIB=400\nSNAPSHOT_MIB=1536\n\
         MBASE=3b9d7c52-6e1a-4f0b-8d2e-5a4c9f1e7b63\nMO1=c4e8a1f7-2d5b-4a9c-b3e6-0f7d8a2c5e14\n\
         MO2=e1d2c3b4-a5f6-4e7d-8c9b-0a1f2e3d4c5b\nMERGE_LV_MIB={CHUNK_MIB}\nBASE_MIB={BASE_MIB}\n\
         MERGE_MIB={MERGE_MIB}\nLIVE_MIB={LIVE_MIB}\n\
         THIN_ARGS='--max-extend-mb {CHUNK_MIB}'\n"
    );
    let initrd = initrd(&dir, &assets, &env);
    let pv = dir.path("pv.raw");
    sparse_file(&pv, 12 << 30);
    let console = dir.path("console.log");
    let mut qemu = qemu_tcg(&assets, &initrd, "console=ttyS0 panic=-1 loglevel=4", &console);
    qemu.args(["-m", "1536M", "-drive"])
        .arg(format!("if=none,id=pv,file={},format=raw,cache=unsafe,discard=unmap", pv.display()))
        .args(["-device", "virtio-blk-pci,drive=pv"]);
    let started = Instant::now();
    let log = run_to_end(qemu, &console, LIMIT);
    eprintln!("guest run: {:.0} s", started.elapsed().as_secs_f64());
    assert_pass(&log);

    // The LV grew by lvextend in whole chunks (whole 128 MiB extents), several times.
    let sizes: Vec<u64> = log
        .lines()
        .find_map(|l| l.strip_prefix("guest: lv sizes MiB: "))
        .expect("lv sizes line")
        .split_whitespace()
        .map(|s| s.parse().expect("size"))
        .collect();
    assert_eq!(sizes.first(), Some(&INITIAL_MIB), "sizes {sizes:?}");
    for w in sizes.windows(2) {
        assert!(w[1] > w[0] && (w[1] - w[0]) % CHUNK_MIB == 0, "LV sizes not in chunk steps: {sizes:?}");
    }
    assert!(sizes.len() >= 4, "fewer than 3 extensions seen by lvs: {sizes:?}");
    assert!(log.contains("guest: snapshot vu_client: verify"), "snapshot not verified:\n{}", tail(&log));

    // The live merge: the base LV grew once as the top, then by lvextend for the job (asked
    // before the copy, which never found the base full: the guest fails otherwise); the chain
    // is [top, base] and everything reads back (the guest checks both, and qemu-img check).
    let sizes: Vec<u64> = log
        .lines()
        .find_map(|l| l.strip_prefix("guest: merge: base LV MiB: "))
        .expect("merge base sizes line")
        .split_whitespace()
        .map(|s| s.parse().expect("size"))
        .collect();
    assert_eq!(sizes.len(), 3, "{sizes:?}");
    assert_eq!(sizes[0], CHUNK_MIB, "the merge base's first size: {sizes:?}");
    assert_eq!(sizes[1], 2 * CHUNK_MIB, "the merge base grew once as the top: {sizes:?}");
    assert!(sizes[2] > sizes[1] && (sizes[2] - sizes[1]) % CHUNK_MIB == 0, "the base LV grew in chunks for the merge: {sizes:?}");
    let requested = log.lines().position(|l| l.contains("merge: base extension requested")).expect("the job asked for the base's extension");
    let extended = log.lines().position(|l| l.contains("merge: base extended")).expect("the SPM extended the base");
    assert!(requested < extended);
    let end = BASE_MIB + MERGE_MIB + LIVE_MIB;
    assert!(log.contains(&format!("guest: merge: read back vu_client: verify {end} MiB ok")), "not verified after the merge:\n{}", tail(&log));
}

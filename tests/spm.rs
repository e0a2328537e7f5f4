//! `thinblk spm` as a process, answering the in-process mailbox client over real files.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::TestDir;
use thinblk::mailbox::client::{Client, Completion};
use thinblk::mailbox::io::FileMailbox;
use thinblk::mailbox::wire::{Extend, Uuid};

const MIB: u64 = 1 << 20;

fn wait_completions(c: &mut Client, io: &mut FileMailbox, want: usize) -> Vec<Completion> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while got.len() < want {
        assert!(Instant::now() < deadline, "no reply from the SPM within 20 s");
        got.extend(c.poll(io).unwrap());
        std::thread::sleep(Duration::from_millis(100));
    }
    got
}

#[test]
fn spm_extends_file_volumes_and_replies() {
    let dir = TestDir::new("spm");
    let inbox = dir.path("inbox");
    let outbox = dir.path("outbox");
    std::fs::write(&inbox, vec![0u8; 2 << 20]).unwrap();
    std::fs::write(&outbox, vec![0u8; 2 << 20]).unwrap();
    let domain = Uuid::parse("8adbc85e-e554-4ae0-b318-8a5465fe5fe1").unwrap();
    let volume = Uuid::parse("d772f1c6-3ebb-43c3-a42e-73fcd8255a5f").unwrap();
    let missing = Uuid::parse("00000000-0000-0000-0000-00000000dead").unwrap();
    let vols = dir.path("volumes");
    std::fs::create_dir_all(vols.join(domain.to_string())).unwrap();
    let vol_file = vols.join(domain.to_string()).join(volume.to_string());
    std::fs::write(&vol_file, vec![0u8; MIB as usize]).unwrap();

    let mut spm = common::spm_process(&inbox, &outbox, &vols, &[], None);
    std::thread::sleep(Duration::from_millis(300));

    let mut io = FileMailbox::open(&inbox, &outbox, 3, &dir.path("host3.lock")).unwrap();
    let mut c = Client::new(volume, Box::new(|| {
        let mut n = [0u8; 16];
        // SAFETY: getrandom fills the buffer it is given.
        unsafe { libc::getrandom(n.as_mut_ptr().cast(), 16, 0) };
        n
    }));
    c.start(&mut io).unwrap();
    c.submit(Extend { domain, volume, size_mib: 300 }).unwrap();
    let done = wait_completions(&mut c, &mut io, 1);
    assert_eq!(done[0].reply_mib, 300);
    assert_eq!(std::fs::metadata(&vol_file).unwrap().len(), 300 * MIB);

    // A volume the SPM cannot extend: the reply carries size 0.
    c.submit(Extend { domain, volume: missing, size_mib: 10 }).unwrap();
    let done = wait_completions(&mut c, &mut io, 1);
    assert_eq!(done[0].reply_mib, 0);

    spm.signal(libc::SIGTERM);
    assert_eq!(spm.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn spm_file_backend_needs_volumes() {
    let out = Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .args(["spm", "--backend", "file", "--inbox", "/x", "--outbox", "/y"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim_end().lines().count(), 1);
}

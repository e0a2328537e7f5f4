//! The daemon as a process, driven by a real vhost-user frontend (libblkio).

mod common;

use std::time::{Duration, Instant};

use common::{own_threads, sparse_file, Client, Daemon, Rng, TestDir};

const MIB: u64 = 1 << 20;

fn serve_raw(dir: &TestDir, size: u64, extra: &[&str]) -> (Daemon, std::path::PathBuf) {
    let image = dir.path("disk.raw");
    if !image.exists() {
        sparse_file(&image, size);
    }
    let sock = dir.path("sock");
    let mut args = vec!["--image", image.to_str().unwrap(), "--format", "raw", "--num-queues", "2"];
    args.extend_from_slice(extra);
    (Daemon::start(&sock, &args), image)
}

#[test]
fn random_writes_read_back_exactly_on_two_queues() {
    random_writes_read_back("random", &[]);
}

/// Polling mode: kicks are asked for only before a queue thread sleeps (EVENT_IDX); requests
/// that come while it polls, and after it slept, are all served.
#[test]
fn random_writes_read_back_exactly_in_polling_mode() {
    random_writes_read_back("random-poll", &["--poll-us", "300"]);
}

fn random_writes_read_back(name: &str, extra: &[&str]) {
    let dir = TestDir::new(name);
    let size = 64 * MIB;
    let (_d, image) = serve_raw(&dir, size, extra);
    let mut c = Client::connect(&dir.path("sock"), 2).expect("connect");
    assert_eq!(c.capacity, size);
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(0x5eed_1234);
    for i in 0..300 {
        let sectors = 1 + rng.below(512); // up to 256 KiB
        let len = (sectors * 512) as usize;
        let off = rng.below(size / 512 - sectors) * 512;
        let q = i % 2;
        if rng.below(3) == 0 {
            let got = c.read(q, off, len).expect("read");
            assert!(got == model[off as usize..off as usize + len], "mismatch at {off}+{len}");
        } else {
            let mut data = vec![0u8; len];
            rng.fill(&mut data);
            assert_eq!(c.write(q, off, &data), 0);
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
    }
    assert_eq!(c.flush(0), 0);
    assert_eq!(c.flush(1), 0);
    // Whole disk through the device, then the file itself.
    for chunk in 0..(size / (4 * MIB)) {
        let off = chunk * 4 * MIB;
        let got = c.read((chunk % 2) as usize, off, (4 * MIB) as usize).expect("read back");
        assert!(got == model[off as usize..(off + 4 * MIB) as usize], "mismatch in chunk {chunk}");
    }
    let on_disk = std::fs::read(&image).expect("read image");
    assert!(on_disk == model, "image file differs from what was written");
}

#[test]
fn unaligned_guest_buffers_are_bounced() {
    // blkio allocates page-aligned buffers; a sub-page offset into the region makes the
    // guest buffer unaligned for O_DIRECT, which the device must handle.
    let dir = TestDir::new("unaligned");
    let (_d, _image) = serve_raw(&dir, 8 * MIB, &[]);
    let mut c = Client::connect(&dir.path("sock"), 1).expect("connect");
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    let base = c.region.addr as *mut u8;
    // SAFETY: offset 100 + 8192 bytes stays inside the 8 MiB region.
    let buf = unsafe { base.add(100) };
    // SAFETY: as above; the region is ours.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf, data.len()) };
    c.queues[0].write(4096, buf, data.len(), 0, blkio::ReqFlags::empty());
    let mut comp = [std::mem::MaybeUninit::<blkio::Completion>::uninit(); 1];
    let mut t = Duration::from_secs(10);
    assert_eq!(c.queues[0].do_io(&mut comp, 1, Some(&mut t), None).unwrap(), 1);
    // SAFETY: one completion was returned.
    assert_eq!(unsafe { comp[0].assume_init_ref() }.ret, 0);
    let back = c.read(0, 4096, 8192).expect("read");
    assert_eq!(back, data);
}

#[test]
fn discard_and_write_zeroes_read_back_zeroes() {
    let dir = TestDir::new("zeroes");
    let (_d, _image) = serve_raw(&dir, 16 * MIB, &["--discard", "unmap"]);
    let mut c = Client::connect(&dir.path("sock"), 2).expect("connect");
    let ones = vec![0xabu8; (4 * MIB) as usize];
    assert_eq!(c.write(0, 0, &ones), 0);
    assert_eq!(c.discard(0, 0, MIB), 0);
    assert_eq!(c.write_zeroes(1, MIB, MIB, true), 0);
    assert_eq!(c.write_zeroes(1, 2 * MIB, MIB, false), 0);
    let back = c.read(0, 0, (4 * MIB) as usize).expect("read");
    assert!(back[..(3 * MIB) as usize].iter().all(|&b| b == 0), "zeroed ranges not zero");
    assert!(back[(3 * MIB) as usize..].iter().all(|&b| b == 0xab), "untouched range changed");
}

#[test]
fn requests_past_the_end_get_an_error_status() {
    let dir = TestDir::new("pastend");
    let (_d, _image) = serve_raw(&dir, 4 * MIB, &[]);
    let mut c = Client::connect(&dir.path("sock"), 1).expect("connect");
    assert!(c.read(0, 4 * MIB, 4096).is_err());
    assert!(c.read(0, 4 * MIB - 512, 1024).is_err());
    assert_ne!(c.write(0, 4 * MIB, &[1u8; 512]), 0);
    assert_ne!(c.write_zeroes(0, 4 * MIB - 512, 4096, false), 0);
    // The device keeps serving after the errors.
    assert_eq!(c.write(0, 4 * MIB - 512, &[7u8; 512]), 0);
    assert_eq!(c.read(0, 4 * MIB - 512, 512).expect("read"), vec![7u8; 512]);
}

#[test]
fn read_only_refuses_writes() {
    let dir = TestDir::new("ro");
    let image = dir.path("disk.raw");
    std::fs::write(&image, vec![0x5au8; MIB as usize]).unwrap();
    let (_d, _) = serve_raw(&dir, MIB, &["--read-only"]);
    // The device offers VIRTIO_BLK_F_RO: a read-write frontend is turned away...
    let err = Client::connect(&dir.path("sock"), 1).err().expect("read-write connect must fail");
    assert_eq!(err.errno(), blkio::Errno::ROFS);
    // ...a read-only one reads, and its writes fail. (Writes that reach the device anyway
    // are answered IOERR: see the request parser's unit tests.)
    let mut c = Client::connect_with(&dir.path("sock"), 1, true).expect("connect");
    assert_eq!(c.read(0, 0, 4096).expect("read"), vec![0x5au8; 4096]);
    assert_ne!(c.write(0, 0, &[0u8; 4096]), 0);
    assert_ne!(c.discard(0, 0, 4096), 0);
    assert_eq!(std::fs::read(&image).unwrap(), vec![0x5au8; MIB as usize]);
}

#[test]
fn one_daemon_serves_successive_connections() {
    let dir = TestDir::new("reconnect");
    let (d, _image) = serve_raw(&dir, 8 * MIB, &[]);
    let sock = dir.path("sock");
    {
        let mut c = Client::connect(&sock, 2).expect("first connect");
        assert_eq!(c.write(1, 0, &[0x11u8; 4096]), 0);
    }
    let fds = |d: &Daemon| std::fs::read_dir(format!("/proc/{}/fd", d.child.id())).map(|r| r.count()).unwrap_or(0);
    let threads = |d: &Daemon| own_threads(d.child.id());
    let mut baseline = (0, 0);
    for round in 0..12u8 {
        let mut c = Client::connect(&sock, 1 + i32::from(round % 2)).expect("next connect");
        assert_eq!(c.read(0, 0, 4096).expect("read"), vec![0x11u8 + round; 4096]);
        assert_eq!(c.write(0, 0, &[0x12u8 + round; 4096]), 0);
        drop(c);
        // Let the daemon tear the connection down and set up for the next one.
        std::thread::sleep(Duration::from_millis(100));
        if round == 1 {
            baseline = (fds(&d), threads(&d));
        } else if round > 1 {
            // A slow teardown is not a leak: what the connection held must be gone within 5 s.
            let deadline = Instant::now() + Duration::from_secs(5);
            while (fds(&d) > baseline.0 || threads(&d) > baseline.1) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(fds(&d) <= baseline.0, "fds grew across reconnects: {} > {}", fds(&d), baseline.0);
            assert!(threads(&d) <= baseline.1, "threads grew across reconnects: {} > {}", threads(&d), baseline.1);
        }
    }
}

#[test]
fn sigterm_finishes_and_exits_zero_removing_the_socket() {
    let dir = TestDir::new("sigterm");
    let (mut d, image) = serve_raw(&dir, 8 * MIB, &[]);
    let mut c = Client::connect(&dir.path("sock"), 1).expect("connect");
    assert_eq!(c.write(0, 0, &[0x33u8; 4096]), 0);
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(!dir.path("sock").exists(), "socket left behind");
    assert_eq!(&std::fs::read(&image).unwrap()[..4096], &[0x33u8; 4096][..]);
    drop(c);
}

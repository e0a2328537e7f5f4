//! What a queue thread's per-wake-up system calls cost on this machine, each alone in a
//! tight loop: the ceiling of what moving them into the worker's ring could save
//! (docs/benchmarks.md, "Fifth look").
//!
//! - The kick: today a wake-up the kick eventfd caused costs an `epoll_wait(0)` (which of the
//!   thread's events fired) and a `preadv2(RWF_NOWAIT)` (drain the counter).
//! - The call notification: today one `io_uring_enter` submitting a NOP on a one-slot ring
//!   whose registered eventfd is the frontend's call eventfd; through `IORING_OP_MSG_RING` it
//!   would be one more entry in the worker ring's submission, which happens anyway.
//!
//! `cargo bench --bench syscalls` (env: THINBLK_BENCH_ROUNDS, default 5: each figure is the
//! median of the rounds). Multiply by the calls per IO `perf stat` counts on the queue thread
//! to get the CPU per IO at stake.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use common::{env_u64, median};
use io_uring::{opcode, IoUring};

/// Calls per timed loop (a tenth as many run first, untimed).
const CALLS: u32 = 200_000;

/// A non-blocking eventfd.
fn eventfd() -> OwnedFd {
    // SAFETY: eventfd takes no pointer; a negative result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Adds 1 to an eventfd's counter (what a frontend's kick does).
fn kick(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live local to an open eventfd.
    let r = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    assert_eq!(r, 8, "eventfd write");
}

/// Drains an eventfd the way the queue thread does (`read_nowait` in vhost/src/vring.rs).
fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 8];
    let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: one iovec over a live local buffer of 8 bytes; the fd is open.
    unsafe { libc::preadv2(fd.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
}

/// Nanoseconds per call of `f`.
fn per_call(mut f: impl FnMut()) -> f64 {
    for _ in 0..CALLS / 10 {
        f();
    }
    let t = Instant::now();
    for _ in 0..CALLS {
        f();
    }
    t.elapsed().as_nanos() as f64 / f64::from(CALLS)
}

/// Submits `n` NOPs in one `io_uring_enter` and reaps them; nanoseconds per submission.
fn nops(ring: &mut IoUring, n: usize) -> f64 {
    per_call(|| {
        for _ in 0..n {
            // SAFETY: a NOP carries no pointer for the kernel to follow.
            unsafe { ring.submission().push(&opcode::Nop::new().build()) }.expect("submission queue has room");
        }
        ring.submit_and_wait(n).expect("io_uring_enter");
        ring.completion().for_each(drop);
    })
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("syscalls: run with `cargo bench --bench syscalls`");
        return;
    }
    let rounds = env_u64("THINBLK_BENCH_ROUNDS", 5).max(1);
    // The queue thread's event set: the kick eventfd edge-triggered, as in queue_thread.rs.
    // SAFETY: epoll_create1 takes no pointer; checked below.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0, "epoll_create1");
    // SAFETY: a new descriptor nothing else owns.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    let k = eventfd();
    let mut ev = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLET) as u32, u64: 0 };
    // SAFETY: `ev` is a live epoll_event; both descriptors are open.
    assert_eq!(unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, k.as_raw_fd(), &mut ev) }, 0);
    let mut out = [libc::epoll_event { events: 0, u64: 0 }; 8];
    let mut epoll_wait0 = || {
        // SAFETY: `out` has room for 8 events; timeout 0 never waits.
        unsafe { libc::epoll_wait(ep.as_raw_fd(), out.as_mut_ptr(), 8, 0) };
    };
    // The notifier: a one-slot ring whose completions signal a registered eventfd.
    let call = eventfd();
    let mut notifier = IoUring::new(1).expect("notifier ring");
    notifier.submitter().register_eventfd(call.as_raw_fd()).expect("register_eventfd");
    // A worker-sized ring, for the cost of one more entry in a submission made anyway.
    let mut worker = IoUring::new(64).expect("worker ring");

    let mut figures: Vec<(&str, Vec<f64>)> = vec![
        ("a kick (eventfd write), for subtraction", vec![]),
        ("kick + epoll_wait(0) + preadv2", vec![]),
        ("=> today's kick handling (epoll_wait + preadv2)", vec![]),
        ("notification: io_uring_enter of 1 NOP + reap", vec![]),
        ("worker ring: 8 NOPs per io_uring_enter", vec![]),
        ("worker ring: 9 NOPs per io_uring_enter", vec![]),
        ("=> one more entry in a submission", vec![]),
    ];
    for _ in 0..rounds {
        let alone = per_call(|| kick(&k));
        drain(&k);
        let handled = per_call(|| {
            kick(&k);
            epoll_wait0();
            drain(&k);
        });
        let notify = nops(&mut notifier, 1);
        let (eight, nine) = (nops(&mut worker, 8), nops(&mut worker, 9));
        for (f, v) in figures.iter_mut().zip([alone, handled, handled - alone, notify, eight, nine, nine - eight]) {
            f.1.push(v);
        }
    }
    println!("system call costs, medians of {rounds} rounds of {CALLS} calls");
    for (name, mut v) in figures {
        println!("{name:<50} {:>8.0} ns", median(&mut v));
    }
}

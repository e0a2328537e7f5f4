//! What a queue thread's per-wake-up system calls cost on this machine, each alone in a
//! tight loop: an estimate of what moving them into the worker's ring could save
//! (docs/benchmarks.md, "Fifth look").
//!
//! The loops run on a thread under the daemon's default filters (`--seccomp on`: the process
//! filter, the protocol thread's, which the queue threads it starts inherit, then the queue
//! thread's own), through the daemon's own code where it has one:
//! - the kick: a wake-up the kick eventfd caused costs an `epoll_wait(0)` on the thread's
//!   event set (which event fired; `vmm_sys_util`'s `Epoll`, the kick edge-triggered, as in
//!   `queue_thread.rs`) and `read_nowait` (vring.rs) to drain the counter;
//! - the call notification: `CallNotifier::notify` (vring.rs), one `io_uring_enter` of a NOP
//!   on a one-slot ring whose registered eventfd is the frontend's call eventfd. Through
//!   `IORING_OP_MSG_RING` it would instead be one more entry in the worker ring's next
//!   submission, timed here as 9 NOPs per `io_uring_enter` against 8 on a ring with the
//!   worker's setup flags (a message entry does more than a NOP: it posts to another ring).
//!
//! These are warm-loop figures: in the daemon the calls follow a sleep and a kick written on
//! another CPU, so each may cost more there. `cargo bench --bench syscalls` (env:
//! THINBLK_BENCH_ROUNDS, default 5: each figure is the median of the rounds). Multiply by the
//! calls per IO `perf stat` counts on a queue thread to estimate the CPU per IO at stake.

mod common;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::time::Instant;

use common::{env_u64, median};
use io_uring::{opcode, IoUring};
use thinblk_vhost::seccomp::{apply, process_filter, protocol_filter, queue_filter, SeccompMode};
use thinblk_vhost::vring::{read_nowait, CallNotifier};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Calls per timed loop (a tenth as many run first, untimed).
const CALLS: u32 = 200_000;

/// What each round prints, in order.
const FIGURES: [&str; 7] = [
    "a kick (eventfd write), for subtraction",
    "kick + epoll_wait(0) + read_nowait",
    "=> today's kick handling",
    "notification: CallNotifier::notify",
    "worker ring: 8 NOPs per io_uring_enter",
    "worker ring: 9 NOPs per io_uring_enter",
    "=> one more entry in a submission",
];

/// A non-blocking eventfd: the frontend's end, which kicks, and the daemon's own descriptor
/// of it, as the daemon receives it over the socket.
fn eventfd() -> (EventFd, File) {
    let frontend = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let ours = frontend.try_clone().expect("eventfd dup");
    // SAFETY: `into_raw_fd` hands over a new descriptor that nothing else owns.
    (frontend, unsafe { File::from_raw_fd(ours.into_raw_fd()) })
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
        assert_eq!(ring.completion().count(), n, "every NOP completed");
    })
}

/// One round of every figure, in the order of [`FIGURES`].
fn round(epoll: &Epoll, (frontend, k): &(EventFd, File), notifier: &CallNotifier, worker: &mut IoUring) -> [f64; 7] {
    let mut events = [EpollEvent::default(); 8];
    // In this loop the kick stays on the epoll ready list (nothing takes it off), so a kick
    // here costs a little less than one that follows a harvest: what the subtraction leaves
    // to the handling is, if anything, too much.
    let kick = || frontend.write(1).expect("kick");
    let alone = per_call(kick);
    let _ = read_nowait(k);
    let _ = epoll.wait(0, &mut events);
    let handled = per_call(|| {
        kick();
        assert_eq!(epoll.wait(0, &mut events).expect("epoll_wait"), 1, "the kick is ready");
        assert_eq!(read_nowait(k).expect("read_nowait"), Some(1), "one kick drained");
    });
    let notify = per_call(|| notifier.notify().expect("notify"));
    let (eight, nine) = (nops(worker, 8), nops(worker, 9));
    [alone, handled, handled - alone, notify, eight, nine, nine - eight]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("syscalls: run with `cargo bench --bench syscalls`");
        return;
    }
    let rounds = env_u64("THINBLK_BENCH_ROUNDS", 5).max(1) as usize;
    // Set up as the daemon does before a queue thread starts: its event set with the kick
    // in it, the notifier ring, the worker ring with its setup flags.
    let epoll = Epoll::new().expect("epoll");
    let kick = eventfd();
    epoll
        .ctl(ControlOperation::Add, kick.1.as_raw_fd(), EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, 0))
        .expect("epoll_ctl");
    let notifier = CallNotifier::new(eventfd().1).expect("notifier ring");
    let mut worker: IoUring =
        IoUring::builder().setup_coop_taskrun().setup_taskrun_flag().setup_submit_all().build(64).expect("worker ring");
    let process = process_filter(SeccompMode::On).expect("process filter");
    let protocol = protocol_filter(SeccompMode::On).expect("protocol filter");
    let queue = queue_filter(SeccompMode::On).expect("queue filter");
    let runs = std::thread::spawn(move || {
        for f in process.iter().chain(protocol.iter()).chain(queue.iter()) {
            apply(f).expect("seccomp filter installed");
        }
        let mut runs = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            runs.push(round(&epoll, &kick, &notifier, &mut worker));
        }
        runs
    })
    .join()
    .expect("timing thread");
    println!("system call costs under --seccomp on, medians of {rounds} rounds of {CALLS} calls");
    for (i, name) in FIGURES.iter().enumerate() {
        let mut v: Vec<f64> = runs.iter().map(|r| r[i]).collect();
        println!("{name:<50} {:>8.0} ns", median(&mut v));
    }
}

//! One thread per queue, with one blocking point: the worker's io_uring, which completes host
//! IO and also polls the thread's event set (an epoll of the ring's kick, the park hub's
//! wake-up, a poke of our own, meaning look at the ring once, and an exit eventfd). Each
//! wake-up completes what ended, looks at the ring, and hands the events to the device.
//!
//! The kick eventfd is the frontend's: it is watched edge-triggered (every write of the
//! frontend is an edge, so a counter we could not drain never makes the ring spin) and only
//! ever read without waiting ([`Vring::read_kick`]). The poke and exit eventfds are ours alone.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::BlkDevice;
use crate::vring::Vring;

/// Event tokens of a queue thread.
const KICK: u64 = 0;
const RESUME: u64 = 2;
const EXIT: u64 = 3;
const POKE: u64 = 4;

/// How often a gated queue looks whether the previous connection's requests have ended.
const GATED_POLL_MS: u64 = 50;

/// The longest a queue thread's wait lasts without an event (see `run`).
const BACKSTOP_MS: u64 = 1000;

/// A running queue thread.
pub struct QueueThread {
    epoll: std::sync::Arc<Epoll>,
    exit: EventFd,
    /// Ours alone (never shared with the frontend): a write of 1 never waits.
    poke: EventFd,
    handle: Option<JoinHandle<()>>,
    /// Set by [`QueueThread::signal_exit`]: a thread left behind in a storage call sees it
    /// when it returns, whichever thread's events its ring now polls.
    exit_flag: std::sync::Arc<AtomicBool>,
    /// Set by the thread as it ends (also by unwinding): a stop waits for it with a deadline.
    ended: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

/// Sets the thread's `ended` flag when dropped: at its return or its unwinding.
struct EndSignal(std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);

impl Drop for EndSignal {
    fn drop(&mut self) {
        let (flag, cv) = &*self.0;
        if let Ok(mut f) = flag.lock() {
            *f = true;
        }
        cv.notify_all();
    }
}

impl QueueThread {
    /// Starts the thread of queue `q`.
    pub fn spawn(device: BlkDevice, q: usize, vring: Vring) -> io::Result<QueueThread> {
        let epoll = std::sync::Arc::new(Epoll::new()?);
        let exit = EventFd::new(EFD_NONBLOCK)?;
        let add = |fd: RawFd, token: u64| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))
        };
        add(exit.as_raw_fd(), EXIT)?;
        let poke = EventFd::new(EFD_NONBLOCK)?;
        add(poke.as_raw_fd(), POKE)?;
        let poked = poke.try_clone()?;
        // The thread keeps a descriptor of the exit eventfd of its own: a thread left behind
        // by a stop (see `stop`) must still find the exit event when its storage call returns
        // (closing the last descriptor would take it out of the epoll set).
        let exited = exit.try_clone()?;
        if let Some(fd) = device.park_hub().wake_fd(q) {
            add(fd, RESUME)?;
        }
        // Before the thread starts (its seccomp filter forbids register calls): the ring
        // polls this thread's event set from now on.
        device.watch_events(q, epoll.as_raw_fd())?;
        let ep = epoll.clone();
        let exit_flag = std::sync::Arc::new(AtomicBool::new(false));
        let exiting = exit_flag.clone();
        let filter = device.seccomp();
        let ended = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let signal = EndSignal(ended.clone());
        let handle = std::thread::Builder::new().name(format!("queue{q}")).spawn(move || {
            let _signal = signal;
            let _exited = exited;
            if let Some(f) = filter {
                if let Err(e) = crate::seccomp::install_or_refuse(&f) {
                    // Never fail open: the daemon stops, as a violation under strict would
                    // (the journal and the frontend's inflight region keep what it acknowledged).
                    tracing::error!(queue = q, error = %e, "stopping");
                    std::process::exit(1);
                }
            }
            run(&device, q, &vring, &ep, &poked, &exiting)
        })?;
        Ok(QueueThread { epoll, exit, poke, exit_flag, handle: Some(handle), ended })
    }

    /// Makes the thread look at its ring once, as a kick would (without touching the
    /// frontend's kick eventfd).
    pub fn poke(&self) {
        if let Err(e) = self.poke.write(1) {
            tracing::debug!(error = %e, "poking a queue thread failed");
        }
    }

    /// Starts watching a kick eventfd (edge-triggered).
    pub fn watch(&self, fd: RawFd) -> io::Result<()> {
        self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, KICK))
    }

    /// Stops watching a kick eventfd.
    pub fn unwatch(&self, fd: RawFd) {
        let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    /// Tells the thread to end (it ends at its next event loop pass).
    pub fn signal_exit(&self) {
        self.exit_flag.store(true, Ordering::SeqCst);
        let _ = self.exit.write(1);
    }

    /// Stops the thread and waits for it until `deadline` at most: a thread inside a storage
    /// call that does not return is left behind (logged; it ends when the call returns, and
    /// its requests were fenced by the caller, so it writes nothing into guest memory). False
    /// if it was left.
    pub fn stop(mut self, deadline: std::time::Instant) -> bool {
        self.signal_exit();
        let (flag, cv) = &*self.ended;
        let mut ended = flag.lock().unwrap_or_else(|e| e.into_inner());
        while !*ended {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                tracing::error!("storage does not answer: a queue thread is inside a storage call; left behind");
                return false;
            }
            ended = match cv.wait_timeout(ended, left) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        drop(ended);
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                tracing::error!("a queue thread panicked");
            }
        }
        true
    }
}

fn run(device: &BlkDevice, q: usize, vring: &Vring, epoll: &Epoll, poke: &EventFd, exit: &AtomicBool) {
    let mut events = [EpollEvent::default(); 8];
    let mut errors = 0u64;
    let mut was_gated = false;
    let mut window = PollWindow::new(device.poll_max(), std::env::var_os("THINBLK_POLL_FIXED").is_none());
    let mut report = |r: io::Result<()>| {
        if let Err(e) = r {
            errors += 1;
            if errors <= 10 || errors % 1000 == 0 {
                tracing::error!(queue = q, error = %e, errors, "queue event failed");
            }
        }
    };
    loop {
        if exit.load(Ordering::SeqCst) {
            return;
        }
        // While an earlier connection's requests are still at the storage, the rings are
        // looked at periodically: the gate opens without an event of ours. Whoever sees it
        // open first, the ring is looked at once after it opened (what waits behind it may
        // never be kicked again).
        let gated = device.gated();
        if was_gated && !gated {
            report(device.on_kick(q, vring));
        }
        was_gated = gated;
        // The one blocking point: completions, kicks and our own events all end it. It is
        // bounded all the same (a backstop: a poll completion another thread took before
        // this wait began would otherwise be seen only at the next completion).
        let limit = std::time::Duration::from_millis(if gated { GATED_POLL_MS } else { BACKSTOP_MS });
        let t0 = std::time::Instant::now();
        let r = device.wait(q, Some(limit), window.budget());
        window.after(t0.elapsed());
        if let Err(e) = r {
            // Not the end of the queue: logged (rate-limited), and tried again shortly.
            report(Err(e));
            std::thread::sleep(std::time::Duration::from_millis(GATED_POLL_MS));
        }
        let ready = match device.on_completion(q) {
            Ok(ready) => ready,
            Err(e) => {
                report(Err(e));
                false
            }
        };
        if ready {
            let n = match epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    tracing::error!(queue = q, error = %e, "queue thread cannot read its events");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    EXIT => return,
                    // Drained without waiting, whatever the frontend did to its flags.
                    KICK => {
                        vring.read_kick();
                    }
                    // Our own non-blocking eventfd: EAGAIN just means it was read already.
                    POKE => {
                        let _ = poke.read();
                    }
                    RESUME => report(device.on_resume(q)),
                    _ => {}
                }
            }
        }
        // Looks at the ring after every wake-up, after the kicks were drained: completions
        // free room, and a chain published before a kick drained above is seen here.
        report(device.on_kick(q, vring));
    }
}

/// Polling mode's busy-poll time before each sleep. Adaptive (after QEMU's iothread
/// `poll-max-ns`): it starts at zero, doubles from 4 µs while waits end within the longest
/// poll, and drops to zero after a wait that lasted longer (an idle queue does not poll).
/// THINBLK_POLL_FIXED set (to any value): always the longest (for A/B runs, docs/benchmarks.md).
struct PollWindow {
    /// The longest poll (`--poll-us`; zero: polling mode off).
    max: std::time::Duration,
    /// Adapts (otherwise always `max`).
    adaptive: bool,
    /// The next wait's poll.
    now: std::time::Duration,
}

impl PollWindow {
    fn new(max: std::time::Duration, adaptive: bool) -> PollWindow {
        PollWindow { max, adaptive, now: if adaptive { std::time::Duration::ZERO } else { max } }
    }

    /// How long to poll before the next sleep.
    fn budget(&self) -> std::time::Duration {
        self.now
    }

    /// Adapts to a wait (its poll included) that lasted `waited`.
    fn after(&mut self, waited: std::time::Duration) {
        if !self.adaptive || waited <= self.now {
            return;
        }
        self.now = if waited > self.max {
            std::time::Duration::ZERO
        } else {
            (self.now * 2).max(std::time::Duration::from_micros(4)).min(self.max)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::PollWindow;
    use std::time::Duration;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn the_poll_window_grows_while_waits_are_short_and_drops_after_a_long_one() {
        let mut w = PollWindow::new(50 * US, true);
        assert_eq!(w.budget(), Duration::ZERO, "an idle queue starts without polling");
        // Short waits (work came soon after the thread slept): 4, 8, 16, 32, then the cap.
        let mut seen = vec![];
        for _ in 0..6 {
            w.after((w.budget() + 10 * US).min(49 * US));
            seen.push(w.budget().as_micros());
        }
        assert_eq!(seen, [4, 8, 16, 32, 50, 50]);
        // Work found within the poll: unchanged.
        w.after(20 * US);
        assert_eq!(w.budget(), 50 * US);
        // A wait longer than the longest poll (an idle guest): polling stops.
        w.after(51 * US);
        assert_eq!(w.budget(), Duration::ZERO);
        // Polling mode off: never polls, whatever the waits.
        let mut off = PollWindow::new(Duration::ZERO, true);
        off.after(US);
        assert_eq!(off.budget(), Duration::ZERO);
        // Fixed: always the longest.
        let mut fixed = PollWindow::new(50 * US, false);
        fixed.after(Duration::from_secs(1));
        assert_eq!(fixed.budget(), 50 * US);
    }
}

//! The daemon: accept a frontend, serve it, drain, accept the next; stop cleanly on signals.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use std::os::unix::net::{UnixListener, UnixStream};

use thinblk_vhost::protocol::{install_sigbus_guard, End, Session};
use thinblk_vhost::{BlkDevice, DeviceConfig, Disk};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Errors that end the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The device could not be set up.
    #[error("device setup failed: {0}")]
    Device(#[from] thinblk_vhost::error::DeviceError),
    /// A connection could not be set up.
    #[error("vhost-user: {0}")]
    VhostUser(#[from] thinblk_vhost::error::ProtocolError),
    /// Waiting for a connection or a signal failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Shutdown coordination between the signal thread and the serving loop.
pub struct Shutdown {
    requested: AtomicBool,
    wake: EventFd,
    active: Mutex<Option<(BlkDevice, UnixStream)>>,
}

impl Shutdown {
    /// A shutdown switch, not yet thrown.
    pub fn new() -> io::Result<Arc<Shutdown>> {
        Ok(Arc::new(Shutdown {
            requested: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK)?,
            active: Mutex::new(None),
        }))
    }

    /// Whether shutdown was asked for.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Asks the daemon to stop: in-flight IO is finished and completed, then the frontend
    /// connection is closed.
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        if let Ok(active) = self.active.lock() {
            if let Some((device, socket)) = active.as_ref() {
                device.quiesce();
                let _ = socket.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn set_active(&self, v: Option<(BlkDevice, UnixStream)>) {
        if let Ok(mut a) = self.active.lock() {
            *a = v;
        }
    }
}

/// Blocks SIGTERM and SIGINT in every thread and handles them on a dedicated one.
pub fn install_signal_thread(shutdown: Arc<Shutdown>) -> io::Result<()> {
    on_termination(move || {
        tracing::info!("shutting down: finishing in-flight IO");
        shutdown.request();
    })
}

/// Blocks SIGTERM and SIGINT in every thread (call before spawning others) and runs `f`
/// on a dedicated thread each time one arrives.
pub fn on_termination(f: impl Fn() + Send + 'static) -> io::Result<()> {
    let set = block_termination_signals()?;
    std::thread::Builder::new().name("signals".into()).spawn(move || loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is a valid, initialised signal set; `sig` a valid out-pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            tracing::info!(signal = sig, "termination signal");
            f();
        }
    })?;
    Ok(())
}

/// Blocks SIGTERM and SIGINT in the calling thread, so threads it spawns afterwards inherit
/// the mask (only the signal thread of [`on_termination`] then receives them). Call it first
/// thing, before any thread is spawned. Returns the signal set.
pub fn block_termination_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the calls only modify it and this thread's mask.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(set)
}

/// Waits until `fd` is readable (true) or shutdown is requested (false).
fn wait_for_connection(fd: RawFd, shutdown: &Shutdown) -> io::Result<bool> {
    loop {
        if shutdown.requested() {
            return Ok(false);
        }
        let mut fds = [
            libc::pollfd { fd, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: shutdown.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 || shutdown.requested() {
            return Ok(false);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return Ok(true);
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return Err(io::Error::other("listening socket failed"));
        }
    }
}

/// Serves frontends on `listener` one after another until shutdown, then flushes the image.
pub fn serve(
    image: Arc<dyn Disk>,
    cfg: &DeviceConfig,
    listener: UnixListener,
    shutdown: &Arc<Shutdown>,
    before_close: &dyn Fn(),
) -> Result<(), DaemonError> {
    install_sigbus_guard()?;
    let mut connection = 0u64;
    // The previous connection's device while its stop left requests at the storage.
    let mut behind: Option<BlkDevice> = None;
    loop {
        let device = BlkDevice::new(image.clone(), cfg)?;
        if let Some(prev) = behind.take() {
            // Its requests were fenced; the new connection's queues hold everything (also
            // what the frontend resubmits) until they have ended, so no stale write lands
            // after a newer one. A thread of its own keeps reaping them.
            device.serve_after(&prev);
            let reaper = prev.clone();
            std::thread::Builder::new().name("reap-stale".into()).spawn(move || {
                // Each pass waits up to the stop limit; one that fails at once (an io_uring
                // error) does not spin.
                while !reaper.drain(false) {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
                tracing::info!("requests left at the storage by an earlier connection have ended");
            })?;
        }
        if !wait_for_connection(listener.as_raw_fd(), shutdown)? {
            break;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed");
                continue;
            }
        };
        connection += 1;
        tracing::info!(connection, "frontend connected");
        let mut session = Session::new(device.clone(), stream)?;
        shutdown.set_active(Some((device.clone(), session.socket()?)));
        if shutdown.requested() {
            device.quiesce();
            let _ = session.socket().and_then(|s| s.shutdown(std::net::Shutdown::Both));
        }
        match session.run() {
            End::Disconnected => tracing::info!(connection, "frontend disconnected"),
            End::Refused(e) => tracing::warn!(connection, error = %e, "frontend connection closed: refused message"),
        }
        shutdown.set_active(None);
        // Stops the queue threads; then finish host IO, but do not complete requests the
        // frontend will resubmit.
        drop(session);
        if !device.drain(false) {
            device.fence();
            tracing::error!(inflight = device.in_hand(), "storage does not answer: requests of the closed connection are still at the storage; the next connection waits for them");
            behind = Some(device.clone());
        } else if device.gated() {
            // It was still waiting for an earlier connection: so does the next one.
            behind = Some(device.clone());
        }
        if shutdown.requested() {
            break;
        }
    }
    // What runs beside the guest (a merge job) stops first: it must not change the chain
    // under the final close.
    before_close();
    // Metadata first, then the files: what the guest saw completed is durable, or we say so.
    // Storage that hangs must not hang the exit: the flush gets twice the stop limit (`--stop-limit`), then we exit
    // with an error (the flush thread dies with the process).
    let (tx, rx) = std::sync::mpsc::channel();
    let closing = image.clone();
    std::thread::Builder::new().name("close".into()).spawn(move || {
        let _ = tx.send(closing.close());
    })?;
    let close_limit = cfg.stop.limit.saturating_mul(2);
    match rx.recv_timeout(close_limit) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(error = %e, "final flush failed");
            return Err(io::Error::other(format!("final flush: {e}")).into());
        }
        Err(_) => {
            tracing::error!(limit_ms = close_limit.as_millis() as u64, "final flush did not finish: storage does not answer");
            return Err(io::Error::other("final flush did not finish in time").into());
        }
    }
    tracing::info!("image flushed; exiting");
    Ok(())
}


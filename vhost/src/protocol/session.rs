//! One frontend connection: every message validated against the specification and against
//! what we offered, then applied to the rings, the memory table and the device.
//!
//! A message we refuse is logged with its reason. If the frontend asked for an
//! acknowledgement (REPLY_ACK negotiated and NEED_REPLY set), it gets a failure ack and the
//! connection goes on; otherwise (the specification has no way to say "no") the connection
//! is closed. Nothing is acknowledged and then ignored.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

use crate::config::CONFIG_LEN;
use crate::device::BlkDevice;
use crate::error::ProtocolError;
use crate::inflight::InflightRegion;
use crate::protocol::memory::MemoryTable;
use crate::protocol::message::*;
use crate::protocol::queue_thread::QueueThread;
use crate::protocol::wire::{read_message, send_reply, Message};
use crate::vring::{accept_eventfd, Vring};
use crate::context::{AtomicMem, Mem};
use crate::guest_write::DirtyLog;

/// The protocol features we offer: several queues, a shared dirty log (live migration),
/// acknowledgements, the config space, inflight tracking, memory slots.
pub const OFFERED_PROTOCOL: u64 = PF_MQ | PF_LOG_SHMFD | PF_REPLY_ACK | PF_CONFIG | PF_INFLIGHT_SHMFD | PF_CONFIGURE_MEM_SLOTS;

/// How long a ring start waits for the previous owner of the image (the source of a live
/// migration, which lets go before it answers its last GET_VRING_BASE) to drop its lock.
pub const ACTIVATE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Pause between attempts to hand the image over or take it while storage fails.
pub const HANDOVER_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// What a handled message answers.
enum Reply {
    /// Nothing (an ack if one was asked for).
    Done,
    /// A reply body.
    Body(Vec<u8>),
    /// A reply body with a descriptor.
    BodyFd(Vec<u8>, File),
}

/// Why a session ended.
#[derive(Debug)]
pub enum End {
    /// The frontend closed the connection (or we were asked to stop).
    Disconnected,
    /// We closed it: the frontend sent something we refuse and could not be told otherwise.
    Refused(ProtocolError),
}

/// The state of one frontend connection.
pub struct Session {
    device: BlkDevice,
    sock: UnixStream,
    mem: AtomicMem,
    table: MemoryTable,
    vrings: Vec<Vring>,
    threads: Vec<QueueThread>,
    /// Kick fd registered with each queue thread.
    registered: Vec<Option<RawFd>>,
    owner: bool,
    acked_features: u64,
    acked_protocol: u64,
    refused: u64,
    /// The inflight region (INFLIGHT_SHMFD), shared with the frontend.
    region: Option<Arc<InflightRegion>>,
    /// Guest-memory faults counted before this session began.
    faults_at_start: u64,
    /// The dirty log every mapped region writes into (live migration).
    log: Arc<DirtyLog>,
}

impl Session {
    /// Sets up the rings and queue threads for a connection on `sock`.
    pub fn new(device: BlkDevice, sock: UnixStream) -> Result<Session, ProtocolError> {
        let mem = AtomicMem::new(Mem::new());
        device.update_memory(mem.clone());
        device.mark_connected();
        let n = device.num_queues();
        let mut vrings = Vec::with_capacity(n);
        for _ in 0..n {
            vrings.push(Vring::new(mem.clone(), device.max_queue_size()).map_err(|e| ProtocolError::Map(e.to_string()))?);
        }
        let mut threads = Vec::with_capacity(n);
        for (q, v) in vrings.iter().enumerate() {
            threads.push(QueueThread::spawn(device.clone(), q, v.clone()).map_err(ProtocolError::Host)?);
        }
        crate::guard::guard_session(Some(sock.as_raw_fd()));
        let log = DirtyLog::new();
        Ok(Session {
            device,
            sock,
            mem,
            table: MemoryTable::new(log.clone()),
            log,
            vrings,
            threads,
            registered: vec![None; n],
            owner: false,
            acked_features: 0,
            acked_protocol: 0,
            refused: 0,
            region: None,
            faults_at_start: crate::guard::guard_faults(),
        })
    }

    /// Serves messages until the frontend disconnects or is refused.
    pub fn run(&mut self) -> End {
        let end = self.serve();
        if self.faulted() {
            let e = ProtocolError::MemoryFault;
            tracing::error!(error = %e, "the connection was closed");
            return End::Refused(e);
        }
        end
    }

    fn serve(&mut self) -> End {
        loop {
            let msg = match read_message(&self.sock) {
                Ok(Some(m)) => m,
                Ok(None) => return End::Disconnected,
                Err(ProtocolError::Socket(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return End::Disconnected;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "closing the connection: unreadable message");
                    return End::Refused(e);
                }
            };
            let header = msg.header;
            tracing::debug!(request = name(header.request), size = header.size, fds = msg.files.len(), flags = header.flags, "frontend message");
            let answer = self.handle(msg);
            self.table.reap();
            let result = match answer {
                Ok(Reply::Body(b)) => send_reply(&self.sock, &header, &b, None),
                Ok(Reply::BodyFd(b, f)) => send_reply(&self.sock, &header, &b, Some(&f)),
                Ok(Reply::Done) if self.reply_ack() && header.need_reply() => {
                    send_reply(&self.sock, &header, &0u64.to_le_bytes(), None)
                }
                Ok(Reply::Done) => Ok(()),
                Err(e) => {
                    self.refused += 1;
                    if self.refused <= 20 || self.refused % 1000 == 0 {
                        tracing::warn!(request = name(header.request), code = header.request, error = %e, refused = self.refused, "refused a frontend message");
                    }
                    if self.reply_ack() && header.need_reply() && !expects_body(header.request) {
                        send_reply(&self.sock, &header, &1u64.to_le_bytes(), None)
                    } else {
                        tracing::warn!(request = name(header.request), "closing the connection: the refusal cannot be answered");
                        return End::Refused(e);
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "sending a reply failed");
                return End::Disconnected;
            }
        }
    }

    /// A clone of the socket, to shut the session down from another thread.
    pub fn socket(&self) -> std::io::Result<UnixStream> {
        self.sock.try_clone()
    }

    /// Whether guest memory faulted during this session (the guard then shut our socket).
    fn faulted(&self) -> bool {
        crate::guard::guard_faults() != self.faults_at_start
    }

    fn reply_ack(&self) -> bool {
        self.acked_protocol & PF_REPLY_ACK != 0
    }

    fn need_protocol(&self, bit: u64, request: u32) -> Result<(), ProtocolError> {
        if self.acked_protocol & bit == 0 {
            return Err(ProtocolError::NotNegotiated(name(request)));
        }
        Ok(())
    }

    /// A region attached while rings run would not hold what they took before it: a stop
    /// would then leave parked requests to a region that never recorded them (lost). QEMU
    /// and cloud-hypervisor send both messages before the first ring starts.
    /// tests/hostile.rs case "an inflight region after the ring started".
    fn no_ring_started(&self, request: u32) -> Result<(), ProtocolError> {
        if self.vrings.iter().any(|v| v.lock().get_queue().ready()) {
            return Err(ProtocolError::State(match request {
                code::GET_INFLIGHT_FD => "GET_INFLIGHT_FD with a ring started",
                _ => "SET_INFLIGHT_FD with a ring started",
            }));
        }
        Ok(())
    }

    fn no_files(msg: &Message) -> Result<(), ProtocolError> {
        if !msg.files.is_empty() {
            return Err(ProtocolError::FdCount { want: 0, got: msg.files.len() });
        }
        Ok(())
    }

    fn vring(&self, index: u32) -> Result<&Vring, ProtocolError> {
        self.vrings.get(index as usize).ok_or(ProtocolError::QueueIndex(index))
    }

    fn handle(&mut self, mut msg: Message) -> Result<Reply, ProtocolError> {
        let h = msg.header;
        let body = std::mem::take(&mut msg.body);
        match decode(h.request, &body)? {
            Decoded::GetFeatures => {
                Self::no_files(&msg)?;
                Ok(Reply::Body(self.device.features().to_le_bytes().to_vec()))
            }
            Decoded::SetFeatures(f) => {
                Self::no_files(&msg)?;
                let offered = self.device.features();
                if f & !offered != 0 {
                    return Err(ProtocolError::NotOffered { what: "features", bits: f & !offered });
                }
                if f & F_LOG_ALL != 0 && self.acked_protocol & PF_LOG_SHMFD == 0 {
                    // The log would be an address in the frontend's process: we cannot log.
                    return Err(ProtocolError::NotNegotiated("VHOST_F_LOG_ALL (LOG_SHMFD)"));
                }
                self.acked_features = f;
                // QEMU sets it when a migration starts and clears it when one ends, rings running.
                self.log.set_enabled(f & F_LOG_ALL != 0);
                let event_idx = f & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0;
                for v in &self.vrings {
                    v.lock().get_queue_mut().set_event_idx(event_idx);
                }
                self.device.set_event_idx(event_idx);
                if f & F_PROTOCOL_FEATURES == 0 {
                    for q in 0..self.vrings.len() {
                        self.vrings[q].set_enabled(true);
                        self.sync_kick(q)?;
                    }
                }
                Ok(Reply::Done)
            }
            Decoded::SetOwner => {
                Self::no_files(&msg)?;
                if self.owner {
                    return Err(ProtocolError::State("SET_OWNER: already owned"));
                }
                self.owner = true;
                Ok(Reply::Done)
            }
            Decoded::ResetOwner => {
                Self::no_files(&msg)?;
                self.owner = false;
                Ok(Reply::Done)
            }
            Decoded::GetProtocolFeatures => {
                Self::no_files(&msg)?;
                Ok(Reply::Body(OFFERED_PROTOCOL.to_le_bytes().to_vec()))
            }
            Decoded::SetProtocolFeatures(f) => {
                Self::no_files(&msg)?;
                let offered = OFFERED_PROTOCOL;
                if f & !offered != 0 {
                    return Err(ProtocolError::NotOffered { what: "protocol features", bits: f & !offered });
                }
                self.acked_protocol = f;
                Ok(Reply::Done)
            }
            Decoded::GetQueueNum => {
                Self::no_files(&msg)?;
                self.need_protocol(PF_MQ, h.request)?;
                Ok(Reply::Body((self.vrings.len() as u64).to_le_bytes().to_vec()))
            }
            Decoded::GetMaxMemSlots => {
                Self::no_files(&msg)?;
                self.need_protocol(PF_CONFIGURE_MEM_SLOTS, h.request)?;
                Ok(Reply::Body((MAX_MEM_SLOTS as u64).to_le_bytes().to_vec()))
            }
            Decoded::SetMemTable(regions) => {
                let mem = self.table.set(&regions, std::mem::take(&mut msg.files))?;
                self.install(mem);
                Ok(Reply::Done)
            }
            Decoded::AddMemReg(r) => {
                self.need_protocol(PF_CONFIGURE_MEM_SLOTS, h.request)?;
                if msg.files.len() != 1 {
                    return Err(ProtocolError::FdCount { want: 1, got: msg.files.len() });
                }
                let Some(file) = msg.files.pop() else { return Err(ProtocolError::FdCount { want: 1, got: 0 }) };
                let mem = self.table.add(&r, file, MAX_MEM_SLOTS)?;
                self.install(mem);
                Ok(Reply::Done)
            }
            Decoded::RemMemReg(r) => {
                self.need_protocol(PF_CONFIGURE_MEM_SLOTS, h.request)?;
                // The specification lets a frontend pass one (useless) descriptor: it is closed.
                if msg.files.len() > 1 {
                    return Err(ProtocolError::FdCount { want: 0, got: msg.files.len() });
                }
                let mem = self.table.remove(&r)?;
                self.install(mem);
                Ok(Reply::Done)
            }
            Decoded::SetVringNum(s) => {
                Self::no_files(&msg)?;
                let max = u32::from(self.device.max_queue_size());
                let v = self.vring(s.index)?;
                if v.lock().get_queue().ready() {
                    return Err(ProtocolError::State("SET_VRING_NUM on a started ring"));
                }
                if s.num == 0 || s.num > max || !s.num.is_power_of_two() {
                    return Err(ProtocolError::RingSize { size: s.num, max });
                }
                v.set_queue_size(s.num as u16);
                Ok(Reply::Done)
            }
            Decoded::SetVringAddr(a) => {
                Self::no_files(&msg)?;
                let v = self.vring(a.index)?.clone();
                if a.flags & !VRING_ADDR_F_LOG != 0 {
                    return Err(ProtocolError::Flags(a.flags));
                }
                let tr = |x: u64| self.table.to_guest(x).ok_or(ProtocolError::Unmapped(x));
                let (desc, avail, used) = (tr(a.desc)?, tr(a.avail)?, tr(a.used)?);
                // The used ring is logged where it is (crate::guest_write): a log address
                // elsewhere would leave the destination with a stale ring. QEMU gives the
                // ring's own guest address.
                if a.flags & VRING_ADDR_F_LOG != 0 && a.log != used {
                    return Err(ProtocolError::LogAddress { used, log: a.log });
                }
                {
                    let s = v.lock();
                    let q = s.get_queue();
                    if q.ready() {
                        // A migration turns the log flag on and off while the ring runs: the
                        // same addresses are fine, new ones are not.
                        // tests/hostile.rs case "SET_VRING_ADDR moving a started ring".
                        if (q.desc_table(), q.avail_ring(), q.used_ring()) != (desc, avail, used) {
                            return Err(ProtocolError::State("SET_VRING_ADDR moving a started ring"));
                        }
                        return Ok(Reply::Done);
                    }
                }
                v.set_queue_info(desc, avail, used).map_err(|e| ProtocolError::Ring(e.to_string()))?;
                let mem = self.mem.memory();
                let mut s = v.lock();
                let q = s.get_queue_mut();
                if let Ok(idx) = q.used_idx(&*mem, std::sync::atomic::Ordering::Acquire) {
                    q.set_next_used(idx.0);
                }
                Ok(Reply::Done)
            }
            Decoded::SetVringBase(s) => {
                Self::no_files(&msg)?;
                let v = self.vring(s.index)?;
                if s.num > 0xffff {
                    return Err(ProtocolError::RingBase(s.num));
                }
                if v.lock().get_queue().ready() {
                    return Err(ProtocolError::State("SET_VRING_BASE on a started ring"));
                }
                v.lock().get_queue_mut().set_next_avail(s.num as u16);
                Ok(Reply::Done)
            }
            Decoded::GetVringBase(s) => {
                Self::no_files(&msg)?;
                let q = s.index as usize;
                let v = self.vring(s.index)?.clone();
                v.set_queue_ready(false);
                self.sync_kick(q)?;
                self.device.stop_vring(q);
                let base = v.lock().get_queue().next_avail();
                v.set_kick(None);
                v.set_call(None).map_err(ProtocolError::Notifier)?;
                self.report_rings();
                if self.log.enabled() && !self.vrings.iter().any(|v| v.lock().get_queue().ready()) {
                    // The switch-over of a live migration: the last ring stopped while the
                    // frontend logs dirty pages. The image is handed over before the answer,
                    // so the destination can take it as soon as its rings start.
                    self.hand_over();
                }
                Ok(Reply::Body(VringState { index: s.index, num: u32::from(base) }.bytes().to_vec()))
            }
            Decoded::SetVringKick(VringFd { index, nofd })
            | Decoded::SetVringCall(VringFd { index, nofd })
            | Decoded::SetVringErr(VringFd { index, nofd }) => {
                let v = self.vring(index)?.clone();
                let file = match (nofd, msg.files.len()) {
                    (true, 0) => None,
                    (false, 1) => msg.files.pop(),
                    (nofd, got) => return Err(ProtocolError::FdCount { want: usize::from(!nofd), got }),
                };
                if let Some(f) = &file {
                    accept_eventfd(f).map_err(ProtocolError::BadFd)?;
                }
                match h.request {
                    code::SET_VRING_KICK => self.set_kick(index as usize, &v, file)?,
                    code::SET_VRING_CALL => {
                        v.set_call(file).map_err(ProtocolError::Notifier)?;
                        // A new call fd may come after a restart or with an interrupt moved:
                        // notify once on it (see `notify_once`).
                        Self::notify_once(&v);
                    }
                    _ => v.set_err(file),
                }
                Ok(Reply::Done)
            }
            Decoded::SetVringEnable(s) => {
                Self::no_files(&msg)?;
                if self.acked_features & F_PROTOCOL_FEATURES == 0 {
                    return Err(ProtocolError::NotNegotiated("SET_VRING_ENABLE"));
                }
                let v = self.vring(s.index)?.clone();
                let enable = match s.num {
                    0 => false,
                    1 => true,
                    n => return Err(ProtocolError::EnableValue(n)),
                };
                v.set_enabled(enable);
                self.sync_kick(s.index as usize)?;
                Ok(Reply::Done)
            }
            Decoded::GetConfig(c) => {
                Self::no_files(&msg)?;
                self.need_protocol(PF_CONFIG, h.request)?;
                let end = c.offset.checked_add(c.size).filter(|e| *e as usize <= CONFIG_LEN);
                let mut reply = Vec::new();
                match end {
                    Some(_) => {
                        reply.extend_from_slice(&c.bytes());
                        reply.extend_from_slice(&self.device.config(c.offset, c.size));
                    }
                    None => {
                        // The specification's error reply: an empty payload.
                        tracing::warn!(offset = c.offset, size = c.size, "GET_CONFIG outside the config space");
                        reply.extend_from_slice(&ConfigHeader { size: 0, ..c }.bytes());
                    }
                }
                Ok(Reply::Body(reply))
            }
            Decoded::SetConfig(c, payload) => {
                Self::no_files(&msg)?;
                self.need_protocol(PF_CONFIG, h.request)?;
                self.device.set_config(c.offset, payload).map_err(ProtocolError::Config)?;
                Ok(Reply::Done)
            }
            Decoded::GetInflightFd(info) => {
                Self::no_files(&msg)?;
                self.need_protocol(PF_INFLIGHT_SHMFD, h.request)?;
                self.no_ring_started(h.request)?;
                let region = InflightRegion::create(info, self.vrings.len())?;
                let file = region.file().try_clone().map_err(ProtocolError::Host)?;
                let reply = region.info().bytes().to_vec();
                tracing::info!(queues = info.num_queues, queue_size = info.queue_size, "inflight region created");
                self.region = Some(region);
                self.device.set_inflight_tracked();
                Ok(Reply::BodyFd(reply, file))
            }
            Decoded::SetInflightFd(info) => {
                self.need_protocol(PF_INFLIGHT_SHMFD, h.request)?;
                self.no_ring_started(h.request)?;
                if msg.files.len() != 1 {
                    return Err(ProtocolError::FdCount { want: 1, got: msg.files.len() });
                }
                let Some(file) = msg.files.pop() else { return Err(ProtocolError::FdCount { want: 1, got: 0 }) };
                let region = InflightRegion::attach(file, info, self.vrings.len())?;
                self.device.park_hub().carry_failure_clock(region.failure_clock());
                self.region = Some(region);
                self.device.set_inflight_tracked();
                Ok(Reply::Done)
            }
            Decoded::SetLogBase(base) => {
                self.need_protocol(PF_LOG_SHMFD, h.request)?;
                if msg.files.len() != 1 {
                    return Err(ProtocolError::FdCount { want: 1, got: msg.files.len() });
                }
                let Some(file) = msg.files.pop() else { return Err(ProtocolError::FdCount { want: 1, got: 0 }) };
                self.log.set_base(base, file)?;
                // With LOG_SHMFD the frontend waits for this reply (a u64, as libvhost-user).
                Ok(Reply::Body(0u64.to_le_bytes().to_vec()))
            }
        }
    }

    /// Tells the owner how many rings run and how many requests are in hand.
    fn report_rings(&self) {
        self.report_rings_with(0);
    }

    /// [`Self::report_rings`], counting `starting` more rings as running.
    fn report_rings_with(&self, starting: usize) {
        let running = self.vrings.iter().filter(|v| v.lock().get_queue().ready()).count() + starting;
        let in_hand = self.device.in_hand() + usize::from(self.device.gated());
        self.device.ownership().rings(running, in_hand);
    }

    /// Hands the image over at a migration's switch-over (see [`crate::ownership`]): only
    /// once no request is in hand. A stop that gave up on storage leaves requests that may
    /// still change the metadata: the image then stays ours, and the destination cannot take
    /// it (logged; docs/operating.md).
    fn hand_over(&self) {
        let own = self.device.ownership();
        if !own.is_active() {
            return;
        }
        let left = self.device.in_hand();
        if left > 0 || self.device.gated() {
            // (gated: an earlier connection's stop gave up on requests still at the storage)
            tracing::error!(requests = left, earlier_connection = self.device.gated(),
                "migration switch-over with requests still at the storage: the image is NOT handed over (the destination cannot take it)");
            return;
        }
        // Storage failing at the switch-over: the write-back is tried again, within the stop
        // grace (the destination waits ACTIVATE_WAIT for the lock meanwhile).
        let t = std::time::Instant::now();
        let deadline = t + self.device.stop_limits().parked_grace;
        let mut tries = 0u32;
        loop {
            tries += 1;
            match own.inactivate() {
                Ok(()) => {
                    tracing::info!(ms = t.elapsed().as_millis() as u64, tries, "migration switch-over: the image was handed over (inactive)");
                    return;
                }
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, tries, "migration switch-over: handing the image over failed; trying again");
                    std::thread::sleep(HANDOVER_RETRY);
                }
                Err(e) => {
                    tracing::error!(error = %e, tries, "migration switch-over: handing the image over failed; it stays active here (the destination cannot take it)");
                    return;
                }
            }
        }
    }

    /// Takes the image before ring `q` starts: the lock is waited for (the source lets go at
    /// its switch-over), a failure to read the image (storage failing) is tried again, both
    /// within [`ACTIVATE_WAIT`].
    fn take_over(&self, q: usize) -> Result<(), ProtocolError> {
        let own = self.device.ownership();
        tracing::info!(queue = q, "a ring starts on an inactive image: taking it over");
        let t = std::time::Instant::now();
        let deadline = t + ACTIVATE_WAIT;
        let mut tries = 0u32;
        loop {
            tries += 1;
            let wait = deadline.saturating_duration_since(std::time::Instant::now());
            match own.activate(wait) {
                Ok(()) => {
                    tracing::info!(queue = q, ms = t.elapsed().as_millis() as u64, tries, "ring start: the image was taken over (active)");
                    return Ok(());
                }
                Err(e) if std::time::Instant::now() + HANDOVER_RETRY < deadline => {
                    tracing::warn!(queue = q, error = %e, tries, "taking the image over failed; trying again");
                    std::thread::sleep(HANDOVER_RETRY);
                }
                Err(e) => {
                    tracing::error!(queue = q, error = %e, tries, "a ring starts but the image cannot be taken over: the ring stays stopped");
                    return Err(ProtocolError::Activate(e));
                }
            }
        }
    }

    /// Installs a new memory table for the rings and workers.
    fn install(&mut self, mem: Mem) {
        match self.mem.lock() {
            Ok(guard) => guard.replace(mem),
            Err(e) => e.into_inner().replace(mem),
        }
    }

    fn set_kick(&mut self, q: usize, v: &Vring, file: Option<File>) -> Result<(), ProtocolError> {
        let Some(file) = file else {
            return Err(ProtocolError::State("polling mode (no kick fd) is not supported"));
        };
        // Replacing the kick of a running ring: take the old one out of the loop first.
        self.unregister(q);
        if v.lock().get_queue().ready() {
            // The ring runs: only the eventfd changes. Validating and recovering again would
            // list for resubmission requests that are still running (the same head twice,
            // an old write after a newer one). libvhost-user swaps the fd the same way.
            // tests/hostile.rs `a_new_kick_on_a_started_ring_changes_only_the_kick`.
            v.set_kick(Some(file));
            return self.sync_kick(q);
        }
        v.set_kick(Some(file));
        {
            let mem = self.mem.memory();
            let mut s = v.lock();
            // (is_valid checks a ready queue only: mark it so for the check; it is marked
            // ready for good only once inflight tracking is attached, so that no pop can run
            // untracked or ahead of the resubmissions.)
            s.get_queue_mut().set_ready(true);
            let valid = s.get_queue().is_valid(&*mem);
            s.get_queue_mut().set_ready(false);
            if !valid {
                drop(s);
                v.set_kick(None);
                return Err(ProtocolError::Ring("ring size or addresses invalid for the memory table".into()));
            }
        }
        // The ring counts as running from here on (a management hand-over is refused from now),
        // and only then is the image's state looked at: a hand-over that came first is seen.
        self.report_rings_with(1);
        if !self.device.ownership().is_active() {
            // The destination after a switch-over (or a source whose migration failed): the
            // image is taken before any request can be popped.
            if let Err(e) = self.take_over(q) {
                v.set_kick(None);
                self.report_rings();
                return Err(e);
            }
        }
        if let Some(iq) = self.region.as_ref().and_then(|r| r.queue(q)) {
            match v.start_tracking(iq) {
                Ok(rec) if !rec.fresh => {
                    tracing::info!(queue = q, resubmit = rec.resubmit.len(), next_avail = rec.next_avail,
                        "inflight region recovered: resubmitting what the previous daemon had not completed");
                    self.device.count_recovery(q, rec.resubmit.len());
                }
                Ok(_) => {}
                Err(e) => {
                    v.set_queue_ready(false);
                    v.set_kick(None);
                    return Err(e);
                }
            }
        }
        v.lock().get_queue_mut().set_ready(true);
        self.report_rings();
        self.sync_kick(q)
    }

    fn unregister(&mut self, q: usize) {
        if let (Some(fd), Some(t)) = (self.registered.get_mut(q).and_then(Option::take), self.threads.get(q)) {
            t.unwatch(fd);
        }
    }

    /// Watches the kick of ring `q` exactly when it is started and enabled.
    fn sync_kick(&mut self, q: usize) -> Result<(), ProtocolError> {
        self.unregister(q);
        let Some(v) = self.vrings.get(q) else { return Ok(()) };
        let fd = {
            let s = v.lock();
            if !(s.get_queue().ready() && s.is_enabled()) {
                return Ok(());
            }
            match s.kick() {
                Some(f) => f.as_raw_fd(),
                None => return Ok(()),
            }
        };
        if let Some(t) = self.threads.get(q) {
            t.watch(fd).map_err(ProtocolError::Host)?;
            self.registered[q] = Some(fd);
            // Look at the ring once now: after a restart the driver may be waiting for
            // requests already in the ring (resubmitted ones, or chains published while no
            // daemon ran) and never kick again, with EVENT_IDX especially. A spare kick costs
            // one empty pass. It goes to the queue thread's own eventfd, not to the kick
            // eventfd: the frontend may have filled that one and made it blocking.
            t.poke();
            Self::notify_once(v);
        }
        Ok(())
    }

    /// Notifies the driver once, whatever the ring holds. The previous daemon may have died
    /// after publishing used entries and before notifying; with EVENT_IDX the driver then
    /// waits for an interrupt that our event-index arithmetic, which starts from the used
    /// index we find, would never send (a guest hung after a restart during an outage). A
    /// spare interrupt costs the driver one look at its used ring. libvhost-user does the
    /// same on SET_VRING_CALL.
    fn notify_once(v: &Vring) {
        if let Err(e) = v.signal_used_queue() {
            tracing::debug!(error = %e, "notifying the driver at ring start failed");
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        crate::guard::guard_session(None);
        if self.region.is_some() {
            self.device.park_hub().carry_failure_clock(None);
        }
        for q in 0..self.registered.len() {
            self.unregister(q);
        }
        // The rings end with the connection: nothing more is popped, and requests still in
        // hand are fenced, so a queue thread left inside a storage call writes nothing into
        // guest memory when it returns (the frontend resubmits from its inflight region).
        for v in &self.vrings {
            v.set_queue_ready(false);
        }
        self.device.fence();
        // One deadline for all: every thread is told first, then each is waited for.
        let deadline = std::time::Instant::now() + self.device.stop_limits().limit;
        for t in &self.threads {
            t.signal_exit();
        }
        for t in self.threads.drain(..) {
            t.stop(deadline);
        }
        self.report_rings();
        // The rings no longer run: drop our references to the memory before the table.
        self.install(Mem::new());
        self.device.update_memory(AtomicMem::new(Mem::new()));
    }
}

/// Requests whose only answer is a reply body: a refusal cannot be acknowledged.
fn expects_body(request: u32) -> bool {
    matches!(
        request,
        code::GET_FEATURES
            | code::GET_PROTOCOL_FEATURES
            | code::GET_QUEUE_NUM
            | code::GET_VRING_BASE
            | code::GET_CONFIG
            | code::GET_MAX_MEM_SLOTS
            | code::GET_INFLIGHT_FD
    )
}

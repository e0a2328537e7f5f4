//! cloud-hypervisor's vhost-user-blk device, replayed against the daemon with the frontend
//! cloud-hypervisor itself drives backends with: rust-vmm's `vhost` crate (0.17, the release
//! cloud-hypervisor builds against), feature `vhost-user-frontend`.
//!
//! No cloud-hypervisor runs here (it needs KVM): the test plays its role step by step, in
//! the order of its sources (virtio-devices/src/vhost_user/):
//! - device creation (`blk.rs`, `Blk::new`, through `vu_common_ctrl.rs`,
//!   `connect_vhost_user` and `negotiate_features_vhost_user`): SET_OWNER, GET_FEATURES,
//!   GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES (what it asks for and we offer; NEED_REPLY
//!   on every later message once REPLY_ACK is in), GET_QUEUE_NUM, GET_CONFIG (60 bytes,
//!   flag WRITABLE);
//! - activation (`mod.rs`, `VhostUserCommon::activate`, then `setup_vhost_user`):
//!   SET_FEATURES, SET_MEM_TABLE, SET_VRING_NUM for every queue, GET_INFLIGHT_FD (first
//!   activation only) and SET_INFLIGHT_FD, then per queue SET_VRING_ADDR, SET_VRING_BASE
//!   (the ring's available index as found in guest memory), SET_VRING_CALL, SET_VRING_KICK,
//!   and SET_VRING_ENABLE for every queue;
//! - the guest's writes to the writeback field (`Blk::write_config`): SET_CONFIG;
//! - VM pause and resume (`pause_vhost_user`, `resume_vhost_user`): SET_VRING_ENABLE 0, 1;
//! - device reset (`reset_vhost_user`): SET_VRING_ENABLE 0 and GET_VRING_BASE per queue; the
//!   next activation asks for a new inflight region;
//! - reconnection after the backend hung up (`VhostUserEpollHandler::reconnect`, then
//!   `reinitialize_vhost_user`): a new connection, SET_OWNER, GET_FEATURES,
//!   SET_PROTOCOL_FEATURES with what was acked before (no GET_PROTOCOL_FEATURES, no
//!   GET_CONFIG), then the activation sequence again with the inflight region kept from the
//!   first activation (SET_INFLIGHT_FD only) and the same kick and call eventfds; the vring
//!   bases are again the available indexes found in memory, not the used ones, so the
//!   backend has to find what it had not completed in the inflight region.
//!
//! The guest side (a Linux virtio-blk driver) is played by hand: split rings of 128
//! descriptors in a memfd-backed guest RAM of two regions, requests built as chains (direct
//! and indirect), EVENT_IDX as negotiated.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use common::faultfs::FaultMount;
use common::frontend::Ram;
use common::{sparse_file, stop_clean, Daemon, TestDir};

const MIB: u64 = 1 << 20;
/// cloud-hypervisor's default vhost-user-blk queue size.
const QUEUE_SIZE: u16 = 128;
/// Guest RAM: a low region (rings, request headers) and one above 4 GiB (data buffers), each
/// its own memfd, as cloud-hypervisor hands its RAM regions over.
const LOW_GPA: u64 = 0;
const LOW_LEN: u64 = 16 * MIB;
const HIGH_GPA: u64 = 1 << 32;
const HIGH_LEN: u64 = 16 * MIB;
/// Ring `q` lives at RINGS + 0x4000 q: descriptors, then the available ring at +0x800, the
/// used ring at +0x1000.
const RINGS: u64 = 0x10000;
/// Request headers and status bytes: 32 bytes per descriptor slot of every queue.
const HEADERS: u64 = 0x10_0000;
/// Indirect descriptor tables: 256 bytes per descriptor slot of every queue.
const INDIRECT: u64 = 0x20_0000;
/// Every wait of the test is bounded by this.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The length of cloud-hypervisor's `VirtioBlockConfig`.
const CONFIG_LEN: usize = 60;

// Virtio feature bits (virtio 1.2: 6 "reserved feature bits", 5.2.3 block device features).
const BLK_F_SIZE_MAX: u32 = 1;
const BLK_F_SEG_MAX: u32 = 2;
const BLK_F_GEOMETRY: u32 = 4;
const BLK_F_RO: u32 = 5;
const BLK_F_BLK_SIZE: u32 = 6;
const BLK_F_FLUSH: u32 = 9;
const BLK_F_TOPOLOGY: u32 = 10;
const BLK_F_CONFIG_WCE: u32 = 11;
const BLK_F_MQ: u32 = 12;
const BLK_F_DISCARD: u32 = 13;
const BLK_F_WRITE_ZEROES: u32 = 14;
const F_INDIRECT_DESC: u32 = 28;
const F_EVENT_IDX: u32 = 29;
const F_VERSION_1: u32 = 32;
const F_IN_ORDER: u32 = 35;
const F_ORDER_PLATFORM: u32 = 36;
const F_NOTIFICATION_DATA: u32 = 38;

// virtio-blk request types and descriptor flags.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const D_NEXT: u16 = 1;
const D_WRITE: u16 = 2;
const D_INDIRECT: u16 = 4;

fn bits(list: &[u32]) -> u64 {
    list.iter().fold(0, |acc, b| acc | 1u64 << b)
}

/// The virtio features cloud-hypervisor's vhost-user-blk device offers to negotiate
/// (`Blk::new`: the block bits, `DEFAULT_VIRTIO_FEATURES`, MQ with more than one queue).
fn chv_features(num_queues: usize) -> u64 {
    let mut f = bits(&[
        BLK_F_SIZE_MAX,
        BLK_F_SEG_MAX,
        BLK_F_GEOMETRY,
        BLK_F_RO,
        BLK_F_BLK_SIZE,
        BLK_F_FLUSH,
        BLK_F_TOPOLOGY,
        BLK_F_CONFIG_WCE,
        BLK_F_DISCARD,
        BLK_F_WRITE_ZEROES,
        F_INDIRECT_DESC,
        F_EVENT_IDX,
        F_VERSION_1,
        F_IN_ORDER,
        F_ORDER_PLATFORM,
        F_NOTIFICATION_DATA,
    ]) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | VhostUserVirtioFeatures::LOG_ALL.bits();
    if num_queues > 1 {
        f |= 1 << BLK_F_MQ;
    }
    f
}

/// The protocol features it asks for.
fn chv_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::DEVICE_STATE
}

/// The guest's RAM, two memfd-backed regions mapped in this process.
struct Guest {
    low: Ram,
    high: Ram,
}

impl Guest {
    fn new() -> Guest {
        Guest { low: Ram::new(LOW_LEN), high: Ram::new(HIGH_LEN) }
    }

    fn region(&self, gpa: u64) -> (&Ram, u64) {
        if gpa >= HIGH_GPA {
            assert!(gpa - HIGH_GPA < HIGH_LEN, "guest address {gpa:#x} outside RAM");
            (&self.high, gpa - HIGH_GPA)
        } else {
            assert!(gpa < LOW_LEN, "guest address {gpa:#x} outside RAM");
            (&self.low, gpa)
        }
    }

    fn write(&self, gpa: u64, data: &[u8]) {
        let (r, off) = self.region(gpa);
        r.write(off, data);
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let (r, off) = self.region(gpa);
        r.bytes()[off as usize..off as usize + len].to_vec()
    }

    fn u16_at(&self, gpa: u64) -> u16 {
        let (r, off) = self.region(gpa);
        r.u16_at(off)
    }

    fn u32_at(&self, gpa: u64) -> u32 {
        let b = self.read(gpa, 4);
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// Where this process sees guest address `gpa` (vring addresses are given in this space).
    fn host(&self, gpa: u64) -> u64 {
        let (r, off) = self.region(gpa);
        r.bytes().as_ptr() as u64 + off
    }

    /// The SET_MEM_TABLE regions.
    fn regions(&self) -> Vec<VhostUserMemoryRegionInfo> {
        [(LOW_GPA, LOW_LEN, &self.low), (HIGH_GPA, HIGH_LEN, &self.high)]
            .into_iter()
            .map(|(gpa, len, r)| VhostUserMemoryRegionInfo {
                guest_phys_addr: gpa,
                memory_size: len,
                userspace_addr: r.bytes().as_ptr() as u64,
                mmap_offset: 0,
                mmap_handle: r.file.as_raw_fd(),
            })
            .collect()
    }
}

/// One split virtqueue as the guest driver and the VMM hold it.
struct Vq {
    index: u16,
    /// The VMM's ioeventfd for the queue (kept across reconnections).
    kick: EventFd,
    /// The interrupt eventfd (kept across reconnections).
    call: EventFd,
    next_desc: u16,
    avail_idx: u16,
}

/// A request put on a ring.
struct Req {
    head: u16,
    status: u64,
}

impl Vq {
    fn new(index: u16) -> Vq {
        Vq {
            index,
            kick: EventFd::new(libc::EFD_NONBLOCK).expect("kick eventfd"),
            call: EventFd::new(libc::EFD_NONBLOCK).expect("call eventfd"),
            next_desc: 0,
            avail_idx: 0,
        }
    }

    fn desc_gpa(&self) -> u64 {
        RINGS + 0x4000 * u64::from(self.index)
    }
    fn avail_gpa(&self) -> u64 {
        self.desc_gpa() + 0x800
    }
    fn used_gpa(&self) -> u64 {
        self.desc_gpa() + 0x1000
    }

    /// A driver (re)initialising the queue: empty rings, indexes at 0.
    fn init(&mut self, g: &Guest) {
        g.write(self.desc_gpa(), &[0u8; 0x4000]);
        self.next_desc = 0;
        self.avail_idx = 0;
    }

    /// SET_VRING_ADDR's data: host addresses of the three parts, no logging.
    fn config_data(&self, g: &Guest) -> VringConfigData {
        VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: g.host(self.desc_gpa()),
            used_ring_addr: g.host(self.used_gpa()),
            avail_ring_addr: g.host(self.avail_gpa()),
            log_addr: None,
        }
    }

    fn used_idx(&self, g: &Guest) -> u16 {
        g.u16_at(self.used_gpa() + 2)
    }

    /// The available index as found in guest memory (what cloud-hypervisor sends as base).
    fn avail_idx_in_memory(&self, g: &Guest) -> u16 {
        g.u16_at(self.avail_gpa() + 2)
    }

    /// Used element `i`: (head, length).
    fn used(&self, g: &Guest, i: u16) -> (u32, u32) {
        let at = self.used_gpa() + 4 + 8 * u64::from(i % QUEUE_SIZE);
        (g.u32_at(at), g.u32_at(at + 4))
    }

    fn write_desc(g: &Guest, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        g.write(table + 16 * u64::from(i), &b);
    }

    /// Builds a virtio-blk request chain: header, `segments` (device-writable if
    /// `device_writes`), status; through an indirect table if `indirect`. Returns it unpublished.
    fn request(&mut self, g: &Guest, kind: u32, sector: u64, segments: &[(u64, u32)], device_writes: bool, indirect: bool) -> Req {
        let n = segments.len() as u16 + 2;
        let head = self.next_desc;
        self.next_desc += if indirect { 1 } else { n };
        assert!(self.next_desc <= QUEUE_SIZE, "the test ran out of descriptors");
        let slot = u64::from(self.index) * u64::from(QUEUE_SIZE) + u64::from(head);
        let hdr = HEADERS + 32 * slot;
        let status = hdr + 16;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        g.write(hdr, &h);
        g.write(status, &[0xff]);
        let (table, first) = if indirect { (INDIRECT + 256 * slot, 0) } else { (self.desc_gpa(), head) };
        let mut parts = vec![(hdr, 16u32, 0u16)];
        parts.extend(segments.iter().map(|&(a, l)| (a, l, if device_writes { D_WRITE } else { 0 })));
        parts.push((status, 1, D_WRITE));
        for (k, &(addr, len, flags)) in parts.iter().enumerate() {
            let i = first + k as u16;
            let last = k + 1 == parts.len();
            Self::write_desc(g, table, i, addr, len, if last { flags } else { flags | D_NEXT }, if last { 0 } else { i + 1 });
        }
        if indirect {
            Self::write_desc(g, self.desc_gpa(), head, table, 16 * u32::from(n), D_INDIRECT, 0);
        }
        Req { head, status }
    }

    /// Makes `req` available; kicks if `kick`. The driver asks to be notified of the next
    /// completion (EVENT_IDX's used_event: the used index it has seen).
    fn publish(&mut self, g: &Guest, req: &Req, kick: bool) {
        let used_event = self.avail_gpa() + 4 + 2 * u64::from(QUEUE_SIZE);
        g.write(used_event, &self.used_idx(g).to_le_bytes());
        g.write(self.avail_gpa() + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE), &req.head.to_le_bytes());
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        g.write(self.avail_gpa() + 2, &self.avail_idx.to_le_bytes());
        fence(Ordering::SeqCst);
        if kick {
            self.kick.write(1).expect("kick");
        }
    }

    /// Waits until the used index is `target`.
    fn wait_used(&self, g: &Guest, target: u16, what: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while self.used_idx(g) != target {
            assert!(Instant::now() < deadline, "queue {}: {what}: used index {} after {TIMEOUT:?}, want {target}", self.index, self.used_idx(g));
            std::thread::sleep(Duration::from_millis(1));
        }
        fence(Ordering::SeqCst);
    }

    /// Whether the interrupt eventfd fires within `limit` (drained if so).
    fn interrupted_within(&self, limit: Duration) -> bool {
        let mut p = libc::pollfd { fd: self.call.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, limit.as_millis() as i32) };
        r == 1 && self.call.read().is_ok()
    }

    fn drain_interrupt(&self) {
        let _ = self.call.read();
    }
}

/// Submits `req`, waits for its completion and checks it: the used element is the next one,
/// for `req`'s head, of `used_len`; status OK; an interrupt came.
fn complete(vq: &mut Vq, g: &Guest, req: &Req, used_len: u32, what: &str) {
    let before = vq.used_idx(g);
    vq.drain_interrupt();
    vq.publish(g, req, true);
    vq.wait_used(g, before.wrapping_add(1), what);
    assert_eq!(vq.used(g, before), (u32::from(req.head), used_len), "{what}: used element");
    assert_eq!(g.read(req.status, 1)[0], 0, "{what}: status (VIRTIO_BLK_S_OK)");
    assert!(vq.interrupted_within(TIMEOUT), "{what}: no interrupt (EVENT_IDX used_event asked for one)");
}

/// cloud-hypervisor's side of one connection (`VhostUserHandle` plus what `Blk` and
/// `VhostUserCommon` keep).
struct Chv {
    vu: Frontend,
    backend_features: u64,
    /// What activation sends in SET_FEATURES (the guest's acks, PROTOCOL_FEATURES kept).
    acked_features: u64,
    acked_protocol: VhostUserProtocolFeatures,
    num_queues: usize,
    /// The inflight region from GET_INFLIGHT_FD, kept for reconnections.
    inflight: Option<(VhostUserInflight, File)>,
    /// The config space as GET_CONFIG returned it.
    config: Vec<u8>,
}

/// `connect_vhost_user` (client mode): connect, SET_OWNER, GET_FEATURES. The socket gets
/// timeouts so a daemon that does not answer fails the test instead of hanging it.
fn open(sock: &Path, num_queues: usize) -> (Frontend, u64) {
    let deadline = Instant::now() + TIMEOUT;
    let stream = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "connect {}: {e}", sock.display());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    stream.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    stream.set_write_timeout(Some(TIMEOUT)).expect("write timeout");
    let vu = Frontend::from_stream(stream, num_queues as u64);
    vu.set_owner().expect("SET_OWNER");
    let features = vu.get_features().expect("GET_FEATURES");
    (vu, features)
}

/// `read u16 at offset` of a config space.
fn le16(c: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([c[at], c[at + 1]])
}
fn le32(c: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([c[at], c[at + 1], c[at + 2], c[at + 3]])
}
fn le64(c: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&c[at..at + 8]);
    u64::from_le_bytes(b)
}

impl Chv {
    /// `Blk::new`: connection, negotiation, queue count, config space. The guest driver then
    /// acks every feature the device offers it.
    fn create(sock: &Path, num_queues: usize) -> Chv {
        let (mut vu, backend_features) = open(sock, num_queues);
        let acked_features = chv_features(num_queues) & backend_features;
        assert_ne!(acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0, "no PROTOCOL_FEATURES offered");
        let backend_protocol = vu.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        let acked_protocol = chv_protocol_features() & backend_protocol;
        vu.set_protocol_features(acked_protocol).expect("SET_PROTOCOL_FEATURES");
        if acked_protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            vu.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let backend_queues = if acked_protocol.contains(VhostUserProtocolFeatures::MQ) {
            vu.get_queue_num().expect("GET_QUEUE_NUM") as usize
        } else {
            1
        };
        assert!(num_queues <= backend_queues, "the backend has {backend_queues} queues, {num_queues} wanted");
        let (reply, config) =
            vu.get_config(0, CONFIG_LEN as u32, VhostUserConfigFlags::WRITABLE, &[0u8; CONFIG_LEN]).expect("GET_CONFIG");
        let (offset, size) = (reply.offset, reply.size);
        assert_eq!((offset, size), (0, CONFIG_LEN as u32), "GET_CONFIG reply header");
        Chv { vu, backend_features, acked_features, acked_protocol, num_queues, inflight: None, config }
    }

    /// `setup_vhost_user` without saved bases: every ring starts at its available index.
    fn activate(&mut self, g: &Guest, queues: &[Vq]) {
        assert_eq!(queues.len(), self.num_queues);
        // The guest never acks LOG_ALL: cloud-hypervisor sets it only while it logs dirty
        // pages for a migration (`start_dirty_log`).
        self.vu.set_features(self.acked_features & self.backend_features & !VhostUserVirtioFeatures::LOG_ALL.bits()).expect("SET_FEATURES");
        self.vu.set_mem_table(&g.regions()).expect("SET_MEM_TABLE");
        for q in queues {
            self.vu.set_vring_num(usize::from(q.index), QUEUE_SIZE).expect("SET_VRING_NUM");
        }
        if self.acked_protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            if self.inflight.is_none() {
                let want = VhostUserInflight { mmap_size: 0, mmap_offset: 0, num_queues: queues.len() as u16, queue_size: QUEUE_SIZE };
                let (info, file) = self.vu.get_inflight_fd(&want).expect("GET_INFLIGHT_FD");
                let (size, nq, qs) = (info.mmap_size, info.num_queues, info.queue_size);
                assert!(size > 0, "GET_INFLIGHT_FD: empty region");
                assert_eq!((nq, qs), (queues.len() as u16, QUEUE_SIZE), "GET_INFLIGHT_FD geometry");
                assert!(file.metadata().expect("inflight fd").len() >= size, "the inflight file is smaller than announced");
                self.inflight = Some((info, file));
            }
            let (info, file) = self.inflight.as_ref().expect("inflight region");
            self.vu.set_inflight_fd(info, file.as_raw_fd()).expect("SET_INFLIGHT_FD");
        }
        for q in queues {
            let i = usize::from(q.index);
            self.vu.set_vring_addr(i, &q.config_data(g)).expect("SET_VRING_ADDR");
            self.vu.set_vring_base(i, q.avail_idx_in_memory(g)).expect("SET_VRING_BASE");
            self.vu.set_vring_call(i, &q.call).expect("SET_VRING_CALL");
            self.vu.set_vring_kick(i, &q.kick).expect("SET_VRING_KICK");
        }
        for q in queues {
            self.vu.set_vring_enable(usize::from(q.index), true).expect("SET_VRING_ENABLE 1");
        }
    }

    /// `reset_vhost_user`: every ring disabled and stopped; returns the bases.
    fn reset(&mut self, queues: &[Vq]) -> Vec<u32> {
        queues
            .iter()
            .map(|q| {
                self.vu.set_vring_enable(usize::from(q.index), false).expect("SET_VRING_ENABLE 0");
                self.vu.get_vring_base(usize::from(q.index)).expect("GET_VRING_BASE")
            })
            .collect()
    }

    /// `pause_vhost_user` / `resume_vhost_user` (VM pause and resume): rings disabled, then
    /// enabled again, nothing else.
    fn set_enabled(&mut self, queues: &[Vq], enable: bool) {
        for q in queues {
            self.vu.set_vring_enable(usize::from(q.index), enable).expect("SET_VRING_ENABLE (pause/resume)");
        }
    }

    /// A device reset forgets the inflight region (the next activation creates one).
    fn forget_inflight(&mut self) {
        self.inflight = None;
    }

    /// The backend hung up: `reconnect` / `reinitialize_vhost_user` on a new connection, with
    /// what was negotiated and the inflight region kept.
    fn reconnect(self, sock: &Path, g: &Guest, queues: &[Vq]) -> Chv {
        let Chv { acked_features, acked_protocol, num_queues, inflight, config, .. } = self;
        let (mut vu, backend_features) = open(sock, num_queues);
        if acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            vu.set_protocol_features(acked_protocol).expect("SET_PROTOCOL_FEATURES (reconnect)");
            if acked_protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                vu.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let mut chv = Chv { vu, backend_features, acked_features, acked_protocol, num_queues, inflight, config };
        chv.activate(g, queues);
        chv
    }

    /// The guest writes the writeback field (`Blk::write_config`).
    fn set_writeback(&mut self, on: bool) {
        self.vu.set_config(32, VhostUserConfigFlags::WRITABLE, &[u8::from(on)]).expect("SET_CONFIG writeback");
    }

    fn get_config(&mut self) -> Vec<u8> {
        self.vu.get_config(0, CONFIG_LEN as u32, VhostUserConfigFlags::WRITABLE, &[0u8; CONFIG_LEN]).expect("GET_CONFIG").1
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// Boot, IO on two queues, writeback toggle, pause and resume, guest reset and reboot: the
/// device's whole life in a VM that does not lose its backend.
#[test]
fn cloud_hypervisor_two_queues_negotiate_serve_and_survive_a_device_reset() {
    let dir = TestDir::new("chv-mq");
    let size = 64 * MIB;
    let image = dir.path("disk.raw");
    sparse_file(&image, size);
    let sock = dir.path("sock");
    let img = image.to_str().expect("utf-8 path");
    let d = Daemon::start_logging(&sock, &["--image", img, "--format", "raw", "--num-queues", "2", "--serial", "chv-blk-0"], Some(&dir.path("daemon.log")));
    let t0 = Instant::now();

    // Device creation.
    let mut chv = Chv::create(&sock, 2);
    let backend = chv.backend_features;
    for b in [F_VERSION_1, F_EVENT_IDX, F_INDIRECT_DESC, BLK_F_FLUSH, BLK_F_MQ, BLK_F_BLK_SIZE, BLK_F_CONFIG_WCE] {
        assert_ne!(backend & (1 << b), 0, "feature bit {b} not offered");
    }
    let want = bits(&[
        BLK_F_SIZE_MAX, BLK_F_SEG_MAX, BLK_F_BLK_SIZE, BLK_F_FLUSH, BLK_F_TOPOLOGY, BLK_F_CONFIG_WCE, BLK_F_MQ,
        BLK_F_DISCARD, BLK_F_WRITE_ZEROES, F_INDIRECT_DESC, F_EVENT_IDX, F_VERSION_1,
    ]) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | VhostUserVirtioFeatures::LOG_ALL.bits();
    assert_eq!(chv.acked_features, want, "negotiated virtio features");
    // What cloud-hypervisor asks for and we do not offer: DEVICE_STATE (state transfer for
    // snapshots); nor IN_ORDER, NOTIFICATION_DATA, ORDER_PLATFORM, GEOMETRY, RO (a writable
    // image) among the virtio bits. LOG_ALL and LOG_SHMFD (dirty logging for live migration)
    // are offered since issue 21.
    assert_eq!(
        chv.acked_protocol,
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD,
        "negotiated protocol features"
    );
    let c = chv.config.clone();
    assert_eq!(le64(&c, 0), size / 512, "capacity (sectors)");
    assert_eq!(le32(&c, 20), 512, "blk_size");
    assert_eq!(le16(&c, 34), 2, "num_queues");
    assert!(le32(&c, 12) >= 1 && le32(&c, 8) >= 4096, "seg_max {} / size_max {}", le32(&c, 12), le32(&c, 8));
    let writeback = c[32];

    // Activation on fresh rings.
    let g = Guest::new();
    let mut queues = vec![Vq::new(0), Vq::new(1)];
    for q in &mut queues {
        q.init(&g);
    }
    chv.activate(&g, &queues);

    // A write on queue 0 (two 4 KiB segments), read back on queue 1 through an indirect table.
    let data = pattern(7, 8192);
    g.write(HIGH_GPA, &data);
    let w = queues[0].request(&g, T_OUT, 2048, &[(HIGH_GPA, 4096), (HIGH_GPA + 4096, 4096)], false, false);
    complete(&mut queues[0], &g, &w, 1, "write");
    let r = queues[1].request(&g, T_IN, 2048, &[(HIGH_GPA + 0x10000, 8192)], true, true);
    complete(&mut queues[1], &g, &r, 8193, "indirect read");
    assert!(g.read(HIGH_GPA + 0x10000, 8192) == data, "read back differs from what was written");
    let id = queues[0].request(&g, T_GET_ID, 0, &[(HIGH_GPA + 0x20000, 20)], true, false);
    complete(&mut queues[0], &g, &id, 21, "GET_ID");
    let mut serial = b"chv-blk-0".to_vec();
    serial.resize(20, 0);
    assert_eq!(g.read(HIGH_GPA + 0x20000, 20), serial, "GET_ID");
    let fl = queues[1].request(&g, T_FLUSH, 0, &[], false, false);
    complete(&mut queues[1], &g, &fl, 1, "FLUSH");

    // The guest flips the write cache mode and back.
    chv.set_writeback(writeback == 0);
    assert_eq!(chv.get_config()[32], u8::from(writeback == 0), "writeback after SET_CONFIG");
    chv.set_writeback(writeback != 0);
    assert_eq!(chv.get_config()[32], writeback, "writeback restored");

    // VM pause and resume; the rings go on where they were.
    chv.set_enabled(&queues, false);
    chv.set_enabled(&queues, true);
    let r = queues[0].request(&g, T_IN, 2048, &[(HIGH_GPA + 0x30000, 4096)], true, true);
    complete(&mut queues[0], &g, &r, 4097, "read after pause and resume");
    assert!(g.read(HIGH_GPA + 0x30000, 4096) == data[..4096], "data after pause and resume");

    // Device reset (guest reboot): rings stopped, their bases are what was taken.
    let bases = chv.reset(&queues);
    assert_eq!(bases, vec![3, 2], "GET_VRING_BASE: requests taken on each queue");
    chv.forget_inflight();
    // The rebooted guest sets the rings up anew; activation asks for a new inflight region.
    for q in &mut queues {
        q.init(&g);
    }
    chv.activate(&g, &queues);
    let r = queues[0].request(&g, T_IN, 2048, &[(HIGH_GPA + 0x30000, 8192)], true, false);
    complete(&mut queues[0], &g, &r, 8193, "read after the reset");
    assert!(g.read(HIGH_GPA + 0x30000, 8192) == data, "data after the reset");
    let w = queues[1].request(&g, T_OUT, 4096, &[(HIGH_GPA, 8192)], false, true);
    complete(&mut queues[1], &g, &w, 1, "indirect write after the reset");
    println!("two-queue replay: {:?}", t0.elapsed());

    drop(chv);
    stop_clean(d);
    let on_disk = std::fs::read(&image).expect("read image");
    assert!(on_disk[2048 * 512..2048 * 512 + 8192] == data[..], "image at sector 2048");
    assert!(on_disk[4096 * 512..4096 * 512 + 8192] == data[..], "image at sector 4096");
}

/// cloud-hypervisor's default (one queue, no VIRTIO_BLK_F_MQ) against a daemon serving two:
/// only queue 0 is set up, the other never starts.
#[test]
fn cloud_hypervisor_default_single_queue_on_a_two_queue_daemon() {
    let dir = TestDir::new("chv-1q");
    let image = dir.path("disk.raw");
    sparse_file(&image, 16 * MIB);
    let sock = dir.path("sock");
    let img = image.to_str().expect("utf-8 path");
    let d = Daemon::start_logging(&sock, &["--image", img, "--format", "raw", "--num-queues", "2"], Some(&dir.path("daemon.log")));
    let mut chv = Chv::create(&sock, 1);
    assert_eq!(chv.acked_features & (1 << BLK_F_MQ), 0, "MQ negotiated with one queue");
    assert_eq!(le16(&chv.config, 34), 2, "the backend's num_queues (cloud-hypervisor shows the guest its own)");
    let g = Guest::new();
    let mut queues = vec![Vq::new(0)];
    queues[0].init(&g);
    chv.activate(&g, &queues);
    let data = pattern(3, 4096);
    g.write(HIGH_GPA, &data);
    let w = queues[0].request(&g, T_OUT, 8, &[(HIGH_GPA, 4096)], false, true);
    complete(&mut queues[0], &g, &w, 1, "write");
    let r = queues[0].request(&g, T_IN, 8, &[(HIGH_GPA + 0x1000, 4096)], true, true);
    complete(&mut queues[0], &g, &r, 4097, "read");
    assert!(g.read(HIGH_GPA + 0x1000, 4096) == data, "read back");
    drop(chv);
    stop_clean(d);
}

/// The daemon dies with writes taken and not completed on both queues, and the guest submits
/// one more while no daemon runs. cloud-hypervisor reconnects the way it does after a hang-up:
/// the saved inflight region, the same eventfds, and as vring bases the available indexes
/// (which count the requests the dead daemon never completed and the one it never saw).
/// Every request completes exactly once, and the data is on disk.
#[test]
fn cloud_hypervisor_reconnect_with_the_inflight_region_completes_each_request_once() {
    let dir = TestDir::new("chv-reconnect");
    let backing = dir.path("backing.raw");
    sparse_file(&backing, 64 * MIB);
    let mount = FaultMount::new(&backing, &dir.path("mnt"));
    let disk = mount.disk();
    let sock = dir.path("sock");
    let log = dir.path("daemon.log");
    let metrics = format!("unix:{}", dir.path("metrics.sock").display());
    let args = ["--image", disk.to_str().expect("utf-8 path"), "--format", "raw", "--num-queues", "2",
        "--werror", "retry", "--retry-interval", "60000", "--metrics", &metrics];
    let mut d = Daemon::start_logging(&sock, &args, Some(&log));

    let mut chv = Chv::create(&sock, 2);
    let g = Guest::new();
    let mut queues = vec![Vq::new(0), Vq::new(1)];
    for q in &mut queues {
        q.init(&g);
    }
    chv.activate(&g, &queues);
    assert!(chv.inflight.is_some(), "no inflight region negotiated");

    // Buffers: write k's data at HIGH_GPA + 0x10000 k, to sector 1024 k.
    let buf = |k: u64| HIGH_GPA + 0x10000 * k;
    let sector = |k: u64| 1024 * k;
    for k in 0..4u64 {
        g.write(buf(k), &pattern(0x10 + k as u8, 8192));
    }
    let w0 = queues[0].request(&g, T_OUT, sector(0), &[(buf(0), 8192)], false, false);
    complete(&mut queues[0], &g, &w0, 1, "write 0");

    // Storage fails writes: w1 (queue 0) and w2 (queue 1) are parked for a minute; a read
    // behind w1 on queue 0 completes.
    mount.faults.fail_writes(libc::EIO);
    let w1 = queues[0].request(&g, T_OUT, sector(1), &[(buf(1), 8192)], false, true);
    queues[0].publish(&g, &w1, true);
    let w2 = queues[1].request(&g, T_OUT, sector(2), &[(buf(2), 4096), (buf(2) + 4096, 4096)], false, false);
    queues[1].publish(&g, &w2, true);
    let deadline = Instant::now() + TIMEOUT;
    while mount.faults.writes_failed.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "the writes did not reach the storage");
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = queues[0].request(&g, T_IN, sector(0), &[(buf(8), 8192)], true, false);
    complete(&mut queues[0], &g, &r, 8193, "read behind a parked write");
    assert!(g.read(buf(8), 8192) == pattern(0x10, 8192), "read of write 0");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!((queues[0].used_idx(&g), queues[1].used_idx(&g)), (2, 0), "the failing writes are parked, not completed");

    // The daemon dies; cloud-hypervisor sees the hang-up. The storage recovers, and the guest
    // submits w3 on queue 1: its kick waits in the ioeventfd.
    let _ = d.child.kill();
    let _ = d.child.wait();
    drop(d);
    mount.faults.clear();
    let w3 = queues[1].request(&g, T_OUT, sector(3), &[(buf(3), 8192)], false, true);
    queues[1].publish(&g, &w3, true);
    for q in &queues {
        q.drain_interrupt();
    }

    let t = Instant::now();
    let d = Daemon::start_logging(&sock, &args, Some(&log));
    let chv = chv.reconnect(&sock, &g, &queues);
    queues[0].wait_used(&g, 3, "w1 resubmitted");
    queues[1].wait_used(&g, 2, "w2 resubmitted, w3 taken");
    let took = t.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!((queues[0].used_idx(&g), queues[1].used_idx(&g)), (3, 2), "a request completed twice");
    let heads0: Vec<u32> = (0..3).map(|i| queues[0].used(&g, i).0).collect();
    let mut heads1: Vec<u32> = (0..2).map(|i| queues[1].used(&g, i).0).collect();
    heads1.sort_unstable();
    assert_eq!(heads0, vec![u32::from(w0.head), u32::from(r.head), u32::from(w1.head)], "queue 0 completions");
    assert_eq!(heads1, vec![u32::from(w2.head), u32::from(w3.head)], "queue 1 completions");
    for (req, what) in [(&w1, "w1"), (&w2, "w2"), (&w3, "w3")] {
        assert_eq!(g.read(req.status, 1)[0], 0, "{what} status");
    }
    for q in &queues {
        assert!(q.interrupted_within(TIMEOUT), "queue {}: no interrupt after the reconnection", q.index);
    }
    println!("reconnection to all requests completed: {took:?}");
    // Both rings found the previous daemon's requests in the region: one each (w3 was never
    // taken, so it is not among them).
    let m = common::metrics::scrape(&metrics);
    assert_eq!(m.one("thinblk_inflight_recoveries_total", &[]), 2.0, "rings recovered from the inflight region");
    assert_eq!(m.one("thinblk_resubmitted_requests_total", &[]), 2.0, "requests resubmitted");

    // Through the rings again, then on the backing file.
    for k in 1..4u64 {
        let r = queues[0].request(&g, T_IN, sector(k), &[(buf(8 + k), 8192)], true, false);
        complete(&mut queues[0], &g, &r, 8193, "read back");
        assert!(g.read(buf(8 + k), 8192) == pattern(0x10 + k as u8, 8192), "write {k} read back");
    }
    drop(chv);
    stop_clean(d);
    let on_disk = std::fs::read(&backing).expect("read backing file");
    for k in 0..4u64 {
        let at = (sector(k) * 512) as usize;
        assert!(on_disk[at..at + 8192] == pattern(0x10 + k as u8, 8192)[..], "write {k} on disk");
    }
}

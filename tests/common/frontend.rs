//! A raw vhost-user frontend that plays the hostile VMM: it speaks the protocol byte by byte,
//! owns the guest RAM (a memfd it maps too) and builds virtqueue chains by hand.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Request codes used by the tests.
pub mod code {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const SET_INFLIGHT_FD: u32 = 32;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
}

/// The version bits of a frontend message.
pub const V1: u32 = 1;
/// NEED_REPLY.
pub const NEED_REPLY: u32 = 8;
/// Size of the guest RAM.
pub const RAM: u64 = 1 << 20;
/// Where the frontend "sees" the RAM (ring addresses are given in this space).
pub const USER_BASE: u64 = 0x7f00_0000_0000;
/// Ring layout in guest physical addresses.
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x2000;
pub const USED: u64 = 0x3000;
/// Indirect tables live here.
pub const INDIRECT: u64 = 0x4000;
/// Data buffers start here.
pub const DATA: u64 = 0x10000;
/// Queue size the tests use.
pub const QSIZE: u16 = 16;
/// The fill pattern of untouched guest memory.
pub const PATTERN: u8 = 0xa5;

/// An anonymous memory file (guest RAM, or a throwaway region).
pub fn memfd(len: u64) -> File {
    // SAFETY: a valid C string; the new fd is owned by the File below.
    let fd = unsafe { libc::memfd_create(c"hostile-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fd was just created.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("size memfd");
    f
}

/// A new eventfd holding `initial`.
pub fn eventfd(initial: u64) -> File {
    // SAFETY: creates a new fd, owned by the File below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd");
    // SAFETY: fd was just created.
    let mut f = unsafe { File::from_raw_fd(fd) };
    if initial > 0 {
        f.write_all(&initial.to_ne_bytes()).expect("set eventfd");
    }
    f
}

/// Guest RAM shared with the daemon.
pub struct Ram {
    pub file: File,
    ptr: *mut u8,
    len: usize,
}

impl Ram {
    /// A RAM of `len` bytes, filled with [`PATTERN`].
    pub fn new(len: u64) -> Ram {
        let file = memfd(len);
        // SAFETY: maps the whole memfd shared; unmapped on drop.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len as usize, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, file.as_raw_fd(), 0)
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap ram");
        let r = Ram { file, ptr: ptr.cast(), len: len as usize };
        // SAFETY: ptr maps len bytes, nobody else has them yet.
        unsafe { std::ptr::write_bytes(r.ptr, PATTERN, r.len) };
        r
    }

    /// The RAM as bytes (the daemon may write concurrently: tests read after completions).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: ptr maps len bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Writes `data` at guest address `gpa` (through the raw pointer: the daemon shares
    /// the memory, so no `&mut` to it is ever made).
    pub fn write(&self, gpa: u64, data: &[u8]) {
        let end = (gpa as usize).checked_add(data.len()).filter(|e| *e <= self.len);
        assert!(end.is_some(), "write past the RAM at {gpa:#x}");
        // SAFETY: in bounds (checked); the source is a distinct local buffer.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(gpa as usize), data.len()) };
    }

    /// Reads a u16 at `gpa` (volatile: the daemon writes it).
    pub fn u16_at(&self, gpa: u64) -> u16 {
        // SAFETY: in bounds (callers use ring addresses); volatile read of shared memory.
        unsafe { std::ptr::read_volatile(self.ptr.add(gpa as usize).cast::<u16>()) }
    }

    /// Writes a descriptor at index `i` of the table at `table`.
    pub fn desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        self.write(table + 16 * u64::from(i), &b);
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what new() mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Descriptor flags.
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// One raw connection to the daemon.
pub struct Frontend {
    pub sock: UnixStream,
    pub ram: Ram,
    pub kick: Option<File>,
    pub call: Option<File>,
    avail_idx: u16,
    /// Ranges the daemon was allowed to write (besides the used ring).
    pub writable: Vec<(u64, u64)>,
    /// Ranges the test itself wrote.
    pub own: Vec<(u64, u64)>,
}

/// A message as bytes.
pub fn message(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(12 + body.len());
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    m
}

/// A 32-byte memory region description.
pub fn region(gpa: u64, size: u64, user: u64, offset: u64) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [gpa, size, user, offset] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

fn two_u32(a: u32, b: u32) -> Vec<u8> {
    let mut v = a.to_le_bytes().to_vec();
    v.extend_from_slice(&b.to_le_bytes());
    v
}

impl Frontend {
    /// Connects (retrying briefly while the daemon re-arms its listener).
    pub fn connect(socket: &Path) -> Frontend {
        let deadline = Instant::now() + Duration::from_secs(10);
        let sock = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "connect: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        sock.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        Frontend { sock, ram: Ram::new(RAM), kick: None, call: None, avail_idx: 0, writable: Vec::new(), own: Vec::new() }
    }

    /// Sends raw bytes with descriptors attached.
    pub fn send_raw(&self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let mut cmsg = [0u64; 64];
        let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
        // SAFETY: plain data, filled below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            let size = std::mem::size_of_val(fds) as u32;
            msg.msg_control = cmsg.as_mut_ptr().cast();
            // SAFETY: constant computations.
            msg.msg_controllen = unsafe { libc::CMSG_SPACE(size) } as _;
            // SAFETY: the buffer (512 bytes) holds one header with up to 100 fds.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(size) as _;
                std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), fds.len());
            }
        }
        // SAFETY: msg points at live buffers.
        let r = unsafe { libc::sendmsg(self.sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        assert_eq!(r as usize, bytes.len(), "short send");
        Ok(())
    }

    /// Sends one message.
    pub fn send(&self, request: u32, flags: u32, body: &[u8], fds: &[RawFd]) -> io::Result<()> {
        self.send_raw(&message(request, flags, body), fds)
    }

    /// Reads one reply: (request, body). Err on timeout or a closed connection.
    pub fn reply(&self) -> io::Result<(u32, Vec<u8>)> {
        let mut s = &self.sock;
        let mut h = [0u8; 12];
        s.read_exact(&mut h)?;
        let req = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let size = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
        let mut body = vec![0u8; size];
        s.read_exact(&mut body)?;
        Ok((req, body))
    }

    /// Reads one reply that may carry a descriptor: (request, body, descriptor).
    pub fn reply_fd(&self) -> io::Result<(u32, Vec<u8>, Option<File>)> {
        let mut buf = vec![0u8; 12 + 64];
        let mut cmsg = [0u64; 16];
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: 12 + 24 };
        // SAFETY: plain data, filled below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg) as _;
        // SAFETY: msg points at live buffers for the duration of the call.
        let n = unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 12 {
            return Err(io::Error::other(format!("short reply ({n})")));
        }
        let mut file = None;
        // SAFETY: walking the control buffer recvmsg filled.
        let c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        if !c.is_null() {
            // SAFETY: a header returned by CMSG_FIRSTHDR; SCM_RIGHTS data holds ints.
            unsafe {
                if (*c).cmsg_type == libc::SCM_RIGHTS {
                    let fd = libc::CMSG_DATA(c).cast::<i32>().read_unaligned();
                    file = Some(File::from_raw_fd(fd));
                }
            }
        }
        let req = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let size = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
        let mut body = buf[12..n as usize].to_vec();
        if body.len() < size {
            let mut rest = vec![0u8; size - body.len()];
            let mut s = &self.sock;
            s.read_exact(&mut rest)?;
            body.extend(rest);
        }
        Ok((req, body, file))
    }

    /// GET_INFLIGHT_FD for one queue of [`QSIZE`]: the region's descriptor and its size.
    pub fn get_inflight(&self) -> io::Result<(File, u64)> {
        let mut body = vec![0u8; 24];
        body[16..18].copy_from_slice(&1u16.to_le_bytes());
        body[18..20].copy_from_slice(&QSIZE.to_le_bytes());
        self.send(code::GET_INFLIGHT_FD, V1, &body, &[])?;
        let (_, b, f) = self.reply_fd()?;
        let f = f.ok_or_else(|| io::Error::other("no inflight descriptor"))?;
        let mut size = [0u8; 8];
        size.copy_from_slice(b.get(..8).ok_or_else(|| io::Error::other("short inflight reply"))?);
        Ok((f, u64::from_le_bytes(size)))
    }

    /// SET_INFLIGHT_FD with a region from [`Frontend::get_inflight`].
    pub fn set_inflight(&self, f: &File, size: u64) -> io::Result<u64> {
        let mut body = vec![0u8; 24];
        body[0..8].copy_from_slice(&size.to_le_bytes());
        body[16..18].copy_from_slice(&1u16.to_le_bytes());
        body[18..20].copy_from_slice(&QSIZE.to_le_bytes());
        self.ack(code::SET_INFLIGHT_FD, &body, &[f.as_raw_fd()])
    }

    /// A new connection for the same guest (its RAM and rings as they are): what a VMM does
    /// when the daemon comes back after a restart.
    pub fn reconnect(self, socket: &Path) -> Frontend {
        let fresh = Frontend::connect(socket);
        Frontend { sock: fresh.sock, ram: self.ram, kick: None, call: None, avail_idx: self.avail_idx, writable: self.writable, own: self.own }
    }

    /// Restarts queue 0 on rings already in use: base = the used index, as QEMU sets it
    /// after the backend went away (it cannot ask for the base).
    pub fn restart_queue(&mut self) {
        let used = u32::from(self.ram.u16_at(USED + 2));
        self.configure_queue(used);
    }

    /// Size, base, addresses, fresh kick and call eventfds, enable: queue 0 starts on the
    /// rings as they are in guest memory.
    pub fn configure_queue(&mut self, base: u32) {
        assert_eq!(self.ack(code::SET_VRING_NUM, &two_u32(0, u32::from(QSIZE)), &[]).expect("num"), 0);
        assert_eq!(self.ack(code::SET_VRING_BASE, &two_u32(0, base), &[]).expect("base"), 0);
        assert_eq!(self.ack(code::SET_VRING_ADDR, &self.addr_body(0, DESC, USED, AVAIL), &[]).expect("addr"), 0);
        let kick = eventfd(0);
        let call = eventfd(0);
        assert_eq!(self.ack(code::SET_VRING_KICK, &0u64.to_le_bytes(), &[kick.as_raw_fd()]).expect("kick"), 0);
        assert_eq!(self.ack(code::SET_VRING_CALL, &0u64.to_le_bytes(), &[call.as_raw_fd()]).expect("call"), 0);
        assert_eq!(self.ack(code::SET_VRING_ENABLE, &two_u32(0, 1), &[]).expect("enable"), 0);
        self.kick = Some(kick);
        self.call = Some(call);
    }

    /// Negotiates, takes an inflight region from the daemon and starts queue 0 tracked by it;
    /// returns the region (what QEMU keeps across daemon restarts).
    pub fn start_tracked(&mut self) -> (File, u64) {
        self.negotiate();
        let (region, size) = self.get_inflight().expect("GET_INFLIGHT_FD");
        assert_eq!(self.set_inflight(&region, size).expect("SET_INFLIGHT_FD"), 0);
        self.start_queue();
        (region, size)
    }

    /// After [`Frontend::reconnect`]: negotiates, hands the region back and restarts queue 0
    /// at the used index.
    pub fn resume_tracked(&mut self, region: &File, size: u64) {
        self.negotiate();
        assert_eq!(self.set_inflight(region, size).expect("SET_INFLIGHT_FD again"), 0);
        self.restart_queue();
    }

    /// Kicks queue 0.
    pub fn kick(&mut self) {
        if let Some(k) = &mut self.kick {
            let _ = k.write_all(&1u64.to_ne_bytes());
        }
    }

    /// Sends with NEED_REPLY and returns the ack (0 = accepted); Err if the connection closed.
    pub fn ack(&self, request: u32, body: &[u8], fds: &[RawFd]) -> io::Result<u64> {
        self.send(request, V1 | NEED_REPLY, body, fds)?;
        let (_, b) = self.reply()?;
        let mut v = [0u8; 8];
        v.copy_from_slice(b.get(..8).ok_or_else(|| io::Error::other("short ack"))?);
        Ok(u64::from_le_bytes(v))
    }

    /// A GET_* request's u64 reply.
    pub fn get_u64(&self, request: u32) -> io::Result<u64> {
        self.send(request, V1, &[], &[])?;
        let (_, b) = self.reply()?;
        let mut v = [0u8; 8];
        v.copy_from_slice(b.get(..8).ok_or_else(|| io::Error::other("short reply"))?);
        Ok(u64::from_le_bytes(v))
    }

    /// True if the daemon closed the connection (EOF within `limit`).
    pub fn closed_within(&self, limit: Duration) -> bool {
        let _ = self.sock.set_read_timeout(Some(limit));
        let mut b = [0u8; 64];
        let mut s = &self.sock;
        let deadline = Instant::now() + limit;
        loop {
            match s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
            if Instant::now() > deadline {
                return false;
            }
        }
    }

    /// Owner, features, protocol features (with REPLY_ACK), the memory table.
    pub fn negotiate(&mut self) {
        // No EVENT_IDX: every completion notifies, which keeps the tests simple.
        self.negotiate_with(false);
    }

    /// [`Frontend::negotiate`], with VIRTIO_RING_F_EVENT_IDX if `event_idx`: the daemon then
    /// writes its next available index into the used ring ([`Frontend::avail_event`]) each
    /// time it has taken every chain it will take.
    pub fn negotiate_with(&mut self, event_idx: bool) {
        self.send(code::SET_OWNER, V1, &[], &[]).expect("owner");
        let f = self.get_u64(code::GET_FEATURES).expect("features");
        let pf = self.get_u64(code::GET_PROTOCOL_FEATURES).expect("protocol features");
        self.send(code::SET_PROTOCOL_FEATURES, V1, &pf.to_le_bytes(), &[]).expect("set pf");
        let f = if event_idx { f } else { f & !(1 << 29) };
        // Dirty logging (VHOST_F_LOG_ALL) is a migration's, set by the cases that test it.
        let f = f & !(1 << 26);
        assert_eq!(self.ack(code::SET_FEATURES, &f.to_le_bytes(), &[]).expect("set f"), 0);
        let mut body = 1u32.to_le_bytes().to_vec();
        body.extend_from_slice(&[0; 4]);
        body.extend(region(0, RAM, USER_BASE, 0));
        let fd = self.ram.file.as_raw_fd();
        assert_eq!(self.ack(code::SET_MEM_TABLE, &body, &[fd]).expect("mem table"), 0);
    }

    /// Configures queue 0 (size 16) and starts it with fresh kick and call eventfds.
    pub fn start_queue(&mut self) {
        self.put(AVAIL, &[0u8; 4 + 2 * QSIZE as usize + 2]);
        self.put(USED, &[0u8; 4 + 8 * QSIZE as usize + 2]);
        self.avail_idx = 0;
        self.configure_queue(0);
    }

    /// A SET_VRING_ADDR body for guest addresses (translated into the frontend's space).
    pub fn addr_body(&self, index: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
        let mut b = two_u32(index, 0);
        for a in [desc, used, avail, 0] {
            b.extend_from_slice(&(USER_BASE + a).to_le_bytes());
        }
        b
    }

    /// The body of SET_VRING_NUM / BASE / ENABLE.
    pub fn vring_state(index: u32, num: u32) -> Vec<u8> {
        two_u32(index, num)
    }

    /// Writes guest memory, remembering that we did.
    pub fn put(&mut self, gpa: u64, data: &[u8]) {
        self.ram.write(gpa, data);
        self.own.push((gpa, data.len() as u64));
    }

    /// Writes descriptor `i` of the table at `table`; a device-writable one is recorded as a
    /// range the daemon may write.
    pub fn desc(&mut self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.ram.desc(table, i, addr, len, flags, next);
        self.own.push((table + 16 * u64::from(i), 16));
        if flags & F_WRITE != 0 {
            self.writable.push((addr, u64::from(len)));
        }
    }

    /// Publishes chain `head` and kicks.
    pub fn submit(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.put(slot, &head.to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let idx = self.avail_idx.to_le_bytes();
        self.put(AVAIL + 2, &idx);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        if let Some(k) = &mut self.kick {
            let _ = k.write_all(&1u64.to_ne_bytes());
        }
    }

    /// Publishes `heads` in one go (one avail index update, one kick), recording the avail
    /// ring once rather than each entry (for floods of many thousand publications).
    pub fn publish(&mut self, heads: &[u16]) {
        for &head in heads {
            let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
            self.ram.write(slot, &head.to_le_bytes());
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.ram.write(AVAIL + 2, &self.avail_idx.to_le_bytes());
        if !self.own.contains(&(AVAIL, 4 + 2 * u64::from(QSIZE))) {
            self.own.push((AVAIL, 4 + 2 * u64::from(QSIZE)));
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.kick();
    }

    /// The available index published so far.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The daemon's avail_event (EVENT_IDX): its next available index when it last asked
    /// for kicks, i.e. after taking every chain it would take.
    pub fn avail_event(&self) -> u16 {
        self.ram.u16_at(USED + 4 + 8 * u64::from(QSIZE))
    }

    /// Waits until the used index reaches what was submitted.
    pub fn wait_used(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.ram.u16_at(USED + 2) == self.avail_idx {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    /// The (id, len) of used entry `i`.
    pub fn used(&self, i: u16) -> (u32, u32) {
        let at = (USED + 4 + 8 * u64::from(i % QSIZE)) as usize;
        let b = &self.ram.bytes()[at..at + 8];
        (u32::from_le_bytes([b[0], b[1], b[2], b[3]]), u32::from_le_bytes([b[4], b[5], b[6], b[7]]))
    }

    /// The first guest address written by neither us nor (where allowed) the daemon: the
    /// daemon may write the used ring and the device-writable buffers it was given.
    pub fn stray_write(&self) -> Option<u64> {
        let bytes = self.ram.bytes();
        let mut allowed: Vec<(u64, u64)> = vec![(USED, 4 + 8 * u64::from(QSIZE) + 2)];
        allowed.extend_from_slice(&self.writable);
        allowed.extend_from_slice(&self.own);
        (0..RAM).find(|&a| {
            bytes[a as usize] != PATTERN && !allowed.iter().any(|&(s, l)| a >= s && a < s.saturating_add(l))
        })
    }
}

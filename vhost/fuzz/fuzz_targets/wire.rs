//! Fuzzes the framing of the protocol socket: a byte stream, cut into pieces the fuzzer
//! chooses, some carrying file descriptors (up to 64 per piece, more than a message may take
//! or the control buffer holds), is written into one end of a socket pair and read back with
//! `wire::read_message`, each message decoded with `message::decode` as the session does.
//!
//! Input: byte 0 gives the piece count (1 to 8); then per piece a little-endian u16 length
//! and a descriptor code; then the stream (at most 32 KiB).
//!
//! Checked: what is read is what a plain framing of the stream gives, message by message;
//! descriptors are neither lost nor invented when the stream is read to its end; none is
//! left open afterwards.
#![no_main]

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use thinblk_vhost::error::ProtocolError;
use thinblk_vhost::protocol::message::{decode, Header, HEADER_LEN};
use thinblk_vhost::protocol::wire::read_message;

/// Longest stream written (the socket buffer takes it whole, so writing never waits).
const MAX_STREAM: usize = 32 << 10;
/// Most descriptors one piece carries.
const MAX_PIECE_FDS: usize = 64;

/// The descriptor attached (as copies) to pieces.
fn dev_null() -> &'static File {
    static F: OnceLock<File> = OnceLock::new();
    F.get_or_init(|| File::open("/dev/null").unwrap())
}

/// Descriptors a piece's code asks for: mostly none, a few, sometimes very many.
fn fd_count(code: u8) -> usize {
    match code {
        0..=0x7f => 0,
        0x80..=0xbf => 1 + usize::from(code & 3),
        _ => 1 + usize::from(code & 0x3f),
    }
}

/// Writes `bytes` with `fds` copies of /dev/null attached.
fn send_piece(sock: &UnixStream, bytes: &[u8], fds: usize) {
    let mut cmsg = [0u64; (16 + 4 * MAX_PIECE_FDS) / 8];
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if fds > 0 {
        let data_len = (4 * fds) as u32;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a constant computation.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(data_len) } as _;
        // SAFETY: the control buffer holds one header with MAX_PIECE_FDS ints (above).
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(data_len) as _;
            let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
            for i in 0..fds {
                data.add(i).write_unaligned(dev_null().as_raw_fd());
            }
        }
    }
    let mut sent = 0;
    while sent < bytes.len() {
        iov = libc::iovec { iov_base: bytes[sent..].as_ptr() as *mut libc::c_void, iov_len: bytes.len() - sent };
        msg.msg_iov = &mut iov;
        // SAFETY: `msg` points at live buffers; the kernel only reads them.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        assert!(r > 0, "sendmsg: {}", std::io::Error::last_os_error());
        sent += r as usize;
        // The descriptors go with the first bytes only.
        msg.msg_control = std::ptr::null_mut();
        msg.msg_controllen = 0;
    }
}

/// The lowest descriptor number not in use.
fn lowest_free() -> RawFd {
    // SAFETY: F_DUPFD_CLOEXEC on an open descriptor returns a new one that we close at once.
    let fd = unsafe { libc::fcntl(dev_null().as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just created here and is not used elsewhere.
    unsafe { libc::close(fd) };
    fd
}

/// Whether `fd` is open.
fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let npieces = usize::from(first & 7) + 1;
    let Some(table) = rest.get(..3 * npieces) else { return };
    let stream = &rest[3 * npieces..];
    let stream = &stream[..stream.len().min(MAX_STREAM)];
    if stream.is_empty() {
        return;
    }

    // The pieces: (start, length, descriptors).
    let mut pieces = Vec::with_capacity(npieces);
    let mut at = 0;
    for (i, p) in table.chunks_exact(3).enumerate() {
        if at == stream.len() {
            break;
        }
        let len = usize::from(u16::from_le_bytes([p[0], p[1]])).clamp(1, stream.len() - at);
        let len = if i + 1 == npieces { stream.len() - at } else { len };
        pieces.push((at, len, fd_count(p[2])));
        at += len;
    }
    let fds_sent: usize = pieces.iter().map(|p| p.2).sum();
    // Descriptors that may be ours during this input (the pair, then what is received, with
    // room for numbers already taken in between), and which of them were already open
    // (inherited from whoever started the fuzzer).
    let low = lowest_free();
    let ours = low..low + 2 + fds_sent as RawFd + 64;
    let open_before: Vec<bool> = ours.clone().map(is_open).collect();

    let (a, b) = UnixStream::pair().unwrap();
    for &(at, len, fds) in &pieces {
        send_piece(&a, &stream[at..at + len], fds);
    }
    a.shutdown(std::net::Shutdown::Write).unwrap();

    // What is left of the stream in a plain framing, which read_message must agree with.
    let mut expect = stream;
    let mut fds_read = 0;
    let clean_end = loop {
        match read_message(&b) {
            Ok(Some(m)) => {
                assert!(expect.len() >= HEADER_LEN + m.body.len());
                let mut hb = [0u8; HEADER_LEN];
                hb.copy_from_slice(&expect[..HEADER_LEN]);
                assert_eq!(Header::parse(&hb).ok(), Some(m.header));
                assert_eq!(m.body.len(), m.header.size as usize);
                assert_eq!(&expect[HEADER_LEN..HEADER_LEN + m.body.len()], &m.body[..]);
                expect = &expect[HEADER_LEN + m.body.len()..];
                assert!(m.files.len() <= 32);
                fds_read += m.files.len();
                let _ = decode(m.header.request, &m.body);
            }
            Ok(None) => break true,
            Err(ProtocolError::Truncated { got, want }) => {
                // Only at the stream's end, in the header or in the body of the last message.
                assert!(got < want);
                let in_header = got == expect.len() && want == HEADER_LEN;
                let in_body = expect.len() >= HEADER_LEN && got == expect.len() - HEADER_LEN;
                assert!(in_header || in_body, "cut at {got} of {want} with {} bytes left", expect.len());
                break false;
            }
            Err(_) => break false,
        }
    };
    if clean_end {
        assert!(expect.is_empty());
        assert_eq!(fds_read, fds_sent);
    }
    drop(a);
    drop(b);
    for (fd, before) in ours.zip(open_before) {
        assert!(before || !is_open(fd), "descriptor {fd} left open");
    }
});

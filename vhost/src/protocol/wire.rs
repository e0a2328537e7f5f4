//! Reading whole messages (and their file descriptors) off the socket, however the frontend
//! split them, and writing replies.
//!
//! A frontend may send one message in several writes: the header, then the body, or any
//! other cut. We read exactly the bytes the current message still needs, so a read never
//! runs into the next message (whose descriptors would then be attributed to this one), and
//! descriptors attached to any piece belong to the message. More descriptors than we read
//! or a truncated control message make the message invalid; received descriptors are always
//! owned (closed on drop) and close-on-exec.
//!
//! Proof: `a_message_in_pieces_is_one_message`, `descriptors_on_a_later_piece_belong_to_the_message`,
//! `a_cut_message_is_an_error_not_a_hang` (below).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;

use crate::error::ProtocolError;
use crate::protocol::message::{Header, HEADER_LEN};

/// One received message.
#[derive(Debug)]
pub struct Message {
    /// Its header.
    pub header: Header,
    /// Its body, exactly `header.size` bytes.
    pub body: Vec<u8>,
    /// Descriptors attached to any of its pieces.
    pub files: Vec<File>,
}

/// Space for the control message of up to [`WIRE_FDS`] descriptors (plus slack for alignment).
const CMSG_SPACE: usize = 256;
/// Descriptors we take off the socket per message: more than any message may carry, so that
/// a message with too many is still read whole (its descriptors closed) and refused by the
/// session with a reason, rather than desynchronising the stream.
const WIRE_FDS: usize = 32;

/// Reads up to `buf.len()` bytes; appends received descriptors to `files`. Returns the byte
/// count (0: the peer closed the connection).
fn recv_some(sock: &UnixStream, buf: &mut [u8], files: &mut Vec<File>) -> Result<usize, ProtocolError> {
    let mut cmsg = [0u64; CMSG_SPACE / 8];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain data; every pointer set below outlives the recvmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_SPACE as _;
    let n = loop {
        // SAFETY: `msg` points at a live iovec over `buf` and a live control buffer of the
        // given length; the kernel writes only within them.
        let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(ProtocolError::Socket(e));
        }
    };
    // Take ownership of every descriptor first, so that none leaks whatever we decide.
    // SAFETY: `msg` was filled by recvmsg; the CMSG macros walk its control buffer within
    // msg_controllen.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    let mut bad_cmsg = false;
    while !c.is_null() {
        // SAFETY: `c` is a non-null header inside the control buffer (CMSG_FIRSTHDR/NXTHDR).
        let (level, kind, len) = unsafe { ((*c).cmsg_level, (*c).cmsg_type, (*c).cmsg_len as usize) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is a constant computation.
            let head = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = len.saturating_sub(head) / std::mem::size_of::<libc::c_int>();
            // SAFETY: the data of an SCM_RIGHTS header holds `count` ints within the buffer.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<libc::c_int>();
            for i in 0..count {
                // SAFETY: i < count, inside this header's data; read_unaligned as the data
                // has no alignment guarantee.
                let fd = unsafe { data.add(i).read_unaligned() };
                // SAFETY: the kernel just installed `fd` in our table for us; we own it.
                files.push(unsafe { File::from_raw_fd(fd) });
            }
        } else {
            bad_cmsg = true;
        }
        // SAFETY: `c` is a valid header of `msg`'s control buffer.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(ProtocolError::TooManyFds);
    }
    if bad_cmsg {
        return Err(ProtocolError::ControlMessage);
    }
    if files.len() > WIRE_FDS {
        return Err(ProtocolError::TooManyFds);
    }
    Ok(n)
}

/// Fills `buf` completely. `Ok(false)`: the peer closed before the first byte (only allowed
/// when `start` says this is the start of a message).
fn recv_exact(sock: &UnixStream, buf: &mut [u8], files: &mut Vec<File>, start: bool) -> Result<bool, ProtocolError> {
    let mut done = 0;
    while done < buf.len() {
        let n = recv_some(sock, &mut buf[done..], files)?;
        if n == 0 {
            if start && done == 0 {
                return Ok(false);
            }
            return Err(ProtocolError::Truncated { got: done, want: buf.len() });
        }
        done += n;
    }
    Ok(true)
}

/// Reads the next message. `Ok(None)`: the frontend closed the connection between messages.
pub fn read_message(sock: &UnixStream) -> Result<Option<Message>, ProtocolError> {
    let mut files = Vec::new();
    let mut hb = [0u8; HEADER_LEN];
    if !recv_exact(sock, &mut hb, &mut files, true)? {
        return Ok(None);
    }
    let header = Header::parse(&hb)?;
    let mut body = vec![0u8; header.size as usize];
    recv_exact(sock, &mut body, &mut files, false)?;
    Ok(Some(Message { header, body, files }))
}

/// Sends a reply with `body`, optionally passing one descriptor.
pub fn send_reply(sock: &UnixStream, header: &Header, body: &[u8], fd: Option<&File>) -> Result<(), ProtocolError> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&header.reply(body.len()));
    out.extend_from_slice(body);
    match fd {
        None => {
            let mut s = sock;
            s.write_all(&out).map_err(ProtocolError::Socket)
        }
        Some(f) => send_with_fd(sock, &out, f),
    }
}

/// Sends `bytes` with one descriptor attached to the first piece.
fn send_with_fd(sock: &UnixStream, bytes: &[u8], f: &File) -> Result<(), ProtocolError> {
    let mut cmsg = [0u64; CMSG_SPACE / 8];
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a constant computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as _;
    // SAFETY: the control buffer is large enough for one header with one int (above).
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        libc::CMSG_DATA(c).cast::<libc::c_int>().write_unaligned(f.as_raw_fd());
    }
    // SAFETY: `msg` points at live buffers; the kernel only reads them.
    let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if r < 0 {
        return Err(ProtocolError::Socket(io::Error::last_os_error()));
    }
    let sent = r as usize;
    if sent < bytes.len() {
        let mut s = sock;
        s.write_all(&bytes[sent..]).map_err(ProtocolError::Socket)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::message::code;

    fn send_fd(sock: &UnixStream, bytes: &[u8], f: &File) {
        assert!(send_with_fd(sock, bytes, f).is_ok());
    }

    #[test]
    fn a_message_in_pieces_is_one_message() {
        let (a, b) = UnixStream::pair().expect("pair");
        let mut w = &a;
        let mut msg = Vec::new();
        msg.extend_from_slice(&code::SET_VRING_NUM.to_le_bytes());
        msg.extend_from_slice(&1u32.to_le_bytes());
        msg.extend_from_slice(&8u32.to_le_bytes());
        msg.extend_from_slice(&[0, 0, 0, 0, 0, 1, 0, 0]);
        // Header split in two, then the body in three pieces, then a second message whole.
        for piece in [&msg[0..5], &msg[5..12], &msg[12..13], &msg[13..17], &msg[17..]] {
            w.write_all(piece).expect("write");
            w.flush().expect("flush");
        }
        w.write_all(&msg).expect("write");
        for _ in 0..2 {
            let m = read_message(&b).expect("read").expect("a message");
            assert_eq!(m.header.request, code::SET_VRING_NUM);
            assert_eq!(m.body, vec![0, 0, 0, 0, 0, 1, 0, 0]);
            assert!(m.files.is_empty());
        }
        drop(a);
        assert!(read_message(&b).expect("clean close").is_none());
    }

    #[test]
    fn descriptors_on_a_later_piece_belong_to_the_message() {
        let (a, b) = UnixStream::pair().expect("pair");
        let mut w = &a;
        let mut hdr = Vec::new();
        hdr.extend_from_slice(&code::SET_VRING_KICK.to_le_bytes());
        hdr.extend_from_slice(&1u32.to_le_bytes());
        hdr.extend_from_slice(&8u32.to_le_bytes());
        w.write_all(&hdr).expect("write");
        let f = File::open("/dev/null").expect("null");
        send_fd(&a, &[0u8; 8], &f);
        let m = read_message(&b).expect("read").expect("a message");
        assert_eq!(m.files.len(), 1);
    }

    #[test]
    fn a_cut_message_is_an_error_not_a_hang() {
        let (a, b) = UnixStream::pair().expect("pair");
        let mut w = &a;
        w.write_all(&code::GET_FEATURES.to_le_bytes()).expect("write");
        drop(a);
        assert!(matches!(read_message(&b), Err(ProtocolError::Truncated { got: 4, want: 12 })));
    }
}

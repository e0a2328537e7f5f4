//! Error types of the device and the one place where they become virtio status codes.

use std::io;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};

/// Why a descriptor chain was not accepted as a request.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// The chain has no descriptor at all, or only one.
    #[error("descriptor chain too short ({0} descriptors)")]
    ChainTooShort(usize),
    /// The chain has more descriptors than `seg_max` allows.
    #[error("descriptor chain has {0} data segments, more than seg_max {1}")]
    TooManySegments(usize, u32),
    /// The chain ends on a descriptor that says "next": an index past the table, a loop, or
    /// an unreadable indirect table.
    #[error("descriptor chain broken after {0} descriptors (bad next index, loop or indirect table)")]
    BrokenChain(usize),
    /// The chain starts with fewer than 16 device-readable bytes.
    #[error("request header invalid ({len} readable bytes before a write-only descriptor: {write_only})")]
    BadHeader {
        /// Readable header bytes found.
        len: u32,
        /// Whether it was device-writable.
        write_only: bool,
    },
    /// The last descriptor cannot hold the status byte.
    #[error("no writable status byte at the end of the chain")]
    NoStatus,
    /// A descriptor points outside the guest's memory.
    #[error("descriptor at {addr:#x} len {len} is outside guest memory")]
    OutsideMemory {
        /// Guest physical address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A data descriptor's direction does not match the request type.
    #[error("data descriptor direction does not match the request type")]
    WrongDirection,
    /// The request type is not one this device implements.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// Offset or length not aligned to the logical block size.
    #[error("offset {offset} or length {len} not aligned to the logical block size {lbs}")]
    Misaligned {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// Logical block size.
        lbs: u32,
    },
    /// The request reaches past the end of the disk.
    #[error("request {offset}+{len} past the capacity {capacity}")]
    OutOfRange {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// Disk size.
        capacity: u64,
    },
    /// The request carries more data than `size_max` × `seg_max`.
    #[error("request of {0} bytes larger than the device limit {1}")]
    TooLarge(u64, u64),
    /// The discard / write-zeroes payload is malformed.
    #[error("malformed discard/write-zeroes payload: {0}")]
    BadRanges(&'static str),
    /// A discard or write-zeroes segment sets flags the device does not support.
    #[error("unsupported discard/write-zeroes flags {0:#x}")]
    UnsupportedFlags(u32),
    /// A write reached a read-only device.
    #[error("write to a read-only device")]
    ReadOnly,
}

pub use thinblk_disk::error::ImageError;

/// Why a frontend message was refused (the connection's log says which and why).
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The socket failed.
    #[error("socket: {0}")]
    Socket(io::Error),
    /// A host resource a message needs failed (a file's status, a mapping, a memfd, a
    /// queue thread or its epoll).
    #[error("host: {0}")]
    Host(io::Error),
    /// A config-space write (SET_CONFIG) was refused.
    #[error("config space: {0}")]
    Config(io::Error),
    /// The connection ended inside a message.
    #[error("message cut short: {got} of {want} bytes")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes the message needed.
        want: usize,
    },
    /// The header's version is not 1.
    #[error("protocol version {0} (only 1 exists)")]
    Version(u32),
    /// Unknown or misplaced flag bits.
    #[error("invalid flags {0:#x}")]
    Flags(u32),
    /// A body larger than any message has.
    #[error("body of {0} bytes (at most 4096)")]
    TooLarge(u32),
    /// A body of the wrong size for its message.
    #[error("{request}: body of {got} bytes, the message has {want}")]
    BodySize {
        /// Message name.
        request: &'static str,
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// More file descriptors than any message carries, or a truncated control message.
    #[error("too many file descriptors")]
    TooManyFds,
    /// A control message other than SCM_RIGHTS.
    #[error("unexpected control message")]
    ControlMessage,
    /// The wrong number of descriptors for the message.
    #[error("{got} file descriptors where the message takes {want}")]
    FdCount {
        /// Expected.
        want: usize,
        /// Received.
        got: usize,
    },
    /// A descriptor of the wrong kind.
    #[error("bad file descriptor: {0}")]
    BadFd(io::Error),
    /// The call eventfd could not be attached to its notifier ring (see `vring::CallNotifier`).
    #[error("cannot set up notifications on the call eventfd: {0}")]
    Notifier(io::Error),
    /// A request we do not implement (or did not offer).
    #[error("unsupported request {0} ({1})")]
    Unsupported(&'static str, u32),
    /// A request whose protocol feature was not negotiated.
    #[error("{0} without its protocol feature negotiated")]
    NotNegotiated(&'static str),
    /// Feature bits we never offered.
    #[error("{what} {bits:#x} were never offered")]
    NotOffered {
        /// Virtio or protocol features.
        what: &'static str,
        /// The bits not offered.
        bits: u64,
    },
    /// A queue index beyond the device's queues.
    #[error("no queue {0}")]
    QueueIndex(u32),
    /// A ring size that is zero, not a power of two, or above the maximum.
    #[error("ring size {size} (a power of two up to {max})")]
    RingSize {
        /// Requested.
        size: u32,
        /// Maximum.
        max: u32,
    },
    /// A ring base (SET_VRING_BASE) above 0xffff.
    #[error("ring base {0} above 0xffff")]
    RingBase(u32),
    /// A SET_VRING_ENABLE value other than 0 or 1.
    #[error("ring enable value {0} (0 or 1)")]
    EnableValue(u32),
    /// Ring addresses the memory table does not cover, or a ring that does not fit.
    #[error("ring: {0}")]
    Ring(String),
    /// A frontend address outside every region.
    #[error("address {0:#x} is in no memory region")]
    Unmapped(u64),
    /// Too many regions.
    #[error("{0} memory regions is out of range")]
    RegionCount(usize),
    /// A region that cannot be mapped safely.
    #[error("memory region at {guest_addr:#x}: {why}")]
    BadRegion {
        /// Its guest address.
        guest_addr: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// REM_MEM_REG of a region we do not have.
    #[error("no memory region at {0:#x} to remove")]
    NoSuchRegion(u64),
    /// Mapping failed.
    #[error("mapping guest memory: {0}")]
    Map(String),
    /// A message not allowed in the current state.
    #[error("{0}")]
    State(&'static str),
    /// A used ring whose log address is not where the ring is: the log would miss its writes.
    #[error("used ring at guest address {used:#x} but its log address is {log:#x}")]
    LogAddress {
        /// The used ring's guest-physical address (translated from the frontend's).
        used: u64,
        /// The log address the frontend gave.
        log: u64,
    },
    /// The image could not be taken over before a ring started (another process still
    /// holds it, or its metadata cannot be read).
    #[error("cannot take over the image: {0}")]
    Activate(String),
    /// The frontend shrank a file backing guest memory while it was mapped.
    #[error("guest memory vanished under us (a backing file was truncated)")]
    MemoryFault,
}

/// Errors that stop the device from being set up (never reached by guest requests).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// io_uring setup failed.
    #[error("io_uring setup failed: {0}")]
    Ring(io::Error),
}

/// The outcome of one request, as the guest will see it.
#[derive(Debug)]
pub enum Outcome {
    /// Done.
    Ok,
    /// Rejected before any IO.
    Invalid(RequestError),
    /// Host IO failed with this errno.
    HostIo(i32),
    /// The image layer failed.
    Image(ImageError),
}

/// Why a request completed with an error, coarsely (the `class` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The storage failed the IO (EIO and errnos not classed below).
    Io,
    /// No space: ENOSPC, EDQUOT, or a thin volume that did not grow in time.
    NoSpace,
    /// The storage went away: ENOTCONN, ETIMEDOUT, ENXIO, ENODEV, ESHUTDOWN, ECONNRESET.
    Link,
    /// The guest's buffers could not be accessed (EFAULT).
    GuestMemory,
    /// The request was malformed or out of range.
    Invalid,
    /// The request type or flags are not supported.
    Unsupported,
}

impl ErrorClass {
    /// Every class, in label order.
    pub const ALL: [ErrorClass; 6] =
        [ErrorClass::Io, ErrorClass::NoSpace, ErrorClass::Link, ErrorClass::GuestMemory, ErrorClass::Invalid, ErrorClass::Unsupported];

    /// The `class` label value.
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::Io => "io",
            ErrorClass::NoSpace => "no_space",
            ErrorClass::Link => "link",
            ErrorClass::GuestMemory => "guest_memory",
            ErrorClass::Invalid => "invalid",
            ErrorClass::Unsupported => "unsupported",
        }
    }

    /// The class of a host errno.
    pub fn of_errno(errno: i32) -> ErrorClass {
        match errno {
            libc::ENOSPC | libc::EDQUOT => ErrorClass::NoSpace,
            libc::ENOTCONN | libc::ETIMEDOUT | libc::ENXIO | libc::ENODEV | libc::ESHUTDOWN | libc::ECONNRESET => ErrorClass::Link,
            libc::EFAULT => ErrorClass::GuestMemory,
            _ => ErrorClass::Io,
        }
    }
}

/// Maps an outcome to the virtio-blk status byte. This is the only such mapping.
pub fn virtio_status(outcome: &Outcome) -> u8 {
    let status = match outcome {
        Outcome::Ok => VIRTIO_BLK_S_OK,
        Outcome::Invalid(RequestError::Unsupported(_))
        | Outcome::Invalid(RequestError::UnsupportedFlags(_)) => VIRTIO_BLK_S_UNSUPP,
        Outcome::Invalid(_) | Outcome::HostIo(_) | Outcome::Image(_) => VIRTIO_BLK_S_IOERR,
    };
    status as u8
}

/// The error class an outcome is counted under in the statistics (None: success).
pub fn error_class(outcome: &Outcome) -> Option<ErrorClass> {
    Some(match outcome {
        Outcome::Ok => return None,
        Outcome::Invalid(RequestError::Unsupported(_)) | Outcome::Invalid(RequestError::UnsupportedFlags(_)) => {
            ErrorClass::Unsupported
        }
        Outcome::Invalid(_) => ErrorClass::Invalid,
        Outcome::HostIo(e) => ErrorClass::of_errno(*e),
        Outcome::Image(ImageError::Io(e)) => ErrorClass::of_errno(e.raw_os_error().unwrap_or(libc::EIO)),
        Outcome::Image(ImageError::NoSpace { .. }) => ErrorClass::NoSpace,
        Outcome::Image(ImageError::Refused(_) | ImageError::Inactive | ImageError::Lock { .. } | ImageError::Qcow2 { .. }) => {
            ErrorClass::Unsupported
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping() {
        assert_eq!(virtio_status(&Outcome::Ok), 0);
        assert_eq!(virtio_status(&Outcome::Invalid(RequestError::Unsupported(99))), 2);
        assert_eq!(virtio_status(&Outcome::Invalid(RequestError::UnsupportedFlags(2))), 2);
        assert_eq!(virtio_status(&Outcome::Invalid(RequestError::ReadOnly)), 1);
        assert_eq!(virtio_status(&Outcome::HostIo(libc::EIO)), 1);
    }

    #[test]
    fn error_classes() {
        assert_eq!(error_class(&Outcome::Ok), None);
        assert_eq!(error_class(&Outcome::Invalid(RequestError::Unsupported(99))), Some(ErrorClass::Unsupported));
        assert_eq!(error_class(&Outcome::Invalid(RequestError::ReadOnly)), Some(ErrorClass::Invalid));
        assert_eq!(error_class(&Outcome::HostIo(libc::ENOSPC)), Some(ErrorClass::NoSpace));
        assert_eq!(error_class(&Outcome::Image(ImageError::NoSpace { needed: 2, limit: 1 })), Some(ErrorClass::NoSpace));
        assert_eq!(error_class(&Outcome::Image(ImageError::Inactive)), Some(ErrorClass::Unsupported));
    }
}

//! vhost-user message codes, header flags and the bodies we parse, with their size rules.
//!
//! Bodies are decoded field by field from little-endian bytes (no casts of untrusted memory);
//! every decoder checks the exact length the specification gives for its message.

use crate::error::ProtocolError;
use crate::inflight::InflightInfo;

/// Size of the message header: request code, flags, body size (u32 each).
pub const HEADER_LEN: usize = 12;
/// Largest body we accept. The largest legitimate one is a full GET/SET_CONFIG (268 bytes).
pub const MAX_BODY: usize = 4096;
/// Regions one SET_MEM_TABLE may carry (`VHOST_MEMORY_BASELINE_NREGIONS`).
pub const MAX_TABLE_REGIONS: usize = 8;
/// Memory slots announced in GET_MAX_MEM_SLOTS and enforced on ADD_MEM_REG.
pub const MAX_MEM_SLOTS: usize = 509;

/// Header flag bits: the protocol version (always 1).
pub const FLAG_VERSION_MASK: u32 = 0x3;
/// Header flag: this message is a reply.
pub const FLAG_REPLY: u32 = 0x4;
/// Header flag: the sender wants an acknowledgement (REPLY_ACK).
pub const FLAG_NEED_REPLY: u32 = 0x8;

/// Payload bit of SET_VRING_KICK/CALL/ERR: no file descriptor is attached.
pub const VRING_NOFD: u64 = 0x100;
/// SET_VRING_ADDR flag: log writes to the used ring at the given log address (dirty logging).
pub const VRING_ADDR_F_LOG: u32 = 0x1;

/// Virtio feature bit 26 (`VHOST_F_LOG_ALL`): log every write into guest memory (migration).
pub const F_LOG_ALL: u64 = 1 << 26;

/// Virtio feature bit 30: vhost-user protocol features are supported.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Protocol feature: several queues (GET_QUEUE_NUM).
pub const PF_MQ: u64 = 1 << 0;
/// Protocol feature: the dirty log is shared memory passed with SET_LOG_BASE.
pub const PF_LOG_SHMFD: u64 = 1 << 1;
/// Protocol feature: acknowledgements on request.
pub const PF_REPLY_ACK: u64 = 1 << 3;
/// Protocol feature: device config space access.
pub const PF_CONFIG: u64 = 1 << 9;
/// Protocol feature: inflight I/O tracking in a shared region (GET/SET_INFLIGHT_FD).
pub const PF_INFLIGHT_SHMFD: u64 = 1 << 12;
/// Protocol feature: ADD_MEM_REG / REM_MEM_REG.
pub const PF_CONFIGURE_MEM_SLOTS: u64 = 1 << 15;

/// The frontend requests we know by name (codes from the vhost-user specification).
#[allow(missing_docs)]
pub mod code {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_LOG_FD: u32 = 7;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const SET_INFLIGHT_FD: u32 = 32;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
}

/// A request name for logs.
pub fn name(request: u32) -> &'static str {
    match request {
        code::GET_FEATURES => "GET_FEATURES",
        code::SET_FEATURES => "SET_FEATURES",
        code::SET_OWNER => "SET_OWNER",
        code::RESET_OWNER => "RESET_OWNER",
        code::SET_MEM_TABLE => "SET_MEM_TABLE",
        code::SET_LOG_BASE => "SET_LOG_BASE",
        code::SET_LOG_FD => "SET_LOG_FD",
        code::SET_VRING_NUM => "SET_VRING_NUM",
        code::SET_VRING_ADDR => "SET_VRING_ADDR",
        code::SET_VRING_BASE => "SET_VRING_BASE",
        code::GET_VRING_BASE => "GET_VRING_BASE",
        code::SET_VRING_KICK => "SET_VRING_KICK",
        code::SET_VRING_CALL => "SET_VRING_CALL",
        code::SET_VRING_ERR => "SET_VRING_ERR",
        code::GET_PROTOCOL_FEATURES => "GET_PROTOCOL_FEATURES",
        code::SET_PROTOCOL_FEATURES => "SET_PROTOCOL_FEATURES",
        code::GET_QUEUE_NUM => "GET_QUEUE_NUM",
        code::SET_VRING_ENABLE => "SET_VRING_ENABLE",
        code::GET_CONFIG => "GET_CONFIG",
        code::SET_CONFIG => "SET_CONFIG",
        code::GET_INFLIGHT_FD => "GET_INFLIGHT_FD",
        code::SET_INFLIGHT_FD => "SET_INFLIGHT_FD",
        code::GET_MAX_MEM_SLOTS => "GET_MAX_MEM_SLOTS",
        code::ADD_MEM_REG => "ADD_MEM_REG",
        code::REM_MEM_REG => "REM_MEM_REG",
        _ => "unknown",
    }
}

/// A message header as received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Request code.
    pub request: u32,
    /// Flags (version, reply, need-reply).
    pub flags: u32,
    /// Body size in bytes.
    pub size: u32,
}

impl Header {
    /// Decodes and checks a header: version 1, not a reply, no unknown flag, bounded size.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Header, ProtocolError> {
        let h = Header { request: le32(b, 0), flags: le32(b, 4), size: le32(b, 8) };
        if h.flags & FLAG_VERSION_MASK != 1 {
            return Err(ProtocolError::Version(h.flags & FLAG_VERSION_MASK));
        }
        if h.flags & !(FLAG_VERSION_MASK | FLAG_NEED_REPLY) != 0 {
            return Err(ProtocolError::Flags(h.flags));
        }
        if h.size as usize > MAX_BODY {
            return Err(ProtocolError::TooLarge(h.size));
        }
        Ok(h)
    }

    /// The sender asked for an acknowledgement.
    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }

    /// The header of our reply to this request, carrying `size` body bytes.
    pub fn reply(&self, size: usize) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.request.to_le_bytes());
        b[4..8].copy_from_slice(&(1 | FLAG_REPLY).to_le_bytes());
        b[8..12].copy_from_slice(&(size as u32).to_le_bytes());
        b
    }
}

/// Reads a little-endian u32 at `at` (the caller checked the length).
fn le32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

/// Reads a little-endian u64 at `at` (the caller checked the length).
fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Checks that a body has exactly the size its message requires.
pub fn expect_len(request: u32, body: &[u8], len: usize) -> Result<(), ProtocolError> {
    if body.len() != len {
        return Err(ProtocolError::BodySize { request: name(request), got: body.len(), want: len });
    }
    Ok(())
}

/// A u64 body (features, fd-carrying vring messages, counts).
pub fn u64_body(request: u32, body: &[u8]) -> Result<u64, ProtocolError> {
    expect_len(request, body, 8)?;
    Ok(le64(body, 0))
}

/// The body of SET_VRING_NUM/BASE/ENABLE and GET_VRING_BASE: a queue index and a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VringState {
    /// Queue index.
    pub index: u32,
    /// The number (size, base or enable flag).
    pub num: u32,
}

impl VringState {
    /// Decodes the 8-byte body.
    pub fn parse(request: u32, body: &[u8]) -> Result<VringState, ProtocolError> {
        expect_len(request, body, 8)?;
        Ok(VringState { index: le32(body, 0), num: le32(body, 4) })
    }

    /// Encodes the reply body.
    pub fn bytes(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0..4].copy_from_slice(&self.index.to_le_bytes());
        b[4..8].copy_from_slice(&self.num.to_le_bytes());
        b
    }
}

/// The body of SET_VRING_ADDR: ring addresses in the frontend's virtual address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VringAddr {
    /// Queue index.
    pub index: u32,
    /// Flags (only the log flag exists).
    pub flags: u32,
    /// Descriptor table.
    pub desc: u64,
    /// Used ring.
    pub used: u64,
    /// Available ring.
    pub avail: u64,
    /// Guest-physical address of the used ring in the dirty log (with [`VRING_ADDR_F_LOG`]).
    pub log: u64,
}

impl VringAddr {
    /// Decodes the 40-byte body.
    pub fn parse(request: u32, body: &[u8]) -> Result<VringAddr, ProtocolError> {
        expect_len(request, body, 40)?;
        Ok(VringAddr {
            index: le32(body, 0),
            flags: le32(body, 4),
            desc: le64(body, 8),
            used: le64(body, 16),
            avail: le64(body, 24),
            log: le64(body, 32),
        })
    }
}

/// The body of SET_LOG_BASE: where the dirty log lies in the file passed with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogBase {
    /// Bytes of the log to map (one bit per 4 KiB page of guest-physical memory).
    pub size: u64,
    /// Offset of the log in its file.
    pub offset: u64,
}

impl LogBase {
    /// Decodes the 16-byte body.
    pub fn parse(request: u32, body: &[u8]) -> Result<LogBase, ProtocolError> {
        expect_len(request, body, 16)?;
        Ok(LogBase { size: le64(body, 0), offset: le64(body, 8) })
    }

    /// The body's bytes.
    pub fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..].copy_from_slice(&self.offset.to_le_bytes());
        b
    }
}

/// One memory region of SET_MEM_TABLE or ADD/REM_MEM_REG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Guest physical address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Frontend virtual address (ring addresses are given in this space).
    pub user_addr: u64,
    /// Offset of the region in its file.
    pub mmap_offset: u64,
}

/// Encoded size of one region.
pub const REGION_LEN: usize = 32;

impl Region {
    /// Decodes one 32-byte region.
    fn parse_at(b: &[u8], at: usize) -> Region {
        Region {
            guest_addr: le64(b, at),
            size: le64(b, at + 8),
            user_addr: le64(b, at + 16),
            mmap_offset: le64(b, at + 24),
        }
    }

    /// Decodes the body of ADD_MEM_REG / REM_MEM_REG (8 bytes of padding, then one region).
    pub fn parse_single(request: u32, body: &[u8]) -> Result<Region, ProtocolError> {
        expect_len(request, body, 8 + REGION_LEN)?;
        Ok(Region::parse_at(body, 8))
    }

    /// Decodes the body of SET_MEM_TABLE: a count, padding, then that many regions.
    pub fn parse_table(body: &[u8]) -> Result<Vec<Region>, ProtocolError> {
        if body.len() < 8 {
            return Err(ProtocolError::BodySize { request: "SET_MEM_TABLE", got: body.len(), want: 8 });
        }
        let n = le32(body, 0) as usize;
        if n == 0 || n > MAX_TABLE_REGIONS {
            return Err(ProtocolError::RegionCount(n));
        }
        expect_len(code::SET_MEM_TABLE, body, 8 + n * REGION_LEN)?;
        Ok((0..n).map(|i| Region::parse_at(body, 8 + i * REGION_LEN)).collect())
    }
}

/// The fixed part of GET_CONFIG / SET_CONFIG: offset, size, flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigHeader {
    /// Offset into the config space.
    pub offset: u32,
    /// Bytes.
    pub size: u32,
    /// Flags (writable / live migration), passed back unchanged.
    pub flags: u32,
}

/// Length of the fixed part of a config message.
pub const CONFIG_HEADER_LEN: usize = 12;

impl ConfigHeader {
    /// Decodes a config message body; the payload must be exactly `size` bytes.
    pub fn parse(request: u32, body: &[u8]) -> Result<(ConfigHeader, &[u8]), ProtocolError> {
        if body.len() < CONFIG_HEADER_LEN {
            return Err(ProtocolError::BodySize { request: name(request), got: body.len(), want: CONFIG_HEADER_LEN });
        }
        let h = ConfigHeader { offset: le32(body, 0), size: le32(body, 4), flags: le32(body, 8) };
        let payload = &body[CONFIG_HEADER_LEN..];
        if payload.len() != h.size as usize {
            return Err(ProtocolError::BodySize {
                request: name(request),
                got: body.len(),
                want: CONFIG_HEADER_LEN + h.size as usize,
            });
        }
        if h.flags > 1 {
            return Err(ProtocolError::Flags(h.flags));
        }
        Ok((h, payload))
    }

    /// Encodes the fixed part of a reply.
    pub fn bytes(&self) -> [u8; CONFIG_HEADER_LEN] {
        let mut b = [0u8; CONFIG_HEADER_LEN];
        b[0..4].copy_from_slice(&self.offset.to_le_bytes());
        b[4..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
}

/// The body of SET_VRING_KICK / CALL / ERR: a queue index and whether a descriptor comes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VringFd {
    /// Queue index.
    pub index: u32,
    /// The frontend says no descriptor is attached (polling, or no notifications).
    pub nofd: bool,
}

impl VringFd {
    /// Decodes the u64 body: the index in the low byte, the no-descriptor bit, nothing else.
    pub fn parse(request: u32, body: &[u8]) -> Result<VringFd, ProtocolError> {
        let value = u64_body(request, body)?;
        if value & !(0xff | VRING_NOFD) != 0 {
            return Err(ProtocolError::Flags(value as u32));
        }
        Ok(VringFd { index: (value & 0xff) as u32, nofd: value & VRING_NOFD != 0 })
    }
}

/// A frontend request with its body decoded and size-checked. Descriptors, feature
/// negotiation and the session's state are the session's to check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// GET_FEATURES.
    GetFeatures,
    /// SET_FEATURES: the feature bits the driver accepts.
    SetFeatures(u64),
    /// SET_OWNER.
    SetOwner,
    /// RESET_OWNER.
    ResetOwner,
    /// GET_PROTOCOL_FEATURES.
    GetProtocolFeatures,
    /// SET_PROTOCOL_FEATURES: the protocol feature bits the frontend accepts.
    SetProtocolFeatures(u64),
    /// GET_QUEUE_NUM.
    GetQueueNum,
    /// GET_MAX_MEM_SLOTS.
    GetMaxMemSlots,
    /// SET_MEM_TABLE: one to eight regions.
    SetMemTable(Vec<Region>),
    /// ADD_MEM_REG.
    AddMemReg(Region),
    /// REM_MEM_REG.
    RemMemReg(Region),
    /// SET_VRING_NUM.
    SetVringNum(VringState),
    /// SET_VRING_ADDR.
    SetVringAddr(VringAddr),
    /// SET_VRING_BASE.
    SetVringBase(VringState),
    /// GET_VRING_BASE.
    GetVringBase(VringState),
    /// SET_VRING_KICK.
    SetVringKick(VringFd),
    /// SET_VRING_CALL.
    SetVringCall(VringFd),
    /// SET_VRING_ERR.
    SetVringErr(VringFd),
    /// SET_VRING_ENABLE.
    SetVringEnable(VringState),
    /// GET_CONFIG (its payload, which only sizes the request, is not kept).
    GetConfig(ConfigHeader),
    /// SET_CONFIG with the bytes to write.
    SetConfig(ConfigHeader, &'a [u8]),
    /// GET_INFLIGHT_FD.
    GetInflightFd(InflightInfo),
    /// SET_INFLIGHT_FD.
    SetInflightFd(InflightInfo),
    /// SET_LOG_BASE.
    SetLogBase(LogBase),
}

/// Decodes the body of `request` by the rules of its message; a request we do not serve is
/// refused here. The one entry point from received bytes to a typed request.
pub fn decode(request: u32, body: &[u8]) -> Result<Decoded<'_>, ProtocolError> {
    let empty = |d: Decoded<'static>| expect_len(request, body, 0).map(|()| d);
    Ok(match request {
        code::GET_FEATURES => empty(Decoded::GetFeatures)?,
        code::SET_FEATURES => Decoded::SetFeatures(u64_body(request, body)?),
        code::SET_OWNER => empty(Decoded::SetOwner)?,
        code::RESET_OWNER => empty(Decoded::ResetOwner)?,
        code::GET_PROTOCOL_FEATURES => empty(Decoded::GetProtocolFeatures)?,
        code::SET_PROTOCOL_FEATURES => Decoded::SetProtocolFeatures(u64_body(request, body)?),
        code::GET_QUEUE_NUM => empty(Decoded::GetQueueNum)?,
        code::GET_MAX_MEM_SLOTS => empty(Decoded::GetMaxMemSlots)?,
        code::SET_MEM_TABLE => Decoded::SetMemTable(Region::parse_table(body)?),
        code::ADD_MEM_REG => Decoded::AddMemReg(Region::parse_single(request, body)?),
        code::REM_MEM_REG => Decoded::RemMemReg(Region::parse_single(request, body)?),
        code::SET_VRING_NUM => Decoded::SetVringNum(VringState::parse(request, body)?),
        code::SET_VRING_ADDR => Decoded::SetVringAddr(VringAddr::parse(request, body)?),
        code::SET_VRING_BASE => Decoded::SetVringBase(VringState::parse(request, body)?),
        code::GET_VRING_BASE => Decoded::GetVringBase(VringState::parse(request, body)?),
        code::SET_VRING_KICK => Decoded::SetVringKick(VringFd::parse(request, body)?),
        code::SET_VRING_CALL => Decoded::SetVringCall(VringFd::parse(request, body)?),
        code::SET_VRING_ERR => Decoded::SetVringErr(VringFd::parse(request, body)?),
        code::SET_VRING_ENABLE => Decoded::SetVringEnable(VringState::parse(request, body)?),
        code::GET_CONFIG => Decoded::GetConfig(ConfigHeader::parse(request, body)?.0),
        code::SET_CONFIG => {
            let (c, payload) = ConfigHeader::parse(request, body)?;
            Decoded::SetConfig(c, payload)
        }
        code::GET_INFLIGHT_FD => Decoded::GetInflightFd(InflightInfo::parse(body)?),
        code::SET_INFLIGHT_FD => Decoded::SetInflightFd(InflightInfo::parse(body)?),
        code::SET_LOG_BASE => Decoded::SetLogBase(LogBase::parse(request, body)?),
        other => return Err(ProtocolError::Unsupported(name(other), other)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(request: u32, flags: u32, size: u32) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&request.to_le_bytes());
        b[4..8].copy_from_slice(&flags.to_le_bytes());
        b[8..12].copy_from_slice(&size.to_le_bytes());
        b
    }

    #[test]
    fn headers_are_checked() {
        assert!(Header::parse(&header(1, 1, 0)).is_ok());
        assert!(Header::parse(&header(1, 1 | FLAG_NEED_REPLY, 8)).map(|h| h.need_reply()).unwrap_or(false));
        assert!(matches!(Header::parse(&header(1, 2, 0)), Err(ProtocolError::Version(2))));
        assert!(matches!(Header::parse(&header(1, 1 | FLAG_REPLY, 0)), Err(ProtocolError::Flags(_))));
        assert!(matches!(Header::parse(&header(1, 1 | 0x100, 0)), Err(ProtocolError::Flags(_))));
        assert!(matches!(Header::parse(&header(1, 1, 4097)), Err(ProtocolError::TooLarge(4097))));
    }

    #[test]
    fn mem_tables_are_bounded() {
        let mut body = vec![0u8; 8 + 9 * REGION_LEN];
        body[0] = 9;
        assert!(matches!(Region::parse_table(&body), Err(ProtocolError::RegionCount(9))));
        let mut body = vec![0u8; 8 + 2 * REGION_LEN];
        body[0] = 1;
        assert!(matches!(Region::parse_table(&body), Err(ProtocolError::BodySize { .. })));
        body[0] = 2;
        body[8 + 32 + 8] = 1;
        let t = Region::parse_table(&body).unwrap_or_default();
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].size, 1);
    }

    #[test]
    fn config_payload_must_match_its_size() {
        let mut body = vec![0u8; CONFIG_HEADER_LEN + 4];
        body[4] = 4;
        assert!(ConfigHeader::parse(code::GET_CONFIG, &body).is_ok());
        body[4] = 5;
        assert!(ConfigHeader::parse(code::GET_CONFIG, &body).is_err());
    }

    #[test]
    fn decode_checks_each_body_by_its_request() {
        assert_eq!(decode(code::GET_FEATURES, &[]).ok(), Some(Decoded::GetFeatures));
        assert!(matches!(decode(code::GET_FEATURES, &[0]), Err(ProtocolError::BodySize { .. })));
        assert_eq!(decode(code::SET_FEATURES, &7u64.to_le_bytes()).ok(), Some(Decoded::SetFeatures(7)));
        assert_eq!(
            decode(code::SET_VRING_KICK, &(VRING_NOFD | 3).to_le_bytes()).ok(),
            Some(Decoded::SetVringKick(VringFd { index: 3, nofd: true }))
        );
        assert!(matches!(decode(code::SET_VRING_CALL, &0x200u64.to_le_bytes()), Err(ProtocolError::Flags(0x200))));
        let mut cfg = vec![0u8; CONFIG_HEADER_LEN + 2];
        cfg[4] = 2;
        cfg[CONFIG_HEADER_LEN] = 9;
        assert!(matches!(decode(code::SET_CONFIG, &cfg), Ok(Decoded::SetConfig(_, [9, 0]))));
        assert!(matches!(decode(code::GET_INFLIGHT_FD, &[0; 24]), Ok(Decoded::GetInflightFd(_))));
        assert!(matches!(decode(code::SET_LOG_BASE, &[0; 8]), Err(ProtocolError::BodySize { .. })));
        assert_eq!(decode(code::SET_LOG_BASE, &LogBase { size: 4096, offset: 8 }.bytes()).ok(),
            Some(Decoded::SetLogBase(LogBase { size: 4096, offset: 8 })));
        assert!(matches!(decode(code::SET_LOG_FD, &[0; 8]), Err(ProtocolError::Unsupported("SET_LOG_FD", 7))));
        assert!(matches!(decode(99, &[]), Err(ProtocolError::Unsupported("unknown", 99))));
    }
}

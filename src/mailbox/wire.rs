//! vdsm storage-mailbox wire format, byte for byte (thin-provisioning-spec.md §1).

use std::fmt;

/// Bytes in one message.
pub const MESSAGE_LEN: usize = 64;
/// Bytes in one host's block (in both mailbox volumes).
pub const BLOCK_LEN: usize = 4096;
/// Usable message slots per host block.
pub const SLOTS: usize = 63;
/// Where a host block's checksum lives.
pub const CHECKSUM_OFFSET: usize = 4092;
/// Hosts the SPM reads (ids 1..MAX_HOST_ID-1 usable; 0 is the event block).
pub const MAX_HOST_ID: u16 = 250;
/// Bytes the SPM reads per poll.
pub const SPM_REGION_LEN: usize = BLOCK_LEN * MAX_HOST_ID as usize;
/// The "clean" marker of the slot handshake.
pub const CLEAN: [u8; MESSAGE_LEN] = [1; MESSAGE_LEN];
/// Message version byte.
const VERSION: u8 = b'1';
/// The extend opcode.
const XTND: &[u8; 4] = b"xtnd";
/// Bytes compared to match a reply with its request (version, opcode, both UUIDs).
pub const HEADER_LEN: usize = 37;
/// The event block's tag.
const EVENT_TAG: [u8; 4] = [0x00, b'e', b'v', b't'];

/// Errors decoding or building mailbox data.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// A UUID that is not 32 hex digits in the canonical 8-4-4-4-12 form.
    #[error("invalid UUID '{0}'")]
    BadUuid(String),
    /// A message whose version byte is not '1'.
    #[error("unsupported message version {0:#04x}")]
    BadVersion(u8),
    /// A message with an opcode we do not handle.
    #[error("unknown opcode {0:?}")]
    UnknownOpcode([u8; 4]),
    /// A size field that is not 16 hex digits, or out of range.
    #[error("invalid size field {0:?}")]
    BadSize(String),
    /// A host id outside 1..MAX_HOST_ID.
    #[error("host id {0} not in 1..{MAX_HOST_ID}")]
    BadHostId(u16),
    /// A slot outside 0..63.
    #[error("slot {0} not in 0..{SLOTS}")]
    BadSlot(usize),
}

/// A UUID, held in its canonical byte order (the order of the hex text).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// Parses the canonical text form (`8adbc85e-e554-4ae0-b318-8a5465fe5fe1`).
    pub fn parse(s: &str) -> Result<Uuid, WireError> {
        let bad = || WireError::BadUuid(s.to_string());
        let b = s.as_bytes();
        if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
            return Err(bad());
        }
        let hex: Vec<u8> = b.iter().copied().filter(|&c| c != b'-').collect();
        if hex.len() != 32 {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            let s = std::str::from_utf8(pair).map_err(|_| bad())?;
            out[i] = u8::from_str_radix(s, 16).map_err(|_| bad())?;
        }
        Ok(Uuid(out))
    }

    /// The 16 wire bytes: the 128-bit value little-endian (canonical bytes reversed).
    pub fn pack(&self) -> [u8; 16] {
        let mut p = self.0;
        p.reverse();
        p
    }

    /// The inverse of [`Uuid::pack`].
    pub fn unpack(wire: &[u8; 16]) -> Uuid {
        let mut b = *wire;
        b.reverse();
        Uuid(b)
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An extend request (or its reply: same bytes, size 0 on failure).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extend {
    /// Storage domain (the LVM volume group).
    pub domain: Uuid,
    /// Volume (the logical volume).
    pub volume: Uuid,
    /// Requested size in MiB (0 in a failure reply).
    pub size_mib: u64,
}

impl Extend {
    /// Encodes the 64-byte message.
    pub fn encode(&self) -> Result<[u8; MESSAGE_LEN], WireError> {
        if self.size_mib > 0xffff_ffff {
            return Err(WireError::BadSize(format!("{} MiB", self.size_mib)));
        }
        let mut m = [b'0'; MESSAGE_LEN];
        m[0] = VERSION;
        m[1..5].copy_from_slice(XTND);
        m[5..21].copy_from_slice(&self.domain.pack());
        m[21..37].copy_from_slice(&self.volume.pack());
        m[37..53].copy_from_slice(format!("{:016x}", self.size_mib).as_bytes());
        Ok(m)
    }

    /// Decodes a 64-byte message.
    pub fn decode(m: &[u8; MESSAGE_LEN]) -> Result<Extend, WireError> {
        if m[0] != VERSION {
            return Err(WireError::BadVersion(m[0]));
        }
        let mut op = [0u8; 4];
        op.copy_from_slice(&m[1..5]);
        if &op != XTND {
            return Err(WireError::UnknownOpcode(op));
        }
        let mut d = [0u8; 16];
        d.copy_from_slice(&m[5..21]);
        let mut v = [0u8; 16];
        v.copy_from_slice(&m[21..37]);
        let field = &m[37..53];
        let text = std::str::from_utf8(field).map_err(|_| WireError::BadSize(format!("{field:?}")))?;
        let size_mib = u64::from_str_radix(text, 16).map_err(|_| WireError::BadSize(text.to_string()))?;
        if size_mib > 0xffff_ffff {
            return Err(WireError::BadSize(text.to_string()));
        }
        Ok(Extend { domain: Uuid::unpack(&d), volume: Uuid::unpack(&v), size_mib })
    }
}

/// The global message id of `slot` in host `host`'s block.
pub fn msg_id(host: u16, slot: usize) -> Result<u64, WireError> {
    if host == 0 || host >= MAX_HOST_ID {
        return Err(WireError::BadHostId(host));
    }
    if slot >= SLOTS {
        return Err(WireError::BadSlot(slot));
    }
    Ok(u64::from(host) * 64 + slot as u64)
}

/// Byte offset of a message in either mailbox volume.
pub fn msg_offset(host: u16, slot: usize) -> Result<u64, WireError> {
    Ok(msg_id(host, slot)? * MESSAGE_LEN as u64)
}

/// Byte offset of a host's block.
pub fn block_offset(host: u16) -> u64 {
    u64::from(host) * BLOCK_LEN as u64
}

/// The checksum of a host block: the unsigned sum of bytes 0..4092, as 32 bits.
pub fn checksum(block: &[u8; BLOCK_LEN]) -> u32 {
    block[..CHECKSUM_OFFSET].iter().fold(0u32, |acc, &b| acc.wrapping_add(u32::from(b)))
}

/// Stores the checksum (little-endian) in bytes 4092..4096.
pub fn seal(block: &mut [u8; BLOCK_LEN]) {
    let c = checksum(block).to_le_bytes();
    block[CHECKSUM_OFFSET..].copy_from_slice(&c);
}

/// Whether a block's stored checksum matches its contents (and the contents are not all
/// zero: the SPM treats such a block as empty).
pub fn verify(block: &[u8; BLOCK_LEN]) -> bool {
    let mut stored = [0u8; 4];
    stored.copy_from_slice(&block[CHECKSUM_OFFSET..]);
    let sum = checksum(block);
    sum != 0 && u32::from_le_bytes(stored) == sum
}

/// The 64 bytes of `slot` in a block.
pub fn slot(block: &[u8; BLOCK_LEN], slot: usize) -> Option<[u8; MESSAGE_LEN]> {
    let s = block.get(slot * MESSAGE_LEN..(slot + 1) * MESSAGE_LEN).filter(|_| slot < SLOTS)?;
    let mut m = [0u8; MESSAGE_LEN];
    m.copy_from_slice(s);
    Some(m)
}

/// Writes `msg` into `slot` of a block.
pub fn put_slot(block: &mut [u8; BLOCK_LEN], slot: usize, msg: &[u8; MESSAGE_LEN]) -> Result<(), WireError> {
    if slot >= SLOTS {
        return Err(WireError::BadSlot(slot));
    }
    block[slot * MESSAGE_LEN..(slot + 1) * MESSAGE_LEN].copy_from_slice(msg);
    Ok(())
}

/// The doorbell block written at offset 0 of the SPM's inbox after each request write.
pub fn event_block(nonce: [u8; 16]) -> [u8; BLOCK_LEN] {
    let mut b = [0u8; BLOCK_LEN];
    b[..4].copy_from_slice(&EVENT_TAG);
    b[4..20].copy_from_slice(&nonce);
    b
}

/// The nonce of an event block, if `b` is one.
pub fn event_nonce(b: &[u8]) -> Option<[u8; 16]> {
    if b.len() < 20 || b[..4] != EVENT_TAG {
        return None;
    }
    let mut n = [0u8; 16];
    n.copy_from_slice(&b[4..20]);
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace().map(|h| u8::from_str_radix(h, 16).unwrap()).collect()
    }

    const DOMAIN: &str = "8adbc85e-e554-4ae0-b318-8a5465fe5fe1";
    const VOLUME: &str = "d772f1c6-3ebb-43c3-a42e-73fcd8255a5f";

    fn request(mib: u64) -> [u8; MESSAGE_LEN] {
        Extend { domain: Uuid::parse(DOMAIN).unwrap(), volume: Uuid::parse(VOLUME).unwrap(), size_mib: mib }
            .encode()
            .unwrap()
    }

    fn block_with(msg: &[u8; MESSAGE_LEN]) -> [u8; BLOCK_LEN] {
        let mut b = [0u8; BLOCK_LEN];
        put_slot(&mut b, 0, msg).unwrap();
        seal(&mut b);
        b
    }

    #[test]
    fn uuid_packing_is_full_reversal() {
        let u = Uuid::parse(DOMAIN).unwrap();
        assert_eq!(u.pack().to_vec(), hex("e1 5f fe 65 54 8a 18 b3 e0 4a 54 e5 5e c8 db 8a"));
        assert_eq!(Uuid::unpack(&u.pack()), u);
        assert_eq!(u.to_string(), DOMAIN);
        for bad in ["", "8adbc85e-e554-4ae0-b318-8a5465fe5fe", "8adbc85e_e554-4ae0-b318-8a5465fe5fe1", "zadbc85e-e554-4ae0-b318-8a5465fe5fe1"] {
            assert!(Uuid::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn spec_1_16_request_bytes_and_checksums() {
        let m = request(5120);
        let mut want = hex("31 78 74 6e 64 e1 5f fe 65 54 8a 18 b3 e0 4a 54 e5 5e c8 db 8a");
        want.extend(hex("5f 5a 25 d8 fc 73 2e a4 c3 43 bb 3e c6 f1 72 d7"));
        want.extend(hex("30 30 30 30 30 30 30 30 30 30 30 30 31 34 30 30"));
        want.extend([0x30u8; 11]);
        assert_eq!(m.to_vec(), want);
        let b = block_with(&m);
        assert_eq!(checksum(&b), 6452);
        assert_eq!(b[4092..], [0x34, 0x19, 0x00, 0x00]);
        assert_eq!(checksum(&block_with(&request(2048))), 6455);
        assert_eq!(block_with(&request(2048))[4092..], [0x37, 0x19, 0, 0]);
        assert_eq!(checksum(&block_with(&request(0))), 6447);
        assert_eq!(block_with(&request(0))[4092..], [0x2f, 0x19, 0, 0]);
        let zero = [0u8; BLOCK_LEN];
        assert_eq!(checksum(&zero), 0);
        assert!(!verify(&zero));
        let mut clean = [0u8; BLOCK_LEN];
        for s in 0..SLOTS {
            put_slot(&mut clean, s, &CLEAN).unwrap();
        }
        seal(&mut clean);
        assert_eq!(clean[4092..], [0xc0, 0x0f, 0, 0]);
        let mut ff = [0xffu8; BLOCK_LEN];
        seal(&mut ff);
        assert_eq!(ff[4092..], [0x04, 0xec, 0x0f, 0x00]);
        assert!(verify(&b));
        let mut tampered = b;
        tampered[40] ^= 1;
        assert!(!verify(&tampered));
    }

    #[test]
    fn decode_roundtrip_and_errors() {
        let m = request(0x1400);
        let e = Extend::decode(&m).unwrap();
        assert_eq!(e.size_mib, 5120);
        assert_eq!(e.domain.to_string(), DOMAIN);
        assert_eq!(e.volume.to_string(), VOLUME);
        let mut bad = m;
        bad[0] = b'2';
        assert_eq!(Extend::decode(&bad), Err(WireError::BadVersion(b'2')));
        let mut bad = m;
        bad[1..5].copy_from_slice(b"rply");
        assert!(matches!(Extend::decode(&bad), Err(WireError::UnknownOpcode(_))));
        let mut bad = m;
        bad[40] = b'g';
        assert!(matches!(Extend::decode(&bad), Err(WireError::BadSize(_))));
        // Upper-case hex is accepted (the SPM parses case-insensitively).
        let mut upper = request(0xabc);
        upper[37..53].copy_from_slice(b"0000000000000ABC");
        assert_eq!(Extend::decode(&upper).unwrap().size_mib, 0xabc);
        // Too large for the 32-bit MiB field.
        let mut big = m;
        big[37..53].copy_from_slice(b"0000000100000000");
        assert!(matches!(Extend::decode(&big), Err(WireError::BadSize(_))));
        assert!(Extend { size_mib: 0x1_0000_0000, ..e }.encode().is_err());
        // Garbage never panics.
        for seed in 0..2000u32 {
            let mut g = [0u8; MESSAGE_LEN];
            for (i, b) in g.iter_mut().enumerate() {
                *b = (seed.wrapping_mul(2654435761).wrapping_add(i as u32 * 40503) >> 7) as u8;
            }
            let _ = Extend::decode(&g);
        }
    }

    #[test]
    fn addressing() {
        assert_eq!(msg_id(7, 0), Ok(448));
        assert_eq!(msg_offset(7, 0), Ok(28_672));
        assert_eq!(msg_id(3, 12), Ok(204));
        assert_eq!(msg_offset(3, 12), Ok(13_056));
        assert_eq!(block_offset(3), 12_288);
        assert_eq!(SPM_REGION_LEN, 1_024_000);
        assert_eq!(msg_id(0, 0), Err(WireError::BadHostId(0)));
        assert_eq!(msg_id(250, 0), Err(WireError::BadHostId(250)));
        assert_eq!(msg_id(1, 63), Err(WireError::BadSlot(63)));
    }

    #[test]
    fn event_block_layout() {
        let n = [7u8; 16];
        let b = event_block(n);
        assert_eq!(b[..4], [0x00, 0x65, 0x76, 0x74]);
        assert_eq!(event_nonce(&b), Some(n));
        assert!(b[20..].iter().all(|&x| x == 0));
        assert_eq!(event_nonce(&request(1)), None);
    }
}

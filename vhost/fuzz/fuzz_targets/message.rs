//! Fuzzes the vhost-user message decoder: the input is a stream of messages (12-byte header,
//! then its body) framed as the wire does it, each header checked by `Header::parse` and each
//! body decoded by `message::decode`, which is what the session dispatches on. Any bytes must
//! give a typed request or a typed refusal, never a panic; what decodes must re-encode to the
//! bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thinblk_vhost::protocol::message::{
    decode, name, Decoded, Header, Region, VringFd, HEADER_LEN, MAX_BODY, MAX_TABLE_REGIONS, REGION_LEN, VRING_NOFD,
};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while rest.len() >= HEADER_LEN {
        let mut hb = [0u8; HEADER_LEN];
        hb.copy_from_slice(&rest[..HEADER_LEN]);
        rest = &rest[HEADER_LEN..];
        // A bad header ends the connection (read_message fails): so it ends the stream here.
        let Ok(h) = Header::parse(&hb) else { return };
        assert!(h.size as usize <= MAX_BODY);
        let reply = h.reply(8);
        assert_eq!(reply[0..4], hb[0..4]);
        // A body cut short is the end of the connection too.
        let Some(body) = rest.get(..h.size as usize) else { return };
        rest = &rest[h.size as usize..];
        // A refused body does not end the session (it is acknowledged as a failure).
        let Ok(d) = decode(h.request, body) else { continue };
        assert_ne!(name(h.request), "unknown");
        check(&d, body);
    }
});

/// What decoded says no more and no less than the body.
fn check(d: &Decoded<'_>, body: &[u8]) {
    match d {
        Decoded::GetFeatures
        | Decoded::SetOwner
        | Decoded::ResetOwner
        | Decoded::GetProtocolFeatures
        | Decoded::GetQueueNum
        | Decoded::GetMaxMemSlots => assert!(body.is_empty()),
        Decoded::SetFeatures(f) | Decoded::SetProtocolFeatures(f) => assert_eq!(body, f.to_le_bytes()),
        Decoded::SetMemTable(regions) => {
            assert!((1..=MAX_TABLE_REGIONS).contains(&regions.len()));
            assert_eq!(body.len(), 8 + regions.len() * REGION_LEN);
            assert_eq!(u32::from_le_bytes([body[0], body[1], body[2], body[3]]) as usize, regions.len());
            for (i, r) in regions.iter().enumerate() {
                assert_eq!(&body[8 + i * REGION_LEN..8 + (i + 1) * REGION_LEN], region_bytes(r));
            }
        }
        Decoded::AddMemReg(r) | Decoded::RemMemReg(r) => {
            assert_eq!(body.len(), 8 + REGION_LEN);
            assert_eq!(&body[8..], region_bytes(r));
        }
        Decoded::SetVringNum(s) | Decoded::SetVringBase(s) | Decoded::GetVringBase(s) | Decoded::SetVringEnable(s) => {
            assert_eq!(body, s.bytes());
        }
        Decoded::SetVringAddr(a) => {
            let mut b = Vec::with_capacity(40);
            b.extend_from_slice(&a.index.to_le_bytes());
            b.extend_from_slice(&a.flags.to_le_bytes());
            for x in [a.desc, a.used, a.avail, a.log] {
                b.extend_from_slice(&x.to_le_bytes());
            }
            assert_eq!(body, b);
        }
        Decoded::SetVringKick(f) | Decoded::SetVringCall(f) | Decoded::SetVringErr(f) => {
            let VringFd { index, nofd } = *f;
            assert!(index <= 0xff);
            let value = u64::from(index) | if nofd { VRING_NOFD } else { 0 };
            assert_eq!(body, value.to_le_bytes());
        }
        Decoded::GetConfig(c) => {
            assert!(c.flags <= 1);
            assert_eq!(body.len(), 12 + c.size as usize);
            assert_eq!(body[..12], c.bytes());
        }
        Decoded::SetConfig(c, payload) => {
            assert!(c.flags <= 1);
            assert_eq!(payload.len(), c.size as usize);
            assert_eq!(body[..12], c.bytes());
            assert_eq!(&body[12..], *payload);
        }
        Decoded::GetInflightFd(i) | Decoded::SetInflightFd(i) => {
            // The last 4 bytes are padding.
            assert_eq!(body.len(), 24);
            assert_eq!(body[..20], i.bytes()[..20]);
        }
        Decoded::SetLogBase(l) => assert_eq!(body, l.bytes()),
    }
}

fn region_bytes(r: &Region) -> Vec<u8> {
    [r.guest_addr, r.size, r.user_addr, r.mmap_offset].iter().flat_map(|x| x.to_le_bytes()).collect()
}

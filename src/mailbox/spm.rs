//! The SPM side of the mailbox (spec §1.12), as logic over the request region and the
//! reply image: which requests are new, what to write back. The responder drives it.

use super::wire::{put_slot, slot, verify, Extend, WireError, BLOCK_LEN, CLEAN, MAX_HOST_ID, MESSAGE_LEN, SLOTS, SPM_REGION_LEN};

/// What one scan of the request region found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// New extend requests: (msg_id, request).
    pub requests: Vec<(u64, Extend)>,
    /// Clean markers were mirrored: rewrite the whole reply region.
    pub rewrite_all: bool,
    /// Host blocks skipped for a bad checksum (they look new again next time).
    pub bad_checksum: Vec<u16>,
    /// Slots with a message we do not understand: (msg_id, why).
    pub ignored: Vec<(u64, WireError)>,
}

/// The SPM's mailbox state.
pub struct Spm {
    baseline: Vec<u8>,
    replies: Vec<u8>,
}

impl Default for Spm {
    fn default() -> Self {
        Spm::new()
    }
}

impl Spm {
    /// A fresh SPM: baseline and reply image all zeroes (the caller zeroes the reply
    /// region on storage, so every request already present is new).
    pub fn new() -> Spm {
        Spm { baseline: vec![0; SPM_REGION_LEN], replies: vec![0; SPM_REGION_LEN] }
    }

    /// The whole reply image (for a full rewrite).
    pub fn reply_region(&self) -> &[u8] {
        &self.replies
    }

    /// Scans a freshly read request region (`SPM_REGION_LEN` bytes; shorter reads are
    /// scanned as far as they go).
    pub fn scan(&mut self, region: &[u8]) -> Scan {
        let mut out = Scan::default();
        for host in 1..MAX_HOST_ID {
            let start = host as usize * BLOCK_LEN;
            let Some(raw) = region.get(start..start + BLOCK_LEN) else { break };
            let mut block = [0u8; BLOCK_LEN];
            block.copy_from_slice(raw);
            let any = (0..SLOTS).any(|i| block[i * MESSAGE_LEN] != 0);
            if !any {
                self.baseline[start..start + BLOCK_LEN].copy_from_slice(&block);
                continue;
            }
            if !verify(&block) {
                out.bad_checksum.push(host);
                continue;
            }
            for i in 0..SLOTS {
                let Some(now) = slot(&block, i) else { continue };
                if now[0] == 0 {
                    continue;
                }
                let msg_id = u64::from(host) * 64 + i as u64;
                let off = start + i * MESSAGE_LEN;
                if now == CLEAN {
                    if self.replies[off..off + MESSAGE_LEN] != CLEAN {
                        self.replies[off..off + MESSAGE_LEN].copy_from_slice(&CLEAN);
                        out.rewrite_all = true;
                    }
                    continue;
                }
                if self.baseline[off..off + MESSAGE_LEN] == now {
                    continue;
                }
                match Extend::decode(&now) {
                    Ok(req) => out.requests.push((msg_id, req)),
                    Err(e) => out.ignored.push((msg_id, e)),
                }
            }
            self.baseline[start..start + BLOCK_LEN].copy_from_slice(&block);
        }
        out
    }

    /// Records the reply to `msg_id` (the requested size on success, 0 on failure) and
    /// returns the host block to write: (byte offset, block).
    pub fn reply(&mut self, msg_id: u64, req: &Extend, ok: bool) -> Result<(u64, [u8; BLOCK_LEN]), WireError> {
        let reply = Extend { size_mib: if ok { req.size_mib } else { 0 }, ..*req };
        let msg = reply.encode()?;
        let host = (msg_id / 64) as usize;
        let i = (msg_id % 64) as usize;
        let start = host * BLOCK_LEN;
        let mut block = [0u8; BLOCK_LEN];
        block.copy_from_slice(self.replies.get(start..start + BLOCK_LEN).ok_or(WireError::BadHostId(host as u16))?);
        put_slot(&mut block, i, &msg)?;
        self.replies[start..start + BLOCK_LEN].copy_from_slice(&block);
        Ok((start as u64, block))
    }
}

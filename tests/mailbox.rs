//! The mailbox client and the SPM logic together, over in-memory mailbox volumes.

use std::cell::RefCell;
use std::io;
use std::rc::Rc;

use thinblk::mailbox::client::{Client, MailboxIo, Submitted};
use thinblk::mailbox::spm::Spm;
use thinblk::mailbox::wire::{event_nonce, put_slot, seal, slot, Extend, Uuid, BLOCK_LEN, CLEAN, MESSAGE_LEN, SPM_REGION_LEN};

/// The two shared volumes: the SPM's inbox (requests) and outbox (replies).
struct Volumes {
    inbox: Vec<u8>,
    outbox: Vec<u8>,
    locked: bool,
}

struct HostIo {
    host: u16,
    v: Rc<RefCell<Volumes>>,
}

impl MailboxIo for HostIo {
    fn read_replies(&mut self) -> io::Result<[u8; BLOCK_LEN]> {
        let v = self.v.borrow();
        let o = self.host as usize * BLOCK_LEN;
        let mut b = [0u8; BLOCK_LEN];
        b.copy_from_slice(&v.outbox[o..o + BLOCK_LEN]);
        Ok(b)
    }
    fn read_requests(&mut self) -> io::Result<[u8; BLOCK_LEN]> {
        let v = self.v.borrow();
        let o = self.host as usize * BLOCK_LEN;
        let mut b = [0u8; BLOCK_LEN];
        b.copy_from_slice(&v.inbox[o..o + BLOCK_LEN]);
        Ok(b)
    }
    fn lock(&mut self) -> io::Result<()> {
        let mut v = self.v.borrow_mut();
        assert!(!v.locked, "host lock taken twice");
        v.locked = true;
        Ok(())
    }
    fn unlock(&mut self) {
        self.v.borrow_mut().locked = false;
    }
    fn write_requests(&mut self, block: &[u8; BLOCK_LEN]) -> io::Result<()> {
        assert!(self.v.borrow().locked, "request block written without the host lock");
        let o = self.host as usize * BLOCK_LEN;
        self.v.borrow_mut().inbox[o..o + BLOCK_LEN].copy_from_slice(block);
        Ok(())
    }
    fn write_event(&mut self, block: &[u8; BLOCK_LEN]) -> io::Result<()> {
        self.v.borrow_mut().inbox[..BLOCK_LEN].copy_from_slice(block);
        Ok(())
    }
}

fn volumes() -> Rc<RefCell<Volumes>> {
    Rc::new(RefCell::new(Volumes { inbox: vec![0; SPM_REGION_LEN], outbox: vec![0; SPM_REGION_LEN], locked: false }))
}

/// One SPM poll: answers every new request (`ok` decides success), mirrors clean markers.
fn spm_poll(spm: &mut Spm, v: &Rc<RefCell<Volumes>>, ok: bool) -> usize {
    let scan = spm.scan(&v.borrow().inbox);
    let n = scan.requests.len();
    for (id, req) in scan.requests {
        let (off, block) = spm.reply(id, &req, ok).unwrap();
        v.borrow_mut().outbox[off as usize..off as usize + BLOCK_LEN].copy_from_slice(&block);
    }
    if scan.rewrite_all {
        let region = spm.reply_region().to_vec();
        v.borrow_mut().outbox.copy_from_slice(&region);
    }
    n
}

fn req(mib: u64) -> Extend {
    Extend {
        domain: Uuid::parse("8adbc85e-e554-4ae0-b318-8a5465fe5fe1").unwrap(),
        volume: Uuid::parse("d772f1c6-3ebb-43c3-a42e-73fcd8255a5f").unwrap(),
        size_mib: mib,
    }
}

fn client() -> Client {
    client_for(req(0).volume)
}

fn client_for(volume: Uuid) -> Client {
    let mut n = 0u8;
    Client::new(volume, Box::new(move || {
        n = n.wrapping_add(1);
        [n; 16]
    }))
}

fn inbox_slot(v: &Rc<RefCell<Volumes>>, host: u16, i: usize) -> [u8; MESSAGE_LEN] {
    let o = host as usize * BLOCK_LEN + i * MESSAGE_LEN;
    let mut m = [0u8; MESSAGE_LEN];
    m.copy_from_slice(&v.borrow().inbox[o..o + MESSAGE_LEN]);
    m
}

fn outbox_slot(v: &Rc<RefCell<Volumes>>, host: u16, i: usize) -> [u8; MESSAGE_LEN] {
    let o = host as usize * BLOCK_LEN + i * MESSAGE_LEN;
    let mut m = [0u8; MESSAGE_LEN];
    m.copy_from_slice(&v.borrow().outbox[o..o + MESSAGE_LEN]);
    m
}

#[test]
fn three_step_slot_handshake() {
    let v = volumes();
    let mut io = HostIo { host: 7, v: v.clone() };
    let mut c = client();
    let mut spm = Spm::new();
    c.start(&mut io).unwrap();
    assert_eq!(c.submit(req(5120)), Ok(Submitted::Queued));
    // 1: request in slot 0 of our block, with the doorbell rung.
    assert!(c.poll(&mut io).unwrap().is_empty());
    assert_eq!(inbox_slot(&v, 7, 0), req(5120).encode().unwrap());
    let first_nonce = event_nonce(&v.borrow().inbox[..BLOCK_LEN]);
    assert!(first_nonce.is_some());
    // 2: the SPM replies at the same msg_id.
    assert_eq!(spm_poll(&mut spm, &v, true), 1);
    assert_eq!(outbox_slot(&v, 7, 0), req(5120).encode().unwrap());
    // 3: the client completes and acks with the clean marker.
    let done = c.poll(&mut io).unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].reply_mib, 5120);
    assert_eq!(inbox_slot(&v, 7, 0), CLEAN);
    assert_ne!(event_nonce(&v.borrow().inbox[..BLOCK_LEN]), first_nonce);
    // 4: the SPM mirrors the marker.
    assert_eq!(spm_poll(&mut spm, &v, true), 0);
    assert_eq!(outbox_slot(&v, 7, 0), CLEAN);
    // 5: the client frees the slot and zeroes it.
    assert!(c.poll(&mut io).unwrap().is_empty());
    assert_eq!(inbox_slot(&v, 7, 0), [0; MESSAGE_LEN]);
    assert_eq!(c.active(), 0);
    // Nothing more happens: no duplicate completion.
    assert_eq!(spm_poll(&mut spm, &v, true), 0);
    assert!(c.poll(&mut io).unwrap().is_empty());
    // The slot is reusable for the same request again.
    c.submit(req(5120)).unwrap();
    c.poll(&mut io).unwrap();
    assert_eq!(spm_poll(&mut spm, &v, true), 1);
    assert_eq!(c.poll(&mut io).unwrap().len(), 1);
}

#[test]
fn duplicates_fold_and_the_64th_request_waits() {
    let v = volumes();
    let mut io = HostIo { host: 3, v: v.clone() };
    let mut c = client();
    let mut spm = Spm::new();
    c.start(&mut io).unwrap();
    assert_eq!(c.submit(req(100)), Ok(Submitted::Queued));
    assert_eq!(c.submit(req(100)), Ok(Submitted::Folded));
    c.poll(&mut io).unwrap();
    assert_eq!(c.submit(req(100)), Ok(Submitted::Folded), "identical to an outstanding slot");
    for mib in 101..164 {
        c.submit(req(mib)).unwrap();
    }
    c.poll(&mut io).unwrap();
    assert_eq!(c.active(), 63);
    assert_eq!(c.queued(), 1);
    // Each full round frees slots; the 64th request then gets one.
    assert_eq!(spm_poll(&mut spm, &v, true), 63);
    assert_eq!(c.poll(&mut io).unwrap().len(), 63);
    spm_poll(&mut spm, &v, true);
    c.poll(&mut io).unwrap();
    assert_eq!(c.queued(), 0);
    assert_eq!(c.active(), 1);
    assert_eq!(spm_poll(&mut spm, &v, true), 1);
    let done = c.poll(&mut io).unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].request.size_mib, 163);
}

#[test]
fn stale_replies_from_an_earlier_run_are_not_acted_upon() {
    let v = volumes();
    // An earlier incarnation left a reply in slot 0.
    let stale = req(5120).encode().unwrap();
    v.borrow_mut().outbox[7 * BLOCK_LEN..7 * BLOCK_LEN + MESSAGE_LEN].copy_from_slice(&stale);
    let mut io = HostIo { host: 7, v: v.clone() };
    let mut c = client();
    c.start(&mut io).unwrap();
    // The same request again must not complete from the stale reply, and must not sit in
    // the slot whose reply would be byte-identical.
    c.submit(req(5120)).unwrap();
    assert!(c.poll(&mut io).unwrap().is_empty());
    assert_eq!(inbox_slot(&v, 7, 0), [0; MESSAGE_LEN]);
    assert_eq!(inbox_slot(&v, 7, 1), stale);
    let mut spm = Spm::new();
    assert_eq!(spm_poll(&mut spm, &v, true), 1);
    assert_eq!(c.poll(&mut io).unwrap().len(), 1);
}

#[test]
fn bad_checksum_blocks_are_skipped_until_rewritten() {
    let v = volumes();
    let mut io = HostIo { host: 5, v: v.clone() };
    let mut c = client();
    c.start(&mut io).unwrap();
    c.submit(req(42)).unwrap();
    c.poll(&mut io).unwrap();
    v.borrow_mut().inbox[5 * BLOCK_LEN + 4092] ^= 0xff;
    let mut spm = Spm::new();
    let scan = spm.scan(&v.borrow().inbox);
    assert_eq!(scan.bad_checksum, vec![5]);
    assert!(scan.requests.is_empty());
    // Repaired (the client rewrites its block on its next change): seen as new.
    v.borrow_mut().inbox[5 * BLOCK_LEN + 4092] ^= 0xff;
    assert_eq!(spm.scan(&v.borrow().inbox).requests.len(), 1);
}

#[test]
fn requests_survive_spm_failover_and_failures_still_complete() {
    let v = volumes();
    let mut io = HostIo { host: 9, v: v.clone() };
    let mut c = client();
    c.start(&mut io).unwrap();
    c.submit(req(7680)).unwrap();
    c.poll(&mut io).unwrap();
    // The first SPM dies without answering; a new one zeroes the replies and starts over.
    let mut spm = Spm::new();
    v.borrow_mut().outbox.fill(0);
    assert_eq!(spm_poll(&mut spm, &v, false), 1);
    let done = c.poll(&mut io).unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].reply_mib, 0, "failure reply carries size 0");
}

#[test]
fn mismatched_reply_is_acked_but_not_completed() {
    let v = volumes();
    let mut io = HostIo { host: 2, v: v.clone() };
    let mut c = client();
    c.start(&mut io).unwrap();
    c.submit(req(1)).unwrap();
    c.poll(&mut io).unwrap();
    let mut other = req(1);
    other.volume = Uuid::parse("00000000-0000-0000-0000-000000000001").unwrap();
    v.borrow_mut().outbox[2 * BLOCK_LEN..2 * BLOCK_LEN + MESSAGE_LEN].copy_from_slice(&other.encode().unwrap());
    assert!(c.poll(&mut io).unwrap().is_empty());
    assert_eq!(inbox_slot(&v, 2, 0), CLEAN);
}

#[test]
fn spm_ignores_garbage_and_the_event_block() {
    let mut spm = Spm::new();
    let mut region = vec![0u8; SPM_REGION_LEN];
    // Event block at host 0: never mail.
    region[..4].copy_from_slice(&[0, b'e', b'v', b't']);
    region[4..20].fill(0xab);
    // Host 4: a valid block holding an unknown opcode.
    let mut b = [0u8; BLOCK_LEN];
    let mut m = req(1).encode().unwrap();
    m[1..5].copy_from_slice(b"zzzz");
    put_slot(&mut b, 3, &m).unwrap();
    seal(&mut b);
    region[4 * BLOCK_LEN..5 * BLOCK_LEN].copy_from_slice(&b);
    // Host 6: random garbage.
    for (i, x) in region[6 * BLOCK_LEN..7 * BLOCK_LEN].iter_mut().enumerate() {
        *x = (i * 37 % 251) as u8;
    }
    let scan = spm.scan(&region);
    assert!(scan.requests.is_empty());
    assert_eq!(scan.ignored.len(), 1);
    assert_eq!(scan.ignored[0].0, 4 * 64 + 3);
    assert_eq!(scan.bad_checksum, vec![6]);
    let _ = slot(&b, 3);
}

#[test]
fn processes_sharing_a_host_block_keep_to_their_own_slots() {
    let v = volumes();
    let vol_a = req(0).volume;
    let vol_b = Uuid::parse("11111111-2222-3333-4444-555555555555").unwrap();
    let mut io_a = HostIo { host: 7, v: v.clone() };
    let mut io_b = HostIo { host: 7, v: v.clone() };
    let mut a = client_for(vol_a);
    let mut b = client_for(vol_b);
    a.start(&mut io_a).unwrap();
    b.start(&mut io_b).unwrap();
    a.submit(req(100)).unwrap();
    a.poll(&mut io_a).unwrap();
    b.submit(Extend { volume: vol_b, ..req(200) }).unwrap();
    b.poll(&mut io_b).unwrap();
    // Distinct slots, both in the one block.
    assert_eq!(Extend::decode(&inbox_slot(&v, 7, 0)).unwrap().volume, vol_a);
    assert_eq!(Extend::decode(&inbox_slot(&v, 7, 1)).unwrap().volume, vol_b);
    let mut spm = Spm::new();
    assert_eq!(spm_poll(&mut spm, &v, true), 2);
    // Each completes its own request only, and acks only its own slot.
    let da = a.poll(&mut io_a).unwrap();
    assert_eq!(da.len(), 1);
    assert_eq!(da[0].request.size_mib, 100);
    assert_eq!(inbox_slot(&v, 7, 0), CLEAN);
    assert_eq!(Extend::decode(&inbox_slot(&v, 7, 1)).unwrap().volume, vol_b, "a touched b's slot");
    let db = b.poll(&mut io_b).unwrap();
    assert_eq!(db.len(), 1);
    assert_eq!(db[0].request.size_mib, 200);
    // A restart of b clears b's stale request only (a's slot untouched).
    b.submit(Extend { volume: vol_b, ..req(300) }).unwrap();
    spm_poll(&mut spm, &v, true);
    a.poll(&mut io_a).unwrap();
    b.poll(&mut io_b).unwrap();
    a.submit(req(400)).unwrap();
    a.poll(&mut io_a).unwrap();
    let mut b2 = client_for(vol_b);
    b2.start(&mut io_b).unwrap();
    let held: Vec<Uuid> = (0..63)
        .filter_map(|i| Extend::decode(&inbox_slot(&v, 7, i)).ok().map(|e| e.volume))
        .collect();
    assert!(held.contains(&vol_a), "a's request was cleared by b's restart");
    assert!(!held.contains(&vol_b), "b's stale request survived its restart");
}

//! A verifying vhost-user-blk client (libblkio), for the LVM VM test (tests/lvm_vm.rs).
//!
//! `vu_client write SOCKET MIB [PROGRESS]` writes MiB blocks 0..MIB in order, four in flight,
//! each sector stamped with its number, then flushes. After every completion it records in PROGRESS how
//! many leading blocks are acknowledged (a backup taken later must hold at least those).
//! `vu_client verify SOCKET MIB` reads blocks 0..MIB back and checks the patterns.
//! MIB may also be a range `FIRST..END` (blocks FIRST to END-1; PROGRESS then counts from 0,
//! as if blocks 0..FIRST were acknowledged).
//! Both print one summary line (MiB/s, longest request) and exit non-zero on any error.
use std::error::Error;
use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};

const BLOCK: usize = 1 << 20;
const DEPTH: usize = 4;
/// How long one request may take before the client gives up (parked writes wait for the SPM).
const PATIENCE: Duration = Duration::from_secs(300);

type Res<T> = Result<T, Box<dyn Error>>;

/// One random MiB shared by every block; each 512-byte sector then starts with its own number.
fn base() -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut v = Vec::with_capacity(BLOCK);
    while v.len() < BLOCK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

/// Block `index`'s pattern: the base with each sector's first 8 bytes its disk sector number.
fn fill(buf: &mut [u8], base: &[u8], index: u64) {
    buf.copy_from_slice(base);
    for (s, sector) in buf.chunks_exact_mut(512).enumerate() {
        sector[..8].copy_from_slice(&(index * 2048 + s as u64).to_le_bytes());
    }
}

/// Where block `index`'s pattern first differs from `buf` (a sector's byte offset), if it does.
fn mismatch(buf: &[u8], base: &[u8], index: u64) -> Option<usize> {
    buf.chunks_exact(512).zip(base.chunks_exact(512)).enumerate().find_map(|(s, (got, want))| {
        let head_ok = got[..8] == (index * 2048 + s as u64).to_le_bytes();
        (!head_ok || got[8..] != want[8..]).then_some(s * 512)
    })
}

fn main() {
    if let Err(e) = run() {
        eprintln!("vu_client: FAIL {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let (mode, socket, first, mib) = match args.as_slice() {
        [_, m, s, n, ..] => {
            let (first, end) = match n.split_once("..") {
                Some((a, b)) => (a.parse::<u64>()?, b.parse::<u64>()?),
                None => (0, n.parse::<u64>()?),
            };
            if first >= end {
                return Err(format!("empty range {n}").into());
            }
            (m.as_str(), s.as_str(), first, end)
        }
        _ => return Err("usage: vu_client write|verify SOCKET MIB|FIRST..END [PROGRESS]".into()),
    };
    let progress = args.get(4).cloned();
    let mut b = Blkio::new("virtio-blk-vhost-user")?;
    b.set_str("path", socket)?;
    b.set_bool("read-only", mode == "verify")?;
    b.connect()?;
    b.set_i32("num-queues", 1)?;
    let mut outcome = b.start()?;
    let region = b.alloc_mem_region(BLOCK * DEPTH)?;
    b.map_mem_region(&region)?;
    let capacity = b.get_u64("capacity")?;
    if mib * BLOCK as u64 > capacity {
        return Err(format!("{mib} MiB do not fit in {capacity} bytes").into());
    }
    let q = outcome.queues.first_mut().ok_or("no queue")?;
    // SAFETY: the region is BLOCK * DEPTH bytes, mapped for this client and used only here.
    let mem = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, BLOCK * DEPTH) };
    let write = mode == "write";
    let base = base();
    let start = Instant::now();
    let mut next = first; // next block to submit
    let mut slot_block = [u64::MAX; DEPTH];
    let mut slot_started = [start; DEPTH];
    let mut done = vec![false; mib as usize];
    let mut acked = first; // leading blocks acknowledged (those below `first` count as such)
    let mut longest = Duration::ZERO;
    let mut in_flight = 0usize;
    while acked < mib {
        for slot in 0..DEPTH {
            if slot_block[slot] != u64::MAX || next >= mib {
                continue;
            }
            let buf = &mut mem[slot * BLOCK..(slot + 1) * BLOCK];
            let off = next * BLOCK as u64;
            if write {
                fill(buf, &base, next);
                q.write(off, buf.as_ptr(), BLOCK, slot, ReqFlags::empty());
            } else {
                q.read(off, buf.as_mut_ptr(), BLOCK, slot, ReqFlags::empty());
            }
            slot_block[slot] = next;
            slot_started[slot] = Instant::now();
            next += 1;
            in_flight += 1;
        }
        let mut comps = [const { MaybeUninit::<Completion>::uninit() }; DEPTH];
        let mut timeout = PATIENCE;
        let n = q.do_io(&mut comps, 1, Some(&mut timeout), None)?;
        if n == 0 {
            return Err(format!("no completion within {PATIENCE:?} ({in_flight} in flight)").into());
        }
        for c in comps.iter().take(n) {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            let block = *slot_block.get(slot).ok_or("unknown completion")?;
            if c.ret != 0 {
                return Err(format!("block {block}: request failed ({})", c.ret).into());
            }
            longest = longest.max(slot_started[slot].elapsed());
            if !write {
                if let Some(at) = mismatch(&mem[slot * BLOCK..(slot + 1) * BLOCK], &base, block) {
                    return Err(format!("block {block}: data differs at byte {at}").into());
                }
            }
            done[block as usize] = true;
            slot_block[slot] = u64::MAX;
            in_flight -= 1;
        }
        let before = acked;
        while acked < mib && done[acked as usize] {
            acked += 1;
        }
        if let (Some(p), true) = (&progress, acked != before) {
            let tmp = format!("{p}.tmp");
            std::fs::write(&tmp, format!("{acked}\n"))?;
            std::fs::rename(&tmp, p)?;
        }
    }
    if write {
        q.flush(0, ReqFlags::empty());
        let mut comps = [const { MaybeUninit::<Completion>::uninit() }; 1];
        let mut timeout = PATIENCE;
        if q.do_io(&mut comps, 1, Some(&mut timeout), None)? != 1 {
            return Err("flush did not complete".into());
        }
        // SAFETY: do_io returned one completion.
        if unsafe { comps[0].assume_init_ref() }.ret != 0 {
            return Err("flush failed".into());
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "vu_client: {mode} {} MiB ok in {secs:.1} s ({:.1} MiB/s), longest request {} ms{}",
        mib - first,
        (mib - first) as f64 / secs.max(1e-9),
        longest.as_millis(),
        if first > 0 { format!(" (blocks {first}..{mib})") } else { String::new() }
    );
    Ok(())
}

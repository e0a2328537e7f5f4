//! What the guest changed while an active commit copies the top into its base: a bitmap of
//! guest chunks, marked when a write *ends* (its ticket comes back), cleared by the copier
//! just before it reads a chunk. A write that lands after the copier read its chunk marks it
//! again, so the chunk is copied again: nothing the guest wrote is missed, whatever the
//! interleaving. Marking when the write is mapped would not do: a write mapped before the
//! clear but landing after the read would leave the chunk clean with stale data in the base.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Guest chunks changed since the copier last took them.
pub struct Dirty {
    gran: u64,
    size: u64,
    bits: Mutex<Vec<u64>>,
    count: AtomicU64,
    /// Where the copier's next search starts (a rotating cursor: a hot chunk cannot starve
    /// the others).
    cursor: AtomicU64,
}

impl Dirty {
    /// A clean map of a disk of `size` bytes in chunks of `gran` bytes (a power of two).
    pub fn new(size: u64, gran: u64) -> Dirty {
        let chunks = size.div_ceil(gran);
        Dirty { gran, size, bits: Mutex::new(vec![0; chunks.div_ceil(64) as usize]), count: AtomicU64::new(0), cursor: AtomicU64::new(0) }
    }

    /// The chunk size.
    pub fn granularity(&self) -> u64 {
        self.gran
    }

    /// Marks the chunks `[off, off+len)` touches.
    pub fn mark(&self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (first, last) = (off / self.gran, (off + len - 1).min(self.size.saturating_sub(1)) / self.gran);
        let Ok(mut bits) = self.bits.lock() else { return };
        for c in first..=last {
            let (w, b) = ((c / 64) as usize, c % 64);
            if let Some(word) = bits.get_mut(w) {
                if *word & (1 << b) == 0 {
                    *word |= 1 << b;
                    self.count.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }

    /// Chunks marked now.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Bytes marked now (the last chunk counted whole).
    pub fn bytes(&self) -> u64 {
        self.count() * self.gran
    }

    /// Clears and returns the next run of marked chunks, at most `max` bytes (at least one
    /// chunk), as a guest range cut to the disk's size.
    pub fn take(&self, max: u64) -> Option<(u64, u64)> {
        if self.count() == 0 {
            return None;
        }
        let mut bits = self.bits.lock().ok()?;
        let chunks = self.size.div_ceil(self.gran);
        let start = self.cursor.load(Ordering::Relaxed) % chunks.max(1);
        let is_set = |bits: &Vec<u64>, c: u64| bits.get((c / 64) as usize).is_some_and(|w| w & (1 << (c % 64)) != 0);
        let found = (start..chunks).chain(0..start).find(|&c| is_set(&bits, c))?;
        let most = (max / self.gran).max(1);
        let mut end = found;
        while end < chunks && end - found < most && is_set(&bits, end) {
            if let Some(w) = bits.get_mut((end / 64) as usize) {
                *w &= !(1 << (end % 64));
            }
            self.count.fetch_sub(1, Ordering::SeqCst);
            end += 1;
        }
        self.cursor.store(end, Ordering::Relaxed);
        let off = found * self.gran;
        Some((off, (end * self.gran).min(self.size) - off))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_taken_in_runs_and_a_mark_after_a_take_comes_back() {
        let d = Dirty::new(10 << 16, 1 << 16);
        d.mark(5, 1);
        d.mark((3 << 16) + 100, 2 << 16);
        d.mark(9 << 16, 1 << 20);
        assert_eq!(d.count(), 5, "chunks 0, 3, 4, 5 and 9");
        assert_eq!(d.take(1 << 20), Some((0, 1 << 16)));
        assert_eq!(d.take(2 << 16), Some((3 << 16, 2 << 16)), "a run, cut at max");
        d.mark(0, 1);
        assert_eq!(d.take(1 << 20), Some((5 << 16, 1 << 16)), "the cursor goes on first");
        assert_eq!(d.take(1 << 20), Some((9 << 16, 1 << 16)), "cut to the disk");
        assert_eq!(d.take(1 << 20), Some((0, 1 << 16)), "marked again after its take");
        assert_eq!((d.take(1 << 20), d.count()), (None, 0));
    }
}

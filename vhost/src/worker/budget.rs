//! The per-queue budget: every request in the daemon's hands (popped, resubmitted after a
//! restart, at the storage, parked, held by a freeze, waiting for a bounce chunk, a FLUSH
//! joined to another) holds one unit from the moment it is taken from the ring until its used
//! element is published (or it is dropped with the connection). The budget is the ring's
//! size and is checked *before* popping: when it is spent, chains stay in the available ring
//! (back-pressure) until a completion returns a unit.
//!
//! A driver can never have more heads outstanding than its ring has descriptors, and never
//! the same head twice. One that does (a head still in our hands published again, or the
//! available index more than the ring's size ahead of the used index) breaks the ring's
//! rules: the queue is marked broken (QEMU's `virtio_error`, libvhost-user's `vu_panic`:
//! DEVICE_NEEDS_RESET in spirit) and pops nothing more until the frontend stops the ring.
//! Requests already in hand still complete. See docs/decisions.md.
//!
//! Proof: `engine_tests.rs` `a_spent_budget_leaves_chains_in_the_ring_until_a_completion_returns_a_unit`,
//! `a_head_in_hand_published_again_breaks_the_ring_until_it_is_reset`,
//! `more_heads_outstanding_than_the_ring_has_break_it`, `a_head_past_the_ring_breaks_it_and_stays_in_the_ring`,
//! `resubmissions_after_a_restart_count_against_the_budget`; `tests/hostile.rs`
//! `a_head_republished_during_a_freeze_keeps_memory_bounded`.

use super::*;

/// Words of the head bitmap: one bit for each of the 65536 possible heads (8 KiB).
const HEAD_WORDS: usize = 1 << 10;

/// Broken-ring reports are logged at most once per this interval (the rest are counted).
const LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Requests in the worker's hands, by head.
pub(super) struct Budget {
    /// One bit per head in hand.
    heads: Box<[u64]>,
    /// Heads in hand (the bits set).
    held: usize,
    /// A lower limit than the ring's size (in-process tests only).
    cap: usize,
    /// When a broken ring was last logged.
    logged_at: Option<Instant>,
    /// Broken-ring events (breaks and kicks of a broken ring) not logged since then.
    unlogged: u64,
    /// Times a driver broke this queue's ring.
    breaks: u64,
}

impl Budget {
    /// An empty budget.
    pub(super) fn new() -> Budget {
        Budget { heads: vec![0u64; HEAD_WORDS].into_boxed_slice(), held: 0, cap: usize::MAX, logged_at: None, unlogged: 0, breaks: 0 }
    }

    /// Whether one more request may be taken from a ring of `ring_size` descriptors.
    pub(super) fn room(&self, ring_size: u16) -> bool {
        self.held < usize::from(ring_size).min(self.cap)
    }

    /// Whether `head` is in hand.
    pub(super) fn holds(&self, head: u16) -> bool {
        let h = usize::from(head);
        self.heads.get(h / 64).is_some_and(|w| w & (1 << (h % 64)) != 0)
    }

    /// Requests in hand.
    pub(super) fn held(&self) -> usize {
        self.held
    }

    /// Marks `head` in hand (the caller checked it was not).
    fn take(&mut self, head: u16) {
        let h = usize::from(head);
        if let Some(w) = self.heads.get_mut(h / 64) {
            if *w & (1 << (h % 64)) == 0 {
                *w |= 1 << (h % 64);
                self.held += 1;
            }
        }
    }

    /// Returns `head`'s unit.
    fn release(&mut self, head: u16) {
        let h = usize::from(head);
        if let Some(w) = self.heads.get_mut(h / 64) {
            if *w & (1 << (h % 64)) != 0 {
                *w &= !(1 << (h % 64));
                self.held = self.held.saturating_sub(1);
            }
        }
    }

    /// Lowers the limit below the ring's size (tests of back-pressure with a lawful driver).
    #[cfg(test)]
    pub(super) fn set_cap(&mut self, cap: usize) {
        self.cap = cap;
    }

    /// Times a driver broke the ring's rules on this queue.
    #[cfg(test)]
    pub(super) fn breaks(&self) -> u64 {
        self.breaks
    }

    /// Whether a broken-ring event may be logged now (rate limit); returns the events not
    /// logged since the last one.
    fn may_log(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.logged_at {
            Some(t) if now.saturating_duration_since(t) < LOG_INTERVAL => {
                self.unlogged += 1;
                None
            }
            _ => {
                self.logged_at = Some(now);
                Some(std::mem::take(&mut self.unlogged))
            }
        }
    }
}

/// How the driver broke the ring's rules.
#[derive(Clone, Copy, Debug)]
pub(super) enum Misbehaviour {
    /// A head still in our hands was published again.
    HeadInHand(u16),
    /// More heads published and not yet returned than the ring has descriptors.
    Overrun { outstanding: u16, size: u16 },
    /// A head with no descriptor of that index (≥ the ring's size) was published.
    HeadOutOfRange { head: u16, size: u16 },
    /// A request recovered from the inflight region whose chain cannot be built again.
    Unresubmittable(u16),
}

impl std::fmt::Display for Misbehaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Misbehaviour::HeadInHand(head) => write!(f, "head {head}, still in our hands, published again"),
            Misbehaviour::Overrun { outstanding, size } => {
                write!(f, "{outstanding} heads outstanding on a ring of {size}")
            }
            Misbehaviour::HeadOutOfRange { head, size } => write!(f, "head {head} published on a ring of {size}"),
            Misbehaviour::Unresubmittable(head) => {
                write!(f, "head {head}, in flight before the restart, has no chain to resubmit")
            }
        }
    }
}

impl Worker {
    /// Takes `head` into the budget and counts it in flight (under the vring lock, so
    /// `stop_vring` never misses it).
    pub(super) fn take(&mut self, head: u16) {
        self.budget.take(head);
        self.in_hand.add();
    }

    /// `head` left our hands (its used element is published, or it was dropped): its unit
    /// returns to the budget.
    pub(super) fn release(&mut self, head: u16) {
        self.budget.release(head);
        self.in_hand.done();
    }

    /// The driver broke the ring's rules: the ring is marked broken (nothing more is popped
    /// until the frontend stops it), the frontend's error eventfd is signalled, and it is
    /// logged (at most once per [`LOG_INTERVAL`]).
    pub(super) fn ring_broken(&mut self, state: &mut crate::vring::VringState, what: Misbehaviour) {
        state.mark_broken();
        self.budget.breaks += 1;
        if let Some(unlogged) = self.budget.may_log() {
            tracing::error!(queue = self.queue, what = %what, in_hand = self.budget.held(), breaks = self.budget.breaks, unlogged,
                "the driver broke the ring's rules: this queue takes no more requests until the frontend resets it");
        }
    }

    /// A kick of a ring already broken: counted, logged at most once per [`LOG_INTERVAL`].
    pub(super) fn kicked_while_broken(&mut self) {
        if let Some(unlogged) = self.budget.may_log() {
            tracing::warn!(queue = self.queue, in_hand = self.budget.held(), unlogged,
                "kick of a broken ring ignored: waiting for the frontend to reset it");
        }
    }
}

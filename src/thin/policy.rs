//! The thin-provisioning extension policy of `thin-provisioning-spec.md` §2, in integer math.
//!
//! Inputs are the qcow2 allocation mark (highest host byte used), the volume's physical size
//! and the disk's capacity; outputs are whether to extend, to what size, and the write
//! threshold to arm.

/// One MiB.
pub const MIB: u64 = 1 << 20;
/// LVM extent size on oVirt volume groups (storage-side rounding).
pub const EXTENT: u64 = 128 * MIB;

/// Errors in the policy's configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// Percent out of 0..=100.
    #[error("utilization percent {0} is not in 0..=100")]
    Percent(u64),
    /// Chunk of zero MiB.
    #[error("chunk size must be at least 1 MiB")]
    Chunk,
    /// A size that does not fit the mailbox's 32-bit MiB field.
    #[error("size {0} bytes does not fit the mailbox size field (max 0xffffffff MiB)")]
    TooLarge(u64),
}

/// `ceil(v / unit) * unit`, saturating.
pub fn ceil_to(v: u64, unit: u64) -> u64 {
    v.div_ceil(unit).saturating_mul(unit)
}

/// The VM-side cap of a volume: `ceil_MiB(capacity × 1.1)`.
pub fn max_size(capacity: u64) -> u64 {
    let scaled = u128::from(capacity) * 11;
    let mib = scaled.div_ceil(10 * u128::from(MIB));
    u64::try_from(mib * u128::from(MIB)).unwrap_or(u64::MAX)
}

/// The storage-side cap: `capacity × 1.1` rounded up to a 128 MiB extent.
pub fn storage_max_size(capacity: u64) -> u64 {
    let scaled = u128::from(capacity) * 11;
    let extents = scaled.div_ceil(10 * u128::from(EXTENT));
    u64::try_from(extents * u128::from(EXTENT)).unwrap_or(u64::MAX)
}

/// The size put in a mailbox message: bytes rounded up to whole MiB.
pub fn wire_mib(size: u64) -> Result<u64, PolicyError> {
    let mib = size.div_ceil(MIB);
    if mib > 0xffff_ffff {
        return Err(PolicyError::TooLarge(size));
    }
    Ok(mib)
}

/// The extension policy (`--utilization-percent`, `--chunk-mb`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    utilization_percent: u64,
    chunk_mb: u64,
    /// The disk is being copied to a thin replica: chunks double.
    pub replicating: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { utilization_percent: 20, chunk_mb: 2560, replicating: false }
    }
}

/// What a drive with no armed threshold should do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Enough free space: arm this write threshold.
    Arm(u64),
    /// Too little free space: extend to this size (bytes, whole MiB).
    Extend(u64),
    /// The volume is at its maximum size: nothing more to do.
    Disabled,
    /// The allocation is beyond what one more chunk could explain: stop, do not extend.
    Improbable,
}

impl Policy {
    /// A policy; `utilization_percent` in 0..=100, `chunk_mb` ≥ 1.
    pub fn new(utilization_percent: u64, chunk_mb: u64) -> Result<Policy, PolicyError> {
        if utilization_percent > 100 {
            return Err(PolicyError::Percent(utilization_percent));
        }
        if chunk_mb == 0 {
            return Err(PolicyError::Chunk);
        }
        Ok(Policy { utilization_percent, chunk_mb, replicating: false })
    }

    /// Bytes added by one extension.
    pub fn chunk(&self) -> u64 {
        let c = self.chunk_mb.saturating_mul(MIB);
        if self.replicating { c.saturating_mul(2) } else { c }
    }

    /// The minimum free space: `(100 - percent)% of a chunk`.
    pub fn limit(&self) -> u64 {
        let c = u128::from(self.chunk());
        u64::try_from(c * u128::from(100 - self.utilization_percent) / 100).unwrap_or(u64::MAX)
    }

    /// Whether the free space (`physical - allocation`) is below the limit.
    pub fn needs_extension(&self, physical: u64, allocation: u64) -> bool {
        match physical.checked_sub(allocation) {
            Some(free) => free < self.limit(),
            None => true,
        }
    }

    /// The write threshold to arm for a volume of `physical` bytes (never 0: 0 disables).
    pub fn threshold(&self, physical: u64) -> u64 {
        physical.saturating_sub(self.limit()).max(1)
    }

    /// The next volume size: one chunk more, in whole MiB, capped at [`max_size`].
    pub fn next_size(&self, physical: u64, capacity: u64) -> u64 {
        ceil_to(physical.saturating_add(self.chunk()), MIB).min(max_size(capacity))
    }

    /// Whether the volume may still grow.
    pub fn can_extend(&self, physical: u64, capacity: u64) -> bool {
        physical < max_size(capacity)
    }

    /// The decision for a drive with no threshold armed (state UNSET, spec §2.3, §2.7).
    pub fn evaluate(&self, physical: u64, allocation: u64, capacity: u64) -> Decision {
        let next = self.next_size(physical, capacity);
        if allocation > next {
            return Decision::Improbable;
        }
        if !self.needs_extension(physical, allocation) {
            return Decision::Arm(self.threshold(physical));
        }
        if !self.can_extend(physical, capacity) {
            return Decision::Disabled;
        }
        Decision::Extend(next)
    }
}

/// A one-shot write threshold (QEMU's `block-set-write-threshold` semantics), checked
/// inline on every move of the allocation mark, lock-free.
#[derive(Debug, Default)]
pub struct WriteThreshold {
    /// 0: disarmed.
    armed: std::sync::atomic::AtomicU64,
}

impl WriteThreshold {
    /// Arms at `threshold` bytes (0 disarms).
    pub fn arm(&self, threshold: u64) {
        self.armed.store(threshold, std::sync::atomic::Ordering::SeqCst);
    }

    /// The armed value, if any.
    pub fn armed(&self) -> Option<u64> {
        let t = self.armed.load(std::sync::atomic::Ordering::SeqCst);
        (t != 0).then_some(t)
    }

    /// A write ends at `end`: returns the amount exceeded and disarms if it crossed (exactly
    /// one caller sees each crossing).
    pub fn check(&self, end: u64) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let t = self.armed.load(Ordering::SeqCst);
        if t == 0 || end <= t {
            return None;
        }
        self.armed.compare_exchange(t, 0, Ordering::SeqCst, Ordering::SeqCst).ok().map(|_| end - t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn spec_section_5_limits_thresholds_and_next_sizes() {
        let legacy = Policy::new(50, 1024).unwrap();
        let cap = 100 * GIB;
        assert_eq!(legacy.limit(), 536_870_912);
        assert_eq!(legacy.threshold(GIB), 536_870_912);
        assert_eq!(legacy.next_size(GIB, cap), 2048 * MIB);
        assert_eq!(wire_mib(legacy.next_size(GIB, cap)), Ok(0x800));
        assert_eq!(legacy.threshold(2 * GIB), 1_610_612_736);
        assert_eq!(legacy.next_size(2 * GIB, cap), 3072 * MIB);
        assert_eq!(format!("{:016x}", wire_mib(3072 * MIB).unwrap()), "0000000000000c00");
        assert_eq!(legacy.threshold(3 * GIB), 2_684_354_560);
        assert_eq!(legacy.next_size(3 * GIB, cap), 4096 * MIB);

        let p = Policy::default();
        assert_eq!(p.limit(), 2_147_483_648);
        assert_eq!(p.threshold(2560 * MIB), 536_870_912);
        assert_eq!(p.next_size(2560 * MIB, cap), 5120 * MIB);
        assert_eq!(format!("{:016x}", wire_mib(5120 * MIB).unwrap()), "0000000000001400");
        assert_eq!(p.threshold(5 * GIB), 3_221_225_472);
        assert_eq!(p.next_size(5 * GIB, cap), 7680 * MIB);
        assert_eq!(format!("{:016x}", wire_mib(7680 * MIB).unwrap()), "0000000000001e00");
        let mut r = p;
        r.replicating = true;
        assert_eq!(r.limit(), 4_294_967_296);
        assert_eq!(r.threshold(5 * GIB), 1_073_741_824);
        assert_eq!(r.next_size(5 * GIB, cap), 10240 * MIB);
        assert_eq!(p.threshold(128 * MIB), 1);
        assert_eq!(p.next_size(128 * MIB, cap), 2688 * MIB);
    }

    #[test]
    fn spec_section_5_caps() {
        assert_eq!(max_size(GIB), 1_181_745_152);
        assert_eq!(storage_max_size(GIB), 1152 * MIB);
        assert_eq!(max_size(10 * GIB), 11_811_160_064);
        assert_eq!(storage_max_size(10 * GIB), 11264 * MIB);
        assert_eq!(max_size(22 * GIB), 25_984_761_856);
        assert_eq!(storage_max_size(22 * GIB), 24832 * MIB);
        assert_eq!(max_size(100 * GIB), 118_111_600_640);
        assert_eq!(storage_max_size(100 * GIB), 112640 * MIB);
        let p = Policy::default();
        assert_eq!(p.next_size(10 * GIB, 10 * GIB), 11264 * MIB);
        assert!(!p.can_extend(11 * GIB, 10 * GIB));
        assert_eq!(p.evaluate(11 * GIB, 11 * GIB - 1, 10 * GIB), Decision::Disabled);
    }

    #[test]
    fn boundaries() {
        let p = Policy::default();
        let phys = 5 * GIB;
        assert!(!p.needs_extension(phys, phys - p.limit()));
        assert!(p.needs_extension(phys, phys - p.limit() + 1));
        assert!(p.needs_extension(phys, phys + 1));
        assert_eq!(p.evaluate(phys, phys - p.limit(), 100 * GIB), Decision::Arm(3 * GIB));
        assert_eq!(p.evaluate(phys, phys - p.limit() + 1, 100 * GIB), Decision::Extend(7680 * MIB));
        // allocation > next_size: improbable, no request.
        assert_eq!(p.evaluate(phys, 7680 * MIB + 1, 100 * GIB), Decision::Improbable);
    }

    #[test]
    fn size_encoding() {
        assert_eq!(wire_mib(5 * GIB + 1), Ok(5121));
        assert_eq!(format!("{:016x}", wire_mib(5 * GIB + 1).unwrap()), "0000000000001401");
        assert_eq!(wire_mib(0xffff_ffff * MIB), Ok(0xffff_ffff));
        assert!(wire_mib(0x1_0000_0000 * MIB).is_err());
    }

    #[test]
    fn threshold_is_one_shot() {
        let t = WriteThreshold::default();
        t.arm(1000);
        assert_eq!(t.check(1000), None);
        assert_eq!(t.check(1001), Some(1));
        assert_eq!(t.check(5000), None);
        t.arm(0);
        assert_eq!(t.armed(), None);
    }

    #[test]
    fn validation() {
        assert_eq!(Policy::new(101, 1), Err(PolicyError::Percent(101)));
        assert_eq!(Policy::new(20, 0), Err(PolicyError::Chunk));
        assert_eq!(Policy::new(100, 1).unwrap().limit(), 0);
    }
}

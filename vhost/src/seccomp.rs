//! The queue threads' seccomp allow-list, in Firecracker's spirit: a queue thread touches
//! guest memory and storage, so it gets only the system calls that serving needs (ring
//! submission, epoll, metadata IO on already-open files, memory management, logging).
//!
//! Anything else fails with EPERM ([`SeccompMode::On`]) or kills the process
//! ([`SeccompMode::Strict`]); [`SeccompMode::Off`] installs nothing.

use std::collections::BTreeMap;
use std::sync::Arc;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// What a queue thread's disallowed system call does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    /// No filter.
    Off,
    /// Disallowed calls fail with EPERM (the request fails and is reported; logs say why).
    On,
    /// Disallowed calls kill the process.
    Strict,
}

/// The system calls a queue thread may make.
fn allowed() -> Vec<i64> {
    let mut v = vec![
        // Serving: kicks, completions, wake-ups; the io_uring.
        libc::SYS_epoll_pwait,
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_io_uring_enter,
        // Metadata IO of the image format on files opened before the threads start.
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_preadv2,
        libc::SYS_pwritev2,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_fallocate,
        // A file image grows as clusters are allocated.
        libc::SYS_ftruncate,
        libc::SYS_lseek,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_ioctl,
        libc::SYS_msync,
        // Memory: the allocator, guest mappings dropped here last, the SIGBUS guard.
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_close,
        // Threads, time, signals.
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_gettime,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_getrandom,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigaction,
        libc::SYS_sigaltstack,
        libc::SYS_tgkill,
        libc::SYS_shutdown,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend_from_slice(&[libc::SYS_epoll_wait, libc::SYS_poll]);
    v.sort_unstable();
    v.dedup();
    v
}

/// System calls refused with EPERM even under [`SeccompMode::Strict`]: glibc opens
/// `/proc/sys/vm/overcommit_memory` when a thread's malloc arena shrinks at thread exit, and
/// copes with the failure.
const REFUSED_GENTLY: [i64; 1] = [libc::SYS_openat];

/// The filters a queue thread installs, in order (seccomp stacks them: the strictest
/// verdict wins, so an EPERM filter over a kill filter turns those calls into EPERM).
pub type QueueFilter = Vec<BpfProgram>;

fn arch() -> Result<TargetArch, String> {
    if cfg!(target_arch = "x86_64") {
        Ok(TargetArch::x86_64)
    } else if cfg!(target_arch = "aarch64") {
        Ok(TargetArch::aarch64)
    } else {
        Err("seccomp filters are built for x86_64 and aarch64 only (use --seccomp off)".into())
    }
}

fn compile(calls: &[i64], on_match: SeccompAction, otherwise: SeccompAction) -> Result<BpfProgram, String> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = calls.iter().map(|&s| (s, Vec::new())).collect();
    let filter = SeccompFilter::new(rules, otherwise, on_match, arch()?).map_err(|e| e.to_string())?;
    BpfProgram::try_from(filter).map_err(|e| e.to_string())
}

/// Builds the filters for `mode` (None: off).
pub fn queue_filter(mode: SeccompMode) -> Result<Option<Arc<QueueFilter>>, String> {
    let eperm = SeccompAction::Errno(libc::EPERM as u32);
    let filters = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::On => vec![compile(&allowed(), SeccompAction::Allow, eperm)?],
        SeccompMode::Strict => {
            let mut calls = allowed();
            calls.extend_from_slice(&REFUSED_GENTLY);
            // The EPERM filter goes first: installing the kill filter after it needs prctl
            // and seccomp, which the kill filter itself would not allow.
            vec![
                compile(&REFUSED_GENTLY, eperm, SeccompAction::Allow)?,
                compile(&calls, SeccompAction::Allow, SeccompAction::KillProcess)?,
            ]
        }
    };
    Ok(Some(Arc::new(filters)))
}

/// Applies `filter` to the calling thread (and the threads it spawns).
pub fn apply(filter: &QueueFilter) -> Result<(), String> {
    for f in filter {
        seccompiler::apply_filter(f).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filtered_thread_cannot_open_files_but_can_serve() {
        let filter = queue_filter(SeccompMode::On).ok().flatten().expect("a filter");
        let r = std::thread::spawn(move || {
            apply(&filter).expect("apply");
            let open = std::fs::File::open("/dev/null").map_err(|e| e.raw_os_error());
            let alloc = vec![1u8; 1 << 22].iter().map(|&b| b as u64).sum::<u64>();
            (open.err(), alloc)
        })
        .join()
        .expect("thread");
        assert_eq!(r, (Some(Some(libc::EPERM)), 1 << 22));
        // Strict: opening is still refused gently (glibc does it at thread exit).
        let strict = queue_filter(SeccompMode::Strict).ok().flatten().expect("a filter");
        let r = std::thread::spawn(move || {
            apply(&strict).expect("apply");
            std::fs::File::open("/dev/null").map_err(|e| e.raw_os_error()).err()
        })
        .join()
        .expect("thread");
        assert_eq!(r, Some(Some(libc::EPERM)));
        // Other threads are not affected.
        assert!(std::fs::File::open("/dev/null").is_ok());
        assert!(queue_filter(SeccompMode::Off).ok().flatten().is_none());
    }
}

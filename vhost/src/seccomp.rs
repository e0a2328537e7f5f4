//! seccomp filters. The queue threads get an allow-list, in Firecracker's spirit: a queue
//! thread touches guest memory and storage, so it gets only the system calls that serving
//! needs (ring submission, epoll, metadata IO on already-open files, memory management,
//! logging). The protocol (main) thread, which parses every frontend message, does varied
//! work (memory tables, inflight regions, threads, the final flush), so it gets a deny-list
//! instead: nothing that runs programs, debugs processes, changes mounts, namespaces,
//! credentials, modules, the clock or the kernel ([`protocol_filter`]).
//!
//! Every other thread of the daemon (control socket, metrics, signals, thin-volume control,
//! timers) runs under [`process_filter`], installed before any thread starts and inherited by
//! all: the protocol deny-list without what running `lvchange` needs (programs may be run;
//! the programs inherit the filter too).
//!
//! Namespaces cannot be made by `clone` either: its namespace flags are refused like
//! `unshare`, and `clone3`, whose flags a filter cannot read (they are behind a pointer),
//! answers ENOSYS, so that the C library falls back to `clone` (for threads and for `posix_spawn`).
//!
//! A filtered call fails with EPERM ([`SeccompMode::On`]) or kills the process
//! ([`SeccompMode::Strict`]); [`SeccompMode::Off`] installs nothing.
//!
//! Proof: `a_filtered_thread_cannot_open_files_but_can_serve`,
//! `the_protocol_thread_cannot_run_programs_but_works_otherwise`, `strict_never_fails_open`,
//! `no_thread_makes_namespaces_and_clone3_falls_back` (below); `tests/hostile.rs` serves under
//! `--seccomp strict`.

use std::collections::BTreeMap;
use std::sync::Arc;

use seccompiler::{BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch};

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

/// The system calls the protocol thread (and the threads it starts) must never make: no
/// thread may ([`denied_to_all`]), and it may not run programs either.
fn denied_to_protocol() -> Vec<i64> {
    let mut v = denied_to_all();
    v.extend_from_slice(&[libc::SYS_execve, libc::SYS_execveat, libc::SYS_personality]);
    #[cfg(target_arch = "x86_64")]
    v.extend_from_slice(&[libc::SYS_fork, libc::SYS_vfork]);
    v.sort_unstable();
    v.dedup();
    v
}

/// The system calls no thread of the daemon makes (nor the programs it runs: `lvchange`).
fn denied_to_all() -> Vec<i64> {
    let mut v = vec![
        // Reading or writing other processes.
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        // Mounts, namespaces, root.
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_setns,
        libc::SYS_unshare,
        libc::SYS_open_tree,
        libc::SYS_move_mount,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_open_by_handle_at,
        // Credentials.
        libc::SYS_setuid,
        libc::SYS_setgid,
        libc::SYS_setreuid,
        libc::SYS_setregid,
        libc::SYS_setresuid,
        libc::SYS_setresgid,
        libc::SYS_setgroups,
        libc::SYS_capset,
        // The kernel: modules, kexec, BPF, perf, keys, userfaultfd, reboot, swap, accounting.
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_userfaultfd,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_acct,
        libc::SYS_quotactl,
        // The clock.
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend_from_slice(&[libc::SYS_iopl, libc::SYS_ioperm]);
    v.sort_unstable();
    v.dedup();
    v
}

/// The namespace flags `clone` must not carry (CLONE_NEWTIME is not among them: in `clone`'s
/// flags that bit belongs to the exit signal; it is only accepted by `clone3` and `unshare`).
const CLONE_NAMESPACES: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
];

/// `clone` with any namespace flag (its first argument on x86_64 and aarch64).
fn clone_into_namespaces() -> Result<(i64, Vec<SeccompRule>), String> {
    let rules = CLONE_NAMESPACES
        .iter()
        .map(|&flag| {
            let c = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(flag), flag).map_err(|e| e.to_string())?;
            SeccompRule::new(vec![c]).map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok((libc::SYS_clone, rules))
}

/// `clone3` answers ENOSYS (the C library then uses `clone`, whose flags the deny-lists read).
fn no_clone3() -> Result<BpfProgram, String> {
    compile(&[libc::SYS_clone3], &[], SeccompAction::Errno(libc::ENOSYS as u32), SeccompAction::Allow)
}

/// A deny-list program: `calls`, and `clone` into namespaces, get `verdict`.
fn deny(calls: &[i64], verdict: SeccompAction) -> Result<Vec<BpfProgram>, String> {
    Ok(vec![no_clone3()?, compile(calls, &[clone_into_namespaces()?], verdict, SeccompAction::Allow)?])
}

/// System calls refused with EPERM even under [`SeccompMode::Strict`]: glibc opens
/// `/proc/sys/vm/overcommit_memory` when a thread's malloc arena shrinks at thread exit, and
/// copes with the failure.
const REFUSED_GENTLY: [i64; 1] = [libc::SYS_openat];

/// System calls a queue thread may make with these arguments only.
///
/// `fcntl(fd, F_GETFD)`: Rust's standard library checks that a descriptor is open this way
/// before it closes it (debug builds), and a queue thread may close the last handle on a kick
/// or call eventfd the frontend has just replaced: it reads and signals them from handles of
/// its own, without the ring lock (vring.rs).
fn allowed_with_args() -> Result<Vec<(i64, Vec<SeccompRule>)>, String> {
    let getfd = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::F_GETFD as u64).map_err(|e| e.to_string())?;
    Ok(vec![(libc::SYS_fcntl, vec![SeccompRule::new(vec![getfd]).map_err(|e| e.to_string())?])])
}

/// The filters a thread installs, in order (seccomp stacks them: the strictest verdict
/// wins, so an EPERM filter over a kill filter turns those calls into EPERM).
#[derive(Debug)]
pub struct QueueFilter {
    programs: Vec<BpfProgram>,
    /// `--seccomp strict`: a thread whose filter cannot be installed must not serve.
    fail_closed: bool,
}

fn arch() -> Result<TargetArch, String> {
    if cfg!(target_arch = "x86_64") {
        Ok(TargetArch::x86_64)
    } else if cfg!(target_arch = "aarch64") {
        Ok(TargetArch::aarch64)
    } else {
        Err("seccomp filters are built for x86_64 and aarch64 only (use --seccomp off)".into())
    }
}

fn compile(calls: &[i64], with_args: &[(i64, Vec<SeccompRule>)], on_match: SeccompAction, otherwise: SeccompAction) -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = calls.iter().map(|&s| (s, Vec::new())).collect();
    rules.extend(with_args.iter().cloned());
    let filter = SeccompFilter::new(rules, otherwise, on_match, arch()?).map_err(|e| e.to_string())?;
    BpfProgram::try_from(filter).map_err(|e| e.to_string())
}

/// Builds the filters for `mode` (None: off).
pub fn queue_filter(mode: SeccompMode) -> Result<Option<Arc<QueueFilter>>, String> {
    let eperm = SeccompAction::Errno(libc::EPERM as u32);
    let programs = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::On => vec![compile(&allowed(), &allowed_with_args()?, SeccompAction::Allow, eperm)?],
        SeccompMode::Strict => {
            let mut calls = allowed();
            calls.extend_from_slice(&REFUSED_GENTLY);
            // The EPERM filter goes first: installing the kill filter after it needs prctl
            // and seccomp, which the kill filter itself would not allow.
            vec![
                compile(&REFUSED_GENTLY, &[], eperm, SeccompAction::Allow)?,
                compile(&calls, &allowed_with_args()?, SeccompAction::Allow, SeccompAction::KillProcess)?,
            ]
        }
    };
    Ok(Some(Arc::new(QueueFilter { programs, fail_closed: mode == SeccompMode::Strict })))
}

/// Builds the protocol thread's deny-list for `mode` (None: off). Install it on the thread
/// that serves frontends once the helper threads (thin control, metrics, control socket,
/// which run `lvchange` and friends) are started: threads it starts later inherit it.
pub fn protocol_filter(mode: SeccompMode) -> Result<Option<Arc<QueueFilter>>, String> {
    let verdict = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::On => SeccompAction::Errno(libc::EPERM as u32),
        SeccompMode::Strict => SeccompAction::KillProcess,
    };
    Ok(Some(Arc::new(QueueFilter { programs: deny(&denied_to_protocol(), verdict)?, fail_closed: mode == SeccompMode::Strict })))
}

/// Builds the filter every thread of the daemon runs under (None: off): install it before the
/// first thread starts, so that all inherit it. Programs (`lvchange`) may still be run.
pub fn process_filter(mode: SeccompMode) -> Result<Option<Arc<QueueFilter>>, String> {
    let verdict = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::On => SeccompAction::Errno(libc::EPERM as u32),
        SeccompMode::Strict => SeccompAction::KillProcess,
    };
    Ok(Some(Arc::new(QueueFilter { programs: deny(&denied_to_all(), verdict)?, fail_closed: mode == SeccompMode::Strict })))
}

/// Applies `filter` to the calling thread (and the threads it spawns).
pub fn apply(filter: &QueueFilter) -> Result<(), String> {
    for f in &filter.programs {
        seccompiler::apply_filter(f).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Applies `filter` to the calling thread (and the threads it spawns) without setting
/// no_new_privs where the process may (CAP_SYS_ADMIN): the programs it runs (`lvchange`) then
/// keep their set-id and security-module transitions (an SELinux domain change to lvm's
/// domain needs `nnp_transition` under no_new_privs). Without the capability: as [`apply`].
pub fn apply_keeping_privileges(filter: &QueueFilter) -> Result<(), String> {
    for (i, f) in filter.programs.iter().enumerate() {
        let len = u16::try_from(f.len()).map_err(|_| "seccomp program too long".to_string())?;
        // seccompiler's sock_filter has the kernel's layout (code, jt, jf, k), as libc's has.
        let prog = libc::sock_fprog { len, filter: f.as_ptr() as *mut libc::sock_filter };
        // SAFETY: `prog` points at `len` instructions that live until the call returns (the
        // kernel copies them); flags 0.
        let r = unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &prog as *const libc::sock_fprog) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if i == 0 && e.raw_os_error() == Some(libc::EACCES) {
                return apply(filter);
            }
            return Err(format!("installing a seccomp program: {e}"));
        }
    }
    Ok(())
}

/// Installs a queue thread's filter. Under `--seccomp on` a failure is logged and the thread
/// serves unfiltered; under `strict` it is an error: the thread must not serve (the caller
/// stops the daemon, as a violation would).
pub fn install_or_refuse(filter: &QueueFilter) -> Result<(), String> {
    match apply(filter) {
        Ok(()) => Ok(()),
        Err(e) if filter.fail_closed => Err(format!("installing the seccomp filter failed under --seccomp strict: {e}")),
        Err(e) => {
            tracing::error!(error = %e, "installing the seccomp filter failed; serving unfiltered (--seccomp strict refuses instead)");
            Ok(())
        }
    }
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
            // fcntl only as F_GETFD (std's check before a close), nothing else.
            let errno = |r: i32| (r < 0).then(|| std::io::Error::last_os_error().raw_os_error()).flatten();
            // SAFETY: fcntl queries on stdin; nothing is changed.
            let getfd = errno(unsafe { libc::fcntl(0, libc::F_GETFD) });
            // SAFETY: as above.
            let getfl = errno(unsafe { libc::fcntl(0, libc::F_GETFL) });
            (open.err(), alloc, getfd != Some(libc::EPERM), getfl)
        })
        .join()
        .expect("thread");
        assert_eq!(r, (Some(Some(libc::EPERM)), 1 << 22, true, Some(libc::EPERM)));
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

    #[test]
    fn the_protocol_thread_cannot_run_programs_but_works_otherwise() {
        let filter = protocol_filter(SeccompMode::On).ok().flatten().expect("a filter");
        let r = std::thread::spawn(move || {
            apply(&filter).expect("apply");
            let exec = std::process::Command::new("/bin/true").status().map_err(|e| e.raw_os_error());
            // A thread started afterwards inherits the filter.
            let child = std::thread::spawn(|| std::process::Command::new("/bin/true").status().is_err()).join().unwrap_or(false);
            let file = std::fs::File::open("/dev/null").is_ok();
            let mem = std::fs::File::options().read(true).write(true).create(true).truncate(true).open(std::env::temp_dir().join(format!("seccomp-{}", std::process::id()))).is_ok();
            (exec.err().flatten(), child, file, mem)
        })
        .join()
        .expect("thread");
        let _ = std::fs::remove_file(std::env::temp_dir().join(format!("seccomp-{}", std::process::id())));
        assert_eq!(r, (Some(libc::EPERM), true, true, true));
        assert!(std::process::Command::new("/bin/true").status().is_ok(), "other threads are not affected");
        assert!(protocol_filter(SeccompMode::Off).ok().flatten().is_none());
    }

    #[test]
    fn strict_never_fails_open() {
        // A thread where installing filters is itself refused (a filter that answers EPERM to
        // seccomp and prctl): `on` serves unfiltered, `strict` refuses to serve.
        let blocker = compile(&[libc::SYS_seccomp, libc::SYS_prctl], &[], SeccompAction::Errno(libc::EPERM as u32), SeccompAction::Allow)
            .expect("blocker");
        let (on, strict) = (
            queue_filter(SeccompMode::On).ok().flatten().expect("on"),
            queue_filter(SeccompMode::Strict).ok().flatten().expect("strict"),
        );
        let r = std::thread::spawn(move || {
            seccompiler::apply_filter(&blocker).expect("blocker");
            (install_or_refuse(&on).is_ok(), install_or_refuse(&strict).map_err(|e| e.contains("strict")))
        })
        .join()
        .expect("thread");
        assert_eq!(r, (true, Err(true)));
    }

    /// `clone` into a namespace, from this thread (a child that is made exits at once).
    fn clone_errno(flags: libc::c_int) -> Option<i32> {
        // SAFETY: a raw clone without CLONE_VM: the child gets a copy of the address space
        // and exits at once through the raw system call; the parent reaps it.
        let pid = unsafe { libc::syscall(libc::SYS_clone, (flags | libc::SIGCHLD) as libc::c_ulong, 0usize, 0usize, 0usize, 0usize) };
        if pid == 0 {
            // SAFETY: the child leaves without running anything of the parent's.
            unsafe { libc::syscall(libc::SYS_exit, 0) };
        }
        if pid < 0 {
            return std::io::Error::last_os_error().raw_os_error();
        }
        // SAFETY: reaps the child made above.
        unsafe { libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0) };
        None
    }

    #[test]
    fn no_thread_makes_namespaces_and_clone3_falls_back() {
        for (name, filter) in [("process", process_filter(SeccompMode::On)), ("protocol", protocol_filter(SeccompMode::On))] {
            let filter = filter.ok().flatten().expect("a filter");
            let r = std::thread::spawn(move || {
                apply(&filter).expect("apply");
                // SAFETY: clone3 with a null argument: refused before it is read.
                let clone3 = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
                let clone3 = (clone3 < 0).then(|| std::io::Error::last_os_error().raw_os_error()).flatten();
                // SAFETY: unshare changes nothing when refused.
                let unshare = unsafe { libc::unshare(libc::CLONE_NEWUSER) };
                let unshare = (unshare < 0).then(|| std::io::Error::last_os_error().raw_os_error()).flatten();
                let threads = std::thread::spawn(|| 7).join().unwrap_or(0);
                (clone3, unshare, clone_errno(libc::CLONE_NEWUSER), clone_errno(libc::CLONE_NEWNET), clone_errno(0), threads)
            })
            .join()
            .expect("thread");
            let e = Some(libc::EPERM);
            assert_eq!(r, (Some(libc::ENOSYS), e, e, e, None, 7), "{name} filter");
        }
        // The process filter lets programs run (thin control runs lvchange).
        let filter = process_filter(SeccompMode::On).ok().flatten().expect("a filter");
        let ran = std::thread::spawn(move || {
            apply(&filter).expect("apply");
            std::process::Command::new("/bin/true").status().map(|s| s.success()).unwrap_or(false)
        })
        .join()
        .expect("thread");
        assert!(ran);
        assert!(process_filter(SeccompMode::Off).ok().flatten().is_none());
    }

    #[test]
    fn the_process_filter_keeps_privileges_where_it_may() {
        let filter = process_filter(SeccompMode::On).ok().flatten().expect("a filter");
        let nnp = std::thread::spawn(move || {
            apply_keeping_privileges(&filter).expect("apply");
            // SAFETY: reads a flag of this thread.
            let nnp = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
            // SAFETY: unshare changes nothing when refused.
            let unshare = unsafe { libc::unshare(libc::CLONE_NEWUSER) };
            (nnp, unshare)
        })
        .join()
        .expect("thread");
        // SAFETY: reads whether this process may install filters without no_new_privs.
        let admin = unsafe { libc::prctl(libc::PR_CAPBSET_READ, 21 /* CAP_SYS_ADMIN */, 0, 0, 0) } == 1 && unsafe { libc::geteuid() } == 0;
        assert_eq!(nnp, (if admin { 0 } else { 1 }, -1), "(no_new_privs, unshare)");
    }
}

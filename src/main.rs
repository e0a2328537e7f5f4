//! The `thinblk` binary.

use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use thinblk::cli::{
    default_serial, CheckArgs, Cli, Command, CreateArgs, DemoArgs, DiscardMode, Format, Preallocation, ServeArgs,
    SpmArgs, SpmBackend, ThinArgs, CAPABILITIES,
};
use thinblk::daemon::{install_signal_thread, serve, Shutdown};
use std::sync::Arc;

use thinblk::format::{open_image, ImageOptions, Qcow2Format};
use thinblk::thin::control::Signals;
use thinblk::thin::policy::Policy;
use thinblk::thin::ThinOptions;
use thinblk_vhost::{DeviceConfig, Disk, ParkHub};
use std::os::unix::net::UnixListener as Listener;

/// Exit code for a wrong command line.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help / --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return usage_error(&first_line(&e.to_string())),
    };
    init_logging(cli.serve.log_level.as_deref());
    if matches!(cli.command, None | Some(Command::Demo(_)) | Some(Command::Spm(_))) {
        // Before any thread exists: every thread inherits the mask, and only the signal
        // thread takes SIGTERM/SIGINT (for a clean drain and flush).
        if let Err(e) = thinblk::daemon::block_termination_signals() {
            eprintln!("thinblk: blocking signals: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = match cli.command {
        Some(Command::Demo(args)) => demo(args),
        Some(Command::Create(args)) => create(args),
        Some(Command::Check(args)) => return check(args),
        Some(Command::Spm(args)) => spm(args),
        Some(Command::Ctl(args)) => thinblk::ctl::client(&args.socket, args.command.as_deref(), args.arguments.as_deref(), args.events)
            .map_err(Failure::Runtime),
        None => run_daemon(cli.serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => usage_error(&msg),
        Err(Failure::Runtime(msg)) => {
            eprintln!("thinblk: {msg}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Usage(String),
    Runtime(String),
}

/// The first line of a clap error; one that ends in ':' takes the indented lines after it
/// (what it announces: the missing arguments), so the one line says what is missing.
fn first_line(s: &str) -> String {
    let mut lines = s.lines().filter(|l| !l.trim().is_empty());
    let Some(first) = lines.next() else { return s.to_string() };
    let first = first.trim_end();
    if !first.ends_with(':') {
        return first.to_string();
    }
    let listed: Vec<&str> = lines.take_while(|l| l.starts_with(' ')).map(str::trim).collect();
    format!("{first} {}", listed.join(", "))
}

fn usage_error(msg: &str) -> ExitCode {
    let msg = msg.trim_start_matches("error: ");
    eprintln!("thinblk: {msg} (see --help)");
    ExitCode::from(EXIT_USAGE)
}

fn init_logging(level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = level
        .map(EnvFilter::new)
        .or_else(|| EnvFilter::try_from_env("THINBLK_LOG").ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

fn run_daemon(args: ServeArgs) -> Result<(), Failure> {
    let started = std::time::Instant::now();
    if args.print_capabilities {
        println!("{CAPABILITIES}");
        return Ok(());
    }
    let image_path = args.image.clone().ok_or_else(|| Failure::Usage("--image is required".into()))?;
    let format = args.format.ok_or_else(|| Failure::Usage("--format raw|qcow2 is required (formats are never probed)".into()))?;
    let inherited = match (&args.socket_path, args.fd) {
        (Some(_), None) => None,
        (None, Some(fd)) => Some(inherited_listener(fd)?),
        _ => return Err(Failure::Usage("one of --socket-path or --fd is required".into())),
    };
    let thin = thin_options(&args, &image_path, format)?;
    let e = &args.errors;
    let fault_settings = thinblk::fault::Settings::new(e.werror, e.rerror, e.retry_interval, e.retry_timeout)
        .map_err(|e| Failure::Usage(e.to_string()))?;
    let opts = ImageOptions {
        read_only: args.read_only,
        l2_cache_bytes: args.l2_cache_size,
        discard_unmap: args.discard == DiscardMode::Unmap,
        fixed_size: thin.is_some(),
        journal_dir: (args.journal_dir != "none").then(|| std::path::PathBuf::from(&args.journal_dir)),
        journal_segment_bytes: args.journal_segment_kib as usize * 1024,
        refcount_cache_blocks: Some(args.refcount_cache_blocks as usize),
        backing_files: args.backing_files.into(),
        locking: args.image_locking.into(),
        inactive: args.incoming,
    };
    // Before the first thread starts, so that every thread inherits it (docs/security.md).
    if let Some(f) = thinblk_vhost::seccomp::process_filter(args.seccomp.mode()).map_err(Failure::Usage)? {
        thinblk_vhost::seccomp::apply_keeping_privileges(&f).map_err(|e| Failure::Runtime(format!("seccomp: {e}")))?;
    }
    let hub = ParkHub::new(usize::from(args.num_queues)).map_err(|e| Failure::Runtime(e.to_string()))?;
    let faults = thinblk::fault::FaultState::new(fault_settings, hub.clone());
    hub.set_policy(faults.clone());
    let _retry_timer = faults.start_timer().map_err(|e| Failure::Runtime(e.to_string()))?;
    let (image, thin_handle, thin_signals): (Arc<dyn Disk>, _, _) = match &thin {
        None => (open_image(&image_path, format.into(), &opts).map_err(|e| Failure::Runtime(e.to_string()))?, None, None),
        Some(t) => {
            let qf = Arc::new(Qcow2Format::open(&image_path, &opts).map_err(|e| Failure::Runtime(e.to_string()))?);
            let signals = Signals::new().map_err(|e| Failure::Runtime(e.to_string()))?;
            qf.set_observer(signals.clone());
            hub.set_listener(signals.clone());
            let handle = thinblk::thin::start(t, qf.clone(), qf.capacity(), signals.clone(), hub.clone())
                .map_err(|e| Failure::Runtime(format!("thin volume {}: {e}", image_path.display())))?;
            (qf, Some(handle), Some(signals))
        }
    };
    let handover = thinblk::handover::Handover::new(image.clone(), args.incoming, thin_signals);
    let chain = thinblk::chain::ChainControl::new(image.clone(), hub.clone(), thin_handle.as_ref().zip(thin.as_ref()).map(|(h, t)| (h.switcher(), t.clone())));
    let _control = match &args.control {
        None => None,
        Some(path) => {
            let thin_status = thin_handle.as_ref().map(|h: &thinblk::thin::ThinHandle| {
                let stats = h.stats_handle();
                Arc::new(move || {
                    let s = stats.lock().map(|s| s.clone()).unwrap_or_default();
                    serde_json::json!({"state": s.state, "volume": s.volume, "physical": s.physical, "requests": s.requests,
                        "completed": s.completed, "failed": s.failed})
                }) as Arc<dyn Fn() -> serde_json::Value + Send + Sync>
            });
            let target = thinblk::ctl::Target {
                faults: faults.clone(),
                hub: hub.clone(),
                thin: thin_status,
                image: Some(image.clone()),
                handover: Some(handover.clone()),
                chain: Some(chain.clone()),
            };
            Some(thinblk::ctl::serve(path, target).map_err(|e| Failure::Runtime(format!("control socket {}: {e}", path.display())))?)
        }
    };
    let serial = args.serial.clone().unwrap_or_else(|| default_serial(&image.identity()));
    let stats = args.metrics.as_ref().map(|_| thinblk_vhost::DeviceStats::new(usize::from(args.num_queues)));
    let _metrics = match (&args.metrics, &stats) {
        (Some(endpoint), Some(device)) => {
            let sources = Arc::new(thinblk::metrics::Sources {
                disk: serial.clone(),
                started,
                device: device.clone(),
                image: image.clone(),
                hub: hub.clone(),
                faults: faults.clone(),
                thin: thin_handle.as_ref().map(|h| h.stats_handle()),
                handover: Some(handover.clone()),
                chain: Some(chain.stats()),
                jobs: Some(chain.job_stats()),
            });
            let render: thinblk::metrics::http::Render = Arc::new(move |p| sources.render(p));
            let server = thinblk::metrics::http::serve(endpoint, render)
                .map_err(|e| Failure::Runtime(format!("metrics endpoint {endpoint}: {e}")))?;
            tracing::info!(endpoint = %server.endpoint(), "metrics endpoint listening");
            Some(server)
        }
        _ => None,
    };
    let cfg = DeviceConfig {
        num_queues: args.num_queues,
        queue_size: args.queue_size,
        logical_block_size: args.logical_block_size,
        read_only: args.read_only,
        serial,
        park: Some(hub),
        stats,
        seccomp: thinblk_vhost::seccomp::queue_filter(args.seccomp.mode()).map_err(Failure::Usage)?,
        ownership: Some(handover.clone()),
        stop: thinblk_vhost::device::StopLimits {
            parked_grace: std::time::Duration::from_millis(args.stop_grace),
            limit: std::time::Duration::from_millis(args.stop_limit),
        },
        poll: std::time::Duration::from_micros(u64::from(args.poll_us)),
    };
    if image.capacity() < u64::from(cfg.logical_block_size) {
        return Err(Failure::Runtime(format!("{} is smaller than one logical block", image_path.display())));
    }
    // Guest offsets are multiples of the logical block size and go to the host as they are
    // (plus a cluster's offset): below the storage's O_DIRECT alignment every request would
    // fail with EINVAL. Say so now.
    if cfg.logical_block_size < image.io_alignment() {
        return Err(Failure::Runtime(format!(
            "{}: the storage needs {}-byte aligned IO (O_DIRECT); --logical-block-size {} is smaller: use --logical-block-size {}",
            image_path.display(),
            image.io_alignment(),
            cfg.logical_block_size,
            image.io_alignment()
        )));
    }
    tracing::info!(
        image = %image_path.display(),
        capacity = image.capacity(),
        queues = cfg.num_queues,
        read_only = cfg.read_only,
        serial = %cfg.serial,
        werror = fault_settings.werror.name(),
        rerror = fault_settings.rerror.name(),
        "serving"
    );
    // The socket appears last, once the image (and thin volume, control socket) are ready.
    let listener = match (inherited, &args.socket_path) {
        (Some(l), _) => l,
        (None, Some(p)) => listen_atomically(p).map_err(|e| Failure::Runtime(format!("cannot listen on {}: {e}", p.display())))?,
        (None, None) => return Err(Failure::Usage("one of --socket-path or --fd is required".into())),
    };
    let shutdown = Shutdown::new().map_err(|e| Failure::Runtime(e.to_string()))?;
    install_signal_thread(shutdown.clone()).map_err(|e| Failure::Runtime(e.to_string()))?;
    // The thread that parses frontend messages may not run programs either (on top of the
    // process filter every thread has); queue threads it starts inherit this on top of their
    // own allow-list. Helper threads started above (thin control runs lvchange) may.
    if let Some(f) = thinblk_vhost::seccomp::protocol_filter(args.seccomp.mode()).map_err(Failure::Usage)? {
        thinblk_vhost::seccomp::apply(&f).map_err(|e| Failure::Runtime(format!("seccomp: {e}")))?;
    }
    // A merge still running stops before the final close: its base closed clean, the chain
    // as it was.
    let stop_jobs = || chain.shutdown(std::time::Duration::from_secs(10));
    let result = serve(image, &cfg, listener, &shutdown, &stop_jobs).map_err(|e| Failure::Runtime(e.to_string()));
    if let Some(t) = thin_handle {
        t.stop();
    }
    if let Some(p) = &args.socket_path {
        let _ = std::fs::remove_file(p);
    }
    result
}

/// Resolves and checks the thin-volume options (None without `--thin`).
fn thin_options(args: &ServeArgs, image: &Path, format: Format) -> Result<Option<ThinOptions>, Failure> {
    let t = &args.thin;
    if !t.thin {
        return Ok(None);
    }
    if format != Format::Qcow2 {
        return Err(Failure::Usage("--thin needs --format qcow2".into()));
    }
    if args.read_only {
        return Err(Failure::Usage("--thin and --read-only exclude each other".into()));
    }
    let policy = Policy::new(t.utilization_percent, t.chunk_mb).map_err(|e| Failure::Usage(e.to_string()))?;
    let missing = |what: &str| Failure::Usage(format!("--thin needs {what}"));
    let host_id = t.host_id.ok_or_else(|| missing("--host-id"))?;
    Ok(Some(ThinOptions {
        volume: image.to_path_buf(),
        policy,
        spm_inbox: t.spm_inbox.clone().ok_or_else(|| missing("--spm-inbox"))?,
        spm_outbox: t.spm_outbox.clone().ok_or_else(|| missing("--spm-outbox"))?,
        host_id,
        domain: t.domain_uuid.ok_or_else(|| missing("--domain-uuid"))?,
        volume_uuid: t.volume_uuid.ok_or_else(|| missing("--volume-uuid"))?,
        lock: t.mailbox_lock.clone().unwrap_or_else(|| PathBuf::from(format!("/run/thinblk/mailbox-host-{host_id}.lock"))),
        rate: (!t.spec_sizing).then(|| thinblk::thin::monitor::RateSettings {
            rtt_guess: std::time::Duration::from_millis(t.extend_guess_ms),
            max_step: t.max_extend_mb.saturating_mul(1 << 20),
            ..Default::default()
        }),
    }))
}

/// Binds and listens under a temporary name, then renames onto `path`: the socket appears
/// (replacing a stale one) only once it accepts connections.
fn listen_atomically(path: &Path) -> std::io::Result<Listener> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

fn inherited_listener(fd: i32) -> Result<Listener, Failure> {
    // SAFETY: fstat only writes into `st`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer; an invalid fd just makes fstat fail.
    if fd < 0 || unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(Failure::Usage(format!("--fd {fd} is not an open socket")));
    }
    // SAFETY: the launcher handed us this listening socket; we take sole ownership of it.
    Ok(unsafe { Listener::from_raw_fd(fd) })
}

/// Where the backing file `name` of `image` is: a relative name is resolved against the
/// image's directory, as the chain is opened.
fn backing_path(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    image.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).join(p)
}

/// The virtual size of the backing file at `path`: a qcow2 image's, read by the engine
/// (read-only), or a raw file's or device's size rounded up to 512 bytes.
fn backing_size(path: &Path, format: Format) -> Result<u64, String> {
    use thinblk_qcow2::{FileStorage, OpenOptions, Qcow2, Storage};
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let storage = std::sync::Arc::new(FileStorage::new(file, 1));
    match format {
        Format::Qcow2 => {
            let img = Qcow2::open(storage, OpenOptions { read_only: true, ..Default::default() }).map_err(|e| e.to_string())?;
            Ok(img.size())
        }
        Format::Raw => Ok(storage.size().map_err(|e| e.to_string())?.div_ceil(512) * 512),
    }
}

/// Whether `a` and `b` are the same file (both must exist).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
        _ => false,
    }
}

fn create(args: CreateArgs) -> Result<(), Failure> {
    use thinblk_qcow2::{create, CreateOptions, FileStorage, OpenOptions, Qcow2};
    let rt = |e: String| Failure::Runtime(format!("{}: {e}", args.image.display()));
    let backing = match (&args.backing, args.backing_format) {
        (Some(name), Some(format)) => Some((name.clone(), format)),
        (None, None) => None,
        _ => return Err(Failure::Usage("--backing and --backing-format go together".into())),
    };
    // The backing file is read (for its size) before the image is touched, and never
    // written; with SIZE given it is not opened at all (it may not be reachable yet).
    if let Some((name, _)) = &backing {
        if same_file(&backing_path(&args.image, name), &args.image) {
            return Err(rt(format!("the backing file {name} is the image itself")));
        }
    }
    let size = match (args.size, &backing) {
        (Some(size), _) => size,
        (None, Some((name, format))) => {
            let path = backing_path(&args.image, name);
            backing_size(&path, *format).map_err(|e| rt(format!("backing file {name} ({}): {e}", path.display())))?
        }
        (None, None) => return Err(Failure::Usage("SIZE is required without --backing".into())),
    };
    let format_name = |f: Format| match f {
        Format::Raw => "raw",
        Format::Qcow2 => "qcow2",
    };
    let is_block = std::fs::metadata(&args.image).map(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_block_device()
    });
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(!matches!(is_block, Ok(true)))
        .truncate(false)
        .open(&args.image)
        .map_err(|e| rt(e.to_string()))?;
    // A writer like any other: never over an image someone uses (QEMU's locks), and only
    // then emptied.
    let _lock = thinblk_disk::lock::lock_image(&file, &args.image, thinblk_disk::lock::Access::qcow2(true), Default::default())
        .map_err(|e| rt(e.to_string()))?;
    if !matches!(is_block, Ok(true)) {
        file.set_len(0).map_err(|e| rt(e.to_string()))?;
    }
    let storage = std::sync::Arc::new(FileStorage::new(file, 1));
    let opts = CreateOptions {
        size,
        cluster_size: args.cluster_size,
        backing: backing.as_ref().map(|(name, format)| (name.clone(), format_name(*format).to_string())),
    };
    let mut end = create(storage.as_ref(), &opts).map_err(|e| rt(e.to_string()))?;
    if args.preallocation == Preallocation::Metadata {
        let img = Qcow2::open(storage.clone(), OpenOptions::default()).map_err(|e| rt(e.to_string()))?;
        img.preallocate_l2_tables().map_err(|e| rt(e.to_string()))?;
        end = img.allocation();
        // Closed clean: not marked in use for the first start.
        img.close().map_err(|e| rt(e.to_string()))?;
    }
    let chain = match &backing {
        Some((name, format)) => format!(" backing_file={name} backing_fmt={}", format_name(*format)),
        None => String::new(),
    };
    println!(
        "Formatting '{}', fmt=qcow2 cluster_size={}{chain} size={size} (image end offset {end})",
        args.image.display(),
        args.cluster_size,
    );
    Ok(())
}

fn spm(args: SpmArgs) -> Result<(), Failure> {
    use thinblk::mailbox::responder::{Backend, Responder};
    let backend = match (args.backend, args.volumes) {
        (SpmBackend::Lvm, _) => Backend::Lvm,
        (SpmBackend::File, Some(dir)) => Backend::File(dir),
        (SpmBackend::File, None) => return Err(Failure::Usage("--backend file needs --volumes DIR".into())),
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    thinblk::daemon::on_termination(move || flag.store(true, std::sync::atomic::Ordering::SeqCst))
        .map_err(|e| Failure::Runtime(e.to_string()))?;
    let mut r = Responder::open(&args.inbox, &args.outbox, backend)
        .map_err(|e| Failure::Runtime(format!("opening the mailbox: {e}")))?;
    r.set_delay(std::time::Duration::from_millis(args.delay_ms));
    tracing::info!(inbox = %args.inbox.display(), outbox = %args.outbox.display(), "SPM mailbox responder running");
    r.run(&stop);
    Ok(())
}

fn check(args: CheckArgs) -> ExitCode {
    let file = match std::fs::File::open(&args.image) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("thinblk: {}: {e}", args.image.display());
            return ExitCode::from(1);
        }
    };
    let storage = thinblk_qcow2::FileStorage::new(file, 1);
    match thinblk_qcow2::check(&storage) {
        Err(e) => {
            eprintln!("thinblk: {}: {e}", args.image.display());
            ExitCode::from(1)
        }
        Ok(r) => {
            for m in &r.messages {
                println!("{m}");
            }
            if r.corruptions == 0 && r.leaks == 0 {
                println!("No errors were found on the image.");
            }
            if r.corruptions > 0 {
                println!("{} errors were found on the image.", r.corruptions);
            }
            if r.leaks > 0 {
                println!("{} leaked clusters were found on the image.", r.leaks);
            }
            println!("{}/{} = {:.2}% allocated", r.allocated_clusters, r.total_clusters,
                r.allocated_clusters as f64 * 100.0 / r.total_clusters.max(1) as f64);
            println!("Image end offset: {}", r.image_end_offset);
            ExitCode::from(r.exit_code() as u8)
        }
    }
}

/// `thinblk demo`: a fresh qcow2 image on a small file volume, an in-process SPM that grows
/// it through the mailbox, all in a temporary directory, served on a socket there.
fn demo(args: DemoArgs) -> Result<(), Failure> {
    use thinblk::mailbox::responder::{Backend, Responder};
    use thinblk::mailbox::wire::Uuid;
    let rt = |e: std::io::Error| Failure::Runtime(e.to_string());
    let (dir, owned) = match args.dir {
        Some(d) => (d, false),
        None => (std::env::temp_dir().join(format!("thinblk-demo-{}", std::process::id())), true),
    };
    let uuid = |s: &str| Uuid::parse(s).map_err(|e| Failure::Runtime(e.to_string()));
    let domain = uuid(DEMO_DOMAIN)?;
    let volume = uuid(DEMO_VOLUME)?;
    let volumes = dir.join("volumes");
    let image = volumes.join(domain.to_string()).join(volume.to_string());
    std::fs::create_dir_all(image.parent().unwrap_or(&dir)).map_err(rt)?;
    let (inbox, outbox) = (dir.join("inbox"), dir.join("outbox"));
    for p in [&inbox, &outbox] {
        std::fs::File::create(p).and_then(|f| f.set_len(16 << 20)).map_err(rt)?;
    }
    let size = args.size_mib << 20;
    let file = std::fs::File::create(&image).map_err(rt)?;
    let storage = thinblk_qcow2::FileStorage::new(file.try_clone().map_err(rt)?, 1);
    thinblk_qcow2::create(&storage, &thinblk_qcow2::CreateOptions { size, cluster_size: 65536, backing: None })
        .map_err(|e| Failure::Runtime(e.to_string()))?;
    // A new thin volume starts at one chunk (spec §2.2).
    file.set_len((args.chunk_mb << 20).min(size).max(1 << 20)).map_err(rt)?;
    drop(file);
    let mut spm = Responder::open(&inbox, &outbox, Backend::File(volumes.clone())).map_err(rt)?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spm_stop = stop.clone();
    let spm_thread = std::thread::Builder::new().name("spm".into()).spawn(move || spm.run(&spm_stop)).map_err(rt)?;
    let socket = dir.join("thinblk.sock");
    print_attach_help(&image, &socket, args.num_queues, args.chunk_mb);
    let serve_args = ServeArgs {
        socket_path: Some(socket.clone()),
        fd: None,
        print_capabilities: false,
        image: Some(image.clone()),
        format: Some(Format::Qcow2),
        read_only: false,
        incoming: false,
        num_queues: args.num_queues,
        queue_size: 256,
        poll_us: 0,
        logical_block_size: 512,
        serial: Some("thinblk-demo".into()),
        l2_cache_size: None,
        // The demo keeps everything in its directory, its journal too (the boot id guards it).
        journal_dir: dir.to_string_lossy().into_owned(),
        journal_segment_kib: 8192,
        refcount_cache_blocks: 64,
        stop_grace: 10_000,
        stop_limit: 30_000,
        backing_files: Default::default(),
        image_locking: Default::default(),
        seccomp: Default::default(),
        discard: DiscardMode::Unmap,
        log_level: None,
        errors: Default::default(),
        control: None,
        metrics: args.metrics,
        thin: ThinArgs {
            thin: true,
            utilization_percent: 50,
            chunk_mb: args.chunk_mb,
            spm_inbox: Some(inbox),
            spm_outbox: Some(outbox),
            host_id: Some(1),
            domain_uuid: Some(domain),
            volume_uuid: Some(volume),
            mailbox_lock: Some(dir.join("mailbox-host-1.lock")),
            spec_sizing: false,
            extend_guess_ms: 1500,
            max_extend_mb: 10240,
        },
    };
    let r = run_daemon(serve_args);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = spm_thread.join();
    if owned {
        let _ = std::fs::remove_dir_all(&dir);
    }
    r
}

/// The demo's storage domain and volume.
const DEMO_DOMAIN: &str = "8adbc85e-e554-4ae0-b318-8a5465fe5fe1";
const DEMO_VOLUME: &str = "d772f1c6-3ebb-43c3-a42e-73fcd8255a5f";

fn print_attach_help(image: &Path, socket: &Path, queues: u16, chunk_mb: u64) {
    println!("thinblk demo: serving the qcow2 image {} ({} queues)", image.display(), queues);
    println!("it sits on a thin file volume of {chunk_mb} MiB; an in-process SPM grows it by {chunk_mb} MiB");
    println!("through the vdsm mailbox whenever the guest's writes leave less than half a chunk free");
    println!("(watch the \"extension\" log lines, or `ls -l` the image).");
    println!("socket: {}", socket.display());
    println!("attach a VM with:");
    println!(
        "  qemu-system-x86_64 -machine q35 -accel kvm -accel tcg -m 1G \\\n    \
         -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\\n    \
         -chardev socket,id=disk0,path={},reconnect-ms=1000 \\\n    \
         -device vhost-user-blk-pci,chardev=disk0,num-queues={} ...",
        socket.display(),
        queues
    );
    println!("stop with Ctrl-C (in-flight IO is finished and the image flushed).");
}

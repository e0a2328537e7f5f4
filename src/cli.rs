//! Command line, following the vhost-user spec's backend program conventions.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Longest serial GET_ID can return.
pub const MAX_SERIAL: usize = 20;

/// thinblk: a vhost-user-blk backend for thin-provisioned VM disks.
#[derive(Debug, Parser)]
#[command(name = "thinblk", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// Daemon options (when no subcommand is given).
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Tools.
    #[command(subcommand)]
    pub command: Option<Command>,
}


/// Options of the daemon.
#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    /// Listen on this unix socket path (created; removed at exit).
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,
    /// Use this inherited, already listening unix socket.
    #[arg(long, value_name = "N")]
    pub fd: Option<i32>,
    /// Print the vhost-user backend capabilities as JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// The disk image: a file or a block device.
    #[arg(long, alias = "blk-file", value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// Image format.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Serve the disk read-only.
    #[arg(long)]
    pub read_only: bool,
    /// The destination of a live migration (QEMU `-incoming`): open the image inactive
    /// (shared lock only, no journal, nothing written, no extension requested) and take it
    /// when the frontend starts the rings after the switch-over.
    #[arg(long, conflicts_with = "read_only")]
    pub incoming: bool,
    /// Number of request queues (one worker thread and io_uring each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,
    /// Polling mode: the longest a queue thread busy-polls its ring and io_uring for work
    /// before it sleeps, in microseconds (0: off). Adaptive: grows while waits are short,
    /// drops to nothing after a long one. Costs CPU on busy queues; for hosts with cores to spare.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub poll_us: u32,
    /// Descriptors per queue (a power of two).
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,
    /// Logical block size reported to the guest.
    #[arg(long, default_value_t = 512, value_parser = parse_lbs)]
    pub logical_block_size: u32,
    /// Discard handling, as QEMU's `discard=`: `ignore` keeps host space (qcow2 still marks
    /// the clusters zero), `unmap` releases it (punch hole / discard on the host).
    #[arg(long, value_enum, default_value_t = DiscardMode::Ignore)]
    pub discard: DiscardMode,
    /// qcow2 L2 cache size in bytes (K/M/G suffixes); default: enough for the whole disk, up to 32 MiB.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub l2_cache_size: Option<u64>,
    /// Which backing file names a qcow2 image may give: `local` (relative, inside the image's
    /// directory, regular files), `devices` (block devices too, for LVM storage), `any`.
    #[arg(long, value_enum, default_value_t = BackingFiles::Local)]
    pub backing_files: BackingFiles,
    /// QEMU-compatible image locks on every file of the chain (`on`: a process using the image
    /// in a way ours excludes makes the start fail; `off`: QEMU's `locking=off`, for file
    /// systems whose locks cannot be trusted). Without OFD lock support: a warning, no locks.
    #[arg(long, value_enum, default_value_t = ImageLocking::On)]
    pub image_locking: ImageLocking,
    /// The queue threads' system-call allow-list: `on` (a call outside it fails with EPERM),
    /// `strict` (it kills the daemon), `off`.
    #[arg(long, value_enum, default_value_t = SeccompArg::On)]
    pub seccomp: SeccompArg,
    /// Where the qcow2 metadata journal lives (a tmpfs directory: it must not survive a reboot
    /// unnoticed, and it keeps completed writes across a daemon crash), or `none` to keep
    /// metadata changes since the last write-back in memory only.
    #[arg(long, value_name = "DIR|none", default_value = "/dev/shm")]
    pub journal_dir: String,
    /// Size of each of the journal's two segments, in KiB (the file is twice this,
    /// preallocated in the journal directory). Past half a segment, metadata is written back;
    /// a full one makes completions wait for write-backs until the next one.
    #[arg(long, value_name = "KIB", default_value_t = 8192, value_parser = clap::value_parser!(u32).range(16..=1048576))]
    pub journal_segment_kib: u32,
    /// Clean qcow2 refcount blocks kept in memory (each one cluster); fewer saves memory on
    /// images with large refcount tables at the cost of re-reading them.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1048576))]
    pub refcount_cache_blocks: u32,
    /// How long a stop (the frontend stopping a queue, a disconnect, SIGTERM) keeps retrying
    /// parked requests before failing them, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub stop_grace: u64,
    /// How long a stop then waits for storage that does not answer, in milliseconds; what is
    /// still at the storage is then fenced and the stop answers (the final flush at exit gets
    /// twice this).
    #[arg(long, value_name = "MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub stop_limit: u64,
    /// Serial number returned by GET_ID (at most 20 bytes); default derived from the image path.
    #[arg(long, value_parser = parse_serial)]
    pub serial: Option<String>,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive); also THINBLK_LOG.
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Thin-volume options.
    #[command(flatten)]
    pub thin: ThinArgs,
    /// Error-policy options.
    #[command(flatten)]
    pub errors: ErrorArgs,
    /// Control socket (unix, mode 0600, JSON lines, QMP-like); `thinblk ctl` talks to it.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Serve Prometheus metrics at GET /metrics on 127.0.0.1:PORT, [::1]:PORT or unix:PATH
    /// (off by default).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<crate::metrics::http::Endpoint>,
}

/// What failed requests become (QEMU's werror/rerror, openEuler's retry).
#[derive(Debug, Args, Clone)]
pub struct ErrorArgs {
    /// Policy for failed writes, flushes, discards and write-zeroes.
    #[arg(long, value_enum, default_value_t = ErrorPolicy::Enospc)]
    pub werror: ErrorPolicy,
    /// Policy for failed reads.
    #[arg(long, value_enum, default_value_t = ErrorPolicy::Report)]
    pub rerror: ErrorPolicy,
    /// Under `retry`: resubmit parked requests every this many milliseconds (default 1000).
    #[arg(long, value_name = "MS")]
    pub retry_interval: Option<u64>,
    /// Under `retry`: report the error once this many milliseconds passed since the disk's
    /// first failure without a success (default 0: never).
    #[arg(long, value_name = "MS")]
    pub retry_timeout: Option<u64>,
}

impl Default for ErrorArgs {
    fn default() -> ErrorArgs {
        ErrorArgs { werror: ErrorPolicy::Enospc, rerror: ErrorPolicy::Report, retry_interval: None, retry_timeout: None }
    }
}

pub use crate::fault::ErrorPolicy;

/// Options of a qcow2 image on a thin volume grown through the vdsm mailbox.
#[derive(Debug, Args, Clone, Default)]
pub struct ThinArgs {
    /// The image lives on a thin volume (an LV, a loop device, or a file treated as a fixed-size
    /// volume): grow it through the SPM before it fills; park writes that would pass its end.
    #[arg(long, requires_all = ["spm_inbox", "spm_outbox", "host_id", "domain_uuid", "volume_uuid"])]
    pub thin: bool,
    /// How full a chunk may get before extending (vdsm volume_utilization_percent).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=100), requires = "thin")]
    pub utilization_percent: u64,
    /// MiB added per extension (vdsm volume_utilization_chunk_mb).
    #[arg(long, default_value_t = 2560, value_parser = clap::value_parser!(u64).range(1..=0xffff_ffff), requires = "thin")]
    pub chunk_mb: u64,
    /// The SPM's inbox volume (we write extend requests there).
    #[arg(long, value_name = "PATH", requires = "thin")]
    pub spm_inbox: Option<PathBuf>,
    /// The SPM's outbox volume (we read replies there).
    #[arg(long, value_name = "PATH", requires = "thin")]
    pub spm_outbox: Option<PathBuf>,
    /// This host's mailbox id (1..249).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=249), requires = "thin")]
    pub host_id: Option<u16>,
    /// Storage domain UUID (the VG).
    #[arg(long, value_parser = parse_uuid, requires = "thin")]
    pub domain_uuid: Option<crate::mailbox::wire::Uuid>,
    /// Volume UUID (the LV).
    #[arg(long, value_parser = parse_uuid, requires = "thin")]
    pub volume_uuid: Option<crate::mailbox::wire::Uuid>,
    /// Lock file serializing this host's mailbox block among thinblk processes
    /// (default /run/thinblk/mailbox-host-<ID>.lock).
    #[arg(long, value_name = "PATH", requires = "thin")]
    pub mailbox_lock: Option<PathBuf>,
    /// Size extensions by the spec's percent and chunk only (no allocation-rate awareness).
    #[arg(long, requires = "thin")]
    pub spec_sizing: bool,
    /// The extension round trip assumed until one is timed (milliseconds).
    #[arg(long, default_value_t = 1500, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=600_000), requires = "thin")]
    pub extend_guess_ms: u64,
    /// The largest single extension rate-aware sizing may ask for (MiB).
    #[arg(long, default_value_t = 10240, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..=0xffff_ffff), requires = "thin")]
    pub max_extend_mb: u64,
}

fn parse_uuid(s: &str) -> Result<crate::mailbox::wire::Uuid, String> {
    crate::mailbox::wire::Uuid::parse(s).map_err(|e| format!("'{s}': {e}"))
}

/// `--discard` modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DiscardMode {
    /// Do not pass discards to the host.
    Ignore,
    /// Release host space on discard (and on write-zeroes that allow it).
    Unmap,
}

/// Tools.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a small image in a temporary directory and serve it (the README's first command).
    Demo(DemoArgs),
    /// Create a qcow2 (version 3) image on a file or block device.
    Create(CreateArgs),
    /// Check a qcow2 image: errors, leaks, image end offset (exit codes as qemu-img check).
    Check(CheckArgs),
    /// Run the SPM side of the vdsm storage mailbox: extend volumes on request.
    Spm(SpmArgs),
    /// Talk to a running daemon's control socket.
    Ctl(CtlArgs),
}

/// Options of `thinblk ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The daemon's control socket (`--control PATH`).
    pub socket: PathBuf,
    /// query-status, query-parked, cont, set-policy, freeze, thaw, hand-over, snapshot,
    /// commit, query-jobs, job-complete, job-cancel, job-set-speed or job-dismiss.
    pub command: Option<String>,
    /// The command's arguments as a JSON object, e.g. '{"werror": "retry"}'.
    pub arguments: Option<String>,
    /// Print BLOCK_IO_ERROR events as they come (after the command's reply, if any).
    #[arg(long)]
    pub events: bool,
}

/// Extension backends of `thinblk spm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SpmBackend {
    /// lvextend on the LVM volume <domain-uuid>/<volume-uuid>.
    Lvm,
    /// Grow the file DIR/<domain-uuid>/<volume-uuid> (with --volumes DIR).
    File,
}

/// Options of `thinblk spm`.
#[derive(Debug, Args)]
pub struct SpmArgs {
    /// The SPM's inbox (the hosts write requests here).
    #[arg(long)]
    pub inbox: PathBuf,
    /// The SPM's outbox (replies go here).
    #[arg(long)]
    pub outbox: PathBuf,
    /// How volumes are extended.
    #[arg(long, value_enum)]
    pub backend: SpmBackend,
    /// Directory of the file backend's volumes.
    #[arg(long, required_if_eq("backend", "file"))]
    pub volumes: Option<PathBuf>,
    /// Answer new requests this many milliseconds late (a slow SPM, for tests and drills).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub delay_ms: u64,
}

/// Metadata preallocation modes of `thinblk create`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Preallocation {
    /// Nothing beyond the header and tables.
    Off,
    /// Every L2 table allocated up front (guest clusters stay unallocated).
    Metadata,
}

/// Options of `thinblk create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The image: a new or existing file (overwritten), or a block device.
    pub image: PathBuf,
    /// Virtual size, bytes or with a K/M/G/T suffix (binary units); with --backing, the
    /// backing file's size when left out.
    #[arg(value_parser = parse_size, required_unless_present = "backing")]
    pub size: Option<u64>,
    /// Backing file, written into the image as given; a relative name is resolved against
    /// the image's directory (as oVirt names a parent volume by its bare uuid).
    #[arg(long, value_name = "NAME", requires = "backing_format")]
    pub backing: Option<String>,
    /// The backing file's format, recorded in the image (formats are never probed).
    #[arg(long, value_enum, value_name = "FORMAT", requires = "backing")]
    pub backing_format: Option<Format>,
    /// Cluster size in bytes (power of two, 512 to 2M).
    #[arg(long, default_value = "65536", value_parser = parse_size)]
    pub cluster_size: u64,
    /// Preallocation.
    #[arg(long, value_enum, default_value_t = Preallocation::Off)]
    pub preallocation: Preallocation,
}

/// Options of `thinblk check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The qcow2 image.
    pub image: PathBuf,
}

/// Parses a size with an optional binary suffix (K, M, G, T; optional trailing "iB"/"B").
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size"))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("'{s}' is too large"))
}

/// Options of `thinblk demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Directory to create the image and socket in (default: a new one under $TMPDIR).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Virtual disk size in MiB.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub size_mib: u64,
    /// Number of request queues.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,
    /// The thin volume's initial size and growth step, in MiB.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub chunk_mb: u64,
    /// Serve Prometheus metrics on this address (127.0.0.1:PORT, [::1]:PORT or unix:PATH).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<crate::metrics::http::Endpoint>,
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if !(2..=1024).contains(&n) || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two between 2 and 1024"));
    }
    Ok(n)
}

fn parse_lbs(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!("'{s}' is not 512 or 4096")),
    }
}

fn parse_serial(s: &str) -> Result<String, String> {
    if s.len() > MAX_SERIAL {
        return Err(format!("'{s}' is longer than {MAX_SERIAL} bytes"));
    }
    if s.bytes().any(|b| !(0x20..0x7f).contains(&b)) {
        return Err(format!("'{s}' has characters outside printable ASCII"));
    }
    Ok(s.to_string())
}

/// The JSON `--print-capabilities` prints (vhost-user spec, backend program conventions).
pub const CAPABILITIES: &str = r#"{"type": "block", "features": ["read-only", "blk-file"]}"#;

/// A stable default serial: a hash of the image's identity, hex, within 20 bytes.
pub fn default_serial(identity: &str) -> String {
    // FNV-1a 64: stable across versions and platforms, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in identity.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("tb-{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validators() {
        assert!(parse_queue_size("256").is_ok());
        assert!(parse_queue_size("100").is_err());
        assert!(parse_queue_size("2048").is_err());
        assert!(parse_lbs("4096").is_ok());
        assert!(parse_lbs("1024").is_err());
        assert!(parse_serial("abc").is_ok());
        assert!(parse_serial("123456789012345678901").is_err());
        assert!(parse_serial("a\nb").is_err());
    }

    #[test]
    fn default_serial_is_stable_and_short() {
        let s = default_serial("/dev/vg/lv");
        assert_eq!(s, default_serial("/dev/vg/lv"));
        assert_ne!(s, default_serial("/dev/vg/lv2"));
        assert!(s.len() <= MAX_SERIAL);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn fd_and_socket_conflict() {
        let r = Cli::try_parse_from(["thinblk", "--fd", "3", "--socket-path", "/x"]);
        assert!(r.is_err());
    }
}

/// `--image-locking`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ImageLocking {
    /// Take QEMU's locks.
    #[default]
    On,
    /// Take none.
    Off,
}

impl From<ImageLocking> for thinblk_disk::lock::Locking {
    fn from(l: ImageLocking) -> Self {
        match l {
            ImageLocking::On => thinblk_disk::lock::Locking::On,
            ImageLocking::Off => thinblk_disk::lock::Locking::Off,
        }
    }
}

/// `--seccomp`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompArg {
    /// Disallowed calls fail with EPERM.
    #[default]
    On,
    /// Disallowed calls kill the process.
    Strict,
    /// No filter.
    Off,
}

impl SeccompArg {
    /// The device's mode.
    pub fn mode(self) -> thinblk_vhost::seccomp::SeccompMode {
        use thinblk_vhost::seccomp::SeccompMode;
        match self {
            SeccompArg::On => SeccompMode::On,
            SeccompArg::Strict => SeccompMode::Strict,
            SeccompArg::Off => SeccompMode::Off,
        }
    }
}

/// `--format`: image formats, always given explicitly, never probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The file is the disk.
    Raw,
    /// qcow2.
    Qcow2,
}

impl From<Format> for thinblk_disk::qcow2::Format {
    fn from(f: Format) -> Self {
        match f {
            Format::Raw => thinblk_disk::qcow2::Format::Raw,
            Format::Qcow2 => thinblk_disk::qcow2::Format::Qcow2,
        }
    }
}

/// `--backing-files`: which backing file names a qcow2 image may give.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackingFiles {
    /// Relative names inside the image's directory (no `..`), regular files only.
    #[default]
    Local,
    /// As `local`, and block devices too (oVirt block domains).
    Devices,
    /// Any local path, absolute names included (trusted images only).
    Any,
}

impl From<BackingFiles> for thinblk_disk::qcow2::BackingFiles {
    fn from(b: BackingFiles) -> Self {
        match b {
            BackingFiles::Local => thinblk_disk::qcow2::BackingFiles::Local,
            BackingFiles::Devices => thinblk_disk::qcow2::BackingFiles::Devices,
            BackingFiles::Any => thinblk_disk::qcow2::BackingFiles::Any,
        }
    }
}

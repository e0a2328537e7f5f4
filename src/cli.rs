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

/// Image formats; always given explicitly, never probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Raw image: the file or block device is the disk, byte for byte.
    Raw,
    /// qcow2 image.
    Qcow2,
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
    /// Number of request queues (one worker thread and io_uring each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,
    /// Descriptors per queue (a power of two).
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,
    /// Logical block size reported to the guest.
    #[arg(long, default_value_t = 512, value_parser = parse_lbs)]
    pub logical_block_size: u32,
    /// Serial number returned by GET_ID (at most 20 bytes); default derived from the image path.
    #[arg(long, value_parser = parse_serial)]
    pub serial: Option<String>,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive); also THINBLK_LOG.
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
}

/// Tools.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a small image in a temporary directory and serve it (the README's first command).
    Demo(DemoArgs),
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
    fn fd_and_socket_conflict() {
        let r = Cli::try_parse_from(["thinblk", "--fd", "3", "--socket-path", "/x"]);
        assert!(r.is_err());
    }
}

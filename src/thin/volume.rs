//! The volume an image lives on (an LV, a loop device standing in for one, or a file treated
//! as a fixed-size volume), its physical size, and the refresh after an extension.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `_IOR(0x12, 114, u64)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// Loop device: re-read the backing file's size.
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4c07;
/// Block major number of loop devices.
const LOOP_MAJOR: u32 = 7;

/// What kind of volume, which decides how a refresh is done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeKind {
    /// An LVM logical volume: `lvchange --refresh VG/LV`.
    Lvm(String),
    /// A loop device: LOOP_SET_CAPACITY.
    Loop,
    /// Another block device: the size is re-read.
    Block,
    /// A regular file: its size is re-read.
    File,
}

/// The cached physical size's state (spec issue 4: shown in logs and metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeState {
    /// The cached size is what the volume has.
    Current,
    /// An extension to this many bytes was requested.
    ExtensionRequested(u64),
    /// The SPM reported the extension done; the new size is not visible yet.
    Extended(u64),
    /// The volume was refreshed after an extension.
    Refreshed,
}

/// A volume and its cached physical size.
#[derive(Debug)]
pub struct Volume {
    path: PathBuf,
    kind: VolumeKind,
    physical: u64,
    state: SizeState,
}

fn blk_size(f: &File) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 into `v`, which outlives the call.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut v as *mut u64) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

impl Volume {
    /// Opens the volume at `path` and reads its size.
    pub fn open(path: &Path) -> io::Result<Volume> {
        let meta = std::fs::metadata(path)?;
        let kind = if meta.file_type().is_block_device() {
            let major = libc::major(meta.rdev());
            if major == LOOP_MAJOR {
                VolumeKind::Loop
            } else if let Some(vg_lv) = lvm_name(path) {
                VolumeKind::Lvm(vg_lv)
            } else {
                VolumeKind::Block
            }
        } else {
            VolumeKind::File
        };
        let mut v = Volume { path: path.to_path_buf(), kind, physical: 0, state: SizeState::Current };
        v.physical = v.read_size()?;
        Ok(v)
    }

    /// The kind of volume.
    pub fn kind(&self) -> &VolumeKind {
        &self.kind
    }

    /// The cached physical size in bytes.
    pub fn physical(&self) -> u64 {
        self.physical
    }

    /// The cached size's state.
    pub fn state(&self) -> SizeState {
        self.state
    }

    /// Records that an extension to `size` bytes was requested.
    pub fn extension_requested(&mut self, size: u64) {
        self.state = SizeState::ExtensionRequested(size);
    }

    /// Records that the SPM reported the extension done.
    pub fn extended(&mut self, size: u64) {
        self.state = SizeState::Extended(size);
    }

    fn read_size(&self) -> io::Result<u64> {
        match self.kind {
            VolumeKind::File => Ok(std::fs::metadata(&self.path)?.len()),
            _ => blk_size(&File::open(&self.path)?),
        }
    }

    /// Makes the volume's current size visible and re-reads it.
    pub fn refresh(&mut self) -> io::Result<u64> {
        match &self.kind {
            VolumeKind::Lvm(vg_lv) => {
                let out = Command::new("lvchange").args(["--refresh", vg_lv]).output()?;
                if !out.status.success() {
                    return Err(io::Error::other(format!(
                        "lvchange --refresh {vg_lv}: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
            }
            VolumeKind::Loop => {
                let f = File::open(&self.path)?;
                // SAFETY: LOOP_SET_CAPACITY takes no argument; the fd is a loop device.
                if unsafe { libc::ioctl(f.as_raw_fd(), LOOP_SET_CAPACITY, 0) } < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            VolumeKind::Block | VolumeKind::File => {}
        }
        self.physical = self.read_size()?;
        self.state = SizeState::Refreshed;
        Ok(self.physical)
    }
}

/// `VG/LV` of an LVM volume, if `lvs` knows the path.
fn lvm_name(path: &Path) -> Option<String> {
    let out = Command::new("lvs").args(["--noheadings", "-o", "vg_name,lv_name"]).arg(path).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    Some(format!("{}/{}", it.next()?, it.next()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_volume_refresh() {
        let p = std::env::temp_dir().join(format!("thinblk-vol-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        struct Cleanup(std::path::PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let _cleanup = Cleanup(p.clone());
        let mut v = Volume::open(&p).unwrap();
        assert_eq!(v.kind(), &VolumeKind::File);
        assert_eq!(v.physical(), 4096);
        v.extension_requested(1 << 20);
        assert_eq!(v.state(), SizeState::ExtensionRequested(1 << 20));
        File::options().write(true).open(&p).unwrap().set_len(1 << 20).unwrap();
        v.extended(1 << 20);
        assert_eq!(v.physical(), 4096, "not visible before the refresh");
        assert_eq!(v.refresh().unwrap(), 1 << 20);
        assert_eq!(v.state(), SizeState::Refreshed);
    }
}

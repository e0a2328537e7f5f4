//! The mailbox volumes on storage (spec §1.15): whole 4 KiB blocks with O_DIRECT, and a
//! per-host lock file (`flock`) serializing the request block's read-modify-write among the
//! thinblk processes of one host.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::client::MailboxIo;
use super::wire::{block_offset, BLOCK_LEN};

/// A 4 KiB block aligned for O_DIRECT.
#[repr(C, align(4096))]
struct AlignedBlock([u8; BLOCK_LEN]);

/// One host's view of the two mailbox volumes.
pub struct FileMailbox {
    /// The SPM's inbox: we write our requests (and the doorbell) here.
    spm_inbox: File,
    /// The SPM's outbox: replies arrive here.
    spm_outbox: File,
    host: u16,
    lock: File,
    buf: Box<AlignedBlock>,
}

/// Opens a mailbox volume with O_DIRECT (buffered where the file system refuses it).
pub(crate) fn open_volume(path: &Path, write: bool) -> io::Result<File> {
    let open = |direct: bool| {
        let mut o = OpenOptions::new();
        o.read(true).write(write);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(path)
    };
    match open(true) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open(false),
        other => other,
    }
}

impl FileMailbox {
    /// Opens the mailbox volumes for host `host`, locking through `lock_path`.
    pub fn open(spm_inbox: &Path, spm_outbox: &Path, host: u16, lock_path: &Path) -> io::Result<FileMailbox> {
        Ok(FileMailbox {
            spm_inbox: open_volume(spm_inbox, true)?,
            spm_outbox: open_volume(spm_outbox, false)?,
            host,
            lock: OpenOptions::new().read(true).write(true).create(true).truncate(false).open(lock_path)?,
            buf: Box::new(AlignedBlock([0; BLOCK_LEN])),
        })
    }

    fn read_block(&mut self, outbox: bool, offset: u64) -> io::Result<[u8; BLOCK_LEN]> {
        let f = if outbox { &self.spm_outbox } else { &self.spm_inbox };
        let n = f.read_at(&mut self.buf.0, offset)?;
        if n != BLOCK_LEN {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("short mailbox read ({n} bytes)")));
        }
        Ok(self.buf.0)
    }

    fn write_block(&mut self, block: &[u8; BLOCK_LEN], offset: u64) -> io::Result<()> {
        self.buf.0.copy_from_slice(block);
        self.spm_inbox.write_all_at(&self.buf.0, offset)
    }
}

impl MailboxIo for FileMailbox {
    fn read_replies(&mut self) -> io::Result<[u8; BLOCK_LEN]> {
        self.read_block(true, block_offset(self.host))
    }

    fn read_requests(&mut self) -> io::Result<[u8; BLOCK_LEN]> {
        self.read_block(false, block_offset(self.host))
    }

    fn write_requests(&mut self, block: &[u8; BLOCK_LEN]) -> io::Result<()> {
        self.write_block(block, block_offset(self.host))
    }

    fn write_event(&mut self, block: &[u8; BLOCK_LEN]) -> io::Result<()> {
        self.write_block(block, 0)
    }

    fn lock(&mut self) -> io::Result<()> {
        loop {
            // SAFETY: flock on a file we own.
            if unsafe { libc::flock(self.lock.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn unlock(&mut self) {
        // SAFETY: flock on a file we own.
        unsafe { libc::flock(self.lock.as_raw_fd(), libc::LOCK_UN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::client::Client;
    use crate::mailbox::spm::Spm;
    use crate::mailbox::wire::{Extend, Uuid, CLEAN, SPM_REGION_LEN};

    #[test]
    fn handshake_through_files_with_two_processes() {
        let dir = std::env::temp_dir().join(format!("thinblk-mbox-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let inbox = dir.join("inbox");
        let outbox = dir.join("outbox");
        std::fs::write(&inbox, vec![0u8; 16 << 20]).unwrap();
        std::fs::write(&outbox, vec![0u8; 16 << 20]).unwrap();
        let lock = dir.join("host-5.lock");
        let domain = Uuid::parse("8adbc85e-e554-4ae0-b318-8a5465fe5fe1").unwrap();
        let vols = [
            Uuid::parse("d772f1c6-3ebb-43c3-a42e-73fcd8255a5f").unwrap(),
            Uuid::parse("11111111-2222-3333-4444-555555555555").unwrap(),
        ];
        let mut ios: Vec<FileMailbox> = (0..2).map(|_| FileMailbox::open(&inbox, &outbox, 5, &lock).unwrap()).collect();
        let mut clients: Vec<Client> = vols.iter().map(|v| Client::new(*v, Box::new(|| [9; 16]))).collect();
        for (c, io) in clients.iter_mut().zip(ios.iter_mut()) {
            c.start(io).unwrap();
        }
        for (k, (c, io)) in clients.iter_mut().zip(ios.iter_mut()).enumerate() {
            c.submit(Extend { domain, volume: vols[k], size_mib: 1000 + k as u64 }).unwrap();
            c.poll(io).unwrap();
        }
        // The SPM side, reading and writing the files directly.
        let mut spm = Spm::new();
        let region = std::fs::read(&inbox).unwrap();
        let scan = spm.scan(&region[..SPM_REGION_LEN]);
        assert_eq!(scan.requests.len(), 2);
        let out = OpenOptions::new().write(true).open(&outbox).unwrap();
        for (id, req) in &scan.requests {
            let (off, block) = spm.reply(*id, req, true).unwrap();
            out.write_all_at(&block, off).unwrap();
        }
        for (k, (c, io)) in clients.iter_mut().zip(ios.iter_mut()).enumerate() {
            let done = c.poll(io).unwrap();
            assert_eq!(done.len(), 1);
            assert_eq!(done[0].request.size_mib, 1000 + k as u64);
        }
        let region = std::fs::read(&inbox).unwrap();
        assert_eq!(&region[5 * 4096..5 * 4096 + 64], &CLEAN[..]);
        assert_eq!(&region[5 * 4096 + 64..5 * 4096 + 128], &CLEAN[..]);
        assert_eq!(&region[..4], &[0, b'e', b'v', b't'][..], "doorbell");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

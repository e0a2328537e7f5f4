//! Concurrent writers into the same new clusters on storage not known to read zeroes (so
//! every partial allocation fills): the fill of one writer must never overwrite another's
//! data, and metadata must stay consistent. Run from several threads like several queues.

use std::io;
use std::sync::Arc;

use thinblk_qcow2::{check, create, CreateOptions, Mapping, MemStorage, OpenOptions, Qcow2, Storage};

/// In-memory storage whose zeroing is slow, so a fill is a wide window for a racing writer.
#[derive(Default)]
struct SlowFill(MemStorage);

impl Storage for SlowFill {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        self.0.size()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        std::thread::sleep(std::time::Duration::from_micros(300));
        self.0.write_at(&vec![0u8; len as usize], offset)
    }
}

#[test]
fn concurrent_partial_writes_into_the_same_new_clusters() {
    let cs = 65536u64;
    let size = 64 << 20;
    let st = Arc::new(SlowFill::default());
    create(st.as_ref(), &CreateOptions { size, cluster_size: cs, backing: None }).unwrap();
    // Garbage past the metadata, and nothing known to read zeroes: every fill is real IO.
    let end = st.size().unwrap();
    st.write_at(&vec![0xeeu8; 70 << 20], end).unwrap();
    let img = Arc::new(Qcow2::open(st.clone(), OpenOptions { zeroes_from: u64::MAX, ..Default::default() }).unwrap());
    let threads = 4u64;
    let clusters = 256u64;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let img = img.clone();
            let st = st.clone();
            std::thread::spawn(move || {
                // Thread t writes slice t (16 KiB) of every cluster, in its own order.
                for k in 0..clusters {
                    // Everybody starts on the same clusters, so writers meet on each one.
                    let c = (k + t / 2) % clusters;
                    let off = c * cs + t * (cs / threads);
                    let data = vec![(t as u8 + 1) * 16 + (c % 16) as u8; (cs / threads) as usize];
                    let mut ranges = Vec::new();
                    let ticket = img.map_write(off, data.len() as u64, &mut ranges).unwrap();
                    for r in &ranges {
                        let Mapping::Data(h) = r.mapping else { panic!() };
                        let s = (r.guest - off) as usize;
                        st.write_at(&data[s..s + r.len as usize], h).unwrap();
                    }
                    img.write_done(&ticket, true).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    img.flush_metadata().unwrap();
    for c in 0..clusters {
        let mut ranges = Vec::new();
        img.map_read(c * cs, cs, &mut ranges).unwrap();
        assert_eq!(ranges.len(), 1, "cluster {c} mapped in pieces");
        let Mapping::Data(h) = ranges[0].mapping else { panic!("cluster {c} not allocated") };
        let mut buf = vec![0u8; cs as usize];
        st.read_at(&mut buf, h).unwrap();
        for t in 0..threads {
            let want = (t as u8 + 1) * 16 + (c % 16) as u8;
            let a = (t * (cs / threads)) as usize;
            let b = a + (cs / threads) as usize;
            assert!(buf[a..b].iter().all(|&x| x == want), "cluster {c}: slice of thread {t} overwritten");
        }
    }
    let report = check(st.as_ref()).unwrap();
    assert_eq!(report.corruptions, 0, "{:?}", report.messages);
}

//! A loop device standing in for an LV: grown with truncate, made visible by the refresh.

mod common;

use common::{LoopDev, TestDir};
use thinblk::thin::volume::{Volume, VolumeKind};

#[test]
fn loop_device_grows_after_refresh() {
    let dir = TestDir::new("vol-loop");
    let backing = dir.path("lv.img");
    std::fs::write(&backing, vec![0u8; 8 << 20]).unwrap();
    let lv = LoopDev::attach(&backing);
    let mut v = Volume::open(&lv.0).unwrap();
    assert_eq!(v.kind(), &VolumeKind::Loop);
    assert_eq!(v.physical(), 8 << 20);
    std::fs::File::options().write(true).open(&backing).unwrap().set_len(24 << 20).unwrap();
    assert_eq!(Volume::open(&lv.0).unwrap().physical(), 8 << 20, "loop size changes only on refresh");
    assert_eq!(v.refresh().unwrap(), 24 << 20);
}

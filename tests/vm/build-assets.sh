#!/usr/bin/env bash
# Builds the guest for tests/guest_qemu.rs into DIR: a Debian cloud kernel (virtio as modules)
# and a busybox initramfs carrying mke2fs/e2fsck (in /opt, apart from busybox applets) and tests/vm/guest-init as /init;
# plus initramfs-fio.cpio.gz, the same with fio and its libraries (large: for the fio guests of
# tests/guest_qemu.rs, tests/migration.rs and tests/chain_guest.rs);
# plus initramfs-lvm.cpio.gz for tests/lvm_vm.rs: busybox, the device-mapper modules, lvm2 and
# qemu-img with their libraries (the test appends thinblk, its client and tests/vm/lvm-init).
# Needs: apt-get (download only), dpkg, busybox-static, e2fsprogs, cpio, gzip, fio, lvm2, qemu-utils.
set -euo pipefail
out=${1:?usage: build-assets.sh DIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
# One build at a time (tests run in parallel, and several test binaries may ask).
exec 9>"$out/.lock"
flock 9
stamp="$out/.inputs"
inputs=$(sha256sum "$here/guest-init" "$0" | sha256sum | cut -c1-16)
if [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.cpio.gz" ] && [ -f "$out/initramfs-fio.cpio.gz" ] && [ -f "$out/initramfs-lvm.cpio.gz" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$inputs" ]; then
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# (No early exit in a pipe: under pipefail, a writer cut off by it would fail the build with
# SIGPIPE, depending on timing. awk reads everything and prints the first match.)
pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ && !p {print $2; p=1}')
[ -n "$pkg" ] || { echo "build-assets: no linux-image-cloud-amd64 candidate (run apt-get update)" >&2; exit 1; }
(cd "$work" && apt-get download -q "$pkg" >/dev/null 2>&1)
dpkg -x "$work"/linux-image-*.deb "$work/k"
kver=$(ls "$work/k/lib/modules")

root="$work/root"
mkdir -p "$root"/{bin,sbin,opt,lib/modules,proc,sys,dev,mnt,tmp,etc}
cp /bin/busybox "$root/bin/busybox"
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
  f=$(find "$work/k/lib/modules/$kver" -name "$m.ko*" -print -quit)
  [ -n "$f" ] && cp "$f" "$root/lib/modules/"
done
# Copies binary $1 into $2/opt with the shared libraries it needs.
add_binary() {
  cp "$1" "$2/opt/"
  for lib in $(ldd "$1" | awk '/=>/ {print $3} /ld-linux/ && !/=>/ {print $1}'); do
    cp --parents -L "$lib" "$2/"
  done
}
for b in /sbin/mke2fs /sbin/e2fsck; do
  add_binary "$b" "$root"
done
cp /etc/mke2fs.conf "$root/etc/" 2>/dev/null || true
cp "$here/guest-init" "$root/init"
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initramfs.cpio.gz.tmp"
command -v fio >/dev/null || { echo "build-assets: fio is missing (apt-get install fio)" >&2; exit 1; }
cp -a "$root" "$work/root-fio"
add_binary "$(command -v fio)" "$work/root-fio"
(cd "$work/root-fio" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initramfs-fio.cpio.gz.tmp"

# The LVM guest: device-mapper (dm-snapshot for lvcreate -s), lvm2 without udev, qemu-img.
command -v lvm >/dev/null || { echo "build-assets: lvm2 is missing (apt-get install lvm2)" >&2; exit 1; }
lroot="$work/root-lvm"
mkdir -p "$lroot"/{bin,sbin,opt,lib/modules,proc,sys,dev,mnt,tmp,etc/lvm,run/lock/lvm}
cp /bin/busybox "$lroot/bin/busybox"
cp "$root"/lib/modules/*.ko* "$lroot/lib/modules/"
for m in dm-mod dm-bufio dm-snapshot; do
  f=$(find "$work/k/lib/modules/$kver" -name "$m.ko*" -print -quit)
  [ -n "$f" ] || { echo "build-assets: kernel has no $m" >&2; exit 1; }
  cp "$f" "$lroot/lib/modules/"
done
add_binary "$(command -v lvm)" "$lroot"
add_binary "$(command -v qemu-img)" "$lroot"
# thinblk and its client are Rust programs: glibc plus libgcc_s (unwinding).
gcc_s=$(ldconfig -p | awk '/libgcc_s.so.1 .*x86-64/ && !p {print $NF; p=1}')
[ -n "$gcc_s" ] && cp --parents -L "$gcc_s" "$lroot/"
for t in pvcreate vgcreate vgs lvcreate lvs lvextend lvchange lvremove; do
  ln -s /opt/lvm "$lroot/sbin/$t"
done
cat > "$lroot/etc/lvm/lvm.conf" <<'CONF'
devices {
  obtain_device_list_from_udev = 0
  external_device_info_source = "none"
  use_devicesfile = 0
}
activation {
  udev_sync = 0
  udev_rules = 0
  monitoring = 0
}
backup {
  backup = 0
  archive = 0
}
CONF
(cd "$lroot" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initramfs-lvm.cpio.gz.tmp"
cp "$work/k/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
mv "$out/initramfs-fio.cpio.gz.tmp" "$out/initramfs-fio.cpio.gz"
mv "$out/initramfs-lvm.cpio.gz.tmp" "$out/initramfs-lvm.cpio.gz"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$inputs" > "$stamp"
echo "build-assets: kernel $kver, initramfs $(du -h "$out/initramfs.cpio.gz" | cut -f1)"

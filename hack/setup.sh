#!/usr/bin/env bash
# Installs what the driver and its tests need on a fresh Debian machine (as root).
set -euo pipefail
need=()
for tool in mkfs.xfs:xfsprogs xfs_growfs:xfsprogs mkfs.ext4:e2fsprogs resize2fs:e2fsprogs losetup:mount blkid:util-linux sfdisk:fdisk mkfs.btrfs:btrfs-progs; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
modprobe loop 2>/dev/null || true
[ -e /dev/loop-control ] || { echo "setup: /dev/loop-control is missing; loop devices are required" >&2; exit 1; }

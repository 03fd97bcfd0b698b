#!/usr/bin/env bash
# Installs what the driver and its tests need on a fresh Debian machine (as root).
set -euo pipefail
missing() { # TOOL:PACKAGE... -> the packages whose tool is not installed
  for tool in "$@"; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || echo "${tool##*:}"
  done
}
mapfile -t need < <(missing mkfs.xfs:xfsprogs xfs_growfs:xfsprogs mkfs.ext4:e2fsprogs \
  resize2fs:e2fsprogs losetup:mount blkid:util-linux sfdisk:fdisk mkfs.btrfs:btrfs-progs)
# hack/image.sh builds the image without a daemon; the node e2e runs it with
# podman (runc: crun fails on hybrid cgroups). No recommends: root needs
# neither fakeroot nor slirp4netns, and the e2e runs without a network.
mapfile -t image_need < <(missing mmdebstrap:mmdebstrap umoci:umoci skopeo:skopeo \
  podman:podman runc:runc)
if [ $((${#need[@]} + ${#image_need[@]})) -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  if [ ${#need[@]} -gt 0 ]; then
    apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  if [ ${#image_need[@]} -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends "${image_need[@]}" >/dev/null
  fi
fi
modprobe loop 2>/dev/null || true
[ -e /dev/loop-control ] || { echo "setup: /dev/loop-control is missing; loop devices are required" >&2; exit 1; }

#!/usr/bin/env bash
# Builds the driver image without a container daemon (as root):
#
#   target/image/hostpath-csi.oci.tar   an OCI archive, tagged
#                                       localhost/hostpath-csi:<crate version>
#
# This script is the source of truth for the image; deploy/Containerfile is
# kept equivalent (same package list, dpkg filters, pruning and entrypoint)
# for those who build with a daemon. Push the archive with
#   skopeo copy oci-archive:target/image/hostpath-csi.oci.tar docker://REGISTRY/hostpath-csi:TAG
#
# Two layers:
#  1. base: Debian bookworm from mmdebstrap (--variant=essential, merged /usr)
#     plus deploy/image/packages, without docs, manuals and translations
#     (deploy/image/dpkg-excludes), then stripped by deploy/image/prune.sh to
#     the tools the driver runs: no apt, no dpkg, no python, no perl, no
#     compiler. Cached per machine under /var/cache/hostpath-csi-image, keyed
#     by a hash of the recipe and the apt sources, rebuilt after a week so
#     security updates land. Never shared between machines.
#  2. the release binary at /usr/local/bin/hostpath-csi, the entrypoint.
#
# Reproducible: both layer tars are written with sorted names, clamped
# mtimes, numeric owners and no atime/ctime, so the same inputs give the same
# layer, config and manifest digests. The base's timestamps are clamped to a
# fixed date (BASE_EPOCH) so its digest survives commits; the binary layer and
# the config take SOURCE_DATE_EPOCH (default: the last commit's time).
# Not reproducible: the base follows whatever package versions the mirror
# serves today (point releases, security updates; point the apt sources at
# snapshot.debian.org to pin them); the binary differs with the toolchain and
# the checkout's and the target directory's paths (rustc records source
# paths, including build.rs output); and the outer
# oci-archive tar is written by skopeo with its own timestamps, so compare
# digests (target/image/digests), not the archive's checksum.
#
# On a machine shared with other builds, build first under your lock and
# skip it here: flock /tmp/cargo.lock cargo build --release --bin hostpath-csi
# && HPC_IMAGE_SKIP_BUILD=1 bash hack/image.sh
#
# Environment: HPC_APT_SOURCES (apt sources file for the base; default the
# machine's own), HPC_IMAGE_CACHE (cache directory), HPC_IMAGE_BASE_MAX_DAYS
# (base age limit, default 7), HPC_IMAGE_SKIP_BUILD=1 (use the binary already
# in target/release), SOURCE_DATE_EPOCH.
set -euo pipefail
cd "$(dirname "$0")/.."
umask 022
export LC_ALL=C.UTF-8

if [ "$(id -u)" -ne 0 ]; then
  echo "image.sh: run as root (mmdebstrap installs packages into a chroot)" >&2
  exit 1
fi
for tool in mmdebstrap umoci skopeo; do
  command -v "$tool" >/dev/null || { echo "image.sh: $tool is missing (apt-get install mmdebstrap umoci skopeo)" >&2; exit 1; }
done

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
image="localhost/hostpath-csi:$version"
suite=bookworm
arch=$(dpkg --print-architecture)
BASE_EPOCH=1704067200 # 2024-01-01T00:00:00Z
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo "$BASE_EPOCH")}
recipe=deploy/image
out_dir=target/image
archive=$out_dir/hostpath-csi.oci.tar
cache=${HPC_IMAGE_CACHE:-/var/cache/hostpath-csi-image}
max_days=${HPC_IMAGE_BASE_MAX_DAYS:-7}

# The machine's own apt sources (deb822 or one-line), pasted into the
# chroot by mmdebstrap, so no mirror is named here.
sources=${HPC_APT_SOURCES:-}
if [ -z "$sources" ]; then
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [ -s "$f" ]; then sources=$f; break; fi
  done
fi
[ -n "$sources" ] && [ -s "$sources" ] || { echo "image.sh: no apt sources file found (set HPC_APT_SOURCES)" >&2; exit 1; }

started=$SECONDS
tmp=$(mktemp -d /tmp/hpc-image.XXXXXX)
trap 'rm -rf --one-file-system "$tmp"' EXIT

# The tar flags that make a layer depend only on its contents.
layer_tar() { # DIR EPOCH OUT [tar args...]
  local dir=$1 epoch=$2 out=$3
  shift 3
  tar -C "$dir" --sort=name --mtime="@$epoch" --clamp-mtime --numeric-owner \
    --format=pax --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    --xattrs --one-file-system -cf "$out" "$@"
}

build_base() { # OUT
  local rootfs=$tmp/rootfs
  if ! SOURCE_DATE_EPOCH=$BASE_EPOCH mmdebstrap --mode=root --variant=essential \
    --architectures="$arch" \
    --include="$(grep -v '^#' "$recipe/packages" | xargs | tr ' ' ,)" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt="$recipe/dpkg-excludes" \
    --format=directory "$suite" "$rootfs" "$sources" >"$tmp/mmdebstrap.log" 2>&1; then
    tail -n 40 "$tmp/mmdebstrap.log" >&2
    echo "image.sh: mmdebstrap failed" >&2
    exit 1
  fi
  sh "$recipe/prune.sh" "$rootfs"
  # Device nodes come from the runtime, not the image.
  layer_tar "$rootfs" "$BASE_EPOCH" "$1.part" --exclude='./dev/*' .
  rm -rf "$rootfs"
  mv "$1.part" "$1"
}

# Layer 1: the base, from this machine's cache when it is fresh.
key=$({
  echo "recipe 1 $suite $arch $BASE_EPOCH"
  cat "$recipe/packages" "$recipe/dpkg-excludes" "$recipe/prune.sh" "$sources"
  mmdebstrap --version
} | sha256sum | cut -c1-16)
mkdir -p "$cache"
base=$cache/base-$key.tar
exec 9>"$cache/.lock"
flock 9
if [ -s "$base" ] && [ -n "$(find "$base" -mtime "-$max_days")" ]; then
  echo "image.sh: base layer from the cache ($base)"
else
  echo "image.sh: building the base layer with mmdebstrap ($suite, $sources)"
  base_started=$SECONDS
  build_base "$base"
  find "$cache" -maxdepth 1 -name 'base-*.tar' ! -name "base-$key.tar" -delete
  echo "image.sh: base layer built in $((SECONDS - base_started)) s"
fi
flock -u 9

# Layer 2: the driver.
if [ "${HPC_IMAGE_SKIP_BUILD:-0}" != 1 ]; then
  cargo build --release --locked --bin hostpath-csi
fi
install -D -m 0755 "${CARGO_TARGET_DIR:-target}/release/hostpath-csi" "$tmp/driver/usr/local/bin/hostpath-csi"
layer_tar "$tmp/driver" "$SOURCE_DATE_EPOCH" "$tmp/driver.tar" usr

# The image: umoci writes an OCI layout, skopeo packs it into an archive.
rfc3339() { date -u -d "@$1" +%Y-%m-%dT%H:%M:%SZ; }
oci=$tmp/oci
umoci init --layout "$oci"
umoci new --image "$oci:$version"
umoci raw add-layer --image "$oci:$version" --history.created "$(rfc3339 "$BASE_EPOCH")" \
  --history.created_by "mmdebstrap --variant=essential $suite + deploy/image (hack/image.sh)" "$base"
umoci raw add-layer --image "$oci:$version" --history.created "$(rfc3339 "$SOURCE_DATE_EPOCH")" \
  --history.created_by "hostpath-csi $version (cargo build --release)" "$tmp/driver.tar"
umoci config --image "$oci:$version" --no-history \
  --created "$(rfc3339 "$SOURCE_DATE_EPOCH")" --os linux --architecture "$arch" \
  --config.entrypoint /usr/local/bin/hostpath-csi \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.label org.opencontainers.image.title=hostpath-csi \
  --config.label org.opencontainers.image.version="$version" \
  --config.label org.opencontainers.image.licenses=Apache-2.0
mkdir -p "$out_dir"
rm -f "$archive"
skopeo copy --quiet --insecure-policy "oci:$oci:$version" "oci-archive:$archive:$image"

# What was built: digests to compare between builds, and the sizes.
python3 - "$oci" "$version" "$out_dir/digests" <<'EOF'
import json, sys
oci, tag, out = sys.argv[1:]
index = json.load(open(f"{oci}/index.json"))
desc = next(m for m in index["manifests"]
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
blob = lambda d: f"{oci}/blobs/{d['digest'].replace(':', '/')}"
manifest = json.load(open(blob(desc)))
lines = [f"manifest {desc['digest']}", f"config   {manifest['config']['digest']}"]
lines += [f"layer    {l['digest']} {l['size']}" for l in manifest["layers"]]
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"image.sh: compressed layers {sum(l['size'] for l in manifest['layers']) / 1e6:.1f} MB")
EOF
echo "image.sh: uncompressed $(( ($(stat -c %s "$base") + $(stat -c %s "$tmp/driver.tar")) / 1000000 )) MB" \
  "(base $(( $(stat -c %s "$base") / 1000000 )) MB, driver $(( $(stat -c %s "$tmp/driver.tar") / 1000000 )) MB)"
echo "image.sh: $archive: $image, $(( $(stat -c %s "$archive") / 1000000 )) MB, built in $((SECONDS - started)) s"

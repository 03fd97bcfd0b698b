#!/bin/sh
# Strips a Debian rootfs down to what the driver runs: purges the packages
# that only the excluded xfsprogs tools (python3, ICU), logins (PAM,
# Kerberos), package management (apt, debconf, dpkg) or perl need, drops
# package manager state (the dpkg status file stays, so image scanners can
# list what is inside), then checks that every program left still finds its
# libraries and that every tool the driver runs is there.
# Usage: prune.sh ROOT [DPKG-EXCLUDES]   (ROOT=/ inside a Containerfile build)
set -eu
root=${1:?usage: prune.sh ROOT [DPKG-EXCLUDES]}
root=${root%/}
excludes=${2:-$(dirname "$0")/dpkg-excludes}
in_root() { chroot "${root:-/}" "$@"; }
purge() {
  # Packages that are not installed are skipped. dpkg's chatter (forced
  # removals of Essential packages) is shown only when it fails.
  if ! out=$(in_root dpkg --purge --force-depends --force-remove-essential "$@" 2>&1); then
    printf '%s\n' "$out" >&2
    exit 1
  fi
}
# python3 first: its prerm needs the interpreter.
purge python3 libpython3-stdlib
purge python3.11 python3-minimal python3.11-minimal libpython3.11-stdlib \
  libpython3.11-minimal media-types libsqlite3-0 libexpat1 libreadline8 \
  readline-common libffi8 libicu72 libstdc++6 libedit2 libbsd0 \
  libdevmapper1.02.1 dmsetup
# Logins and PAM modules: nobody logs into the driver's container.
purge login passwd libpam-modules libpam-modules-bin libpam-runtime libnsl2 \
  libtirpc3 libtirpc-common libgssapi-krb5-2 libkrb5-3 libk5crypto3 \
  libkrb5support0 libkeyutils1 libssl3 libdb5.3 libsemanage2 \
  libsemanage-common libsepol2
# Package management, and what bookworm-slim has beyond the essential set
# the mmdebstrap base starts from (apt, mount, tzdata).
purge apt libapt-pkg6.0 gpgv debian-archive-keyring adduser libseccomp2 \
  libgnutls30 libhogweed6 libnettle8 libp11-kit0 libtasn1-6 libidn2-0 \
  libunistring2 libxxhash0 mount tzdata debconf perl-base
purge dpkg
in_root ldconfig
# Files the dpkg filters keep out that a base image installed before they
# were in place. find's -path matches like dpkg's globs ('*' spans '/').
set --
while IFS= read -r line; do
  case $line in
    path-exclude=*) set -- "$@" -o -path "$root${line#path-exclude=}" ;;
  esac
done <"$excludes"
keep=$(grep '^path-include=' "$excludes" | sed "s|^path-include=|$root|")
if [ $# -gt 0 ]; then
  shift
  find "${root:-/}" -xdev \( "$@" \) ! -type d | while IFS= read -r f; do
    set -f # the include globs are patterns here, not file names
    for k in $keep; do
      # shellcheck disable=SC2254
      case $f in $k) continue 2 ;; esac
    done
    rm -f "$f"
  done
  find "${root:-/}" -xdev -depth \( "$@" \) -type d -empty -delete
fi
rm -rf "$root"/etc/apt "$root"/var/lib/apt "$root"/var/cache/apt \
  "$root"/var/cache/debconf "$root"/var/cache/ldconfig "$root"/etc/dpkg \
  "$root"/var/lib/dpkg/info "$root"/var/lib/dpkg/triggers \
  "$root"/var/lib/dpkg/updates "$root"/var/lib/dpkg/alternatives \
  "$root"/var/lib/dpkg/diversions "$root"/var/lib/dpkg/statoverride \
  "$root"/var/lib/dpkg/available "$root"/var/lib/dpkg/arch \
  "$root"/var/lib/dpkg/lock "$root"/var/lib/dpkg/lock-frontend \
  "$root"/var/lib/dpkg/*-old "$root"/etc/.pwd.lock "$root"/var/log/* \
  "$root"/etc/systemd "$root"/var/lib/systemd \
  "$root"/etc/hostname "$root"/etc/resolv.conf "$root"/etc/*- 2>/dev/null || true
# Alternatives whose targets were filtered out (manual pages).
in_root find /etc/alternatives -xtype l -delete
# Every ELF program and library left must find its libraries.
broken=$(in_root sh -c 'for f in /usr/bin/* /usr/sbin/* /usr/lib/*/*.so* /usr/local/bin/*; do
  [ -f "$f" ] || continue
  ldd "$f" 2>/dev/null | grep -q "not found" && echo "$f"
done; true')
if [ -n "$broken" ]; then
  echo "prune.sh: these lost a library:" $broken >&2
  exit 1
fi
for tool in blkid mkfs.xfs xfs_growfs mkfs.ext4 e2fsck resize2fs; do
  in_root sh -c "command -v $tool" >/dev/null || { echo "prune.sh: $tool is missing" >&2; exit 1; }
done

#!/bin/sh
# mmdebstrap customize hook: runs on the host with $1 = the new root.
# Fetches the kernel package inside the chroot (so the host's own apt, which
# may be Ubuntu or absent, plays no part) and unpacks it under /gondolin-kernel (not /tmp: mmdebstrap empties /tmp) for the
# image builder to pick up. No initramfs-tools: we build our own initramfs.
set -eu
root="$1"
kernel_meta="$2"
chroot "$root" sh -eu -c '
  meta="$1"
  pkg=$(apt-cache depends "$meta" | sed -n "s/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p" | head -n 1)
  [ -n "$pkg" ] || { echo "cannot resolve kernel package from $meta" >&2; exit 1; }
  mkdir -p /gondolin-kernel
  cd /gondolin-kernel
  apt-get download -q "$pkg" 2>&1
  dpkg-deb -x ./*.deb extract
  rm -f ./*.deb
' sh "$kernel_meta"
echo gondolin > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 gondolin\n' > "$root/etc/hosts"
printf 'nameserver 192.168.127.1\n' > "$root/etc/resolv.conf"
printf '/dev/vda / ext4 rw,noatime 0 1\n' > "$root/etc/fstab"
# TLS 1.3 clients in the guest (curl, Python's ssl, anything on OpenSSL) offer
# AES-128-GCM first: under TCG the guest's own AES-GCM is the ceiling for HTTPS
# through the MITM, and AES-128 runs ~10 % faster than OpenSSL's default first
# choice AES-256 (docs/network.md). The MITM honours the client's order.
cnf="$root/etc/ssl/openssl.cnf"
grep -q '^\[openssl_init\]' "$cnf" || { echo "no [openssl_init] section in $cnf" >&2; exit 1; }
sed -i 's/^\[openssl_init\]$/[openssl_init]\nssl_conf = gondolin_ssl_sect/' "$cnf"
cat >> "$cnf" <<'CNF'

[gondolin_ssl_sect]
system_default = gondolin_system_default_sect

[gondolin_system_default_sect]
Ciphersuites = TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256
CNF

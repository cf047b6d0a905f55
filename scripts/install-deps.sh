#!/bin/sh
# Install the host packages pytest-gondolin needs, if any are missing.
# Debian/Ubuntu: apt-get (as root, or through sudo). macOS: prints the
# Homebrew command (image building needs Linux; see README).
set -eu
need=""
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-system-x86_64 || need="$need qemu-system-x86"
have qemu-img || need="$need qemu-utils"
have mmdebstrap || need="$need mmdebstrap"
have mkfs.ext4 || [ -x /sbin/mkfs.ext4 ] || need="$need e2fsprogs"
have setpriv || need="$need util-linux"
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need="$need python3-venv"
[ -z "$need" ] && exit 0
if [ "$(uname -s)" = Darwin ]; then
  echo "missing host tools; install them with: brew install qemu python" >&2
  exit 1
fi
if ! have apt-get; then
  echo "missing host packages:$need (no apt-get here; install them with your package manager)" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing host packages:$need" >&2
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
# shellcheck disable=SC2086
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $need >/dev/null

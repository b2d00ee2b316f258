#!/usr/bin/env bash
# Bring a fresh Debian machine up to what `make test`, `make lab` and `make bench` need.
# Idempotent: it installs Debian packages only when missing and rebuilds the venv only when
# pyproject.toml changed, so a second run takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test,dev}"

# command -> Debian package that provides it
declare -A need=(
  [ip]=iproute2 [nft]=nftables [iperf3]=iperf3 [dnsperf]=dnsperf [dnsmasq]=dnsmasq-base
  [tcpdump]=tcpdump [ping]=iputils-ping [systemd-analyze]=systemd [pgrep]=procps
  [tini]=tini [setpriv]=util-linux
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${need[$cmd]}")
done
# Tasks see the host's root file system, read-only: the lab's demo workloads and the tests run
# Debian's /usr/bin/python3 inside them (a pyenv or venv interpreter may be hidden from tasks).
[ -x /usr/bin/python3 ] || missing+=(python3-minimal)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "bootstrap: missing Debian packages (${missing[*]}); run as root to install them" >&2
    exit 1
  fi
  echo "bootstrap: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

py="${PYTHON:-python3}"
stamp=".venv/.installed-$extras"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi

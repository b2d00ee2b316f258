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
  [tini]=tini [setpriv]=util-linux [curl]=curl
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${need[$cmd]}")
done
# Tasks see the host's root file system, read-only: the lab's demo workloads and the tests run
# Debian's /usr/bin/python3 inside them (a pyenv or venv interpreter may be hidden from tasks).
[ -x /usr/bin/python3 ] || missing+=(python3-minimal)
# tests/netns/test_install.py runs deploy/install.sh, which makes its venv from Debian's python3:
# that needs ensurepip, which only python3-venv brings.
/usr/bin/python3 -m ensurepip --version >/dev/null 2>&1 || missing+=(python3-venv)
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

# Prometheus, which tests/netns/test_prometheus_scrape.py runs itself (a binary, never a service).
# The package would start and enable its own daemon: during the install a policy-rc.d answering
# 101 ("not now") keeps invoke-rc.d from starting it (one already there is put back after), the
# unit is disabled where systemd runs, and a daemon that started anyway is stopped.
if [ ! -x /usr/bin/prometheus ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "bootstrap: prometheus is missing; run as root to install it" >&2
    exit 1
  fi
  echo "bootstrap: installing prometheus (its daemon is not started)"
  export DEBIAN_FRONTEND=noninteractive
  policy=/usr/sbin/policy-rc.d
  saved_policy=""
  if [ -e "$policy" ]; then
    saved_policy=$(mktemp "$policy.meshnet.XXXXXX")
    cp -p "$policy" "$saved_policy"
  fi
  restore_policy() {
    if [ -n "$saved_policy" ]; then mv -f "$saved_policy" "$policy"; else rm -f "$policy"; fi
  }
  trap restore_policy EXIT
  printf '#!/bin/sh\n# deploy/bootstrap.sh: no daemon starts while it installs prometheus\nexit 101\n' \
    >"$policy"
  chmod 755 "$policy"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  restore_policy
  trap - EXIT
  if [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  fi
  # The package's daemon runs as its own user "prometheus" (tests run theirs as root).
  if daemon=$(pgrep -u prometheus -x prometheus 2>/dev/null); then
    echo "bootstrap: stopping the prometheus daemon the package started"
    # shellcheck disable=SC2086  # one word per PID
    kill $daemon 2>/dev/null || true
  fi
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

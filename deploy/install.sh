#!/usr/bin/env bash
# Install meshnet on a Debian host (12 or later), from the checkout this script lives in:
#
#   sudo deploy/install.sh               install, or update to this checkout (idempotent)
#   sudo deploy/install.sh --uninstall   remove everything the install made
#
# What it makes:
#   $PREFIX (/opt/meshnet)   a venv of its own holding meshnet (Debian 12 refuses `pip install`
#                            into the system Python), the docs under share/doc/meshnet/, and
#                            install-manifest: every path made outside $PREFIX
#   $BINDIR (/usr/local/bin) meshnetd and meshctl, symlinks into the venv
#   $UNITDIR (/etc/systemd/system) meshnet.service, its ExecStart and Documentation in $PREFIX
#   /etc/meshnet             mode 0700, for meshnet.toml, cluster.key, ca.crt, node.crt and
#                            node.key; the install puts only meshnet.toml.example there
#   $BASH_COMPLETIONS/meshctl and $ZSH_COMPLETIONS/_meshctl, generated from meshctl's parser
# and the Debian packages meshnet needs, when missing (python3-venv, iproute2, nftables, tini,
# util-linux). The cluster CA stays offline (`meshctl ca init --out DIR` on another machine), so
# no CA directory is made here.
#
# --uninstall removes what the manifest lists and $PREFIX; it keeps what the install did not
# make: your meshnet.toml and keys in /etc/meshnet (and so /etc/meshnet itself), the agent's
# state in /var/lib/meshnet, and the Debian packages.
#
# The locations can be moved by environment: PREFIX, BINDIR, UNITDIR, BASH_COMPLETIONS,
# ZSH_COMPLETIONS; PYTHON is the interpreter the venv is made from (default Debian's
# /usr/bin/python3: a pyenv or other interpreter under /root or /home would be hidden from the
# service by its ProtectHome=yes). /etc/meshnet stays: meshnetd, meshctl and the unit name it.
#
# Exit codes: 0 done (or nothing to do); 1 failed (one line saying why); 2 usage error.
set -euo pipefail
umask 022

PREFIX="${PREFIX:-/opt/meshnet}"
BINDIR="${BINDIR:-/usr/local/bin}"
UNITDIR="${UNITDIR:-/etc/systemd/system}"
CONFDIR=/etc/meshnet
BASH_COMPLETIONS="${BASH_COMPLETIONS:-/usr/share/bash-completion/completions}"
ZSH_COMPLETIONS="${ZSH_COMPLETIONS:-/usr/share/zsh/vendor-completions}"
PYTHON="${PYTHON:-/usr/bin/python3}"

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MANIFEST="$PREFIX/install-manifest"
# The unit in the repository names the default PREFIX; another PREFIX is substituted.
UNIT_PREFIX=/opt/meshnet

say() { echo "install.sh: $*"; }
die() { echo "install.sh: $*" >&2; exit 1; }
usage() {
  echo "usage: deploy/install.sh [--uninstall]   (see the comment at its top)" >&2
  exit 2
}

# ---- the manifest: what was made outside $PREFIX, one "KIND PATH" a line --------------------
# KIND is f (file), l (symlink) or d (directory). $PREFIX itself is removed whole.

PENDING=()  # records made before $PREFIX (and so the manifest) exists

record() {
  case "$2" in "$PREFIX"/*) return 0 ;; esac  # removed with $PREFIX
  if [ ! -f "$MANIFEST" ]; then
    PENDING+=("$1 $2")
  elif ! grep -qxF -- "$1 $2" "$MANIFEST"; then
    echo "$1 $2" >>"$MANIFEST"
  fi
}

ours() { grep -qxF -- "$1 $2" "$MANIFEST" 2>/dev/null; }

# make_dir DIR MODE: create DIR and its missing parents (0755), DIR itself with MODE; records
# each directory it created.
make_dir() {
  local dir="$1" mode="$2" path="" part
  local -a parts
  IFS=/ read -ra parts <<<"${dir#/}"
  for part in "${parts[@]}"; do
    path="$path/$part"
    if [ ! -d "$path" ]; then
      [ -e "$path" ] && die "$path exists and is not a directory"
      if [ "$path" = "$dir" ]; then mkdir -m "$mode" "$path"; else mkdir -m 0755 "$path"; fi
      case "$path" in
        "$PREFIX"/*) ;;  # inside the venv: removed with it, not worth a line
        "$PREFIX") say "made $path" ;;
        *) record d "$path"; say "made $path" ;;
      esac
    fi
  done
}

# put SRC DEST MODE: install a file, only when its content or mode differs (CHANGED says
# whether it did). A DEST outside $PREFIX that this script did not make is never overwritten.
CHANGED=no
put() {
  local src="$1" dest="$2" mode="$3"
  CHANGED=no
  if [ -e "$dest" ] || [ -L "$dest" ]; then
    case "$dest" in
      "$PREFIX"/*) ;;
      *) ours f "$dest" || die "$dest exists and was not installed by deploy/install.sh; move it away and run again" ;;
    esac
    if [ -f "$dest" ] && [ ! -L "$dest" ] && cmp -s "$src" "$dest" &&
      [ "$(stat -c %a "$dest")" = "${mode#0}" ]; then
      return 0
    fi
  fi
  make_dir "$(dirname "$dest")" 0755
  install -m "$mode" -T "$src" "$dest"
  record f "$dest"
  CHANGED=yes
  case "$dest" in "$PREFIX"/*) ;; *) say "installed $dest" ;; esac
}

# link TARGET LINK: a symlink, only when missing or pointing elsewhere.
link() {
  local target="$1" name="$2"
  if [ -e "$name" ] || [ -L "$name" ]; then
    ours l "$name" || die "$name exists and was not installed by deploy/install.sh (an earlier \`pip install .\`? \`pip uninstall meshnet\` removes that one); move it away and run again"
    [ "$(readlink "$name")" = "$target" ] && return 0
  fi
  make_dir "$(dirname "$name")" 0755
  ln -sfn "$target" "$name"
  record l "$name"
  say "linked $name -> $target"
}

systemd_running() { [ -d /run/systemd/system ]; }

# ---- install ----------------------------------------------------------------------------------

install_debian_packages() {
  # command -> the Debian package that provides it (what the agent and its tasks run)
  local -A need=([ip]=iproute2 [nft]=nftables [tini]=tini [setpriv]=util-linux)
  local -a missing=()
  local cmd
  for cmd in "${!need[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${need[$cmd]}")
  done
  # Debian's python3 has venv only with python3-venv (which brings ensurepip and python3).
  if [ ! -x "$PYTHON" ] || ! "$PYTHON" -m ensurepip --version >/dev/null 2>&1; then
    [ "$PYTHON" = /usr/bin/python3 ] || die "$PYTHON cannot make a venv (no ensurepip)"
    missing+=(python3-venv)
  fi
  [ "${#missing[@]}" -eq 0 ] && return 0
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    die "apt-get install ${missing[*]} failed"
  if [ ! -x "$PYTHON" ] || ! "$PYTHON" -m ensurepip --version >/dev/null 2>&1; then
    die "$PYTHON still cannot make a venv after installing python3-venv"
  fi
}

# A digest of what pip would install: the same digest means the venv already holds it.
source_digest() {
  (cd "$1" && find . -type f ! -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z |
    xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}

UPDATED=no
install_venv() {
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$PYTHON is older than Python 3.11, which meshnet needs (Debian 12 has 3.11)"
  if [ -e "$PREFIX" ] && [ ! -f "$MANIFEST" ] && [ -n "$(ls -A "$PREFIX")" ]; then
    die "$PREFIX exists and was not made by deploy/install.sh; choose another PREFIX or move it away"
  fi
  make_dir "$PREFIX" 0755
  if [ ! -f "$MANIFEST" ]; then
    touch "$MANIFEST"
    local line
    for line in ${PENDING[@]+"${PENDING[@]}"}; do record "${line%% *}" "${line#* }"; done
  fi
  if [ ! -x "$PREFIX/bin/python" ]; then
    say "making the venv $PREFIX"
    "$PYTHON" -m venv "$PREFIX"
  fi
  "$PREFIX/bin/python" -c '' 2>/dev/null ||
    die "$PREFIX/bin/python does not run (was $PYTHON upgraded?); run --uninstall, then install again"

  # pip builds in the source tree (build/, *.egg-info): build from a copy, so the checkout
  # stays untouched (it may be read-only, or someone's working tree).
  local build="$TMP/build"
  mkdir "$build"
  cp -r "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/LICENSE" "$SRC/meshnet" "$build/"
  find "$build" -name __pycache__ -prune -exec rm -rf {} +
  local digest
  digest="$(source_digest "$build")"
  if [ -x "$PREFIX/bin/meshnetd" ] && [ "$(cat "$PREFIX/.source-digest" 2>/dev/null)" = "$digest" ]; then
    say "meshnet in $PREFIX is up to date"
  else
    say "installing meshnet from $SRC into $PREFIX (pip)"
    # pip always reinstalls a package given as a directory; shtab is for the completions.
    "$PREFIX/bin/python" -m pip install --quiet --no-input --disable-pip-version-check \
      "${build}[completion]" || die "pip could not install meshnet from $SRC"
    echo "$digest" >"$PREFIX/.source-digest"
    UPDATED=yes
  fi
}

install_docs() {
  local doc="$PREFIX/share/doc/meshnet"
  put "$SRC/README.md" "$doc/README.md" 0644
  put "$SRC/LICENSE" "$doc/LICENSE" 0644
  put "$SRC/docs/design.md" "$doc/docs/design.md" 0644
}

install_unit() {
  sed "s#$UNIT_PREFIX/#$PREFIX/#g" "$SRC/systemd/meshnet.service" >"$TMP/meshnet.service"
  put "$TMP/meshnet.service" "$UNITDIR/meshnet.service" 0644
  if [ "$CHANGED" = yes ] && systemd_running; then
    systemctl daemon-reload || die "systemctl daemon-reload failed"
    say "systemctl daemon-reload"
  fi
}

install_completions() {
  local shell
  for shell in bash zsh; do
    # -I: the installed meshnet, never one in the current directory
    "$PREFIX/bin/python" -I -m shtab --shell="$shell" --prog=meshctl --prefix=meshctl \
      --error-unimportable meshnet.cli.meshctl.build_parser >"$TMP/meshctl.$shell" ||
      die "shtab could not generate meshctl's $shell completion"
  done
  put "$TMP/meshctl.bash" "$BASH_COMPLETIONS/meshctl" 0644
  put "$TMP/meshctl.zsh" "$ZSH_COMPLETIONS/_meshctl" 0644
}

install_config_dir() {
  # The config, the cluster key and the node's certificate and key all live here (see
  # deploy/meshnet.toml.example); nobody but root reads it.
  if [ -d "$CONFDIR" ] && [ -n "$(find "$CONFDIR" -maxdepth 0 -perm /077)" ]; then
    say "note: $CONFDIR is open to others (mode $(stat -c %a "$CONFDIR")); chmod 700 it"
  fi
  make_dir "$CONFDIR" 0700
  # Only the example: $CONFDIR/meshnet.toml is yours, never written here.
  put "$SRC/deploy/meshnet.toml.example" "$CONFDIR/meshnet.toml.example" 0644
}

# Every path outside $PREFIX the install writes, checked before anything is made: a file there
# that the install did not make (by the manifest) stops it, naming the file.
preflight() {
  local kind path
  for path in "$BINDIR/meshnetd" "$BINDIR/meshctl" "$BASH_COMPLETIONS/meshctl" \
    "$ZSH_COMPLETIONS/_meshctl" "$CONFDIR/meshnet.toml.example" "$UNITDIR/meshnet.service"; do
    if [ -e "$path" ] || [ -L "$path" ]; then
      case "$path" in "$BINDIR"/*) kind=l ;; *) kind=f ;; esac
      ours "$kind" "$path" ||
        die "$path exists and was not installed by deploy/install.sh (an earlier \`pip install .\` or a copy by hand?); move it away and run again"
    fi
  done
}

do_install() {
  preflight
  install_debian_packages
  install_venv
  install_docs
  link "$PREFIX/bin/meshnetd" "$BINDIR/meshnetd"
  link "$PREFIX/bin/meshctl" "$BINDIR/meshctl"
  install_completions
  install_config_dir
  install_unit
  say "meshnet $("$PREFIX/bin/python" -I -c 'import meshnet; print(meshnet.__version__)') is installed in $PREFIX"
  # A running agent keeps the old code, and its task launcher refuses to start tasks from a
  # changed file; restarting stops this host's tasks, so that is left to you.
  if [ "$UPDATED" = yes ] && systemd_running && systemctl is-active --quiet meshnet.service; then
    say "note: meshnet.service still runs the previous version: \`systemctl restart meshnet\` (this host's tasks restart)"
  fi
  if [ ! -e "$CONFDIR/meshnet.toml" ]; then
    say "next: write $CONFDIR/meshnet.toml (from $CONFDIR/meshnet.toml.example), the cluster key and the node's certificate, then \`systemctl enable --now meshnet\`"
  fi
}

# ---- uninstall --------------------------------------------------------------------------------

do_uninstall() {
  if [ ! -f "$MANIFEST" ]; then
    [ -e "$PREFIX" ] && die "$PREFIX has no install-manifest: not made by deploy/install.sh, left alone"
    say "nothing to uninstall ($PREFIX does not exist)"
    return 0
  fi
  if systemd_running && ours f "$UNITDIR/meshnet.service"; then
    systemctl disable --now meshnet.service || say "note: could not stop meshnet.service"
  fi
  local kind path
  # Files and links first, then directories deepest first (a directory still holding files
  # the install did not make, such as your meshnet.toml, stays).
  while read -r kind path; do
    case "$kind" in
      f | l) rm -f -- "$path" && say "removed $path" ;;
    esac
  done <"$MANIFEST"
  while read -r kind path; do
    [ "$kind" = d ] || continue
    if rmdir -- "$path" 2>/dev/null; then
      say "removed $path"
    elif [ -d "$path" ]; then
      say "kept $path: it holds files the install did not make ($(find "$path" -mindepth 1 -maxdepth 1 -printf '%f\n' | LC_ALL=C sort | paste -sd' ' -))"
    fi
  done < <(grep '^d ' "$MANIFEST" | LC_ALL=C sort -r -k2)
  rm -rf -- "$PREFIX"
  say "removed $PREFIX"
  if systemd_running; then
    systemctl daemon-reload || say "note: systemctl daemon-reload failed"
  fi
  say "kept: what you made in $CONFDIR, the agent's state (/var/lib/meshnet), the Debian packages"
}

# ---- main -------------------------------------------------------------------------------------

action=install
case "$#:${1:-}" in
  0:) ;;
  1:--uninstall) action=uninstall ;;
  1:-h | 1:--help)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
    ;;
  *) usage ;;
esac
for var in PREFIX BINDIR UNITDIR BASH_COMPLETIONS ZSH_COMPLETIONS; do
  case "${!var}" in
    /*) ;;
    *) die "$var must be an absolute path, not '${!var}'" ;;
  esac
  case "${!var}" in
    / | *[[:space:]]* | *[\#\&\\]*) die "$var='${!var}' is not a usable location" ;;
  esac
done
[ "$(id -u)" = 0 ] || die "run as root: sudo deploy/install.sh${1:+ $1}"
[ -f "$SRC/pyproject.toml" ] && [ -f "$SRC/meshnet/__init__.py" ] ||
  die "$SRC is not a meshnet checkout"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"do_$action"

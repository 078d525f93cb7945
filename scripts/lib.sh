# shellcheck shell=bash
# Shared helpers for the project's scripts. Source it: . "$(dirname "$0")/lib.sh"
set -euo pipefail

# shellcheck disable=SC2034  # used by the scripts that source this file
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Where downloaded tools (consul, compose plugin, venvs) live; reused across runs.
FLEET_TOOLS=${FLEET_TOOLS:-$HOME/.cache/sglang-fleet}
mkdir -p "$FLEET_TOOLS"

say() { printf '\033[1m[sglang-fleet]\033[0m %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# The Debian mirror this machine already uses (never a host name written down here).
debian_mirror() {
  local uri
  uri=$(grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -n1 || true)
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk '/^deb / && !/security/ {print $2; exit}' /etc/apt/sources.list)
  fi
  [ -n "$uri" ] || die "cannot find a Debian mirror in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
  echo "${uri%/}"
}

# apt-get download PKG from another Debian suite into DIR, without touching the system's lists.
apt_download_from_suite() {
  local suite=$1 pkg=$2 dir=$3 tmp
  tmp=$(mktemp -d)
  mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$dir"
  echo "deb $(debian_mirror) $suite main" >"$tmp/sources.list"
  local opts=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o "Dir::Etc::SourceParts=-"
              -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o "APT::Get::List-Cleanup=0")
  apt-get "${opts[@]}" -qq update
  (cd "$dir" && apt-get "${opts[@]}" -qq download "$pkg")
  rm -rf "$tmp"
}

apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]} (apt)"
  if [ ! -f "$FLEET_TOOLS/.apt-updated" ] || [ -n "$(find "$FLEET_TOOLS/.apt-updated" -mmin +600 2>/dev/null)" ]; then
    apt-get -qq update && touch "$FLEET_TOOLS/.apt-updated"
  fi
  DEBIAN_FRONTEND=noninteractive apt-get -qq install -y --no-install-recommends "${missing[@]}" >/dev/null
}

# Image names shared by scripts/images, scripts/demo, the compose files and the container tests.
fleet_image_names() {
  export FLEET_IMAGE=${FLEET_IMAGE:-sglang-fleet:cpu}
  export FLEET_GPU_IMAGE=${FLEET_GPU_IMAGE:-sglang-fleet:gpu}
  export FLEET_CONSUL_IMAGE=${FLEET_CONSUL_IMAGE:-sglang-fleet/consul:local}
}

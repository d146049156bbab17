#!/usr/bin/env bash
# Production install on Debian 12 (run as root): the imr package and exactly what it needs.
#   scripts/install.sh imr_<version>_amd64.deb      (built by scripts/build-deb.sh)
# apt installs the package's Depends (python3, python3.11) and Recommends (nftables,
# logrotate); nothing else: no compiler, no web server, no fail2ban (that is the test bench,
# scripts/bootstrap.sh). The service is enabled but not started: check /etc/imr/imr.toml first.
set -euo pipefail
deb=${1:?usage: install.sh imr_VERSION_amd64.deb}
[ -f "$deb" ] || { echo "install.sh: no such file: $deb" >&2; exit 2; }
case "$deb" in /*) ;; *) deb="./$deb" ;; esac   # apt takes a path, not a package name

export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null ||
  echo "install.sh: apt-get update failed; installing with the package lists as they are" >&2
apt-get install -y -q "$deb"

cat <<'NEXT'
imr is installed; imr.socket and imr.service are enabled, not started. Next:
  1. edit /etc/imr/imr.toml (allowlist your admin networks: [protect] allowlist)
  2. let the web server ask for blocks:   adduser www-data imr
  3. systemctl start imr.service && imr doctor
Upgrades: install the newer .deb the same way (blocks stay in force; see docs/operations.md).
NEXT

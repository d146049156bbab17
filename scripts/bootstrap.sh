#!/usr/bin/env bash
# The development and test bench: everything imr's demo and tests need on a fresh Debian 12
# machine (run as root), web servers and fail2ban included. NOT a production install: that is
# the Debian package (scripts/install.sh, docs/operations.md "Install").
# Idempotent: a second run only checks. Nothing here touches the host's firewall.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  iptables ipset nftables iproute2 socat netcat-openbsd procps
  python3 python3-venv python3-dev gcc sqlite3 util-linux
  # contrib/logrotate/imr is tested with the real logrotate (tests/test_reload.py).
  logrotate
  # Peers and tools for tests and benchmarks; their services must never start
  # on the host (see policy-rc.d below): we only use their programs and files.
  fail2ban
  apache2 libapache2-mod-security2 nginx libnginx-mod-http-modsecurity lua-socket
  modsecurity-crs curl
  # systemd-analyze (unit checks), systemd-socket-activate; libseccomp for the sandbox test.
  systemd python3-seccomp
  # Fleet mode's tests start their own redis-server processes (never the host's service).
  redis-server
  # ... and their own redis-sentinel processes (tests/test_fleet_sentinel.py).
  redis-sentinel
  # tests/test_fleet_proxy.py's HAProxy reverse proxy (its own process in a namespace).
  haproxy
  # The Debian package: its build (scripts/build-deb.sh), lintian, and the Debian 12
  # container tests/test_package.py boots it in (debootstrap, systemd-nspawn).
  debhelper lintian python3.11-venv debootstrap systemd-container
)
# bench/crowdsec_peer.py runs CrowdSec's local API and nftables bouncers side by side with
# fleet mode, each its own process with its own config in a namespace. No test needs them,
# so only on request: scripts/bootstrap.sh --crowdsec
if [ "${1:-}" = "--crowdsec" ]; then
  packages+=(crowdsec crowdsec-firewall-bouncer)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # Refuse every service start during the install (fail2ban would otherwise
  # start and manage the host's firewall); remove the guard only if it is ours.
  guard=/usr/sbin/policy-rc.d
  ours=""
  if [ ! -e "$guard" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$guard" && chmod 755 "$guard" && ours=1
  fi
  # crowdsec's postinst registers with CrowdSec's central API unless this file holds
  # something (README.Debian): the bench never uses the host's CrowdSec, and offline the
  # registration fails the install.
  case " ${missing[*]} " in
    *" crowdsec "*)
      mkdir -p /etc/crowdsec
      [ -s /etc/crowdsec/online_api_credentials.yaml ] ||
        echo "# no thanks: imr's bench, no central API" > /etc/crowdsec/online_api_credentials.yaml ;;
  esac
  apt-get update -q >/dev/null
  apt-get install -y -q "${missing[@]}" >/dev/null
  [ -n "$ours" ] && rm -f "$guard"
  # Their postinsts enabled the peers for the next boot: a test bench must not start a web
  # server, or fail2ban (which manages the firewall), at boot. Only what was installed now.
  for unit in apache2 nginx haproxy fail2ban redis-sentinel crowdsec crowdsec-firewall-bouncer; do
    case " ${missing[*]} " in
      *" $unit "*) systemctl disable --quiet "$unit.service" 2>/dev/null || true ;;
    esac
  done
fi

# The kernel modules behind the firewall tools (no-ops where built in).
# The same list that imr.service's hosts load at boot (contrib/systemd/imr-modules.conf).
for m in $(grep -v '^#' contrib/systemd/imr-modules.conf); do
  modprobe -q "$m" 2>/dev/null || true
done

# Debian's own python3: the unprivileged clients (www-data, test users) must be
# able to run it, which a python under /root (pyenv) does not allow.
python=/usr/bin/python3
if [ ! -x .venv/bin/python ] || ! grep -q "^home = /usr/bin$" .venv/pyvenv.cfg; then
  rm -rf .venv
  "$python" -m venv .venv
fi
stamp=.venv/.imr-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi

# Unprivileged clients (www-data, the test users) run .venv/bin/imr: every
# directory above the checkout must be world-traversable, or those tests skip.
dir=$PWD
while [ "$dir" != "/" ]; do
  if [ "$(( $(stat -c '%a' "$dir" | tail -c 2) & 1 ))" -eq 0 ]; then
    echo "bootstrap: WARNING: $dir is not world-traversable; tests that run clients as" \
         "unprivileged users will be skipped. Clone imr under a world-readable directory." >&2
    break
  fi
  dir=$(dirname "$dir")
done

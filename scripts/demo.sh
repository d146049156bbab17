#!/usr/bin/env bash
# The main job, end to end, in a throwaway network namespace:
# a root imr daemon with the iptables backend; the web server's user (www-data)
# reports the attackers found in an Apache log; the kernel rejects them.
# Run as root on Debian 12. It never touches the host's own firewall: every
# rule lives in the namespace "imr-demo-web", deleted on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh

IMR="$PWD/.venv/bin/imr"
PY="$PWD/.venv/bin/python"
WEB=imr-demo-web ATK=imr-demo-attackers FRIEND=imr-demo-innocent
work=$(mktemp -d /tmp/imr-demo.XXXXXX)
chmod 755 "$work"
server_pid=""

cleanup() {
  set +e
  [ -f "$work/imr.toml" ] && "$IMR" --config "$work/imr.toml" server stop >/dev/null 2>&1
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  for ns in "$WEB" "$ATK" "$FRIEND"; do ip netns delete "$ns" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Three namespaces: the web server, the attackers, an innocent visitor"
for ns in "$WEB" "$ATK" "$FRIEND"; do
  ip netns delete "$ns" 2>/dev/null || true
  ip netns add "$ns"
  ip -n "$ns" link set lo up
done
ip link add imrdemo-w0 netns "$WEB" type veth peer name imrdemo-a0 netns "$ATK"
ip link add imrdemo-w1 netns "$WEB" type veth peer name imrdemo-f0 netns "$FRIEND"
ip -n "$WEB" addr add 192.0.2.10/24 dev imrdemo-w0
ip -n "$WEB" addr add 2001:db8::10/64 dev imrdemo-w0 nodad
ip -n "$WEB" addr add 192.0.2.129/25 dev imrdemo-w1
for a in 203.0.113.50/32 198.51.100.23/32; do ip -n "$ATK" addr add "$a" dev imrdemo-a0; done
ip -n "$ATK" addr add 2001:db8::bad/64 dev imrdemo-a0 nodad
ip -n "$FRIEND" addr add 192.0.2.200/25 dev imrdemo-f0
for link in "$WEB imrdemo-w0" "$WEB imrdemo-w1" "$ATK imrdemo-a0" "$FRIEND imrdemo-f0"; do
  set -- $link; ip -n "$1" link set "$2" up
done
ip -n "$ATK" route add 192.0.2.0/24 dev imrdemo-a0
ip -n "$WEB" route add 203.0.113.50/32 dev imrdemo-w0
ip -n "$WEB" route add 198.51.100.23/32 dev imrdemo-w0
# The kernel rate-limits ICMP errors per peer; the demo probes the same peer twice.
ip netns exec "$WEB" sysctl -qw net.ipv4.icmp_ratelimit=0 net.ipv6.icmp.ratelimit=0
ip netns list | grep imr-demo

step "A web server on port 80 in $WEB"
mkdir -p "$work/www" && echo "hello from the web namespace" > "$work/www/index.html"
ip netns exec "$WEB" "$PY" -m http.server --bind :: --directory "$work/www" 80 >/dev/null 2>&1 &
server_pid=$!
sleep 1

step "imr's configuration: www-data may ask for blocks; REJECT on ports 80 and 443"
cat > "$work/imr.toml" <<TOML
[server]
socket = "$work/run/imr.sock"
socket_group = "www-data"
pid_file = "$work/run/imr.pid"
log_file = "$work/imr.log"

[state]
path = "$work/state/state.db"

[firewall]
backend = "iptables"
protocol = "tcp"
ports = [80, 443]

[access.users]
www-data = "block"
TOML
cat "$work/imr.toml"

step "Start the daemon (as root, inside $WEB)"
ip netns exec "$WEB" "$IMR" --config "$work/imr.toml" server start
"$IMR" --config "$work/imr.toml" server status

step "Before: every attacker reaches the web server"
probe() {  # probe NAMESPACE SOURCE DESTINATION
  ip netns exec "$1" nc -z -v -w 2 -s "$2" "$3" 80 2>&1 | sed "s/^/  from $2: /" || true
}
probe "$ATK" 203.0.113.50 192.0.2.10

step "The web server's log (an excerpt from 2009) and what www-data reports"
cat > "$work/access.log" <<'LOG'
203.0.113.50 - - [08/Jan/2009:04:52:45 -0500] "GET /mail/bin/msgimport HTTP/1.1" 404 330 "-" "Mozilla/5.0 (Windows; U; Windows NT 5.1; en-US; rv:1.9.0.5) Gecko/2008120122 Firefox/3.0.5"
198.51.100.23 - - [30/Jan/2009:13:36:51 -0500] "GET /w00tw00t.at.ISC.SANS.DFind:) HTTP/1.1" 400 311 "-" "-"
2001:db8::bad - - [06/Jan/2009:17:19:00 -0500] "GET /user/soapCaller.bs HTTP/1.1" 404 330 "-" "Morfeus Fucking Scanner"
LOG
cat "$work/access.log"
echo
while read -r ip _ _ _ _ _ path _; do
  case "$path" in
    */msgimport*) reason="Roundcube msgimport probe" ;;
    */w00tw00t.at.ISC.SANS.DFind*) reason="DFind w00tw00t scanner" ;;
    */soapCaller.bs*) reason="Morfeus soapCaller.bs scanner" ;;
    *) continue ;;
  esac
  echo "\$ runuser -u www-data -- imr block $ip --reason \"$reason\" --source demo:access.log"
  runuser -u www-data -- "$IMR" --config "$work/imr.toml" block "$ip" --reason "$reason" --source demo:access.log
done < "$work/access.log"

step "www-data may not lift a block (admin only)"
runuser -u www-data -- "$IMR" --config "$work/imr.toml" unblock 203.0.113.50 || echo "  (refused, exit $?)"

step "imr list"
"$IMR" --config "$work/imr.toml" list

step "The kernel rules in $WEB"
ip netns exec "$WEB" iptables -S IMR
ip netns exec "$WEB" ip6tables -S IMR

step "After: the attackers are rejected by the kernel; an innocent visitor still gets the page"
probe "$ATK" 203.0.113.50 192.0.2.10
probe "$ATK" 198.51.100.23 192.0.2.10
probe "$ATK" 2001:db8::bad 2001:db8::10
printf '  innocent 192.0.2.200: '
ip netns exec "$FRIEND" "$PY" -c 'import urllib.request; print(urllib.request.urlopen("http://192.0.2.129/", timeout=3).read().decode().strip())'

step "The daemon's log"
cat "$work/imr.log"

rejected=$(ip netns exec "$ATK" nc -z -v -w 2 -s 203.0.113.50 192.0.2.10 80 2>&1 || true)
case "$rejected" in
  *"No route to host"*) step "Demo passed: blocked attackers get 'No route to host'" ;;
  *) echo "demo FAILED: expected 'No route to host', got: $rejected" >&2; exit 1 ;;
esac

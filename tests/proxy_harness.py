"""docs/fleet.md's reverse-proxy topology for real: an enforce-only member on the proxy's
host, a web host whose ModSecurity hook reports the client the proxy names, and Redis.

Namespaces (documentation addresses; lb and web1 as in the docs' example config):

    attacker 203.0.113.66/.67 ─┐                     ┌─ hub 192.0.2.33/.49: redis-server
    innocent 198.51.100.77  ───┴─ proxy ──────────── web1            (TLS, ACLs)
                203.0.113.1, 198.51.100.1  192.0.2.2 ── 192.0.2.10
                nginx or HAProxy proxy                  Apache or nginx + ModSecurity
                imr: enforce-only member "lb"           imr: member "web1" (hook's daemon)
                (192.0.2.34 to the hub)                 (192.0.2.50 to the hub)

The web server's X-Forwarded-For settings, and the proxy's, are read from the docs'
section as written (only the module path is made absolute), so the test keeps them honest.
Every process is started here and stopped by pid; everything goes even on failure.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon_harness import GROUP, REPO, Daemon, require_unprivileged_access
from fleet_harness import (
    RedisServer,
    fleet_section,
    free_port,
    make_key,
    redis_server,
    write_member_config,
)
from modsec_harness import (
    APACHE_MODULES,
    CONTRIB,
    NGINX_MODSEC,
    WEB_USER,
    WebServer,
    get,
    hook_rules,
    running,
)
from netns import Netns, connect, create_netns

PROXY, WEB = "192.0.2.2", "192.0.2.10"  # the docs' lb and web1, on the proxy-web link
PROXY_ATTACKER_SIDE, PROXY_INNOCENT_SIDE = "203.0.113.1", "198.51.100.1"
ATTACKERS = ("203.0.113.66", "203.0.113.67")
INNOCENT = "198.51.100.77"
HUB = {"lb": ("192.0.2.33", "192.0.2.34"), "web1": ("192.0.2.49", "192.0.2.50")}
PROXY_ADDRESSES = (PROXY, PROXY_ATTACKER_SIDE, PROXY_INNOCENT_SIDE, HUB["lb"][1])
SECTION = "## Enforce-only members behind a reverse proxy"


@dataclass
class ProxyWorld:
    lb: Daemon  # the enforce-only member, in the proxy's namespace
    web: Daemon  # the web host's member, which the hook reports to
    attacker: Netns
    innocent: Netns
    redis: RedisServer
    site: WebServer  # the web host's Apache or nginx
    proxy: WebServer  # the proxy: nginx or HAProxy

    def kernel(self, daemon: Daemon) -> set[str]:
        """The IPv4 addresses in `daemon`'s nftables set, read back from its kernel."""
        out = daemon.server.run("nft", "-j", "list", "set", "inet", "imr", "blocked_v4")
        found: set[str] = set()
        for item in json.loads(out.stdout)["nftables"]:
            for elem in item.get("set", {}).get("elem", []):
                found.add(str(elem["elem"]["val"] if isinstance(elem, dict) else elem))
        return found

    def show(self, daemon: Daemon, ip: str) -> dict[str, Any]:
        result = daemon.as_root("show", ip, "--json")
        assert result.returncode == 0, result.stderr
        shown: dict[str, Any] = json.loads(result.stdout)
        return shown

    def blocked_ips(self, daemon: Daemon) -> set[str]:
        """Every address `daemon`'s state file ever held a block for."""
        return {str(row[0]) for row in daemon.state_rows("SELECT ip FROM blocks")}

    def fleet_status(self, daemon: Daemon) -> dict[str, Any]:
        result = daemon.as_root("fleet", "status", "--json")
        assert result.returncode == 0, result.stderr
        status: dict[str, Any] = json.loads(result.stdout)
        return status


def documented() -> dict[str, str]:
    """The docs' settings: the `apache` and `nginx` blocks of the section, and the proxies'
    lines quoted in the text: nginx's (`proxy_set_header X-Forwarded-For ...;`) as "proxy",
    HAProxy's (`option forwardfor ...`) as "haproxy"."""
    text = (REPO / "docs" / "fleet.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    found = dict(re.findall(r"```(apache|nginx)\n(.*?)```", section, re.S))
    proxy = re.search(r"nginx `(proxy_set_header X-Forwarded-For[^`]*)`", section)
    haproxy = re.search(r"HAProxy `(option forwardfor[^`]*)`", section)
    assert proxy and haproxy and set(found) == {"apache", "nginx"}, "docs section changed"
    found["apache"] = found["apache"].replace(" modules/", f" {APACHE_MODULES}/")
    found["proxy"] = " ".join(proxy.group(1).split())
    found["haproxy"] = " ".join(haproxy.group(1).split())
    return found


def _daemon_config(daemon: Daemon, fleet_text: str, access: str, allowlist: list[str]) -> None:
    write_member_config(
        daemon,
        f"""
[policy]
ladder = ["1h", "1d"]

[escalation]
enabled = false

[protect]
allowlist = {json.dumps(allowlist)}
{access}
{fleet_text}
""",
        socket_group=GROUP if not access else WEB_USER,
    )


def _htdocs(directory: Path) -> Path:
    htdocs = directory / "htdocs"
    htdocs.mkdir(parents=True)
    (htdocs / "index.html").write_text("hello from web1 behind the proxy\n")
    for path in (directory, htdocs):
        path.chmod(0o755)
    (htdocs / "index.html").chmod(0o644)
    (directory / "tmp").mkdir()
    return htdocs


def _temps(directory: Path) -> str:
    return "\n".join(
        f"    {name}_temp_path {directory}/tmp/{name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )


def _site_files(web: Daemon, kind: str, directory: Path) -> list[str]:
    """The web host's server with ModSecurity, the hook and the docs' settings; its argv."""
    htdocs = _htdocs(directory)
    settings = documented()
    hook = "exec" if kind == "apache" else "lua"  # nginx (libmodsecurity v3): Lua only
    rules = "\n".join(
        [
            "SecRuleEngine On",
            "SecRequestBodyAccess On",
            "SecAuditEngine Off",
            f"Include {CONTRIB / 'imr-rules.conf'}",
            hook_rules(web, hook, directory),
        ]
    )
    if kind == "apache":
        modules = "\n".join(
            f"LoadModule {name}_module {APACHE_MODULES}/mod_{name}.so"
            for name in ("mpm_event", "authz_core", "dir", "unique_id", "security2")
        )
        conf = directory / "apache2.conf"
        conf.write_text(f"""
ServerRoot "{directory}"
{modules}
{settings["apache"]}
User {WEB_USER}
Group {WEB_USER}
ServerName web1.test
Listen {WEB}:80
PidFile {directory}/apache2.pid
DefaultRuntimeDir {directory}
Mutex file:{directory} default
ErrorLog {directory}/error.log
LogLevel warn
LogFormat "%a peer=%{{c}}a \\"%r\\" %>s xff=\\"%{{X-Forwarded-For}}i\\"" proxied
CustomLog {directory}/access.log proxied
DocumentRoot {htdocs}
DirectoryIndex index.html
<Directory {htdocs}>
    Require all granted
</Directory>
SecDataDir {directory}
SecTmpDir {directory}
{rules}
""")
        return ["apache2", "-d", str(directory), "-f", str(conf), "-DFOREGROUND"]
    (directory / "modsecurity.conf").write_text(rules)
    conf = directory / "nginx.conf"
    conf.write_text(f"""
load_module {NGINX_MODSEC};
user {WEB_USER};
worker_processes 1;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 64; }}
http {{
    log_format proxied '$remote_addr peer=$realip_remote_addr "$request" $status '
                       'xff="$http_x_forwarded_for"';
    access_log {directory}/access.log proxied;
{_temps(directory)}
    server {{
        listen {WEB}:80;
        root {htdocs};
{settings["nginx"]}
        modsecurity on;
        modsecurity_rules_file {directory / "modsecurity.conf"};
    }}
}}
""")
    return ["nginx", "-c", str(conf), "-p", str(directory)]


def _proxy_files(directory: Path) -> list[str]:
    """The proxy's nginx: pass everything to web1 with the docs' X-Forwarded-For line."""
    _htdocs(directory)
    conf = directory / "nginx.conf"
    conf.write_text(f"""
user {WEB_USER};
worker_processes 1;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 64; }}
http {{
    log_format forwarded '$remote_addr "$request" $status xff="$proxy_add_x_forwarded_for"';
    access_log {directory}/access.log forwarded;
{_temps(directory)}
    server {{
        listen {PROXY_ATTACKER_SIDE}:80;
        listen {PROXY_INNOCENT_SIDE}:80;
        location = /fpx-alive {{ return 200 "proxy\\n"; }}
        location / {{
            proxy_pass http://{WEB};
            {documented()["proxy"]}
        }}
    }}
}}
""")
    return ["nginx", "-c", str(conf), "-p", str(directory)]


def _haproxy_files(directory: Path, forwardfor: str) -> list[str]:
    """The proxy's HAProxy: the same, with the `forwardfor` line. One process in the
    foreground (-db), one thread; it logs (httplog, the client's own X-Forwarded-For
    captured) to its stderr."""
    directory.mkdir(parents=True)
    conf = directory / "haproxy.cfg"
    conf.write_text(f"""
global
    user {WEB_USER}
    group {WEB_USER}
    nbthread 1
    maxconn 64
    log stderr format raw local0 info

defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 5s
    timeout server 5s

frontend fhp
    bind {PROXY_ATTACKER_SIDE}:80
    bind {PROXY_INNOCENT_SIDE}:80
    capture request header X-Forwarded-For len 64
    http-request return status 200 content-type text/plain string "proxy" if {{ path /fpx-alive }}
    default_backend web1

backend web1
    {forwardfor}
    server web1 {WEB}:80
""")
    return ["haproxy", "-f", str(conf), "-db"]


class HAProxy(WebServer):
    """A WebServer whose pid is its own process's (-db: no pid file, no workers)."""

    def pid(self) -> int | None:
        return self.process.pid

    @property
    def error_log(self) -> Path:
        return self.directory / "stderr.log"


@contextlib.contextmanager
def haproxy_running(
    ns: Netns, directory: Path, ready: Callable[[], bool], forwardfor: str
) -> Iterator[WebServer]:
    """Check and start HAProxy in `ns` (modsec_harness.running's `-t` is nginx's and
    Apache's, HAProxy's is `-c`); stop it by pid whatever happens."""
    argv = _haproxy_files(directory, forwardfor)
    check = ns.run("haproxy", "-c", *argv[1:], check=False, timeout=10)
    assert check.returncode == 0, f"haproxy refuses its config:\n{check.stdout}{check.stderr}"
    with open(directory / "stderr.log", "wb") as stderr:
        process = subprocess.Popen(ns.argv(*argv), stdout=subprocess.DEVNULL, stderr=stderr)
    server = HAProxy("haproxy", ns, directory, process)
    try:
        deadline = time.monotonic() + 10
        while not ready():
            log = server.error_log.read_text(errors="replace")
            assert server.alive() and time.monotonic() < deadline, f"haproxy: {log}"
            time.sleep(0.1)
        yield server
    finally:
        server.stop()


def _network(stack: contextlib.ExitStack, root: Path, prefix: str) -> dict[str, Netns]:
    spaces: dict[str, Netns] = {}
    for name in ("hub", "lb", "web", "atk", "inn"):
        spaces[name] = create_netns(f"{prefix}{name}")
        stack.callback(spaces[name].delete)
    hub, lb, web = spaces["hub"], spaces["lb"], spaces["web"]
    for member, ns in (("lb", lb), ("web1", web)):
        connect(hub, ns, [f"{HUB[member][0]}/28"], [f"{HUB[member][1]}/28"])
    connect(lb, web, [f"{PROXY}/28"], [f"{WEB}/28"])
    connect(lb, spaces["atk"], [f"{PROXY_ATTACKER_SIDE}/24"], [f"{a}/24" for a in ATTACKERS])
    connect(lb, spaces["inn"], [f"{PROXY_INNOCENT_SIDE}/24"], [f"{INNOCENT}/24"])
    # REJECT answers are ICMP errors, which the kernel rate-limits per peer.
    lb.run("sysctl", "-qw", "net.ipv4.icmp_ratelimit=0")
    return spaces


def _members(
    stack: contextlib.ExitStack, root: Path, spaces: dict[str, Netns]
) -> tuple[RedisServer, Daemon, Daemon]:
    """Redis (TLS, the documented ACLs) in the hub, and the two members, started."""
    port = free_port()
    hubs = [hub for hub, _ in HUB.values()]
    (root / "redis").mkdir()
    server = stack.enter_context(
        redis_server(
            tuple(HUB),
            host="0.0.0.0",
            port=port,
            netns=spaces["hub"].name,
            root=root / "redis",
            tls_names=hubs,
        )
    )
    publics = {name: make_key(root / f"{name}.key") for name in HUB}
    addresses = {"lb": list(PROXY_ADDRESSES), "web1": [WEB, HUB["web1"][1]]}
    daemons: dict[str, Daemon] = {}
    for name, ns in (("lb", spaces["lb"]), ("web1", spaces["web"])):
        home = root / name
        home.mkdir(mode=0o755)
        daemon = daemons[name] = Daemon(ns, spaces["atk"], spaces["inn"], home)
        url = f"rediss://{HUB[name][0]}:{port}/0"
        text = fleet_section(name, url, root, publics, addresses, tls_ca=server.ca)
        if name == "lb":  # enforce-only: no [access] at all
            _daemon_config(daemon, text, "", [])
        else:  # no allowlist: in fleet mode the members' addresses are protected locally too
            _daemon_config(daemon, text, f'[access.users]\n"{WEB_USER}" = "block"', [])
        stack.callback(daemon.kill_everything)
        stack.callback(daemon.stop)
        result = daemon.start()
        assert result.returncode == 0, f"{name}: {result.stderr}"
    return server, daemons["lb"], daemons["web1"]


def wait(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def proxy_world(kind: str, proxy: str = "nginx", forwardfor: str = "") -> Iterator[ProxyWorld]:
    """The whole topology with `kind` ("apache" or "nginx") on the web host and `proxy`
    ("nginx" or "haproxy") in front; torn down whatever happens (web servers, daemons,
    Redis by pid, then namespaces, then files). HAProxy's X-Forwarded-For line is the
    docs' unless `forwardfor` is given."""
    require_unprivileged_access()
    prefix = "fpx" if proxy == "nginx" else "fhp"
    root = Path(tempfile.mkdtemp(prefix=f"imrtest-{prefix}-", dir="/tmp"))
    root.chmod(0o755)
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        spaces = _network(stack, root, prefix)
        server, lb, web = _members(stack, root, spaces)
        site_argv = _site_files(web, kind, root / "site")
        site = stack.enter_context(
            running(
                web, kind, root / "site", site_argv, lambda: get(lb.server, WEB, "/").status == 200
            )
        )
        inn = spaces["inn"]

        def alive() -> bool:
            return get(inn, PROXY_INNOCENT_SIDE, "/fpx-alive", timeout=1).status == 200

        if proxy == "haproxy":
            line = forwardfor or documented()["haproxy"]
            front = stack.enter_context(haproxy_running(lb.server, root / "proxy", alive, line))
        else:
            argv = _proxy_files(root / "proxy")
            front = stack.enter_context(running(lb, "nginx", root / "proxy", argv, alive))
        world = ProxyWorld(lb, web, spaces["atk"], inn, server, site, front)

        def connected() -> bool:
            return all(world.fleet_status(d)["follower_connected"] for d in (lb, web))

        assert wait(connected, 15), "the members' followers did not connect to Redis"
        yield world

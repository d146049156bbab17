"""Real Apache + mod_security2 and nginx + libmodsecurity3 beside the real imr daemon.

Built on tests/daemon_harness.py: its `server` namespace hosts the daemon's
firewall and the web server (listening on its veth addresses only), the
`attacker` (203.0.113.66) and `innocent` (192.0.2.77) namespaces are clients.
The web server runs as www-data; the daemon's socket belongs to group
www-data, so no host account is changed. The shipped snippets from
contrib/modsecurity are used as they are, only with the paths replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from daemon_harness import (
    IMR,
    REPO,
    SERVER_SIDE_V4,
    SERVER_V4,
    Daemon,
    daemon_world,
)
from netns import Netns

CONTRIB = REPO / "contrib" / "modsecurity"
IMR_HOOK = str(Path(IMR).parent / "imr-hook")
WEB_USER = "www-data"
APACHE_MODULES = Path("/usr/lib/apache2/modules")
NGINX_MODSEC = Path("/usr/lib/nginx/modules/ngx_http_modsecurity_module.so")


def apache_missing() -> str | None:
    """Why the Apache tests cannot run here, or None."""
    if shutil.which("apache2") is None:
        return "apache2 is not installed (apt-get install apache2 libapache2-mod-security2)"
    if not (APACHE_MODULES / "mod_security2.so").exists():
        return "mod_security2 is not installed (apt-get install libapache2-mod-security2)"
    return lua_socket_missing()


def nginx_missing() -> str | None:
    if shutil.which("nginx") is None:
        return "nginx is not installed (apt-get install nginx libnginx-mod-http-modsecurity)"
    if not NGINX_MODSEC.exists():
        return "the ModSecurity module for nginx is not installed (libnginx-mod-http-modsecurity)"
    return lua_socket_missing()


def lua_socket_missing() -> str | None:
    if not Path("/usr/lib/x86_64-linux-gnu/lua/5.3/socket/unix.so").exists():
        return "lua-socket is not installed (apt-get install lua-socket)"
    return None


def write_daemon_config(daemon: Daemon, allowlist: tuple[str, ...] = ()) -> None:
    """The daemon's config: the web server's user may block, its group reaches the socket."""
    daemon.config_file.write_text(f"""
[server]
socket = "{daemon.socket}"
socket_group = "{WEB_USER}"
socket_mode = "0660"
pid_file = "{daemon.root / "run" / "imr.pid"}"
log_file = "{daemon.log_file}"

[state]
path = "{daemon.state_file}"

[policy]
ladder = ["1d", "7d"]

[firewall]
backend = "iptables"
iptables_flavour = "{daemon.flavour}"
protocol = "tcp"
ports = [80]

[access.users]
"{WEB_USER}" = "block"

[protect]
allowlist = {json.dumps(list(allowlist))}
""")
    daemon.config_file.chmod(0o644)


def hook_rules(daemon: Daemon, hook: str, directory: Path) -> str:
    """The shipped phase-5 hook snippet ("exec", "lua" or "none"), with this test's paths."""
    if hook == "none":
        return ""
    if hook in ("exec", "exec-direct", "exec-launcher"):
        # exec-direct: hook.py is standard library only, so it can run as a plain
        # script without the virtualenv's site start-up. exec-launcher: the shipped
        # contrib/modsecurity/imr-hook (the same, from cached bytecode).
        program = {
            "exec": IMR_HOOK,
            "exec-direct": f"'/usr/bin/python3 -I -S {REPO}/imr/hook.py'",
            "exec-launcher": str(CONTRIB / "imr-hook"),
        }[hook]
        text = (CONTRIB / "imr-hook-exec.conf").read_text()
        text = text.replace("/usr/local/bin/imr-hook", program)
        return text.replace("/run/imr/imr.sock", str(daemon.socket))
    lua = (CONTRIB / "imr.lua").read_text()
    marker = 'local SOCKET_PATH = "/run/imr/imr.sock"'
    assert marker in lua, "imr.lua no longer has the SOCKET_PATH line the tests rewrite"
    script = directory / "imr.lua"
    script.write_text(lua.replace(marker, f'local SOCKET_PATH = "{daemon.socket}"'))
    script.chmod(0o644)
    text = (CONTRIB / "imr-hook-lua.conf").read_text()
    return text.replace("/etc/imr/modsecurity/imr.lua", str(script))


@dataclass
class WebServer:
    kind: str  # "apache" or "nginx"
    ns: Netns
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def error_log(self) -> Path:
        return self.directory / "error.log"

    def pid(self) -> int | None:
        name = "apache2.pid" if self.kind == "apache" else "nginx.pid"
        try:
            return int((self.directory / name).read_text().strip())
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        # The foreground master is our child; it stops its workers on SIGTERM.
        pids = list(dict.fromkeys(p for p in (self.pid(), self.process.pid) if p is not None))
        workers = [w for pid in pids for w in _children(pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        # Workers of a master that died abruptly would live on: end them by pid.
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
    return children


CRS_LOAD = Path("/usr/share/modsecurity-crs/owasp-crs.load")


def _crs(kind: str) -> str:
    # libmodsecurity 3.0.9 has no IncludeOptional, which Debian's owasp-crs.load uses.
    crs = (
        f"Include {CRS_LOAD}"
        if kind == "apache"
        else "Include /etc/modsecurity/crs/crs-setup.conf\n"
        "Include /usr/share/modsecurity-crs/rules/*.conf"
    )
    return f"{crs}\nInclude {CONTRIB / 'imr-crs-anomaly.conf'}"


def _prepare(daemon: Daemon, kind: str, hook: str, crs: bool = False) -> tuple[Path, str]:
    directory = daemon.root / f"{kind}-{hook}"
    (directory / "htdocs").mkdir(parents=True)
    (directory / "htdocs" / "index.html").write_text("hello from imr's test web server\n")
    for path in (directory, directory / "htdocs"):
        path.chmod(0o755)
    (directory / "htdocs" / "index.html").chmod(0o644)
    rules = "\n".join(
        [
            "SecRuleEngine On",
            # libmodsecurity v3 skips phase 2 entirely when this is Off.
            "SecRequestBodyAccess On",
            "SecAuditEngine Off",
            f"Include {CONTRIB / 'imr-rules.conf'}",
            _crs(kind) if crs else "",
            hook_rules(daemon, hook, directory),
        ]
    )
    return directory, rules


def _apache_conf(directory: Path, rules: str) -> str:
    modules = "\n".join(
        f"LoadModule {name}_module {APACHE_MODULES}/mod_{name}.so"
        for name in ("mpm_event", "authz_core", "dir", "unique_id", "security2")
    )
    return f"""
ServerRoot "{directory}"
{modules}
User {WEB_USER}
Group {WEB_USER}
ServerName web.test
Listen {SERVER_V4}:80
Listen {SERVER_SIDE_V4}:80
PidFile {directory}/apache2.pid
DefaultRuntimeDir {directory}
Mutex file:{directory} default
ErrorLog {directory}/error.log
LogLevel warn
LogFormat "%h %l %u %t \\"%r\\" %>s %b" common
CustomLog {directory}/access.log common
Timeout 300
DocumentRoot {directory}/htdocs
DirectoryIndex index.html
<Directory {directory}/htdocs>
    Require all granted
</Directory>
SecDataDir {directory}
SecTmpDir {directory}
{rules}
"""


def _nginx_conf(directory: Path, rules_file: Path) -> str:
    temp = directory / "tmp"
    temps = "\n".join(
        f"    {name}_temp_path {temp}/{name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
load_module {NGINX_MODSEC};
user {WEB_USER};
worker_processes 1;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {directory}/access.log;
{temps}
    server {{
        listen {SERVER_V4}:80;
        listen {SERVER_SIDE_V4}:80;
        root {directory}/htdocs;
        modsecurity on;
        modsecurity_rules_file {rules_file};
    }}
}}
"""


@contextlib.contextmanager
def web_server(daemon: Daemon, kind: str, hook: str, *, crs: bool = False) -> Iterator[WebServer]:
    """Start Apache or nginx in the daemon's namespace; stop it whatever happens."""
    directory, rules = _prepare(daemon, kind, hook, crs)
    if kind == "apache":
        conf = directory / "apache2.conf"
        conf.write_text(_apache_conf(directory, rules))
        argv = ["apache2", "-d", str(directory), "-f", str(conf), "-DFOREGROUND"]
    else:
        (directory / "tmp").mkdir()
        rules_file = directory / "modsecurity.conf"
        rules_file.write_text(rules)
        conf = directory / "nginx.conf"
        conf.write_text(_nginx_conf(directory, rules_file))
        argv = ["nginx", "-c", str(conf), "-p", str(directory)]
    with running(daemon, kind, directory, argv) as server:
        yield server


@contextlib.contextmanager
def running(
    daemon: Daemon,
    kind: str,
    directory: Path,
    argv: list[str],
    ready: Callable[[], bool] | None = None,
) -> Iterator[WebServer]:
    """Check and start a configured web server in the daemon's namespace; stop it by pid.

    It is up once `ready()` (default: the innocent client gets a 200 from it)."""
    check = daemon.server.run(*argv[:1], "-t", *argv[1:], check=False, timeout=10)
    if check.returncode != 0:
        raise AssertionError(f"{kind} refuses its configuration:\n{check.stderr}")
    with open(directory / "stderr.log", "wb") as stderr:
        process = subprocess.Popen(
            daemon.server.argv(*argv), stdout=subprocess.DEVNULL, stderr=stderr
        )
    server = WebServer(kind, daemon.server, directory, process)
    try:
        deadline = time.monotonic() + 10
        up = ready or (lambda: get(daemon.innocent, SERVER_SIDE_V4, "/", timeout=1).status == 200)
        while not up():
            if not server.alive() or time.monotonic() > deadline:
                raise AssertionError(
                    f"{kind} did not start:\n"
                    + (directory / "stderr.log").read_text(errors="replace")
                    + (
                        server.error_log.read_text(errors="replace")
                        if server.error_log.exists()
                        else ""
                    )
                )
            time.sleep(0.1)
        yield server
    finally:
        server.stop()


@dataclass
class Response:
    status: int  # 0 when no HTTP answer came (connection refused, rejected, timed out)
    seconds: float
    curl_exit: int


def get(
    client: Netns,
    host: str,
    path: str,
    *,
    timeout: float = 3,
    agent: str = "",
    vhost: str = "",
    source: str = "",
    headers: Sequence[str] = (),
) -> Response:
    """One HTTP request from a client namespace with curl; bounded by `timeout`.

    `vhost` is the Host header (default: `host`), `source` the local address, `headers`
    more header lines ("X-Forwarded-For: 198.51.100.77").
    """
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}"]
    argv += ["--max-time", str(timeout), "--noproxy", "*", "--path-as-is"]
    if agent:
        argv += ["-A", agent]
    if vhost:
        argv += ["-H", f"Host: {vhost}"]
    if source:
        argv += ["--interface", source]
    for header in headers:
        argv += ["-H", header]
    result = client.run(*argv, f"http://{host}{path}", check=False, timeout=timeout + 5)
    code, _, seconds = result.stdout.partition(" ")
    return Response(int(code or 0), float(seconds or 0), result.returncode)


@contextlib.contextmanager
def hung_daemon(path: Path) -> Iterator[None]:
    """A socket that accepts connections and reads requests but never answers."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o755)
    listener.bind(str(path))
    path.chmod(0o666)
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = listener.accept()
                held.append(conn)  # keep it open and silent

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def world(allowlist: tuple[str, ...] = ()) -> Iterator[Daemon]:
    with daemon_world() as daemon:
        write_daemon_config(daemon, allowlist)
        yield daemon

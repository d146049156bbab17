"""Apache and nginx set up the way docs/modsecurity.md's step-by-step says, in temp dirs.

Debian's own files are used as shipped: Apache's mods-available/security2.conf,
/etc/modsecurity/modsecurity.conf-recommended (SecRuleEngine DetectionOnly),
nginx's /etc/nginx/modsecurity.conf, and the OWASP CRS with its crs-setup.conf
(modsecurity-crs). Only paths are substituted: /etc/imr, /etc/modsecurity's
local copy, the socket, log and cache locations move to the test's directory.
Nothing under /etc is written.

Each server has two name-based vhosts:
  detect.test  (the default) left as Debian ships it: DetectionOnly
  block.test   "SecRuleEngine On", where the admin wants the CRS to block
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from daemon_harness import IMR, REPO, SERVER_SIDE_V4, SERVER_V4, Daemon
from modsec_harness import APACHE_MODULES, NGINX_MODSEC, WEB_USER, WebServer, running

CONTRIB = REPO / "contrib" / "modsecurity"
CRS_LOAD = Path("/usr/share/modsecurity-crs/owasp-crs.load")
DEBIAN_SECURITY2 = Path("/etc/apache2/mods-available/security2.conf")
DEBIAN_RECOMMENDED = Path("/etc/modsecurity/modsecurity.conf-recommended")
DEBIAN_NGINX_MODSEC = Path("/etc/nginx/modsecurity.conf")
UNICODE_MAPPING = Path("/etc/modsecurity/unicode.mapping")
DETECT, BLOCK = "detect.test", "block.test"


def debian_crs_missing() -> str | None:
    for path in (CRS_LOAD, DEBIAN_SECURITY2, DEBIAN_RECOMMENDED, DEBIAN_NGINX_MODSEC):
        if not path.exists():
            return f"{path} is missing (modsecurity-crs, libapache2-mod-security2, nginx module)"
    return None


def _substitute(text: str, root: Path, daemon: Daemon) -> str:
    return (
        text.replace("/etc/imr/", f"{root}/etc/imr/")
        .replace("/run/imr/imr.sock", str(daemon.socket))
        .replace("/usr/local/bin/imr-hook", f"{root}/usr/local/bin/imr-hook")
        .replace("/var/log/apache2/", f"{root}/")
        .replace("/var/log/nginx/", f"{root}/")
        .replace("/var/cache/modsecurity", f"{root}/cache")
    )


def _install_imr(root: Path, daemon: Daemon) -> Path:
    """`mkdir -p /etc/imr && cp -r contrib/modsecurity /etc/imr/`, paths substituted.

    The files are copied as they are but for the paths: SOCKET_PATH at the top
    of imr.lua and IMR_SOCKET in imr-hook-exec.conf, as the docs say to set.
    Also links imr-hook where imr-hook-exec.conf expects it.
    """
    target = root / "etc" / "imr" / "modsecurity"
    shutil.copytree(CONTRIB, target)
    for path in target.iterdir():
        path.write_text(_substitute(path.read_text(), root, daemon))
    (root / "usr" / "local" / "bin").mkdir(parents=True)
    (root / "usr" / "local" / "bin" / "imr-hook").symlink_to(Path(IMR).parent / "imr-hook")
    return target


def _htdocs(root: Path) -> Path:
    htdocs = root / "htdocs"
    htdocs.mkdir(parents=True)
    (htdocs / "index.html").write_text("hello from imr's test web server\n")
    htdocs.chmod(0o755)
    (htdocs / "index.html").chmod(0o644)
    return htdocs


def _apache_files(root: Path, daemon: Daemon, hook: str) -> Path:
    """Steps 2, 3 and 5 of "Step by step: Apache 2.4 + ModSecurity v2"; returns apache2.conf."""
    # Step 2: a2enmod security2 (Debian's security2.conf), and modsecurity.conf
    # copied from modsecurity.conf-recommended.
    local = root / "etc" / "modsecurity"
    local.mkdir(parents=True)
    (local / "modsecurity.conf").write_text(
        _substitute(DEBIAN_RECOMMENDED.read_text(), root, daemon)
    )
    shutil.copy(UNICODE_MAPPING, local / "unicode.mapping")
    (root / "cache").mkdir()
    security2 = DEBIAN_SECURITY2.read_text().replace("/etc/modsecurity/", f"{local}/")
    (root / "security2.conf").write_text(_substitute(security2, root, daemon))
    # Step 3.
    imr = _install_imr(root, daemon)
    # Step 5: apache-imr.conf as conf-enabled/imr.conf, the hook picked, and
    # (with the CRS) the line for imr-crs-anomaly.conf uncommented.
    conf = (imr / "apache-imr.conf").read_text()
    anomaly = f"# Include {imr}/imr-crs-anomaly.conf"
    assert anomaly in conf, "apache-imr.conf no longer offers imr-crs-anomaly.conf"
    conf = conf.replace(anomaly, anomaly.removeprefix("# "))
    if hook == "exec":
        conf = conf.replace(f"{imr}/imr-hook-lua.conf", f"{imr}/imr-hook-exec.conf")
    (root / "imr.conf").write_text(conf)
    htdocs = _htdocs(root)
    modules = "\n".join(
        f"LoadModule {name}_module {APACHE_MODULES}/mod_{name}.so"
        for name in ("mpm_event", "authz_core", "dir", "unique_id", "security2")
    )
    vhosts = "\n".join(
        f"<VirtualHost *:80>\n    ServerName {name}\n    DocumentRoot {htdocs}\n"
        f"{extra}</VirtualHost>"
        for name, extra in ((DETECT, ""), (BLOCK, "    SecRuleEngine On\n"))
    )
    main = root / "apache2.conf"
    # Debian's apache2.conf order: mods-enabled, conf-enabled, sites-enabled.
    main.write_text(f"""
ServerRoot "{root}"
{modules}
User {WEB_USER}
Group {WEB_USER}
ServerName web.test
Listen {SERVER_V4}:80
Listen {SERVER_SIDE_V4}:80
PidFile {root}/apache2.pid
DefaultRuntimeDir {root}
Mutex file:{root} default
ErrorLog {root}/error.log
LogLevel warn
DirectoryIndex index.html
<Directory {htdocs}>
    Require all granted
</Directory>
Include {root}/security2.conf
Include {root}/imr.conf
{vhosts}
""")
    return main


def _nginx_files(root: Path, daemon: Daemon) -> Path:
    """Steps 2 and 4 of "Step by step: nginx + libmodsecurity v3"; returns nginx.conf."""
    imr = _install_imr(root, daemon)
    # nginx-modsecurity.conf includes Debian's /etc/nginx/modsecurity.conf: the
    # copy has only its audit log moved; the CRS lines are uncommented, as the
    # file says to with the CRS.
    shutil.copy(DEBIAN_NGINX_MODSEC, root / "modsecurity.conf")
    (root / "modsecurity.conf").write_text(
        _substitute(DEBIAN_NGINX_MODSEC.read_text(), root, daemon)
    )
    shutil.copy(UNICODE_MAPPING, root / "unicode.mapping")
    rules = (imr / "nginx-modsecurity.conf").read_text()
    rules = rules.replace("/etc/nginx/modsecurity.conf", str(root / "modsecurity.conf"))
    lines = [
        line.removeprefix("# ") if line.startswith("# Include ") else line
        for line in rules.splitlines()
    ]
    (imr / "nginx-modsecurity.conf").write_text("\n".join(lines) + "\n")
    http = (imr / "nginx-imr.conf").read_text()
    (root / "imr.conf").write_text(http)
    htdocs = _htdocs(root)
    (root / "tmp").mkdir()
    temps = "\n".join(
        f"    {name}_temp_path {root}/tmp/{name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    servers = "\n".join(
        f"    server {{\n        listen {SERVER_V4}:80{default};\n"
        f"        listen {SERVER_SIDE_V4}:80{default};\n        server_name {name};\n"
        f"        root {htdocs};\n{extra}    }}"
        for name, default, extra in (
            (DETECT, " default_server", ""),
            (BLOCK, "", "        modsecurity_rules 'SecRuleEngine On';\n"),
        )
    )
    main = root / "nginx.conf"
    main.write_text(f"""
load_module {NGINX_MODSEC};
user {WEB_USER};
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {root}/access.log;
{temps}
    include {root}/imr.conf;
{servers}
}}
""")
    return main


@contextlib.contextmanager
def documented_server(daemon: Daemon, kind: str, hook: str = "lua") -> Iterator[WebServer]:
    """Apache (hook "lua" or "exec") or nginx as the docs set it up, with Debian's CRS."""
    root = daemon.root / f"doc-{kind}-{hook}"
    root.mkdir()
    if kind == "apache":
        conf = _apache_files(root, daemon, hook)
        argv = ["apache2", "-d", str(root), "-f", str(conf), "-DFOREGROUND"]
    else:
        conf = _nginx_files(root, daemon)
        argv = ["nginx", "-c", str(conf), "-p", str(root)]
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    with running(daemon, kind, root, argv) as server:
        yield server

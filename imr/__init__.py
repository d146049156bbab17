"""imr: a firewall broker that lets unprivileged clients ask a root daemon to block attackers."""

__version__ = "0.1.0"

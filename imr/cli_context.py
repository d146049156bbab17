"""What every CLI command receives: the one config object and a way to reach the daemon."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imr.client import Client, TcpTarget
from imr.config import Config


@dataclass(frozen=True)
class CliContext:
    config: Config
    config_path: Path
    tcp: TcpTarget | None = None  # --connect: a daemon's TCP listener instead of the socket

    def client(self, timeout: float = 10.0) -> Client:
        return Client(self.config.server.socket, timeout=timeout, tcp=self.tcp)

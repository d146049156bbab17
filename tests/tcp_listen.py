"""Accept and close TCP connections on the given ports (IPv4 and IPv6) until killed."""

from __future__ import annotations

import selectors
import socket
import sys


def main() -> None:
    selector = selectors.DefaultSelector()
    for port in map(int, sys.argv[1:]):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", port))
        sock.listen(64)
        selector.register(sock, selectors.EVENT_READ)
    print("listening", flush=True)
    while True:
        for key, _ in selector.select():
            conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
            conn.close()


if __name__ == "__main__":
    main()

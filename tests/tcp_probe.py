"""Connect to HOST PORT once and print what happened: "connected" or the errno name.

Run inside a namespace (ip netns exec) to see what the firewall does to a real packet.
"""

from __future__ import annotations

import errno
import socket
import sys


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(float(sys.argv[3]) if len(sys.argv) > 3 else 2.0)
    try:
        sock.connect((host, port))
        print("connected")
    except TimeoutError:
        print("timeout")
    except OSError as exc:
        print(errno.errorcode.get(exc.errno or 0, str(exc)))
    finally:
        sock.close()


if __name__ == "__main__":
    main()

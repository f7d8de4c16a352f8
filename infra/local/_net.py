"""Loopback ports for the local launchers: every server here binds to 127.0.0.1 only."""

from __future__ import annotations

import socket
from collections.abc import Collection

HOST = "127.0.0.1"
"""The only address the local servers bind to."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    return free_ports(1)[0]


def free_ports(count: int, exclude: Collection[int] = ()) -> list[int]:
    """Ask the kernel for ``count`` distinct free TCP ports on 127.0.0.1.

    All sockets stay open until every port is chosen, so the ports are distinct; there is a
    short window before a server binds them in which another process could take one.

    Args:
        count: How many ports.
        exclude: Ports not to return.
    """
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
            if port not in exclude:
                ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports


def port_in_use(port: int) -> bool:
    """Whether a server could not listen on ``port`` of 127.0.0.1 now.

    Binds with ``SO_REUSEADDR``, as Ray's dashboard and weed do, so a port whose last
    connections linger in TIME_WAIT counts as free, and one something listens on does not.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False

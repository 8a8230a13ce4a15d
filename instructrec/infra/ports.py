"""Loopback ports: free ones picked by the OS, configured ones checked before a server binds them."""

from __future__ import annotations

import contextlib
import errno
import socket

from instructrec.infra.errors import PortInUseError

LOOPBACK = "127.0.0.1"


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct ports that are free on loopback right now (the OS picks them).

    All sockets stay bound until every port is picked so the OS cannot hand out the same port twice.
    Another process may still take a port before our server binds it; start-up then fails loudly.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((LOOPBACK, 0))
            ports.append(sock.getsockname()[1])
        return ports


def free_port() -> int:
    return free_ports(1)[0]


def ensure_port_free(port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            raise PortInUseError(
                f"{what} port {port} on {LOOPBACK} is already in use. Stop whatever holds it "
                f"(`ss -ltnp 'sport = :{port}'` shows it) or configure port 0 for any free port."
            ) from None


def pick_ports(service: str, configured: dict[str, int]) -> dict[str, int]:
    """Configured ports (checked to be free) and a free port for each one configured as 0."""
    for name, port in configured.items():
        if port:
            ensure_port_free(port, f"{service} {name}")
    wanted = [name for name, port in configured.items() if not port]
    chosen = dict(zip(wanted, free_ports(len(wanted)), strict=True))
    return {name: port or chosen[name] for name, port in configured.items()}


def port_open(port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout_s):
            return True
    except OSError:
        return False

"""How many new streams may wait for a handler process to accept them.

p2pd hands each incoming stream to the process that registered its handler by dialing that process's
unix socket, and a dial that finds the socket's accept queue full fails at once: p2pd resets the
stream, and the client reads a broken pipe or an empty stream instead of an answer or a refusal.
hivemind listens with asyncio's default queue of 100, so a peer that opens 200 streams at once while
the process is busy for a moment (a round, a garbage collection, two cores shared with the runtime)
loses half of them, honest clients' streams among them. The queue costs nothing while empty, so the
keeper and the frontends widen it to BACKLOG once their handlers are registered; the kernel caps it at
net.core.somaxconn (4096 on recent kernels, 128 on old ones), and the node logs what it got.
"""

from __future__ import annotations

import os
import socket
from typing import Optional

import psutil

BACKLOG = 4096
SOMAXCONN = "/proc/sys/net/core/somaxconn"


def widen(listen_path: str, backlog: int = BACKLOG) -> Optional[int]:
    """Sets the accept queue of this process's socket listening on `listen_path` to `backlog` (as far
    as the kernel allows); returns the queue length in effect, or None if no such socket was found."""
    for conn in psutil.Process().net_connections(kind="unix"):
        if conn.laddr != listen_path or conn.fd < 0:
            continue
        sock = socket.socket(fileno=os.dup(conn.fd))  # the same socket: listen() applies to it
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                sock.listen(backlog)
                return min(backlog, _somaxconn(backlog))
        finally:
            sock.close()  # closes the duplicate only
    return None


def listen_path(p2p) -> str:
    """The unix socket path where p2pd dials this process's handlers (P2P.replicate chose it)."""
    return p2p._client_listen_maddr.value_for_protocol("unix")


def _somaxconn(default: int) -> int:
    try:
        with open(SOMAXCONN) as f:
            return int(f.read())
    except (OSError, ValueError):
        return default

"""systemd's notify protocol, without a dependency: datagrams to $NOTIFY_SOCKET.

Owned by the supervisor. With `Type=notify` (node/supervisor/units/petals-node.service) systemd waits for
READY=1, which the node sends once it is ONLINE; with `WatchdogSec=` it expects WATCHDOG=1 at least
every $WATCHDOG_USEC microseconds, which the supervisor sends at half that period while its actors are
healthy (a wedged supervisor stops pinging and systemd restarts the unit). STATUS= carries the node's
state for `systemctl status`, STOPPING=1 marks the start of a shutdown, and RELOADING=1 ... READY=1
bracket a rolling reload (`systemctl reload`, ExecReload sends SIGHUP). Outside systemd (no
NOTIFY_SOCKET) every call does nothing.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Optional


class Notifier:
    def __init__(self, environ=os.environ):
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        self.address: Optional[str] = address or None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        watchdog = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.watchdog_interval: Optional[float] = int(usec) / 2e6 if watchdog else None
        self.last_ping = 0.0
        self.sock: Optional[socket.socket] = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        if self.address is None:
            return False
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError:
            return False  # systemd gone or the socket refused: the node runs on regardless

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def reloading(self) -> bool:
        """A reload began; READY=1 (ready()) says it ended. MONOTONIC_USEC: systemd 253's notify-reload
        wants the time the reload began, on CLOCK_MONOTONIC."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", "STATUS=reloading", f"MONOTONIC_USEC={usec}")

    def watchdog(self, healthy: bool, now: Optional[float] = None) -> bool:
        """Ping when due and healthy; an unhealthy node lets the watchdog expire on purpose."""
        if self.watchdog_interval is None or not healthy:
            return False
        now = time.monotonic() if now is None else now
        if now - self.last_ping < self.watchdog_interval:
            return False
        self.last_ping = now
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

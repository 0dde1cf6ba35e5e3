"""node/frontend/backlog.py: a handler socket's accept queue widened past hivemind's 100."""

from __future__ import annotations

import asyncio
import socket

from node.frontend import backlog


def dials_until_refused(path: str, most: int) -> int:
    """How many connections a socket nobody accepts on takes before a dial fails (as p2pd's does)."""
    clients = []
    try:
        for n in range(most):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            clients.append(c)
            try:
                c.connect(path)
            except BlockingIOError:  # EAGAIN: the queue is full
                return n
        return most
    finally:
        for c in clients:
            c.close()


def test_a_handler_socket_takes_many_more_dials_once_widened(tmp_path):
    plain, widened = str(tmp_path / "plain.sock"), str(tmp_path / "widened.sock")

    async def main():
        servers = [await asyncio.start_unix_server(lambda r, w: None, path=p) for p in (plain, widened)]
        try:  # as hivemind listens; the loop never runs while dialing, so nobody accepts
            got = backlog.widen(widened, 300)
            return got, dials_until_refused(plain, 400), dials_until_refused(widened, 400)
        finally:
            for server in servers:
                server.close()

    got, plain_dials, widened_dials = asyncio.run(main())
    assert plain_dials <= 101  # asyncio's default backlog (Linux admits one more)
    assert got == min(300, backlog._somaxconn(300))
    assert widened_dials >= got


def test_widen_finds_nothing_where_nothing_listens(tmp_path):
    assert backlog.widen(str(tmp_path / "nobody.sock")) is None

"""The public swarm's reachability check (PROTOCOL 5.10): health.petals.dev asked before the node joins.

The monitor is stood in for by an HTTP server on loopback that answers as health.petals.dev does."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import structlog

from node.announcer.reachability import Unreachable, confirm_public_reachability


class Monitor(ThreadingHTTPServer):
    def __init__(self, answers):
        self.answers = list(answers)  # what each request gets, the last one repeated
        self.paths: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(handler):
                self.paths.append(handler.path)
                answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
                body = json.dumps(answer).encode()
                handler.send_response(200)
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)

            def log_message(handler, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/api/v1/is_reachable/{{peer_id}}"


def check(url: str, **kwargs) -> None:
    asyncio.run(confirm_public_reachability("12D3KooWpeer", structlog.get_logger(), url=url, **kwargs))


def test_a_reachable_node_passes_at_once():
    monitor = Monitor([{"success": True, "message": "", "your_ip": "1.2.3.4"}])
    try:
        check(monitor.url)
        assert monitor.paths == ["/api/v1/is_reachable/12D3KooWpeer"]
    finally:
        monitor.shutdown()


def test_a_node_that_becomes_reachable_passes_on_a_retry():
    monitor = Monitor([{"success": False, "message": "not yet"}, {"success": True}])
    try:
        check(monitor.url, retry_every=0.05, give_up_after=5)
        assert len(monitor.paths) == 2
    finally:
        monitor.shutdown()


def test_an_unreachable_node_gives_up_naming_the_flags():
    monitor = Monitor([{"success": False, "message": "connection refused", "your_ip": "1.2.3.4"}])
    try:
        with pytest.raises(Unreachable, match="connection refused.*--public_ip.*--skip_reachability_check"):
            check(monitor.url, retry_every=0.05, give_up_after=0.2)
        assert len(monitor.paths) >= 2
    finally:
        monitor.shutdown()


def test_a_monitor_that_cannot_be_asked_skips_the_check():
    check("http://127.0.0.1:1/api/v1/is_reachable/{peer_id}", timeout=2)  # nothing listens there: no error

"""The metrics port: `/metrics` (Prometheus), `/` (the status page) and `/status.json` (its data).

Owned by the supervisor: a thread serving HTTP on --metrics_host:--metrics_port. It only reads: the
Prometheus text is built from the supervisor's totals at each scrape (node/supervisor/metrics.py), and
`/status.json` is the view the supervisor rebuilt last (node/supervisor/status_view.py, once a second),
so a request never touches the actors or waits on the supervisor's loop. The page is one file of HTML,
SVG and JavaScript (node/supervisor/status_page.html): no build step, nothing fetched from elsewhere.
Anything but GET is refused.
"""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "status_page.html")


class StatusServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry, view: Callable[[], Optional[dict]]):
        with open(PAGE, "rb") as f:
            page = f.read()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                elif path in ("/", "/index.html"):
                    self._send(200, "text/html; charset=utf-8", page)
                elif path == "/status.json":
                    data = view()
                    if data is None:
                        self._send(503, "application/json", b'{"error": "the node is starting"}')
                    else:
                        self._send(200, "application/json", json.dumps(data, default=str).encode())
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found: /, /status.json, /metrics\n")

            def do_POST(self) -> None:
                self._send(405, "text/plain; charset=utf-8", b"this server only reads\n")

            do_PUT = do_DELETE = do_PATCH = do_POST

            def _send(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # one line per scrape would drown the node's own events
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="status-http", daemon=True)
        self.thread.start()

    @property
    def server_port(self) -> int:
        return self.httpd.server_address[1]

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

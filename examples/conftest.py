"""Demo upstream: a tiny HTTP API on 127.0.0.1, started by the host-side pytest only.

Sandboxed tests reach it through ``resolve`` (like curl ``--resolve``); in the
guest this file is imported too, but starts nothing.
"""

from __future__ import annotations

import http.server
import json
import os
import threading

if os.environ.get("PYTEST_GONDOLIN_WORKER") != "1":

    class _Api(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(
                {"path": self.path, "auth": self.headers.get("Authorization", "")}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    _server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    threading.Thread(target=_server.serve_forever, daemon=True).start()
    os.environ["DEMO_API_PORT"] = str(_server.server_address[1])
    os.environ.setdefault("DEMO_TOKEN", "demo-secret-value")

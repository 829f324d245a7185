"""A payload processor to point MM_PAYLOAD_PROCESSORS at: an HTTP server on 127.0.0.1 (port 0)
that keeps every JSON payload it is POSTed, as TrustyAI's consumer endpoint receives them."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator


@contextmanager
def recording_processor(path: str = "/consumer/kserve/v2") -> Iterator[tuple[list[dict[str, Any]], str]]:
    """(the payloads received so far, the URL to give the runtime); stopped on exit."""
    got: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield got, f"http://127.0.0.1:{server.server_address[1]}{path}"
    finally:
        server.shutdown()
        server.server_close()

"""Model stores and model files for end-to-end tests: an HTTP store on 127.0.0.1 that can pull
slowly, stop half-way or drop the connection half-way, with or without Range support, and a
valid sklearn model big enough for a pull to take a while."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from meshserve_testing import devmesh

CHUNK = 64 << 10


class ModelStore:
    """Serves `files` (path -> bytes) over HTTP on 127.0.0.1, always stopped on exit.

    `rate` (bytes a second) throttles every download. While `hold` is set, a GET sends the
    Content-Length header and the first half of the file, then waits (bounded) until `hold` is
    cleared, then sends the rest; `held` is set while one waits. While `cut` is above zero, a
    GET sends the headers and the first half of its body, then drops the connection, and
    `cut` goes down by one. With `ranges`, `Range: bytes=N-` gets a 206 of the rest (unless an
    `If-Range` names another ETag); without, Range is ignored (a 200 of the whole file), as many
    plain servers do. Counts GETs, complete bodies and bytes sent, and keeps the Range headers
    asked for (None for a plain GET)."""

    def __init__(self, files: dict[str, bytes], rate: float | None = None, ranges: bool = True):
        self.files, self.rate, self.ranges = files, rate, ranges
        self.hold = threading.Event()
        self.held = threading.Event()
        self.cut = 0
        self.gets = 0
        self.complete = 0
        self.sent = 0
        self.range_headers: list[str | None] = []
        lock = threading.Lock()
        store = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                data = store.files.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404)
                    return
                etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
                asked = self.headers.get("Range")
                with lock:
                    store.gets += 1
                    store.range_headers.append(asked)
                    cut = store.cut > 0
                    store.cut -= 1 if cut else 0
                m = re.fullmatch(r"bytes=(\d+)-", asked or "")
                if_range = self.headers.get("If-Range")
                start = int(m[1]) if store.ranges and m and int(m[1]) < len(data) and if_range in (None, etag) else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                if store.ranges:
                    self.send_header("Accept-Ranges", "bytes")
                    self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                data = data[start:]
                half = len(data) // 2
                try:
                    if cut:
                        self._send(data[:half])
                        self.close_connection = True  # and the rest never comes: the client sees a short body
                        return
                    if store.hold.is_set():
                        self._send(data[:half])
                        store.held.set()
                        deadline = time.monotonic() + 120
                        while store.hold.is_set() and time.monotonic() < deadline:
                            time.sleep(0.05)
                        self._send(data[half:])
                    else:
                        self._send(data)
                    store.complete += 1
                except OSError:
                    pass  # the client went away mid-download

            def _send(self, chunk: bytes) -> None:
                for i in range(0, len(chunk), CHUNK):
                    piece = chunk[i : i + CHUNK]
                    self.wfile.write(piece)
                    self.wfile.flush()
                    store.sent += len(piece)
                    if store.rate:
                        time.sleep(len(piece) / store.rate)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "ModelStore":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hold.clear()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def knn_model(path: Path, seed: int = 9) -> bytes:
    """A valid sklearn model of about 4 MB (a brute-force k-NN keeps its whole training set),
    written to `path`; its bytes."""
    import joblib
    import numpy as np
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 16, size=(8000, 64))
    y = rng.integers(0, 10, size=8000)
    joblib.dump(KNeighborsClassifier(n_neighbors=3, algorithm="brute").fit(x, y), path)
    return path.read_bytes()

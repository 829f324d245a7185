"""Model stores and model files for end-to-end tests: an HTTP store on 127.0.0.1 that can pull
slowly or stop half-way, and a valid sklearn model big enough for a pull to take a while."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from meshserve import devmesh

CHUNK = 64 << 10


class ModelStore:
    """Serves `files` (path -> bytes) over HTTP on 127.0.0.1, always stopped on exit.

    `rate` (bytes a second) throttles every download. While `hold` is set, a GET sends the
    Content-Length header and the first half of the file, then waits (bounded) until `hold` is
    cleared, then sends the rest; `held` is set while one waits. Counts GETs, complete bodies
    and bytes sent."""

    def __init__(self, files: dict[str, bytes], rate: float | None = None):
        self.files, self.rate = files, rate
        self.hold = threading.Event()
        self.held = threading.Event()
        self.gets = 0
        self.complete = 0
        self.sent = 0
        store = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                data = store.files.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404)
                    return
                store.gets += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                half = len(data) // 2
                try:
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

        self.server = ThreadingHTTPServer(("127.0.0.1", devmesh.free_port()), Handler)
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

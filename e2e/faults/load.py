"""Steady, bounded background load for fault tests: counts what was sent and what failed."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field


@dataclass
class SteadyLoad:
    url: str
    body: bytes
    rps: float = 50.0
    max_seconds: float = 180.0
    max_requests: int = 20_000
    sent: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "SteadyLoad":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        gap = 1.0 / self.rps
        while not self._stop.is_set() and time.monotonic() < deadline and self.sent < self.max_requests:
            t0 = time.monotonic()
            self.sent += 1
            try:
                req = urllib.request.Request(self.url, data=self.body, method="POST")
                with urllib.request.urlopen(req, timeout=10) as r:
                    if r.status != 200:
                        self._fail(f"HTTP {r.status}")
            except urllib.error.HTTPError as e:
                self._fail(f"HTTP {e.code}: {e.read()[:200]!r}")
            except Exception as e:  # connection refused/reset: exactly what we count
                self._fail(f"{type(e).__name__}: {e}")
            self._stop.wait(max(0.0, gap - (time.monotonic() - t0)))

    def _fail(self, why: str) -> None:
        self.failed += 1
        if len(self.failures) < 20:
            self.failures.append(why)


@dataclass
class OpenLoad(SteadyLoad):
    """Requests started at a steady rate whatever the earlier ones are doing (a thread each), so
    a request stuck on a paused pod holds up no other; each one's start, time and status kept
    in `results`. Bounded in count and time; the requests' threads are joined at exit."""

    timeout: float = 30.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.results: list[tuple[float, float, str]] = []  # (started, seconds, status)
        self._requests: list[threading.Thread] = []

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for t in list(self._requests):
            t.join(self.timeout + 5)

    def _run(self) -> None:
        end = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < end and self.sent < self.max_requests:
            t = threading.Thread(target=self._one, daemon=True)
            t.start()
            self._requests.append(t)
            self.sent += 1
            self._stop.wait(1.0 / self.rps)

    def _one(self) -> None:
        t0 = time.monotonic()
        try:
            req = urllib.request.Request(self.url, data=self.body, method="POST")
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                status = str(r.status)
        except urllib.error.HTTPError as e:
            status = str(e.code)
        except Exception as e:  # noqa: BLE001 - recorded, as the test's subject
            status = type(e).__name__
        self.results.append((t0, time.monotonic() - t0, status))

"""Ports for processes that can only be told a port and never report the one they bound (a
KServe transformer, MLServer, Valkey, a runtime's fixed base+N ports): a reservation that holds.

Anything that can bind port 0 and report what it got must do that instead. Picking a port with
bind(0), closing it and passing the number on is not enough: the kernel hands that port out
again, to the next bind(0) or as the local port of an outgoing connection (a Redis client,
Envoy's upstreams), and the server then fails with "Address already in use" (seen in CI:
tests/test_runtime_spi_limits.py, 127.0.0.1:50924). So a reserved port is
- outside net.ipv4.ip_local_port_range, which the kernel never picks on its own;
- locked across processes: a POSIX record lock on bytes [port, port+size) of one file per user
  in the temp dir, held until `release()` or this process exits, so no other meshserve process
  (a second pytest run, a `meshserve up`) reserves it meanwhile;
- never handed out twice in one process (POSIX locks don't exclude their own process).
"""

from __future__ import annotations

import fcntl
import os
import random
import socket
import tempfile
import threading
from pathlib import Path

_lock = threading.Lock()
_held: dict[int, int] = {}  # base -> size of every block this process holds
_fd: int | None = None  # the one descriptor of the lock file: closing any would drop every lock


def _quiet_range() -> tuple[int, int]:
    """Ports the kernel never hands out on its own (see the module doc)."""
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    return (10000, lo - 1) if lo - 10000 >= 2000 else (hi + 1, 65000)


def _lock_fd() -> int:
    global _fd
    if _fd is None:
        path = Path(tempfile.gettempdir()) / f"meshserve-ports-{os.getuid()}.lock"
        _fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    return _fd


def _bindable(p: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            return False
    return True


def reserve_block(size: int = 1) -> int:
    """A base port with `size` consecutive ports after it, free now and reserved (module doc)
    until `release(base)` or this process exits."""
    lo, hi = _quiet_range()
    with _lock:
        fd = _lock_fd()
        for _ in range(1000):
            base = random.randrange(lo, hi - size)
            if any(b < base + size and base < b + n for b, n in _held.items()):
                continue
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, size, base, os.SEEK_SET)
            except OSError:
                continue  # another process holds part of it
            if all(_bindable(p) for p in range(base, base + size)):
                _held[base] = size
                return base
            fcntl.lockf(fd, fcntl.LOCK_UN, size, base, os.SEEK_SET)
    raise RuntimeError(f"no {size} free consecutive ports in {lo}..{hi}")


def reserve_port() -> int:
    return reserve_block(1)


def release(base: int) -> None:
    """Give back a block once the server that bound it has stopped."""
    with _lock:
        size = _held.pop(base, None)
        if size is not None and _fd is not None:
            fcntl.lockf(_fd, fcntl.LOCK_UN, size, base, os.SEEK_SET)

"""Children that never outlive the process that started them."""

from __future__ import annotations

import ctypes
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM the calling process when its parent dies, even by SIGKILL, so
    nothing we start is orphaned. Call it in a child between fork and exec; where prctl is
    missing (not Linux) it does nothing."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass

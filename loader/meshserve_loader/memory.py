"""Memory: the pod's capacity (configured, or the container's cgroup limit minus a buffer) and a
process tree's resident memory, to measure what a load really cost in a runtime we don't run
in-process (MLServer forks workers, so the whole tree counts)."""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_FILES = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)
# cgroup v1 reports "no limit" as a huge page-aligned number, not "max".
_UNLIMITED = 1 << 60


def cgroup_limit_bytes(files: tuple[Path, ...] = CGROUP_FILES) -> int:
    """The container's memory limit, 0 when there is none or it can't be read."""
    for f in files:
        try:
            raw = f.read_text().strip()
        except OSError:
            continue
        if raw == "max":
            return 0
        try:
            v = int(raw)
        except ValueError:
            continue
        return 0 if v >= _UNLIMITED else v
    return 0


def pod_capacity(configured: int, cgroup_limit: int, mem_buffer: int, runtime_baseline: int = 0) -> int:
    """Bytes placement may fill with models. Pure.

    A configured capacity wins but never exceeds what the container really has; with none
    (0), the cgroup limit minus the buffer (ModelMesh's memBufferBytes) and what the runtime uses
    before any model is loaded."""
    from_cgroup = max(cgroup_limit - mem_buffer - runtime_baseline, 0) if cgroup_limit else 0
    if configured > 0:
        return min(configured, from_cgroup) if from_cgroup else configured
    if from_cgroup:
        return from_cgroup
    raise ValueError(
        "no pod capacity: set MESHSERVE_POD_CAPACITY_BYTES, or run under a cgroup memory limit "
        "(a Kubernetes container's resources.limits.memory)"
    )


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


def tree_rss_bytes(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (0 if it is gone)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
        stack.extend(_children(p))
    return total

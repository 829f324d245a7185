"""Test servers never fight over a port: each binds port 0 and reports what it got, or holds a
reservation (meshserve/ports.py) that another process can't take until it is released.
Kind: integration (real processes on 127.0.0.1: Valkey, moto, the GCS emulator, Azurite,
Envoy, the in-process ADS server and HTTP servers); every one is stopped at the end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis

from meshserve import ports
from meshserve_testing import devmesh
from meshserve_testing.fakeapi import FakeApiServer
from meshserve_testing.model_store import ModelStore
from meshserve_testing.storage_servers import azurite, gcs_emulator, moto_server
from meshserve_testing.xds_harness import AdsThread, Upstream, envoy

# Tries to lock [base, base+size) of the shared lock file from another process: "held" when
# the parent's reservation keeps it out, "free" when it got the lock.
CHILD = """
import fcntl, os, sys
from meshserve import ports
base, size = int(sys.argv[1]), int(sys.argv[2])
try:
    fcntl.lockf(ports._lock_fd(), fcntl.LOCK_EX | fcntl.LOCK_NB, size, base, os.SEEK_SET)
except OSError:
    print("held")
else:
    print("free")
"""


def _other_process_sees(base: int, size: int) -> str:
    out = subprocess.run([sys.executable, "-c", CHILD, str(base), str(size)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_reservation_holds_against_other_processes_until_released() -> None:
    base = ports.reserve_block(10)
    try:
        assert _other_process_sees(base, 10) == "held"
        assert _other_process_sees(base + 9, 1) == "held"  # every port of the block, not just the first
    finally:
        ports.release(base)
    assert _other_process_sees(base, 10) == "free"


def test_reserved_ports_are_outside_the_kernels_ephemeral_range() -> None:
    lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    got = [ports.reserve_block(5) for _ in range(20)]
    try:
        for base in got:
            assert not (lo <= base <= hi or lo <= base + 4 <= hi)
        blocks = sorted(got)
        assert all(a + 5 <= b for a, b in zip(blocks, blocks[1:])), "no two blocks of one process overlap"
    finally:
        for base in got:
            ports.release(base)


def _port(url: str) -> int:
    return urlparse(url if "://" in url else "http://" + url).port or 0


def test_two_of_each_test_server_at_once_get_distinct_ports(tmp_path: Path) -> None:
    """Two of every harness, all running at the same time: every one answers on its own port."""
    got: dict[str, int] = {}
    sockets: set[str] = set()
    with ExitStack() as stack:
        for i in range(2):
            v = stack.enter_context(devmesh.valkey(tcp=True))
            assert redis.Redis.from_url(v.url).ping()
            got[f"valkey-{i}"] = v.port
            u = stack.enter_context(devmesh.valkey())  # the default: a unix socket, no TCP port at all
            assert u.port == 0 and u.url.startswith("unix://") and redis.Redis.from_url(u.url).ping()
            sockets.add(u.socket)
            got[f"s3-{i}"] = _port(stack.enter_context(devmesh.s3_server()))
            got[f"moto-{i}"] = _port(stack.enter_context(moto_server()))
            got[f"gcs-{i}"] = _port(stack.enter_context(gcs_emulator()))
            if shutil.which("npm"):
                d = tmp_path / f"azurite-{i}"
                d.mkdir()
                got[f"azurite-{i}"] = _port(stack.enter_context(azurite(d)))
            got[f"store-{i}"] = _port(stack.enter_context(ModelStore({"m": b"x"})).url)
            got[f"upstream-{i}"] = stack.enter_context(Upstream(f"u{i}")).port
            got[f"fakeapi-{i}"] = _port(stack.enter_context(FakeApiServer()).url)
            ads = AdsThread().start()
            stack.callback(ads.stop)
            got[f"ads-{i}"] = ads.port
            boot = {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}}
            got[f"envoy-admin-{i}"] = stack.enter_context(envoy(json.dumps(boot))).admin_port
        assert len(sockets) == 2
        assert all(got.values()), got
        assert len(set(got.values())) == len(got), f"two servers on one port: {got}"
        for name, port in got.items():
            if name.startswith(("s3-", "moto-", "store-", "upstream-", "envoy-admin-")):
                assert devmesh.http_get(f"http://127.0.0.1:{port}/", 5)[0] > 0, name

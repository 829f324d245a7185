"""Why pyproject pins redis-py below 8 (issue 16): with 8.x a task cancelled while it is blocked in
XREADGROUP, as a placement leader's consumers are when it steps down, can stay stuck forever.
The reproducer (tests/data/redis_cancel_repro.py) runs with redis-py 8.1.0 in a venv of its own
and with the version we install, against a real Valkey. When 8.x stops hanging here, this test
says so: that is when the pin can be lifted (and the 8.x pin below moved to the newest release).

Seen here: 8.1.0 stuck within 4-15 attempts in each of 3 runs; 7.4.1 never, in 300.

Kind: real Valkey, real redis-py releases from PyPI."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from meshserve_testing.sidevenv import ensure
from meshserve_testing import devmesh

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "data" / "redis_cancel_repro.py"
HANGING = "redis==8.1.0"


@pytest.fixture(scope="module")
def valkey():  # type: ignore[no-untyped-def]
    with devmesh.valkey() as v:
        yield v


def _run(py: str, url: str, attempts: int) -> str:
    out = subprocess.run([py, str(SCRIPT), url, str(attempts)], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_the_pin_is_below_8() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("redis") and "<8" in d for d in deps), deps


def test_redis_py_8_hangs_a_cancelled_blocking_read(valkey) -> None:  # type: ignore[no-untyped-def]
    py = ensure(REPO, ".venv-redis8", (HANGING,))
    got = _run(str(py), valkey.url, 300)
    assert got.startswith("stuck"), f"{HANGING} no longer hangs here ({got}): try lifting the redis<8 pin in pyproject.toml"


def test_the_pinned_redis_py_does_not(valkey) -> None:  # type: ignore[no-untyped-def]
    assert _run(sys.executable, valkey.url, 300) == "ok 300"

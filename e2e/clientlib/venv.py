"""`ensure_clients(root)`: `<root>/.venv-clients` with tritonclient and the kserve SDK at pinned
versions. Used by e2e/test_clients.py."""

from __future__ import annotations

from pathlib import Path

from meshserve_testing.sidevenv import ensure

PACKAGES = ("tritonclient[http,grpc]==2.73.0", "kserve==0.21.0")


def ensure_clients(root: Path) -> Path:
    return ensure(root, ".venv-clients", PACKAGES)

"""Third-party programs the tests run for real (Prometheus, promtool), installed from Debian's
packages when missing: CI has no other way to get them. Test-only."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def apt_binary(name: str, package: str) -> str:
    """The path of `name`, installing Debian's `package` first if needed (root only); skips the
    test with the reason when it can't be had."""
    found = shutil.which(name)
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", package]
        if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode != 0:
            # A fresh machine may have no package lists yet.
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
            subprocess.run(install, env=env, capture_output=True, timeout=900)
        found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed and cannot be (needs root and apt-get for Debian's {package})")
    return found

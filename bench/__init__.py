"""Benchmarks. Each writes JSON to bench/results/; docs/benchmarks.md quotes the figures."""

import sys
from pathlib import Path

# The benchmarks start meshes with the testing package, which is not installed (the wheel does
# not ship it): put its folder on the path, as pytest's `pythonpath` does for the tests.
_TESTING = str(Path(__file__).resolve().parents[1] / "testing")
if _TESTING not in sys.path:
    sys.path.insert(0, _TESTING)

"""The built-in runtime gives up on a load that outlives its timeout: the load answers a timeout,
the runtime is free for the next load at once (a hung load() holds nothing), and the hung load's
result is dropped when it finally comes.

Kind: unit (the runtime's model table in-process, a user model class on disk)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from meshserve_loader import example_models as ex
from meshserve_loader.builtin.table import LoadTimeout, Runtime

HANGS = '''
import time
from pathlib import Path


class Hangs:
    def __init__(self, settings):
        self.dir = Path(settings["parameters"]["uri"])

    def load(self):
        deadline = time.monotonic() + 30
        while not (self.dir / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        (self.dir / "returned").touch()
        return True

    def predict(self, inputs):
        return {}
'''


def _hanging_model(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "model.py").write_text(HANGS)
    (d / "model-settings.json").write_text(json.dumps({"implementation": "model.Hangs"}))
    return d


async def test_hung_load_times_out_frees_the_runtime_and_is_dropped(tmp_path: Path) -> None:
    hang = _hanging_model(tmp_path / "hangs")
    mnist = ex.write_sklearn(tmp_path / "mnist.joblib")
    rt = Runtime(load_timeout=30.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(LoadTimeout, match="did not finish within 0.5s"):
            await rt.load("hangs", "custom", str(hang), {"timeout_seconds": 0.5})
        assert 0.5 <= time.monotonic() - t0 < 2.0
        assert rt.abandoned == 1
        # The next load does not wait for the hung one.
        t0 = time.monotonic()
        await rt.load("mnist", "sklearn", str(mnist), {"timeout_seconds": 10})
        assert "mnist" in rt.models and time.monotonic() - t0 < 5.0
        # The hung load() returns: its model is not registered.
        (hang / "release").touch()
        for _ in range(200):
            if rt.abandoned == 0:
                break
            await asyncio.sleep(0.02)
        assert (hang / "returned").exists() and rt.abandoned == 0
        assert set(rt.models) == {"mnist"}
        # And the same model loads normally later.
        assert await rt.load("hangs", "custom", str(hang), {"timeout_seconds": 5}) >= 0
        assert set(rt.models) == {"mnist", "hangs"}
    finally:
        (hang / "release").touch()


async def test_load_waiting_behind_a_hung_one_times_out_too(tmp_path: Path) -> None:
    hang = _hanging_model(tmp_path / "hangs")
    mnist = ex.write_sklearn(tmp_path / "mnist.joblib")
    rt = Runtime()
    try:
        hung = asyncio.create_task(rt.load("hangs", "custom", str(hang), {"timeout_seconds": 1.0}))
        await asyncio.sleep(0.1)
        # Queued behind it with a shorter deadline: it says why it never started.
        with pytest.raises(LoadTimeout, match="did not start within 0.3s"):
            await rt.load("mnist", "sklearn", str(mnist), {"timeout_seconds": 0.3})
        with pytest.raises(LoadTimeout):
            await hung
        await rt.load("mnist", "sklearn", str(mnist), {"timeout_seconds": 10})
        assert "mnist" in rt.models and "hangs" not in rt.models
    finally:
        (hang / "release").touch()

"""The Kubernetes controller against the fake list/watch API server, with test-sized timings, and
a bounded wait for what it converges to. Shared by the tests that drive the controller."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, AsyncIterator, Callable

from kubernetes import client

from meshserve.store import State
from meshserve_controller.controller import Controller
from meshserve_testing.fakeapi import FakeApiServer

NAMESPACE = "modelmesh-serving"


@contextlib.asynccontextmanager
async def running_controller(api: FakeApiServer, state: State, namespace: str = NAMESPACE,
                             **kw: Any) -> AsyncIterator[Controller]:
    """A Controller on the fake API server, its timings short so tests take seconds (`kw`
    overrides them), stopped and its client closed after."""
    ac = client.ApiClient(client.Configuration(host=api.url))
    c = Controller(ac, state, namespace, **{"watch_timeout_seconds": 3, "resync_seconds": 0.3,
                                            "debounce_seconds": 0.02, "max_backoff_seconds": 0.3, **kw})
    task = asyncio.create_task(c.run())
    try:
        yield c
    finally:
        c.stop()
        await asyncio.wait_for(task, 15)
        ac.close()


async def until(pred: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Poll `pred` (sync or async) until it returns something true, and return that; fail with
    `what` and the last value after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: not reached in {timeout}s (last: {last!r})")

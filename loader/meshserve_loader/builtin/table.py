"""The built-in runtime's model table: loads (each in a thread of its own, bounded by its
timeout, confined to the allowed roots), shared bases, unloads, and inference on the model
threads. Both transports (http_api.py, grpc_api.py) serve from it."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from meshserve_loader.builtin import codec
from meshserve_loader.builtin.footprint import footprint
from meshserve_loader.builtin.formats import BASE_OBJECT, Model, ModelLoadError, load_model
from meshserve.headers import MODEL_ID_HEADER

if TYPE_CHECKING:
    from meshserve_loader.builtin.payloads import PayloadSink

log = logging.getLogger("meshserve.runtime")

REPOSITORY_ELSEWHERE = "the repository API (load, unload, index) is served only on the runtime's loopback control port, to the loader beside it"


class LoadTimeout(TimeoutError):
    """A load did not finish within its timeout; the runtime gave up on it."""


class PathRefused(ModelLoadError):
    """A load named a path outside the runtime's allowed roots."""


@functools.lru_cache(maxsize=8)
def _resolved_roots(roots: "tuple[Path, ...]") -> "tuple[Path, ...]":
    return tuple(Path(r).resolve() for r in roots)


def confine(path: str, roots: "list[Path] | tuple[Path, ...]") -> Path:
    """`path` resolved (symlinks, `..`), if it lies in one of `roots` (resolved themselves);
    else PathRefused. Without the check a load could read any file the runtime can (the
    storage-config, service-account tokens) and serve it back through a `string` model."""
    if not path:
        raise PathRefused("a load needs a path")
    target = Path(path).resolve()
    # The roots as resolved before (the runtime's are resolved at its start anyway,
    # Settings.allowed_model_roots), then, should that refuse, as they resolve now: resolving
    # them on every load was 0.3 of a cold load's 0.5 ms of path checks in the runtime.
    for fresh in (False, True):
        if fresh:
            _resolved_roots.cache_clear()
        for r in _resolved_roots(tuple(roots)):
            if target == r or r in target.parents:
                return target
    raise PathRefused(f"path {path!r} is outside this runtime's model roots; it loads only from its pod's disk cache and storage roots")


# Requests held for a load at once (Runtime.await_load), and how long one may be held whatever
# its header says: the data port is reachable from every peer of the pod network, so what a
# header can make the runtime hold is bounded. Past the count a request is answered at once.
MAX_AWAITING = 1024
MAX_AWAIT_SECONDS = 300.0
AWAIT_CHECK_SECONDS = 0.25  # how often a held request looks whether its client is still there


class ModelNotFound(LookupError):
    """No such model here. Its own class, so that a model's IndexError or KeyError (also
    LookupErrors) is never mistaken for it and answered 404."""


class _LoadThreads:
    """Threads for loads: a load gets an idle one, or a new one when none is idle, and the
    thread waits for the next load once done (one is kept). A thread that hangs in a user's
    load() is simply never idle again. Starting a thread per load cost each cold start the wait
    for the new thread to be scheduled, about a fifth of the runtime's time per adapter load."""

    def __init__(self) -> None:
        self._idle: list["queue.SimpleQueue[Callable[[], None]]"] = []
        self._lock = threading.Lock()

    def submit(self, job: "Callable[[], None]") -> None:
        with self._lock:
            q = self._idle.pop() if self._idle else None
        if q is None:
            q = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(q,), name="model-load", daemon=True).start()
        q.put(job)

    def _serve(self, q: "queue.SimpleQueue[Callable[[], None]]") -> None:
        while True:
            q.get()()
            with self._lock:
                if self._idle:
                    return
                self._idle.append(q)


_LOAD_THREADS = _LoadThreads()


def _in_thread(fn: Any, *args: Any) -> "asyncio.Future[Any]":
    """Run `fn(*args)` in a load thread (`_LoadThreads`). A load may hang forever (a user's
    load() that never returns): it must not hold one of the loop's few shared executor threads,
    which every later load needs."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, v: Any) -> None:
        if not fut.done():
            fut.set_result(v) if ok else fut.set_exception(v)

    def run() -> None:
        try:
            v, ok = fn(*args), True
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            v, ok = e, False
        try:
            loop.call_soon_threadsafe(settle, ok, v)
        except RuntimeError:
            pass  # the loop is gone (shutdown): nobody is waiting

    _LOAD_THREADS.submit(run)
    return fut


def worker_count() -> int:
    """Inference threads: one per CPU the process may run on (the pod's CPU limit in a cluster,
    as the kernel's affinity mask tells it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def load_and_size(fmt: str, path: Path, params: dict[str, Any], allow_executable: bool) -> tuple[Model, int]:
    """Load a model and size it: its objects' footprint, never less than the loader's prediction
    (`predicted_size`, disk size x 1.25 or the size the user stated).

    Not the RSS delta: with inference on other threads and allocator arenas growing or reusing
    pages, identical files measured 0 to 16 MB (docs/design/loader.md). The footprint is the
    same for identical files; the prediction covers what it cannot see (native formats' memory
    behind a handle). Runs on the load's thread: the walk of a large model takes a while."""
    model = load_model(fmt, path, params, allow_executable)
    return model, max(footprint(model), int(params.get("predicted_size") or 0))


def load_with_base(fmt: str, path: Path, params: dict[str, Any], allow_executable: bool, base: "SharedBase | None",
                   base_path: Path | None) -> "tuple[Model, int, SharedBase | None]":
    """Load a model that may share a base (issue 17): an adapter over `base` (the resident one)
    or over the base at `base_path`, loaded here first when none is resident. Returns the model,
    its size and the base when this load brought it in.

    An adapter's size is its own objects (the shared base is not walked), plus the base's when
    this load brought the base. Placement loads the base's own model on the pod first (issue 17
    item 2, placement bases.py), so an adapter normally finds it resident and reports its own
    bytes; the base's bytes are added only when its load had to bring the base in."""
    new: SharedBase | None = None
    if base is None and base_path is not None:
        bmodel, bsize = load_and_size(str(params.get("base_format") or "sentence-transformers"), base_path,
                                      {"predicted_size": int(params.get("base_predicted_size") or 0)}, allow_executable)
        base = new = SharedBase(bmodel, bsize, str(base_path))
    if base is None:
        model, size = load_and_size(fmt, path, params, allow_executable)
        return model, size, None
    model = load_model(fmt, path, {**params, BASE_OBJECT: base.model}, allow_executable)
    size = max(footprint(model, skip=(base.model,)), int(params.get("predicted_size") or 0))
    return model, size + (new.size if new else 0), new


@dataclass
class SharedBase:
    """A base model loaded once per runtime and shared by its adapters (and by the base's own
    registered model, when placement puts that here too). Kept while any of them is loaded."""

    model: Model
    size: int
    key: str  # its resolved path
    users: set[str] = field(default_factory=set)


# The formats whose loaded model can be a shared base, and those that need one.
BASE_FORMATS = frozenset({"sentence-transformers"})


@dataclass
class Entry:
    model: Model
    size: int
    loaded_at: float
    requests: int = 0
    last_used: float = 0.0


@dataclass
class Runtime:
    """The model table and the operations both transports share."""

    name: str = "meshserve-builtin"
    allow_executable: bool = True  # pickle/joblib and user classes (docs/security.md)
    models: dict[str, Entry] = field(default_factory=dict)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    warm: "asyncio.Future[None] | None" = None  # background imports loads must wait for
    # A load not done within this many seconds (the load's own `timeout_seconds` parameter, which
    # the loader sends, wins) is abandoned: its slot is freed and its result, should it ever
    # come, is dropped. 0: wait forever.
    load_timeout: float = 0.0
    # Inference runs on these threads, never on the event loop: a long batch must not hold up
    # health, stats, loads or other models' requests (the loader's heartbeat reads stats).
    workers: int = field(default_factory=worker_count)
    # Where loads may come from (see `confine`). None: anywhere, for in-process use by tests
    # and tools; `serve` always sets it.
    allowed_roots: "tuple[Path, ...] | None" = None
    # resolved path -> a base loaded once and shared (issue 17); model name -> the base it uses
    bases: dict[str, SharedBase] = field(default_factory=dict)
    base_of: dict[str, str] = field(default_factory=dict)
    # alias -> the loaded models that have it, in load order (the loader's `alias` load
    # parameter). The gateway may send a request by alias without rewriting it to the id
    # (docs/design/routing.md "Shared routes"): `resolve` finds the model.
    aliases: dict[str, list[str]] = field(default_factory=dict)
    alias_of: dict[str, str] = field(default_factory=dict)
    # ModelMesh's payload processors (MM_PAYLOAD_PROCESSORS, payloads.py); None: none configured.
    payloads: "PayloadSink | None" = None

    def __post_init__(self) -> None:
        self._load_lock = asyncio.Lock()
        # Loaded models in the order of their last use, the most recent last (a dict: a use
        # moves its model to the end), so `stats(since)` reads only the models used lately.
        self._by_use: dict[str, None] = {}
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="infer")
        # model -> (the event its load's end sets, requests held on it): await_load
        self._arrivals: dict[str, tuple[asyncio.Event, int]] = {}
        self._awaiting = 0
        self.m_requests = Counter(
            "meshserve_runtime_requests", "Inference requests served by this runtime", ["model", "code"], registry=self.registry
        )
        # Per model: with per-route stats off on the gateway (Settings.xds_route_stats) this is
        # where the model dashboard's latency comes from.
        self.m_latency = Histogram(
            "meshserve_runtime_inference_seconds", "Inference time inside the runtime", ["model"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
        )
        self.m_models = Gauge("meshserve_runtime_models_loaded", "Models loaded in this runtime", registry=self.registry)
        self.m_abandoned = Gauge(
            "meshserve_runtime_abandoned_loads", "Loads given up after their timeout whose thread is still running",
            registry=self.registry,
        )
        self.abandoned = 0

    def resolve(self, name: str) -> str:
        """The loaded model a request's name means: the id itself when loaded, else the model
        loaded first of those with that alias (a rollout holds the old version and the new one
        for a while; the gateway rewrites to the id whenever two share an alias on a pod, so
        this order decides only in the moment before it learns of the second), else `name`
        unchanged (the caller's lookup answers 404 naming it)."""
        if name in self.models:
            return name
        held = self.aliases.get(name)
        return held[0] if held else name

    def get(self, name: str) -> Entry:
        e = self.models.get(name)
        if e is None:
            raise ModelNotFound(f"model '{name}' is not loaded on this runtime")
        return e

    async def await_load(self, name: str, seconds: float, gone: "Callable[[], bool]" = lambda: False) -> None:
        """Hold a request the activator sent ahead of its model's load (headers.AWAIT_LOAD_HEADER)
        until a load of `name` here ends, well or not, or `seconds` pass (at most
        MAX_AWAIT_SECONDS). The request then goes on as any other: served if the model is loaded,
        else 404, on which the activator waits for a copy again. Returns at once when `name` is
        loaded, and for a request past MAX_AWAITING; within AWAIT_CHECK_SECONDS once `gone()`
        (the activator dropped the request: aiohttp does not cancel a handler whose client left)."""
        if name in self.models or not seconds > 0 or self._awaiting >= MAX_AWAITING:  # NaN too
            return
        ev, n = self._arrivals.get(name) or (asyncio.Event(), 0)
        self._arrivals[name] = (ev, n + 1)
        self._awaiting += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(seconds, MAX_AWAIT_SECONDS)
        try:
            while not ev.is_set() and not gone() and (left := deadline - loop.time()) > 0:
                try:
                    await asyncio.wait_for(ev.wait(), min(left, AWAIT_CHECK_SECONDS))
                except TimeoutError:
                    pass
        finally:
            self._awaiting -= 1
            held = self._arrivals.get(name)
            if held is not None and held[0] is ev:
                if held[1] <= 1:
                    del self._arrivals[name]
                else:
                    self._arrivals[name] = (ev, held[1] - 1)

    async def await_sent_ahead(self, name: str | None, wait: str | None, gone: "Callable[[], bool]") -> None:
        """`await_load` for a request's routing header (`name`) and AWAIT_LOAD_HEADER (`wait`), as
        the transports read them: nothing to wait for when either is missing or `wait` is not a
        number."""
        if not wait or not name:
            return
        try:
            seconds = float(wait)
        except ValueError:
            return
        await self.await_load(name, seconds, gone)

    def _arrived(self, name: str) -> None:
        """A load of `name` ended: the requests held for it go on."""
        held = self._arrivals.pop(name, None)
        if held is not None:
            held[0].set()

    async def load(self, name: str, fmt: str, path: str, params: dict[str, Any]) -> int:
        try:
            return await self._load(name, fmt, path, params)
        finally:
            self._arrived(name)

    async def _load(self, name: str, fmt: str, path: str, params: dict[str, Any]) -> int:
        if self.allowed_roots is not None:
            # Before the already-loaded shortcut too: a refused path must be refused every time.
            path = str(confine(path, self.allowed_roots))
        base_path = params.get("base_path")
        if base_path:
            base_path = str(confine(str(base_path), self.allowed_roots)) if self.allowed_roots is not None else str(Path(str(base_path)).resolve())
        if name in self.models:
            return self.models[name].size
        timeout = float(params.get("timeout_seconds") or self.load_timeout or 0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout > 0 else None
        load: "asyncio.Future[tuple[Model, int, SharedBase | None]] | None" = None
        try:
            # The deadline covers the wait for the lock too, and leaving by it releases the lock:
            # a load that hangs holds up the loads behind it for its timeout at most.
            async with asyncio.timeout_at(deadline):
                # One load at a time: a pod's loads are bounded anyway, and a load's imports and
                # allocations never race another's.
                async with self._load_lock:
                    if name in self.models:  # loaded by a request for it that came first
                        return self.models[name].size
                    if self.warm is not None:
                        try:
                            await asyncio.shield(self.warm)
                        except ImportError as e:  # a missing optional library fails only its own format
                            log.warning("format library unavailable: %s", e)
                        self.warm = None
                    base, key = self._base_for(fmt, path, params, base_path)
                    if base is not None and fmt.lower() in BASE_FORMATS:  # the base itself, already resident
                        model, size, new = base.model, base.size, None
                    else:
                        load = _in_thread(load_with_base, fmt, Path(path), params, self.allow_executable, base,
                                          Path(base_path) if base_path and base is None else None)
                        model, size, new = await asyncio.shield(load)
        except TimeoutError:
            if load is None:
                raise LoadTimeout(f"load of '{name}' did not start within {timeout:g}s: an earlier load still holds the runtime") from None
            self._abandon(name, load)
            raise LoadTimeout(f"load of '{name}' did not finish within {timeout:g}s; the runtime gave up on it") from None
        if new is not None:
            base = self.bases.setdefault(new.key, new)
            log.info("loaded base %s for %s, shared by its adapters (size=%d)", new.key, name, new.size)
        elif key is not None and fmt.lower() in BASE_FORMATS:
            base = self.bases.setdefault(key, SharedBase(model, size, key))
        if base is not None:
            base.users.add(name)
            self.base_of[name] = base.key
        self.models[name] = Entry(model, size, time.time())
        alias = str(params.get("alias") or "")
        if alias and alias != name:
            held = self.aliases.setdefault(alias, [])
            if name not in held:
                held.append(name)
            self.alias_of[name] = alias
        self.m_models.set(len(self.models))
        log.info("loaded model %s (%s) size=%d", name, fmt, size)
        return size

    def _base_for(self, fmt: str, path: str, params: dict[str, Any], base_path: str | None) -> "tuple[SharedBase | None, str | None]":
        """The resident base this load shares, if any, and the key a base loaded now goes by.
        A base model is keyed by its resolved path; an adapter names its base's path
        (`base_path`) or, failing that, a resident model (`base_model`)."""
        if fmt.lower() in BASE_FORMATS:
            key = str(Path(path).resolve())
            return self.bases.get(key), key
        if base_path:
            return self.bases.get(base_path), base_path
        named = str(params.get("base_model") or "")
        if named and named in self.base_of:
            return self.bases.get(self.base_of[named]), None
        return None, None

    def _abandon(self, name: str, load: "asyncio.Future[tuple[Model, int]]") -> None:
        """A timed-out load keeps running in its thread (Python cannot stop it). Its result is
        dropped whenever it comes, so the runtime never holds a model nobody placed."""
        self.abandoned += 1
        self.m_abandoned.inc()
        log.warning("load of %s timed out; abandoned (%d abandoned loads still running)", name, self.abandoned)

        def done(f: "asyncio.Future[tuple[Model, int]]") -> None:
            self.abandoned -= 1
            self.m_abandoned.dec()
            how = f"failed: {f.exception()}" if f.exception() is not None else "finished"
            log.warning("abandoned load of %s %s after its timeout; its result is dropped", name, how)

        load.add_done_callback(done)

    def unload(self, name: str) -> bool:
        e = self.models.pop(name, None)
        self._by_use.pop(name, None)
        self.m_models.set(len(self.models))
        alias = self.alias_of.pop(name, None)
        held = self.aliases.get(alias) if alias is not None else None
        if held is not None and name in held:
            held.remove(name)
            if not held:
                del self.aliases[alias]
        key = self.base_of.pop(name, None)
        base = self.bases.get(key) if key else None
        if base is not None:
            base.users.discard(name)
            if not base.users:  # nothing shares it any more: its memory goes with the last user
                del self.bases[key]
                log.info("unloaded base %s: no adapter uses it any more", key)
        if e is not None:
            # Per-model series go with the model, so label cardinality follows what is loaded.
            for code in ("200", "400", "404", "413", "415", "500"):
                try:
                    self.m_requests.remove(name, code)
                except KeyError:
                    pass
            try:
                self.m_latency.remove(name)
            except KeyError:
                pass
        return e is not None

    def infer(self, name: str, req: codec.InferRequest, entry: Entry | None = None) -> dict[str, Any]:
        """Synchronous: runs on an inference thread (see `run`). `entry` is the model as `run`
        found it: a request that started before an unload finishes on the model it started
        with instead of looking it up again and getting a 404 (docs/design/placement.md)."""
        e = entry or self.get(name)
        t0 = time.perf_counter()
        out = e.model.predict(req)
        self.m_latency.labels(name).observe(time.perf_counter() - t0)
        return out

    async def run(self, name: str, work: Any) -> Any:
        """`work(entry)` on an inference thread: decoding, predicting and encoding all happen off
        the loop, since each can take seconds for a large batch. The model is looked up first, on
        the loop, so an unknown model is a 404 without a thread hop, and the counters the loader
        and placement read are updated on the loop only, when the request is done."""
        e = self.get(name)
        out = await asyncio.get_running_loop().run_in_executor(self._pool, work, e)
        e.requests += 1
        e.last_used = time.time()
        if self.models.get(name) is e:  # not if it was unloaded meanwhile
            self._by_use.pop(name, None)
            self._by_use[name] = None
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def metadata(self, name: str) -> dict[str, Any]:
        e = self.get(name)
        md = e.model.metadata()
        return {"name": name, "versions": [], **md}

    def stats(self, since: float | None = None) -> dict[str, Any]:
        """Every loaded model's counters; with `since`, only the models used at or after it
        (the loader's usage report each heartbeat: O(models used), not O(models loaded))."""
        if since is None:
            return {n: {"requests": e.requests, "last_used": e.last_used, "size": e.size} for n, e in self.models.items()}
        out: dict[str, Any] = {}
        for n in reversed(self._by_use):
            e = self.models[n]
            if e.last_used < since:
                break
            out[n] = {"requests": e.requests, "last_used": e.last_used, "size": e.size}
        return out

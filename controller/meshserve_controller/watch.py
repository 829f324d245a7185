"""List/watch over the official `kubernetes` client, the informer pattern in a thread.

One `Watcher` per resource: list (remembering the list's resourceVersion), then watch from it
with bookmarks on. Each watch request is bounded (`timeout_seconds`) and resumes from the last
resourceVersion seen, whether from an event or a BOOKMARK. A 410 Gone means that version is
compacted away: relist, and turn the difference from the cache into events (so deletions
missed while away are not lost). Transport and server errors back off with tenacity.

The client is synchronous; the thread hands events to the asyncio side through a callback.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

from prometheus_client import Counter

from meshserve.extras import needs

with needs("control", "cluster mode's list/watch (meshserve controller)"):
    import urllib3
    from kubernetes import watch as k8s_watch
    from kubernetes.client.exceptions import ApiException
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    wait_exponential,
    wait_random,
)

from meshserve.k8s.objects import Key, key_of, resource_version

log = logging.getLogger("meshserve.k8s")

ADDED, MODIFIED, DELETED = "ADDED", "MODIFIED", "DELETED"

M_LISTS = Counter("meshserve_k8s_lists", "Full lists of a watched resource (the first one, and relists)", ["resource"])
M_GONE = Counter("meshserve_k8s_watch_gone", "Watches that got 410 Gone and had to relist", ["resource"])
M_ERRORS = Counter("meshserve_k8s_watch_errors", "List/watch requests that failed and were retried with backoff", ["resource"])
M_EVENTS = Counter("meshserve_k8s_watch_events", "Watch events applied", ["resource", "type"])


@dataclass(frozen=True)
class Event:
    resource: str
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict[str, Any]


def diff_list(cache: dict[Key, dict[str, Any]], items: list[dict[str, Any]], resource: str) -> list[Event]:
    """Events that turn `cache` into `items`: what a relist after 410 must report."""
    new = {key_of(o): o for o in items}
    out = [Event(resource, DELETED, o) for k, o in sorted(cache.items()) if k not in new]
    for k, o in sorted(new.items()):
        old = cache.get(k)
        if old is None:
            out.append(Event(resource, ADDED, o))
        elif resource_version(old) != resource_version(o):
            out.append(Event(resource, MODIFIED, o))
    return out


class Stopped(Exception):
    pass


def _transient(e: BaseException) -> bool:
    # Everything but a stop request and a programming error is worth retrying: the API server
    # restarting, a dropped connection, a 5xx, a 429, even a 403 while RBAC is being applied.
    return not isinstance(e, (Stopped, TypeError, AttributeError, KeyError))


class Watcher:
    """Keeps `cache` equal to the server's view of one resource and reports every change."""

    def __init__(
        self,
        resource: str,
        list_func: Callable[..., Any],
        on_event: Callable[[Event], None],
        *,
        on_synced: Callable[[str], None] | None = None,
        watch_timeout_seconds: int = 300,
        request_timeout_seconds: float = 330.0,
        max_backoff_seconds: float = 30.0,
        page_size: int = 500,
        optional: bool = False,
        absent_recheck_seconds: float = 30.0,
        **list_kwargs: Any,
    ):
        self.resource = resource
        # Optional: a 404 on list means the resource type is not installed (a CRD the cluster
        # lacks, e.g. ModelMesh's Predictor). The watcher then counts as synced with nothing,
        # so the controller is not held up, and lists again every absent_recheck_seconds.
        self.optional, self.absent_recheck = optional, absent_recheck_seconds
        self.absent = False
        self.list_func = list_func
        self.list_kwargs = list_kwargs
        self.on_event = on_event
        self.on_synced = on_synced or (lambda _r: None)
        self.watch_timeout = watch_timeout_seconds
        self.request_timeout = request_timeout_seconds
        self.page_size = page_size
        self.cache: dict[Key, dict[str, Any]] = {}
        self._lock = threading.Lock()  # the cache is written here and read by the controller
        self.rv: str | None = None  # None: a (re)list is due
        self.lists = 0
        self.relists_after_gone = 0
        self.errors = 0
        self._stop = threading.Event()
        self._watch: k8s_watch.Watch | None = None
        self._retrying = Retrying(
            retry=retry_if_exception(_transient),
            # Jitter so a restarted API server is not hit by every watcher at once.
            wait=wait_exponential(multiplier=0.1, max=max_backoff_seconds) + wait_random(0, min(1.0, max_backoff_seconds)),
            before_sleep=self._log_retry,
            sleep=self._stop.wait,  # a backoff ends at once when stop() is called
            reraise=True,
        )

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.cache.values())

    # --- run / stop --------------------------------------------------------------------
    def run(self) -> None:
        """Until `stop()`: each cycle is one list or one bounded watch request. A cycle that
        succeeds resets the backoff; one that fails is retried with exponential backoff."""
        while not self._stop.is_set():
            try:
                self._retrying(self._cycle)
            except Stopped:
                return

    def stop(self) -> None:
        self._stop.set()
        w = self._watch
        if w is not None:
            w.stop()  # shuts the socket down so a blocked read returns now

    def _log_retry(self, rs: RetryCallState) -> None:
        if self._stop.is_set():
            raise Stopped()  # the error was our own stop() closing the socket
        self.errors += 1
        M_ERRORS.labels(self.resource).inc()
        e = rs.outcome.exception() if rs.outcome else None
        log.warning("k8s watch %s: %s; retrying in %.1fs (from resourceVersion %s)",
                    self.resource, _describe(e), rs.next_action.sleep if rs.next_action else 0, self.rv or "<relist>")

    # --- one request ---------------------------------------------------------------------
    def _cycle(self) -> None:
        if self._stop.is_set():
            raise Stopped()
        if self.rv is None:
            self._list()
        else:
            self._watch_once()

    def _list(self) -> None:
        """A full list, in pages (`limit` + `continue`) so 100,000 InferenceServices never make
        one giant response. The first page's resourceVersion is the snapshot the pages share."""
        items: list[dict[str, Any]] = []
        rv, cont = "", ""
        while True:
            kwargs: dict[str, Any] = {**self.list_kwargs, "limit": self.page_size}
            if cont:
                kwargs["_continue"] = cont
            try:
                resp = self.list_func(**kwargs, _preload_content=False, _request_timeout=self.request_timeout)
            except ApiException as e:
                if self.optional and e.status == 404:
                    self._absent()
                    return
                raise
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            page = body.get("items") or []
            kind = body.get("kind", "").removesuffix("List")
            api_version = body.get("apiVersion")
            for o in page:  # list items carry neither; the registry checks both
                o.setdefault("kind", kind)
                if api_version:
                    o.setdefault("apiVersion", api_version)
            items += page
            meta = body.get("metadata") or {}
            rv = rv or str(meta.get("resourceVersion") or "")
            cont = str(meta.get("continue") or "")
            if not cont:
                break
        with self._lock:
            events = diff_list(self.cache, items, self.resource)
            self.cache = {key_of(o): o for o in items}
        self.rv = rv
        self.absent = False
        self.lists += 1
        M_LISTS.labels(self.resource).inc()
        log.info("k8s list %s: %d objects at resourceVersion %s", self.resource, len(items), self.rv)
        for ev in events:
            self.on_event(ev)
        self.on_synced(self.resource)

    def _absent(self) -> None:
        if not self.absent:
            log.info("k8s list %s: not installed in this cluster (HTTP 404); treating it as empty, checking again every %gs",
                     self.resource, self.absent_recheck)
        self.absent = True
        with self._lock:
            events = diff_list(self.cache, [], self.resource)
            self.cache = {}
        for ev in events:
            self.on_event(ev)
        self.on_synced(self.resource)
        self._stop.wait(self.absent_recheck)  # rv stays None: the next cycle lists again

    def _watch_once(self) -> None:
        # return_type "object": events stay plain dicts, the same shape the list gives.
        w = k8s_watch.Watch(return_type="object")
        self._watch = w
        try:
            for raw in w.stream(
                self.list_func,
                **self.list_kwargs,
                resource_version=self.rv,
                allow_watch_bookmarks=True,
                timeout_seconds=self.watch_timeout,
                _request_timeout=self.request_timeout,
            ):
                if self._stop.is_set():
                    raise Stopped()
                self._apply(raw)
        except ApiException as e:
            if e.status == 410:
                # Our resourceVersion was compacted away: relist now (no backoff, not an error).
                log.info("k8s watch %s: resourceVersion %s is gone (410); relisting", self.resource, self.rv)
                self.rv = None
                self.relists_after_gone += 1
                M_GONE.labels(self.resource).inc()
                return
            raise
        finally:
            self._watch = None
        if self._stop.is_set():
            raise Stopped()

    def _apply(self, raw: dict[str, Any]) -> None:
        typ, obj = raw.get("type"), raw.get("raw_object") or {}
        rv = resource_version(obj)
        if typ == "BOOKMARK":
            # Only a resourceVersion to resume from: no object changed.
            if rv:
                self.rv = rv
            M_EVENTS.labels(self.resource, "BOOKMARK").inc()
            return
        if typ not in (ADDED, MODIFIED, DELETED):
            return
        k = key_of(obj)
        with self._lock:
            if typ == DELETED:
                self.cache.pop(k, None)
            else:
                self.cache[k] = obj
        if rv:
            self.rv = rv
        M_EVENTS.labels(self.resource, typ).inc()
        self.on_event(Event(self.resource, typ, obj))


def _describe(e: BaseException | None) -> str:
    if isinstance(e, ApiException):
        hint = {404: " (is the CRD installed? kubectl get crd inferenceservices.serving.kserve.io servingruntimes.serving.kserve.io)",
                403: " (RBAC: apply istio/controller.yaml's Role and RoleBinding in this namespace)",
                401: " (credentials rejected: check the ServiceAccount token or kubeconfig)"}.get(e.status or 0, "")
        return f"HTTP {e.status} {e.reason}{hint}"
    if isinstance(e, urllib3.exceptions.HTTPError):
        return f"connection error ({type(e).__name__})"
    return f"{type(e).__name__}: {e}" if e else "error"

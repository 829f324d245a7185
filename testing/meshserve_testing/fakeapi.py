"""A small in-process Kubernetes API server for tests: list/watch, get, create, replace, delete,
merge-patch of status.

It speaks the parts of the protocol the watchers depend on: a list answers with the
collection's resourceVersion; `?watch=true&resourceVersion=N` streams newline-delimited JSON
events (ADDED/MODIFIED/DELETED, BOOKMARK when asked for) in a chunked response; a version
older than the compaction point gets the ERROR event with code 410, as the real server sends.
Faults on demand: dropped watch connections (cut mid-event) and failing lists.
Binds 127.0.0.1 only; use it as a context manager so it always stops.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

# path prefix -> (resource, apiVersion, kind)
ROUTES = [
    (re.compile(r"^/apis/serving\.kserve\.io/v1beta1/namespaces/([^/]+)/inferenceservices(?:/([^/]+)(/status)?)?$"),
     "inferenceservices", "serving.kserve.io/v1beta1", "InferenceService"),
    (re.compile(r"^/apis/serving\.kserve\.io/v1alpha1/namespaces/([^/]+)/servingruntimes(?:/([^/]+)(/status)?)?$"),
     "servingruntimes", "serving.kserve.io/v1alpha1", "ServingRuntime"),
    (re.compile(r"^/apis/serving\.kserve\.io/v1alpha1/namespaces/([^/]+)/predictors(?:/([^/]+)(/status)?)?$"),
     "predictors", "serving.kserve.io/v1alpha1", "Predictor"),
    (re.compile(r"^/apis/meshserve\.io/v1alpha1/namespaces/([^/]+)/trafficrules(?:/([^/]+)(/status)?)?$"),
     "trafficrules", "meshserve.io/v1alpha1", "TrafficRule"),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/secrets(?:/([^/]+)(/status)?)?$"), "secrets", "v1", "Secret"),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/configmaps(?:/([^/]+)(/status)?)?$"), "configmaps", "v1", "ConfigMap"),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/]+)(/status)?)?$"), "pods", "v1", "Pod"),
    (re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/statefulsets(?:/([^/]+)(/status|/scale)?)?$"), "statefulsets", "apps/v1", "StatefulSet"),
]
KINDS = {res: (api, kind) for _, res, api, kind in ROUTES}


@dataclass
class Logged:
    rv: int
    resource: str
    type: str
    obj: dict[str, Any]


@dataclass
class Request:
    method: str
    resource: str
    watch: bool
    query: dict[str, str]


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out


def _matches(obj: dict[str, Any], q: dict[str, str]) -> bool:
    meta = obj.get("metadata") or {}
    for sel in filter(None, (q.get("fieldSelector") or "").split(",")):
        k, _, v = sel.partition("=")
        if k == "metadata.name" and meta.get("name") != v:
            return False
    labels = meta.get("labels") or {}
    for sel in filter(None, (q.get("labelSelector") or "").split(",")):
        k, _, v = sel.partition("=")
        if labels.get(k) != v:
            return False
    return True


class FakeApiServer:
    def __init__(self, bookmark_interval: float = 0.2):
        self.rv = 1000
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {r: {} for r in KINDS}
        self.log: list[Logged] = []
        self.compacted_rv = 0
        self.requests: list[Request] = []
        self.bookmark_interval = bookmark_interval
        self.fail_lists = 0  # the next N list requests answer 500
        # Resources whose CRD is "not installed": every request answers 404, as the real
        # server does for an unknown resource type (e.g. predictors without ModelMesh's CRD).
        self.absent: set[str] = set()
        self.cond = threading.Condition()
        self._drop_gen = 0
        self._closing = False
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> "FakeApiServer":
        server = self

        class Handler(_Handler):
            api = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self.cond:
            self._closing = True
            self.cond.notify_all()
        assert self._httpd is not None and self._thread is not None
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # --- state changes (tests call these) --------------------------------------------------
    def _record(self, resource: str, typ: str, obj: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.log.append(Logged(self.rv, resource, typ, copy.deepcopy(obj)))
        self.cond.notify_all()
        return obj

    def apply(self, resource: str, obj: dict[str, Any], namespace: str = "modelmesh-serving") -> dict[str, Any]:
        """Create or replace (status is kept unless given), like `kubectl apply`."""
        obj = copy.deepcopy(obj)
        api, kind = KINDS[resource]
        obj.setdefault("apiVersion", api)
        obj.setdefault("kind", kind)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", namespace)
        key = (meta["namespace"], meta["name"])
        with self.cond:
            old = self.objects[resource].get(key)
            if old is not None:
                meta["uid"] = old["metadata"]["uid"]
                meta["creationTimestamp"] = old["metadata"].get("creationTimestamp")
                gen = old["metadata"].get("generation", 1)
                meta["generation"] = gen + 1 if old.get("spec") != obj.get("spec") else gen
                if "status" in old and "status" not in obj:
                    obj["status"] = old["status"]
            else:
                meta["uid"] = str(uuid.uuid4())
                meta["generation"] = 1
                meta["creationTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.objects[resource][key] = obj
            return copy.deepcopy(self._record(resource, "MODIFIED" if old else "ADDED", obj))

    def delete(self, resource: str, name: str, namespace: str = "modelmesh-serving") -> None:
        with self.cond:
            obj = self.objects[resource].pop((namespace, name))
            self._record(resource, "DELETED", obj)

    def get(self, resource: str, name: str, namespace: str = "modelmesh-serving") -> dict[str, Any] | None:
        with self.cond:
            o = self.objects[resource].get((namespace, name))
            return copy.deepcopy(o) if o else None

    def compact(self) -> None:
        """Forget history: watches from any version seen so far get 410 Gone."""
        with self.cond:
            self.compacted_rv = self.rv + 1
            self.log.clear()

    def drop_watches(self) -> None:
        """Cut every open watch connection mid-event, as a load balancer or a crash would."""
        with self.cond:
            self._drop_gen += 1
            self.cond.notify_all()

    def watch_requests(self, resource: str) -> list[Request]:
        return [r for r in list(self.requests) if r.resource == resource and r.watch]

    def list_requests(self, resource: str) -> list[Request]:
        return [r for r in list(self.requests) if r.resource == resource and not r.watch and r.method == "GET" and "name" not in r.query]


class _Handler(BaseHTTPRequestHandler):
    api: FakeApiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _route(self) -> tuple[str, str, str | None, str, dict[str, str]] | None:
        """(resource, namespace, name, subresource ("", "status" or "scale"), query)."""
        u = urlparse(self.path)
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        for rx, res, _api, _kind in ROUTES:
            m = rx.match(u.path)
            if m:
                return res, m.group(1), m.group(2), (m.group(3) or "").lstrip("/"), q
        return None

    def _json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._json(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "message": message, "code": code})

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def do_POST(self) -> None:  # noqa: N802
        """Create (`kubectl create`, the client's create_namespaced_*): 409 when it exists."""
        r = self._route()
        body = self._body()
        if r is None or r[2] is not None or r[0] in self.api.absent:
            return self._status(404, "NotFound", self.path)
        res, ns = r[0], r[1]
        self.api.requests.append(Request("POST", res, False, {"name": str((body.get("metadata") or {}).get("name") or "")}))
        meta = body.setdefault("metadata", {})
        if meta.get("namespace", ns) != ns:
            return self._status(400, "BadRequest", "the namespace of the object does not match the namespace on the request")
        if self.api.get(res, str(meta.get("name") or ""), ns) is not None:
            return self._status(409, "AlreadyExists", f'{res} "{meta.get("name")}" already exists')
        body.pop("status", None)  # the status subresource: status is not set on create
        self._json(201, self.api.apply(res, body, ns))

    def do_PUT(self) -> None:  # noqa: N802
        """Replace: 409 on a stale metadata.resourceVersion; status is kept (status subresource)."""
        r = self._route()
        body = self._body()
        if r is None or r[2] is None or r[3] or r[0] in self.api.absent:
            return self._status(404, "NotFound", self.path)
        res, ns, name = r[0], r[1], r[2]
        self.api.requests.append(Request("PUT", res, False, {"name": name}))
        old = self.api.get(res, name, ns)
        if old is None:
            return self._status(404, "NotFound", f'{res} "{name}" not found')
        rv = (body.get("metadata") or {}).get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            return self._status(409, "Conflict", f'Operation cannot be fulfilled on {res} "{name}": the object has been modified')
        body.pop("status", None)
        self._json(200, self.api.apply(res, body, ns))

    def do_DELETE(self) -> None:  # noqa: N802
        r = self._route()
        self._body()
        if r is None or r[2] is None or r[3] or r[0] in self.api.absent:
            return self._status(404, "NotFound", self.path)
        res, ns, name = r[0], r[1], r[2]
        self.api.requests.append(Request("DELETE", res, False, {"name": name}))
        if self.api.get(res, name, ns) is None:
            return self._status(404, "NotFound", f'{res} "{name}" not found')
        self.api.delete(res, name, ns)
        self._json(200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "details": {"name": name, "kind": res}})

    def do_GET(self) -> None:  # noqa: N802
        r = self._route()
        if r is None:
            return self._status(404, "NotFound", self.path)
        res, ns, _name, _sub, q = r
        if res in self.api.absent:
            return self._status(404, "NotFound", f"the server could not find the requested resource ({res})")
        if _name is not None:
            obj = self.api.get(res, _name, ns)
            self.api.requests.append(Request("GET", res, False, {"name": _name}))
            if obj is None:
                return self._status(404, "NotFound", f'{res} "{_name}" not found')
            return self._json(200, obj)
        watching = q.get("watch") in ("true", "1")
        self.api.requests.append(Request("GET", res, watching, q))
        if watching:
            return self._watch(res, ns, q)
        with self.api.cond:
            if self.api.fail_lists > 0:
                self.api.fail_lists -= 1
                fail = True
            else:
                fail = False
                items = [copy.deepcopy(o) for (ons, _), o in sorted(self.api.objects[res].items()) if ons == ns and _matches(o, q)]
                rv = self.api.rv
                # Pages: `continue` is "<offset>:<snapshot rv>" (the real one is opaque too).
                start = 0
                if q.get("continue"):
                    start_s, _, rv_s = q["continue"].partition(":")
                    start, rv = int(start_s), int(rv_s)
                limit = int(q.get("limit") or 0)
                end = start + limit if limit else len(items)
                cont = f"{end}:{rv}" if end < len(items) else ""
                items = items[start:end]
        if fail:
            return self._status(500, "InternalError", "injected failure")
        api, kind = KINDS[res]
        for o in items:  # the real server leaves these out of list items
            o.pop("kind", None)
            o.pop("apiVersion", None)
        meta = {"resourceVersion": str(rv), **({"continue": cont} if cont else {})}
        self._json(200, {"kind": kind + "List", "apiVersion": api, "metadata": meta, "items": items})

    def do_PATCH(self) -> None:  # noqa: N802
        r = self._route()
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if r is None or r[2] is None:
            return self._status(404, "NotFound", self.path)
        res, ns, name, sub, _q = r
        self.api.requests.append(Request("PATCH", res, False, {"name": name or "", "status": str(sub == "status"), "sub": sub}))
        if "merge-patch" not in (self.headers.get("Content-Type") or ""):
            return self._status(415, "UnsupportedMediaType", self.headers.get("Content-Type") or "")
        with self.api.cond:
            obj = self.api.objects[res].get((ns, name or ""))
            if obj is None:
                found = False
            else:
                found = True
                # On a subresource only its part changes, as on a real server: status, or the
                # scale's spec.replicas.
                if sub == "status":
                    patch = {"status": body.get("status")}
                elif sub == "scale":
                    patch = {"spec": {"replicas": int((body.get("spec") or {}).get("replicas") or 0)}}
                else:
                    patch = body
                merged = _merge(obj, patch)
                self.api.objects[res][(ns, name or "")] = merged
                out = copy.deepcopy(self.api._record(res, "MODIFIED", merged))
                if sub == "scale":
                    n = merged["spec"]["replicas"]
                    out = {"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": name, "namespace": ns},
                           "spec": {"replicas": n}, "status": {"replicas": n}}
        if not found:
            return self._status(404, "NotFound", f"{res} {name} not found")
        self._json(200, out)

    def _watch(self, res: str, ns: str, q: dict[str, str]) -> None:
        api = self.api
        try:
            since = int(q.get("resourceVersion") or 0)
        except ValueError:
            since = 0
        timeout = float(q.get("timeoutSeconds") or 300)
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        _kind_api, kind = KINDS[res]
        if since and since < api.compacted_rv:
            self._chunk({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                     "message": f"too old resource version: {since} ({api.compacted_rv})",
                                                     "reason": "Expired", "code": 410}})
            return self._end()
        deadline = time.monotonic() + timeout
        next_bookmark = time.monotonic() + api.bookmark_interval
        with api.cond:
            gen = api._drop_gen
        cur = since
        while True:
            with api.cond:
                if api._closing:
                    return self._end()
                if api._drop_gen != gen:
                    return self._cut()
                pending = [e for e in api.log if e.rv > cur and e.resource == res and e.obj["metadata"]["namespace"] == ns]
                latest = api.rv  # read with `pending`: a bookmark must not skip what came after
                if not pending:
                    api.cond.wait(0.05)
            for e in pending:
                if _matches(e.obj, q):
                    self._chunk({"type": e.type, "object": e.obj})
                cur = e.rv
            now = time.monotonic()
            if now >= deadline:
                return self._end()
            if not pending and bookmarks and now >= next_bookmark:
                next_bookmark = now + api.bookmark_interval
                if latest > cur:
                    cur = latest
                    self._chunk({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": _kind_api,
                                                                "metadata": {"resourceVersion": str(latest)}}})

    def _chunk(self, event: dict[str, Any]) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass

    def _cut(self) -> None:
        # Half an event, then the connection goes: the client sees a broken chunked body.
        try:
            self.wfile.write(b"40\r\n{\"type\": \"MODI")
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.close_connection = True

"""`meshserve apply` in cluster mode: the objects go to the Kubernetes API, never into Redis.

In cluster mode the controller owns the registry: it registers what the API server holds and
removes aliases of this namespace that the API server doesn't. So an InferenceService written
straight into Redis there was gone on the controller's next pass. Here `meshserve apply`
validates the files exactly as in embedded mode (same messages, nothing sent unless all of it is
valid), then creates or replaces each object through the API server with the user's kubeconfig,
as `kubectl apply` would; the controller does the rest.

The switch (`mode`): `--mode cluster`, or `MESHSERVE_MODE=cluster`, or any of `--kubeconfig`,
`--context`, `-n/--namespace` on the command line. A kubeconfig on disk alone (or $KUBECONFIG)
does not switch: a laptop with a kubeconfig still runs `meshserve up` locally.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import click

from meshserve.k8s import objects as ob
from meshserve.k8s import rules as kr
from meshserve.yamlfile import ConfigError, Document

EMBEDDED, CLUSTER = "embedded", "cluster"
DEFAULT_NAMESPACE = "modelmesh-serving"

# kind -> (group, version, plural) through CustomObjectsApi; None: core kinds through CoreV1Api.
CUSTOM = {
    "InferenceService": (ob.KSERVE_GROUP, ob.ISVC_VERSION, ob.ISVC_PLURAL),
    "Predictor": (ob.KSERVE_GROUP, ob.PREDICTOR_VERSION, ob.PREDICTOR_PLURAL),
    "ServingRuntime": (ob.KSERVE_GROUP, ob.RUNTIME_VERSION, ob.RUNTIME_PLURAL),
    "TrafficRule": (kr.GROUP, kr.VERSION, kr.PLURAL),
}
CORE = {"Secret": "secret", "ConfigMap": "config_map"}
# What makes two versions of an object the same for `unchanged`.
COMPARED = ("spec", "data", "stringData")

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Target:
    mode: str
    kubeconfig: str | None
    context: str | None
    namespace: str | None


def cluster_options(f: F) -> F:
    """`--mode`, `--kubeconfig`, `--context`, `-n/--namespace`; the command gets one `target`."""

    @functools.wraps(f)
    def wrapper(*args: Any, mode: str | None, kubeconfig: str | None, context: str | None, namespace: str | None, **kw: Any) -> Any:
        if mode is None:
            mode = CLUSTER if (kubeconfig or context or namespace) else EMBEDDED
        elif mode == EMBEDDED and (kubeconfig or context or namespace):
            raise click.UsageError("--kubeconfig, --context and -n are for cluster mode; drop them or --mode embedded")
        return f(*args, target=Target(mode, kubeconfig, context, namespace), **kw)

    wrapper = click.option("-n", "--namespace", default=None, help="Cluster mode: the namespace (default: the context's, else modelmesh-serving).")(wrapper)
    wrapper = click.option("--context", default=None, help="Cluster mode: the kubeconfig context.")(wrapper)
    wrapper = click.option("--kubeconfig", default=None, help="Cluster mode: the kubeconfig (default: $KUBECONFIG, ~/.kube/config, or the pod's ServiceAccount).")(wrapper)
    wrapper = click.option(
        "--mode", envvar="MESHSERVE_MODE", type=click.Choice([EMBEDDED, CLUSTER]), default=None,
        help="embedded: write the mesh's Redis (meshserve up). cluster: go through the Kubernetes API; `meshserve controller` "
             "registers. Default: cluster when --kubeconfig, --context or -n is given, else embedded. Env: MESHSERVE_MODE.",
    )(wrapper)
    return wrapper  # type: ignore[return-value]


def connect(t: Target) -> tuple[Any, str]:
    """(ApiClient, namespace). In a pod without an explicit kubeconfig: the ServiceAccount."""
    from kubernetes import client, config

    ns = t.namespace
    # $KUBECONFIG as it is now (the client library reads it once, at import).
    kubeconfig = t.kubeconfig or os.environ.get("KUBECONFIG") or None
    try:
        if kubeconfig is None and t.context is None:
            try:
                config.load_incluster_config()
                if ns is None:
                    ns = ob_current_namespace()
                return client.ApiClient(), ns or DEFAULT_NAMESPACE
            except config.ConfigException:
                pass
        config.load_kube_config(config_file=kubeconfig, context=t.context)
        if ns is None:
            _, active = config.list_kube_config_contexts(config_file=kubeconfig)
            if t.context:
                contexts, _ = config.list_kube_config_contexts(config_file=kubeconfig)
                active = next((c for c in contexts if c.get("name") == t.context), active)
            ns = ((active or {}).get("context") or {}).get("namespace")
    except (config.ConfigException, FileNotFoundError, TypeError) as e:
        raise LookupError(f"cluster mode needs Kubernetes credentials and found none ({e}): pass --kubeconfig / --context, "
                          "set KUBECONFIG, or run in a pod with a ServiceAccount; or use --mode embedded") from None
    return client.ApiClient(), ns or DEFAULT_NAMESPACE


def ob_current_namespace() -> str | None:
    try:
        return Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text().strip() or None
    except OSError:
        return None


class Cluster:
    """Get, create and replace the kinds meshserve reads, as plain dicts."""

    def __init__(self, api: Any, namespace: str):
        from kubernetes import client

        self.ns = namespace
        self.custom, self.core = client.CustomObjectsApi(api), client.CoreV1Api(api)

    def _call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> dict[str, Any]:
        resp = fn(*args, **kw, _preload_content=False, _request_timeout=30)
        try:
            return json.loads(resp.data)
        finally:
            resp.release_conn()

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            if kind in CUSTOM:
                return self._call(self.custom.get_namespaced_custom_object, *CUSTOM[kind][:2], self.ns, CUSTOM[kind][2], name)
            return self._call(getattr(self.core, f"read_namespaced_{CORE[kind]}"), name, self.ns)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def list(self, kind: str) -> list[dict[str, Any]]:
        """Every object of `kind` in the namespace; [] when its CRD is not installed."""
        from kubernetes.client.exceptions import ApiException

        try:
            body = self._call(self.custom.list_namespaced_custom_object, *CUSTOM[kind][:2], self.ns, CUSTOM[kind][2])
        except ApiException as e:
            if e.status == 404:
                return []
            raise
        for o in body.get("items") or []:
            o.setdefault("kind", kind)
        return body.get("items") or []

    def create(self, kind: str, obj: dict[str, Any]) -> None:
        if kind in CUSTOM:
            self._call(self.custom.create_namespaced_custom_object, *CUSTOM[kind][:2], self.ns, CUSTOM[kind][2], obj)
        else:
            self._call(getattr(self.core, f"create_namespaced_{CORE[kind]}"), self.ns, obj)

    def replace(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if kind in CUSTOM:
            self._call(self.custom.replace_namespaced_custom_object, *CUSTOM[kind][:2], self.ns, CUSTOM[kind][2], name, obj)
        else:
            self._call(getattr(self.core, f"replace_namespaced_{CORE[kind]}"), name, self.ns, obj)

    def delete(self, kind: str, name: str) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            self._call(self.custom.delete_namespaced_custom_object, *CUSTOM[kind][:2], self.ns, CUSTOM[kind][2], name)
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise


def _object(doc: Document, namespace: str) -> tuple[str, dict[str, Any]]:
    d = copy.deepcopy(doc.data)
    kind = str(d.get("kind"))
    if kind not in CUSTOM and kind not in CORE:
        raise doc.error(("kind",), f"cluster mode does not apply kind {kind}")
    meta = d.setdefault("metadata", {})
    given = meta.get("namespace")
    if given and given != namespace:
        # As kubectl: a file that names another namespace than the command line is an error.
        raise doc.error(("metadata", "namespace"), f"the object says namespace {given!r}, the command line {namespace!r}: make them agree")
    meta["namespace"] = namespace
    return kind, d


def _same(current: dict[str, Any], new: dict[str, Any]) -> bool:
    cm, nm = current.get("metadata") or {}, new.get("metadata") or {}
    return (all(current.get(k) == new.get(k) for k in COMPARED)
            and (cm.get("labels") or {}) == (nm.get("labels") or {}) and (cm.get("annotations") or {}) == (nm.get("annotations") or {}))


def apply(cluster: Cluster, paths: Iterable[Path], stdin: str | None, dry_run: bool = False) -> list[str]:
    """Validate everything as embedded mode does (rules against the models in the cluster and
    in the files), then create or replace each object. Returns kubectl-style lines
    (`inferenceservice/x created`). Raises ConfigError before anything is sent."""
    from meshserve.rules import config as rc

    paths = list(paths)
    cfg = rc.read_config(paths, stdin)
    docs = [d for p in paths for d in rc._documents(p, stdin)]
    objs = [_object(d, cluster.ns) for d in docs]
    if cfg.rule_docs:
        known: set[str] = set()
        for kind in ("InferenceService", "Predictor"):
            for o in cluster.list(kind):
                if kind == "InferenceService" and not ob.is_modelmesh(o):
                    continue
                known.add(ob.key_of(o)[1])
                try:
                    known.add(ob.parse_isvc(o).id)
                except ConfigError:
                    pass
        owners = {(o.get("spec") or {}).get("model"): ob.key_of(o)[1] for o in cluster.list("TrafficRule")}
        rc.validate_rules(cfg, known, {m: n for m, n in owners.items() if isinstance(m, str)})
    out = []
    for doc, (kind, obj) in zip(docs, objs):
        if kind in ("Secret", "ConfigMap") and obj["metadata"].get("name") not in (ob.STORAGE_SECRET, ob.CONFIG_MAP):
            continue  # read_config already refused these
        current = cluster.get(kind, obj["metadata"]["name"])
        if current is None:
            verdict = "created"
            if not dry_run:
                cluster.create(kind, obj)
        elif _same(current, obj):
            verdict = "unchanged"
        else:
            verdict = "configured"
            obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            if not dry_run:
                cluster.replace(kind, obj)
        out.append(f"{kind.lower()}/{obj['metadata']['name']} {verdict}{' (dry run)' if dry_run else ''}")
    return out


def explain_api_error(e: BaseException, host: str) -> str | None:
    """A message for an error talking to the API server, else None."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    if isinstance(e, ApiException):
        try:
            msg = json.loads(e.body or "{}").get("message") or e.reason
        except ValueError:
            msg = e.reason
        hint = {403: " (RBAC: your user may not write these objects in this namespace)",
                404: " (is the CRD installed? kubectl apply -k istio/ installs the TrafficRule CRD; KServe's for the others)",
                401: " (credentials rejected: check the kubeconfig)"}.get(e.status or 0, "")
        return f"the Kubernetes API at {host} refused: HTTP {e.status} {msg}{hint}"
    if isinstance(e, (urllib3.exceptions.HTTPError, OSError)):
        return f"cannot reach the Kubernetes API at {host}: {type(e).__name__}. Check the kubeconfig's server and context."
    return None


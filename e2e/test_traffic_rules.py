"""Issue 6 through the real Envoy: weighted splits, header matches, sticky, mirrors, rollback.

Kind: e2e. One `meshserve up` (real Valkey, Envoy, xDS server, placement, rollout controller,
two built-in runtime pods) with tiny `string` models, so each answer names the model that
served it. Loops are bounded in count and time.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner

from meshserve_testing import devmesh
from meshserve.cli import cli

pytestmark = pytest.mark.e2e

MODELS = ("tr-a", "tr-b", "tr-shadow")
BROKEN = "tr-broken"  # registered, but its file never exists: every load fails
BODY = json.dumps({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]}).encode()


def isvc(name: str, path: str) -> str:
    return devmesh.inference_service(name, "string", devmesh.pvc_storage("strings", path))


@pytest.fixture(scope="module")
def tmesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devmesh.Mesh]:
    cfg = tmp_path_factory.mktemp("traffic-config")
    # tr-sk is the sklearn example model: it answers our BYTES requests with 500, a canary that errs.
    sk = devmesh.inference_service("tr-sk", "sklearn", devmesh.pvc_storage("my-models-pvc", "mnist-svm.joblib"))
    (cfg / "models.yaml").write_text("---\n".join([*(isvc(m, f"{m}.txt") for m in (*MODELS, BROKEN)), sk]))
    with devmesh.mesh(config_dir=cfg) as m:
        d = m.data_dir / "pvc" / "strings"
        d.mkdir(parents=True, exist_ok=True)
        for name in MODELS:
            (d / f"{name}.txt").write_text(name)
        yield m


def apply(m: devmesh.Mesh, tmp: Path, text: str) -> str:
    f = tmp / "rule.yaml"
    f.write_text(text)
    res = CliRunner().invoke(cli, ["apply", "-f", str(f)], env={"MESHSERVE_REDIS_URL": m.redis_url})
    assert res.exit_code == 0, res.output
    return res.output


class Client:
    """Keep-alive HTTP/1.1 to the gateway; one per thread."""

    def __init__(self, m: devmesh.Mesh):
        self.port = m.ports["gateway_rest_port"]
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def infer(self, model: str, headers: dict[str, str] | None = None, full: bool = False) -> tuple[int, str]:
        """(status, name of the model that answered: the alias part, or the concrete id if `full`)."""
        for attempt in range(2):
            try:
                self.conn.request("POST", f"/v2/models/{model}/infer", body=BODY, headers=headers or {})
                r = self.conn.getresponse()
                data = r.read()
                break
            except (http.client.HTTPException, OSError):
                # A keep-alive connection the gateway closed is the client's business, not a
                # failed request: reconnect once.
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                if attempt:
                    raise
        if r.status != 200:
            return r.status, data.decode(errors="replace")
        name = json.loads(data)["model_name"]
        return 200, name if full else name.split("__isvc-")[0]


def fire(m: devmesh.Mesh, model: str, n: int, headers_for=lambda i: {}, threads: int = 8, full: bool = False) -> tuple[Counter, list]:  # type: ignore[no-untyped-def]
    counts: Counter = Counter()
    failures: list = []
    lock = threading.Lock()

    def work(t: int) -> None:
        c = Client(m)
        for i in range(t, n, threads):
            code, who = c.infer(model, headers_for(i), full)
            with lock:
                if code == 200:
                    counts[who] += 1
                else:
                    failures.append((code, who))

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(work, range(threads)))
    return counts, failures


def wait_for(m: devmesh.Mesh, model: str, want: set[str], headers: dict[str, str] | None = None, timeout: float = 30) -> None:
    """Until answers from every model in `want` (and only those) were seen: the rule is live."""
    c = Client(m)
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.clear()
        for _ in range(40):
            code, who = c.infer(model, headers)
            if code == 200:
                seen.add(who)
        if seen == want:
            return
        time.sleep(0.1)
    raise AssertionError(f"{model}: wanted answers from {want}, saw {seen}")


def wait_config(m: devmesh.Mesh, *needles: str, timeout: float = 15) -> None:
    """Until Envoy's live route configuration mentions one of `needles` (a rule that looks like
    the previous one from the outside, e.g. stickiness, is only checkable once it is there)."""
    def live() -> bool:
        dump = devmesh.http_get(m.admin + "/config_dump?resource=dynamic_route_configs")[1].decode()
        return any(n in dump for n in needles)

    devmesh.wait_until(live, timeout, f"{needles!r} in Envoy's routes")


def runtime_requests(m: devmesh.Mesh, model_prefix: str) -> int:
    from meshserve_rollout.controller import parse_runtime_metrics

    total = 0
    for i in range(2):
        code, body = devmesh.http_get(m.pod_rest(i) + "/metrics")
        if code == 200:
            total += int(sum(n for name, (n, _) in parse_runtime_metrics(body.decode()).items() if name.startswith(model_prefix + "__isvc-")))
    return total


RULE = """apiVersion: meshserve.io/v1alpha1
kind: TrafficRule
metadata:
  name: tr
spec:
  model: tr-a
"""


def test_90_10_split_within_3_points(tmesh: devmesh.Mesh, tmp_path: Path) -> None:
    apply(tmesh, tmp_path, RULE + "  routes:\n  - to:\n    - {model: tr-a, weight: 90}\n    - {model: tr-b, weight: 10}\n")
    wait_for(tmesh, "tr-a", {"tr-a", "tr-b"})
    t0 = time.monotonic()
    counts, failures = fire(tmesh, "tr-a", 2000)
    took = time.monotonic() - t0
    assert not failures, failures[:5]
    share_b = 100 * counts["tr-b"] / 2000
    print(f"\n90/10 split over 2000 requests: tr-b got {share_b:.1f}% ({took:.1f}s, {2000 / took:.0f} req/s)")
    assert 7.0 <= share_b <= 13.0, counts


def test_sticky_header_keeps_each_user_on_one_model(tmesh: devmesh.Mesh, tmp_path: Path) -> None:
    apply(tmesh, tmp_path, RULE + "  routes:\n  - to:\n    - {model: tr-a, weight: 50}\n    - {model: tr-b, weight: 50}\n    sticky: {header: x-user-id}\n")
    wait_config(tmesh, "x-user-id")
    c = Client(tmesh)
    per_user = {}
    for u in range(40):
        answers = {c.infer("tr-a", {"x-user-id": f"user-{u}"})[1] for _ in range(10)}
        assert len(answers) == 1, (u, answers)
        per_user[u] = answers.pop()
    assert set(per_user.values()) == {"tr-a", "tr-b"}  # users are spread over both, each stays put


def test_header_match_sends_all_matching_and_only_those(tmesh: devmesh.Mesh, tmp_path: Path) -> None:
    apply(tmesh, tmp_path, RULE + "  routes:\n  - match:\n      headers:\n        x-user-group: {exact: beta}\n    to:\n    - model: tr-b\n  - to:\n    - model: tr-a\n")
    wait_for(tmesh, "tr-a", {"tr-b"}, {"x-user-group": "beta"})
    beta, f1 = fire(tmesh, "tr-a", 400, lambda i: {"x-user-group": "beta"})
    other, f2 = fire(tmesh, "tr-a", 400, lambda i: {"x-user-group": "alpha"} if i % 2 else {})
    assert not f1 and not f2
    assert beta == Counter({"tr-b": 400}) and other == Counter({"tr-a": 400})
    # gRPC by alias (mm-vmodel-id) follows the same rule.
    import grpc

    from meshserve_proto import grpc_predict_v2_pb2 as pb
    from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg

    req = pb.ModelInferRequest(model_name="tr-a")
    req.inputs.add(name="input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"hello")
    with grpc.insecure_channel(tmesh.grpc) as ch:
        stub = pbg.GRPCInferenceServiceStub(ch)
        for group, want in (("beta", "tr-b"), ("alpha", "tr-a")):
            for _ in range(20):
                resp = stub.ModelInfer(req, metadata=(("mm-vmodel-id", "tr-a"), ("x-user-group", group)), timeout=30)
                assert resp.model_name.split("__isvc-")[0] == want, (group, resp.model_name)


def test_mirror_gets_its_share_and_clients_see_only_primary(tmesh: devmesh.Mesh, tmp_path: Path) -> None:
    apply(tmesh, tmp_path, RULE + "  mirror: {model: tr-shadow, percent: 20}\n")
    # Live once the shadow starts receiving copies (the controller preloads it).
    c = Client(tmesh)
    deadline = time.monotonic() + 30
    while runtime_requests(tmesh, "tr-shadow") == 0 and time.monotonic() < deadline:
        for _ in range(20):
            c.infer("tr-a")
    before = runtime_requests(tmesh, "tr-shadow")
    assert before > 0, "the shadow never received a mirrored request"
    counts, failures = fire(tmesh, "tr-a", 1000)
    assert not failures and counts == Counter({"tr-a": 1000})  # never the shadow's answer
    time.sleep(0.5)  # mirrored requests are fire-and-forget: let the last ones land
    got = runtime_requests(tmesh, "tr-shadow") - before
    print(f"\nmirror 20%: shadow received {got} of 1000 ({got / 10:.1f}%)")
    assert 140 <= got <= 260, got  # 200 expected; +-4.7 standard deviations


def test_rollback_takes_effect_within_1s(tmesh: devmesh.Mesh, tmp_path: Path) -> None:
    apply(tmesh, tmp_path, RULE + "  routes:\n  - to:\n    - {model: tr-a, weight: 50}\n    - {model: tr-b, weight: 50}\n")
    wait_for(tmesh, "tr-a", {"tr-a", "tr-b"})
    log: list[tuple[float, float, str]] = []
    stop = threading.Event()

    def load() -> None:
        c = Client(tmesh)
        while not stop.is_set():
            t = time.monotonic()
            code, who = c.infer("tr-a")
            log.append((t, time.monotonic(), who if code == 200 else f"HTTP {code}"))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    res = CliRunner().invoke(cli, ["rollback", "tr"], env={"MESHSERVE_REDIS_URL": tmesh.redis_url})
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(10)
    assert res.exit_code == 0, res.output
    last_b = max((start for start, _, who in log if who == "tr-b"), default=t0)
    print(f"\nrollback: last request to tr-b started {1000 * (last_b - t0):.0f} ms after the rollback command")
    assert all(who in ("tr-a", "tr-b") for _, _, who in log), [w for *_, w in log if w not in ("tr-a", "tr-b")][:5]
    assert last_b - t0 < 1.0
    assert sum(1 for s, _, who in log if s > t0 + 1.0) > 0  # requests kept flowing after it


def _status(m: devmesh.Mesh, name: str) -> dict:
    import asyncio

    from meshserve import state as st
    from meshserve.rules import store

    async def go() -> dict:
        s = st.State.from_url(m.redis_url)
        try:
            return (await store.read_all(s))[1].get(name, {})
        finally:
            await s.close()

    return asyncio.run(go())


def wait_status(m: devmesh.Mesh, name: str, pred, timeout: float = 20) -> dict:  # type: ignore[no-untyped-def]
    return devmesh.wait_until(lambda: (lambda s: s if pred(s) else None)(_status(m, name)), timeout, f"rule {name} status")


def test_progressive_canary_holds_advances_promotes_and_aborts(tmesh: devmesh.Mesh, tmp_path: Path) -> None:
    apply(tmesh, tmp_path, RULE + "  canary:\n    model: tr-b\n    steps:\n    - {weight: 20, hold: 2s}\n    - {weight: 60}\n    - {weight: 100}\n")
    st0 = _status(tmesh, "tr")
    assert (st0["phase"], st0["step"]) == ("Progressing", 0)
    st1 = wait_status(tmesh, "tr", lambda s: s.get("step") == 1)  # held 2 s, then advanced by itself
    assert st1["phase"] == "Paused" and st1["since"] - st0["since"] >= 2.0
    wait_config(tmesh, '"weight": 60000', '"weight": 30000')  # tr-b's 60% on one pod or two
    counts, failures = fire(tmesh, "tr-a", 1000)
    assert not failures and 52 <= counts["tr-b"] / 10 <= 68, (counts, failures[:2], tmesh.log()[-6000:])  # paused at 60% until promoted
    env = {"MESHSERVE_REDIS_URL": tmesh.redis_url}
    for want in ("canary at 100%", "Promoted"):
        res = CliRunner().invoke(cli, ["promote", "tr"], env=env)
        assert res.exit_code == 0 and want in res.output, res.output
    wait_for(tmesh, "tr-a", {"tr-b"})
    # A canary that cannot load is aborted: its share goes back to the stable model.
    apply(tmesh, tmp_path, RULE + f"  canary:\n    model: {BROKEN}\n    steps:\n    - {{weight: 10}}\n    - {{weight: 100}}\n")
    ab = wait_status(tmesh, "tr", lambda s: s.get("phase") == "Aborted", timeout=60)
    assert "could not be loaded" in ab["reason"], ab
    wait_for(tmesh, "tr-a", {"tr-a"})


def test_canary_with_high_error_rate_is_aborted(tmesh: devmesh.Mesh, tmp_path: Path) -> None:
    apply(tmesh, tmp_path, RULE + "  canary:\n    model: tr-sk\n    steps:\n    - {weight: 50}\n    - {weight: 100}\n"
          "    abort: {errorRatePercent: 20, window: 30s, minRequests: 10}\n")
    c = Client(tmesh)
    codes: Counter = Counter()
    deadline = time.monotonic() + 30
    while _status(tmesh, "tr").get("phase") != "Aborted" and time.monotonic() < deadline:
        for _ in range(20):
            codes[c.infer("tr-a")[0]] += 1
        time.sleep(0.2)
    st = _status(tmesh, "tr")
    assert st.get("phase") == "Aborted" and "error rate" in st["reason"], (st, codes)
    print(f"\nabort: {st['reason']} (clients saw {dict(codes)})")
    wait_for(tmesh, "tr-a", {"tr-a"})

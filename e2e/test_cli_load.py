"""Issue 8: `meshserve load` with progress, against a running mesh.

Kind: e2e. A real mesh (`meshserve up`: Valkey, Envoy, placement, two loader agents and
built-in runtimes) whose big model (a 4 MB k-NN joblib) is pulled from a throttled HTTP store
on 127.0.0.1 in this process (about 1.5 MB/s, so a pull lasts ~3 s); the CLI runs as a
subprocess. Every wait is bounded; the store and the mesh are always stopped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis

from meshserve_testing.model_store import ModelStore, knn_model
from meshserve_testing import devmesh

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
REPO = Path(__file__).resolve().parent.parent
RATE = 1_500_000  # bytes a second the store sends


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[devmesh.Mesh, bytes]]:
    tmp = tmp_path_factory.mktemp("cli-load")
    model = knn_model(tmp / "knn.joblib")
    with ModelStore(rate=RATE, files={"knn-big.joblib": model, "knn-slow.joblib": model}) as store:
        config = tmp / "mesh-config"
        config.mkdir()
        for f in (REPO / "mesh-config").glob("*.yaml"):
            shutil.copy(f, config / f.name)
        (config / "knn-big.yaml").write_text(devmesh.inference_service("knn-big", "sklearn", devmesh.uri_storage(f"{store.url}/knn-big.joblib")))
        (config / "knn-slow.yaml").write_text(devmesh.inference_service("knn-slow", "sklearn", devmesh.uri_storage(f"{store.url}/knn-slow.joblib")))
        (config / "broken.yaml").write_text(devmesh.inference_service("broken-model", "sklearn", devmesh.pvc_storage("my-models-pvc", "corrupt.joblib")))
        with devmesh.mesh(config_dir=config) as m:
            (m.data_dir / "pvc" / "my-models-pvc" / "corrupt.joblib").write_bytes(b"this is not a joblib file")
            yield m, model


def cli(m: devmesh.Mesh, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshserve.cli", *args, "--redis-url", m.redis_url],
                          cwd=str(REPO), capture_output=True, text=True, timeout=timeout)


def _copies(r: redis.Redis, model_id: str) -> dict[str, Any]:
    raw = r.hget("ms:placements", model_id)
    return json.loads(raw) if raw else {}


def test_load_shows_progress_then_loaded(env: tuple[devmesh.Mesh, bytes]) -> None:
    m, model = env
    r = redis.Redis.from_url(m.redis_url)
    try:
        knn = r.hget("ms:aliases", "knn-big").decode()
        assert not _copies(r, knn), "knn-big loads only when asked"
        proc = subprocess.Popen([sys.executable, "-m", "meshserve.cli", "load", "knn-big", "--json", "--timeout", "90", "--redis-url", m.redis_url],
                                cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # While it runs, watch the loader's progress entry of each copy, as the CLI does.
        samples: list[dict[str, Any]] = []
        deadline = time.monotonic() + 100
        while proc.poll() is None and time.monotonic() < deadline:
            for pod in _copies(r, knn):
                raw = r.get(f"ms:progress:{knn}|{pod}")
                if raw:
                    samples.append({"pod": pod, **json.loads(raw)})
            time.sleep(0.05)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, (out, err, m.log()[-3000:])
        (res,) = json.loads(out)
        copies = _copies(r, knn)
        assert res["name"] == "knn-big" and res["model"] == knn and res["state"] == "loaded", res
        assert copies[res["pod"]]["state"] == "loaded" and res["pod"] in ("pod-0", "pod-1"), (res, copies)
        assert res["size"] > 0 and res["reason"] == ""

        # The pull showed progress: bytes growing toward the model's size, then the load.
        pulling = [s for s in samples if s["phase"] == "pulling"]
        done = [s["done_bytes"] for s in pulling]
        assert {s["pod"] for s in samples} == {res["pod"]}, samples
        assert done == sorted(done), done
        partial = sorted({d for d in done if 0 < d < len(model)})
        assert len(partial) >= 3, done  # ~3 s of pull at up to 4 writes a second
        assert all(s["total_bytes"] == len(model) for s in pulling if s["done_bytes"]), pulling
        # Then loading into the runtime (too quick for a 4 MB model to be seen between two
        # writes, so it shows as the final `loaded`), never back to pulling.
        phases = [s["phase"] for s in samples]
        assert phases[-1] == "loaded" and "failed" not in phases, phases
        assert phases == sorted(phases, key=["pulling", "loading", "loaded"].index), phases
        assert all(s["started"] <= s["updated"] for s in samples)
        # The entry is marked done, and expires.
        key = f"ms:progress:{knn}|{res['pod']}"
        raw = r.get(key)
        assert raw is None or (json.loads(raw)["phase"] == "loaded" and 0 < r.pttl(key) <= 15000), raw

        status = json.loads(cli(m, "status", "--json").stdout)
        assert not [x for x in status["loading"] if x["model"] == knn]
        # Already loaded: the bars (a pipe, not a terminal: one final frame) say where, at once.
        human = cli(m, "load", "knn-big", timeout=30)
        assert human.returncode == 0 and f"loaded on {res['pod']}" in human.stdout, (human.stdout, human.stderr)
    finally:
        r.close()


def test_load_unknown_model_is_a_clear_error(env: tuple[devmesh.Mesh, bytes]) -> None:
    m, _ = env
    out = cli(m, "load", "no-such-model", "--json", timeout=30)
    assert out.returncode == 1  # not found is a failure like any other (issue 16); 2 is usage only
    assert "model 'no-such-model' not found: no InferenceService or model is registered" in out.stderr
    assert json.loads(out.stdout)[0]["state"] == "not_found"
    r = redis.Redis.from_url(m.redis_url)
    try:
        assert not [f for _, f in r.xrange("ms:loadreq") if f[b"model"] == b"no-such-model"], "nothing is asked for"
    finally:
        r.close()


def test_load_failure_and_timeout_exit_non_zero(env: tuple[devmesh.Mesh, bytes]) -> None:
    m, _ = env
    out = cli(m, "load", "broken-model", "--json", "--timeout", "60", timeout=90)
    assert out.returncode == 1, (out.stdout, out.stderr)
    (res,) = json.loads(out.stdout)
    assert res["state"] == "failed" and res["reason"], res
    # A pull of ~3 s cannot finish in 1 s: a timeout, with explain's summary as the reason.
    out = cli(m, "load", "knn-slow", "--json", "--timeout", "1", timeout=30)
    assert out.returncode == 1, (out.stdout, out.stderr)
    (res,) = json.loads(out.stdout)
    assert res["state"] == "timeout" and "not loaded within 1s" in res["reason"] and "loading on" in res["reason"], res
    # Live progress in `status` while that pull runs.
    status = json.loads(cli(m, "status", "--json").stdout)
    assert [x for x in status["loading"] if x["model"].startswith("knn-slow")], status["loading"]
    # --no-wait asks and returns at once; the load then happens anyway.
    out = cli(m, "load", "sklearn-mnist", "--no-wait", timeout=30)
    assert out.returncode == 0 and ("load requested" in out.stdout or "already loaded" in out.stdout), (out.stdout, out.stderr)
    r = redis.Redis.from_url(m.redis_url)
    try:
        mnist = r.hget("ms:aliases", "sklearn-mnist").decode()
        devmesh.wait_until(lambda: any(c["state"] == "loaded" for c in _copies(r, mnist).values()), 60, "sklearn-mnist loaded")
    finally:
        r.close()

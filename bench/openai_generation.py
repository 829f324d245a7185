"""Warm /v1/completions through the gateway, per layout, against the same request sent straight
to the pod and to the activator (issue 17, item 4: "no Python hop on the warm path").

One `meshserve up` per layout (scoped, matcher) with one pod serving a generating user class
(meshserve_testing/parrot.py, max_tokens=1, no delay: the model costs almost nothing, so what
differs is the path). Sequential keep-alive requests from one Python client; per target the
median of `--requests` after a warm-up, targets interleaved, `--repeats` rounds, the median of
the rounds reported. The activator row is the Python hop the warm path avoids (the activator
forwards to the pod).

    .venv/bin/python -m bench.openai_generation [--requests 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import write
from meshserve_testing import devmesh, parrot

BODY = json.dumps({"model": "parrot", "prompt": "x", "max_tokens": 1})


def p50_ms(port: int, n: int, headers: dict[str, str] | None = None) -> float:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times = []
    for i in range(n + 30):
        t0 = time.perf_counter()
        c.request("POST", "/v1/completions", body=BODY, headers={"content-type": "application/json", **(headers or {})})
        r = c.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"port {port}: HTTP {r.status}")
        if i >= 30:  # warm-up: keep-alive, the route at the gateway
            times.append(time.perf_counter() - t0)
    c.close()
    return statistics.median(times) * 1e3


def run_layout(layout: str, tmp: Path, requests: int, repeats: int) -> dict[str, list[float]]:
    cfg = tmp / layout
    cfg.mkdir()
    (cfg / "models.yaml").write_text(devmesh.inference_service("parrot", "custom", devmesh.pvc_storage("bench", "parrot")))
    with devmesh.mesh(config_dir=cfg, pods=1, xds_layout=layout) as m:
        d = m.data_dir / "pvc" / "bench" / "parrot"
        d.mkdir(parents=True)
        (d / "parrot.py").write_text(Path(parrot.__file__).read_text())
        (d / "model-settings.json").write_text(json.dumps({"implementation": "parrot.Parrot"}))
        gateway = m.ports["gateway_rest_port"]
        p50_ms(gateway, 20)  # the cold load, then the route reaches the gateway
        time.sleep(2)
        model_id = json.loads(devmesh.http_get(f"{m.rest}/v1/models")[1])["data"][0]["meshserve_id"]
        targets = {"gateway": (gateway, None), "pod": (int(m.pod_rest(0).rsplit(":", 1)[1]), {"mm-model-id": model_id}),
                   "activator": (m.ports["activator_rest_port"], None)}
        out: dict[str, list[float]] = {}
        for _ in range(repeats):
            for name, (port, headers) in targets.items():
                out.setdefault(name, []).append(round(p50_ms(port, requests, headers), 3))
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layouts", default="scoped,matcher")
    args = ap.parse_args()
    raw: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="ms-bench-gen-") as tmp:
        for layout in args.layouts.split(","):
            raw[layout] = run_layout(layout, Path(tmp), args.requests, args.repeats)
            print(layout, raw[layout], flush=True)
    summary = {lay: {k: round(statistics.median(v), 3) for k, v in r.items()} for lay, r in raw.items()}
    for r in summary.values():
        r["gateway_over_pod"] = round(r["gateway"] / r["pod"], 2)
    print(write("openai_generation", {"params": vars(args), "load_average": os.getloadavg(), "p50_ms": summary, "raw": raw}))


if __name__ == "__main__":
    main()

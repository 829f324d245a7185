"""The Ray Serve side of bench/peer_rayserve.py, run by Ray's own venv (.venv-ray), never by ours.

A Ray node and Serve on this machine, the digits SVM behind `@serve.multiplexed`: every model id
(the `serve_multiplexed_model_id` header) is its own copy of the same joblib file, loaded the
first time a replica sees that id and evicted LRU beyond `k` per replica. The benchmark drives it
over stdin, one JSON command a line, and reads one `@@ {json}` line back per command:

    {"op": "deploy", "k": 30, "max_ongoing": 16}   -> @@ {"deployed": ...}
    {"op": "stop"}  (or end of input)               -> Serve and Ray shut down

Inference parses the same v2 JSON body meshserve's runtime takes and answers in the same form.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import joblib
import numpy as np
import ray
from ray import serve
from starlette.requests import Request


def app(path: str, k: int, max_ongoing: int, replicas: int):  # type: ignore[no-untyped-def]
    @serve.deployment(num_replicas=replicas, max_ongoing_requests=max_ongoing,
                      # Two replicas on the two cores, as meshserve's two runtime pods.
                      ray_actor_options={"num_cpus": 0.5})
    class Digits:
        def __init__(self, model_path: str):
            self.path = model_path

        @serve.multiplexed(max_num_models_per_replica=k)
        async def model(self, model_id: str):  # type: ignore[no-untyped-def]
            # Off the event loop: a load does not stall the replica's other requests.
            return await asyncio.to_thread(joblib.load, self.path)

        async def __call__(self, request: Request) -> dict:
            name = serve.get_multiplexed_model_id()
            m = await self.model(name)
            inp = (await request.json())["inputs"][0]
            y = m.predict(np.asarray(inp["data"], dtype=np.float32).reshape(inp["shape"]))
            return {"model_name": name, "outputs": [{"name": "predict", "shape": [len(y)], "datatype": "INT64", "data": y.tolist()}]}

    return Digits.bind(path)


def say(doc: dict) -> None:
    print("@@ " + json.dumps(doc), flush=True)


def main() -> None:
    path, port = sys.argv[1], int(sys.argv[2])
    # The dashboard is off: it is not part of serving, and on 2 shared cores it costs CPU.
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    say({"up": True, "ray": ray.__version__, "pid": os.getpid()})
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "stop":
                break
            serve.run(app(path, cmd["k"], cmd["max_ongoing"], cmd.get("replicas", 2)), name="digits", route_prefix="/")
            say({"deployed": cmd})
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()

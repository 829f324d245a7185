"""Run inside the clients venv: `python calls.py <rest base> <grpc addr> <model> triton|kserve|repository`.
The two packages can't share a process (both register protobuf package `inference` in the
default descriptor pool), so each group runs in its own. Each call is
made exactly as a user's code makes it, with the real client package, and its outcome printed
as one JSON object (call -> result or error), so the test asserts on what the user would see.
The input is the digits SVM's: 64 FP32 pixels of a handwritten 8."""

from __future__ import annotations

import asyncio
import json
import sys
import traceback
from typing import Any, Callable

import numpy as np

PIXELS = [0.0, 0.0, 1.0, 11.0, 14.0, 15.0, 3.0, 0.0, 0.0, 1.0, 13.0, 16.0, 12.0, 16.0, 8.0, 0.0, 0.0, 8.0, 16.0, 4.0, 6.0, 16.0,
          5.0, 0.0, 0.0, 5.0, 15.0, 11.0, 13.0, 14.0, 0.0, 0.0, 0.0, 0.0, 2.0, 12.0, 16.0, 13.0, 0.0, 0.0, 0.0, 0.0, 0.0, 13.0,
          16.0, 16.0, 6.0, 0.0, 0.0, 0.0, 0.0, 16.0, 16.0, 16.0, 7.0, 0.0, 0.0, 0.0, 0.0, 11.0, 13.0, 12.0, 1.0, 0.0]
X = np.array([PIXELS], dtype=np.float32)


def triton_http(rest: str, model: str, binary: bool) -> Any:
    import tritonclient.http as th

    c = th.InferenceServerClient(rest.split("://", 1)[1])
    inp = th.InferInput("predict", list(X.shape), "FP32")
    inp.set_data_from_numpy(X, binary_data=binary)
    # The default (outputs=None) asks for every output in binary; the JSON form names it.
    outputs = None if binary else [th.InferRequestedOutput("predict", binary_data=False)]
    return c.infer(model, [inp], outputs=outputs).as_numpy("predict").tolist()


def triton_grpc(grpc_addr: str, model: str, header: bool) -> Any:
    import tritonclient.grpc as tg

    c = tg.InferenceServerClient(grpc_addr)
    inp = tg.InferInput("predict", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    headers = {"mm-vmodel-id": model} if header else None
    return c.infer(model, [inp], headers=headers).as_numpy("predict").tolist()


def triton_metadata(rest: str, grpc_addr: str, model: str) -> Any:
    import tritonclient.grpc as tg
    import tritonclient.http as th

    h = th.InferenceServerClient(rest.split("://", 1)[1]).get_model_metadata(model)
    g = tg.InferenceServerClient(grpc_addr).get_model_metadata(model, as_json=True)
    return {"http_inputs": h["inputs"], "grpc_inputs": g["inputs"], "http_live": th.InferenceServerClient(rest.split("://", 1)[1]).is_server_live()}


def kserve_rest(rest: str, model: str, binary: bool) -> Any:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    async def go() -> Any:
        c = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        inp = InferInput("predict", list(X.shape), "FP32")
        inp.set_data_from_numpy(X, binary_data=binary)
        res = await c.infer(rest, InferRequest(model_name=model, infer_inputs=[inp]), model_name=model)
        return res.outputs[0].as_numpy().tolist()

    return asyncio.run(go())


def kserve_grpc(grpc_addr: str, model: str) -> Any:
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    async def go() -> Any:
        c = InferenceGRPCClient(grpc_addr)
        inp = InferInput("predict", list(X.shape), "FP32")
        inp.set_data_from_numpy(X)
        res = await c.infer(InferRequest(model_name=model, infer_inputs=[inp]), headers=[("mm-vmodel-id", model)])
        return res.outputs[0].as_numpy().tolist()

    return asyncio.run(go())


def triton_repository(rest: str, model: str) -> Any:
    """tritonclient's model-control calls: index, explicit load (pins a copy), ready, unload."""
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    c = th.InferenceServerClient(rest.split("://", 1)[1])
    out: dict[str, Any] = {"index": c.get_model_repository_index()}
    c.load_model(model)
    out["ready_after_load"] = c.is_model_ready(model)
    out["ready_index"] = _ready_index(rest)
    try:  # a Triton extension the built-in runtime does not serve: an error the client can read
        out["config"] = c.get_model_config(model)
    except InferenceServerException as e:
        out["config"] = f"{e.status()}: {e.message()}"
    c.unload_model(model)
    try:
        c.load_model("no-such-model")
        out["unknown"] = "loaded?"
    except InferenceServerException as e:
        out["unknown"] = str(e)
    try:  # Triton would load with this config; meshserve cannot, and says so
        c.load_model(model, config='{"backend": "onnxruntime"}')
        out["config_override"] = "loaded?"
    except InferenceServerException as e:
        out["config_override"] = str(e)
    return out


def triton_grpc_repository(grpc_addr: str, model: str) -> Any:
    """The same model control over tritonclient.grpc (Triton's RepositoryIndex,
    RepositoryModelLoad, RepositoryModelUnload), and ServerMetadata."""
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    c = tg.InferenceServerClient(grpc_addr)
    out: dict[str, Any] = {"server": c.get_server_metadata(as_json=True)}
    c.load_model(model)
    out["ready_after_load"] = c.is_model_ready(model)
    out["index"] = c.get_model_repository_index(as_json=True).get("models", [])
    c.unload_model(model, unload_dependents=True)
    for key, call in (("unknown", lambda: c.load_model("no-such-model")), ("config_override", lambda: c.load_model(model, config="{}"))):
        try:
            call()
            out[key] = "loaded?"
        except InferenceServerException as e:
            out[key] = f"{e.status()}: {e.message()}"
    return out


def triton_stream(grpc_addr: str, model: str, header: bool) -> Any:
    """tritonclient.grpc's stream (Triton's ModelStreamInfer), as a user's streaming code runs
    it: three requests on one stream, the middle one with a wrong shape; each answer as the
    callback got it, in order: [[8]], the error, [[8]]."""
    import queue

    import tritonclient.grpc as tg

    got: "queue.Queue[Any]" = queue.Queue()
    c = tg.InferenceServerClient(grpc_addr)
    c.start_stream(callback=lambda result, error: got.put((result, error)), headers={"mm-vmodel-id": model} if header else None)
    try:
        for rid, x in (("a", X), ("bad", np.zeros((1, 3), dtype=np.float32)), ("b", X)):
            inp = tg.InferInput("predict", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            c.async_stream_infer(model, [inp], request_id=rid)
        out = []
        for _ in range(3):
            result, error = got.get(timeout=120)
            out.append({"error": str(error)} if error is not None else {"id": result.get_response().id, "predict": result.as_numpy("predict").tolist()})
        return out
    finally:
        c.stop_stream()
        c.close()


def _ready_index(rest: str) -> Any:
    """`{"ready": true}`: only the models ready for inference. tritonclient.http has no argument for it."""
    import json
    import urllib.request

    req = urllib.request.Request(f"{rest}/v2/repository/index", data=json.dumps({"ready": True}).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def main() -> None:
    rest, grpc_addr, model, group = sys.argv[1:5]
    calls: dict[str, Callable[[], Any]] = {
        "tritonclient.http binary": lambda: triton_http(rest, model, True),
        "tritonclient.http json": lambda: triton_http(rest, model, False),
        "tritonclient.grpc": lambda: triton_grpc(grpc_addr, model, False),
        "tritonclient.grpc mm-vmodel-id": lambda: triton_grpc(grpc_addr, model, True),
        "tritonclient metadata": lambda: triton_metadata(rest, grpc_addr, model),
        "kserve rest binary": lambda: kserve_rest(rest, model, True),
        "kserve rest json": lambda: kserve_rest(rest, model, False),
        "kserve grpc": lambda: kserve_grpc(grpc_addr, model),
        "repository": lambda: triton_repository(rest, model),
        "repository grpc": lambda: triton_grpc_repository(grpc_addr, model),
        "stream": lambda: triton_stream(grpc_addr, model, False),
        "stream mm-vmodel-id": lambda: triton_stream(grpc_addr, model, True),
    }
    out: dict[str, Any] = {}
    for name, call in calls.items():
        if not name.startswith({"triton": "triton", "kserve": "kserve"}.get(group, group)):
            continue
        try:
            out[name] = {"ok": call()}
        except Exception as e:  # noqa: BLE001 - reported to the test, which says which call failed
            out[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Text generation through the gateway with the real `openai` client (issue 17, item 4):
/v1/completions and /v1/chat/completions, plain and streamed, cold (held by the activator while
the model loads, the stream relayed as it comes) then warm (Envoy straight to the pod, by the
body's `model`), in both gateway layouts; and a /v1 request for a name with a traffic split
follows the split.

Kind: e2e. Real Valkey, Envoy configured by our xDS (scoped or matcher layout), placement,
activator and a built-in runtime pod. The model is a user class that generates
(meshserve_testing/parrot.py, copied into the model's folder as the users' code would be):
no weights, deterministic, so the answers can be checked word for word.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshserve.cli import cli
from meshserve_testing import devmesh, parrot

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.e2e
PVC = "gen-pvc"
DELAY = 0.15  # seconds per piece: a buffered stream would arrive all at once


def _write_model(root: Path, name: str, greeting: str) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "parrot.py").write_text(Path(parrot.__file__).read_text())
    (d / "model-settings.json").write_text(json.dumps({
        "implementation": "parrot.Parrot", "parameters": {"extra": {"delay": DELAY, "greeting": greeting}}}))


def _activator_hits(m: devmesh.Mesh) -> int:
    _, body = devmesh.http_get(f"{m.admin}/stats?filter=activator_rest.upstream_rq_total")
    return sum(int(x.split(":")[1]) for x in body.decode().splitlines() if "upstream_rq_total" in x)


def _timed_stream(stream) -> tuple[str, list[float]]:  # type: ignore[no-untyped-def]
    """The text of a completions stream and when each piece arrived."""
    text, times = "", []
    for ch in stream:
        if ch.choices and ch.choices[0].text:
            text += ch.choices[0].text
            times.append(time.monotonic())
    return text, times


@pytest.mark.parametrize("layout", ["scoped", "matcher"])
def test_generation_through_the_gateway(tmp_path: Path, layout: str) -> None:
    cfg = tmp_path / "mesh-config"
    cfg.mkdir()
    (cfg / "models.yaml").write_text("---\n".join(
        devmesh.inference_service(n, "custom", devmesh.pvc_storage(PVC, n)) for n in ("parrot", "parrot-b")))
    with devmesh.mesh(config_dir=cfg, pods=1, xds_layout=layout) as m:
        root = m.data_dir / "pvc" / PVC
        _write_model(root, "parrot", "echo:")
        _write_model(root, "parrot-b", "bee:")
        client = openai.OpenAI(base_url=f"{m.rest}/v1", api_key="unused", timeout=120, max_retries=0)
        try:
            # Cold and streamed: the activator holds it while the model loads, then relays the
            # pieces as the pod yields them (one every DELAY s), not the whole answer at the end.
            before = _activator_hits(m)
            text, times = _timed_stream(client.completions.create(model="parrot", prompt="a b c", max_tokens=8, stream=True))
            assert text == "echo: a b c la la la la " and len(times) == 8
            assert times[-1] - times[0] > 4 * DELAY, f"the cold stream came buffered: {times}"
            assert _activator_hits(m) > before  # it did go through the activator

            # Warm: once the route is at the gateway, Envoy sends /v1 straight to the pod.
            def warm() -> bool:
                hits = _activator_hits(m)
                client.completions.create(model="parrot", prompt="x", max_tokens=1)
                return _activator_hits(m) == hits

            devmesh.wait_until(warm, 30, "warm /v1 requests to skip the activator")
            hits = _activator_hits(m)
            done = client.completions.create(model="parrot", prompt=["one two", "three"], max_tokens=5, stop=" three", n=2)
            assert [c.text for c in done.choices] == ["echo: one two la la ", "echo: one two la la ", "echo:", "echo:"]
            assert [c.finish_reason for c in done.choices] == ["length", "length", "stop", "stop"]
            assert done.usage.prompt_tokens == 3 and done.usage.completion_tokens == 5 + 5 + 2 + 2
            # Token arrays as the prompt (the class's detokenize() makes them text).
            done = client.completions.create(model="parrot", prompt=[[5, 6], [7]], max_tokens=3)
            assert [c.text for c in done.choices] == ["echo: t5 t6 ", "echo: t7 la "] and done.usage.prompt_tokens == 3
            chat = client.chat.completions.create(model="parrot", max_tokens=4, messages=[
                {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}])
            assert chat.choices[0].message.content == "echo: hello there la " and chat.choices[0].finish_reason == "length"
            pieces, usage = [], None
            for ch in client.chat.completions.create(model="parrot", max_tokens=3, stream=True, stream_options={"include_usage": True},
                                                     messages=[{"role": "user", "content": "hi"}]):
                pieces += [c.delta.content for c in ch.choices if c.delta.content]
                usage = ch.usage or usage
            assert "".join(pieces) == "echo: hi la " and usage is not None and usage.completion_tokens == 3
            text, times = _timed_stream(client.completions.create(model="parrot", prompt="warm", max_tokens=6, stream=True))
            assert text == "echo: warm la la la la " and times[-1] - times[0] > 3 * DELAY, times
            assert _activator_hits(m) == hits, "warm /v1 requests went through the activator"

            assert {"parrot", "parrot-b"} <= {x.id for x in client.models.list()}  # GET /v1/models: the activator's
            with pytest.raises(openai.BadRequestError) as e:
                client.completions.create(model="parrot", prompt="x", max_tokens=-1)
            assert e.value.body["param"] == "max_tokens"
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="parrot", messages=[{"role": "robot", "content": "x"}])
            assert e.value.body["param"] == "messages[0].role"
            with pytest.raises(openai.NotFoundError) as e:
                client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}], stream=True)
            assert e.value.body["code"] == "model_not_found"

            # A traffic split on the name applies to /v1 requests too (both models answer).
            rule = tmp_path / "rule.yaml"
            rule.write_text("apiVersion: meshserve.io/v1alpha1\nkind: TrafficRule\nmetadata:\n  name: split\nspec:\n  model: parrot\n"
                            "  routes:\n  - to:\n    - {model: parrot, weight: 50}\n    - {model: parrot-b, weight: 50}\n")
            res = CliRunner().invoke(cli, ["apply", "-f", str(rule)], env={"MESHSERVE_REDIS_URL": m.redis_url})
            assert res.exit_code == 0, res.output
            seen: set[str] = set()

            def both() -> bool:
                seen.add(client.completions.create(model="parrot", prompt="x", max_tokens=1).choices[0].text.strip())
                return seen == {"echo:", "bee:"}

            devmesh.wait_until(both, 60, "/v1 answers from both sides of the split", interval=0.1)
        except BaseException:
            print(m.log()[-8000:])
            raise

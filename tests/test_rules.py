"""Kind: unit (pure validation, plans and rollout decisions), plus one integration test against a
real Valkey for `meshserve apply / get rules / promote / rollback`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshserve.rules import moves
from meshserve_rollout import controller as rollout
from meshserve.model import Copy, CopyState, ModelSpec
from meshserve.rules import plan as pl
from meshserve.rules import schema
from meshserve.rules.config import read_config, validate_rules
from meshserve.yamlfile import ConfigError, load_documents

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "mesh-config" / "examples"
KNOWN = {"a", "b", "c"}


def rule(tmp_path: Path, body: str) -> schema.Rule:
    f = tmp_path / "rule.yaml"
    f.write_text(body)
    (doc,) = load_documents(f)
    return schema.parse_rule(doc, KNOWN)


SPLIT = """apiVersion: meshserve.io/v1alpha1
kind: TrafficRule
metadata:
  name: r
spec:
  model: a
  routes:
  - match:
      headers:
        x-group: {exact: beta}
    to:
    - model: b
  - to:
    - model: a
      weight: 90
    - model: b
      weight: 10
"""


def test_every_example_validates_with_its_models() -> None:
    for f in sorted(EXAMPLES.glob("*.yaml")):
        if f.name == "models.yaml":
            continue
        cfg = read_config([REPO / "mesh-config", EXAMPLES / "models.yaml", f] if f.name != "inferenceservice-canary.yaml" else [f])
        validate_rules(cfg, set())
        assert cfg.rules or cfg.percents, f


def test_up_skips_the_examples_folder() -> None:
    cfg = read_config([REPO / "mesh-config"])
    assert [s.alias for s in cfg.specs] == ["sklearn-mnist"] and not cfg.rule_docs


def test_valid_rule_parses(tmp_path: Path) -> None:
    r = rule(tmp_path, SPLIT)
    assert (r.name, r.model, r.referenced_models()) == ("r", "a", ["a", "b"])


@pytest.mark.parametrize(
    "old,new,line,field,words",
    [
        ("    - model: b\n  - to:", "    - model: nope\n  - to:", 12, "spec.routes.0.to.0.model", "unknown model 'nope'"),
        ("      weight: 10", "      weight: 20", 13, "spec.routes.1.to", "sum to 110"),
        ("x-group:", "X Group:", 10, "spec.routes.0.match.headers.X Group", "not a valid HTTP header name"),
        ("x-group:", "X-Group:", 10, "spec.routes.0.match.headers.X-Group", "lower case"),
        ("{exact: beta}", "{regex: '(?!x)b'}", 10, "spec.routes.0.match.headers.x-group.regex", "RE2"),
        ("{exact: beta}", "{regex: '(b'}", 10, "spec.routes.0.match.headers.x-group.regex", "not a valid regular expression"),
        ("{exact: beta}", "{exact: beta, prefix: b}", 10, "spec.routes.0.match.headers.x-group", "exactly one of"),
        ("  model: a\n", "  model: a\n  mirorr: {model: b, percent: 5}\n", 7, "spec.mirorr", "unknown field 'mirorr'"),
        ("    - model: a\n      weight: 90", "    - model: a\n      wieght: 90", 15, "spec.routes.1.to.0.wieght", "unknown field"),
    ],
)
def test_invalid_rule_names_file_line_field(tmp_path: Path, old: str, new: str, line: int, field: str, words: str) -> None:
    assert old in SPLIT
    with pytest.raises(ConfigError) as e:
        rule(tmp_path, SPLIT.replace(old, new, 1))
    err = e.value
    assert (err.file, err.line, err.field) == (str(tmp_path / "rule.yaml"), line, field), str(err)
    assert words in err.message, str(err)


def test_canary_and_mirror_checks(tmp_path: Path) -> None:
    base = "apiVersion: meshserve.io/v1alpha1\nkind: TrafficRule\nmetadata: {name: r}\nspec:\n  model: a\n"
    rule(tmp_path, base + "  canary:\n    model: b\n    steps: [{weight: 5, hold: 30s}, {weight: 100}]\n    abort: {errorRatePercent: 5}\n")
    with pytest.raises(ConfigError, match="not a duration"):
        rule(tmp_path, base + "  canary:\n    model: b\n    steps: [{weight: 5, hold: 30 seconds}]\n")
    with pytest.raises(ConfigError, match="must not go down"):
        rule(tmp_path, base + "  canary:\n    model: b\n    steps: [{weight: 50}, {weight: 5}]\n")
    with pytest.raises(ConfigError, match="mirror to itself"):
        rule(tmp_path, base + "  mirror: {model: a, percent: 5}\n")


def test_one_rule_per_model(tmp_path: Path) -> None:
    f = tmp_path / "two.yaml"
    f.write_text(SPLIT + "---\n" + SPLIT.replace("name: r", "name: r2"))
    cfg = read_config([f])
    with pytest.raises(ConfigError, match="already has rule 'r'") as e:
        validate_rules(cfg, KNOWN)
    assert e.value.line == 24


def test_canary_traffic_percent_is_not_part_of_the_model_id(tmp_path: Path) -> None:
    src = (REPO / "mesh-config" / "sklearn-mnist.yaml").read_text()
    (tmp_path / "a.yaml").write_text(src)
    (tmp_path / "b.yaml").write_text(src.replace("    model:\n", "    canaryTrafficPercent: 10\n    model:\n", 1))
    a, b = read_config([tmp_path / "a.yaml"]), read_config([tmp_path / "b.yaml"])
    assert a.specs[0].id == b.specs[0].id and b.percents["sklearn-mnist"] == 10
    (tmp_path / "b.yaml").write_text(src.replace("    model:\n", "    canaryTrafficPercent: 110\n    model:\n", 1))
    with pytest.raises(ConfigError, match="0 to 100") as e:
        read_config([tmp_path / "b.yaml"])
    assert e.value.field == "spec.predictor.canaryTrafficPercent"


# --- plans -----------------------------------------------------------------------------------

ALIASES = {"a": "a__isvc-1", "b": "b__isvc-2", "c": "c__isvc-3"}
MODELS = set(ALIASES.values())


def test_plan_resolves_names_and_rollback_restores_stable(tmp_path: Path) -> None:
    spec = rule(tmp_path, SPLIT).spec
    p = pl.plan_for_rule(spec, {"phase": pl.ACTIVE}, ALIASES, MODELS, "r")
    assert p is not None
    assert [b.targets for b in p.branches] == [(("b__isvc-2", 100),), (("a__isvc-1", 90), ("b__isvc-2", 10))]
    assert p.branches[0].headers == (pl.HeaderMatch("x-group", "exact", "beta"),)
    back = pl.plan_for_rule(spec, {"phase": pl.ROLLED_BACK}, ALIASES, MODELS, "r")
    assert back is not None and [b.targets for b in back.branches] == [(("a__isvc-1", 100),)]
    # A plan that only sends the name to its own model is no plan at all: the plain route does it.
    assert pl.build_plans({"r": spec}, {"r": {"phase": pl.ROLLED_BACK}}, {}, ALIASES, MODELS) == {}


def test_canary_weight_follows_status() -> None:
    spec = {"model": "a", "canary": {"model": "b", "steps": [{"weight": 5, "hold": "1s"}, {"weight": 50}, {"weight": 100}]}}
    def targets(status: dict) -> tuple:
        return pl.plan_for_rule(spec, status, ALIASES, MODELS).branches[0].targets  # type: ignore[union-attr]
    assert targets({"phase": pl.PROGRESSING, "step": 0}) == (("a__isvc-1", 95), ("b__isvc-2", 5))
    assert targets({"phase": pl.PAUSED, "step": 1}) == (("a__isvc-1", 50), ("b__isvc-2", 50))
    assert targets({"phase": pl.PROMOTED, "step": 2}) == (("b__isvc-2", 100),)
    assert targets({"phase": pl.ABORTED, "step": 1}) == (("a__isvc-1", 100),)


def test_transition_canary_plan() -> None:
    t = pl.Transition("a", "a__isvc-1", "a__isvc-9", 1, 10, pl.T_CANARY, 0)
    p = pl.build_plans({}, {}, {"a": t}, ALIASES, MODELS | {"a__isvc-9"})
    assert p["a"].branches[0].targets == (("a__isvc-1", 90), ("a__isvc-9", 10))


# --- rollout decisions ---------------------------------------------------------------------------


def spec(alias: str, sid: str) -> ModelSpec:
    return ModelSpec(id=sid, alias=alias, format="string", storage={"path": "x"})


def test_registration_moves_alias_only_when_nothing_serves_the_old_version() -> None:
    ops, _, _ = moves.registration([spec("a", "a__isvc-9")], {}, ALIASES, {}, {}, 1.0)
    assert ["HSET", "ms:aliases", "a", "a__isvc-9"] in ops
    ops, _, notes = moves.registration([spec("a", "a__isvc-9")], {}, ALIASES, {"a__isvc-1": 2}, {}, 1.0)
    assert not any(op[:2] == ["HSET", "ms:aliases"] for op in ops)
    (t_op,) = [op for op in ops if op[1] == "ms:transitions"]
    t = pl.Transition.from_dict(json.loads(t_op[3]))
    assert (t.old, t.new, t.copies, t.phase) == ("a__isvc-1", "a__isvc-9", 2, pl.T_LOADING)
    # The new version asks placement for as many copies as the old one has, eagerly (minCopies)...
    (m_op,) = [op for op in ops if op[1] == "ms:models"]
    assert ModelSpec.from_json(m_op[3]).min_copies == 2 and t.extra["minCopies"] == 0
    # ... and gets the user's own value back once traffic moved.
    (restore,) = moves.restore_spec_ops(m_op[3], t)
    assert ModelSpec.from_json(restore[3]).min_copies == 0
    # Re-applying only a new canaryTrafficPercent keeps the same move.
    ops, _, _ = moves.registration([spec("a", "a__isvc-9")], {"a": 30}, ALIASES, {"a__isvc-1": 2}, {"a": t}, 2.0)
    assert pl.Transition.from_dict(json.loads([op for op in ops if op[1] == "ms:transitions"][0][3])).percent == 30


def test_transition_loads_first_then_moves_drains_unloads() -> None:
    t = pl.Transition("a", "old", "new", 2, None, pl.T_LOADING, 100.0)
    one = {"p0": Copy(CopyState.LOADED, 1, 101)}
    s = rollout.step_transition(t, one, one, 102.0, 0.0, 90, False)
    assert s.request_load and not s.move_alias  # one of two copies: ask for another, no traffic yet
    two = {**one, "p1": Copy(CopyState.LOADED, 1, 102)}
    s = rollout.step_transition(t, two, one, 103.0, 0.0, 90, False)
    assert s.move_alias and s.transition and s.transition.phase == pl.T_DRAINING
    s2 = rollout.step_transition(s.transition, two, one, 103.0 + rollout.DRAIN_S, 0.0, 90, False)
    assert s2.withdraw_old and s2.transition and s2.transition.phase == rollout.T_UNLOADING
    s3 = rollout.step_transition(s2.transition, two, one, 104.0 + rollout.DRAIN_S + rollout.ROUTE_WITHDRAW_S, 0.0, 90, False)
    assert s3.unload_old and s3.transition and s3.transition.phase == pl.T_DONE


def test_failed_load_keeps_traffic_and_says_why() -> None:
    t = pl.Transition("a", "old", "new", 1, None, pl.T_LOADING, 100.0)
    failed = {"p0": Copy(CopyState.FAILED, 0, 101, "cannot read model.txt")}
    s = rollout.step_transition(t, failed, {}, 102.0, 0.0, 90, False)
    assert not s.move_alias and s.transition and s.transition.phase == pl.T_FAILED
    assert s.transition.reason == "cannot read model.txt"
    s = rollout.step_transition(t, {}, {}, 200.0, 0.0, 90, False)
    assert s.transition and s.transition.phase == pl.T_FAILED and "within 90s" in s.transition.reason


def test_canary_steps_hold_then_abort_on_errors() -> None:
    sp = {"model": "a", "canary": {"model": "b", "steps": [{"weight": 5, "hold": "10s"}, {"weight": 50}, {"weight": 100}],
                                    "abort": {"errorRatePercent": 5, "minRequests": 10}}}
    st0 = {"phase": pl.PROGRESSING, "step": 0, "since": 0.0}
    assert rollout.step_canary(sp, st0, 5.0, None) is None
    st1 = rollout.step_canary(sp, st0, 10.0, None)
    assert st1 and (st1["phase"], st1["step"]) == (pl.PAUSED, 1)
    assert rollout.step_canary(sp, st1, 1000.0, (1.0, 100)) is None  # paused: waits for promote
    assert rollout.step_canary(sp, st1, 1000.0, (50.0, 5)) is None  # too few requests to judge
    ab = rollout.step_canary(sp, st1, 1000.0, (20.0, 100))
    assert ab and ab["phase"] == pl.ABORTED and "20.0%" in ab["reason"]
    last = rollout.advance(sp, rollout.advance(sp, st1, 1.0), 2.0)
    assert last["phase"] == pl.PROMOTED


def test_canary_that_cannot_load_aborts() -> None:
    sp = {"model": "a", "canary": {"model": "b", "steps": [{"weight": 5}, {"weight": 100}]}}
    st = rollout.step_canary(sp, {"phase": pl.PAUSED, "step": 0, "since": 0.0}, 1.0, None, "no such file v9.txt")
    assert st and st["phase"] == pl.ABORTED and "v9.txt" in st["reason"]


def test_runtime_metrics_and_error_window() -> None:
    text = (
        "# TYPE meshserve_runtime_requests_total counter\n"
        'meshserve_runtime_requests_total{model="m",code="200"} 90.0\n'
        'meshserve_runtime_requests_total{model="m",code="500"} 10.0\n'
        'meshserve_runtime_requests_created{model="m",code="200"} 1.0\n'
    )
    assert rollout.parse_runtime_metrics(text) == {"m": (100.0, 10.0)}
    w = rollout.ErrorWindow()
    w.add(0.0, {"m": (100.0, 10.0)})
    w.add(10.0, {"m": (200.0, 60.0)})
    assert w.rate("m", 60, 10.0) == (50.0, 100)


# --- integration: real Valkey -----------------------------------------------------------------


def test_cli_apply_get_promote_rollback_against_valkey(tmp_path: Path) -> None:
    """Kind: integration (real Valkey, no mesh)."""
    from meshserve_testing import devmesh
    from meshserve import state as st
    from meshserve.cli import cli
    from meshserve.rules import store

    canary = tmp_path / "canary.yaml"
    canary.write_text((EXAMPLES / "progressive-canary.yaml").read_text().replace("hold: 5m", "hold: 1h"))
    with devmesh.valkey() as v:
        run = CliRunner()
        env = {"MESHSERVE_REDIS_URL": v.url}
        bad = tmp_path / "bad.yaml"
        bad.write_text((EXAMPLES / "split.yaml").read_text().replace("weight: 10", "weight: 15"))
        res = run.invoke(cli, ["apply", "-f", str(REPO / "mesh-config"), "-f", str(EXAMPLES / "models.yaml"), "-f", str(bad)], env=env)
        assert res.exit_code == 1 and "bad.yaml:10: spec.routes.0.to: weights sum to 105" in res.output, res.output
        assert asyncio.run(_hlen(v.url, st.MODELS)) == 0  # refused before anything changed
        res = run.invoke(cli, ["apply", "-f", str(REPO / "mesh-config"), "-f", str(EXAMPLES / "models.yaml"), "-f", str(canary)], env=env)
        assert res.exit_code == 0, res.output
        assert "trafficrule/sklearn-mnist-canary applied" in res.output
        res = run.invoke(cli, ["get", "rules", "--json"], env=env)
        (row,) = json.loads(res.output)
        assert row["phase"] == "Progressing step 1/4" and "sklearn-mnist-v2=5%" in row["traffic"]
        res = run.invoke(cli, ["promote", "sklearn-mnist-canary"], env=env)
        assert res.exit_code == 0 and "canary at 25%" in res.output, res.output
        res = run.invoke(cli, ["rollback", "sklearn-mnist-canary"], env=env)
        assert res.exit_code == 0, res.output
        rules, statuses, _ = asyncio.run(_read(v.url))
        assert statuses["sklearn-mnist-canary"]["phase"] == pl.ROLLED_BACK
        # Re-applying the same file neither restarts the canary nor undoes the rollback.
        run.invoke(cli, ["apply", "-f", str(canary)], env=env)
        assert asyncio.run(_read(v.url))[1]["sklearn-mnist-canary"]["phase"] == pl.ROLLED_BACK
        res = run.invoke(cli, ["delete", "rule", "sklearn-mnist-canary"], env=env)
        assert res.exit_code == 0 and "deleted" in res.output, res.output
        assert asyncio.run(_read(v.url))[0] == {}
        # A corrupt record is skipped, never fatal for readers (the xDS server builds routes from these).
        asyncio.run(_hset(v.url, st.RULES, "junk", "{not json"))
        assert "junk" not in asyncio.run(_read(v.url))[0]
        res = run.invoke(cli, ["rollback", "nope"], env=env)
        assert res.exit_code == 1 and "no traffic rule or version move named 'nope'" in res.output


async def _hlen(url: str, key: str) -> int:
    from meshserve import state as st

    s = st.State.from_url(url)
    try:
        return int(await s.r.hlen(key))
    finally:
        await s.close()


async def _hset(url: str, key: str, field: str, value: str) -> None:
    from meshserve import state as st

    s = st.State.from_url(url)
    try:
        await s.r.hset(key, field, value)
    finally:
        await s.close()


async def _read(url: str):  # type: ignore[no-untyped-def]
    from meshserve import state as st
    from meshserve.rules import store

    s = st.State.from_url(url)
    try:
        return await store.read_all(s)
    finally:
        await s.close()

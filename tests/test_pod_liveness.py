"""Kind: unit (pure). A pod whose heartbeats stopped: withdrawn only when its runtime is gone too
(or the stall outlasts its grace); a pod that registers again is reconciled, keeping what
placement still wants; and a leader that just took over removes no copy before it has
measured the request rates (issue 18 §1 and §5)."""

from __future__ import annotations

from meshserve.model import Copy, CopyState
from meshserve_placement import copies as cp
from meshserve_placement import policy
from meshserve_placement.liveness import ANSWERED, Liveness, Probe, judge
from meshserve_placement.tuning import Tuning

MB = 1 << 20
T = Tuning(scale_up_rps=10.0, scale_down_after_seconds=0.0, idle_unload_seconds=0.0)


def test_a_fresh_heartbeat_is_alive_whatever_the_probe() -> None:
    assert judge(100.0, 99.0, 1.0, 2, ANSWERED, 30.0).liveness == Liveness.ALIVE
    assert judge(100.0, 98.5, 1.0, 2, Probe("refused"), 30.0).liveness == Liveness.ALIVE


def test_a_paused_loader_whose_runtime_serves_keeps_its_pod() -> None:
    """The repro: kill -STOP the loader for 4 s. Its runtime still answers: the pod stays."""
    v = judge(104.0, 100.0, 1.0, 2, ANSWERED, 30.0)
    assert v.liveness == Liveness.STALLED
    assert "runtime still answers" in v.reason


def test_a_dead_runtime_is_withdrawn_at_the_heartbeat_limit() -> None:
    v = judge(102.5, 100.0, 1.0, 2, Probe("Cannot connect to host 127.0.0.1:9 [Connection refused]"), 30.0, 10.0)
    assert v.liveness == Liveness.GONE
    assert "Connection refused" in v.reason and "no heartbeat for 2.5s" in v.reason


def test_a_stall_past_its_grace_is_withdrawn_and_grace_zero_is_the_old_rule() -> None:
    assert judge(140.0, 100.0, 1.0, 2, ANSWERED, 30.0).liveness == Liveness.GONE
    assert judge(102.5, 100.0, 1.0, 2, ANSWERED, 0.0).liveness == Liveness.GONE


def test_a_pod_paused_whole_keeps_its_pod_for_the_paused_grace() -> None:
    """The repro: kill -STOP a pod's loader and runtime for 3 s. The runtime's port accepts but
    nothing answers: kept (was withdrawn at 3.0 s though it came back a second later)."""
    paused = Probe("connection accepted, no answer within 0.5s", accepted=True)
    v = judge(103.0, 100.0, 1.0, 2, paused, 30.0, 10.0)
    assert v.liveness == Liveness.STALLED and "paused" in v.reason
    gone = judge(112.5, 100.0, 1.0, 2, paused, 30.0, 10.0)
    assert gone.liveness == Liveness.GONE and "10s paused-pod grace" in gone.reason
    assert judge(103.0, 100.0, 1.0, 2, paused, 30.0, 0.0).liveness == Liveness.GONE


def test_an_unreachable_node_is_withdrawn_at_once() -> None:
    assert judge(102.5, 100.0, 1.0, 2, Probe("no connection within 0.5s"), 30.0, 10.0).liveness == Liveness.GONE


def _view() -> policy.ClusterView:
    pods = {p: policy.PodView(p, 100 * MB, ["x"]) for p in ("p0", "p1")}
    models = {m: policy.ModelView(m, "x", 10 * MB) for m in ("a", "b", "c", "d")}
    return policy.ClusterView(pods=pods, models=models)


def test_a_returning_pod_keeps_what_nobody_replaced_and_unloads_the_rest() -> None:
    cv = _view()
    cv.set_copies("b", {"p1": Copy(CopyState.LOADED, 10 * MB)})  # re-placed on p1 while p0 was gone
    got = cp.adopt(cv, "p0", {"a": 12 * MB, "b": 10 * MB, "gone": 5 * MB}, rates={}, tuning=T)
    assert got.keep == {"a": 12 * MB}
    assert set(got.drop) == {"b", "gone"}
    assert "placed elsewhere" in got.drop["b"] and "no longer registered" in got.drop["gone"]


def test_a_hot_model_keeps_its_second_copy() -> None:
    cv = _view()
    cv.set_copies("b", {"p1": Copy(CopyState.LOADED, 10 * MB)})
    got = cp.adopt(cv, "p0", {"b": 10 * MB}, rates={"b": 25.0}, tuning=T)  # 25/s wants 3 copies
    assert got.keep == {"b": 10 * MB}


def test_adoption_stops_at_the_pods_capacity_keeping_the_most_recent() -> None:
    cv = _view()
    cv.set_copies("c", {"p0": Copy(CopyState.LOADED, 70 * MB)})
    cv.touch("a", 10.0)
    cv.touch("d", 20.0)
    got = cp.adopt(cv, "p0", {"a": 20 * MB, "d": 20 * MB}, rates={}, tuning=T)
    assert got.keep == {"d": 20 * MB}
    assert "no room" in got.drop["a"]


def test_a_new_leader_removes_no_copy_before_it_has_measured_rates() -> None:
    """Issue 18 §5: after a failover the new leader saw 0 requests/s and unloaded a busy copy."""
    cv = _view()
    cv.set_copies("a", {"p0": Copy(CopyState.LOADED, 10 * MB), "p1": Copy(CopyState.LOADED, 10 * MB)})
    assert cp.plan_copies(cv, {}, now=1000.0, tuning=T, last_added={}, scale_down=False) == []
    removed = cp.plan_copies(cv, {}, now=1000.0, tuning=T, last_added={}, scale_down=True)
    assert [a.op for a in removed] == ["remove"]

"""Kind: unit (pure). The copy reconcile decides only the models something happened to
(maintain.CopyPlan): over a run of random changes, deciding the dirty models and those whose
recheck time came gives every round exactly the actions a pass over every model gives."""

from __future__ import annotations

import random

from meshserve.model import Copy, CopyState
from meshserve_placement import copies as cp
from meshserve_placement import policy
from meshserve_placement.maintain import FULL_PASS_SECONDS, CopyPlan
from meshserve_placement.tuning import Tuning

MB = 1 << 20
STATES = (CopyState.LOADED, CopyState.LOADED, CopyState.LOADING, CopyState.FAILED, CopyState.UNLOADING)


def test_deciding_what_changed_gives_the_actions_of_a_full_pass() -> None:
    rnd = random.Random(3)
    pods = {f"p{i}": policy.PodView(f"p{i}", 10_000 * MB, ["x"]) for i in range(3)}
    models = {f"m{i}": policy.ModelView(f"m{i}", "x", 10 * MB, min_copies=1 if i % 17 == 0 else 0, pinned=i % 23 == 0)
              for i in range(40)}
    models["ad"] = policy.ModelView("ad", "x", MB, base="m1")  # an adapter: its base follows it
    cv = policy.ClusterView(pods=pods, models=models)
    t = Tuning(scale_up_rps=10.0, scale_down_after_seconds=7.0, idle_unload_seconds=12.0)
    plan = CopyPlan()
    rates: dict[str, float] = {}
    last_added: dict[str, float] = {}
    now = 1000.0
    decided_partially = 0
    for _ in range(400):
        now += 1.0
        for _ in range(rnd.randint(0, 3)):
            m = rnd.choice(list(models))
            what = rnd.random()
            if what < 0.4:
                cv.set_copies(m, {p: Copy(rnd.choice(STATES), 10 * MB, now) for p in pods if rnd.random() < 0.5})
            elif what < 0.6:
                cv.touch(m, now)
                plan.dirty.add(m)  # as _poll_lastused does
            elif what < 0.8:
                before = dict(rates)
                rates[m] = rnd.choice([0.0, 1.0, 15.0, 35.0])
                rates = {k: v for k, v in rates.items() if v}
                plan.dirty.update(before.keys() | rates.keys())  # as _poll_rates does
            else:
                last_added[m] = now
                plan.dirty.add(m)  # an add: it acted, so it is decided again
        busy = {m for m in models if rnd.random() < 0.05}
        plan.dirty |= cv.in_flight - busy  # as _poll_lastused does
        cv.in_flight = busy
        if rnd.random() < 0.02:
            pods["p2"].draining = not pods["p2"].draining
        draining = {p for p, pv in pods.items() if pv.draining}
        full = cp.plan_copies(cv, rates, now, t, last_added, draining)
        todo = plan.todo(cv, now, True)
        got = cp.plan_copies(cv, rates, now, t, last_added, draining, only=todo)
        plan.decided(cv, todo, now, t, last_added, got)
        assert got == full
        decided_partially += todo is not None
    # Most rounds were not full passes: the rest came from the pods draining and every FULL_PASS_SECONDS.
    assert decided_partially > 400 * (1 - 1.5 / FULL_PASS_SECONDS) - 30

"""bench/adapters.py runs (issue 17's live benchmarks), small: its figures mean little here.

Kind: e2e. `meshserve up` (real Valkey, Envoy, placement, activator, 2 built-in runtime pods),
a MiniLM base and 12 adapters over it: a Zipf trace, every adapter asked for once, cold starts
of adapters whose base is resident, and warm /v1/embeddings through the gateway and straight
to the pod, alternately. The ModelMesh-style mesh is left out to keep it short.
"""

from __future__ import annotations

import pytest

from bench import adapters

pytestmark = pytest.mark.e2e


def test_quick_adapters_benchmark_runs() -> None:
    res = adapters.main(["--quick", "--skip-modelmesh", "--out", ""])
    shared = res["shared"]
    assert 0 < shared["zipf"]["hit_ratio"] <= 1 and shared["zipf"]["hits"] + shared["zipf"]["misses"] == 25
    # Every adapter fits over the one base: all 12 are held once each was asked for.
    assert shared["memory_all_asked"]["adapters_resident"] == 12
    assert res["cold_start"]["adapters"] == 4 and res["cold_start"]["cold_request_ms"]["p50"] > 0
    assert res["warm"]["errors"] == 0 and res["warm"]["p50_ratio"] > 0 and len(res["warm"]["samples_ms"]["gateway"]) == 20


def test_cold_only_gives_the_cold_and_warm_figures() -> None:
    """`--cold-only`: one mesh, no trace and no fill, only the cold starts beside a resident base
    and the warm pairs (what issue 17's cold-start goal is read from)."""
    res = adapters.main(["--quick", "--cold-only", "--out", ""])
    assert "shared" not in res and "modelmesh" not in res
    assert res["cold_start"]["adapters"] == 4 and res["cold_start"]["runtime_first_embed_ms"]["p50"] > 0
    assert res["warm"]["errors"] == 0 and len(res["warm"]["samples_ms"]["direct"]) == 20


def test_forward_compares_two_revisions_of_the_encoder() -> None:
    """`--forward REV`: no mesh; the encoder at a git revision against this tree's, alternately,
    with the largest difference between their vectors (the same code here: HEAD)."""
    res = adapters.main(["--forward", "HEAD", "--rounds", "2", "--out", ""])["forward"]
    for case in ("base, 1 text", "lora, 1 text", "lora, 16 texts"):
        assert res[case]["before_p50_ms"] > 0 and res[case]["after_p50_ms"] > 0 and res[case]["max_abs_difference"] < 1e-5

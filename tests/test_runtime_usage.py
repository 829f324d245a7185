"""Kind: unit. The built-in runtime's stats for the loader's usage report: with `since`, only the
models used at or after that time, newest first, without walking every loaded model; a model
unloaded is gone from them. The Runtime is used in-process (no servers)."""

from __future__ import annotations

from pathlib import Path

from meshserve_loader.builtin.table import Runtime


async def test_stats_since_lists_only_the_models_used_lately(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "m.txt").write_text("tiny")
    rt = Runtime()
    try:
        for n in ("a", "b", "c"):
            await rt.load(n, "string", str(tmp_path / "m.txt"), {})
        clock = iter([100.0, 200.0, 300.0, 400.0])
        monkeypatch.setattr("meshserve_loader.builtin.table.time.time", lambda: next(clock))
        for n in ("a", "b", "c", "a"):  # a at 100 then 400, b at 200, c at 300
            await rt.run(n, lambda e: None)
        assert set(rt.stats()) == {"a", "b", "c"}
        assert rt.stats(since=250.0) == {"a": {"requests": 2, "last_used": 400.0, "size": rt.models["a"].size},
                                         "c": {"requests": 1, "last_used": 300.0, "size": rt.models["c"].size}}
        assert list(rt.stats(since=0.0)) == ["a", "c", "b"]
        rt.unload("c")
        assert list(rt.stats(since=0.0)) == ["a", "b"]
    finally:
        rt.close()

"""The figures of docs/benchmarks.md, drawn from the JSON the benchmarks wrote to bench/results/.

`make bench` (bench.run) ends with this, so the PNGs always show the committed numbers; it can
also be run alone, without re-running anything:

    .venv/bin/python -m bench.plots          # every figure whose JSON is there

Each figure says what was measured and on what (the machine from the JSON), so a PNG read on
its own is not misread.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

from bench.common import RESULTS


def _plt() -> Any:
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise SystemExit("matplotlib is in the bench extra: .venv/bin/pip install -e '.[bench]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _load(name: str) -> dict[str, Any] | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _machine(doc: dict[str, Any]) -> str:
    m = doc.get("machine", {})
    return f"{m.get('cpus', '?')} CPUs, {doc.get('when', '')[:10]}"


def _save(fig: Any, name: str) -> Path:
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def gateway_latency(doc: dict[str, Any]) -> Path:
    """Latency against request rate, through the gateway and straight to the pod."""
    plt = _plt()
    rows = doc["rows"]
    rates = sorted({r["target_rps"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"direct": ("tab:blue", "direct to the pod"), "gateway": ("tab:orange", "through the gateway (Envoy)")}
    for path, (color, label) in styles.items():
        for q, ls, marker in (("p50_ms", "-", "o"), ("p99_ms", "--", "s")):
            med, lo, hi = [], [], []
            for rate in rates:
                v = [r[q] for r in rows if r["target_rps"] == rate and r["path"] == path]
                med.append(statistics.median(v))
                lo.append(statistics.median(v) - min(v))
                hi.append(max(v) - statistics.median(v))
            ax.errorbar(rates, med, yerr=[lo, hi], color=color, ls=ls, marker=marker, capsize=3,
                        label=f"{label}, {q.split('_')[0]}")
    ax.set_xlabel("offered load (requests/s, rate-limited by hey)")
    ax.set_ylabel("latency (ms)")
    ax.set_ylim(bottom=0)
    ax.set_xticks(rates)
    ax.set_title(f"Request latency against rate: median of {doc.get('repeats', '?')} runs (bars: min-max)\n"
                 f"tiny string model, {doc.get('seconds_per_point', '?')} s a point, {_machine(doc)}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, "gateway_latency")


def coldstart(doc: dict[str, Any]) -> Path | None:
    """The distribution of cold-start times: the whole cold request, the runtime's own load, and
    the difference (meshserve's overhead)."""
    samples = doc.get("samples_ms")
    if not samples:
        print("coldstart.json has no samples_ms (written before they were kept): run `python -m bench.run coldstart`", file=sys.stderr)
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = (("cold_request", "cold request through the gateway"), ("runtime_load_and_infer", "runtime's own load + first answer"),
              ("overhead", "meshserve's overhead (the difference)"))
    for key, label in series:
        v = sorted(samples[key])
        n = len(v)
        ax.step(v, [(i + 1) / n for i in range(n)], where="post", label=f"{label} (p50 {statistics.median(v):.1f} ms)")
    ax.set_xlabel("time (ms)")
    ax.set_ylabel("fraction of cold starts at or under")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.set_title(f"Cold start: cumulative distribution over {len(samples['cold_request'])} models\n"
                 f"tiny string models from a PVC, {_machine(doc)}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, "coldstart")


def density_memory(doc: dict[str, Any]) -> Path:
    """Resident memory of each process against the number of models loaded (stacked)."""
    plt = _plt()
    points = doc.get("rss_samples") or [{"loaded": 0, "rss_mib": doc["rss_mib_idle"]}, {"loaded": doc["loaded"], "rss_mib": doc["rss_mib_loaded"]}]
    points = sorted(points, key=lambda p: p["loaded"])
    names = sorted(points[-1]["rss_mib"], key=lambda k: -points[-1]["rss_mib"][k])  # biggest at the bottom
    x = [p["loaded"] for p in points]
    ys = [[p["rss_mib"].get(n, 0.0) for p in points] for n in names]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.stackplot(x, ys, labels=[f"{n} ({points[-1]['rss_mib'][n]:.0f} MiB at the end)" for n in names], alpha=0.85)
    # The first point is before registering: the rise at 0 loaded is the registry's own cost.
    ax.set_xlabel(f"models loaded (the rise at 0: registering {doc['registered']:,} models)")
    ax.set_ylabel("resident memory (MiB, stacked)")
    ax.set_xlim(0, max(x))
    ax.set_title(f"Memory against models loaded: {doc['registered']:,} registered, {doc['pods']} pods\n"
                 f"{'sampled while loading' if doc.get('rss_samples') else 'idle and all loaded only'}, {_machine(doc)}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="process (with children)", title_fontsize=8)
    return _save(fig, "density_memory")


def hit_ratio(doc: dict[str, Any], name: str = "placement_sim") -> Path:
    """Placement's hit ratio against total capacity, against the other policies and Belady."""
    plt = _plt()
    curve = {float(f): rows for f, rows in doc["curve"].items()}
    fracs = sorted(curve)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for idx, style in ((0, "o-"), (1, "s--"), (2, "^:"), (3, "k-")):
        label = curve[fracs[0]][idx]["policy"]
        ax.plot([f * 100 for f in fracs], [curve[f][idx]["hit_ratio"] for f in fracs], style, label=label)
    w = doc["workload"]
    ax.set_xlabel("total pod capacity, % of all model bytes")
    ax.set_ylabel("hit ratio (requests served without a load)")
    ax.set_title(f"Placement: Zipf s={w['zipf_s']} over {w['models']:,} models, lognormal sizes", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, name)


def peer_rayserve(doc: dict[str, Any]) -> Path:
    """meshserve against Ray Serve: the five figures of bench/peer_rayserve.py, medians of its runs."""
    plt = _plt()
    p, mem = {**doc["points"], "cold": doc["cold"]}, doc["memory"]
    sides = (("meshserve", "tab:blue"), ("ray", "tab:orange"))
    fig, axes = plt.subplots(1, 5, figsize=(17, 4))

    def bars(ax: Any, groups: list[tuple[str, str, str]], ylabel: str, title: str) -> None:
        """groups: (label, point, key); one bar per side per group."""
        for i, (name, color) in enumerate(sides):
            vals = [p[pt][name]["median"][key] if pt in p else mem[name][key] for _, pt, key in groups]
            xs = [j + (i - 0.5) * 0.38 for j in range(len(groups))]
            ax.bar(xs, vals, 0.38, color=color, label="Ray Serve" if name == "ray" else name)
            for x, v in zip(xs, vals):
                ax.text(x, v, f"{v:,.0f}" if v >= 10 else f"{v:.1f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)

    bars(axes[0], [("req/s", "saturation", "achieved_rps")], "requests/s", "one hot model, saturation")
    rates = [k for k in p if k.startswith("fixed_")]
    for name, color in sides:
        xs, meds = [int(k[6:]) for k in rates], [p[k][name]["median"] for k in rates]
        axes[1].plot(xs, [m["p99_ms"] for m in meds], "o-", color=color)
        for x, m in zip(xs, meds):  # what it held: `hey` waits for answers, so a slow side sends less
            axes[1].annotate(f"{m['achieved_rps']:.0f}/s", (x, m["p99_ms"]), fontsize=7, textcoords="offset points", xytext=(0, 5), ha="center")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("target rps")
    axes[1].set_ylabel("p99, ms (log)")
    axes[1].set_title("one hot model, fixed rate (labels: rps held)", fontsize=9)
    bars(axes[2], [("p50", "zipf", "p50_ms"), ("p99", "zipf", "p99_ms")], "ms (log)", f"Zipf over {doc['config']['zipf_models']:,} models, {doc['config']['zipf_rps']:.0f} rps")
    axes[2].set_yscale("log")
    bars(axes[3], [("p50", "cold", "p50_ms"), ("p99", "cold", "p99_ms"), ("p50, full", "cold_evicting", "p50_ms"),
                   ("p99, full", "cold_evicting", "p99_ms")], "ms (log)", f"cold start, {doc['config']['cold_models']} new models:\nroom free / caches full")
    axes[3].set_yscale("log")
    bars(axes[4], [("idle", "", "idle_mib"), (f"{doc['config']['memory_models']} loaded", "", "loaded_mib")], "RSS, MiB", "memory, all processes")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"meshserve against Ray Serve {doc.get('ray_version', '')}: same model, 2 runtime processes each, "
                 f"medians of {doc['config']['repeats']}, side by side ({_machine(doc)}, shared)", fontsize=10)
    return _save(fig, "peer_rayserve")


FIGURES: dict[str, Callable[[dict[str, Any]], Path | None]] = {
    "gateway": gateway_latency,
    "coldstart": coldstart,
    "density": density_memory,
    "placement_sim": hit_ratio,
    "peer_rayserve": peer_rayserve,
}


def main() -> int:
    for name, draw in FIGURES.items():
        doc = _load(name)
        if doc is None:
            print(f"no bench/results/{name}.json: run `python -m bench.run {name}` first", file=sys.stderr)
            continue
        path = draw(doc)
        if path:
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

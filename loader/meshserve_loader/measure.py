"""`python -m meshserve_loader.measure`: predicted vs measured size of the example models, on a
fresh built-in runtime (and MLServer, with --mlserver), printed as a Markdown table for
docs/design/loader.md. Everything runs on 127.0.0.1 and is stopped at the end."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
from pathlib import Path

import aiohttp

from meshserve_loader import example_models as ex
from meshserve_loader.process import RuntimeProcess
from meshserve_loader.servers.builtin import RuntimeClient, builtin_argv, read_ports
from meshserve_loader.storage import predict_size


def _models(d: Path) -> dict[str, Path]:
    out = {fmt: write(d / name) for fmt, (name, write) in ex.WRITERS.items()}
    out["custom"] = ex.write_user_model(d / "reverse")
    return out


async def _builtin(models: dict[str, Path], tmp: Path) -> list[tuple[str, str, int, int, int, int]]:
    rows = []
    async with aiohttp.ClientSession() as s:
        for fmt, path in models.items():
            # A fresh runtime per model: each delta is that model's alone, first load included.
            proc = RuntimeProcess("builtin", builtin_argv(0, tmp / "ports.json"), _env(tmp), log_path=tmp / "rt.log")
            (tmp / "ports.json").unlink(missing_ok=True)
            await proc.start()
            try:
                ports = await read_ports(tmp / "ports.json", proc)
                rt = RuntimeClient(f"http://127.0.0.1:{ports['control']}", s)  # the control port: loads go there
                await rt.wait_ready(60)
                fmt_name = fmt.split(" ")[0]
                # Follow the weights link: the prediction is meant to see the model's bytes.
                predicted = predict_size(path / "weights" if (path / "weights").is_dir() else path, fmt_name)
                params = {"path": str(path), "format": fmt_name, "predicted_size": predicted}
                measured = await rt.load(f"{fmt}-example", params, 120)
                again = await rt.load(f"{fmt}-example-2", params, 120)
                src = path / "weights" if (path / "weights").is_dir() else path
                disk = sum(f.stat().st_size for f in src.resolve().rglob("*") if f.is_file()) if src.is_dir() else src.stat().st_size
                rows.append(("builtin", fmt, disk, predicted, measured, again))
            finally:
                await proc.stop()
    return rows


def _env(tmp: Path) -> dict[str, str]:
    # 127.0.0.1 only, on ports the kernel picks; the runtime loads from its allowed roots, so
    # the temp dir is one.
    return {"MESHSERVE_HOST": "127.0.0.1", "MESHSERVE_RUNTIME_BASE_PORT": "0", "MESHSERVE_MODEL_ROOTS": str(tmp)}


async def _repeat(src: Path, fmt: str, n: int, tmp: Path) -> list[int]:
    """The sizes one built-in runtime reports for `n` identical copies of `src` loaded under `n`
    ids, while two clients send inference to a first copy (as a pod serves while it loads)."""
    paths = []
    for i in range(n + 1):
        d = tmp / "repeat" / f"m{i}"
        d.mkdir(parents=True)
        paths.append(Path(shutil.copy(src, d / src.name)))
    predicted = predict_size(paths[0], fmt)
    proc = RuntimeProcess("builtin", builtin_argv(0, tmp / "ports-repeat.json"), _env(tmp), log_path=tmp / "rt-repeat.log")
    await proc.start()
    try:
        ports = await read_ports(tmp / "ports-repeat.json", proc)
        base = ports["rest"]
        async with aiohttp.ClientSession() as s:
            rt = RuntimeClient(f"http://127.0.0.1:{ports['control']}", s)
            await rt.wait_ready(60)
            params = {"format": fmt, "predicted_size": predicted}
            await rt.load("m0", {**params, "path": str(paths[0])}, 120)
            body = {"inputs": [{"name": "predict", "shape": [16, 64], "datatype": "FP32", "data": [1.0] * 1024}]}
            stop = asyncio.Event()

            async def client() -> None:
                while not stop.is_set():
                    async with s.post(f"http://127.0.0.1:{base}/v2/models/m0/infer", json=body) as r:
                        await r.read()

            clients = [asyncio.create_task(client()) for _ in range(2)]
            try:
                return [await rt.load(f"m{i}", {**params, "path": str(paths[i])}, 120) for i in range(1, n + 1)]
            finally:
                stop.set()
                await asyncio.gather(*clients, return_exceptions=True)
    finally:
        await proc.stop()


async def _mlserver(path: Path, tmp: Path) -> list[tuple[str, str, int, int, int, int]]:
    from meshserve_loader.servers.mlserver import MLServerClient, start_mlserver
    from meshserve_loader.servers.mlserver_venv import ensure_mlserver

    exe = ensure_mlserver(Path(__file__).resolve().parents[2])
    proc, url, models = await start_mlserver(exe, tmp)
    try:
        async with aiohttp.ClientSession() as s:
            c = MLServerClient(url, s, models, pid=lambda: proc.pid)
            await c.wait_ready(120)
            measured = await c.load("sklearn-example", {"path": str(path), "format": "sklearn"}, 120)
            again = await c.load("sklearn-example-2", {"path": str(path), "format": "sklearn"}, 120)
            return [("mlserver 1.7.1", "sklearn", path.stat().st_size, predict_size(path, "sklearn"), measured, again)]
    finally:
        await proc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(prog="meshserve_loader.measure")
    ap.add_argument("--mlserver", action="store_true", help="also measure on MLServer 1.7.1 (installs its venv once)")
    ap.add_argument("--minilm", action="store_true", help="also measure the MiniLM custom-runtime example (installs its weights once)")
    ap.add_argument("--repeat", type=Path, metavar="FILE", help="instead: load N identical copies of this sklearn file and print the sizes' spread")
    ap.add_argument("-n", type=int, default=20, help="copies for --repeat (20)")
    args = ap.parse_args()
    if args.repeat:
        with tempfile.TemporaryDirectory(prefix="ms-measure-") as t:
            sizes = asyncio.run(_repeat(args.repeat, "sklearn", args.n, Path(t)))
        predicted = predict_size(args.repeat, "sklearn")
        print(f"{len(sizes)} loads of {args.repeat.name} ({args.repeat.stat().st_size:,} B, predicted {predicted:,} B): "
              f"min {min(sizes):,} max {max(sizes):,} spread {(max(sizes) - min(sizes)) / min(sizes):.1%}; "
              f"{sum(x < predicted for x in sizes)} below the prediction")
        return
    with tempfile.TemporaryDirectory(prefix="ms-measure-") as t:
        tmp = Path(t)
        models = _models(tmp / "models")
        if args.minilm:
            from meshserve_loader.examples.minilm_setup import ensure_weights, write_model_dir

            weights = ensure_weights(Path(__file__).resolve().parents[2] / ".cache-models")
            models["custom (MiniLM)"] = write_model_dir(tmp / "models" / "minilm", weights)
        rows = asyncio.run(_builtin(models, tmp))
        if args.mlserver:
            rows += asyncio.run(_mlserver(models["sklearn"], tmp))
    print("| runtime | format | on disk (B) | predicted (B) | measured, 1st load (B) | measured, 2nd copy (B) | 2nd / predicted |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for rt, fmt, disk, pred, meas, again in rows:
        print(f"| {rt} | {fmt} | {disk:,} | {pred:,} | {meas:,} | {again:,} | {again / pred:.2f} |")


if __name__ == "__main__":
    main()

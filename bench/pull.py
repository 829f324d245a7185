"""S3 pull throughput (issue 16): meshserve's pull of one large object against boto3's
`download_file` with its default TransferConfig (what `aws s3 cp` does), side by side.

A moto S3 server on 127.0.0.1 (bench/moto_ranges.py: moto serving a range without reading the
whole object) holds one object of --mib MiB (random bytes). Each round runs both
downloads, alternating which goes first (so neither always gets the warmer page cache or the
quieter second), into fresh directories on the same disk; the medians of --repeats rounds are
compared. meshserve's side is the loader's whole path: Fetcher.fetch -> disk cache staging dir
-> s3transfer ranged GETs -> atomic publish; once as is (the same work as download_file: the
ratio the goal is about, >= 0.9) and once with a parameters.sha256 to check as well (extra CPU
for the hash, which on a 2-core machine shared with the server shows).

    .venv/bin/python -m bench.pull [--mib 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import boto3
from boto3.s3.transfer import TransferConfig

from bench.common import write
from meshserve_testing.devmesh import free_port, http_get, stop, wait_until
from meshserve_loader import pull_s3
from meshserve_loader.diskcache import DiskCache
from meshserve_loader.fetch import Fetcher
from meshserve_loader.storage_config import parse_secret

KEY_ID, SECRET = "AKIAMESHSERVEBENCH", "meshserve-bench"


def _put_object(client: object, size: int, tmp: Path) -> str:
    """`size` random bytes as s3://bench/model.bin; returns their sha256. Written to a file
    first and uploaded from it (multipart), so the bench never holds the object in memory."""
    src = tmp / "src.bin"
    sha = hashlib.sha256()
    with src.open("wb") as f:
        block = os.urandom(8 << 20)
        left = size
        while left:
            piece = block[: min(left, len(block))]
            sha.update(piece)
            f.write(piece)
            left -= len(piece)
    client.upload_file(str(src), "bench", "model.bin")  # type: ignore[attr-defined]
    src.unlink()
    return sha.hexdigest()


@contextmanager
def s3_server() -> Iterator[str]:
    """bench.moto_ranges on 127.0.0.1; yields its URL and always stops it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.moto_ranges", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is not None or http_get(url + "/moto-api/")[0] == 200, 30, "moto server")
        if proc.poll() is not None:
            raise SystemExit("the moto server exited at start: is moto[server] installed (`make install`)?")
        yield url
    finally:
        stop(proc)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    size = args.mib << 20
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="bench-pull-") as tmpdir, s3_server() as url:
        tmp = Path(tmpdir)
        client = boto3.client("s3", endpoint_url=url, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET, region_name="us-east-1")
        client.create_bucket(Bucket="bench")
        t0 = time.perf_counter()
        digest = _put_object(client, size, tmp)
        upload_s = time.perf_counter() - t0
        entry = {"type": "s3", "access_key_id": KEY_ID, "secret_access_key": SECRET, "endpoint_url": url, "region": "us-east-1", "bucket": "bench"}
        stores = parse_secret({"default": json.dumps(entry)})

        def ours(i: int, sha256: str = "") -> float:
            root = tmp / f"ours-{i}"
            f = Fetcher(root / "pvc", stores, DiskCache(root / "cache", 1 << 40), max_model_bytes=size + 1)
            t = time.perf_counter()
            p = asyncio.run(f.fetch({"path": "model.bin", "parameters": {"sha256": sha256}}))
            dt = time.perf_counter() - t
            assert p.stat().st_size == size
            shutil.rmtree(root)
            return dt

        def reference(i: int) -> float:
            out = tmp / f"ref-{i}.bin"
            t = time.perf_counter()
            client.download_file("bench", "model.bin", str(out), Config=TransferConfig())
            dt = time.perf_counter() - t
            assert out.stat().st_size == size
            out.unlink()
            return dt

        # The same work as download_file (no digest), and with the model's sha256 checked too.
        series = [("meshserve", ours), ("download_file", reference), ("meshserve_sha256", lambda i: ours(i, digest))]
        runs: dict[str, list[float]] = {name: [] for name, _ in series}
        for i in range(args.repeats):
            for name, fn in series[i % 3 :] + series[: i % 3]:  # each goes first once in 3 rounds
                runs[name].append(round(fn(i), 3))
                print(f"round {i + 1}: {name} {runs[name][-1]:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratio = med["download_file"] / med["meshserve"]  # throughput ratio: ours / reference, same work
    res = {
        "object_mib": args.mib,
        "repeats": args.repeats,
        "server": "moto on 127.0.0.1, ranges read alone (bench/moto_ranges.py)",
        "meshserve_config": {"part_mib": pull_s3.PART_BYTES >> 20, "concurrency": pull_s3.CONCURRENCY},
        "reference": "boto3 download_file, default TransferConfig (8 MiB parts, 10 threads)",
        "seconds": runs,
        "median_seconds": {k: round(v, 3) for k, v in med.items()},
        "median_mib_per_s": {k: round(args.mib / v, 1) for k, v in med.items()},
        "ratio_meshserve_to_download_file": round(ratio, 3),
        "goal_ratio_ge_0_9": ratio >= 0.9,
        "ratio_with_sha256_to_download_file": round(med["download_file"] / med["meshserve_sha256"], 3),
        "upload_seconds": round(upload_s, 1),
        "loadavg_before": load_before,
        "loadavg_after": _load(),
    }
    print(json.dumps(res, indent=2))
    name = "pull" if args.mib == 1024 else f"pull-{args.mib}mib"
    print(write(name, res))


if __name__ == "__main__":
    main()

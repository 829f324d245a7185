"""`python -m meshserve_loader --index N`: the loader agent of runtime pod N."""

from __future__ import annotations

import argparse
import asyncio

from meshserve import logs
from meshserve.settings import Settings
from meshserve_loader.agent import run


def main() -> None:
    ap = argparse.ArgumentParser(prog="meshserve_loader")
    ap.add_argument("--index", type=int, required=True, help="runtime pod number (sets its ports and id)")
    args = ap.parse_args()
    s = Settings.from_env()
    logs.setup(f"loader-{args.index}", s.log_json)
    asyncio.run(run(s, args.index))


if __name__ == "__main__":
    main()

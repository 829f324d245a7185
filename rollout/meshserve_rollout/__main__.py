"""`python -m meshserve_rollout`: the rollout controller's process (started by `meshserve up`)."""

from __future__ import annotations

import asyncio

from meshserve.settings import Settings
from meshserve.store.state import State
from meshserve_rollout.controller import Controller


async def main() -> None:
    from meshserve import logs

    s = Settings.from_env()
    logs.setup("rollout", s.log_json)
    state = State.from_url(s.redis_url)
    try:
        await Controller(s, state).run()
    finally:
        await state.close()


if __name__ == "__main__":
    asyncio.run(main())

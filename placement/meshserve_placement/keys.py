"""Redis keys that only placement writes (the shared schema is meshserve/state.py; both are
documented in docs/design/state.md)."""

from __future__ import annotations

from meshserve.state import PREFIX

DECISIONS = PREFIX + "decisions"  # hash: model id -> last placement Decision JSON (for `meshserve explain`)
EXCLUDED = PREFIX + "excluded"  # hash: "<model>|<pod>" -> unix time until which the pod is excluded
# hash: model id -> unix time: copies pinned through the gateway's v2 repository API (an
# explicit load pins a copy, as `meshserve.io/pinned` does; an unload drops the pin).
PINS = PREFIX + "pins"
LOADQ_PREFIX = PREFIX + "loadq:"  # zset per pod: model id -> priority (lower first); loads waiting for a slot

# Priority offset for loads nobody is waiting for (scale-up, minCopies, moves off a draining
# pod): a load with a request waiting is always dispatched first.
BACKGROUND = 1e10


def loadq_key(pod: str) -> str:
    return LOADQ_PREFIX + pod

"""The one owner of the Redis protocol (docs/design/state.md).

- `keys`: every key and key builder;
- `messages`: every stream entry as a typed message with one encoder and one decoder;
- `state`: `State` (the fenced atomic `commit`, and reads) and `Snapshot`;
- `ops`: the command builders and operations components call;
- `lease`: the `Lease` every leader-elected process holds.

No module outside this package spells a Redis command or a key (tests/test_store_boundary.py).
"""

from meshserve.store.lease import Lease
from meshserve.store.state import NotLeader, Snapshot, State

__all__ = ["Lease", "NotLeader", "Snapshot", "State"]

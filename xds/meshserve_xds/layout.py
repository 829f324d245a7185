"""One interface for the ways routing state becomes a node group's resources, and the table
that picks them (docs/design/routing.md, "Layouts").

Every layout is pure (no I/O, no cache): it takes a `RoutingState` and returns what the
snapshot cache should hold, whole (`Resources`) or as a change (`Patch`). It may keep what it
last built to diff against; `RedisSource` owns one per group and hands the results to the
cache. Layouts:

- gateway group, chosen by MESHSERVE_XDS_LAYOUT from `GATEWAY_LAYOUTS`: `scoped` (default,
  scoped.py) or `matcher` (matcher.py);
- Istio group: the matcher layout without listeners (istiod owns the listener);
- proxyless group: proxyless.py (grpcio's own xDS client).
"""

from __future__ import annotations

from typing import Callable, Protocol

from meshserve_xds.matcher import MatcherLayout
from meshserve_xds.proxyless import ProxylessLayout
from meshserve_xds.resources import GATEWAY_GROUP, ISTIO_GROUP, PROXYLESS_GROUP, ListenerConfig, Patch, Resources, RoutingState
from meshserve_xds.scoped import ScopedLayout


class Layout(Protocol):
    group: str

    def build_full(self, state: RoutingState) -> Resources:
        """Every resource of the group (a start, a resync, a group just wanted). What later
        changes are diffed against starts here."""
        ...

    def apply_change(self, state: RoutingState) -> Resources | Patch:
        """The whole routing state after a change: every resource again (the cache keeps only
        what moved), or a patch of what changed since the last build."""
        ...

    def apply_partial(self, part: RoutingState, models: set[str], names: set[str]) -> Patch | None:
        """A change known to touch only `models` (placements, registrations) and `names`
        (aliases), with `part` the routing state of just those: a patch costing O(change), or
        None when this layout cannot tell (then `apply_change` with the whole state)."""
        ...


GATEWAY_LAYOUTS: dict[str, Callable[[ListenerConfig], Layout]] = {
    "scoped": lambda listeners: ScopedLayout(listeners, GATEWAY_GROUP),
    "matcher": lambda listeners: MatcherLayout(listeners, GATEWAY_GROUP),
}


def gateway_layout(name: str, listeners: ListenerConfig) -> Layout:
    """The gateway group's layout by name (MESHSERVE_XDS_LAYOUT)."""
    if name not in GATEWAY_LAYOUTS:
        raise ValueError(f"MESHSERVE_XDS_LAYOUT={name!r}: expected one of {', '.join(GATEWAY_LAYOUTS)}")
    return GATEWAY_LAYOUTS[name](listeners)


def extra_layout(group: str, gateway: Layout) -> Layout:
    """The layout of a group built only while a client of it is connected."""
    if group == ISTIO_GROUP:
        # In the matcher layout its routes and clusters are the gateway's: shared, built once.
        return MatcherLayout(None, ISTIO_GROUP, share=gateway if isinstance(gateway, MatcherLayout) else None)
    if group == PROXYLESS_GROUP:
        return ProxylessLayout(PROXYLESS_GROUP)
    raise ValueError(f"no layout for group {group!r}")


EXTRA_GROUPS = (ISTIO_GROUP, PROXYLESS_GROUP)

"""Every Redis key meshserve uses, with who writes it (docs/design/state.md has the table).

The one place a key is spelled: a module that needs a key imports it from here, and writes it
only through the store's operations (meshserve/store/ops.py) or `State.commit`.
"""

from __future__ import annotations

PREFIX = "ms:"
REV = PREFIX + "rev"  # int: bumped by every routing-relevant commit
CHANGES = PREFIX + "changes"  # stream: rev, kind, id (messages.Change), written by the commit Lua only
MODELS = PREFIX + "models"  # hash: concrete id -> ModelSpec JSON
ALIASES = PREFIX + "aliases"  # hash: alias -> concrete id
PODS = PREFIX + "pods"  # hash: pod id -> Pod JSON
HEARTBEATS = PREFIX + "heartbeats"  # zset: pod id -> unix time of last heartbeat
PLACEMENTS = PREFIX + "placements"  # hash: concrete id -> {pod: Copy} JSON; the placement leader only
# hash: "<adapter id>|<pod>" -> base id, for adapter copies over a superseded version of their
# base (a rolled base kept booked for them); the placement leader only (placement bases.py)
PLACEMENT_OVER = PREFIX + "placement:over"
LAST_USED = PREFIX + "lastused"  # zset: concrete id -> unix time of last use
LOAD_REQUESTS = PREFIX + "loadreq"  # stream of messages.LoadRequest: asks to the placement leader
EVENTS = PREFIX + "events"  # stream of messages.LoadResult/UnloadResult/PodRegistered: loaders to the leader
# Stream of messages.PodEvent: what befell a pod's models besides orders (order_dropped,
# runtime_restart, drain). Written by the loader; read by `meshserve describe`.
POD_EVENTS = PREFIX + "pod-events"
# Pods placement withdrew, hash: pod id -> JSON {last_heartbeat, withdrawn_at, reason}, for
# `meshserve status`. Written by the placement leader only; the entry goes when the pod registers again.
WITHDRAWN = PREFIX + "withdrawn"
# Pods placement judged paused, hash: pod id -> why. Their runtime accepts connections but does not
# answer (a frozen cgroup, a VM paused for migration): the gateways send their copies' traffic to
# the other copies until the pod answers again or is withdrawn. Written by the placement leader only.
PAUSED = PREFIX + "paused"
LEASE = PREFIX + "leader"  # string: placement leader's id, with a TTL (the commit's fence)
ORDERS_PREFIX = PREFIX + "orders:"  # stream per pod of messages.LoadOrder/UnloadOrder; the leader only
# Traffic rules (docs/design/traffic.md).
RULES = PREFIX + "rules"  # hash: rule name -> TrafficRule JSON (as applied)
RULE_STATUS = PREFIX + "rulestatus"  # hash: rule name -> status JSON (phase, canary step, reason)
TRANSITIONS = PREFIX + "transitions"  # hash: InferenceService name -> version move JSON
ROLLOUT_LEASE = PREFIX + "rollout:leader"  # string: rollout controller's id, with a TTL
# Pull/load progress (issue 8): string + TTL per in-flight load, key `ms:progress:<model>|<pod>`,
# JSON messages.Progress. Written by the loader (throttled, refreshed while alive, so a killed
# loader's entry expires); no index: readers know which to read from the LOADING copies in PLACEMENTS.
PROGRESS_PREFIX = PREFIX + "progress:"
# ServingRuntimes (cluster mode), hash: name -> {"formats": [...], "auto_formats": [...]}.
# Written whole by the controller, read by placement each pod refresh to resolve a model's
# runtime (ms:pods alone would miss a pool scaled to zero). Not routing state: no revision.
RUNTIMES = PREFIX + "runtimes"
# Which revision each gateway's routes reflect, hash: "<node>/<stream>" -> messages.GatewaySync
# ("<rev> <unix time>"). Written only by the xDS servers, for the streams they hold: a field
# says the gateway ACKed every route type as built at `rev`, refreshed every second, removed
# when the stream ends. Read by loaders: an unload waits until every gateway caught up with
# the revision that withdrew the route (loader agent, docs/design/placement.md).
XDS_SYNCED = PREFIX + "xds:synced"
# Transformers (docs/design/transformer.md), hash: name -> record JSON; written by `meshserve up`.
TRANSFORMERS = PREFIX + "transformers"

# Written by the placement leader only (through its commits).
DECISIONS = PREFIX + "decisions"  # hash: model id -> last placement Decision JSON (for `meshserve explain`)
EXCLUDED = PREFIX + "excluded"  # hash: "<model>|<pod>" -> unix time until which the pod is excluded
# hash: model id -> unix time: copies pinned through the gateway's v2 repository API (an
# explicit load pins a copy, as `meshserve.io/pinned` does; an unload drops the pin).
PINS = PREFIX + "pins"
LOADQ_PREFIX = PREFIX + "loadq:"  # zset per pod: model id -> priority (lower first); loads waiting for a slot

# Consumer groups. The orders stream's group is the pod's loader; the leader reads LOAD_REQUESTS
# and EVENTS as one consumer name, so a new leader inherits the old one's unacknowledged entries.
ORDERS_GROUP = "loader"
LEADER_GROUP = "placement"
LEADER_CONSUMER = "leader"

# Stream caps (MAXLEN ~): the streams are queues and recent history, not archives.
CHANGES_MAXLEN = 200_000
STREAM_MAXLEN = 100_000


def orders_key(pod_id: str) -> str:
    return ORDERS_PREFIX + pod_id


def progress_key(model_id: str, pod_id: str) -> str:
    return f"{PROGRESS_PREFIX}{model_id}|{pod_id}"


def loadq_key(pod_id: str) -> str:
    return LOADQ_PREFIX + pod_id


def excluded_field(model_id: str, pod_id: str) -> str:
    return f"{model_id}|{pod_id}"


# The load queue's score: an enqueue time, plus this offset for loads nobody is waiting for
# (scale-up, minCopies, moves off a draining pod), so a load with a request waiting always goes first.
BACKGROUND = 1e10

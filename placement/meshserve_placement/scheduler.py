"""The placement leader, by its old name: leader.py is the shell, and its parts are listed there."""

from __future__ import annotations

from meshserve_placement.decisions import LAST_DECISIONS, QUEUED
from meshserve_placement.leader import CONSUMER, GROUP, HANDLER_TRIES, Scheduler
from meshserve_placement.maintain import UNLOAD_RETRY_SECONDS
from meshserve_placement.reload import _build_view, _model_view, _pod_view

__all__ = [
    "CONSUMER", "GROUP", "HANDLER_TRIES", "LAST_DECISIONS", "QUEUED", "Scheduler", "UNLOAD_RETRY_SECONDS",
    "_build_view", "_model_view", "_pod_view",
]

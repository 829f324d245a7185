"""The shapes the leader's parts pass around: Redis writes to commit, and the changes that
announce them on ms:changes."""

from __future__ import annotations

from typing import Any

Ops = list[list[Any]]  # Redis commands, committed together
Changes = list[tuple[str, str]]  # (kind, id) appended to ms:changes by State.commit

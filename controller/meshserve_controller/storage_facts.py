"""What a model's stored files say, for cluster mode: its predicted size (disk x 1.25) and the base
its PEFT adapter_config.json names (issues 17 and 19), read once per model id before it is
registered, as `meshserve apply` and `meshserve up` do (meshserve/rules/config.py `read_storage`).

The reads themselves are the loader's (meshserve_loader/predict.py: the pullers' own listings,
nothing downloaded but adapter_config.json), over the storage-config Secret the controller
already watches; the credentials stay in this process's memory. Local and PVC models are left
to the loader, which measures them after its pull: no PVC is mounted here.

A model id names its storage entry (the SHA-1 of the predictor spec), so what was read for an
id holds until the Secret changes. A listing that failed is tried again after RETRY_SECONDS,
not on every pass.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Mapping

from meshserve.model import ModelSpec
from meshserve.registry import FromStorage
from meshserve.rules.config import Predict, read_storage
from meshserve.yamlfile import ConfigError

log = logging.getLogger("meshserve.k8s")

RETRY_SECONDS = 300.0
# The Secret (None: there is none) -> what reads that Secret's stores; the composition root
# passes the loader's Predictor.from_secret.
PredictFrom = Callable[[Mapping[str, Any] | None], Predict]


class StorageFacts:
    def __init__(self, predict_from: PredictFrom, clock: Callable[[], float] = time.monotonic):
        self._predict_from = predict_from
        self._clock = clock
        self._secret_seen: str | None = None
        self._predict: Predict | None = None
        self._read: dict[str, tuple[FromStorage, float]] = {}  # model id -> what was read, when
        self._just_read: set[str] = set()

    async def fill(self, specs: list[ModelSpec], registered: Mapping[str, ModelSpec], secret: Mapping[str, Any] | None) -> list[str]:
        """Fill each spec's `predicted_size` and `base` where the spec leaves them open. What is
        registered under the same id carries over without a read. Returns a note per base read
        from an adapter_config.json."""
        seen = json.dumps([(secret or {}).get(f) for f in ("data", "stringData")], sort_keys=True)
        if seen != self._secret_seen or self._predict is None:
            self._secret_seen, self._predict = seen, self._predict_from(secret)
            self._read.clear()  # new credentials: what failed before may list now
        live = {s.id for s in specs}
        for i in [i for i in self._read if i not in live]:
            del self._read[i]
        self._just_read = set()
        notes = await read_storage(specs, registered, self._once)
        # Said once, when first read, not on every pass.
        fresh = {s.alias for s in specs if s.id in self._just_read}
        return [n for n in notes if n.split(":", 1)[0] in fresh]

    async def _once(self, specs: list[ModelSpec]) -> dict[str, FromStorage]:
        now = self._clock()
        todo = [s for s in specs if not self._fresh(s.id, now)]
        if todo:
            assert self._predict is not None
            got = await self._read_each_broken_alone(todo)
            for s in todo:
                self._read[s.id] = (got.get(s.id, FromStorage()), now)
                self._just_read.add(s.id)
        return {s.id: self._read[s.id][0] for s in specs}

    def _fresh(self, model_id: str, now: float) -> bool:
        hit = self._read.get(model_id)
        if hit is None:
            return False
        facts, at = hit
        return facts != FromStorage() or now - at < RETRY_SECONDS

    async def _read_each_broken_alone(self, specs: list[ModelSpec]) -> dict[str, FromStorage]:
        """A broken adapter_config.json fails its own model only: registration goes on without
        its base (the loader reads the file again after its pull and fails that load, which the
        InferenceService's status then shows)."""
        assert self._predict is not None
        try:
            return await self._predict(specs)
        except ConfigError:
            pass
        got: dict[str, FromStorage] = {}
        for s in specs:
            try:
                got.update(await self._predict([s]))
            except ConfigError as e:
                log.warning("controller: %s: %s; registered without the base it names", s.alias, e)
        return got

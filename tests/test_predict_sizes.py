"""Issue 19 §2: registration predicts a model's size from its stored files (disk x 1.25) so
placement can book it before the first load (meshserve_loader/predict.py, rules/config.py
`predict_sizes`). The e2e case (a 16 MiB pod, local and S3 models) is e2e/test_predicted_size.py.

Kind: unit (local files, no store; the S3 listing runs against a real moto server in the e2e test).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from meshserve.model import ModelSpec
from meshserve.rules.config import predict_sizes
from meshserve_loader.predict import Predictor
from meshserve_loader.storage import predict_size


def _spec(name: str, storage: dict, size_hint: int = 0) -> ModelSpec:
    return ModelSpec(id=f"{name}__isvc-0000000001", alias=name, format="sklearn", storage=storage, size_hint=size_hint)


def test_local_files_are_predicted_and_an_unlistable_store_falls_back_with_a_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "pvc" / "vol" / "m"
    folder.mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"x" * 300_000)
    (folder / "b.bin").write_bytes(b"y" * 100_000)
    local = _spec("local", {"parameters": {"type": "pvc", "name": "vol"}, "path": "m"})
    missing = _spec("missing", {"key": "nowhere", "path": "m"})  # a storage-config key that does not exist
    with caplog.at_level(logging.WARNING, logger="meshserve.loader.predict"):
        got = asyncio.run(Predictor(tmp_path / "pvc", {})([local, missing]))
    assert got == {local.id: int(400_000 * 1.25) + 64 * 1024} and got[local.id] == predict_size(folder, "sklearn")
    assert "no size prediction for 1 model(s)" in caplog.text and "missing (StorageError" in caplog.text and "nowhere" in caplog.text


def test_registration_lists_only_what_it_does_not_know() -> None:
    listed: list[str] = []

    async def predict(specs: list[ModelSpec]) -> dict[str, int]:
        listed.extend(s.alias for s in specs)
        return {s.id: 1000 for s in specs if s.alias != "unlistable"}

    known = _spec("known", {})
    stored = {known.id: ModelSpec(**{**known.__dict__, "predicted_size": 777})}
    new, stated, unlistable = _spec("new", {}), _spec("stated", {}, size_hint=5000), _spec("unlistable", {})
    specs = [_spec("known", {}), new, stated, unlistable]
    asyncio.run(predict_sizes(specs, stored, predict))
    # The same id is the same storage entry: its prediction carries over without a listing. A
    # stated size needs none; a failed listing leaves 0 (the unknown-size default).
    assert listed == ["new", "unlistable"]
    assert [s.predicted_size for s in specs] == [777, 1000, 0, 0]
    # Without a predictor (`meshserve diff`, a dry run) what is stored still carries over.
    again = [_spec("known", {})]
    asyncio.run(predict_sizes(again, stored, None))
    assert again[0].predicted_size == 777

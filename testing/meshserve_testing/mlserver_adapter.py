"""MLModel classes for an adapter over a shared base in an MLServer pool (issue 17 item 3), as a
user would write them: copied into the models' folders by e2e/test_mlserver_adapters.py and
imported by MLServer (never by meshserve: this module needs the `mlserver` package).

- `Base`: the base, an ordinary model; it reads its own `vocab.txt`.
- `Adapter`: reads `parameters.extra.base_model_path` and `base_model` from the model-settings.json
  the loader wrote, opens the base's `vocab.txt` from that path once per process (every adapter
  over the same base shares it: `_BASES`), and answers, for each input text,
  "<base_model>|<words in the base's vocab>|<bases read in this process>|<its own suffix>:<text>".
"""

from __future__ import annotations

from pathlib import Path
from typing import List

from mlserver import MLModel
from mlserver.codecs import decode_args

_BASES: dict[str, list[str]] = {}  # base path -> its vocabulary, read once per MLServer process


class Base(MLModel):
    async def load(self) -> bool:
        self.vocab = (Path(self.settings.parameters.uri) / "vocab.txt").read_text().split()
        return True

    @decode_args
    async def predict(self, text: List[str]) -> List[str]:
        return [f"base|{len(self.vocab)}:{t}" for t in text]


class Adapter(MLModel):
    async def load(self) -> bool:
        extra = self.settings.parameters.extra or {}
        path = extra["base_model_path"]
        if path not in _BASES:
            _BASES[path] = (Path(path) / "vocab.txt").read_text().split()
        self.vocab = _BASES[path]
        self.base_model = extra["base_model"]
        self.suffix = (Path(self.settings.parameters.uri) / "suffix.txt").read_text().strip()
        return True

    @decode_args
    async def predict(self, text: List[str]) -> List[str]:
        return [f"{self.base_model}|{len(self.vocab)}|{len(_BASES)}|{self.suffix}:{t}" for t in text]

"""A text-generating model class for tests (docs/design/adapters.md, "Generation"): no weights,
deterministic, so tests can check what the runtime does with its pieces (max_tokens, stop, n,
streaming). Loaded by the built-in runtime's `custom` format as
`meshserve_testing.parrot.Parrot`.

`complete(prompt)` yields "echo:" (or model-settings `parameters.extra.greeting`) then the prompt's words one by one, then "la" forever (so
only max_tokens ends it when the prompt has no stop string); with a seed it first yields
"#<seed>". `detokenize(tokens)` makes token 7 the word "t7". `chat(messages)` does the same with the last user message. A prompt holding
"BOOM" raises after two pieces (a model failing mid-stream). `delay` (model-settings
`parameters.extra.delay`, seconds) sleeps before each piece, so streaming can be seen arriving.
"""

from __future__ import annotations

import time
from typing import Any, Iterator


class Parrot:
    def __init__(self, settings: dict[str, Any]):
        extra = (settings.get("parameters") or {}).get("extra") or {}
        self.delay = float(extra.get("delay") or 0)
        self.greeting = str(extra.get("greeting") or "echo:")

    def load(self) -> bool:
        return True

    def complete(self, prompt: str, seed: int | None = None, **_: Any) -> Iterator[str]:
        if seed is not None:
            yield f"#{seed} "
        for i, w in enumerate([self.greeting, *prompt.split()]):
            if i == 2 and "BOOM" in prompt:
                raise RuntimeError("the parrot choked")
            time.sleep(self.delay)
            yield w + " "
        while True:
            time.sleep(self.delay)
            yield "la "

    def chat(self, messages: list[dict[str, Any]], **params: Any) -> Iterator[str]:
        last = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")
        return self.complete(str(last), **params)

    def detokenize(self, tokens: list[int]) -> str:
        return " ".join(f"t{t}" for t in tokens)

    def count_tokens(self, text: str) -> int:
        return len(text.split())

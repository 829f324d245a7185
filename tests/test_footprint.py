"""Issue 19 §2: the built-in runtime's size of a loaded model, counted from its objects.

Kind: unit (pure, in memory).
"""

from __future__ import annotations

import numpy as np

from meshserve_loader.builtin.footprint import footprint


class _Model:
    def __init__(self, w: np.ndarray):
        self.w, self.view, self.np = w, w[:10], np  # a view of its own array and a module


def test_buffers_count_once_and_shared_code_not_at_all() -> None:
    w = np.zeros(100_000)  # 800,000 bytes
    size = footprint(_Model(w))
    assert 800_000 < size < 800_000 + 4096  # the view adds its header, not its data; numpy's module adds nothing
    assert footprint(_Model(np.zeros(100_000))) == size  # identical contents, identical size


def test_the_walk_is_bounded() -> None:
    big = [[i] for i in range(10_000)]
    assert footprint(big, max_objects=100) < footprint(big)

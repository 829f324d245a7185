"""Kind: unit. Settings from MESHSERVE_* variables: a value that can't be read is an error that
names the variable and what it takes; true and false are the only booleans (a typo is not
false); a log level applies to every component (issue 15)."""

from __future__ import annotations

import logging

import pytest

from meshserve import logs
from meshserve.settings import Settings, SettingsError
from meshserve_placement.tuning import Tuning


@pytest.mark.parametrize("var,value,needle", [
    ("MESHSERVE_HEARTBEAT_SECONDS", "fast", "MESHSERVE_HEARTBEAT_SECONDS='fast': expected a number"),
    ("MESHSERVE_PODS", "2.5", "MESHSERVE_PODS='2.5': expected a whole number"),
    ("MESHSERVE_LOG_JSON", "ture", "MESHSERVE_LOG_JSON='ture': expected true or false"),
    ("MESHSERVE_LOG_JSON", "1", "expected true or false"),
    ("MESHSERVE_LOG_LEVEL", "loud", "expected one of debug, info, warning, error"),
])
def test_a_bad_value_names_its_variable(monkeypatch: pytest.MonkeyPatch, var: str, value: str, needle: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        Settings.from_env()


def test_booleans_are_true_or_false_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHSERVE_LOG_JSON", "TRUE")
    assert Settings.from_env().log_json is True
    monkeypatch.setenv("MESHSERVE_LOG_JSON", "False")
    assert Settings.from_env().log_json is False


def test_placement_tuning_names_its_variable_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHSERVE_SCALE_UP_RPS", "lots")
    with pytest.raises(SettingsError, match="MESHSERVE_SCALE_UP_RPS='lots'"):
        Tuning.from_env()


def test_the_log_level_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    try:
        monkeypatch.setenv("MESHSERVE_LOG_LEVEL", "warning")
        assert Settings.from_env().log_level == "warning"
        logs.setup("test")
        assert root.level == logging.WARNING
    finally:
        root.setLevel(before[0])
        root.handlers[:] = before[1]

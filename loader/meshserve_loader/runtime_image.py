"""A ServingRuntime's container image, on one machine: a local folder stands in for it.

`meshserve up` pulls no images. A custom runtime's image (the seed's peft-model-server: MLServer
plus the user's MLModel subclass, its requirements and `ENV MLSERVER_MODEL_IMPLEMENTATION=...`)
is named to meshserve by its build folder: MESHSERVE_RUNTIME_IMAGES="<image>=<folder>,...".
From that folder the runtime gets what the image would have given it:

- its own venv, layered on MLServer's (`.venv-mlserver`): a venv whose site-packages points at
  MLServer's by a .pth file, with the folder's requirements.txt installed into it (what the
  image adds wins; what it doesn't need is not installed twice). Made once per requirements
  text (a stamp file), in `<root>/.venv-images/<image slug>`;
- the folder first on PYTHONPATH, so the user's module imports as the image's WORKDIR would;
- the Dockerfile's ENV lines (`ENV K=V ...` or `ENV K V`), under the ServingRuntime's own
  container env, as Kubernetes puts a container's env over its image's. PYTHONPATH from the
  Dockerfile names paths inside the image, so the folder replaces it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

VENVS = ".venv-images"


class RuntimeImageError(RuntimeError):
    pass


def parse_images(spec: str) -> dict[str, Path]:
    """"img=folder,img2=folder2" -> {image: folder}. An image reference may hold ':' and '@',
    never '=' or ','."""
    out: dict[str, Path] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        image, sep, folder = item.partition("=")
        if not sep or not image.strip() or not folder.strip():
            raise RuntimeImageError(f"MESHSERVE_RUNTIME_IMAGES: expected <image>=<folder>, got {item.strip()!r}")
        out[image.strip()] = Path(folder.strip()).expanduser().resolve()
    return out


def dockerfile_env(dockerfile: Path) -> dict[str, str]:
    """The ENV instructions of a Dockerfile, in order (later wins). Line continuations are
    joined; ARG substitution is not done."""
    if not dockerfile.exists():
        return {}
    text = re.sub(r"\\\r?\n", " ", dockerfile.read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"\s*ENV\s+(.*)$", line, re.IGNORECASE)
        if not m:
            continue
        words = shlex.split(m.group(1), comments=False)
        if words and "=" not in words[0]:
            env[words[0]] = " ".join(words[1:])  # the legacy `ENV KEY value with spaces` form
            continue
        for w in words:
            k, _, v = w.partition("=")
            env[k] = v
    return env


@dataclass(frozen=True)
class LocalImage:
    folder: Path
    python: Path  # the runtime's own venv's interpreter: run MLServer's script with it
    env: dict[str, str]


def _slug(image: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", image).strip("_")[:80] or "image"


def ensure_local_image(image: str, folder: Path, base_python: Path | None, root: Path, timeout: float = 900.0) -> LocalImage:
    """The image's venv (made once per requirements text) and env. With `base_python` (an
    MLServer image), the venv is layered on that interpreter's; without (a transformer, whose
    kserve pins its own protobuf), it is a venv of its own with pip."""
    if not folder.is_dir():
        raise RuntimeImageError(f"runtime image {image}: {folder} (MESHSERVE_RUNTIME_IMAGES) is not a folder")
    venv = root / VENVS / _slug(image)
    py = venv / "bin" / "python"
    reqs = folder / "requirements.txt"
    want = hashlib.sha256(f"{base_python}\n{reqs.read_text() if reqs.exists() else ''}".encode()).hexdigest()
    stamp = venv / ".meshserve-installed"
    if not (stamp.exists() and stamp.read_text().strip() == want and py.exists()):
        try:
            if base_python is None:
                if not py.exists():
                    subprocess.run([_python311(), "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
            else:
                if not py.exists():
                    subprocess.run([str(base_python), "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True, timeout=120)
                base_site = _site_packages(base_python)
                Path(_site_packages(py), "meshserve-base.pth").write_text(base_site + "\n")  # MLServer and its deps, after our own
            if reqs.exists():
                    # The base venv's pip (seen through the .pth), installing into this venv, which
                # sees the base's packages as installed: only what is missing or pinned
                # differently lands here.
                subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", str(reqs)], check=True, capture_output=True, text=True, timeout=timeout)
        except subprocess.CalledProcessError as e:
            raise RuntimeImageError(f"runtime image {image}: installing {reqs} into {venv} failed:\n{(e.stderr or '')[-3000:]}") from None
        except subprocess.TimeoutExpired:
            raise RuntimeImageError(f"runtime image {image}: installing {reqs} took over {timeout:g}s") from None
        stamp.write_text(want)
    env = dockerfile_env(folder / "Dockerfile")
    env["PYTHONPATH"] = str(folder)
    return LocalImage(folder, py, env)


def _python311() -> str:
    return shutil.which("python3.11") or shutil.which("python3") or sys.executable


def image_argv(folder: Path, python: Path, command: tuple[str, ...] = (), args: tuple[str, ...] = ()) -> list[str]:
    """What the container runs: its `command` (else the Dockerfile's exec-form ENTRYPOINT), then
    its `args` (else the Dockerfile's CMD, when the command came from there too), as Kubernetes
    combines them. A leading `python`/`python3[.x]` is the image's venv's interpreter."""
    df = _dockerfile_exec(folder / "Dockerfile")
    if command:
        argv = [*command, *args]
    else:
        argv = [*df.get("ENTRYPOINT", []), *(args or df.get("CMD", []))]
    if not argv:
        raise RuntimeImageError(f"{folder}: the container names no command and the Dockerfile has no exec-form ENTRYPOINT/CMD")
    if re.fullmatch(r"python(3(\.\d+)?)?", Path(argv[0]).name):
        argv[0] = str(python)
    return argv


def _dockerfile_exec(dockerfile: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    if dockerfile.exists():
        for line in re.sub(r"\\\r?\n", " ", dockerfile.read_text()).splitlines():
            m = re.match(r"\s*(ENTRYPOINT|CMD)\s+(\[.*\])\s*$", line, re.IGNORECASE)
            if m:
                try:
                    out[m.group(1).upper()] = [str(x) for x in json.loads(m.group(2))]
                except ValueError:
                    pass
    return out


def _site_packages(python: Path) -> str:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True, timeout=60)
    return out.stdout.strip()


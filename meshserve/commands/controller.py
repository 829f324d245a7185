"""`meshserve controller`: cluster mode's input side (InferenceServices from the Kubernetes API)."""

from __future__ import annotations

import asyncio
import signal
import sys

import click


@click.command()
@click.option("--namespace", envvar="MESHSERVE_NAMESPACE", default=None,
              help="Namespace to watch (default: the pod's own, else modelmesh-serving).")
@click.option("--redis-url", envvar="MESHSERVE_REDIS_URL", required=True, help="The mesh's Redis/Valkey.")
@click.option("--kubeconfig", envvar="KUBECONFIG", default=None, help="Outside a pod: the kubeconfig to use.")
@click.option("--context", default=None, help="Outside a pod: the kubeconfig context.")
@click.option("--metrics-port", type=int, default=9090, show_default=True, help="Prometheus /metrics (0: off).")
@click.option("--resync-seconds", type=float, default=10.0, show_default=True,
              help="Status refresh period (copies loaded since the last event).")
@click.option("--scale-to-zero/--no-scale-to-zero", envvar="MESHSERVE_SCALE_TO_ZERO", default=True, show_default=True,
              help="Scale a runtime pool (StatefulSet labelled serving.kserve.io/servingRuntime) to zero pods when no "
                   "InferenceService uses its ServingRuntime, and back to one when one does.")
@click.option("--scale-grace-seconds", envvar="MESHSERVE_SCALE_GRACE_SECONDS", type=float, default=60.0, show_default=True,
              help="How long a ServingRuntime must stay unused before its pool goes to zero.")
def controller(namespace: str | None, redis_url: str, kubeconfig: str | None, context: str | None,
               metrics_port: int, resync_seconds: float, scale_to_zero: bool, scale_grace_seconds: float) -> None:
    """Watch InferenceServices, ServingRuntimes, the storage-config Secret, runtime pods and
    runtime pools; keep the model registry in Redis and each InferenceService's status up to
    date, and scale unused runtime pools to zero."""
    from prometheus_client import start_http_server

    from meshserve import logs
    from meshserve_controller.controller import Controller, api_client, current_namespace
    from meshserve_loader.predict import Predictor
    from meshserve.settings import Settings
    from meshserve.store.state import State

    s = Settings.from_env()
    logs.setup("controller", s.log_json)
    ns = namespace or current_namespace()
    api = api_client(kubeconfig, context)
    if metrics_port:
        start_http_server(metrics_port, addr="0.0.0.0")

    async def main() -> None:
        state = State.from_url(redis_url)
        c = Controller(api, state, ns, resync_seconds=resync_seconds, scale_to_zero=scale_to_zero,
                       scale_grace_seconds=scale_grace_seconds, predict_from=Predictor.from_secret)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # a pod stop is SIGTERM: finish and exit 0
            loop.add_signal_handler(sig, c.stop)
        try:
            await c.run()
        finally:
            await state.close()

    asyncio.run(main())
    sys.exit(0)


COMMANDS = [controller]

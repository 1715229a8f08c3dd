"""`turbofan serve --replicas N`: N engines as Ray Serve replicas behind Ray's one HTTP proxy.

Each replica is a whole turbofan server (create_app: both APIs, its own engine and KV cache) wrapped as a Ray Serve
ingress deployment; Ray's proxy is the one HTTP endpoint and its router sends each request to the replica with
the fewest requests outstanding of two it samples (with 2 replicas: the less busy one). Ray restarts a replica
whose process dies; the requests it had in flight end with an error from the proxy, the others go on. /metrics
on any replica shows every replica's metrics, each sample labelled replica="...": replicas publish their
Prometheus text to a small named actor every few seconds.

On one machine `--replicas N` starts a local Ray; on a cluster, `ray start --head` on one node, `ray start
--address HEAD:6379` on the others, then `turbofan serve --replicas N --ray-address auto` places replicas on any
node (each node needs turbofan installed and the model store at the same TURBOFAN_MODELS path).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time

log = logging.getLogger("turbofan.replicas")
APP_NAME = "turbofan"
BOARD_NAME = "turbofan-metrics"
PUBLISH_SECONDS = 3.0  # Ray's health check period, which is also when a replica publishes its metrics
STALE_SECONDS = 30.0  # a replica that stopped publishing (dead, restarted) drops out of /metrics after this


def labelled(text: str, replica: str) -> list[str]:
    """Prometheus exposition lines with replica="..." added to every sample (comment lines kept as they are)."""
    label = f'replica="{replica}"'
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            out.append(line)
            continue
        name, brace, rest = line.partition("{")
        if brace:
            out.append(f"{name}{{{label},{rest}" if not rest.startswith("}") else f"{name}{{{label}{rest}")
        else:
            name, _, value = line.partition(" ")
            out.append(f"{name}{{{label}}} {value}")
    return out


def merge(texts: dict[str, str]) -> str:
    """One exposition from every replica's: each metric's HELP/TYPE once, then its samples from all replicas."""
    families: dict[str, list[str]] = {}
    order: list[str] = []
    for replica, text in sorted(texts.items()):
        family = ""
        for line in labelled(text, replica):
            m = re.match(r"# (HELP|TYPE) (\S+)", line)
            if m:
                family = m.group(2)
                if family not in families:
                    families[family] = []
                    order.append(family)
                if any(x.startswith(line[:7] + family + " ") for x in families[family]):
                    continue
            elif not line:
                continue
            families.setdefault(family, []).append(line)
            if family not in order:
                order.append(family)
    return "\n".join(line for f in order for line in families[f]) + "\n"


class StartFirst:
    """ASGI middleware that awaits `start()` before the first HTTP request goes through."""

    def __init__(self, app, start):
        self.app, self.start = app, start

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            await self.start()
        await self.app(scope, receive, send)


def _board_class():
    import ray

    @ray.remote(num_cpus=0)
    class MetricsBoard:
        """The latest metrics text of every replica, for whichever replica answers /metrics."""

        def __init__(self) -> None:
            self.texts: dict[str, tuple[float, str]] = {}

        def publish(self, replica: str, text: str) -> None:
            self.texts[replica] = (time.time(), text)

        def collect(self) -> dict[str, str]:
            now = time.time()
            return {r: t for r, (at, t) in self.texts.items() if now - at < STALE_SECONDS}

    return MetricsBoard


def _deployment(num_replicas: int, threads: int):
    from ray import serve

    @serve.deployment(
        name="turbofan",
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": threads, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}}},
        max_ongoing_requests=256,
        health_check_period_s=PUBLISH_SECONDS,
        health_check_timeout_s=60,
    )
    @serve.ingress()
    class TurbofanReplica:
        """One turbofan server (engine + both APIs) as a Ray Serve replica."""

        def __init__(self, config, settings, threads: int):
            import torch
            import transformers.models.auto.tokenization_auto  # noqa: F401

            # (transformers imported here, on the replica's main thread: its lazy module, first touched from the
            # engine thread inside a Ray replica, failed with "cannot import name 'AutoTokenizer'".)
            torch.set_num_threads(threads)
            self.config, self.settings = config, settings
            self.replica = serve.get_replica_context().replica_tag
            self.board = None

        def __serve_build_asgi_app__(self):
            from starlette.responses import Response
            from starlette.routing import Route

            from turbofan.assembly import build_engine
            from turbofan.server import create_app

            app = create_app(lambda: build_engine(self.config), self.settings)
            self.ctx = app.state.ctx

            async def all_metrics(_request) -> Response:
                texts = await self._board().collect.remote()
                texts[self.replica] = self.ctx.metrics.render()[0].decode()
                return Response(merge(texts), media_type="text/plain; version=0.0.4; charset=utf-8")

            app.router.routes.insert(0, Route("/metrics", all_metrics, methods=["GET"]))
            # Ray runs the app's lifespan on an event loop other than the one that serves requests, so the
            # loading task it starts never runs: the engine starts loading on the serving loop, at the first
            # HTTP request (a /health probe included).
            app.add_middleware(StartFirst, start=self._start)
            return app

        async def _start(self) -> None:
            task = self.ctx.state._task
            if task is None or task.get_loop() is not asyncio.get_running_loop():
                await self.ctx.state.start()

        def _board(self):
            if self.board is None:
                import ray

                self.board = ray.get_actor(BOARD_NAME, namespace=APP_NAME)
            return self.board

        def check_health(self) -> None:
            """Ray calls this every few seconds: publish this replica's metrics, and fail (Ray then restarts the
            replica) once the engine loop stopped after an error."""
            try:
                self._board().publish.remote(self.replica, self.ctx.metrics.render()[0].decode())
            except Exception as e:  # noqa: BLE001 (the board may be restarting: the next round publishes)
                log.debug("metrics not published: %s", e)
            client = self.ctx.state.client
            if client is not None and client.dead is not None:
                raise RuntimeError(f"engine stopped: {client.dead}")

    return TurbofanReplica


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def serve_replicas(config, settings, host: str, port: int, replicas: int, address: str | None, threads: int) -> int:
    """Start (or join) Ray, deploy `replicas` turbofan replicas behind Ray Serve's proxy on host:port, and block."""
    import ray
    from ray import serve

    if address:
        ray.init(address=address, namespace=APP_NAME)
    else:  # a local Ray sized for a small machine: no dashboard, a small object store (requests are small)
        ray.init(namespace=APP_NAME, include_dashboard=False, object_store_memory=256 << 20,
                 num_cpus=max(os.cpu_count() or 1, replicas * threads))  # fmt: skip
    _board_class().options(name=BOARD_NAME, lifetime="detached", get_if_exists=True, max_restarts=-1).remote()
    serve.start(http_options={"host": host, "port": port})
    app = _deployment(replicas, threads).bind(config, settings, threads)
    log.info("turbofan replicas", extra={"replicas": replicas, "host": host, "port": port, "ray": address or "local"})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    signal.signal(signal.SIGTERM, _interrupt)  # `docker stop`, Kubernetes: shut down as on Ctrl+C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0

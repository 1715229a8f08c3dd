"""`turbofan serve --replicas N`: N engines as Ray Serve replicas behind one HTTP front that speaks both APIs.

Two Serve deployments in one application: `ingress` (ingress.py, one light replica behind Ray's HTTP proxy) reads
each request, keys it by its prompt prefix (affinity.py) and calls `engine` through a handle whose request router
(router.py) picks the replica: the one with the fewest requests outstanding, or the one the prefix prefers while
that one is not more than a threshold busier. Each `engine` replica is a whole turbofan server (create_app: both
APIs, its own engine and KV cache) that runs the relayed request (relay.py) and streams its answer back. Ray
restarts a replica whose process dies; the requests it had in flight end with an error in their API's format
(ingress.py). /metrics on any replica shows every replica's metrics, each sample labelled replica="...": replicas
publish their Prometheus text to a small named actor every few seconds.

On one machine `--replicas N` starts a local Ray; on a cluster, `ray start --head` on one node, `ray start
--address HEAD:6379` on the others, then `turbofan serve --replicas N --ray-address auto` places replicas on any
node (each node needs turbofan installed and the model store at the same TURBOFAN_MODELS path).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time

from turbofan.distributed.affinity import DEFAULT_THRESHOLD

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


REPLICA_HEADER = "x-turbofan-replica"  # names the engine replica that answered (tests, debugging)


def _engine_deployment(num_replicas: int, threads: int, threshold: int):
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from turbofan.distributed.router import PrefixAffinityRouter

    @serve.deployment(
        name="engine",
        num_replicas=num_replicas,
        ray_actor_options={
            "num_cpus": threads,
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}},
        },
        max_ongoing_requests=256,
        health_check_period_s=PUBLISH_SECONDS,
        health_check_timeout_s=60,
        request_router_config=RequestRouterConfig(
            request_router_class=PrefixAffinityRouter, request_router_kwargs={"threshold": threshold}
        ),
    )
    class EngineReplica:
        """One turbofan server (engine + both APIs) as a Ray Serve replica, called by the ingress."""

        async def __init__(self, config, settings, threads: int):
            import torch
            import transformers.models.auto.tokenization_auto  # noqa: F401
            from starlette.responses import Response
            from starlette.routing import Route
            from uvicorn.config import Config
            from uvicorn.lifespan.on import LifespanOn

            from turbofan.assembly import build_engine
            from turbofan.server import create_app

            # (transformers imported here, on the replica's main thread: its lazy module, first touched from the
            # engine thread inside a Ray replica, failed with "cannot import name 'AutoTokenizer'".)
            torch.set_num_threads(threads)
            self.replica = serve.get_replica_context().replica_tag
            self.board = None
            self.headers = [(REPLICA_HEADER.encode(), self.replica.encode())]
            if settings.debug_endpoints:  # the process to `kill -9` in the tests, to attach py-spy to
                self.headers.append((REPLICA_HEADER.encode() + b"-pid", str(os.getpid()).encode()))
            self.app = create_app(lambda: build_engine(config), settings)
            self.ctx = self.app.state.ctx

            async def all_metrics(_request) -> Response:
                texts = await self._board().collect.remote()
                texts[self.replica] = self.ctx.metrics.render()[0].decode()
                return Response(merge(texts), media_type="text/plain; version=0.0.4; charset=utf-8")

            self.app.router.routes.insert(0, Route("/metrics", all_metrics, methods=["GET"]))
            # The constructor runs on the loop that serves this replica's calls: the app's lifespan starts here, so
            # the model loads while Ray brings the other replicas up.
            self.lifespan = LifespanOn(Config(self.app, lifespan="on", log_config=None))
            await self.lifespan.startup()

        async def http(self, scope: dict, body: bytes, prefix: list[str] | None = None):
            """One HTTP request read by the ingress; yields the app's ASGI messages. (`prefix` is for the router.)"""
            from turbofan.distributed.relay import relay

            async for message in relay(self.app, scope, body, self.headers):
                yield message

        def _board(self):
            if self.board is None:
                import ray

                self.board = ray.get_actor(BOARD_NAME, namespace=APP_NAME)
            return self.board

        async def check_health(self) -> None:
            """Ray calls this every few seconds: publish this replica's metrics, and fail (Ray then restarts the
            replica) once the engine loop stopped after an error."""
            try:
                self._board().publish.remote(self.replica, self.ctx.metrics.render()[0].decode())
            except Exception as e:  # noqa: BLE001 (the board may be restarting: the next round publishes)
                log.debug("metrics not published: %s", e)
            client = self.ctx.state.client
            if client is not None and client.dead is not None:
                raise RuntimeError(f"engine stopped: {client.dead}")

        async def __del__(self) -> None:
            await self.lifespan.shutdown()  # Ray stops the replica: drain and stop the engine

    return EngineReplica


def _ingress_deployment():
    from ray import serve

    @serve.deployment(
        name="ingress", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096
    )
    @serve.ingress()
    class IngressReplica:
        """The HTTP front (ingress.py) as a Ray Serve ingress deployment, calling the engines through `engine`."""

        def __init__(self, engine, settings):
            self.engine, self.settings = engine, settings

        def __serve_build_asgi_app__(self):
            from turbofan.distributed.ingress import Ingress
            from turbofan.server.app import APIKeyMiddleware
            from turbofan.server.boundary import BrowserBoundary

            app = Ingress(
                self._call, _is_replica_death, self.settings.max_request_bytes, self.settings.body_timeout
            )
            # the key, the Host and the Origin are checked before a body is read (the engine replica checks again)
            app = APIKeyMiddleware(app, self.settings.api_key) if self.settings.api_key else app
            return BrowserBoundary(app, self.settings)

        async def _call(self, scope: dict, body: bytes, prefix: list[str]):
            stream = self.engine.options(stream=True).http.remote(scope, body, prefix=prefix)
            try:
                async for message in stream:
                    yield message
            except BaseException:
                stream.cancel()  # the client left (or the replica failed): stop the generation there
                raise

    return IngressReplica


def _is_replica_death(exc: BaseException) -> bool:
    """Whether a failed engine call means the replica's process or node is gone (rather than a bug in it)."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    return isinstance(exc, (RayActorError, ActorUnavailableError))


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def serve_replicas(config, settings, host: str, port: int, replicas: int, address: str | None, threads: int,
                   threshold: int | None = None) -> int:  # fmt: skip
    """Start (or join) Ray, deploy `replicas` engines and the ingress behind Ray Serve's proxy on host:port, and
    block. `threshold`: see affinity.choose (None: DEFAULT_THRESHOLD; negative: no affinity)."""
    import ray
    from ray import serve

    if address:
        ray.init(address=address, namespace=APP_NAME)
    else:  # a local Ray sized for a small machine: no dashboard, a small object store (requests are small)
        ray.init(namespace=APP_NAME, include_dashboard=False, object_store_memory=256 << 20,
                 num_cpus=max(os.cpu_count() or 1, replicas * threads))  # fmt: skip
    _board_class().options(name=BOARD_NAME, lifetime="detached", get_if_exists=True, max_restarts=-1).remote()
    serve.start(http_options={"host": host, "port": port})
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    engine = _engine_deployment(replicas, threads, threshold).bind(config, settings, threads)
    app = _ingress_deployment().bind(engine, settings)
    log.info(
        "turbofan replicas",
        extra={"replicas": replicas, "host": host, "port": port, "ray": address or "local"},
    )
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

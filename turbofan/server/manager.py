"""ModelManager: several models in one server, loaded on demand, kept under a memory budget, as Ollama does.

The server names a model in every request; the manager turns that name into a loaded EngineClient:

- the model given on the command line (the *primary*) starts loading with the server and answers to its served
  names; any other model already in the store loads on its first request, named by its store name (never a
  path: a request does not pull, convert or read anything outside the store; an absent model is Ollama's 404,
  the same for every kind of absent). Requests for a model that is still loading wait for it (one load, many
  waiters).
- before a load, its memory need (weights + KV cache + runtime, estimated from the config: model/footprint.py)
  is checked against `--memory-budget` and `--max-loaded-models`; the least recently used *idle* model is
  evicted to make room, never one with requests in flight. A model that cannot fit even alone is refused with
  the numbers; one that cannot fit because busy models hold the memory is a 503 to retry.
- keep_alive (Ollama's semantics, per request or `--keep-alive` by default): how long a model stays loaded after
  its last request ends; negative = forever, 0 = unload as soon as it is idle. The primary model stays loaded
  until a request says otherwise.

A request holds a *lease* on its model from the moment it resolves the name until its HTTP response has been
sent (LeaseMiddleware releases it), which is what "in flight" means for eviction. Each engine keeps its own
thread (AsyncEngine); the manager only decides which engines exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import re
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from turbofan.model.footprint import Footprint
from turbofan.server.errors import APIError, bad_request, model_not_found
from turbofan.server.limits import MAX_KEEP_ALIVE_SECONDS
from turbofan.server.state import EngineSource, EngineState

log = logging.getLogger("turbofan.server")
GIB = 1 << 30

# The models this HTTP request holds (set per request by LeaseMiddleware; a mutable list so child tasks share it).
_LEASES: ContextVar[list | None] = ContextVar("turbofan_leases", default=None)


# -- keep_alive -----------------------------------------------------------------------------------------------------
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float | None:
    """Ollama's keep_alive in seconds: a number of seconds or a Go duration ("5m", "1h30m", "-1"); any negative
    value means forever (math.inf); None means "not given". Beyond ten years either way (or not finite) it is a
    400: the expiry it sets must stay a timestamp /api/ps can print."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise bad_request(f"keep_alive must be a duration or a number of seconds, got {value!r}", "keep_alive")
    if isinstance(value, int | float):
        seconds = float(value) if not isinstance(value, int) or abs(value) < 1 << 64 else math.inf  # no OverflowError
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise bad_request(
                    f'keep_alive {value!r} is not a duration: use seconds (300) or a Go duration ("5m", "1h", "-1")',
                    "keep_alive",
                ) from None
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise bad_request(f"keep_alive must be a duration or a number of seconds, got {value!r}", "keep_alive")
    if not abs(seconds) <= MAX_KEEP_ALIVE_SECONDS:  # NaN too
        raise bad_request(f"keep_alive must be within ten years either way ({MAX_KEEP_ALIVE_SECONDS:.0f} s; "
                          f"negative: forever), got {str(value)[:40]}", "keep_alive")  # fmt: skip
    return math.inf if seconds < 0 else seconds


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


# -- what is resident ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResidentModel:
    """One model the server holds, as /api/ps and the dashboard show it (a snapshot; times are epoch seconds)."""

    name: str
    path: str
    kind: str  # "completion" or "embedding"
    status: str  # "loading" or "ready"
    size_bytes: int  # measured once loaded (weights + KV cache + runtime estimate); the estimate while loading
    context_length: int
    in_flight: int  # HTTP requests holding the model now
    loaded_at: float | None
    last_used: float
    expires_at: float | None  # None: never (keep_alive negative, or a request is in flight)
    load_seconds: float | None


@dataclass
class _Slot:
    """One model the manager holds: its engine state, its names and its lifetime bookkeeping."""

    key: str  # the store's name (or the primary's first served name)
    path: str
    kind: str
    state: EngineState
    footprint: Footprint  # estimated from the config; weights and KV cache are measured once loaded
    keep_alive: float  # seconds after the last request ends; math.inf: forever
    names: set[str] = field(default_factory=set)
    active: int = 0
    last_used: float = field(default_factory=time.time)
    idle_since: float | None = None
    unloading: bool = False

    @property
    def client(self):
        return self.state.client

    @property
    def ready(self) -> bool:
        return self.state.ready

    @property
    def size(self) -> int:
        client = self.state.client
        if client is None:
            return self.footprint.total
        return int(client.info.weights_bytes + client.info.kv_cache_bytes + self.footprint.runtime)

    @property
    def expires_at(self) -> float | None:
        if self.active or self.idle_since is None or math.isinf(self.keep_alive):
            return None
        return self.idle_since + self.keep_alive

    def snapshot(self) -> ResidentModel:
        client = self.state.client
        return ResidentModel(
            name=self.key,
            path=self.path,
            kind=self.kind,
            status="ready" if client is not None else "loading",
            size_bytes=self.size,
            context_length=client.info.max_model_len if client is not None else 0,
            in_flight=self.active,
            loaded_at=self.state.ready_at,
            last_used=self.last_used,
            expires_at=self.expires_at,
            load_seconds=self.state.load_seconds,
        )


# A factory for models other than the primary: (directory, name) -> (an EngineSource, its kind, its Footprint:
# model/footprint.py). None: this server serves its primary model only.
EngineFactory = Callable[[Path, str], tuple[EngineSource, str, Footprint]]


class ModelManager:
    def __init__(
        self,
        primary: EngineSource,
        settings,
        factory: EngineFactory | None = None,
        store_factory: Callable[[], Any] | None = None,
    ):
        self.settings = settings
        self.factory = factory
        self._store_factory = store_factory
        self.max_loaded = max(1, settings.max_loaded_models)
        self.budget = int(settings.memory_budget_bytes or 0.8 * psutil.virtual_memory().available)
        self.default_keep_alive = parse_keep_alive(settings.keep_alive)
        if self.default_keep_alive is None:
            self.default_keep_alive = 300.0
        primary_names = list(settings.served_model_names)
        self.primary_source = primary
        self.primary = self._new_slot(primary_names[0] if primary_names else "", "", "completion", primary, Footprint(0, 0, 0))
        self.primary.keep_alive = math.inf  # the model the server was started with stays until told otherwise
        self.primary.names.update(primary_names)
        self._slots: list[_Slot] = [self.primary] if primary is not None else []  # None: every model on demand
        self._lock = asyncio.Lock()
        self._reaper: asyncio.Task | None = None
        self.unloads: list[tuple[str, float]] = []  # (name, seconds), for logs and the benchmark

    def _new_slot(self, key: str, path: str, kind: str, source: EngineSource, footprint: Footprint) -> _Slot:
        state = EngineState(source, self.settings.max_waiting, self.settings.stats_interval)
        return _Slot(key, path, kind, state, footprint, self.default_keep_alive, {key} if key else set())

    # -- lifecycle ------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.primary in self._slots:
            await self.primary.state.start()
            asyncio.create_task(self._learn_primary_names(self.primary))
        self._reaper = asyncio.create_task(self._reap(), name="turbofan-keep-alive")

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(BaseException):
                await self._reaper
        for slot in list(self._slots):
            await slot.state.stop()
        self._slots.clear()

    async def _learn_primary_names(self, slot: _Slot) -> None:
        with contextlib.suppress(BaseException):
            await slot.state._ready.wait()
        client = slot.client
        if client is not None and not slot.path:
            slot.names.update({client.info.name, client.info.root})
            slot.key = slot.key or client.info.name
            slot.path = client.info.path
            if self.factory is not None:  # its runtime allowance, as any other model's
                with contextlib.suppress(Exception):
                    slot.footprint = (await asyncio.to_thread(self.factory, Path(slot.path), slot.key))[2]

    async def _reap(self) -> None:
        """Unload idle models whose keep_alive has run out."""
        while True:
            await asyncio.sleep(0.25)
            now = time.time()
            for slot in list(self._slots):
                expires = slot.expires_at
                if expires is not None and expires <= now and slot.ready and not slot.unloading:
                    await self.unload(slot)

    # -- names ----------------------------------------------------------------------------------------------------
    @property
    def store(self):
        return self._store_factory() if self._store_factory is not None else None

    @staticmethod
    def spellings(name: str) -> set[str]:
        """`name` and what Ollama treats as the same name (`x` = `x:latest`, a catalogue family = its default tag)."""
        out = {name}
        base, _, tag = name.partition(":")
        if tag == "latest":
            out.add(base)
        with contextlib.suppress(Exception):
            from turbofan.store import catalogue_name

            full = catalogue_name(name)
            if full:
                out.add(full)
        return out

    def find(self, name: str | None) -> _Slot | None:
        """The slot that answers to `name` (None or "": the primary), without loading anything."""
        if not name:
            return self.primary if self.primary in self._slots else None
        spellings = self.spellings(name)
        for slot in self._slots:
            if slot.names & spellings:
                return slot
        return None

    def is_primary_name(self, name: str | None) -> bool:
        return not name or bool(self.primary.names & self.spellings(name))

    # -- acquiring a model for a request ---------------------------------------------------------------------------
    async def acquire(self, name: str | None, keep_alive: Any = None, need: str | None = "completion") -> _Slot:
        """The loaded model for `name`, held by this request (released when its response is sent).

        `need`: the capability the route uses ("completion" or "embedding"); a model without it is a 400
        (CAPABILITIES)."""
        keep = parse_keep_alive(keep_alive)
        slot = await self._slot_for(name)
        slot.active += 1
        slot.last_used = time.time()
        leases = _LEASES.get()
        if leases is not None:
            leases.append(slot)
        try:
            await slot.state.wait()
            if slot.state.client is not None and slot.state.client.dead is not None:
                raise APIError(503, f"the engine of {slot.key} stopped: {slot.client.dead}", code="engine_dead")
        except BaseException:
            if leases is None:
                self.release(slot)
            raise
        if keep is not None:
            slot.keep_alive = keep
        if need is not None and need not in CAPABILITIES[slot.kind]:
            what = "generate" if need == "completion" else "embeddings"
            raise bad_request(f'"{name or slot.key}" does not support {what}: it is {_kind_phrase(slot.kind)}', "model")
        return slot

    def release(self, slot: _Slot) -> None:
        slot.active = max(0, slot.active - 1)
        slot.last_used = time.time()
        if slot.active == 0:
            slot.idle_since = slot.last_used
            if slot.keep_alive == 0 and not slot.unloading and slot in self._slots:
                asyncio.get_running_loop().create_task(self.unload(slot))

    def current(self) -> _Slot | None:
        """The model this request acquired last (what start_generation runs on)."""
        leases = _LEASES.get()
        return leases[-1] if leases else None

    async def _slot_for(self, name: str | None) -> _Slot:
        slot = self.find(name)
        if slot is not None:
            return slot
        if not self.primary.ready and self.primary in self._slots:
            await self.primary.state._ready.wait()  # its own name (config or path) is known once loaded
            await self._learn_primary_names(self.primary)
            slot = self.find(name)
            if slot is not None:
                return slot
        if not name:  # the primary was unloaded: load it again
            return await self._admit(self.primary.key, self.primary.path, None)
        if self.is_primary_name(name):
            return await self._admit(self.primary.key, self.primary.path, None)
        if self.factory is None or self.store is None:
            raise model_not_found(name)
        resolved = await self._resolve(name)
        slot = self.find(resolved.name) or next((s for s in self._slots if s.path == str(resolved.path)), None)
        if slot is not None:
            slot.names.add(name)
            return slot
        return await self._admit(resolved.name, str(resolved.path), name)

    async def _resolve(self, name: str):
        """The store's entry for a request's model name. Names only, and only what is installed: a request never
        makes the server read a path it names, pull or convert (pulls come from /api/pull alone), and every kind of
        absent gets the same 404, so the answer says nothing about the server's disk."""
        from turbofan.store.errors import StoreError
        from turbofan.store.names import is_name

        if not is_name(name):
            raise model_not_found(name)
        try:
            return await asyncio.to_thread(self.store.resolve, name, pull_missing=False, progress=False,
                                           allow_paths=False)  # fmt: skip
        except StoreError as exc:
            log.info("model not served", extra={"model": name, "why": str(exc).splitlines()[0]})
            raise model_not_found(name) from None

    async def _admit(self, key: str, path: str, alias: str | None) -> _Slot:
        """Make room (evicting idle models, least recently used first) and start loading."""
        async with self._lock:
            slot = self.find(alias or key) if (alias or key) else None
            if slot is not None:  # someone else admitted it while we waited for the lock
                return slot
            primary = key == self.primary.key and path == self.primary.path
            if primary:
                source, kind, footprint = self.primary_source, "completion", self.primary.footprint
            else:
                source, kind, footprint = await asyncio.to_thread(self.factory, Path(path), key)
            await self._make_room(key, footprint)
            if primary:
                slot = self.primary
                slot.state = EngineState(source, self.settings.max_waiting, self.settings.stats_interval)
                slot.unloading, slot.idle_since = False, None
            else:
                slot = self._new_slot(key, path, kind, source, footprint)
                if alias:
                    slot.names.add(alias)
            self._slots.append(slot)
            log.info("loading model", extra={"model": key, "estimate_gib": round(footprint.total / GIB, 3)})
            await slot.state.start()
        asyncio.create_task(self._settle(slot))
        return slot

    async def _settle(self, slot: _Slot) -> None:
        """Once a load ends: a failed model leaves the table (a later request tries again)."""
        with contextlib.suppress(BaseException):
            await slot.state._ready.wait()
        if slot.client is None and slot is not self.primary and slot in self._slots:
            self._slots.remove(slot)

    async def _make_room(self, key: str, footprint: Footprint) -> None:
        need = footprint.total
        if need > self.budget:
            raise APIError(
                507,
                f"model {key} needs {gib(need)} of memory ({footprint.describe()}) but the memory budget is {gib(self.budget)} "
                "(--memory-budget): use a smaller model or a smaller context (--max-model-len, --kv-cache-memory)",
                code="insufficient_memory",
            )
        while True:
            used = sum(s.size for s in self._slots)
            if len(self._slots) < self.max_loaded and used + need <= self.budget:
                return
            idle = sorted((s for s in self._slots if s.active == 0 and s.ready and not s.unloading),
                          key=lambda s: s.last_used)  # fmt: skip
            if not idle:
                busy = ", ".join(f"{s.key} ({gib(s.size)}, {s.active} in flight)" for s in self._slots)
                raise APIError(
                    503,
                    f"cannot load {key} ({gib(need)}) now: {len(self._slots)} of {self.max_loaded} models loaded, "
                    f"{gib(used)} of the {gib(self.budget)} budget in use by models with requests in flight: "
                    f"{busy}; retry later",
                    code="models_busy",
                    headers={"Retry-After": "1"},
                )
            victim = idle[0]
            log.info("evicting model", extra={"model": victim.key, "for": key, "used_gib": round(used / GIB, 3)})
            await self.unload(victim)

    async def unload(self, slot_or_name: _Slot | str) -> bool:
        """Stop a model's engine and free its memory; False if it is not loaded (or busy)."""
        slot = self.find(slot_or_name) if isinstance(slot_or_name, str) else slot_or_name
        if slot is None or slot not in self._slots or slot.active or slot.unloading:
            return False
        slot.unloading = True
        self._slots.remove(slot)
        t0 = time.perf_counter()
        await slot.state.stop()
        slot.state.client = None
        gc.collect()
        seconds = time.perf_counter() - t0
        self.unloads.append((slot.key, seconds))
        log.info("unloaded model", extra={"model": slot.key, "seconds": round(seconds, 3)})
        return True

    # -- what the APIs and the dashboard read ---------------------------------------------------------------------
    def resident(self) -> list[ResidentModel]:
        """The models held now (loading or ready), most recently used first: /api/ps and the dashboard read this."""
        return [s.snapshot() for s in sorted(self._slots, key=lambda s: s.last_used, reverse=True)]

    def clients(self) -> list[tuple[str, Any]]:
        """(name, EngineClient) of every loaded text-generation model, for the metrics collector."""
        return [(s.key, s.client) for s in self._slots if s.client is not None and s.kind == "completion"]

    def used_bytes(self) -> int:
        return sum(s.size for s in self._slots)


# What each kind of model serves: a text-generation model also embeds (its last token's final hidden state, as
# Ollama's /api/embed allows for any model: engine/hidden_states.py); an embedding model only embeds.
CAPABILITIES = {"completion": ("completion", "embedding"), "embedding": ("embedding",)}


def _kind_phrase(kind: str) -> str:
    return "an embedding model" if kind == "embedding" else "a text-generation model"


class LeaseMiddleware:
    """Gives each HTTP request a lease list and releases its models once the response has been sent (streams
    included), so a model is never evicted while a request is using it."""

    def __init__(self, app, manager_of: Callable[[], ModelManager]):
        self.app = app
        self.manager_of = manager_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        leases: list = []
        token = _LEASES.set(leases)
        try:
            await self.app(scope, receive, send)
        finally:
            _LEASES.reset(token)
            manager = self.manager_of()
            for slot in leases:
                manager.release(slot)

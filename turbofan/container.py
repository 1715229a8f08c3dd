"""A small component container with Spring's three-level singleton cache.

The engine's parts (scheduler, block manager, model runner, ...) refer to each other, sometimes
in both directions.  Rather than hand-wiring them in a fixed order, each part is registered here
by name and the container builds them on first ``get``, resolving references by name.

Singletons are built the way Spring builds them, so that a cycle through attribute injection
resolves and a component that a post-processor proxies is the *same* proxy everywhere:

* ``singleton_objects`` (level 1): finished components.
* ``early_singleton_objects`` (level 2): early references already handed out during a cycle.
* ``singleton_factories`` (level 3): for each component under construction, a callable that makes
  its early reference (running the post-processors' ``early_reference``, which may proxy it).
  It is only called when a cycle actually needs the component early, and at most once.

Lifecycle of one component: instantiate -> expose the early-reference factory (level 3) ->
inject properties -> aware callbacks (``set_component_name``, ``set_container``) -> every
post-processor's ``before_init`` -> ``@post_construct`` methods -> ``after_properties_set()`` ->
``init_method`` -> every post-processor's ``after_init`` -> level 1.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, TypeVar

__all__ = [
    "CircularDependencyError",
    "ComponentCreationError",
    "ComponentError",
    "Container",
    "RawInjectionError",
    "UnknownComponentError",
    "Value",
    "post_construct",
]

log = logging.getLogger(__name__)

Scope = Literal["singleton", "prototype"]
F = TypeVar("F", bound=Callable[..., Any])

_MISSING: Any = object()  # a component may legitimately be None, so "absent" needs its own marker
_POST_CONSTRUCT = "__turbofan_post_construct__"


class ComponentError(Exception):
    """Base of every error the container raises, so callers can catch them all at once."""


class UnknownComponentError(ComponentError, LookupError):
    """A name was asked for (directly or as a dependency) that nobody registered."""


class CircularDependencyError(ComponentError):
    """A cycle that cannot be broken: through constructor arguments or through prototypes."""


class RawInjectionError(ComponentError):
    """A component was handed out early in a cycle, then ``after_init`` replaced it with another object."""


class ComponentCreationError(ComponentError):
    """A factory, property injection or init step raised; the original error is ``__cause__``."""

    def __init__(self, message: str, name: str, path: list[str]) -> None:
        super().__init__(message)
        self.name = name
        self.path = path


@dataclass(frozen=True)
class Value:
    """A literal argument or property, injected as is instead of being looked up by name."""

    value: Any


def post_construct(method: F) -> F:
    """Mark a method to run after injection and ``before_init``, like Java's ``@PostConstruct``."""
    setattr(method, _POST_CONSTRUCT, True)
    return method


Ref = str | Value


@dataclass
class _Definition:
    factory: Callable[..., Any]
    args: list[Ref] = field(default_factory=list)
    kwargs: dict[str, Ref] = field(default_factory=dict)
    properties: dict[str, Ref] = field(default_factory=dict)
    scope: Scope = "singleton"
    init_method: str | None = None
    destroy_method: str | None = None


class Container:
    """Builds named components on demand and tears the singletons down in reverse order on ``close``.

    ``get`` is thread-safe: one re-entrant lock serialises creation, so concurrent first calls
    build exactly one instance; finished singletons are returned without taking the lock.
    """

    def __init__(self) -> None:
        self._definitions: dict[str, _Definition] = {}
        self._singletons: dict[str, Any] = {}
        self._early: dict[str, Any] = {}
        self._factories: dict[str, Callable[[], Any]] = {}
        self._post_processors: list[Any] = []
        self._path: list[str] = []  # components being created right now, outermost first
        self._dependents: dict[str, set[str]] = {}  # name -> components that were handed it
        self._created: list[tuple[str, Any]] = []  # (name, raw object) in creation order
        self._lock = threading.RLock()
        self._closed = False

    # -- the three caches, read-only live views ----------------------------------------------

    @property
    def singleton_objects(self) -> Mapping[str, Any]:
        return MappingProxyType(self._singletons)

    @property
    def early_singleton_objects(self) -> Mapping[str, Any]:
        return MappingProxyType(self._early)

    @property
    def singleton_factories(self) -> Mapping[str, Callable[[], Any]]:
        return MappingProxyType(self._factories)

    # -- registration ------------------------------------------------------------------------

    def register(
        self,
        name: str,
        factory: Callable[..., Any],
        *,
        args: Iterable[Ref] = (),
        kwargs: Mapping[str, Ref] | None = None,
        properties: Mapping[str, Ref] | None = None,
        scope: Scope = "singleton",
        init_method: str | None = None,
        destroy_method: str | None = None,
    ) -> None:
        """Register a class or any callable; ``args``/``kwargs``/``properties`` name other components."""
        if isinstance(args, str):
            raise ComponentError(f"component {name!r}: args must be a list of names, not the string {args!r}")
        if not callable(factory):
            raise ComponentError(f"factory for component {name!r} is not callable: {factory!r}")
        if scope not in ("singleton", "prototype"):
            raise ComponentError(
                f"component {name!r}: scope must be 'singleton' or 'prototype', not {scope!r}"
            )
        definition = _Definition(
            factory,
            list(args),
            dict(kwargs or {}),
            dict(properties or {}),
            scope,
            init_method,
            destroy_method,
        )
        with self._lock:
            self._check_new_name(name)
            self._definitions[name] = definition

    def register_instance(self, name: str, obj: Any, *, destroy_method: str | None = None) -> None:
        """Register a ready-made object: it goes straight to level 1 and skips the lifecycle."""
        with self._lock:
            self._check_new_name(name)
            self._definitions[name] = _Definition(lambda: obj, destroy_method=destroy_method)
            self._singletons[name] = obj
            self._created.append((name, obj))

    def add_post_processor(self, post_processor: Any) -> None:
        """Add a hook object; it may define ``before_init``, ``after_init`` and ``early_reference``.

        Each is called as ``method(obj, name)`` and returns the object to use from then on
        (returning None keeps the object unchanged).  One that proxies in ``after_init`` should
        also proxy in ``early_reference`` and remember which names it already wrapped there, so a
        component referenced early through a cycle is proxied exactly once.
        """
        with self._lock:
            self._post_processors.append(post_processor)

    def _check_new_name(self, name: str) -> None:
        """Refuse silent overrides: two parts registered under one name is almost always a bug."""
        if not isinstance(name, str) or not name:
            raise ComponentError(f"component name must be a non-empty string, not {name!r}")
        if name in self._definitions:
            raise ComponentError(f"component {name!r} is already registered")
        if self._closed:
            raise ComponentError(f"container is closed; cannot register {name!r}")

    def __contains__(self, name: object) -> bool:
        return name in self._definitions

    def names(self) -> list[str]:
        return list(self._definitions)

    # -- lookup ------------------------------------------------------------------------------

    def get(self, name: str) -> Any:
        """Return the component called ``name``, creating it (and what it needs) on first use."""
        obj = self._singletons.get(name, _MISSING)
        if obj is not _MISSING:
            return obj
        with self._lock:
            if self._closed:
                raise ComponentError(f"container is closed; cannot get {name!r}")
            return self._resolve(name)

    def _resolve(self, name: str) -> Any:
        definition = self._definitions.get(name)
        if definition is None:
            needed_by = f" (needed by {' -> '.join(self._path)})" if self._path else ""
            registered = ", ".join(sorted(self._definitions)) or "nothing"
            raise UnknownComponentError(f"unknown component {name!r}{needed_by}; registered: {registered}")
        obj = self._get_singleton(name) if definition.scope == "singleton" else _MISSING
        if obj is _MISSING:
            if name in self._path:  # being built, and no early reference can stand in for it
                cycle = " -> ".join([*self._path, name])
                raise CircularDependencyError(
                    f"circular dependency {cycle}: a cycle through constructor arguments or "
                    "prototypes cannot be resolved; inject one side as a property of a singleton"
                )
            obj = self._create(name, definition)
        if self._path:
            self._dependents.setdefault(name, set()).add(self._path[-1])
        return obj

    def _get_singleton(self, name: str) -> Any:
        """Spring's getSingleton: level 1, then (only while in creation) level 2, then level 3."""
        obj = self._singletons.get(name, _MISSING)
        if obj is _MISSING and name in self._path:
            obj = self._early.get(name, _MISSING)
            factory = self._factories.get(name)
            if obj is _MISSING and factory is not None:
                obj = factory()
                self._early[name] = obj
                del self._factories[name]
        return obj

    # -- creation ----------------------------------------------------------------------------

    def _create(self, name: str, definition: _Definition) -> Any:
        singleton = definition.scope == "singleton"
        self._path.append(name)
        try:
            args = [self._value(ref) for ref in definition.args]
            kwargs = {key: self._value(ref) for key, ref in definition.kwargs.items()}
            instance = self._guarded(name, "instantiating", lambda: definition.factory(*args, **kwargs))
            if singleton:
                self._factories[name] = lambda: self._post_process("early_reference", instance, name)
            exposed = self._guarded(
                name, "initialising", lambda: self._initialise(name, definition, instance)
            )
            if singleton:
                exposed = self._check_early_reference(name, instance, exposed)
                self._singletons[name] = exposed
                self._early.pop(name, None)
                self._factories.pop(name, None)
                self._created.append((name, instance))
            return exposed
        except BaseException:
            if singleton:
                self._early.pop(name, None)
                self._factories.pop(name, None)
                self._evict_holders_of(name)
            raise
        finally:
            self._path.pop()

    def _guarded(self, name: str, step: str, action: Callable[[], Any]) -> Any:
        """Run a user-code step; wrap its errors with the component's name and creation path."""
        try:
            return action()
        except ComponentError:
            raise  # already names the component it is about
        except Exception as exc:
            path = list(self._path)
            raise ComponentCreationError(
                f"error {step} component {name!r} (creating {' -> '.join(path)}): {type(exc).__name__}: {exc}",
                name,
                path,
            ) from exc

    def _initialise(self, name: str, definition: _Definition, instance: Any) -> Any:
        for attr, ref in definition.properties.items():
            setattr(instance, attr, self._value(ref))
        _call_if_defined(instance, "set_component_name", name)
        _call_if_defined(instance, "set_container", self)
        obj = self._post_process("before_init", instance, name)
        for method_name in _post_construct_names(obj):
            getattr(obj, method_name)()
        _call_if_defined(obj, "after_properties_set")
        if definition.init_method and not (
            definition.init_method == "after_properties_set"
            and callable(getattr(obj, "after_properties_set", None))
        ):
            getattr(obj, definition.init_method)()
        return self._post_process("after_init", obj, name)

    def _check_early_reference(self, name: str, instance: Any, exposed: Any) -> Any:
        """Make the finished component the one already handed out early, or fail if it cannot be."""
        early = self._early.get(name, _MISSING)
        if early is _MISSING:
            return exposed
        if exposed is instance:  # after_init left it alone: the early reference (maybe a proxy) wins
            return early
        holders = ", ".join(sorted(self._dependents.get(name, ()))) or "others"
        raise RawInjectionError(
            f"component {name!r} has been injected into other components ({holders}) in its raw version "
            "as part of a circular reference, but has eventually been wrapped by a post-processor's "
            "after_init; a post-processor that wraps in after_init must also wrap in early_reference "
            "and not wrap again what it already wrapped there"
        )

    def _post_process(self, hook: str, obj: Any, name: str) -> Any:
        for post_processor in self._post_processors:
            method = getattr(post_processor, hook, None)
            if method is not None:
                result = method(obj, name)
                obj = obj if result is None else result
        return obj

    def _value(self, ref: Ref) -> Any:
        return ref.value if isinstance(ref, Value) else self._resolve(ref)

    def _evict_holders_of(self, name: str) -> None:
        """Drop finished singletons that hold (even indirectly) the half-made ``name``, so a later
        ``get`` rebuilds them instead of serving objects wired to a component that never finished."""
        doomed: set[str] = set()
        pending = [name]
        while pending:
            for holder in self._dependents.pop(pending.pop(), ()):
                if holder not in doomed:
                    doomed.add(holder)
                    pending.append(holder)
        evicted = [(n, raw) for n, raw in self._created if n in doomed]
        self._created = [(n, raw) for n, raw in self._created if n not in doomed]
        for holder, raw in reversed(evicted):
            del self._singletons[holder]
            log.warning(
                "discarding component %r: it holds (maybe indirectly) %r, whose creation failed", holder, name
            )
            self._destroy(holder, raw)

    # -- shutdown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Call destroy methods in reverse creation order; later ``get`` calls raise."""
        with self._lock:
            created, self._created = self._created, []
            for name, raw in reversed(created):
                self._destroy(name, raw)
            self._singletons.clear()
            self._early.clear()
            self._factories.clear()
            self._dependents.clear()
            self._closed = True

    def _destroy(self, name: str, raw: Any) -> None:
        """Destroy on the raw object (as Spring does), so a proxy does not see the call; errors
        are logged, not raised, so one bad component does not stop the others being closed."""
        method = self._definitions[name].destroy_method
        if method is None:
            return
        try:
            getattr(raw, method)()
        except Exception:
            log.exception("error destroying component %r (%s)", name, method)


def _call_if_defined(obj: Any, method_name: str, *args: Any) -> None:
    method = getattr(obj, method_name, None)
    if callable(method):
        method(*args)


def _post_construct_names(obj: Any) -> list[str]:
    """Names of ``@post_construct`` methods, base classes first; an unmarked override disables one."""
    cls = type(obj)
    names: list[str] = []
    for klass in reversed(cls.__mro__):
        for attr, value in vars(klass).items():
            if getattr(value, _POST_CONSTRUCT, False) and attr not in names:
                names.append(attr)
    return [attr for attr in names if getattr(getattr(cls, attr, None), _POST_CONSTRUCT, False)]

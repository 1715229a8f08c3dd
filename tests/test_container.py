"""Tests for turbofan.container: the seed's three-level-cache scenarios, lifecycle and failure modes."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from turbofan.container import (
    CircularDependencyError,
    ComponentCreationError,
    ComponentError,
    Container,
    RawInjectionError,
    UnknownComponentError,
    Value,
    post_construct,
)


class Bean:
    """A plain component; properties are set on it by the container."""


class Proxy:
    """Stands in for a target, forwarding attribute reads, as an AOP proxy would."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.target, attr)


class ProxyingPostProcessor:
    """Proxies the named components, early if a cycle needs them early, and never twice."""

    def __init__(self, *names: str) -> None:
        self.names = set(names)
        self.made: list[str] = []
        self._early: set[str] = set()

    def _wrap(self, obj: Any, name: str) -> Any:
        self.made.append(name)
        return Proxy(obj)

    def early_reference(self, obj: Any, name: str) -> Any:
        if name not in self.names:
            return obj
        self._early.add(name)
        return self._wrap(obj, name)

    def after_init(self, obj: Any, name: str) -> Any:
        if name not in self.names or name in self._early:
            return obj
        return self._wrap(obj, name)


class LateWrappingPostProcessor:
    """Wraps only in after_init: wrong when the component was handed out early."""

    def after_init(self, obj: Any, name: str) -> Any:
        return Proxy(obj) if name == "a" else obj


def cycle(c: Container) -> None:
    c.register("a", Bean, properties={"b": "b"})
    c.register("b", Bean, properties={"a": "a"})


def assert_no_half_made(c: Container) -> None:
    assert dict(c.early_singleton_objects) == {}
    assert dict(c.singleton_factories) == {}


def test_property_cycle_resolves() -> None:
    c = Container()
    cycle(c)
    a = c.get("a")
    b = c.get("b")
    assert a.b is b
    assert b.a is a
    assert dict(c.singleton_objects) == {"a": a, "b": b}
    assert_no_half_made(c)


def test_caches_during_cycle_follow_the_walk_through() -> None:
    # While b is initialised, a has been fetched through its level-3 factory and moved to level 2.
    c = Container()
    seen: dict[str, Any] = {}

    class B(Bean):
        def set_component_name(self, name: str) -> None:
            seen["early"] = set(c.early_singleton_objects)
            seen["factories"] = set(c.singleton_factories)
            seen["finished"] = set(c.singleton_objects)

    c.register("a", Bean, properties={"b": "b"})
    c.register("b", B, properties={"a": "a"})
    c.get("a")
    assert seen == {"early": {"a"}, "factories": {"b"}, "finished": set()}


def test_cycle_with_proxy_gives_one_proxy_everywhere() -> None:
    c = Container()
    pp = ProxyingPostProcessor("a")
    c.add_post_processor(pp)
    cycle(c)
    a = c.get("a")
    b = c.get("b")
    assert isinstance(a, Proxy)
    assert b.a is a
    assert a.target.b is b
    assert pp.made == ["a"]
    assert_no_half_made(c)


def test_proxy_without_cycle_is_made_in_after_init() -> None:
    c = Container()
    pp = ProxyingPostProcessor("a")
    c.add_post_processor(pp)
    c.register("a", Bean)
    a = c.get("a")
    assert isinstance(a, Proxy) and isinstance(a.target, Bean)
    assert pp.made == ["a"]
    assert dict(c.early_singleton_objects) == {}


def test_raw_then_wrapped_is_an_error_naming_the_component() -> None:
    c = Container()
    c.add_post_processor(LateWrappingPostProcessor())
    cycle(c)
    with pytest.raises(RawInjectionError, match=r"'a'.*\(b\).*raw version"):
        c.get("a")
    # b was finished holding the raw a: it must not survive a's failure.
    assert dict(c.singleton_objects) == {}
    assert_no_half_made(c)


def test_constructor_cycle_names_its_path() -> None:
    c = Container()
    c.register("x", Bean, properties={"a": "a"})
    c.register("a", lambda b: Bean(), args=["b"])
    c.register("b", lambda a: Bean(), args=["a"])
    with pytest.raises(CircularDependencyError, match="x -> a -> b -> a"):
        c.get("x")
    assert dict(c.singleton_objects) == {}
    assert_no_half_made(c)


def test_constructor_arg_on_one_side_of_a_property_cycle_resolves() -> None:
    # a is instantiated first and exposed early, so b may take it as a constructor argument.
    c = Container()

    class B:
        def __init__(self, a: Any) -> None:
            self.a = a

    c.register("a", Bean, properties={"b": "b"})
    c.register("b", B, args=["a"])
    a = c.get("a")
    assert a.b.a is a


def test_prototypes_are_fresh_and_share_singletons() -> None:
    c = Container()
    c.register("config", Bean)
    c.register("req", Bean, scope="prototype", properties={"config": "config"})
    r1, r2 = c.get("req"), c.get("req")
    assert r1 is not r2
    assert r1.config is r2.config is c.get("config")
    assert "req" not in c.singleton_objects


def test_prototype_cycle_is_an_error() -> None:
    c = Container()
    c.register("p", Bean, scope="prototype", properties={"q": "q"})
    c.register("q", Bean, scope="prototype", properties={"p": "p"})
    with pytest.raises(CircularDependencyError, match="p -> q -> p"):
        c.get("p")


def test_lifecycle_order() -> None:
    c = Container()
    calls: list[str] = []

    class Part:
        def __init__(self, config: Any) -> None:
            calls.append(f"instantiate({config.value})")

        @property
        def dep(self) -> Any:
            return self._dep

        @dep.setter
        def dep(self, value: Any) -> None:
            calls.append(f"inject(exposed={'part' in c.singleton_factories})")
            self._dep = value

        def set_component_name(self, name: str) -> None:
            calls.append(f"set_component_name({name})")

        def set_container(self, container: Container) -> None:
            calls.append(f"set_container({container is c})")

        @post_construct
        def warm_up(self) -> None:
            calls.append("post_construct")

        def after_properties_set(self) -> None:
            calls.append("after_properties_set")

        def start(self) -> None:
            calls.append("init_method")

    class Recorder:
        def before_init(self, obj: Any, name: str) -> Any:
            calls.append(f"before_init({name})")
            return obj

        def after_init(self, obj: Any, name: str) -> Any:
            calls.append(f"after_init(finished={name in c.singleton_objects})")
            return obj

    c.add_post_processor(Recorder())
    c.register_instance("config", Value(7))
    c.register("dep", Bean)
    c.register("part", Part, args=["config"], properties={"dep": "dep"}, init_method="start")
    c.get("dep")
    calls.clear()
    part = c.get("part")
    assert calls == [
        "instantiate(7)",
        "inject(exposed=True)",
        "set_component_name(part)",
        "set_container(True)",
        "before_init(part)",
        "post_construct",
        "after_properties_set",
        "init_method",
        "after_init(finished=False)",
    ]
    assert c.singleton_objects["part"] is part
    assert_no_half_made(c)


def test_post_construct_runs_base_first_and_respects_unmarked_overrides() -> None:
    calls: list[str] = []

    class Base:
        @post_construct
        def base_init(self) -> None:
            calls.append("base")

        @post_construct
        def overridden(self) -> None:
            calls.append("base.overridden")

    class Derived(Base):
        @post_construct
        def derived_init(self) -> None:
            calls.append("derived")

        def overridden(self) -> None:
            calls.append("derived.overridden")

    c = Container()
    c.register("d", Derived)
    c.get("d")
    assert calls == ["base", "derived"]


def test_value_literals_and_kwargs() -> None:
    c = Container()
    c.register_instance("config", {"blocks": 16})
    c.register(
        "made",
        lambda config, n, *, label: (config, n, label),
        args=["config", Value(3)],
        kwargs={"label": Value("x")},
    )
    assert c.get("made") == ({"blocks": 16}, 3, "x")
    assert "made" in c and "nope" not in c
    assert c.names() == ["config", "made"]


def test_concurrent_first_get_creates_one_instance() -> None:
    c = Container()
    made: list[object] = []

    class Slow:
        def __init__(self) -> None:
            time.sleep(0.05)
            made.append(self)

    c.register("slow", Slow)
    barrier = threading.Barrier(8)
    got: list[Any] = []

    def worker() -> None:
        barrier.wait()
        got.append(c.get("slow"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(made) == 1
    assert len(got) == 8 and all(g is made[0] for g in got)


def test_close_destroys_in_reverse_creation_order() -> None:
    closed: list[str] = []

    class Part:
        def __init__(self, label: str) -> None:
            self.label = label

        def close(self) -> None:
            closed.append(self.label)

    c = Container()
    c.add_post_processor(ProxyingPostProcessor("b"))
    c.register_instance("config", Part("config"), destroy_method="close")
    c.register_instance("unmanaged", Part("unmanaged"))  # no destroy_method given: left alone
    c.register("a", Part, args=[Value("a")], properties={"config": "config"}, destroy_method="close")
    c.register("b", Part, args=[Value("b")], properties={"a": "a"}, destroy_method="close")
    c.register("quiet", Part, args=[Value("quiet")])
    c.get("quiet")
    c.get("b")  # creates a first, then finishes b
    c.close()
    assert closed == ["b", "a", "config"]
    assert dict(c.singleton_objects) == {}
    with pytest.raises(ComponentError, match="closed"):
        c.get("a")


def test_unknown_name_is_an_error_naming_it() -> None:
    c = Container()
    c.register("a", Bean, properties={"b": "missing"})
    with pytest.raises(UnknownComponentError, match=r"'nope'.*registered: a"):
        c.get("nope")
    with pytest.raises(UnknownComponentError, match=r"'missing' \(needed by a\)"):
        c.get("a")
    assert_no_half_made(c)


def test_failing_factory_leaves_caches_clean_and_can_be_retried() -> None:
    c = Container()
    attempts: list[int] = []

    def make_b() -> Bean:
        attempts.append(1)
        if len(attempts) == 1:
            raise ValueError("boom")
        return Bean()

    c.register("a", Bean, properties={"b": "b"})
    c.register("b", make_b, properties={"a": "a"})
    with pytest.raises(ComponentCreationError, match=r"'b' \(creating a -> b\).*boom") as info:
        c.get("a")
    assert isinstance(info.value.__cause__, ValueError)
    assert info.value.name == "b"
    assert dict(c.singleton_objects) == {}
    assert_no_half_made(c)
    a = c.get("a")
    assert a.b.a is a


def test_failing_init_after_early_exposure_discards_its_holders() -> None:
    c = Container()
    fail = [True]

    class A(Bean):
        def start(self) -> None:
            if fail:
                fail.pop()
                raise RuntimeError("init failed")

    c.register("a", A, properties={"b": "b", "c": "c"}, init_method="start")
    c.register("b", Bean, properties={"a": "a"})
    c.register("c", Bean, properties={"b": "b"})
    c.register("u", Bean)
    u = c.get("u")
    with pytest.raises(ComponentCreationError, match="'a'") as info:
        c.get("a")  # b finishes holding the half-made a, c finishes holding b, then a's init fails
    assert isinstance(info.value.__cause__, RuntimeError)
    assert dict(c.singleton_objects) == {"u": u}
    assert_no_half_made(c)
    a = c.get("a")
    assert c.get("b").a is a


def test_registration_errors() -> None:
    c = Container()
    c.register("a", Bean)
    with pytest.raises(ComponentError, match="already registered"):
        c.register("a", Bean)
    with pytest.raises(ComponentError, match="scope"):
        c.register("s", Bean, scope="session")  # type: ignore[arg-type]
    with pytest.raises(ComponentError, match="list of names"):
        c.register("t", Bean, args="a")

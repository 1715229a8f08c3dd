"""The chat page (/) and the live dashboard (/dashboard) in a real browser: Debian's Chromium driven by Playwright,
against a real `turbofan serve smollm2:135m` with an API key.

Chromium comes from apt (`apt-get install chromium`, as .ci/run does); `playwright install` downloads a browser and
is never used. The screenshots in docs/ come from tests/ui_screenshots.py.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from test_server import KEY, Server, launch

CHROMIUM = "/usr/bin/chromium"
MODEL = "smollm2:135m"
REPLY = '[data-role="assistant"]'


# -- fixtures -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ui_server(tmp_path_factory) -> Server:
    srv = launch(
        MODEL, tmp_path_factory.mktemp("ui") / "ui-server.log", "--max-model-len", "2048", "--num-kv-blocks", "256",
        "--enable-debug-endpoints", key=KEY, ready_timeout=600,  # a real model: minutes on a loaded 2-core box
    )  # fmt: skip
    yield srv
    srv.stop()


def launch_chromium(playwright):
    """Debian's Chromium, headless, with nothing of its own phoning home."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (never `playwright install`)")
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch_chromium(p)
        yield b
        b.close()


@dataclass
class Tab:
    """A page and every URL it (or any worker of its context) requested."""

    page: object
    origin: str
    urls: list[str] = field(default_factory=list)
    chat_bodies: list[dict] = field(default_factory=list)  # the JSON bodies POSTed to /v1/chat/completions
    errors: list[str] = field(default_factory=list)  # uncaught JavaScript errors

    def foreign(self) -> list[str]:
        return [u for u in self.urls if origin_of(u) != self.origin]


def origin_of(url: str) -> str:
    if url.startswith("blob:"):  # an export's download link: a blob of this origin
        url = url[len("blob:") :]
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@pytest.fixture
def open_tab(browser, ui_server):
    """open_tab(path, key=True) -> Tab; key=False leaves the API key out of localStorage (the page must ask)."""
    contexts = []

    def factory(path: str = "/", key: bool = True) -> Tab:
        context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
        contexts.append(context)
        if key:
            context.add_init_script(f"localStorage.setItem('turbofan.apiKey', {json.dumps(KEY)})")
        page = context.new_page()
        tab = Tab(page, ui_server.url)

        def record(request) -> None:
            tab.urls.append(request.url)
            if request.method == "POST" and request.url.endswith("/v1/chat/completions"):
                tab.chat_bodies.append(json.loads(request.post_data))

        context.on("request", record)
        page.on("pageerror", lambda exc: tab.errors.append(str(exc)))
        page.goto(ui_server.url + path)
        tabs.append(tab)
        return tab

    tabs: list[Tab] = []
    yield factory
    for context in contexts:
        context.close()
    assert not [e for tab in tabs for e in tab.errors], "JavaScript errors on the page"


# -- helpers ------------------------------------------------------------------------------------------------------
def engine(srv: Server) -> dict:
    return srv.get("/debug/engine").json()


def wait_until(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def set_params(page, max_tokens: int, temperature: float = 0.0, system: str = "") -> None:
    page.wait_for_function("document.querySelector('#model').value !== ''")  # the model list has loaded
    page.get_by_label("Max tokens").fill(str(max_tokens))
    page.get_by_label("Temperature").fill(str(temperature))
    page.get_by_label("System prompt").fill(system)


def ask(page, text: str) -> None:
    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_role("button", name="Send", exact=True).click()


def last_reply(page):
    return page.locator(REPLY).last


def wait_reply_done(page, timeout: float = 90) -> str:
    page.wait_for_selector(f'{REPLY}[data-streaming="true"]', state="detached", timeout=timeout * 1000)
    return last_reply(page).locator(".body").inner_text()


def stored_conversation(page) -> list[dict]:
    conversations = page.evaluate("JSON.parse(localStorage.getItem('turbofan.conversations'))")
    current = page.evaluate("localStorage.getItem('turbofan.current')")
    return next(c for c in conversations if c["id"] == current)["messages"]


def metric(page, name: str) -> float | None:
    value = page.get_attribute(f'[data-metric="{name}"]', "data-value")
    return float(value) if value else None


# -- the chat page ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_question_gets_a_streamed_answer_after_asking_for_the_key(open_tab, ui_server):
    tab = open_tab("/", key=False)
    page = tab.page
    page.get_by_label("API key", exact=True).fill(KEY)  # /v1/models said 401: the page asks once
    page.get_by_role("button", name="Save key").click()
    assert page.locator("#model option").first.inner_text(timeout=30_000) == MODEL
    set_params(page, max_tokens=40)
    ask(page, "What is the capital of France?")
    reply = last_reply(page)
    lengths = []  # the reply's text length, sampled while data-streaming="true"
    page.wait_for_selector(f'{REPLY}[data-streaming="true"]')
    while reply.get_attribute("data-streaming") == "true":
        lengths.append(len(reply.locator(".body").inner_text()))
        time.sleep(0.02)
    text = reply.locator(".body").inner_text()
    assert text.strip(), "an empty reply"
    growing = sorted({n for n in lengths if n > 0})
    assert len(growing) >= 3, f"the text did not arrive in pieces while streaming: {lengths}"
    stats = reply.locator(".stats").inner_text()
    assert re.search(r"TTFT \d+ ms · [\d.]+ tokens/s · \d+ tokens", stats), stats
    messages = stored_conversation(page)
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[1]["content"].strip()
    assert tab.chat_bodies[0]["stream"] is True and tab.chat_bodies[0]["stream_options"] == {"include_usage": True}
    assert page.evaluate("localStorage.getItem('turbofan.apiKey')") == KEY
    assert not tab.foreign(), tab.foreign()


@pytest.mark.slow
def test_stop_aborts_the_request_and_the_server_frees_it(open_tab, ui_server):
    page = open_tab("/").page
    set_params(page, max_tokens=1500)
    ask(page, "Count from 1 to 1000, one number per line.")
    reply = last_reply(page)
    wait_until(lambda: len(reply.locator(".body").inner_text()) > 0, 60, "the first tokens")
    assert engine(ui_server)["num_running"] == 1
    page.get_by_role("button", name="Stop", exact=True).click()
    page.wait_for_selector(f'{REPLY}[data-streaming="true"]', state="detached", timeout=5000)
    assert "stopped" in last_reply(page).locator(".stats").inner_text()

    def idle():
        e = engine(ui_server)
        return e["num_running"] == 0 and e["num_waiting"] == 0 and e["num_free_blocks"] == e["num_blocks"] and e

    stats = wait_until(idle, 10, "the server to drop the stopped request and free its KV blocks")
    assert 'vllm:num_requests_running{model_name="smollm2:135m"} 0.0' in ui_server.get("/metrics").text
    time.sleep(0.5)
    assert engine(ui_server)["generation_tokens_total"] == stats["generation_tokens_total"], "still generating"
    assert page.get_by_role("button", name="Send", exact=True).is_enabled()


@pytest.mark.slow
def test_second_turn_keeps_history_and_regenerate_edit_export(open_tab, ui_server):
    tab = open_tab("/")
    page = tab.page
    system = "You are a helpful assistant. Answer briefly."
    set_params(page, max_tokens=24, system=system)
    ask(page, "My name is Ada. Say hello to me.")
    wait_reply_done(page)
    ask(page, "What is my name?")
    wait_reply_done(page)
    first_answer = stored_conversation(page)[1]["content"]
    turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "My name is Ada. Say hello to me."}]
    turn2 = turn1 + [{"role": "assistant", "content": first_answer}, {"role": "user", "content": "What is my name?"}]
    assert [b["messages"] for b in tab.chat_bodies] == [turn1, turn2]
    assert tab.chat_bodies[1]["max_tokens"] == 24 and tab.chat_bodies[1]["temperature"] == 0
    assert tab.chat_bodies[1]["model"] == MODEL

    last_reply(page).get_by_role("button", name="Regenerate").click()  # the same history again, one reply
    wait_reply_done(page)
    assert tab.chat_bodies[2]["messages"] == turn2
    assert len(page.locator(REPLY).all()) == 2

    page.locator('[data-role="user"]').first.get_by_role("button", name="Edit").click()
    page.get_by_label("Edit message").fill("My name is Grace. Say hello to me.")
    page.get_by_role("button", name="Save and regenerate").click()
    wait_reply_done(page)
    assert tab.chat_bodies[3]["messages"] == [turn1[0], {"role": "user", "content": "My name is Grace. Say hello to me."}]
    assert [m["role"] for m in stored_conversation(page)] == ["user", "assistant"]

    with page.expect_download() as download:
        page.get_by_role("button", name="Export JSON").click()
    exported = json.loads(Path(download.value.path()).read_text())
    conv = exported["conversations"][0]
    assert conv["messages"][0]["content"] == "My name is Grace. Say hello to me."
    assert conv["messages"][1]["stats"]["tokens"] > 0
    assert not tab.foreign(), tab.foreign()


@pytest.mark.slow
def test_markdown_renders_code_and_never_model_html(open_tab):
    page = open_tab("/").page
    source = (
        '<img src=x onerror="window.pwned=1"> **bold** `x<y`\n\n```python\ndef f():\n    return "<b>", 7 // 2  # done\n```\n'
        "- one\n- two\n\n```js\nlet a = 1; // note\n```"
    )
    html = page.evaluate(
        "(text) => { const d = document.createElement('div'); d.append(TF.renderMarkdown(text)); return d.innerHTML; }",
        source,
    )
    assert "<img" not in html and "&lt;img src=x" in html and "<b>" not in html
    assert "<strong>bold</strong>" in html and "<code>x&lt;y</code>" in html
    assert '<span class="tok-keyword">def</span>' in html and '<span class="tok-comment"># done</span>' in html
    assert '<span class="tok-number">7</span> // <span class="tok-number">2' in html  # Python's // is no comment...
    assert '<span class="tok-comment">// note</span>' in html  # ...but JavaScript's // is
    assert "<ul><li>one</li><li>two</li></ul>" in html
    assert page.evaluate("window.pwned") is None


# -- the dashboard ------------------------------------------------------------------------------------------------
def load(srv: Server, n: int, max_tokens: int, done: list) -> list[threading.Thread]:
    def one(i: int) -> None:
        body = {"model": MODEL, "prompt": f"Story number {i}: once upon a time", "max_tokens": max_tokens,
                "ignore_eos": True, "temperature": 0.8}  # fmt: skip
        r = httpx.post(srv.url + "/v1/completions", json=body, headers=srv.headers(), timeout=120)
        done.append(r.status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads


@pytest.mark.slow
def test_dashboard_numbers_move_under_load(open_tab, ui_server):
    tab = open_tab("/dashboard")
    page = tab.page
    wait_until(lambda: metric(page, "requests_running") == 0, 30, "the feed's first snapshot")
    assert page.locator("#models tbody tr").first.get_attribute("data-model") == MODEL
    before = metric(page, "kv_cache_usage")
    done: list[int] = []
    threads = load(ui_server, 3, 160, done)
    wait_until(lambda: (metric(page, "requests_running") or 0) >= 1, 30, "requests_running >= 1")
    wait_until(lambda: (metric(page, "generation_tokens_per_s") or 0) > 0, 30, "generation tokens/s > 0")
    wait_until(lambda: (metric(page, "kv_cache_usage") or 0) > before, 30, "KV-cache usage to grow")
    for t in threads:
        t.join(120)
    assert done == [200, 200, 200]
    wait_until(lambda: metric(page, "requests_running") == 0, 10, "requests_running back to 0")
    wait_until(lambda: (metric(page, "ttft_p50") or 0) > 0, 10, "a TTFT p50")
    wait_until(lambda: metric(page, "generation_tokens_per_s") == 0, 10, "generation tokens/s back to 0")
    assert metric(page, "requests_waiting") == 0
    assert not tab.foreign(), tab.foreign()


@pytest.mark.slow
def test_no_request_leaves_the_servers_origin(open_tab, ui_server):
    """Both pages, a chat turn and the dashboard's feed: every URL the browser asked for is the server's."""
    chat = open_tab("/")
    set_params(chat.page, max_tokens=8)
    ask(chat.page, "Hello!")
    wait_reply_done(chat.page)
    chat.page.get_by_role("link", name="Dashboard").click()
    wait_until(lambda: metric(chat.page, "requests_running") == 0, 30, "the dashboard's first snapshot")
    paths = {urlsplit(u).path for u in chat.urls}
    expected = {"/", "/ui/style.css", "/ui/common.js", "/ui/markdown.js", "/ui/chat.js", "/v1/models",
                "/v1/chat/completions", "/dashboard", "/ui/dashboard.js", "/dashboard/events"}  # fmt: skip
    assert expected <= paths, expected - paths
    assert not chat.foreign(), chat.foreign()


# -- serving the pages (no browser) -------------------------------------------------------------------------------
def test_pages_are_open_but_the_feed_needs_the_key():
    from fastapi.testclient import TestClient

    from turbofan.server.app import create_app
    from turbofan.server.settings import ServerSettings

    def never_loads():
        raise RuntimeError("no model in this test")

    app = create_app(never_loads, ServerSettings(api_key="k"))
    with TestClient(app) as client:
        page = client.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
        assert page.status_code == 200 and 'aria-label="Conversation"' in page.text
        assert client.get("/").text == "turbofan is running"  # scripts and Ollama clients probe this
        assert "data-metric" in client.get("/ui/dashboard.js").text
        assert client.get("/dashboard").status_code == 200
        assert client.get("/ui/style.css").headers["content-type"].startswith("text/css")
        assert client.get("/dashboard/events").status_code == 401
        assert client.get("/ui/missing.js").status_code == 404
        for asset in ("index.html", "dashboard.html", "common.js", "chat.js", "markdown.js", "dashboard.js"):
            text = client.get(f"/ui/{asset}").text
            assert not re.search(r"(src|href)=\"(https?:)?//", text), f"{asset} loads something from elsewhere"


def test_dashboard_feed_streams_snapshots(tiny_models):
    """The SSE feed on a tiny engine: one typed snapshot a second with the engine's numbers."""
    from fastapi.testclient import TestClient

    from turbofan import LLM
    from turbofan.server.app import create_app

    llm = LLM(str(tiny_models["llama"]), num_kv_blocks=64)
    with TestClient(create_app(llm.engine)) as client:
        r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200, r.text
        snapshots = []
        with client.stream("GET", "/dashboard/events") as events:
            assert events.headers["content-type"].startswith("text/event-stream")
            for line in events.iter_lines():
                if line.startswith("data: "):
                    snapshots.append(json.loads(line[6:]))
                if len(snapshots) == 2:
                    break
    last = snapshots[-1]
    assert last["status"] == "ok" and last["kv_blocks_total"] == 64 and last["kv_blocks_free"] == 64
    assert last["generation_tokens_total"] == 4 and last["requests_running"] == 0
    assert last["ttft"]["count"] == 1 and last["ttft"]["p50"] > 0 and last["itl"]["count"] == 3
    assert last["resident_models"][0]["architecture"] and last["process_rss_bytes"] > 0
    assert snapshots[1]["time"] - snapshots[0]["time"] >= 0.9

"""Takes docs/ui-chat.png and docs/ui-dashboard.png with Playwright and Debian's Chromium, against a real
`turbofan serve smollm2:135m`: a chat with a code answer, and the dashboard after half a minute of load.

    TURBOFAN_MODELS=... .venv/bin/python tests/ui_screenshots.py docs
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import httpx  # noqa: E402
from test_server import KEY, launch  # noqa: E402
from test_ui import MODEL, ask, launch_chromium, set_params, wait_reply_done  # noqa: E402


def keep_busy(url: str, stop: threading.Event, worker: int) -> None:
    """Requests of varied length, one after another, until `stop`."""
    i = 0
    while not stop.is_set():
        body = {"model": MODEL, "prompt": f"Tell story {worker}.{i}:", "max_tokens": 40 + 30 * ((i + worker) % 4),
                "ignore_eos": True, "temperature": 0.8}  # fmt: skip
        httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        i += 1
        time.sleep(0.5 * worker)


def main(out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--max-model-len", "2048", "--num-kv-blocks", "256"]
        srv = launch(MODEL, Path(tmp) / "server.log", *flags, key=KEY, ready_timeout=600)
        try:
            with sync_playwright() as p:
                browser = launch_chromium(p)
                context = browser.new_context(viewport={"width": 1280, "height": 800})
                context.add_init_script(f"localStorage.setItem('turbofan.apiKey', '{KEY}')")
                page = context.new_page()
                page.goto(srv.url + "/")
                set_params(page, max_tokens=160, system="You are a helpful assistant.")
                ask(page, "Write a Python function that checks whether a number is prime.")
                wait_reply_done(page)
                page.screenshot(path=str(out / "ui-chat.png"))

                page.goto(srv.url + "/dashboard")
                stop = threading.Event()
                workers = [threading.Thread(target=keep_busy, args=(srv.url, stop, w)) for w in range(4)]
                for w in workers:
                    w.start()
                time.sleep(45)
                page.screenshot(path=str(out / "ui-dashboard.png"), full_page=True)
                stop.set()
                for w in workers:
                    w.join(120)
                browser.close()
        finally:
            srv.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs"))

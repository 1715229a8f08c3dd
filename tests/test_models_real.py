"""Two real chat models in one server: smollm2:135m (started with) and gemma3:270m (loaded on its first request),
driven concurrently by the real `openai` and `ollama` clients. Needs both in $TURBOFAN_MODELS; marked slow."""

from __future__ import annotations

import os
import threading

import pytest
from test_server import launch

pytestmark = pytest.mark.slow
SMOL, GEMMA = "smollm2:135m", "gemma3:270m"


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    from turbofan.store import ModelStore

    source = ModelStore(os.environ.get("TURBOFAN_MODELS"))
    root = tmp_path_factory.mktemp("real")
    store = root / "models"
    store.mkdir()
    for name in (SMOL, GEMMA):
        try:
            path = source.resolve(name, pull_missing=False, progress=False).path
        except Exception as e:  # noqa: BLE001 — not pulled: skip with the store's message
            pytest.skip(f"{name} is not in the store ({e}); run `turbofan pull {name}`")
        (store / path.name).symlink_to(path)
    srv = launch(SMOL, root / "server.log", "--max-model-len", "512", "--kv-cache-memory", "64MiB",
                 "--stats-interval", "0", store=store)  # fmt: skip
    yield srv
    srv.stop()


def test_a_second_chat_model_loads_on_demand_while_the_first_stays(real_server):
    import ollama
    from openai import OpenAI

    client = ollama.Client(host=real_server.url)
    oai = OpenAI(base_url=real_server.url + "/v1", api_key="none", max_retries=0)
    msg = [{"role": "user", "content": "What is the capital of France?"}]

    def chat():
        return oai.chat.completions.create(model=SMOL, messages=msg, max_tokens=16, temperature=0)

    def complete():
        return client.generate(model=GEMMA, prompt="1, 2, 3, 4,", options={"num_predict": 8, "temperature": 0})

    assert [m.name for m in client.ps().models] == [SMOL]
    alone_smol = chat().choices[0].message.content
    alone_gemma = complete()  # loads gemma3 on demand
    assert alone_gemma.eval_count == 8 and alone_gemma.response.strip().startswith("5")
    assert alone_gemma.load_duration > 0
    loaded = {m.name: m for m in client.ps().models}
    assert set(loaded) == {SMOL, GEMMA}  # the first stayed
    assert loaded[GEMMA].size > loaded[SMOL].size > 0 and loaded[GEMMA].context_length == 512

    answers: dict = {}
    threads = [threading.Thread(target=lambda: answers.update(smol=chat())),
               threading.Thread(target=lambda: answers.update(gemma=complete()))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    # greedy answers given side by side equal those given alone: the two engines do not disturb each other
    assert answers["smol"].choices[0].message.content == alone_smol
    assert answers["gemma"].response == alone_gemma.response and answers["gemma"].load_duration < 0.1e9
    assert {m.name for m in client.ps().models} == {SMOL, GEMMA}

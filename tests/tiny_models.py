"""Tiny random-weight models of every supported architecture, written to disk the way a hub checkout looks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "Continuous batching lets requests join and leave between steps.",
    "你好，世界。今天天气很好。",
    "0123456789 !?.,;:'\"()[]{}<>/\\|@#$%^&*-+=_~`",
]


# A reasoning model's template (Qwen3's shape): the answer starts inside an open <think> block, or after an empty
# one when the request turns thinking off.
THINK_TEMPLATE = CHAT_TEMPLATE.replace(
    "<|im_start|>assistant\n{% endif %}",
    "<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}",
)


# A template that renders tools itself (Qwen2.5's shape, cut down to the tools' names: a tiny model's context is
# short), calls as hermes.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t.function.name }} {% endfor %}</tools>\n"
    "Answer with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOL_TAGS = ["<tool_call>", "</tool_call>"]


def write_tokenizer(path: Path, vocab_size: int = 400, think: bool = False, tools: bool = False) -> int:
    """`think`: <think> and </think> are tokens of their own, kept in decoded text (not special: Qwen3's).
    `tools`: likewise <tool_call> and </tool_call> (Qwen2.5's), and a template that renders tools."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tags = (["<think>", "</think>"] if think else []) + (TOOL_TAGS if tools else [])
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + tags
    tok.train_from_iterator(CORPUS * 20, vocab_size=vocab_size, special_tokens=special)
    tok.save(str(path / "tokenizer.json"))
    if tags:
        data = json.loads((path / "tokenizer.json").read_text())
        for added in data["added_tokens"]:
            if added["content"] in tags:
                added["special"] = False
        (path / "tokenizer.json").write_text(json.dumps(data))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "bos_token": None,
                "pad_token": "<|endoftext|>",
                "chat_template": THINK_TEMPLATE if think else TOOLS_TEMPLATE if tools else CHAT_TEMPLATE,
                "clean_up_tokenization_spaces": False,
            }
        )
    )
    return tok.get_vocab_size()


def hf_config(arch: str, vocab: int, eos: int, hidden: int = 64, layers: int = 3):
    import transformers as tf

    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=eos,
        bos_token_id=None,
        pad_token_id=None,
    )
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=10000.0)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(
            **common,
            head_dim=32,
            sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=32,
        )
    raise ValueError(arch)


def build_tiny_model(
    path: Path, arch: str, seed: int = 0, hidden: int = 64, layers: int = 3, vocab_size: int = 400, think: bool = False,
    tools: bool = False,
) -> Path:  # fmt: skip
    """Random weights saved as safetensors with a real (tiny) BPE tokenizer and a chat template. Models built with
    the same `vocab_size` share one tokenizer (the BPE training is deterministic): a smaller one can be a draft.
    `think`: a reasoning model's tokens and template; `tools`: tool-call tokens and a template that renders tools."""
    import transformers as tf

    path.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(path, vocab_size, think=think, tools=tools)
    eos = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"].get("<|im_end|>", 2)
    torch.manual_seed(seed)
    config = hf_config(arch, vocab, eos, hidden, layers)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init is small; widen it so the logits are not all near-equal
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
            else:
                p.normal_(0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return path


def hf_greedy(hf, prompt: list[int], max_new: int) -> list[int]:
    """transformers' own greedy `generate`, told to ignore EOS like `ignore_eos=True` (generate merges unset
    fields from the model's configs, so EOS has to be removed there, not only in the config passed in)."""
    saved = hf.generation_config.eos_token_id, hf.config.eos_token_id
    hf.generation_config.eos_token_id = hf.config.eos_token_id = None
    gc = copy.deepcopy(hf.generation_config)
    gc.pad_token_id = 0
    gc.do_sample = False
    gc.max_new_tokens = max_new
    gc.min_new_tokens = None
    for attr in ("temperature", "top_p", "top_k"):
        setattr(gc, attr, None)
    try:
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt]), generation_config=gc)
    finally:
        hf.generation_config.eos_token_id, hf.config.eos_token_id = saved
    out = out[0, len(prompt) :].tolist()
    assert len(out) == max_new
    return out

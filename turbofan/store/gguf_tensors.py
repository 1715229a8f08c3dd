"""GGUF tensor names and layouts -> Hugging Face ones, per architecture.

llama.cpp's converter renames every tensor, permutes the q/k rows of Llama-architecture models for
its rotary layout, and stores Gemma's RMSNorm weights with the +1 that Gemma adds at run time.
These helpers undo exactly that (the reference is transformers' own GGUF loader)."""

from __future__ import annotations

import re

import numpy as np

SUPPORTED_GGUF_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
# GGUF architectures whose norms carry +1 in the file.
_NORM_PLUS_ONE_ARCHS = {"gemma", "gemma2", "gemma3"}
# Tensors llama.cpp adds that are not parameters in transformers (rope factors come from the config).
SKIPPED_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}

_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 2/3 have four norms per layer: ffn_norm is the *pre*-feed-forward one there.
_LAYER_GEMMA = {
    **_LAYER,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z0-9_]+)\.(weight|bias)$")


def hf_tensor_name(gguf_name: str, arch: str) -> str | None:
    """The transformers parameter name of a GGUF tensor, or None if it has no counterpart."""
    m = _BLOCK_RE.match(gguf_name)
    if m:
        layer, leaf, kind = m.groups()
        table = _LAYER_GEMMA if arch in _NORM_PLUS_ONE_ARCHS else _LAYER
        hf_leaf = table.get(leaf)
        return None if hf_leaf is None else f"model.layers.{layer}.{hf_leaf}.{kind}"
    m = _GLOBAL_RE.match(gguf_name)
    if m:
        base, kind = m.groups()
        hf_base = _GLOBAL.get(base)
        return None if hf_base is None else f"{hf_base}.{kind}"
    return None


def reverse_llama_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of q/k rows (its interleaved rotary layout -> HF's half-split)."""
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def llama_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's own permutation (HF -> GGUF); the inverse of ``reverse_llama_permute`` (for tests)."""
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, 2, dim, *weights.shape[1:])
    return w.swapaxes(1, 2).reshape(weights.shape)


def to_hf_layout(gguf_name: str, weights: np.ndarray, arch: str, n_head: int, n_head_kv: int) -> np.ndarray:
    """Apply the per-architecture value/layout fixes to one dequantized tensor (already in torch shape)."""
    if arch == "llama":
        if ".attn_q." in gguf_name:
            weights = reverse_llama_permute(weights, n_head)
        elif ".attn_k." in gguf_name:
            weights = reverse_llama_permute(weights, n_head_kv)
    if arch in _NORM_PLUS_ONE_ARCHS and gguf_name.endswith("norm.weight"):
        weights = weights - np.float32(1.0)
    return weights


def layout_row_order(gguf_name: str, arch: str, rows: int, n_head: int, n_head_kv: int) -> np.ndarray | None:
    """The row order that takes a stored tensor to HF layout (``to_hf_layout``'s permutation, as indices into the
    stored rows), or None where the rows stay in place. Rows are whole quantized blocks, so a quantized tensor is
    reordered without dequantizing it."""
    if arch != "llama":
        return None
    if ".attn_q." in gguf_name:
        return reverse_llama_permute(np.arange(rows), n_head)
    if ".attn_k." in gguf_name:
        return reverse_llama_permute(np.arange(rows), n_head_kv)
    return None

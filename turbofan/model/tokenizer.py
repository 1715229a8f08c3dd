"""Tokenizer: HF fast tokenizer for encoding and chat templates, the `tokenizers` backend for streaming decode."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers.decoders import DecodeStream


class Tokenizer:
    def __init__(self, path: str | Path, chat_template: str | None = None):
        from transformers import AutoTokenizer  # heavy import, only when a model is actually loaded

        path = Path(path)
        self.hf = AutoTokenizer.from_pretrained(str(path))
        self.backend = self.hf.backend_tokenizer
        if chat_template is not None:
            self.hf.chat_template = chat_template
        self.eos_token_ids = self._eos_ids(path)
        self.bos_token_id = self.hf.bos_token_id
        self.vocab_size = len(self.hf)

    def _eos_ids(self, path: Path) -> list[int]:
        ids: list[int] = []
        for name in ("generation_config.json", "config.json"):
            file = path / name
            if file.exists():
                eos = json.loads(file.read_text()).get("eos_token_id")
                ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
        if self.hf.eos_token_id is not None:
            ids.append(self.hf.eos_token_id)
        return sorted(set(ids))

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_token(self, token_id: int) -> str:
        return self.backend.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, chat_template: str | None = None, **kwargs
    ) -> str:
        if not (chat_template or self.has_chat_template):
            raise ValueError(
                "this model has no chat template (it is a base model): use plain completion, or pass a chat template"
            )
        return self.hf.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=chat_template,
            **kwargs,
        )

    def encode_chat(self, messages: list[dict], chat_template: str | None = None, **kwargs) -> list[int]:
        """Chat prompts carry their special tokens in the template, so they are not added again."""
        return self.encode(self.apply_chat_template(messages, chat_template=chat_template, **kwargs), False)

    def decode_stream(self, context: list[int], skip_special_tokens: bool = True) -> DecodeStream:
        """A streaming decoder primed with the prompt's tail, so the first word keeps its leading space."""
        return DecodeStream(ids=context[-4:], skip_special_tokens=skip_special_tokens)

"""LLM: vLLM's offline API — generate, chat and beam search over a batch of prompts, with a progress bar."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq

from tqdm.auto import tqdm

from turbofan.config import EngineConfig
from turbofan.engine.beam_search import BeamSearchOutput, beam_search, beam_search_output
from turbofan.engine.engine import Engine
from turbofan.engine.outputs import OutputBuilder, RequestOutput
from turbofan.engine.params import SamplingParams

PromptType = str | list[int] | dict


def _default_logging() -> None:
    """Like vLLM, say what was loaded and how (INFO, readable text) unless the application set up logging."""
    import logging

    if logging.getLogger().handlers or logging.getLogger("turbofan").handlers:
        return
    from turbofan.server.logs import TextFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("turbofan")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class LLM:
    def __init__(self, model: str = "smollm2:135m", plugins: list | None = None, **kwargs):
        from turbofan.assembly import build_engine

        _default_logging()
        self.config = EngineConfig(model=model, **kwargs)
        self.engine: Engine = build_engine(self.config, plugins)
        self._ids = itertools.count()

    def speculative_stats(self) -> dict | None:
        """Speculative decoding so far: drafts, accepted tokens, acceptance rate, deopts (None when it is off)."""
        return self.engine.speculative_stats()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def _prompt(self, prompt: PromptType) -> str | list[int]:
        if isinstance(prompt, dict):
            return prompt["prompt_token_ids"] if "prompt_token_ids" in prompt else prompt["prompt"]
        return prompt

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str | dict) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        param_list = list(params) if isinstance(params, Seq) else [params] * len(prompts)
        if len(param_list) != len(prompts):
            raise ValueError("pass one SamplingParams, or one per prompt")
        beam = [p for p in param_list if p.use_beam_search]
        if beam:
            if len(beam) != len(param_list):
                raise ValueError("mix of beam search and sampling in one call is not supported")
            return [self._beam_as_output(p, sp) for p, sp in zip(prompts, param_list)]
        ids = []
        try:
            for prompt, sp in zip(prompts, param_list):
                rid = str(next(self._ids))
                self.engine.add_request(rid, self._prompt(prompt), sp)
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        """Step until every request finished, folding each one's deltas into its RequestOutput."""
        builders = {rid: OutputBuilder() for rid in ids}
        done: dict[str, RequestOutput] = {}
        bar = tqdm(
            total=len(ids), desc="Processed prompts", unit="req", disable=not use_tqdm, dynamic_ncols=True
        )
        generated = 0
        try:
            while len(done) < len(ids):
                for delta in self.engine.step():
                    builder = builders.get(delta.request_id)
                    if builder is None:
                        continue
                    builder.add(delta)
                    if delta.finished:
                        done[delta.request_id] = builder.output()
                        generated += builder.num_tokens
                        bar.update(1)
                        bar.set_postfix(
                            output_toks_per_s=f"{generated / max(bar.format_dict['elapsed'], 1e-6):.1f}"
                        )
                if not self.engine.has_unfinished_requests() and len(done) < len(ids):
                    break
        except BaseException:
            for rid in ids:
                if rid not in done:
                    self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [done[i] for i in ids]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        prompts = [
            tok.encode_chat(c, chat_template=chat_template, add_generation_prompt=add_generation_prompt)
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def beam_search(
        self,
        prompts: list[PromptType],
        params: SamplingParams | None = None,
        beam_width: int = 4,
        max_tokens: int = 16,
        length_penalty: float = 1.0,
        ignore_eos: bool = False,
    ) -> list[BeamSearchOutput]:
        return [
            beam_search(self.engine, self._prompt(p), beam_width, max_tokens, length_penalty, ignore_eos)
            for p in prompts
        ]

    def _beam_as_output(self, prompt: PromptType, sp: SamplingParams) -> RequestOutput:
        return beam_search_output(self.engine, self._prompt(prompt), sp)

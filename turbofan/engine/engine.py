"""Engine: one step = schedule → model → sample → update → deltas; every piece of state has one owner.

- the Scheduler owns request state: it decides who runs (and lays out the step), and after the forward it
  appends the sampled tokens, detokenizes them and finishes sequences;
- the InputBatch keeps the live sequences' per-slot tensors (sampling parameters, block tables, token history
  for penalties) and builds each step's ForwardBatch and SamplingBatch from them;
- the ModelRunner turns a ForwardBatch into logits, the Sampler turns logits into tokens;
- the OutputProcessor emits what is new (tokens, text, logprobs) as one RequestDelta per request.

The engine is synchronous and single-threaded; AsyncEngine runs it in a thread for the server, LLM calls it
directly. Everything it is made of is passed in (see turbofan.assembly), so it only orchestrates.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

from turbofan.config import EngineConfig
from turbofan.engine.block_manager import BlockManager
from turbofan.engine.client import ModelInfo
from turbofan.engine.constraints import GrammarCompiler
from turbofan.engine.errors import RequestFailedError
from turbofan.engine.input_batch import InputBatch
from turbofan.engine.jump_forward import JumpForward
from turbofan.engine.output_processor import OutputProcessor
from turbofan.engine.outputs import RequestDelta, RequestOutput
from turbofan.engine.params import SamplingParams
from turbofan.engine.sampler import Sampler, SamplerOutput
from turbofan.engine.scheduler import Scheduler
from turbofan.engine.sequence import Request
from turbofan.engine.speculative import Speculator
from turbofan.model.runner import ModelRunner
from turbofan.model.tokenizer import Tokenizer

log = logging.getLogger("turbofan.engine")


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    num_blocks: int
    num_free_blocks: int
    kv_waste: float  # allocated-but-unused slots of running sequences, as a fraction of allocated slots
    prefix_queries: int
    prefix_hits: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    steps_total: int
    speculative: dict | None = None  # Speculator.snapshot() when speculative decoding is on


def default_max_model_len(config: EngineConfig, runner: ModelRunner) -> int:
    """The context length served: the asked or model's (capped at 8192), and never more than the KV cache holds.

    vLLM refuses to start when the context does not fit the cache; like Ollama we shrink the context and say so,
    so one long request can never need more blocks than exist.
    """
    wanted = config.max_model_len or min(runner.args.max_position, 8192)
    capacity = runner.num_blocks * runner.block_size
    if wanted > capacity:
        log.warning(
            "max_model_len %d does not fit the KV cache (%d blocks of %d = %d tokens): serving %d tokens of context; "
            "raise --kv-cache-memory for more",
            wanted, runner.num_blocks, runner.block_size, capacity, capacity,
            extra={"max_model_len_wanted": wanted, "max_model_len": capacity, "kv_cache_tokens": capacity},
        )  # fmt: skip
        return capacity
    return wanted


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        tokenizer: Tokenizer,
        runner: ModelRunner,
        scheduler: Scheduler,
        sampler: Sampler,
        input_batch: InputBatch,
        output_processor: OutputProcessor,
        model_name: str | None = None,
        model_path: str | None = None,
        speculator: Speculator | None = None,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.runner = runner
        self.scheduler = scheduler
        self.blocks: BlockManager = scheduler.blocks
        self.sampler = sampler
        self.input_batch = input_batch
        self.output_processor = output_processor
        self.model_name = model_name or config.model_name
        self.model_path = str(model_path or config.model)
        self.max_model_len = scheduler.max_model_len
        self.profiler = None  # set by the assembly when profiling is on
        self.grammars = GrammarCompiler(getattr(tokenizer, "hf", None), runner.args.vocab_size, sampler.eos_token_ids)
        self.speculator = speculator
        if speculator is not None:
            scheduler.release_listeners.append(speculator.release)
        self.jump_forward = JumpForward(self.max_model_len)

    # -- requests -----------------------------------------------------------------------------------------------
    @property
    def requests(self) -> dict[str, Request]:
        return self.scheduler.requests

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty: it must contain at least one token")
        if n >= self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
                f"{n} tokens; shorten it so that prompt plus completion fit."
            )
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} in the completion). "
                "Please reduce the length of the prompt or the completion."
            )
        vocab = self.runner.args.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        bad = [t for t in params.logit_bias or () if t >= vocab]
        if bad:
            raise ValueError(f"logit_bias token id {bad[0]} is outside the vocabulary [0, {vocab})")
        need = -(-n // self.blocks.block_size)
        if need > self.blocks.num_blocks:
            raise ValueError(f"the prompt needs {need} KV blocks but the cache only has {self.blocks.num_blocks}")

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        prompt_text: str | None = None,
    ) -> Request:
        if request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = prompt_text, list(prompt)
        self.validate_prompt(ids, params)
        if params.max_tokens is None:  # a copy: the caller may share one SamplingParams across prompts
            params = dataclasses.replace(params, max_tokens=self.max_model_len - len(ids))
        request = Request(request_id, text, ids, params, arrival_time)
        if params.structured is not None:  # compiled here, so a bad grammar fails this request alone
            request.seqs[0].constraint = self.grammars.constraint(params.structured, params.reasoning_end_token_id)
        self.scheduler.add_request(request)
        return request

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks; returns everything it had produced (None if unknown)."""
        request = self.scheduler.abort_request(request_id)
        return None if request is None else self.output_processor.full_output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.scheduler.requests)

    # -- the step -----------------------------------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        """One step. An error building, running or sampling the batch ends the requests it concerns (raised as
        RequestFailedError once they are aborted) and leaves the engine serving the rest; so does an error in one
        request's own work after the forward (its stop scan, detokenization, grammar, logprobs: only that request
        ends, and the RequestFailedError carries the others' deltas). An error in the scheduler's bookkeeping, or
        any AssertionError, is a broken invariant and propagates."""
        spec = self.speculator
        if spec is not None:
            spec.propose(self.scheduler.running)
        forced = self.jump_forward.propose(self.scheduler.running)  # a grammar's forced tokens, as certain drafts
        sched = self.scheduler.schedule()
        self.jump_forward.settle(forced, sched.drafts)
        try:
            batch = self.input_batch.prepare(sched)
            if batch is None:  # nothing to run; sequences the cache could not hold still get their last delta
                return self.output_processor.process(sched, SamplerOutput([])) if sched.truncated else []
            self.runner.copy_blocks(sched.copies)
            self.sampler.start_grammar_masks(batch.sampling, self.grammars.vocab_size)  # filled during the forward
            start = time.perf_counter()
            logits = self.runner.execute(batch.forward)
            sampled = self.sampler.sample(logits, batch.sampling)
        except Exception as exc:
            failed = exc if isinstance(exc, RequestFailedError) else None
            ids = failed.request_ids if failed else list(dict.fromkeys(s.request.request_id for s, _ in sched.scheduled))
            log.error("a step failed; ending %d request(s): %s", len(ids), exc, exc_info=failed is None)
            self.jump_forward.settle(forced, None)  # the step's forced tokens are not emitted
            for rid in ids:
                self.abort_request(rid)
            raise failed or RequestFailedError(ids, exc) from exc
        if spec is not None:
            spec.observe(sched, time.perf_counter() - start)
            if sched.drafts:
                spec.verify(sched, sampled, self.blocks)
        self.scheduler.update_from_output(sched, sampled.tokens)
        failed = dict(self.scheduler.failed)
        deltas = self.output_processor.process(sched, sampled, failed)
        if failed:
            self._end_failed(failed, deltas)
        return deltas

    def _end_failed(self, failed: dict[str, Exception], deltas: list[RequestDelta]) -> None:
        """End the requests whose own work failed after the forward (aborted: their KV blocks freed) and raise
        RequestFailedError carrying the other requests' deltas, so the step's work for them is not lost."""
        ids = list(failed)
        first = failed[ids[0]]
        log.error("%d request(s) failed in a step; the others go on: %s", len(ids), first,
                  exc_info=(type(first), first, first.__traceback__))  # fmt: skip
        for rid in ids:
            self.abort_request(rid)
        raise RequestFailedError(ids, first, deltas) from first

    # -- visibility ---------------------------------------------------------------------------------------------
    @property
    def steps_total(self) -> int:
        return self.scheduler.steps_total

    def stats(self) -> EngineStats:
        sched = self.scheduler
        running = list(sched.running)
        allocated = sum(len(s.block_table) for s in running) * self.blocks.block_size
        used = sum(s.num_computed_tokens for s in running)
        return EngineStats(
            num_running=len(running),
            num_waiting=len(sched.waiting),
            kv_usage=self.blocks.usage,
            num_blocks=self.blocks.num_blocks,
            num_free_blocks=self.blocks.num_free_blocks,
            kv_waste=(allocated - used) / allocated if allocated else 0.0,
            prefix_queries=self.blocks.prefix_queries,
            prefix_hits=self.blocks.prefix_hits,
            num_preemptions=sched.num_preemptions,
            prompt_tokens_total=sched.prompt_tokens_total,
            generation_tokens_total=sched.generation_tokens_total,
            steps_total=sched.steps_total,
            speculative=self.speculative_stats(),
        )

    def speculative_stats(self) -> dict | None:
        """Drafts, accepted tokens, acceptance rate, deopts and the step-cost fit; None when speculation is off."""
        return None if self.speculator is None else self.speculator.snapshot()

    def model_info(self) -> ModelInfo:
        runner = self.runner
        model = runner.model
        by_format = model.weight_bytes()  # quantized matrices too (they are not Parameters), a tied head once
        weights = sum(by_format.values()) + sum(b.numel() * b.element_size() for b in model.buffers())
        return ModelInfo(
            name=self.model_name,
            root=str(self.config.model),
            path=self.model_path,
            max_model_len=self.max_model_len,
            vocab_size=runner.args.vocab_size,
            eos_token_ids=tuple(self.sampler.eos_token_ids),
            device=str(runner.device),
            dtype=str(runner.dtype).removeprefix("torch."),
            architecture=runner.args.architecture,
            quantization=str(getattr(runner, "quantization", "")),
            weights_bytes=weights,
            kv_cache_bytes=int(runner.kv_cache_bytes),
            weights_by_format=by_format,
        )

    def tiers(self) -> dict:
        """The tiering table (tier calls, deopts, compile time), or {"tiering": "off"}."""
        tiers = self.runner.forward_fn
        spec = {} if self.speculator is None else {"speculative": self.speculator.snapshot()}
        if not hasattr(tiers, "table"):
            return {"tiering": "off", "tiers": [], **spec}
        return {
            **spec,
            "tiering": "on",
            "tiers": tiers.table(),
            "tier_calls": dict(tiers.tier_calls),
            "deopts": dict(tiers.deopts),
            "compile_seconds_total": round(tiers.compile_seconds_total, 2),
        }

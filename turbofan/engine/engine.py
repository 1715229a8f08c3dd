"""Engine: one step = schedule → build the flat batch → forward → sample → detokenize → outputs.

The engine is synchronous and single-threaded; AsyncEngine runs it in a thread for the server, LLM calls it
directly. Everything it is made of is passed in (see turbofan.assembly), so it only orchestrates.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from turbofan.config import EngineConfig
from turbofan.engine.block_manager import BlockManager
from turbofan.engine.detokenizer import Detokenizer
from turbofan.engine.outputs import RequestOutput
from turbofan.engine.params import SamplingParams
from turbofan.engine.sampler import Sampler, SamplerOutput, top_logprobs_dict
from turbofan.engine.scheduler import Scheduler
from turbofan.engine.sequence import Request, Sequence
from turbofan.model.batch import ForwardBatch
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


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        tokenizer: Tokenizer,
        runner: ModelRunner,
        scheduler: Scheduler,
        sampler: Sampler,
        detokenizer: Detokenizer,
        model_name: str | None = None,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.runner = runner
        self.scheduler = scheduler
        self.blocks: BlockManager = scheduler.blocks
        self.sampler = sampler
        self.detokenizer = detokenizer
        self.model_name = model_name or config.model_name
        model_len = runner.args.max_position
        self.max_model_len = config.max_model_len or min(model_len, 8192)
        self.requests: dict[str, Request] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.steps_total = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        from turbofan.assembly import build_engine  # the composition root owns the wiring

        return build_engine(config)

    # -- requests -----------------------------------------------------------------------------------------------
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
        need = -(-n // self.blocks.block_size)
        if need > self.blocks.num_blocks:
            raise ValueError(f"the prompt needs {need} KV blocks but the cache only has {self.blocks.num_blocks}")

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> Request:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
        self.validate_prompt(ids, params)
        if params.max_tokens is None:  # a copy: the caller may share one SamplingParams across prompts
            params = dataclasses.replace(params, max_tokens=self.max_model_len - len(ids))
        request = Request(request_id, text, ids, params, arrival_time)
        self.requests[request_id] = request
        self.scheduler.add(request.seqs[0])
        return request

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        request.metrics.finished_time = time.time()
        return self._output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the step -----------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        now = time.time()
        self.steps_total += 1
        self.runner.copy_blocks(sched.copies)
        chunks, starts, tables, rows = [], [], [], []
        sample_seqs: list[Sequence] = []
        sample_rows: list[int] = []
        prompt_rows: list[tuple[Sequence, int, int, int]] = []  # (seq, first logits row, first position, n)
        row = 0
        for seq, n in sched.scheduled:
            start = seq.num_computed_tokens
            request = seq.request
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
            chunks.append(seq.token_ids[start : start + n])
            starts.append(start)
            tables.append(seq.block_table)
            done = start + n == seq.num_tokens
            wants_prompt_lp = request.prompt_logprobs is not None and start < request.num_prompt_tokens - 1
            if wants_prompt_lp:
                offsets = list(range(n))
                prompt_rows.append((seq, row, start, n))
            else:
                offsets = [n - 1] if done else []
            rows.append(offsets)
            if done:
                sample_seqs.append(seq)
                sample_rows.append(row + len(offsets) - 1)
            row += len(offsets)
            if start < request.num_prompt_tokens:
                self.prompt_tokens_total += min(n, request.num_prompt_tokens - start)
        batch = ForwardBatch.build(chunks, starts, tables, rows, self.blocks.block_size)
        logits = self.runner.execute(batch)
        for seq, n in sched.scheduled:
            seq.num_computed_tokens += n
            self.blocks.commit(seq)
        for seq, first_row, start, n in prompt_rows:
            self._prompt_logprobs(seq, logits, first_row, start, n)
        touched: dict[str, Request] = {}
        if sample_seqs:
            sample_seqs, sample_rows = self._fork_new_requests(sample_seqs, sample_rows)
            result = self.sampler.sample(logits[sample_rows], sample_seqs)
            self._append(sample_seqs, result, touched)
        return [self._output(r) for r in touched.values()]

    def _fork_new_requests(self, seqs: list[Sequence], rows: list[int]) -> tuple[list[Sequence], list[int]]:
        """n > 1: once the prompt is computed, the request forks into n sequences sharing its KV blocks."""
        out_seqs, out_rows = [], []
        for seq, row in zip(seqs, rows):
            out_seqs.append(seq)
            out_rows.append(row)
            request = seq.request
            if request.forked:
                continue
            request.forked = True
            for index in range(1, request.params.n):
                child = seq.fork(index)
                self.blocks.fork(seq, child)
                self.scheduler.add_running(child)
                request.seqs.append(child)
                out_seqs.append(child)
                out_rows.append(row)
        return out_seqs, out_rows

    def _append(self, seqs: list[Sequence], result: SamplerOutput, touched: dict[str, Request]) -> None:
        now = time.time()
        decode = self.tokenizer.decode_token
        for i, (seq, token) in enumerate(zip(seqs, result.tokens)):
            request = seq.request
            params = request.params
            seq.token_ids.append(token)
            self.generation_tokens_total += 1
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
            request.metrics.last_token_time = now
            if seq.logprobs is not None and result.logprobs is not None:
                seq.cumulative_logprob += result.logprobs[i]
                k = params.logprobs or 0
                ids = result.top_ids[i, :k].tolist() if k else []
                vals = result.top_logprobs[i, :k].tolist() if k else []
                seq.logprobs.append(top_logprobs_dict(token, result.logprobs[i], result.ranks[i], ids, vals, decode))
            stop = self.detokenizer.append(seq, token)
            enough = seq.num_output_tokens >= params.min_tokens
            if stop is not None:
                seq.finish_reason, seq.stop_reason = "stop", stop
            elif enough and not params.ignore_eos and token in self.sampler.eos_token_ids:
                seq.finish_reason = "stop"
            elif enough and token in params.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
            elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.finish_reason = "length"
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
            touched[request.request_id] = request
        for request in touched.values():
            if request.finished:
                request.metrics.finished_time = now
                self.requests.pop(request.request_id, None)

    def _prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, first_row: int, start: int, n: int) -> None:
        request = seq.request
        n_prompt = request.num_prompt_tokens
        computed = len(request.prompt_logprobs) - 1  # a recompute after preemption must not add them twice
        positions = range(max(start, computed), min(start + n, n_prompt - 1))
        if not positions:
            return
        skip = positions.start - start
        rows = logits[first_row + skip : first_row + skip + len(positions)].log_softmax(-1)
        targets = request.prompt_token_ids[positions.start + 1 : positions.stop + 1]
        tgt = torch.tensor(targets)[:, None]
        chosen = rows.gather(1, tgt)
        ranks = ((rows > chosen).sum(-1) + 1).tolist()
        k = request.params.prompt_logprobs or 0
        top_vals, top_ids = rows.topk(k, dim=-1) if k else (None, None)
        decode = self.tokenizer.decode_token
        for j, token in enumerate(targets):
            ids = top_ids[j].tolist() if k else []
            vals = top_vals[j].tolist() if k else []
            request.prompt_logprobs.append(top_logprobs_dict(token, float(chosen[j]), ranks[j], ids, vals, decode))

    def _output(self, request: Request) -> RequestOutput:
        seqs = sorted(request.seqs, key=lambda s: s.index)
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=request.prompt_logprobs,
            outputs=[s.to_output(Detokenizer.visible_text(s)) for s in seqs],
            finished=all(s.finished for s in seqs),
            metrics=request.metrics,
            num_cached_tokens=request.num_cached_tokens,
        )

    # -- visibility ---------------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        running = self.scheduler.running
        allocated = sum(len(s.block_table) for s in running) * self.blocks.block_size
        used = sum(s.num_computed_tokens for s in running)
        return EngineStats(
            num_running=len(running),
            num_waiting=len(self.scheduler.waiting),
            kv_usage=self.blocks.usage,
            num_blocks=self.blocks.num_blocks,
            num_free_blocks=self.blocks.num_free_blocks,
            kv_waste=(allocated - used) / allocated if allocated else 0.0,
            prefix_queries=self.blocks.prefix_queries,
            prefix_hits=self.blocks.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            steps_total=self.steps_total,
        )

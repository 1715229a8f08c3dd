"""Beam search (vLLM v1's design: a driver over the engine whose beams share blocks via the prefix cache)."""

from __future__ import annotations

import pytest

from turbofan import SamplingParams


def _teacher_forced_logprob(llm, tokens: list[int], prompt_len: int) -> float:
    out = llm.generate([tokens], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    return sum(out.prompt_logprobs[i][tokens[i]].logprob for i in range(prompt_len, len(tokens)))


def test_beams_are_scored_correctly_and_sorted(make_llm):
    llm = make_llm("llama")
    prompt = llm.engine.tokenizer.encode("The quick brown fox")
    result = llm.beam_search([prompt], beam_width=3, max_tokens=6, ignore_eos=True)[0]
    seqs = result.sequences
    assert len(seqs) == 3
    assert len({tuple(s.tokens) for s in seqs}) == 3
    scores = [s.cum_logprob / 6 for s in seqs]
    assert scores == sorted(scores, reverse=True)
    for s in seqs:
        assert s.tokens[: len(prompt)] == prompt and len(s.tokens) == len(prompt) + 6
        assert s.cum_logprob == pytest.approx(_teacher_forced_logprob(llm, s.tokens, len(prompt)), abs=1e-3)
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0))[0]
    assert seqs[0].cum_logprob >= greedy.outputs[0].cumulative_logprob - 1e-4


def test_sampling_params_beam_search_returns_n_best(make_llm):
    llm = make_llm("qwen2")
    sp = SamplingParams(use_beam_search=True, n=2, best_of=4, max_tokens=5, ignore_eos=True)
    out = llm.generate(["Hello world"], sp, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1]
    assert all(len(c.token_ids) == 5 and c.finish_reason == "length" for c in out.outputs)
    assert out.outputs[0].cumulative_logprob >= out.outputs[1].cumulative_logprob

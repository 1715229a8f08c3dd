"""Sampling semantics (on the Sampler with hand-made logits), stop conditions, detokenization, and bad parameters."""

from __future__ import annotations

import json

import pytest
import torch

from turbofan import SamplingParams
from turbofan.engine import OutputBuilder
from turbofan.engine.detokenizer import Detokenizer
from turbofan.engine.input_batch import InputBatch
from turbofan.engine.sampler import Sampler
from turbofan.engine.sequence import Request
from turbofan.model.tokenizer import Tokenizer

EOS = 3
NEG_INF = float("-inf")


def make_seqs(params: list[SamplingParams], prompt=(10, 11, 12), outputs=()):
    """Real Request/Sequence objects, with `outputs` already generated."""
    seqs = []
    for i, p in enumerate(params):
        seq = Request(f"r{i}", None, list(prompt), p).seqs[0]
        seq.token_ids.extend(outputs)
        seqs.append(seq)
    return seqs


def sample_seqs(logits: torch.Tensor, seqs: list, sampler: Sampler | None = None):
    """Sample one row per sequence through a fresh InputBatch (the path every engine step takes)."""
    batch = InputBatch(vocab_size=logits.shape[-1], block_size=16, max_model_len=256, capacity=2)
    for seq in seqs:
        batch.add(seq)
    rows = batch.sampling_batch([(s, i) for i, s in enumerate(seqs)])
    return (sampler or Sampler([EOS])).sample(logits.clone(), rows)


def sample(logits: torch.Tensor, params: list[SamplingParams], sampler: Sampler | None = None, **kw):
    return sample_seqs(logits, make_seqs(params, **kw), sampler)


def frequencies(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double() / len(tokens)


PROBS = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
LOGITS = PROBS.log()


def draw_many(params: SamplingParams, rows: int = 4000, logits: torch.Tensor = LOGITS) -> list[int]:
    torch.manual_seed(0)  # unseeded rows use the global generator: pin it so the test is deterministic
    return sample(logits.expand(rows, -1), [params] * rows).tokens


# -- filters ------------------------------------------------------------------------------------------------------
def test_greedy_is_argmax_and_ignores_seed():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 100, generator=g)
    out = sample(logits, [SamplingParams(temperature=0, seed=i) for i in range(32)])
    assert out.tokens == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_1_equals_greedy(temperature):
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        logits = torch.randn(64, 100, generator=g)
        out = sample(logits, [SamplingParams(temperature=temperature, top_k=1)] * 64)
        assert out.tokens == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_tiny_top_p_equals_greedy(temperature):
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        logits = torch.randn(64, 100, generator=g)
        out = sample(logits, [SamplingParams(temperature=temperature, top_p=1e-6)] * 64)
        assert out.tokens == logits.argmax(-1).tolist()


def test_plain_sampling_follows_the_distribution():
    freq = frequencies(draw_many(SamplingParams(temperature=1.0)), 5)
    assert torch.allclose(freq, PROBS.double(), atol=0.03), freq


def test_temperature_sharpens_and_flattens():
    for t in (0.5, 2.0):
        freq = frequencies(draw_many(SamplingParams(temperature=t)), 5)
        want = (LOGITS / t).softmax(-1).double()
        assert torch.allclose(freq, want, atol=0.03), (t, freq, want)


@pytest.mark.parametrize(
    "params,allowed",
    [
        (SamplingParams(temperature=1.0, top_k=2), [0, 1]),
        (SamplingParams(temperature=1.0, top_k=4), [0, 1, 2, 3]),
        (SamplingParams(temperature=1.0, top_p=0.6), [0, 1]),  # smallest set with mass >= 0.6: 0.4 + 0.3
        (SamplingParams(temperature=1.0, top_p=0.75), [0, 1, 2]),  # 0.7 < 0.75 needs the third
        (SamplingParams(temperature=1.0, min_p=0.3), [0, 1, 2]),  # floor 0.3 * 0.4 = 0.12
        (SamplingParams(temperature=1.0, min_p=0.5), [0, 1]),  # floor 0.2
        (SamplingParams(temperature=1.0, min_p=0.2), [0, 1, 2, 3]),  # floor 0.08
        (SamplingParams(temperature=1.0, top_k=3, min_p=0.5), [0, 1]),
        # top-p inside top-k: the nucleus of the renormalised top k (0.4, 0.3, 0.15 -> 0.47, 0.35, 0.18)
        (SamplingParams(temperature=1.0, top_k=3, top_p=0.5), [0, 1]),
        (SamplingParams(temperature=1.0, top_k=3, top_p=0.9), [0, 1, 2]),
        (SamplingParams(temperature=1.0, top_k=4, top_p=0.6), [0, 1]),
        (SamplingParams(temperature=1.0, top_k=2, top_p=0.99, min_p=0.7), [0, 1]),  # floor 0.7 * 0.57
        (SamplingParams(temperature=1.0, top_k=2, top_p=0.99, min_p=0.8), [0]),
    ],
    ids=lambda v: repr(v) if isinstance(v, list) else "",
)
def test_filters_keep_exactly_the_right_tokens_renormalised(params, allowed):
    freq = frequencies(draw_many(params), 5)
    assert set(torch.nonzero(freq).flatten().tolist()) == set(allowed)
    want = torch.zeros(5, dtype=torch.double)
    want[allowed] = PROBS[allowed].double() / PROBS[allowed].sum()
    assert torch.allclose(freq, want, atol=0.03), (freq, want)


def test_each_row_gets_its_own_filters():
    params = [
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0, min_p=0.5),
        SamplingParams(),
    ]
    torch.manual_seed(0)
    rows = 3000
    out = sample(LOGITS.expand(rows * 3, -1), params * rows).tokens
    assert set(out[0::3]) == {0}
    assert set(out[1::3]) == {0, 1}
    assert set(out[2::3]) == {0, 1, 2, 3, 4}


def _nucleus(logits: torch.Tensor, top_p: float) -> set[int]:
    """The reference: a full sort (what the sampler avoids)."""
    probs, order = logits.softmax(-1).sort(descending=True)
    keep = (probs.cumsum(-1) - probs) <= top_p
    return set(order[keep].tolist())


def test_top_p_alone_widens_until_the_nucleus_fits():
    """A top-p-only row starts from its best 128 candidates; a flat distribution needs thousands, found exactly."""
    g = torch.Generator().manual_seed(11)
    vocab = 6000
    flat = torch.randn(vocab, generator=g) * 0.3  # nucleus of 0.9: thousands of tokens
    peaked = torch.randn(vocab, generator=g) * 4.0  # nucleus of 0.9: a handful
    for row, top_p in ((flat, 0.9), (peaked, 0.9), (flat, 0.3)):
        want = _nucleus(row, top_p)
        torch.manual_seed(0)
        got = sample(row.expand(3000, -1), [SamplingParams(temperature=1.0, top_p=top_p)] * 3000).tokens
        assert set(got) <= want, "a token outside the nucleus was drawn"
        if len(want) < 50:
            assert set(got) == want
        else:
            assert len(set(got)) > min(len(want), 3000) * 0.3
    assert len(_nucleus(flat, 0.9)) > 128 * 16, "the flat row must need more than one widening"


def test_truncation_of_a_row_never_depends_on_its_mates_widths():
    """A seeded row's draws are the same whatever width its batch mates make the shared top-k (exactly)."""
    g = torch.Generator().manual_seed(12)
    vocab = 3000
    target = torch.randn(1, vocab, generator=g)
    cases = [
        SamplingParams(temperature=0.7, top_p=0.8, seed=5),  # top-p only
        SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=6),  # Ollama's defaults
        SamplingParams(temperature=0.7, top_k=40, seed=7),
        SamplingParams(temperature=0.7, min_p=0.05, seed=8),  # the full-vocabulary path
        SamplingParams(temperature=0.7, seed=9),
    ]
    mates = [
        [],
        [SamplingParams(temperature=1.0, top_k=2500)],  # a much wider top-k for the whole group
        [SamplingParams(temperature=1.0, top_p=0.999), SamplingParams(temperature=0)],  # widening, and greedy
        [SamplingParams(temperature=1.0)],
    ]
    for p in cases:
        runs = []
        for extra in mates:
            seq = make_seqs([p])[0]
            others = make_seqs(extra)
            logits = torch.cat([target, torch.randn(len(extra), vocab, generator=g)])
            runs.append(_decode_steps(lambda step, logits=logits: logits, [seq, *others], None, 30, row=0))
        assert all(r == runs[0] for r in runs), p
        assert len(set(runs[0])) > 3, "the draw should be random"


def test_logit_bias_bans_and_forces_in_one_batched_op():
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(6, 50, generator=g)
    top = logits.argmax(-1)
    params = [
        SamplingParams(temperature=0, logit_bias={int(top[0]): -100}),  # banned: the runner-up wins
        SamplingParams(temperature=0, logit_bias={7: 100}),  # forced
        SamplingParams(temperature=0),  # no bias: untouched by its mates' biases
        SamplingParams(temperature=1.0, seed=1, logit_bias={9: 100, 3: -100}),
        SamplingParams(temperature=1.0, seed=2, logit_bias={str(k): -100 for k in range(49)}),  # only 49 left
        SamplingParams(temperature=0, logit_bias={5: 1e6}),  # clamped to +100 (still wins)
    ]
    out = sample(logits, params).tokens
    assert out[0] == int(logits[0].topk(2).indices[1])
    assert out[1] == 7 and out[2] == int(top[2]) and out[3] == 9 and out[4] == 49 and out[5] == 5
    assert params[5].logit_bias == {5: 100.0} and params[4].logit_bias[0] == -100.0


def test_greedy_rows_pay_only_for_the_argmax(monkeypatch):
    """A batch of greedy rows never reaches the random path (no uniforms drawn, no top-k)."""
    import turbofan.engine.sampler as sampler_module

    def boom(*a, **k):
        raise AssertionError("the random path ran for greedy rows")

    monkeypatch.setattr(sampler_module, "_uniforms", boom)
    logits = torch.randn(8, 100)
    assert sample(logits, [SamplingParams(temperature=0, top_k=5, top_p=0.5)] * 8).tokens == logits.argmax(-1).tolist()


# -- penalties (captured with a logits processor: they run after penalties and min_tokens masking) ---------------
def capture(params: SamplingParams, store: list):
    def proc(output_ids, row):
        store.append(row.clone())
        return row

    params.logits_processors.append(proc)
    return params


@pytest.mark.parametrize("penalty", [1.0, 1.3, 2.0, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 30, generator=g) * 3
    prompt, outputs = [1, 4, 4, 7, 20], [7, 9, 25, 1]
    seen: list[torch.Tensor] = []
    sample(
        logits,
        [capture(SamplingParams(temperature=0, repetition_penalty=penalty), seen)],
        prompt=prompt,
        outputs=outputs,
    )
    ids = torch.tensor([prompt + outputs])
    want = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())[0]
    torch.testing.assert_close(seen[0], want, atol=1e-6, rtol=0)
    if penalty != 1.0:  # both signs occur among the penalised tokens, and untouched ones stay untouched
        touched = sorted(set(prompt + outputs))
        assert (logits[0, touched] > 0).any() and (logits[0, touched] < 0).any()
        untouched = [t for t in range(30) if t not in touched]
        assert torch.equal(seen[0][untouched], logits[0, untouched])


def test_repetition_penalty_changes_greedy_choice_both_signs():
    # positive: 2.0 seen, /2 -> 1.0 < 1.5 unseen; negative: -1.0 seen, *2 -> -2.0 < -1.5 unseen
    pos = torch.tensor([[0.0, 2.0, 1.5, -5.0]])
    neg = torch.tensor([[-9.0, -1.0, -1.5, -5.0]])
    for logits in (pos, neg):
        assert sample(logits, [SamplingParams(temperature=0)], prompt=[1]).tokens == [1]
        penalised = [SamplingParams(temperature=0, repetition_penalty=2.0)]
        assert sample(logits, penalised, prompt=[1]).tokens == [2]
        assert sample(logits, penalised, prompt=[0], outputs=[1]).tokens == [2]


def test_repeat_last_n_window():
    logits = torch.tensor([[0.0, 2.0, 1.5, -5.0]])
    # token 1 is in the prompt but outside a window of the last 2 tokens
    p = SamplingParams(temperature=0, repetition_penalty=2.0, repeat_last_n=2)
    assert sample(logits, [p], prompt=[1, 0, 0]).tokens == [1]
    assert sample(logits, [p], prompt=[0, 0, 1]).tokens == [2]


def test_presence_and_frequency_penalties_openai_semantics():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 30, generator=g)
    prompt, outputs = [5, 6, 6, 7], [7, 7, 9, 7, 11]
    seen: list[torch.Tensor] = []
    params = [
        capture(SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25), seen),
        capture(SamplingParams(temperature=0, presence_penalty=-1.0), seen),
    ]
    sample(logits, params, prompt=prompt, outputs=outputs)
    counts = torch.bincount(torch.tensor(outputs), minlength=30).float()  # over the output only
    want0 = logits[0] - 0.25 * counts - 0.5 * (counts > 0).float()
    want1 = logits[1] + 1.0 * (counts > 0).float()
    torch.testing.assert_close(seen[0], want0, atol=1e-6, rtol=0)
    torch.testing.assert_close(seen[1], want1, atol=1e-6, rtol=0)
    assert seen[0][5] == logits[0, 5] and seen[0][6] == logits[0, 6]  # prompt-only tokens are not penalised


# -- min_tokens, EOS, stop tokens ----------------------------------------------------------------------------------
def test_min_tokens_suppresses_eos_and_stop_tokens():
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0, 8.0, 7.0]])  # EOS=3 best, then 4, then 5
    p = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[4])
    assert sample(logits, [p], outputs=[1]).tokens == [5]  # 1 < 3 tokens so far: EOS and 4 banned
    assert sample(logits, [p], outputs=[1, 1, 1]).tokens == [EOS]
    p = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[4], ignore_eos=True)
    assert sample(logits, [p], outputs=[1]).tokens == [EOS]  # ignore_eos: EOS is an ordinary token
    # sampling (not greedy) too: EOS can never be drawn while suppressed
    torch.manual_seed(0)
    p = SamplingParams(temperature=5.0, min_tokens=2)
    assert EOS not in sample(logits.expand(500, -1), [p] * 500, outputs=[1]).tokens


# -- logprobs -------------------------------------------------------------------------------------------------------
def test_logprobs_shape_values_and_rank():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 50, generator=g)

    def ban_top2(output_ids, row):
        row = row.clone()
        row[row.topk(2).indices] = NEG_INF
        return row

    params = [
        SamplingParams(temperature=0, logprobs=3),
        SamplingParams(temperature=0, logprobs=5, logits_processors=[ban_top2]),  # picks the raw 3rd best
        SamplingParams(temperature=0),  # no logprobs wanted on this row
        SamplingParams(temperature=1.0, seed=1, logprobs=0),
    ]
    out = sample(logits, params)
    raw = logits.log_softmax(-1)
    assert out.logprob_rows == [0, 1, 3], "only the rows that asked"
    assert [len(ids) for ids in out.top_ids] == [3, 5, 0] and [len(v) for v in out.top_logprobs] == [3, 5, 0]
    for j, i in enumerate(out.logprob_rows):
        tok = out.tokens[i]
        assert out.logprobs[j] == pytest.approx(raw[i, tok].item(), abs=1e-6)  # of the raw distribution
        assert out.ranks[j] == 1 + int((raw[i] > raw[i, tok]).sum())
        k = params[i].logprobs
        vals, ids = raw[i].topk(k)
        assert out.top_ids[j] == ids.tolist()
        torch.testing.assert_close(torch.tensor(out.top_logprobs[j]), vals)
    assert out.ranks[0] == 1 and out.ranks[1] == 3


def test_no_logprobs_computed_when_nobody_asks():
    out = sample(torch.randn(3, 20), [SamplingParams(temperature=0)] * 3)
    assert out.logprob_rows == [] and out.logprobs == [] and out.top_ids == []


# -- seeds ----------------------------------------------------------------------------------------------------------
def test_seeded_row_does_not_depend_on_batch_mates():
    g = torch.Generator().manual_seed(6)
    target = torch.randn(1, 200, generator=g)
    mates = torch.randn(5, 200, generator=g)
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    alone_seq = make_seqs([p])
    sampler = Sampler([EOS])
    alone = _decode_steps(lambda step: target, alone_seq, sampler, 40, row=0)
    batch_params = [
        SamplingParams(temperature=1.0, seed=99),
        SamplingParams(temperature=0.7),
        p,
        SamplingParams(temperature=0),
        SamplingParams(temperature=2.0, top_k=5, seed=5),
        SamplingParams(temperature=1.0),
    ]
    seqs = make_seqs(batch_params)


    def logits(step: int) -> torch.Tensor:
        torch.manual_seed(step)  # the global generator moves differently in a batch; it must not matter
        mix = step * 0.01 * torch.arange(6.0)[:, None] * (torch.arange(6)[:, None] != 2)
        return torch.cat([mates[:2], target, mates[2:]]) + mix

    together = _decode_steps(logits, seqs, sampler, 40, row=2)
    assert together == alone
    assert len(set(alone)) > 10, "the draw should actually be random"
    other = make_seqs([SamplingParams(temperature=1.0, top_p=0.95, seed=1235)])
    assert _decode_steps(lambda step: target, other, sampler, 40, row=0) != alone


def test_seeded_uniforms_are_uniform_and_differ_by_seed():
    """seeded_uniform(seed, index): 20,000 draws of one seed fill 20 equal bins within 5 sigma and have mean 1/2;
    a neighbouring seed (the next fork's) gives another stream."""
    from turbofan.engine.sampler import seeded_uniform

    draws = torch.tensor([seeded_uniform(42, i) for i in range(20_000)], dtype=torch.float64)
    assert float(draws.min()) >= 0.0 and float(draws.max()) < 1.0
    counts = torch.histc(draws, bins=20, min=0.0, max=1.0)
    assert float((counts - 1000).abs().max()) < 5 * (1000 * 0.95) ** 0.5, counts
    assert abs(float(draws.mean()) - 0.5) < 0.01
    assert [seeded_uniform(43, i) for i in range(100)] != draws[:100].tolist()
    assert seeded_uniform(42, 7) == seeded_uniform(42, 7)


def _decode_steps(logits_of, seqs, sampler, steps: int, row: int) -> list[int]:
    """`steps` decode steps of `seqs` (each sampled token appended to its sequence, as the engine does: a seeded
    draw is keyed by the index of the token it draws); returns the tokens of sequence `row`."""
    drawn = []
    for step in range(steps):
        tokens = sample_seqs(logits_of(step), seqs, sampler).tokens
        for seq, token in zip(seqs, tokens):
            seq.token_ids.append(token)
        drawn.append(tokens[row])
    return drawn


# -- end to end through LLM: stop strings, stop tokens, EOS, length -----------------------------------------------
def forcing(token_ids: list[int]):
    """A logits processor that makes the model say `token_ids` (then repeat the last one)."""

    def proc(output_ids, row):
        forced = torch.full_like(row, NEG_INF)
        forced[token_ids[min(len(output_ids), len(token_ids) - 1)]] = 0.0
        return forced

    return proc


def stream(llm, prompt, params) -> list:
    """What a streaming client has seen after each delta: the cumulative RequestOutput, delta by delta."""
    engine = llm.engine
    engine.add_request("s", prompt, params)
    builder = OutputBuilder()
    outs = []
    while engine.has_unfinished_requests():
        for delta in engine.step():
            if delta.request_id == "s":
                outs.append(builder.add(delta).output())
    return outs


PROMPTS = [
    "The quick brown fox",
    "Continuous batching lets requests join",
    "Paged attention stores keys",
    "0123456789 !?.,;:",
    "lazy dog.",
    "Paged",
]


def _stop_candidates(text_after: list[str]):
    """(stop string, start) pairs straddling a token boundary: last char of one token + first of the next."""
    out = []
    for i in range(1, len(text_after) - 1):
        prev, cur, nxt = text_after[i - 1], text_after[i], text_after[i + 1]
        if len(cur) - len(prev) < 1 or len(nxt) - len(cur) < 1:
            continue
        a, b = len(cur) - 1, len(cur) + 1
        s = nxt[a:b]
        if s.isprintable() and s.strip() and "\ufffd" not in s and nxt.find(s) == a:
            out.append((s, a))
    return out


def test_stop_string_spanning_tokens_from_a_greedy_run(tiny_llm):
    greedy = dict(temperature=0, max_tokens=20, ignore_eos=True)
    tested = 0
    for prompt in PROMPTS:
        first = stream(tiny_llm, prompt, SamplingParams(**greedy))
        texts = [o.outputs[0].text for o in first]
        full = texts[-1]
        for stop, at in _stop_candidates(texts)[:2]:
            outs = stream(tiny_llm, prompt, SamplingParams(**greedy, stop=[stop]))
            final = outs[-1].outputs[0]
            assert final.text == full[:at], (stop, full)
            assert final.finish_reason == "stop" and final.stop_reason == stop
            for o in outs:  # a stream never shows what the stop string will remove
                assert final.text.startswith(o.outputs[0].text)
            kept = stream(
                tiny_llm, prompt, SamplingParams(**greedy, stop=[stop], include_stop_str_in_output=True)
            )
            assert kept[-1].outputs[0].text == full[: at + len(stop)]
            tested += 1
    assert tested >= 3, "no stop string spanning two tokens found in the greedy outputs"


def test_stop_string_spanning_forced_tokens(tiny_llm):
    tok = tiny_llm.get_tokenizer()
    said = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(said)
    pieces = [tok.decode(ids[: i + 1]) for i in range(len(ids))]
    # a stop string made of the end of one token and the start of the next
    i = next(i for i in range(len(ids) - 1) if len(pieces[i]) - len(pieces[i - 1] if i else "") >= 2)
    at = len(pieces[i]) - 2
    stop = said[at : at + 4]
    assert said.find(stop) == at
    params = SamplingParams(
        temperature=0, max_tokens=len(ids) + 5, stop=[stop, "zzz"], logits_processors=[forcing(ids)]
    )
    outs = stream(tiny_llm, "Hello", params)
    final = outs[-1].outputs[0]
    assert final.text == said[:at] and final.finish_reason == "stop" and final.stop_reason == stop
    assert all(final.text.startswith(o.outputs[0].text) for o in outs)


def test_stop_token_ids_and_length(tiny_llm):
    base = dict(temperature=0, max_tokens=20, ignore_eos=True)
    out = tiny_llm.generate("The quick brown fox", SamplingParams(**base), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 20 and out.stop_reason is None
    k = 5
    stop_tok = out.token_ids[k]
    first = out.token_ids.index(stop_tok)
    out2 = tiny_llm.generate(
        "The quick brown fox", SamplingParams(**base, stop_token_ids=[stop_tok]), use_tqdm=False
    )[0].outputs[0]
    assert out2.token_ids == out.token_ids[: first + 1]
    assert out2.finish_reason == "stop" and out2.stop_reason == stop_tok
    short = tiny_llm.generate("The quick", SamplingParams(**{**base, "max_tokens": 3}), use_tqdm=False)
    full = tiny_llm.generate("The quick", SamplingParams(**base), use_tqdm=False)
    assert short[0].outputs[0].token_ids == full[0].outputs[0].token_ids[:3]
    short = short[0].outputs[0]
    assert short.finish_reason == "length"


def test_eos_stops_unless_ignored_and_respects_min_tokens(tiny_llm):
    eos = tiny_llm.engine.sampler.eos_token_ids[0]

    def boost_eos(output_ids, row):
        row = row.clone()
        row[eos] += 100.0
        return row

    def run(**kw):
        p = SamplingParams(temperature=0, max_tokens=10, logits_processors=[boost_eos], **kw)
        return tiny_llm.generate("The quick", p, use_tqdm=False)[0].outputs[0]

    out = run()
    assert out.token_ids == [eos] and out.finish_reason == "stop"
    out = run(min_tokens=4)
    assert len(out.token_ids) == 5 and out.token_ids[-1] == eos and eos not in out.token_ids[:-1]
    assert out.finish_reason == "stop"
    out = run(ignore_eos=True)
    assert out.token_ids == [eos] * 10 and out.finish_reason == "length"


def test_logprobs_through_llm_match_transformers(tiny_llm, tiny_models):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_models["llama"]), dtype=torch.float32)
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=8, logprobs=2, prompt_logprobs=1)
    out = tiny_llm.generate("The quick brown fox", params, use_tqdm=False)[0]
    comp = out.outputs[0]
    ids = out.prompt_token_ids + comp.token_ids
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    n = len(out.prompt_token_ids)
    assert len(comp.logprobs) == len(comp.token_ids)
    total = 0.0
    for j, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = ref[n - 1 + j]
        assert tok in entry and len(entry) <= 3
        assert entry[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4)
        assert entry[tok].rank == 1 + int((row > row[tok]).sum())
        top = row.topk(2).indices.tolist()
        for t, lp in entry.items():
            if t != tok:
                assert t == top[lp.rank - 1] and lp.logprob == pytest.approx(row[t].item(), abs=1e-4)
        assert set(top) <= set(entry)
        total += entry[tok].logprob
    assert comp.cumulative_logprob == pytest.approx(total, abs=1e-4)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n
    for j in range(1, n):
        entry = out.prompt_logprobs[j]
        tok = out.prompt_token_ids[j]
        assert entry[tok].logprob == pytest.approx(ref[j - 1, tok].item(), abs=1e-4)


# -- detokenizer: Chinese never shows U+FFFD mid-stream -----------------------------------------------------------
CHINESE = ["你好，世界。今天天气很好。", "我们喜欢机器学习和深度神经网络。", "天气很好，我们去公园散步吧！"]


@pytest.mark.parametrize("sentence", CHINESE)
def test_detokenizer_streams_chinese_without_replacement_chars(tiny_models, sentence):
    tok = Tokenizer(tiny_models["llama"])
    det = Detokenizer(tok)
    ids = tok.encode(sentence, add_special_tokens=False)
    assert tok.decode(ids) == sentence
    assert len(ids) > len(sentence) / 2, "some characters must be split across byte-level tokens"
    request = Request("c", "Hello", tok.encode("Hello "), SamplingParams())
    seq = request.seqs[0]
    texts = []
    for t in ids:
        seq.token_ids.append(t)
        det.append(seq, t)
        texts.append(seq.output_text)
    assert texts[-1] == sentence
    for text in texts:
        assert "\ufffd" not in text and sentence.startswith(text)
    assert len(set(texts)) < len(texts), "at least one token should have been held back as an incomplete char"


def test_engine_stream_of_chinese_is_clean(tiny_llm):
    tok = tiny_llm.get_tokenizer()
    said = CHINESE[1]
    ids = tok.encode(said, add_special_tokens=False)
    params = SamplingParams(temperature=0, max_tokens=len(ids), logits_processors=[forcing(ids)])
    outs = stream(tiny_llm, "The quick", params)
    assert outs[-1].outputs[0].text == said and outs[-1].outputs[0].token_ids == ids
    for o in outs:
        assert "\ufffd" not in o.outputs[0].text and said.startswith(o.outputs[0].text)


# -- 6. bad parameters ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"n": 0}, "n must be at least 1"),
        ({"n": -3}, "n must be at least 1"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 3}, "min_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"n": 3, "best_of": 2}, "best_of"),
    ],
)
def test_bad_sampling_params_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        SamplingParams(**kwargs)
    bad_value = next(iter(kwargs.values()))
    assert str(bad_value) in str(info.value), f"the message should show the offending value: {info.value}"


def test_good_edge_params_are_accepted():
    SamplingParams(temperature=0, top_p=1.0, top_k=-1)
    SamplingParams(top_k=0, min_p=0.0, n=1, top_p=1e-9)


@pytest.fixture
def short_llm(make_llm):
    return make_llm(max_model_len=32)


def test_prompt_longer_than_context(short_llm):
    with pytest.raises(ValueError, match="maximum context length is 32"):
        short_llm.generate([[5] * 40], SamplingParams(max_tokens=1), use_tqdm=False)
    with pytest.raises(ValueError, match="maximum context length is 32"):
        short_llm.generate([[5] * 32], SamplingParams(max_tokens=1), use_tqdm=False)
    with pytest.raises(ValueError, match="30 in the prompt, 10 in the completion"):
        short_llm.generate([[5] * 30], SamplingParams(max_tokens=10), use_tqdm=False)
    out = short_llm.generate([[5] * 30], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 2


def test_max_tokens_none_fills_the_context_per_prompt(short_llm):
    """max_tokens=None means "up to the context" for each prompt, even when one SamplingParams serves several."""
    params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    outs = short_llm.generate([[5] * 4, [6] * 20], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [28, 12]
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert params.max_tokens is None, "the caller's SamplingParams must not be modified"


@pytest.mark.parametrize("prompt", ["", [], {"prompt_token_ids": []}, {"prompt": ""}], ids=repr)
def test_empty_prompt(tiny_llm, prompt):
    with pytest.raises(ValueError, match="empty"):
        if isinstance(prompt, list):
            tiny_llm.engine.add_request("e", prompt, SamplingParams())
        else:
            tiny_llm.generate(prompt, SamplingParams(), use_tqdm=False)


def test_token_ids_outside_vocab(tiny_llm, tiny_models):
    vocab = json.loads((tiny_models["llama"] / "config.json").read_text())["vocab_size"]
    for ids in ([1, 2, vocab], [-1], [10**9]):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tiny_llm.generate([ids], SamplingParams(), use_tqdm=False)
    ok = tiny_llm.generate([[0, vocab - 1]], SamplingParams(max_tokens=1), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 1


def test_errors_are_understandable():
    """A person reading the message learns what is wrong and what is allowed."""
    with pytest.raises(ValueError) as info:
        SamplingParams(top_p=1.5)
    msg = str(info.value)
    assert "(0, 1]" in msg and "1.5" in msg


def test_truncated_rows_sampled_by_width_draw_what_each_row_draws_alone():
    """Rows of small top-k and wide rows are drawn apart (one topk as wide as the widest row would make every row
    pay for it); a row's token must not change with its batch mates' widths."""
    from turbofan.engine.sampler import _sample_truncated, _sample_truncated_by_width

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5000, generator=g) * 3
    top_k = torch.tensor([1, 5, 1000, 40, 5000, 64])
    top_p = torch.tensor([1.0, 0.9, 0.95, 1.0, 0.8, 1.0])
    temp, min_p = torch.full((6,), 0.8), torch.zeros(6)
    for trial in range(30):
        u = torch.rand(6, generator=g, dtype=torch.float64)
        together = _sample_truncated_by_width(logits.clone(), temp, top_k, top_p, min_p, u)
        alone = [int(_sample_truncated(logits[i : i + 1].clone(), temp[i : i + 1], top_k[i : i + 1],
                                       top_p[i : i + 1], min_p[i : i + 1], u[i : i + 1])[0]) for i in range(6)]  # fmt: skip
        assert together.tolist() == alone, trial

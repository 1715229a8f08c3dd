import pytest
from test_speculative import DRAFT_CASES, _draft, _firsts, _greedy
@pytest.mark.parametrize("name", ["small_batched", "noisy_batched", "noisy_adaptive", "same_batched", "noisy_preemption"])
def test_show(name, make_llm, drafts, prompts):
    which, adaptive, batched, extra = DRAFT_CASES[name]
    llm = make_llm(speculative_config=_draft(drafts[which], adaptive=adaptive), **extra)
    llm.generate(prompts, _greedy(40), use_tqdm=False)
    s = llm.speculative_stats()
    print(name, {k: s[k] for k in ("num_draft_tokens","num_accepted_tokens","acceptance_rate","draft_forwards","draft_tokens_run","num_gated_steps")})

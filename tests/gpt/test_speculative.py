"""Speculative decoding (gpt.speculative): greedy output identical to the target alone (window slides,
stops, batches, penalty, drafts of another context size, compiled); the accept/reject rule keeps the
target's distribution exactly (position by position, and for whole sampled sequences against the
enumerated distribution, with and without filters), while deliberately wrong rules fail the same
checks; the draft is checked before any work."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import gpt.sampling
import tokenizers_bpe
import gpt.speculative as speculative
from gpt.model import GPT, GPTConfig
from gpt.sampling import generate
from gpt.token_choice import SamplingRule
from tests.gpt.test_sampling import TEXTS, make_tiny_model, small_tokenizer


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


@pytest.fixture(scope="module")
def target(tok):
    return make_tiny_model(tok, n_ctx=32)


@pytest.fixture(scope="module")
def draft(tok):
    return make_tiny_model(tok, seed=3, n_ctx=32, n_layer=1)


# ---------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_is_the_targets_own_output(tok, target, draft, k):
    prompt = tok.encode_ordinary("To be or not")
    for kwargs in (dict(), dict(repetition_penalty=1.3), dict(num_samples=3)):
        alone = generate(target, prompt, 70, temperature=0, stop_tokens=(), **kwargs)  # slides the 32-token window
        assert generate(target, prompt, 70, temperature=0, stop_tokens=(), draft=draft, draft_tokens=k, **kwargs) == alone


def test_drafts_with_other_context_sizes_and_stops(tok, target):
    prompt = tok.encode_ordinary("Hello world")
    full = generate(target, prompt, 50, temperature=0, stop_tokens=())[0]
    stop = full[20]  # a token that occurs: the output ends before its first occurrence
    expected = [full[: full.index(stop)]]
    for n_ctx in (8, 64):
        other = make_tiny_model(tok, seed=5, n_ctx=n_ctx, n_layer=1)
        streamed = []
        out = generate(target, prompt, 50, temperature=0, stop_tokens=(stop,), draft=other, draft_tokens=4,
                       stream=lambda i, t: streamed.append(t))
        assert out == expected and streamed == expected[0]


def test_a_perfect_draft_is_always_accepted(tok, target):
    """The target as its own draft: every drafted token is accepted, also across window slides (the
    draft starts over from what the target sees)."""
    stats = {}
    prompt = tok.encode_ordinary("To be")
    out = generate(target, prompt, 80, temperature=0, stop_tokens=(), draft=target, draft_tokens=4, stats=stats)
    assert out == generate(target, prompt, 80, temperature=0, stop_tokens=())
    assert stats["accepted"] == stats["drafted"] > 40 and stats["rounds"] < 30


def test_compiled_greedy(tok, target, draft):
    prompt = tok.encode_ordinary("To be or not")
    alone = generate(target, prompt, 40, temperature=0, stop_tokens=())
    assert generate(target, prompt, 40, temperature=0, stop_tokens=(), draft=draft, draft_tokens=3, compile=True) == alone


# ---------------------------------------------------------------------------------------------- the rule
# Wrong rules, each a plausible mistake; the checks below must fail them (so they can fail at all).
RULE = speculative.accept_reject


def rule_resampling_from_p(p, q, drafted, rule, generator):
    """On a rejection, draws from p instead of the residual max(0, p - q)."""
    n, _ = RULE(p, q, drafted, rule, generator)
    return n, torch.multinomial(p[torch.arange(len(n)), n], 1, generator=generator).squeeze(1)


def rule_bonus_from_q(p, q, drafted, rule, generator):
    """When all K are accepted, draws the bonus token from the draft's last distribution."""
    n, token = RULE(p, q, drafted, rule, generator)
    bonus = torch.multinomial(q[:, -1], 1, generator=generator).squeeze(1)
    return n, torch.where(n == drafted.shape[1], bonus, token)


def rule_always_accepting(p, q, drafted, rule, generator):
    K = drafted.shape[1]
    return torch.full((drafted.shape[0],), K), torch.multinomial(p[:, K], 1, generator=generator).squeeze(1)


WRONG_RULES = [rule_resampling_from_p, rule_bonus_from_q, rule_always_accepting]


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of observed ``counts`` against ``probs``; outcomes expected fewer than 5 times
    are pooled into one cell. An outcome of probability 0 that occurs gives p-value 0."""
    counts, probs = counts.double(), probs.double()
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = probs * counts.sum()
    big = expected >= 5
    cells_observed = torch.cat([counts[big], counts[~big].sum()[None]])
    cells_expected = torch.cat([expected[big], expected[~big].sum()[None]])
    used = cells_expected > 0
    stat = ((cells_observed[used] - cells_expected[used]) ** 2 / cells_expected[used]).sum()
    df = int(used.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def rule_positions(accept_reject, p, q, rows: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One round on ``rows`` rows with context-free distributions p (K+1, V) and q (K, V): per
    position j, (the counts of the tokens emitted at j over the rows that emit one, p_j)."""
    K, V = q.shape
    generator = torch.Generator().manual_seed(seed)
    drafted = torch.multinomial(q, rows, replacement=True, generator=generator).T  # (rows, K), column j ~ q_j
    n, token = accept_reject(p.expand(rows, -1, -1), q.expand(rows, -1, -1), drafted, SamplingRule(1.0, None, None, None), generator)
    emitted = torch.cat([drafted, torch.zeros(rows, 1, dtype=torch.long)], dim=1)
    emitted[torch.arange(rows), n] = token  # row r emits emitted[r, :n + 1]
    return [(torch.bincount(emitted[n >= j, j], minlength=V), p[j]) for j in range(K + 1)]


def test_each_position_has_the_targets_distribution():
    """Context-free p and q, 200k rows in one call: the token emitted at each position (an accepted
    draft token, the residual draw or the bonus) follows p_j; every wrong rule breaks some position."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(4, 6, generator=g) * 1.5, -1)
    q = torch.softmax(torch.log(p[:3]) + torch.randn(3, 6, generator=g), -1)  # a draft that is close, not equal
    for counts, pj in rule_positions(RULE, p, q, 200_000, seed=1):
        assert counts.sum() > 5_000 and chi_square_p_value(counts, pj) > 1e-3
    for wrong in WRONG_RULES:
        p_values = [chi_square_p_value(counts, pj) for counts, pj in rule_positions(wrong, p, q, 200_000, seed=1)]
        assert min(p_values) < 1e-9, wrong.__name__


V, NEW = 4, 4  # a 4-token vocabulary and 4 new tokens: 256 possible outputs


def micro_gpt(seed: int) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=V, n_ctx=8, n_embd=8, n_layer=1, n_head=2, backend="torch"))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.6)
    return model.eval()


def exact_distribution(model: GPT, rule: SamplingRule, prompt: list[int]) -> torch.Tensor:
    """The probability of each of the V**NEW outputs under the target alone, with ``rule``."""
    outputs = torch.tensor(list(itertools.product(range(V), repeat=NEW)))
    idx = torch.cat([torch.tensor(prompt).expand(len(outputs), -1), outputs], dim=1)
    with torch.no_grad():
        logits = model(idx)[0]
    prob = torch.ones(len(outputs), dtype=torch.float64)
    for j in range(NEW):
        position = len(prompt) - 1 + j
        seen = torch.zeros(len(outputs), V, dtype=torch.bool).scatter_(1, idx[:, : position + 1], True) if rule.penalised else None
        prob *= rule.distribution(logits[:, position], seen).gather(1, outputs[:, j, None]).squeeze(1).double()
    return prob


def sampled_counts(target, draft, rule: SamplingRule, prompt, calls: int, rows: int) -> torch.Tensor:
    counts = torch.zeros(V ** NEW)
    settings = dict(temperature=rule.temperature, top_k=rule.top_k, top_p=rule.top_p, repetition_penalty=rule.repetition_penalty)
    for seed in range(calls):
        for out in generate(target, prompt, NEW, stop_tokens=(), seed=seed, num_samples=rows, draft=draft, draft_tokens=2, **settings):
            counts[sum(t * V ** (NEW - 1 - i) for i, t in enumerate(out))] += 1
    return counts


@pytest.mark.parametrize("rule", [SamplingRule(1.0, None, None, None), SamplingRule(0.8, 3, 0.9, 1.5)], ids=["plain", "filtered"])
def test_sampled_sequences_follow_the_targets_distribution(rule, monkeypatch):
    """Whole outputs of generate(draft=...) (2 rows per call, K=2: drafts accepted in part, in full
    with a bonus token, rejected) against the target's exact distribution of all 256 outputs; the
    filters and the penalty apply to the draft's q as to p. Resampling from p instead of the residual
    fails the same test."""
    target, prompt = micro_gpt(0), [0]
    draft = copy.deepcopy(target)  # close to the target, so that whole drafts are accepted too
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for p in draft.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    probs = exact_distribution(target, rule, prompt)
    stats = {}
    generate(target, prompt, 100, stop_tokens=(), seed=0, draft=draft, draft_tokens=2, stats=stats, **rule._asdict())
    assert 0.2 < stats["accepted"] / stats["drafted"] < 0.9  # the draft is neither useless nor perfect
    assert chi_square_p_value(sampled_counts(target, draft, rule, prompt, 600, 2), probs) > 1e-3
    monkeypatch.setattr(speculative, "accept_reject", rule_resampling_from_p)
    assert chi_square_p_value(sampled_counts(target, draft, rule, prompt, 600, 2), probs) < 1e-6


# ---------------------------------------------------------------------------------------------- checks


def test_draft_is_checked_before_any_work(tok, target, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("decoding started")

    monkeypatch.setattr(gpt.sampling, "Decoder", no_work)
    foreign = make_tiny_model(tokenizers_bpe.train_from_iterator([text[::-1] for text in TEXTS], 300), n_ctx=32)
    assert foreign.config.vocab_size == target.config.vocab_size  # the same size, other merges
    with pytest.raises(ValueError, match="tokenizer is not the target's"):
        generate(target, [1, 2], 5, draft=foreign)
    bare = GPT(GPTConfig(vocab_size=299, n_ctx=32, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="299 tokens"):
        generate(target, [1, 2], 5, draft=bare)
    for k in (0, True, 2.5):
        with pytest.raises(ValueError, match="draft_tokens"):
            generate(target, [1, 2], 5, draft=target, draft_tokens=k)
    with pytest.raises(ValueError, match="gpt.GPT"):
        generate(target, [1, 2], 5, draft=object())

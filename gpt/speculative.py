"""Speculative decoding: a small draft model proposes K tokens, the target model checks them in one
forward pass, and every accepted token saves the target a decoding step.

The rule (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen
et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling"), per round, with
q_j the draft's and p_j the target's distribution for position j (both after the same repetition
penalty, temperature, top-k and top-p, gpt.token_choice):

1. the draft draws d_0 ~ q_0, ..., d_{K-1} ~ q_{K-1}, one step each;
2. the target computes p_0 .. p_K for all of them in one pass (positions of x, d_0 .. d_{K-1});
3. d_j is accepted with probability min(1, p_j(d_j) / q_j(d_j)), in order, until the first
   rejection; at the first rejected position j the token is drawn from norm(max(0, p_j - q_j)), and
   when all K are accepted a bonus token is drawn from p_K.

Each emitted token then has exactly the target's distribution given the tokens before it, whatever
the draft (tests/gpt/test_speculative.py checks the distribution of whole sequences on a tiny
vocabulary against the exact one). Greedy decoding (temperature 0) is the same rule with point
masses: d_j is accepted while it is the target's arg-max, so the output is the target's own greedy
output.

A batch of rows advances together: every row keeps the first m accepted tokens, m the smallest
number any unfinished row accepted, plus its own token at position m (its residual or bonus draw
where it stopped there, its accepted draft token where it went further). Each row's token at m is
still distributed as its own standard rule makes it, and the positions after m are discarded and
drawn again in the next round, so the rule stays exact; a batch only accepts less per round.

What it saves, on a CPU: a round costs K draft steps and one verification of K + 1 tokens. Eagerly
the verification costs about one target step (it reads oneDNN's weights packed for a few rows,
gpt.decode), so every accepted token is nearly free. Compiled, a target step streams its weights
about twice as fast as any product of several rows runs on this CPU, so a verification costs ~2.5
steps and a draft pays only when most of its tokens are accepted (benches/README.md, Generation,
measures both on a trained pair).

The context window is the target's own rule (gpt.sampling): a round never crosses the point where
the target alone would slide its window (K shrinks near it) and slides there in the same way, so
every token is conditioned on exactly the same tokens as without a draft. The draft has a window of
its own (its n_ctx may differ) and slides when it must; what it sees affects only how much is
accepted, never the output's distribution.
"""

from __future__ import annotations

import torch

from gpt.decode import Decoder
from gpt.token_choice import SamplingRule


def check_draft(target, draft, draft_tokens) -> None:
    """ValueError, before any work, when ``draft`` cannot draft for ``target``: it must share the
    target's tokenizer (the same fingerprint when both models carry one; the same vocabulary size in
    any case) and sit on the same device."""
    if not isinstance(draft_tokens, int) or isinstance(draft_tokens, bool) or draft_tokens < 1:
        raise ValueError(f"draft_tokens must be an integer >= 1, got {draft_tokens!r}")
    if not hasattr(draft, "config") or not hasattr(draft, "transformer"):
        raise ValueError(f"the draft must be a gpt.GPT, got {type(draft).__name__}")
    tokenizers = [getattr(m, "tokenizer", None) for m in (target, draft)]
    if None not in tokenizers and tokenizers[0].fingerprint() != tokenizers[1].fingerprint():
        raise ValueError("the draft model's tokenizer is not the target's (their fingerprints differ); "
                         "a draft must be trained with the target's tokenizer")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"the draft model's vocabulary has {draft.config.vocab_size} tokens, the target's "
                         f"{target.config.vocab_size}; a draft must share the target's tokenizer")
    devices = {next(m.parameters()).device for m in (target, draft)}
    if len(devices) > 1:
        raise ValueError(f"the draft and the target must be on one device, got {', '.join(sorted(map(str, devices)))}")


def accept_reject(p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, rule: SamplingRule,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3 of the module docstring for every row. ``p`` (B, K+1, V) target probabilities (or
    logits when greedy), ``q`` (B, K, V) draft probabilities (unused when greedy), ``drafted``
    (B, K). Returns n (B,), the number of accepted draft tokens, and (B,) the token at position n:
    the draw from the residual where d_n was rejected, the bonus draw from p_K where n == K."""
    B, K = drafted.shape
    rows = torch.arange(B, device=drafted.device)
    if q is None:  # nothing drafted
        q = p.new_zeros(B, 0, p.shape[-1])
    if rule.greedy:
        best = p.argmax(-1)  # (B, K + 1)
        matches = drafted == best[:, :K]
        n = matches.long().cumprod(-1).sum(-1)
        return n, best[rows, n]
    p_drafted = p[:, :K].gather(-1, drafted[..., None]).squeeze(-1)
    q_drafted = q.gather(-1, drafted[..., None]).squeeze(-1)  # > 0: each d_j was drawn from q_j
    accepted = torch.rand(B, K, generator=generator, device=p.device) < p_drafted / q_drafted
    n = accepted.long().cumprod(-1).sum(-1)
    # Where n == K the padded q row is zero, so the "residual" is p_K itself: the bonus draw.
    q_at_n = torch.cat([q, q.new_zeros(B, 1, q.shape[-1])], dim=1)[rows, n]
    residual = (p[rows, n] - q_at_n).clamp_(min=0)
    total = residual.sum(-1, keepdim=True)
    # p == q to the last bit leaves no residual (and then a rejection has probability 0): fall back to p.
    residual = torch.where(total > 0, residual, p[rows, n])
    return n, torch.multinomial(residual, 1, generator=generator).squeeze(1)


def _seen_after(seen: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor | None:
    """(B, T+1, V): the repetition-penalty marks before each of T more tokens and after the last."""
    if seen is None:
        return None
    marks = [seen]
    rows = torch.arange(seen.shape[0], device=seen.device)
    for j in range(tokens.shape[1]):
        nxt = marks[-1].clone()
        nxt[rows, tokens[:, j]] = True
        marks.append(nxt)
    return torch.stack(marks, dim=1)


def speculative_decode(target: Decoder, draft: Decoder, x: torch.Tensor, *, rule: SamplingRule, draft_tokens: int,
                       remaining: int, outputs, generator: torch.Generator | None, stats: dict | None = None) -> None:
    """Decode up to ``remaining`` more tokens after ``x`` (B,), the last chosen token: already
    emitted, fed to neither model yet. The target's cache holds the sequence before x; the draft
    starts empty. ``outputs`` collects the tokens (gpt.sampling's): ``add(tokens)`` takes one token
    per row and says whether every row has finished, ``finished`` marks the rows that have, and
    ``seen`` is the current repetition-penalty marks (or None). ``stats``, when given, receives the
    number of rounds, of drafted tokens and of accepted ones."""
    keep_target = max(1, target.n_ctx // 2)
    pending = torch.cat([target.tokens[:, : target.length], x[:, None]], dim=1)  # what the draft has not seen
    drafted_total = accepted_total = rounds = 0
    while remaining > 0:
        if target.room() == 0:  # the target alone would slide here: the same rebuild, one plain step
            window = torch.cat([target.tokens[:, : target.length], x[:, None]], dim=1)[:, -keep_target:]
            x = rule.choose(_finite(target.prefill(window)), outputs.seen, generator)
            # The draft starts over from what the target now sees: the closer their contexts, the more it gets accepted.
            draft.rewind(0)
            pending = torch.cat([window, x[:, None]], dim=1)
            remaining -= 1
            if outputs.add(x):
                break
            continue
        # Draft up to the end (the last round may draft past it: a plain step would cost the same as a
        # verification), but never past the point where the target would slide its window.
        k = min(draft_tokens, remaining, target.room() - 1, draft.n_ctx - 1)
        drafted, q = _propose(draft, pending, k, rule, outputs.seen, generator)
        logits = _finite(target.extend(torch.cat([x[:, None], drafted], dim=1), all_positions=True))  # (B, k+1, V)
        seen_marks = _seen_after(outputs.seen, drafted)
        p = rule.adjust(logits, seen_marks) if rule.greedy else rule.distribution(logits, seen_marks)
        n, token_at_n = accept_reject(p, q, drafted, rule, generator)
        active = ~torch.tensor(outputs.finished, device=n.device)
        m = int(n[active].min())  # the rows advance together (module docstring); finished rows do not count
        y = token_at_n if m == k else torch.where(n == m, token_at_n, drafted[:, m])
        target.rewind(target.length - k + m)
        fed = min(m, k - 1) if k else 0  # draft tokens the draft itself has fed (all but the last)
        if k:
            draft.rewind(draft.length - (k - 1) + fed)
        pending = torch.cat([drafted[:, fed:m], y[:, None]], dim=1) if k else torch.cat([pending, y[:, None]], dim=1)
        rounds, drafted_total, accepted_total = rounds + 1, drafted_total + k, accepted_total + m
        done = False
        for token in [*drafted[:, :m].unbind(1), y]:
            remaining -= 1
            if outputs.add(token) or remaining == 0:
                done = True
                break
        if done:
            break
        x = y
    if stats is not None:
        stats.update(rounds=rounds, drafted=drafted_total, accepted=accepted_total)


def _propose(draft: Decoder, pending: torch.Tensor, k: int, rule: SamplingRule, seen: torch.Tensor | None,
             generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Feed the draft what it has not seen, then draw k tokens from it: (B, k) tokens and their
    distributions (B, k, V) (None when greedy)."""
    B = pending.shape[0]
    if k == 0:
        return pending.new_zeros(B, 0), None
    if draft.length == 0 or pending.shape[1] + k - 1 > draft.room():  # it feeds pending and k - 1 of its own
        # Start (or start over) from the tokens it should hold; where they and k - 1 more do not fit,
        # slide its own window as generate does: keep the last half of its context.
        window = torch.cat([draft.tokens[:, : draft.length], pending], dim=1)
        if window.shape[1] + k - 1 > draft.n_ctx:
            window = window[:, -max(1, min(draft.n_ctx // 2, draft.n_ctx - (k - 1))):]
        logits = draft.prefill(window)
    else:
        for j in range(pending.shape[1]):
            logits = draft.step(pending[:, j])
    tokens, dists = [], []
    marks = seen
    rows = torch.arange(B, device=pending.device)
    for j in range(k):
        if j:
            logits = draft.step(tokens[-1])
        logits = _finite(logits, "the draft model's")
        if rule.greedy:
            tokens.append(rule.adjust(logits, marks).argmax(-1))
        else:
            dists.append(rule.distribution(logits, marks))
            tokens.append(torch.multinomial(dists[-1], 1, generator=generator).squeeze(1))
        if marks is not None:
            marks = marks.clone()
            marks[rows, tokens[-1]] = True
    return torch.stack(tokens, dim=1), None if rule.greedy else torch.stack(dists, dim=1)


def _finite(logits: torch.Tensor, whose: str = "the model's") -> torch.Tensor:
    if not torch.isfinite(logits).all():
        raise ValueError(f"{whose} output is not finite (NaN or inf): its weights are damaged, or its training diverged")
    return logits

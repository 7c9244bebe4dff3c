"""Sampling from a GPT: ``generate`` (the command is ``gpt-generate``, tools/generate.py).

How one new token is chosen from the logits of the last position (fp32), in this order:

1. repetition penalty (CTRL, Keskar et al. 2019; as ``transformers``): the logit of every token that
   already occurs in the sequence (prompt included) is divided by the penalty when positive and
   multiplied by it when negative, so a penalty > 1 makes repeats less likely. It applies to greedy
   decoding too. ``None`` or 1.0 is off.
2. ``temperature == 0``: greedy, the arg-max (the lowest id among equal maxima). Otherwise the logits
   are divided by the temperature, then
3. top-k keeps the k largest logits (exactly k: ``torch.topk`` breaks a tie at the k-th),
4. top-p (nucleus) keeps, of what is left, the smallest set of most probable tokens whose probability
   adds up to at least p: token i (in order of decreasing probability) is kept iff the tokens ranked
   before it hold less than p. The most probable token is always kept.
5. one token is drawn from the softmax of the kept logits with a ``torch.Generator`` seeded from
   ``seed``: the same seed gives the same samples (bit for bit on the CPU).

Decoding uses the model's KV cache: the prompt is processed once (prefill), then each step feeds only
the token just chosen. The context window (``n_ctx``) is handled like this:

- a prompt of ``n_ctx`` tokens or more is cut to its last ``n_ctx - 1`` tokens;
- when the cache is full (``n_ctx`` positions) and one more token must be fed, the window slides: the
  cache is rebuilt by prefilling the last ``max(1, n_ctx // 2)`` tokens of the sequence (the new one
  included), and decoding goes on one token per step from there. Each token is therefore conditioned
  on between ``n_ctx // 2`` and ``n_ctx`` previous tokens, and a rebuild costs one prefill every
  ``n_ctx // 2`` tokens instead of a full ``n_ctx``-token forward per token (llama.cpp's "context
  shift" drops half of the context the same way). Learned and rotary position embeddings both bake
  absolute positions into the cached keys, which is why the cache is rebuilt rather than shifted.

``num_samples`` sequences are decoded as one batch from the same prompt; each stops on its own at its
first stop token (which is not part of its output) and its output is not extended after that.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch

# ---------------------------------------------------------------------------------------------- logit filters
# On (B, n) fp32 logits; a filtered-out token gets -inf.


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on the tokens marked in ``seen`` ((B, V) bool)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def nucleus(sorted_logits: torch.Tensor, p: float) -> torch.Tensor:
    """Top-p on logits sorted in decreasing order: -inf after the shortest prefix holding probability p."""
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability held by the higher-ranked tokens
    mass_before[..., 0] = 0.0  # exact, so the most probable token is always kept
    return sorted_logits.masked_fill(mass_before >= p, -math.inf)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Steps 2-5 of the module docstring: (B, V) fp32 logits -> (B,) token ids. Top-k and top-p work on
    the k candidates (or the sorted vocabulary) only, so a step never sorts or samples over the whole
    vocabulary when top-k is set."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    candidates = None  # the token id of each column of `logits` once it is narrowed or sorted
    if top_k is not None and top_k < logits.size(-1):
        logits, candidates = torch.topk(logits, top_k, dim=-1)  # sorted, largest first
    elif top_p is not None and top_p < 1:
        logits, candidates = torch.sort(logits, dim=-1, descending=True)
    if top_p is not None and top_p < 1:
        logits = nucleus(logits, top_p)
    choice = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
    return (choice if candidates is None else candidates.gather(-1, choice)).squeeze(1)


def check_sampling_settings(temperature, top_k, top_p, repetition_penalty) -> None:
    """ValueError naming the first setting out of range."""
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None for no limit), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (or None for no limit), got {top_p!r}")
    if repetition_penalty is not None and (
        not isinstance(repetition_penalty, (int, float)) or isinstance(repetition_penalty, bool)
        or not 0 < repetition_penalty < math.inf
    ):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 is off), got {repetition_penalty!r}")


def check_count(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


# ---------------------------------------------------------------------------------------------- generate


def _last_logits(model, idx: torch.Tensor, kv_cache) -> torch.Tensor:
    """(B, V) fp32 logits of the last position. The output head runs on that position only, so a long
    prefill never materialises (B, T, vocab) logits."""
    hidden = model.hidden_states(idx, kv_cache=kv_cache)[:, -1]
    logits = model.lm_head(hidden).float()
    if not torch.isfinite(logits).all():
        raise ValueError("the model's output is not finite (NaN or inf): its weights are damaged, or its training diverged")
    return logits


@torch.inference_mode()
def generate(
    model,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    stop_tokens: Iterable[int] | None = None,
    seed: int | None = None,
    num_samples: int = 1,
    stream: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Sample ``num_samples`` continuations of ``prompt_ids`` (see the module docstring for the rules).

    - ``stop_tokens``: ids that end a sample (not included in its output). ``None`` means the model
      tokenizer's end-of-text token when it has one; ``()`` never stops early.
    - ``seed``: seeds the sampling generator; ``None`` draws a fresh seed.
    - ``stream(sample_index, token_id)`` is called for each token as soon as it is chosen, in order,
      for exactly the tokens that end up in the returned lists.

    Returns one list of new token ids per sample (the prompt excluded), each at most ``max_new_tokens``
    long. The model is put in eval mode while sampling and given back in the mode it was in.
    """
    check_sampling_settings(temperature, top_k, top_p, repetition_penalty)
    check_count("max_new_tokens", max_new_tokens)
    check_count("num_samples", num_samples)
    prompt = [int(t) for t in (prompt_ids.flatten().tolist() if isinstance(prompt_ids, torch.Tensor) else prompt_ids)]
    if not prompt:
        raise ValueError("the prompt is empty; start from the end-of-text token to sample unconditionally")
    vocab_size, n_ctx = model.config.vocab_size, model.config.n_ctx
    bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad} is outside the model's vocabulary [0, {vocab_size})")
    if stop_tokens is None:
        eot = getattr(getattr(model, "tokenizer", None), "eot_token", None)
        stop_tokens = () if eot is None else (eot,)
    stop = {int(t) for t in stop_tokens}

    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    seen = None
    if repetition_penalty is not None and repetition_penalty != 1.0:
        seen = torch.zeros(num_samples, vocab_size, dtype=torch.bool, device=device)
        seen[:, torch.tensor(prompt, device=device)] = True

    def choose(logits: torch.Tensor) -> torch.Tensor:
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        return sample_next(logits, temperature, top_k, top_p, generator)

    prompt = prompt[-max(1, n_ctx - 1):] if len(prompt) >= n_ctx else prompt
    keep_on_slide = max(1, n_ctx // 2)
    window = torch.tensor(prompt, dtype=torch.long, device=device).expand(num_samples, -1)  # what the cache holds
    cache = model.make_kv_cache(num_samples, max_len=min(n_ctx, len(prompt) + max_new_tokens - 1))
    outputs: list[list[int]] = [[] for _ in range(num_samples)]
    finished = [False] * num_samples

    was_training = model.training
    model.eval()
    try:
        logits = _last_logits(model, window, cache)
        for step in range(max_new_tokens):
            next_ids = choose(logits)
            for row, token in enumerate(next_ids.tolist()):
                if finished[row]:
                    continue
                if token in stop:
                    finished[row] = True
                    continue
                outputs[row].append(token)
                if stream is not None:
                    stream(row, token)
            if all(finished) or step == max_new_tokens - 1:
                break
            if seen is not None:
                seen[torch.arange(num_samples, device=device), next_ids] = True
            window = torch.cat([window, next_ids[:, None]], dim=1)
            if cache.length == n_ctx:  # full: slide the window and rebuild the cache
                window = window[:, -keep_on_slide:]
                cache.reset()
                logits = _last_logits(model, window, cache)
            else:
                logits = _last_logits(model, next_ids[:, None], cache)
    finally:
        model.train(was_training)
    return outputs


# The sampling settings of the commands (gpt-generate, and the samples gpt-train prints at each
# evaluation), where neither the user nor a checkpoint's generation.json sets them.
SAMPLING_DEFAULTS = {"max_new_tokens": 200, "temperature": 0.8, "top_k": 40, "top_p": 0.95, "repetition_penalty": None}

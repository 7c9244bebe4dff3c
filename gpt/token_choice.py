"""How one new token is chosen from a model's logits: the settings, their defaults and checks, the
logit filters and the draw (``gpt.sampling.generate`` applies them at every step; speculative decoding,
gpt.speculative, applies the same rules to the draft's and the target's distributions).

From the logits of the last position (fp32), in this order:

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

``probabilities`` gives the whole distribution of steps 2-4 (what ``sample_next`` draws from).
"""

from __future__ import annotations

import math
from typing import NamedTuple

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
    drop = mass_before >= p  # (a p below fp32's smallest number compares as 0: only the top token stays)
    drop[..., 0] = False  # the most probable token is always kept
    return sorted_logits.masked_fill(drop, -math.inf)


def scale(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` for any temperature > 0, as the softmax sees it: shifted first so that
    the largest is 0 (which changes no probability), and with an infinite logit (a repetition
    penalty far below 1 divides a positive one by it) taken as the largest finite one. A tiny
    temperature then gives the top tokens 0 and the others -inf (greedy in effect), never inf - inf =
    NaN, which no draw can use."""
    limits = torch.finfo(logits.dtype)
    logits = logits.clamp(-limits.max, limits.max)
    # (a temperature below the dtype's smallest normal number would round to 0 in the division)
    return (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, limits.tiny)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Steps 2-5 of the module docstring: (B, V) fp32 logits -> (B,) token ids. Top-k and top-p work on
    the k candidates (or the sorted vocabulary) only, so a step never sorts or samples over the whole
    vocabulary when top-k is set."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = scale(logits, temperature)
    candidates = None  # the token id of each column of `logits` once it is narrowed or sorted
    if top_k is not None and top_k < logits.size(-1):
        logits, candidates = torch.topk(logits, top_k, dim=-1)  # sorted, largest first
    elif top_p is not None and top_p < 1:
        logits, candidates = torch.sort(logits, dim=-1, descending=True)
    if top_p is not None and top_p < 1:
        logits = nucleus(logits, top_p)
    choice = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
    return (choice if candidates is None else candidates.gather(-1, choice)).squeeze(1)


def probabilities(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """The distribution ``sample_next`` draws from (temperature > 0), over the whole vocabulary:
    (..., V) fp32 logits -> (..., V) probabilities, 0 for every filtered-out token."""
    shape = logits.shape
    logits = scale(logits.reshape(-1, shape[-1]), temperature)
    if (top_k is not None and top_k < shape[-1]) or (top_p is not None and top_p < 1):
        if top_k is not None and top_k < shape[-1]:
            kept, candidates = torch.topk(logits, top_k, dim=-1)  # the same tokens sample_next keeps
        else:
            kept, candidates = torch.sort(logits, dim=-1, descending=True)
        if top_p is not None and top_p < 1:
            kept = nucleus(kept, top_p)
        logits = torch.full_like(logits, -math.inf).scatter_(-1, candidates, kept)
    return torch.softmax(logits, dim=-1).reshape(shape)


def _real(value) -> float | None:
    """``value`` as a float when it is a finite real number (not a bool; an int of 400 digits is none)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def check_sampling_settings(temperature, top_k, top_p, repetition_penalty) -> None:
    """ValueError naming the first setting out of range."""
    if (real := _real(temperature)) is None or real < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None for no limit), got {top_k!r}")
    if top_p is not None and ((real := _real(top_p)) is None or not 0 < real <= 1):
        raise ValueError(f"top_p must be in (0, 1] (or None for no limit), got {top_p!r}")
    if repetition_penalty is not None and ((real := _real(repetition_penalty)) is None or real <= 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 is off), got {repetition_penalty!r}")


def check_count(name: str, value, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer >= 1{'' if high is None else f' and <= {high:,}'}, got {value!r}")


# New tokens per sample, at most: a million is hours of decoding on a CPU for GPT-2 124M; a larger count
# read from an option or a generation.json is a mistake, not a request.
MAX_NEW_TOKENS = 1_000_000


# The sampling settings of the commands (gpt-generate, and the samples gpt-train prints at each
# evaluation), where neither the user nor a checkpoint's generation.json sets them.
SAMPLING_DEFAULTS = {"max_new_tokens": 200, "temperature": 0.8, "top_k": 40, "top_p": 0.95, "repetition_penalty": None}


class SamplingRule(NamedTuple):
    """The settings of one generate() call, applied to (B, ..., V) fp32 logits. ``seen`` marks, per
    row, the tokens the repetition penalty applies to ((B, ..., V) bool), or is None when it is off."""

    temperature: float
    top_k: int | None
    top_p: float | None
    repetition_penalty: float | None

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty is not None and self.repetition_penalty != 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def adjust(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        return logits if seen is None else apply_repetition_penalty(logits, seen, self.repetition_penalty)

    def choose(self, logits: torch.Tensor, seen: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        """(B, V) logits -> (B,) next tokens: steps 1-5."""
        return sample_next(self.adjust(logits, seen), self.temperature, self.top_k, self.top_p, generator)

    def distribution(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """(..., V) logits -> the probabilities ``choose`` draws from (steps 1-4; temperature > 0)."""
        return probabilities(self.adjust(logits, seen), self.temperature, self.top_k, self.top_p)

"""Sampling from a GPT: ``generate`` (the command is ``gpt-generate``, tools/generate.py).

How each new token is chosen from the logits (repetition penalty, temperature, top-k, top-p, the
seeded draw) is gpt.token_choice; its names are re-exported here.

Decoding runs on gpt.decode's fast path: the prompt is processed once (prefill), then each step feeds
only the token just chosen, against a static KV cache, with the weights laid out for inference (on a
CPU, copied once per model into huge pages; gpt.decode says why). ``compile=True`` compiles the
one-token step and, separately, the prefill with torch.compile: seconds to tens of seconds on the
first call (once per process and model shape; inductor's disk cache makes later processes faster),
then about 1.5x the eager speed on a CPU (benches/README.md, Generation). It pays off when more tokens
are generated than a compilation costs: for GPT-2 124M on a 2-core CPU, roughly from a few hundred
tokens on, or when the process generates many times. ``compile=None`` (the default) compiles only a
model quantized to int8 on a CPU without gpt2_kernels' C kernel (``compiles_by_default``).

``draft=`` turns on speculative decoding (gpt.speculative): a small model sharing the tokenizer
proposes ``draft_tokens`` tokens per round and the model checks them in one pass. The output has the
same distribution as without a draft (and in greedy mode the same tokens), with every setting here.

The context window (``n_ctx``) is handled like this:

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

import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

import gpt2_kernels
from gpt import aot_decode
from gpt.device import compile_failures_named
from gpt.decode import Decoder
from gpt.speculative import check_draft, speculative_decode
from gpt.token_choice import (  # noqa: F401  (re-exported: the rules are part of this module's interface)
    MAX_NEW_TOKENS,
    SAMPLING_DEFAULTS,
    SamplingRule,
    apply_repetition_penalty,
    check_count,
    check_sampling_settings,
    nucleus,
    probabilities,
    sample_next,
)


class Outputs:
    """The tokens of each sample so far; stops, streaming and the repetition-penalty marks."""

    def __init__(self, num_samples: int, stop: set[int], stream: Callable[[int, int], None] | None,
                 seen: torch.Tensor | None):
        self.tokens: list[list[int]] = [[] for _ in range(num_samples)]
        self.finished = [False] * num_samples
        self.stop, self.stream = stop, stream
        self.seen = seen  # (B, V) bool: tokens in each sequence so far (prompt included), or None

    def add(self, tokens: torch.Tensor) -> bool:
        """One chosen token per row, in order; returns whether every sample has finished."""
        if self.seen is not None:
            self.seen[torch.arange(len(self.tokens), device=tokens.device), tokens] = True
        for row, token in enumerate(tokens.tolist()):
            if self.finished[row]:
                continue
            if token in self.stop:
                self.finished[row] = True
                continue
            self.tokens[row].append(token)
            if self.stream is not None:
                self.stream(row, token)
        return all(self.finished)


def _finite(logits: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(logits).all():
        raise ValueError("the model's output is not finite (NaN or inf): its weights are damaged, or its training diverged")
    return logits


def compiles_by_default(model) -> bool:
    """What ``compile=None`` means: compile only an int8 model on a CPU where gpt2_kernels' C kernel
    cannot run (no C compiler, no AVX2): eager int8 then dequantizes a weight copy per call and is
    slower than fp32, while compiled it streams the int8 weights. With the kernel eager int8 is the
    fastest path and needs no compiling."""
    quantized = getattr(model, "quantization", None) is not None
    return quantized and next(model.parameters()).device.type == "cpu" and not gpt2_kernels.cpu_linear_available()


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
    compile: bool | None = None,
    draft=None,
    draft_tokens: int = 4,
    stats: dict | None = None,
    compiled_package: str | os.PathLike | None = None,
) -> list[list[int]]:
    """Sample ``num_samples`` continuations of ``prompt_ids`` (see the module docstring for the rules).

    - ``stop_tokens``: ids that end a sample (not included in its output). ``None`` means the model
      tokenizer's end-of-text token when it has one; ``()`` never stops early.
    - ``seed``: seeds the sampling generator; ``None`` draws a fresh seed.
    - ``stream(sample_index, token_id)`` is called for each token as soon as it is chosen, in order,
      for exactly the tokens that end up in the returned lists.
    - ``compile``: torch.compile the decoding step and the prefill; None: only for an int8 model on
      a CPU without the C kernel (``compiles_by_default``).
    - ``compiled_package``: with ``compile`` on a CPU, a path prefix where the step and the prefill are
      kept compiled ahead of time (gpt.aot_decode: built there on first use, loaded in milliseconds
      later, no tracing); torch.compile where that cannot be done.
    - ``draft``: a smaller GPT with the same tokenizer for speculative decoding, proposing
      ``draft_tokens`` tokens per round; ``stats`` (a dict), when given, receives its ``rounds``,
      ``drafted`` and ``accepted`` token counts.

    Returns one list of new token ids per sample (the prompt excluded), each at most ``max_new_tokens``
    long. The models are put in eval mode while sampling and given back in the mode they were in.
    """
    check_sampling_settings(temperature, top_k, top_p, repetition_penalty)
    check_count("max_new_tokens", max_new_tokens, MAX_NEW_TOKENS)
    check_count("num_samples", num_samples)
    if compile not in (None, True, False):
        raise ValueError(f"compile must be True, False or None (the default rule), got {compile!r}")
    prompt = [int(t) for t in (prompt_ids.flatten().tolist() if isinstance(prompt_ids, torch.Tensor) else prompt_ids)]
    if not prompt:
        raise ValueError("the prompt is empty; start from the end-of-text token to sample unconditionally")
    vocab_size, n_ctx = model.config.vocab_size, model.config.n_ctx
    bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad} is outside the model's vocabulary [0, {vocab_size})")
    if draft is not None:
        check_draft(model, draft, draft_tokens)
    if stop_tokens is None:
        eot = getattr(getattr(model, "tokenizer", None), "eot_token", None)
        stop_tokens = () if eot is None else (eot,)
    stop = {int(t) for t in stop_tokens}
    compile = compiles_by_default(model) if compile is None else compile

    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    # floats from here on: a Python int (say 10**30) in a tensor division overflows torch's int64
    rule = SamplingRule(float(temperature), top_k, None if top_p is None else float(top_p),
                        None if repetition_penalty is None else float(repetition_penalty))
    seen = None
    if rule.penalised:
        seen = torch.zeros(num_samples, vocab_size, dtype=torch.bool, device=device)
        seen[:, torch.tensor(prompt, device=device)] = True
    outputs = Outputs(num_samples, stop, stream, seen)

    prompt = prompt[-max(1, n_ctx - 1):] if len(prompt) >= n_ctx else prompt
    keep_on_slide = max(1, n_ctx // 2)
    models = [m for m in (model, draft) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with compile_failures_named():
            decoder = Decoder(model, num_samples, compile=compile, cache_weights=not modes[0])
            if compile and compiled_package is not None:
                aot_decode.attach(decoder, Path(compiled_package))
            window = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)
            x = rule.choose(_finite(decoder.prefill(window)), outputs.seen, generator)
            if outputs.add(x) or max_new_tokens == 1:
                return outputs.tokens
            if draft is not None:
                draft_decoder = Decoder(draft, num_samples, compile=compile, cache_weights=not modes[1])
                speculative_decode(decoder, draft_decoder, x, rule=rule, draft_tokens=draft_tokens,
                                   remaining=max_new_tokens - 1, outputs=outputs, generator=generator, stats=stats)
                return outputs.tokens
            for _ in range(max_new_tokens - 1):
                if decoder.room() == 0:  # full: slide the window and rebuild the cache
                    window = torch.cat([decoder.tokens[:, : decoder.length], x[:, None]], dim=1)[:, -keep_on_slide:]
                    logits = decoder.prefill(window)
                else:
                    logits = decoder.step(x)
                x = rule.choose(_finite(logits), outputs.seen, generator)
                if outputs.add(x):
                    break
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return outputs.tokens

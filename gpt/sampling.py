"""Sampling from a GPT: ``generate`` (Python) and ``gpt-generate`` (command line).

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

import argparse
import codecs
import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from gpt.checkpoint import DTYPES
from gpt.prompt_template import format_instruction_prompt
from tokenizers_bpe import UnknownCharacterError
from tools.cli import ArgumentParser, CLIError, add_seed_argument, command

PROG = "gpt-generate"


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
    return model.lm_head(hidden).float()


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


# ---------------------------------------------------------------------------------------------- gpt-generate

BUILTIN_DEFAULTS = {"max_new_tokens": 200, "temperature": 0.8, "top_k": 40, "top_p": 0.95, "repetition_penalty": None}


def _number(convert, ok: Callable[[float], bool], requirement: str, allow_none: bool = False):
    """An argparse type: ``convert(text)`` that must satisfy ``ok``; ``none`` gives None if allowed."""

    def parse(text: str):
        if allow_none and text.lower() == "none":
            return None
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    return parse


DESCRIPTION = """\
Generate text with a GPT checkpoint. The text is streamed to stdout as it is
produced (the prompt is not repeated); speed and time to first token go to
stderr. Sampling settings not given here come from the checkpoint's
generation.json when it has them, else from the defaults shown. A sample ends
early at the end-of-text token.

examples:
  gpt-generate --model run/final 'ROMEO:' -n 100 --seed 1
  echo 'Once upon a time' | gpt-generate --model gpt2 - --temperature 0
  gpt-generate --model sft --instruct 'Convert 45 kilometers to meters.'
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, the description and its examples kept as written."""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, formatter_class=_HelpFormatter, description=DESCRIPTION)
    # Sampling flags default to SUPPRESS so that an absent flag is absent from args: then
    # generation.json, then BUILTIN_DEFAULTS, fill it in (see _sampling_settings).
    unset = argparse.SUPPRESS
    p.add_argument("prompt", nargs="?", default=unset, metavar="PROMPT",
                   help="prompt text, or '-' to read it (UTF-8) from stdin; empty: start from the end-of-text token")
    p.add_argument("--model", required=True, default=unset, metavar="DIR", help="checkpoint directory (gpt-train, gpt-convert or gpt-finetune output)")
    p.add_argument("-n", "--max-new-tokens", default=unset, metavar="N", type=_number(int, lambda v: v >= 1, "an integer >= 1"),
                   help=f"tokens to generate per sample (default {BUILTIN_DEFAULTS['max_new_tokens']})")
    p.add_argument("--temperature", default=unset, metavar="T",
                   type=_number(float, lambda v: 0 <= v < math.inf, "a number >= 0"),
                   help=f"softmax temperature; 0 is greedy (default {BUILTIN_DEFAULTS['temperature']})")
    p.add_argument("--top-k", default=unset, metavar="K", type=_number(int, lambda v: v >= 1, "an integer >= 1 or 'none'", True),
                   help=f"sample among the K most likely tokens; 'none': no limit (default {BUILTIN_DEFAULTS['top_k']})")
    p.add_argument("--top-p", default=unset, metavar="P", type=_number(float, lambda v: 0 < v <= 1, "in (0, 1] or 'none'", True),
                   help="nucleus sampling: the smallest set of most likely tokens holding probability P; "
                   f"1 or 'none': no limit (default {BUILTIN_DEFAULTS['top_p']})")
    p.add_argument("--repetition-penalty", default=unset, metavar="R",
                   type=_number(float, lambda v: 0 < v < math.inf, "a number > 0 or 'none'", True),
                   help="CTRL penalty on the logits of tokens already in the text, e.g. 1.2; 1 or 'none' is off (default none)")
    add_seed_argument(p)
    p.add_argument("--num-samples", type=_number(int, lambda v: v >= 1, "an integer >= 1"), default=1, metavar="S",
                   help="independent samples, decoded as one batch; the first streams live, the others follow it")
    p.add_argument("--no-stream", action="store_true", help="print the text only when generation is done")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="weights dtype; auto: bfloat16 on a GPU that supports it, else float32")
    p.add_argument("--allow-special", action="store_true",
                   help="encode special-token text in the prompt (e.g. <|endoftext|>) as the special token, not as ordinary text")
    p.add_argument("--instruct", metavar="TEXT",
                   help="an instruction: wrap it in the instruction template (gpt.prompt_template) and print only the response")
    p.add_argument("--input", metavar="TEXT", default="", help="the instruction's input (with --instruct)")
    return p


def _read_prompt(args) -> str:
    if args.instruct is not None:
        if args.prompt:
            raise CLIError("give either a PROMPT or --instruct, not both")
        return format_instruction_prompt(args.instruct, args.input)
    if args.input:
        raise CLIError("--input goes with --instruct")
    if args.prompt != "-":
        return args.prompt
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(f"stdin: not valid UTF-8 at byte offset {e.start} ({e.reason}); convert the prompt to UTF-8") from None


def _sampling_settings(args, generation: dict, model_dir: Path) -> dict:
    """Each setting from the command line, else generation.json, else BUILTIN_DEFAULTS."""
    defaults = {name: generation.get(name, value) for name, value in BUILTIN_DEFAULTS.items()}
    try:
        check_sampling_settings(defaults["temperature"], defaults["top_k"], defaults["top_p"], defaults["repetition_penalty"])
        check_count("max_new_tokens", defaults["max_new_tokens"])
    except ValueError as e:
        raise CLIError(f"{model_dir / 'generation.json'}: {e}") from None
    return {name: getattr(args, name, value) for name, value in defaults.items()}


def _pick_device_dtype(device: str, dtype: str) -> tuple[str, torch.dtype]:
    """The trainer's device rule; dtype "auto" is bf16 on a GPU that has it, else fp32 (inference
    needs no fp16 loss scaling, but fp32 is the safe default on a CPU)."""
    from gpt.trainer import resolve_device

    device = resolve_device(device)
    if dtype == "auto":
        bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        return device, torch.bfloat16 if bf16 else torch.float32
    return device, DTYPES[dtype]


def _encode_prompt(tok, text: str, allow_special: bool, n_ctx: int) -> list[int]:
    """Prompt ids: special-token text is ordinary text unless allowed, an empty prompt is the
    end-of-text token, a prompt too long for the context keeps its last n_ctx - 1 tokens (with a note)."""
    if allow_special:
        ids = tok.encode(text, allowed_special=set(tok.special_tokens))
    else:
        ids = tok.encode_ordinary(text)
        found = [s for s in tok.special_tokens if s in text]
        if found:
            print(f"{PROG}: note: the prompt's {', '.join(found)} is encoded as ordinary text; "
                  "use --allow-special to encode it as the special token", file=sys.stderr)
    if not ids:
        if tok.eot_token is None:
            raise CLIError("the prompt is empty and the tokenizer has no end-of-text token to start from; give a prompt")
        ids = [tok.eot_token]
    keep = max(1, n_ctx - 1)
    if len(ids) > keep:
        print(f"{PROG}: note: the prompt has {len(ids)} tokens but the context holds {n_ctx}; "
              f"keeping its last {keep} tokens", file=sys.stderr)
        ids = ids[-keep:]
    return ids


@command(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.prompt = getattr(args, "prompt", "")
    text = _read_prompt(args)
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise CLIError(f"--model {model_dir}: no such checkpoint directory")
    device, dtype = _pick_device_dtype(args.device, args.dtype)

    from gpt.model import GPT  # the model (and kernels) load only once the arguments are good

    model = GPT.from_pretrained(model_dir, device=device, dtype=dtype)
    settings = _sampling_settings(args, model.generation_config, model_dir)
    tok = model.tokenizer
    try:
        ids = _encode_prompt(tok, text, args.allow_special, model.config.n_ctx)
    except UnknownCharacterError as e:
        raise CLIError(f"the prompt: {e}; use only text the model's tokenizer knows") from None

    stream_live = not args.no_stream
    decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(args.num_samples)]
    pieces: list[list[str]] = [[] for _ in range(args.num_samples)]
    first_token_at: list[float] = []

    def on_token(sample: int, token: int) -> None:
        if not first_token_at:
            first_token_at.append(time.perf_counter())
        piece = decoders[sample].decode(tok.decode_single_token_bytes(token))
        if stream_live and sample == 0:
            sys.stdout.write(piece)
            sys.stdout.flush()
        else:
            pieces[sample].append(piece)

    start = time.perf_counter()
    outputs = generate(
        model, ids, settings["max_new_tokens"], temperature=settings["temperature"], top_k=settings["top_k"],
        top_p=settings["top_p"], repetition_penalty=settings["repetition_penalty"], seed=args.seed,
        num_samples=args.num_samples, stream=on_token,
    )
    elapsed = time.perf_counter() - start
    for sample in range(args.num_samples):
        tail = decoders[sample].decode(b"", final=True)
        if args.num_samples > 1 and sample > 0:
            sys.stdout.write(f"\n{'-' * 20} sample {sample + 1} {'-' * 20}\n")
        sys.stdout.write("".join(pieces[sample]) + tail)
    sys.stdout.write("\n")
    sys.stdout.flush()

    n_tokens = sum(map(len, outputs))
    ttft = (first_token_at[0] - start) if first_token_at else elapsed
    samples = f" over {args.num_samples} samples" if args.num_samples > 1 else ""
    print(f"{PROG}: {n_tokens} tokens{samples} in {elapsed:.2f} s ({n_tokens / elapsed:.1f} tokens/s), "
          f"time to first token {ttft * 1000:.0f} ms", file=sys.stderr)
    return 0

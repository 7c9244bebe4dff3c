"""gpt-generate: generate text with a GPT checkpoint (sampling rules: gpt.sampling)."""

from __future__ import annotations

import argparse
import codecs
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from gpt import aot_decode, compile_cache
from gpt.device import DTYPES, resolve_device, resolve_inference_dtype
from gpt.memory import check_generation_fits
from gpt.model import GPT
from gpt.prompt_template import format_instruction_prompt
from gpt.checkpoint import check_same_tokenizer
from gpt.quantize import quantize
from gpt2_kernels import cpu_linear_unavailable_reason
from gpt.sampling import MAX_NEW_TOKENS, SAMPLING_DEFAULTS, check_count, check_sampling_settings, compiles_by_default, generate
from tokenizers_bpe import UnknownCharacterError
from tokenizers_bpe.errors import InputFileError
from tokenizers_bpe.fileio import check_directory
from tools.cli import ArgumentParser, CLIError, HelpFormatter, add_seed_argument, command, integer, max_threads, number, or_none, path_argument, text_argument
from tools.models import check_kernels_backend, model_argument

PROG = "gpt-generate"
QUANTIZE_CHOICES = ("int8", "int8-blocks")
DRAFT_TOKENS = 4
MEMORY_PER_PROMPT_BYTE = 17  # peak memory per byte of a prompt on stdin (measured on 200 MB: the text and its ids)
# One batch of samples: more rows make one call's work (and its wait before the first sample ends)
# grow without bound while each sample is as good alone; 1024 tiny-model samples of 200 tokens take ~10 s.
MAX_NUM_SAMPLES = 256
DESCRIPTION = """\
Generate text with a GPT checkpoint. The text is streamed to stdout as it is
produced (the prompt is not repeated); speed, time to first token (from the
loaded checkpoint: quantizing and compiling included) and the rate after the
second token (once any compiling is done) go to stderr.
Sampling settings not given here come from the checkpoint's generation.json
when it has them, else from the defaults shown. A sample ends early at the
end-of-text token.

Decoding uses a static KV cache and weights laid out for inference (on a
CPU, one more copy of them, in huge pages). What each mode costs (GPT-2
124M, one thread of a 2-core CPU; benches/README.md, Generation):
  default (eager)  no wait: the first token in about a second. On a CPU the
                   step's products and attention run in small C kernels
                   (AVX2 or AVX-512; built once per machine with the C
                   compiler, about a second, then cached).
  --quantize int8  int8 weights, run eagerly by those C kernels: no
                   compiling, 2-4x the fp32 speed on a CPU at batch 1 and
                   8. int8-blocks keeps the output head in full precision.
  --compile        the decoding step and the prefill compiled: the first run
                   for a model, dtype, batch and thread count compiles for
                   about a minute (a progress line says so) and keeps the
                   code in DIR.compile-cache/ beside the checkpoint; later
                   runs load it (on a CPU: ahead-of-time packages, first
                   token in well under a second; on a GPU: torch.compile's
                   artifacts, seconds of tracing remain). On a CPU the eager
                   C kernels decode faster (compiled fp32: 0.78x eager on an
                   AVX-512 Xeon); it is for GPUs and CPUs without them.
--draft DIR adds speculative decoding with a small model trained with the
same tokenizer: the same output distribution (greedy: the same text), fewer
steps of the large model.

examples:
  gpt-generate --model run/final 'ROMEO:' -n 100 --seed 1
  echo 'Once upon a time' | gpt-generate --model gpt2 - --temperature 0
  gpt-generate --model sft --instruct 'Convert 45 kilometers to meters.'
  gpt-generate --model gpt2 'The meaning of life is' -n 1000 --quantize int8
  gpt-generate --model big/final --draft small/final 'ROMEO:' -n 300
"""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, formatter_class=HelpFormatter, description=DESCRIPTION)
    # Sampling flags default to SUPPRESS so that an absent flag is absent from args: then
    # generation.json, then SAMPLING_DEFAULTS, fill it in (see _sampling_settings).
    unset = argparse.SUPPRESS
    p.add_argument("prompt", nargs="?", default=unset, metavar="PROMPT",
                   help="prompt text, or '-' to read it (UTF-8) from stdin; empty: start from the end-of-text token")
    p.add_argument("--model", required=True, default=unset, type=path_argument, metavar="DIR", help="checkpoint directory (gpt-train, gpt-convert or gpt-finetune output)")
    p.add_argument("-n", "--max-new-tokens", default=unset, metavar="N", type=integer(1, MAX_NEW_TOKENS),
                   help=f"tokens to generate per sample (default {SAMPLING_DEFAULTS['max_new_tokens']})")
    p.add_argument("--temperature", default=unset, metavar="T", type=number(0),
                   help=f"softmax temperature; 0 is greedy (default {SAMPLING_DEFAULTS['temperature']})")
    p.add_argument("--top-k", default=unset, metavar="K", type=or_none(integer(1)),
                   help=f"sample among the K most likely tokens; 'none': no limit (default {SAMPLING_DEFAULTS['top_k']})")
    p.add_argument("--top-p", default=unset, metavar="P", type=or_none(number(0, 1, low_open=True)),
                   help="nucleus sampling: the smallest set of most likely tokens holding probability P; "
                   f"1 or 'none': no limit (default {SAMPLING_DEFAULTS['top_p']})")
    p.add_argument("--repetition-penalty", default=unset, metavar="R", type=or_none(number(0, low_open=True)),
                   help="CTRL penalty on the logits of tokens already in the text, e.g. 1.2; 1 or 'none' is off (default none)")
    add_seed_argument(p)
    p.add_argument("--num-samples", type=integer(1, MAX_NUM_SAMPLES), default=1, metavar="S",
                   help=f"independent samples, decoded as one batch; the first streams live, the others follow it "
                        f"(at most {MAX_NUM_SAMPLES}: for more, run again with another --seed)")
    p.add_argument("--no-stream", action="store_true", help="print the text only when generation is done")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="weights dtype; auto: bfloat16 on a GPU that supports it, else float32")
    p.add_argument("--threads", type=integer(1, max_threads()), default=None, metavar="N",
                   help="CPU threads for PyTorch (default: PyTorch's choice, one per core); 1 is much faster on a machine busy with other work")
    p.add_argument("--allow-special", action="store_true",
                   help="encode special-token text in the prompt (e.g. <|endoftext|>) as the special token, not as ordinary text")
    p.add_argument("--instruct", metavar="TEXT",
                   help="an instruction: wrap it in the instruction template (gpt.prompt_template) and print only the response")
    p.add_argument("--input", metavar="TEXT", default="", help="the instruction's input (with --instruct)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decoding step and the prefill: about a minute on a first run, "
                   "reused from DIR.compile-cache/ beside the checkpoint after that (see above for what it costs)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                   help="weight-only int8 (per-output-channel scales; embeddings and LayerNorms stay as they are): "
                   "int8 also quantizes the output head (an int8 copy of the tied embedding), int8-blocks keeps it; "
                   "on a CPU it runs eagerly through a C kernel built once (it compiles only where that kernel cannot run)")
    p.add_argument("--draft", type=path_argument, metavar="DIR",
                   help="speculative decoding with this smaller checkpoint (it must use the model's tokenizer; "
                   "--quantize applies to --model only)")
    p.add_argument("--draft-tokens", type=integer(1, 64), default=None, metavar="K",
                   help=f"tokens the draft proposes per round (with --draft; default {DRAFT_TOKENS})")
    return p


def _read_prompt(args) -> str:
    if args.instruct is not None:
        if args.prompt:
            raise CLIError("give either a PROMPT or --instruct, not both")
        return format_instruction_prompt(text_argument(args.instruct, "--instruct", MEMORY_PER_PROMPT_BYTE),
                                         text_argument(args.input, "--input", MEMORY_PER_PROMPT_BYTE))
    if args.input:
        raise CLIError("--input goes with --instruct")
    return text_argument(args.prompt, "PROMPT", MEMORY_PER_PROMPT_BYTE)


def _sampling_settings(args, generation: dict, model_dir: Path) -> dict:
    """Each setting from the command line, else generation.json, else SAMPLING_DEFAULTS."""
    defaults = {name: generation.get(name, value) for name, value in SAMPLING_DEFAULTS.items()}
    try:
        check_sampling_settings(defaults["temperature"], defaults["top_k"], defaults["top_p"], defaults["repetition_penalty"])
        check_count("max_new_tokens", defaults["max_new_tokens"], MAX_NEW_TOKENS)
    except ValueError as e:
        raise CLIError(f"{model_dir / 'generation.json'}: {e}") from None
    return {name: getattr(args, name, value) for name, value in defaults.items()}


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


def _checkpoint_directory(option: str, path: Path) -> Path:
    try:
        return check_directory(path, "checkpoint directory")
    except InputFileError as e:
        raise CLIError(f"{option} {e}") from None


@command(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.prompt = getattr(args, "prompt", "")
    text = _read_prompt(args)
    model_dir = _checkpoint_directory("--model", model_argument(args.model, PROG))
    draft_dir = None
    if args.draft is not None:
        draft_dir = _checkpoint_directory("--draft", model_argument(args.draft, PROG))
    elif args.draft_tokens is not None:
        raise CLIError("--draft-tokens goes with --draft")
    device = resolve_device(args.device)
    dtype = resolve_inference_dtype(args.dtype, device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if draft_dir is not None:
        check_same_tokenizer(model_dir, draft_dir)  # before loading any weights
    model = GPT.from_pretrained(model_dir, device=device, dtype=dtype)
    check_kernels_backend(model.config.backend, device)
    draft = None
    if draft_dir is not None:
        draft = GPT.from_pretrained(draft_dir, device=device, dtype=dtype)
        check_kernels_backend(draft.config.backend, device)
    settings = _sampling_settings(args, model.generation_config, model_dir)
    tok = model.tokenizer
    try:
        ids = _encode_prompt(tok, text, args.allow_special, model.config.n_ctx)
    except UnknownCharacterError as e:
        raise CLIError(f"the prompt: {e}; use only text the model's tokenizer knows") from None
    positions = min(model.config.n_ctx, len(ids) + settings["max_new_tokens"])
    for m in (model, draft):
        if m is not None:  # before any cache is allocated: a CPU process out of memory is killed, not told
            check_generation_fits(m.config, args.num_samples, positions, m.transformer.wte.weight.element_size(), device)
    # The time to first token counts from here: quantizing, building the int8 kernel on a first run,
    # loading compiled code and compiling are part of the wait (loading the checkpoint is not).
    start = time.perf_counter()
    if args.quantize is not None:
        quantize(model, "int8", head=args.quantize == "int8")
    compile = args.compile or (args.quantize is not None and compiles_by_default(model))
    if compile and not args.compile:
        print(f"{PROG}: note: the int8 CPU kernel cannot run here ({cpu_linear_unavailable_reason()}), so --quantize "
              "compiles the decoding step instead (eager int8 dequantizes and is slower than float32)", file=sys.stderr)
    cache_file = package = None
    if compile:
        cache_file = compile_cache.cache_file(model_dir, device=device, dtype=dtype, quantize=args.quantize,
                                              batch_size=args.num_samples, draft_dir=draft_dir)
        # On a CPU the step and the prefill are compiled ahead of time into packages beside the cache file
        # (gpt.aot_decode); torch.compile's own artifacts serve GPUs, and CPUs where that fails.
        package = cache_file.with_suffix("") if model.transformer.wte.weight.device.type == "cpu" else None
        if package is not None and aot_decode.packaged(package):
            cache_file = None  # loaded in milliseconds: nothing to compile or save
        elif compile_cache.load(cache_file) and not aot_decode.will_build(package):
            cache_file = None  # loaded: nothing new to save
        else:
            print(f"{PROG}: compiling the decoding step and the prefill (the first run of this model, dtype, batch and "
                  f"thread count on this machine: about a minute; kept in {cache_file.parent} for the next runs) ...",
                  file=sys.stderr, flush=True)

    stream_live = not args.no_stream
    decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(args.num_samples)]
    pieces: list[list[str]] = [[] for _ in range(args.num_samples)]
    token_times: list[tuple[int, float]] = []  # (sample, when) of every token

    def on_token(sample: int, token: int) -> None:
        token_times.append((sample, time.perf_counter()))
        piece = decoders[sample].decode(tok.decode_single_token_bytes(token))
        if stream_live and sample == 0:
            sys.stdout.write(piece)
            sys.stdout.flush()
        else:
            pieces[sample].append(piece)

    def header(sample: int) -> str:  # every sample gets one when there are several
        return f"{'' if sample == 0 else chr(10)}{'-' * 20} sample {sample + 1} {'-' * 20}\n" if args.num_samples > 1 else ""

    if stream_live:
        sys.stdout.write(header(0))
    stats: dict = {}
    outputs = generate(
        model, ids, settings["max_new_tokens"], temperature=settings["temperature"], top_k=settings["top_k"],
        top_p=settings["top_p"], repetition_penalty=settings["repetition_penalty"], seed=args.seed,
        num_samples=args.num_samples, stream=on_token, compile=compile, draft=draft, draft_tokens=args.draft_tokens or DRAFT_TOKENS,
        stats=stats, compiled_package=package,
    )
    elapsed = time.perf_counter() - start
    if cache_file is not None:
        try:
            compile_cache.save(cache_file)
        except OSError as e:
            print(f"{PROG}: note: could not keep the compiled code in {cache_file.parent} ({e.strerror or e}); "
                  "the next run compiles again", file=sys.stderr)
    for sample in range(args.num_samples):
        tail = decoders[sample].decode(b"", final=True)
        if sample > 0 or not stream_live:
            sys.stdout.write(header(sample))
        sys.stdout.write("".join(pieces[sample]) + tail)
    sys.stdout.write("\n")
    sys.stdout.flush()

    n_tokens = sum(map(len, outputs))
    ttft = (token_times[0][1] - start) if token_times else elapsed
    # The rate after the second token: by then the prefill and the first decoding step (and their
    # compiling) are done. Every sample's tokens after its own second one were computed after the first
    # sample's second token arrived.
    later = sum(max(0, n - 2) for n in Counter(sample for sample, _ in token_times).values())
    second = [when for sample, when in token_times if sample == 0][1:2]
    steady = (f", then {later / (token_times[-1][1] - second[0]):.1f} tokens/s"
              if later and second and token_times[-1][1] > second[0] else "")
    samples = f" over {args.num_samples} samples" if args.num_samples > 1 else ""
    drafted = (f", {stats['accepted']} of {stats['drafted']} drafted tokens accepted "
               f"({100 * stats['accepted'] / max(1, stats['drafted']):.0f}%)") if draft is not None and stats else ""
    print(f"{PROG}: {n_tokens} token{'' if n_tokens == 1 else 's'}{samples} in {elapsed:.2f} s ({n_tokens / elapsed:.1f} tokens/s), "
          f"time to first token {ttft * 1000:.0f} ms{steady}{drafted}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""gpt-inspect DIR: what a checkpoint holds and whether it is consistent.

Prints the config, parameter counts, size on disk, dtype and tokenizer, then runs every check that
GPT.from_pretrained runs (weights, LoRA adapters, tokenizer, generation.json; a classifier's labels and head, as
gpt-classify reads them) and that every weight is finite, each reported on its own line. Exit status: 0 all checks pass, 1 a check
failed, 2 DIR is not a readable checkpoint at all (no usable config.json) or a usage error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from gpt import checkpoint
from gpt.classifier import CLASSIFIER_FILE, HEAD_FILE, GPTClassifier, read_classifier_meta, read_head
from gpt.model import GPT
from tokenizers_bpe.fileio import recorded_version
from tools.cli import ArgumentParser, command
from tools.models import model_argument


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def tokenizer_summary(tokenizer) -> str:
    specials = ", ".join(f"{s}={i}" for s, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1]))
    return f"{type(tokenizer).__name__}, {tokenizer.n_vocab} tokens, specials: {specials or 'none'}, fingerprint {tokenizer.fingerprint()[:16]}"


def run_checks(directory: Path, meta: dict):
    """Run each check on its own: ([(check, error message or None)], the tokenizer or None)."""
    results, tokenizer = [], None
    try:
        expected = GPT.expected_shapes(meta["model"])
        checkpoint.check_weights(directory, meta, expected)
        results.append((f"weights: {len(expected)} tensors with the shapes and dtype config.json implies", None))
        damaged = [name for file in (checkpoint.WEIGHTS_FILE, checkpoint.ADAPTERS_FILE, HEAD_FILE)
                   if file == checkpoint.WEIGHTS_FILE or (directory / file).is_file()
                   for name in checkpoint.non_finite_tensors(directory, file)]
        results.append(("values: every weight finite", None) if not damaged else
                       ("values", f"NaN or inf in {len(damaged)} tensor(s): {', '.join(damaged[:3])}{', ...' if len(damaged) > 3 else ''} "
                                  "(damaged weights, or a diverged training run)"))
    except ValueError as e:
        results.append(("weights", str(e)))
    if meta.get("lora") is not None:
        try:
            with torch.device("meta"):  # shapes and dtypes only: no memory for the base weights
                model = GPT(meta["model"])
            checkpoint.read_adapters(directory, model, meta, "cpu")
            results.append((f"adapters: {checkpoint.ADAPTERS_FILE} fits the \"lora\" section of config.json", None))
        except ValueError as e:
            results.append(("adapters", str(e)))
    if (directory / CLASSIFIER_FILE).exists() or (directory / HEAD_FILE).exists():  # a gpt-finetune classify model
        try:
            labels, max_length = read_classifier_meta(directory)
            with torch.device("meta"):
                classifier = GPTClassifier(GPT(meta["model"]), labels)
            read_head(directory, classifier)
            results.append((f"classifier: {len(labels)} labels, max_length {max_length}; {HEAD_FILE} fits them", None))
        except ValueError as e:
            results.append(("classifier", str(e)))
    try:
        tokenizer = checkpoint.load_tokenizer(directory, meta)
        results.append((f"tokenizer: {tokenizer.n_vocab} tokens == vocab_size, the one the model was saved with", None))
    except (ValueError, OSError) as e:
        results.append(("tokenizer", str(e)))
    try:
        generation = checkpoint.read_generation(directory)
        results.append((f"generation.json: {', '.join(f'{k}={v}' for k, v in generation.items()) if generation else 'absent (optional)'}", None))
    except ValueError as e:
        results.append(("generation.json", str(e)))
    return results, tokenizer


@command("gpt-inspect")
def main(argv=None) -> int:
    parser = ArgumentParser(prog="gpt-inspect", description="Show a checkpoint's config, size and tokenizer, and check that it is consistent.")
    parser.add_argument("dir", type=Path, metavar="DIR", help="checkpoint directory (config.json, model.safetensors, tokenizer.json)")
    args = parser.parse_args(argv)
    args.dir = model_argument(args.dir, "gpt-inspect")

    meta = checkpoint.read_meta(args.dir)  # unreadable config: nothing to inspect, exit 2
    config = meta["model"]
    with torch.device("meta"):
        model = GPT(config)
    files = sorted(p for p in args.dir.iterdir() if p.is_file())
    checks, tokenizer = run_checks(args.dir, meta)

    print(f"checkpoint   {args.dir}")
    print(f"format       {meta['format']} v{recorded_version(meta)}")
    print(f"config       {' '.join(f'{k}={v}' for k, v in config.to_dict().items())}")
    print(f"parameters   {model.num_parameters():,} total, {model.num_parameters(non_embedding=True):,} non-embedding")
    print(f"dtype        {meta['dtype']}")
    if meta.get("lora") is not None:
        print(f"lora         {' '.join(f'{k}={v}' for k, v in meta['lora'].to_dict().items())} (adapters in {checkpoint.ADAPTERS_FILE})")
    print(f"size         {human_size(sum(p.stat().st_size for p in files))} on disk ({', '.join(f'{p.name} {human_size(p.stat().st_size)}' for p in files)})")
    print(f"tokenizer    {tokenizer_summary(tokenizer) if tokenizer else 'unreadable (see checks)'}")
    print("checks")
    for name, error in checks:
        print(f"  ok    {name}" if error is None else f"  FAIL  {name}: {error}")
    failed = sum(error is not None for _, error in checks)
    if failed:
        print(f"gpt-inspect: {failed} check(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

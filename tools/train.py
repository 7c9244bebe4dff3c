"""gpt-train: train a GPT on text files or a gpt-prepare data directory (the loop is gpt.trainer.Trainer).

    gpt-train corpus.txt more.txt --out runs/mine                   # tokenizer, data, model: one command
    gpt-train --data data/ --out runs/shakespeare
    gpt-train --resume runs/shakespeare --max-steps 4000           # continue, exactly
    gpt-train --config run.toml                                     # every option from a file
    torchrun --nproc_per_node=4 --no-python gpt-train --data data/ --out runs/big --preset gpt2

Every option can be set in a TOML (or JSON) file given with ``--config`` (keys as the long option
names, with ``-`` or ``_``); the command line wins over the file. The effective configuration is
saved as ``RUN_DIR/run_config.json``, itself a valid ``--config``. ``--resume`` takes the saved
configuration and lets you change the schedule and logging options (not the model or the data).
Given text FILEs (or --builtin), a tokenizer is trained on them (RUN_DIR/tokenizer.json, as bpe-train
would) and the text prepared (RUN_DIR/data/, as gpt-prepare would) before the training; the run
directory layout is described in ``gpt.run_state``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import reprlib
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as torch_dist

import tokenizers_bpe
from gpt.config import GPTConfig
from gpt.data import RandomWindows, SlidingWindows, check_token_ids, load_meta, open_split
from gpt.device import init_distributed, resolve_device
from gpt.lora import count_trainable
from gpt.memory import training_state_bytes
from gpt.model import GPT
from gpt.run_state import RUN_CONFIG_FILE, RunDirectory, read_run_config
from gpt.sampling import SAMPLING_DEFAULTS, generate
from gpt.trainer import Trainer
from tokenizers_bpe import TOKENIZER_FILE
from tokenizers_bpe.errors import InputFileError
from tokenizers_bpe.fileio import check_not_a_broken_link, read_options_file, resolve_path
from tools.cli import ArgumentParser, CLIError, command, parse_bool, path_argument
from tools.models import check_finite_weights, check_kernels_backend, model_argument
from tools.outputs import check_not_an_input, check_writable_dir
from tools.train_text import TEXT_OPTIONS, check_no_text_options, plan_resumed_text_stages, plan_text_stages, text_mode, trained_fingerprint
from tools.training import (
    add_option,
    check_disk,
    check_memory,
    check_run_dir,
    exit_code,
    option_table,
    removed_after_early_error,
    resolved,
    run_training,
    train_config,
)

PROG = "gpt-train"

# The model shape options; anything not given comes from --preset.
MODEL_OPTIONS = ("n_layer", "n_head", "n_embd", "n_ctx", "dropout", "bias", "pos_embedding", "backend")
# Options that define the run and cannot change on --resume: the model, and the text its data was made of.
FIXED_ON_RESUME = ("data", "preset", "init_from", "vocab_size", "block_size", "seed", *MODEL_OPTIONS, *TEXT_OPTIONS, "tokenizer")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", metavar="FILE", help="TOML or JSON file of options (keys as below)")
    p.add_argument("--resume", type=path_argument, metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    for name, typ, default, help_text in option_table():
        shown = "" if default is None else f" (default: {default!r})"
        # SUPPRESS: only options given on the command line appear, so they can override the file.
        add_option(p, name, typ, argparse.SUPPRESS, help_text + shown)
    return p


NOT_OPTIONS = ("derived", "format", "format_version")  # what run_config.json records besides the options
PATH_OPTIONS = ("data", "tokenizer", "init_from")  # (and "files"): recorded resolved (tools.training.resolved)


def read_config_file(path: str | Path, flag: str = "--config") -> dict[str, Any]:
    """Options from a TOML/JSON file, each value checked by its flag's own parser."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        raise CLIError(f"{flag} {p} does not exist")
    try:
        raw = read_options_file(p)
    except InputFileError as e:
        raise CLIError(f"{flag} {e}") from None
    return checked_options(raw, p, flag)


def checked_options(raw: object, p: Path, flag: str) -> dict[str, Any]:
    """The options of a parsed --config file or run_config.json (``p``), each value checked by its flag's parser."""
    if not isinstance(raw, dict):
        raise CLIError(f"{flag} {p}: expected a table of options")
    table = option_table()
    types = {name: typ for name, typ, _, _ in table}
    defaults = {name: default for name, _, default, _ in table}
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name in NOT_OPTIONS:
            continue
        if name not in types:
            raise CLIError(f"{flag} {p}: unknown option {key!r}; see gpt-train --help")
        if value is None and defaults[name] is not None:  # null means "unset" only where unset is the default
            raise CLIError(f"{flag} {p}: option {key!r} cannot be null (its default is {defaults[name]!r})")
        if value is not None and types[name] is list:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise CLIError(f"{flag} {p}: option {key!r} must be a list of strings, got {value!r}")
        elif value is not None:
            if isinstance(value, (dict, list)) or (isinstance(value, bool) and types[name] is not parse_bool):
                raise CLIError(f"{flag} {p}: option {key!r} got {value!r}, which is not a {types[name].__name__ if isinstance(types[name], type) else 'valid'} value")
            try:
                value = types[name](str(value).lower() if isinstance(value, bool) else str(value))
            except (argparse.ArgumentTypeError, ValueError) as e:
                raise CLIError(f"{flag} {p}: option {key!r} {e}") from None
        out[name] = value
    return out


def effective_options(args: argparse.Namespace) -> tuple[dict[str, Any], dict | None]:
    """defaults < saved run (--resume) < --config file < command line. Returns (options, saved run)."""
    opts = {name: default for name, _, default, _ in option_table()}
    given = {k: v for k, v in vars(args).items() if k not in ("config", "resume")}
    saved = None
    if args.resume:
        run_dir = Path(args.resume)
        path = run_dir / RUN_CONFIG_FILE
        check_not_a_broken_link(run_dir)
        if not run_dir.is_dir():
            raise CLIError(f"--resume {run_dir}: no such run directory (to start a run there: --out {run_dir})")
        if not path.exists() and not path.is_symlink():
            raise CLIError(f"--resume {run_dir}: {path.name} is missing; this is not a gpt-train run directory")
        try:
            saved_raw = read_run_config(run_dir, "this is not a usable gpt-train run directory")
        except InputFileError as e:
            raise CLIError(f"--resume {e}") from None
        options = checked_options(saved_raw, path, "--resume")
        opts.update(options)
        derived = saved_raw.get("derived")
        saved = {"options": options, "derived": derived if isinstance(derived, dict) else {}}
        if "out" in given and resolve_path(given["out"]) != resolve_path(run_dir):
            raise CLIError(f"--out {given['out']} differs from --resume {run_dir}; give only --resume")
        opts["out"] = str(run_dir)
    if args.config:
        opts.update(read_config_file(args.config))
    opts.update(given)
    if saved is not None:
        for name in FIXED_ON_RESUME:
            if _normal(name, opts[name]) != _normal(name, saved["options"].get(name)):
                used = saved["options"].get(name)
                if used is None:  # the run took it from its preset or data: say which value that was
                    derived = saved["derived"]
                    model = derived.get("model") if isinstance(derived.get("model"), dict) else {}
                    used = model.get(name, derived.get(name))
                if name == "files":
                    raise CLIError(f"the text FILEs cannot change when resuming (the run was made of {' '.join(used or ()) or 'no FILEs'}); "
                                   "give only --resume RUN_DIR, or start a new run")
                used = "its default" if used is None else reprlib.repr(used)
                raise CLIError(f"--{name.replace('_', '-')} cannot change when resuming (the run used {used})")
    if not (opts["data"] or opts["files"] or opts["builtin"]):
        raise CLIError("nothing to train on: give text FILEs (a tokenizer and the data are made from them), --builtin shakespeare, "
                       "or --data DATA_DIR (from gpt-prepare); or --resume RUN_DIR")
    if not opts["out"]:
        raise CLIError("--out RUN_DIR is required (or --resume RUN_DIR)")
    return opts, saved


def recorded(opts: dict) -> dict:
    """The options as run_config.json records them: the paths of files and directories resolved."""
    return {**opts, **{name: resolved(opts.get(name)) for name in (*PATH_OPTIONS, "files")}}


def _normal(name: str, value):
    """An option's value for comparing a resumed run's with the command's (an absent list is an empty
    one, a file is itself by whichever path it is named)."""
    if name == "files":
        return resolved(list(value or ()))
    if name in PATH_OPTIONS:
        return resolved(value)
    if name == "special":
        return list(value or ())
    if name in ("char", "append_eot"):
        return bool(value)
    return value


def build_model(opts: dict, meta, tokenizer):
    """A fresh GPT (preset + overrides) or one loaded with --init-from, checked against the data."""
    overrides = {k: opts[k] for k in MODEL_OPTIONS if opts[k] is not None}
    if opts["init_from"]:
        try:
            base = GPT.from_pretrained(model_argument(opts["init_from"], PROG))
        except ValueError as e:  # CheckpointError: missing, foreign or corrupt
            raise CLIError(f"--init-from {e}") from None
        check_finite_weights(base, f"--init-from {opts['init_from']}")
        if base.tokenizer.fingerprint() != meta.tokenizer_fingerprint:
            raise CLIError(f"--init-from {opts['init_from']}: its tokenizer differs from the one the data was prepared with; re-run gpt-prepare with it")
        shape = {k: v for k, v in overrides.items() if k not in ("dropout", "backend")}
        if shape:
            raise CLIError(f"--init-from fixes the model shape; drop {', '.join('--' + k.replace('_', '-') for k in shape)}")
        config = dataclasses.replace(base.config, **overrides)
        model = GPT(config)
        model.load_state_dict(base.state_dict())
        return model
    vocab_size = opts["vocab_size"] or meta.n_vocab
    if text_mode(opts) and not opts["tokenizer"] and vocab_size != meta.n_vocab:
        # In text mode --vocab-size is the tokenizer's target; text with fewer distinct merges gives fewer.
        print(f"{PROG}: note: the tokenizer trained on the text has {meta.n_vocab:,} tokens, not the {vocab_size:,} of "
              "--vocab-size (the text holds no more); the model takes its size", file=sys.stderr)
        vocab_size = meta.n_vocab
    if vocab_size < meta.n_vocab:
        raise CLIError(f"the tokenizer has {meta.n_vocab} tokens, more than --vocab-size {vocab_size}; raise --vocab-size or drop it")
    if vocab_size != meta.n_vocab:
        raise CLIError(f"--vocab-size {vocab_size} differs from the tokenizer's {meta.n_vocab} tokens; a checkpoint must match its tokenizer, drop --vocab-size")
    config = GPTConfig.from_preset(opts["preset"], vocab_size=vocab_size, **overrides)
    torch.manual_seed(opts["seed"])
    return GPT(config)


def make_sampler(tokenizer, prompt: str, n_tokens: int, seed: int):
    """The evaluation-time sample: ``n_tokens`` from ``prompt`` with gpt.generate and gpt-generate's
    sampling defaults (fixed seed, so samples at different steps differ only by what the model learned)."""
    prompt_ids = tokenizer.encode_ordinary(prompt) or ([tokenizer.eot_token] if tokenizer.eot_token is not None else [0])
    settings = {k: v for k, v in SAMPLING_DEFAULTS.items() if k != "max_new_tokens"}

    def sample(model) -> str:
        out = generate(model, prompt_ids, n_tokens, seed=seed, **settings)
        return tokenizer.decode(prompt_ids + out[0])

    return sample


def check_data(data_dir: Path, tokenizer_path: str | None):
    """(meta, tokenizer, train and val tokens) of the data directory, every file checked against
    meta.json, the token ids against the vocabulary included."""
    if data_dir.is_file():
        raise CLIError(f"--data {data_dir} is a file, not a data directory; make one from it with "
                       f"gpt-prepare {data_dir} --tokenizer TOKENIZER -o DATA_DIR (or train on it directly: gpt-train {data_dir} --out RUN_DIR)")
    meta = load_meta(data_dir)
    tok_path = Path(tokenizer_path or data_dir / TOKENIZER_FILE)
    check_not_a_broken_link(tok_path)
    if not tok_path.is_file():
        raise CLIError(f"tokenizer {tok_path} does not exist; pass --tokenizer (the one used by gpt-prepare)")
    tokenizer = tokenizers_bpe.load(tok_path)
    if tokenizer.fingerprint() != meta.tokenizer_fingerprint:
        raise CLIError(f"tokenizer {tok_path} is not the one {data_dir} was prepared with (fingerprints differ); use that tokenizer or re-run gpt-prepare")
    splits = {}
    for name in ("train", "val"):
        splits[name] = open_split(data_dir, name, meta)
        check_token_ids(splits[name], meta.n_vocab, data_dir / meta.splits[name].file)
    return meta, tokenizer, splits["train"], splits["val"]


def check_model_options(opts: dict, vocab_size: int, cfg) -> None:
    """Before the text stages: the model's shape options, the training window and the memory of a
    micro-batch, checked with a vocabulary of ``vocab_size`` (the one asked of the tokenizer)."""
    overrides = {k: opts[k] for k in MODEL_OPTIONS if opts[k] is not None}
    config = GPTConfig.from_preset(opts["preset"], vocab_size=vocab_size, **overrides)
    block_size = opts["block_size"] or config.n_ctx
    if block_size > config.n_ctx:
        raise CLIError(f"--block-size {block_size} is longer than the model's context n_ctx={config.n_ctx}; lower --block-size or raise --n-ctx")
    check_memory(PROG, config, vocab_size, cfg, block_size, state_bytes=training_state_bytes(n := config.num_parameters(), unbuilt_parameters=n))


def run(opts: dict, resume: bool, saved: dict | None) -> int:
    out = Path(opts["out"])
    cfg = train_config(opts)  # every option is checked before the data is read or the model built
    check_kernels_backend(opts["backend"] or "auto", resolve_device(cfg.device))
    check_not_an_input(out, opts["files"] or (), "--out")
    check_run_dir(out, resume, f"--resume {out}")
    run_dir = RunDirectory(out)
    try:
        tokenizer_path = opts["tokenizer"]
        if text_mode(opts):
            # A resumed run keeps the tokenizer its checkpoints were trained with, whatever the text is now.
            stages = plan_resumed_text_stages(opts, out, saved) if resume else plan_text_stages(opts, out)
            if not stages.done():
                if not opts["init_from"]:
                    vocab = stages.recipe.vocab_size if stages.recipe else tokenizers_bpe.load_any(stages.tokenizer_path).n_vocab
                    check_model_options(opts, vocab, cfg)
                check_writable_dir(out, "--out")
                run_dir.open()  # the run's lock from the first stage on, and its stamp
                run_dir.write_config(recorded({**opts, "data": str(stages.data_dir), "derived": saved["derived"] if saved else {}}))
                stages.run(PROG)
            opts, tokenizer_path = {**opts, "data": str(stages.data_dir)}, None  # the data directory's copy
        else:
            check_no_text_options(opts)
        return train(opts, resume, saved, cfg, tokenizer_path)
    finally:
        run_dir.close()


def train(opts: dict, resume: bool, saved: dict | None, cfg, tokenizer_path: str | None) -> int:
    """The training stage: on the data directory, with its tokenizer (or ``tokenizer_path``)."""
    out, data_dir = Path(opts["out"]), Path(opts["data"])
    meta, tokenizer, train_tokens, val_tokens = check_data(data_dir, tokenizer_path)
    if resume and trained_fingerprint(out, saved) not in (None, meta.tokenizer_fingerprint):
        raise CLIError(f"--resume {out}: the run was trained with another tokenizer than the one {data_dir} was prepared with")
    trained_on = saved["derived"].get("data_tokens") if resume and saved else None
    if trained_on is not None and trained_on != {s: i.tokens for s, i in meta.splits.items()}:
        raise CLIError(f"--resume {out}: {data_dir} was prepared again since the run started (it now holds "
                       f"{meta.splits['train'].tokens:,} train tokens, the run was trained on {reprlib.repr(trained_on)}); its "
                       "validation losses would not compare. Resume on the data the run was trained on, or start a new run "
                       f"from one of its checkpoints (--init-from {out / 'checkpoints'}/step-N)")
    model = build_model(opts, meta, tokenizer)
    model.tokenizer = tokenizer
    block_size = opts["block_size"] or model.config.n_ctx
    if block_size > model.config.n_ctx:
        raise CLIError(f"--block-size {block_size} is longer than the model's context n_ctx={model.config.n_ctx}; lower --block-size or raise --n-ctx")
    if opts["threads"] is not None:
        torch.set_num_threads(opts["threads"])
    dist = init_distributed(cfg.device)
    try:
        if opts["batch_tokens"]:
            per_micro = cfg.batch_size * block_size * dist.world_size
            cfg.grad_accum = max(1, math.ceil(opts["batch_tokens"] / per_micro))
        train_batch = RandomWindows(train_tokens, block_size, cfg.batch_size, seed=cfg.seed, grad_accum=cfg.grad_accum,
                                    rank=dist.rank, world_size=dist.world_size, device=dist.device)
        eval_batches = SlidingWindows(val_tokens, block_size, cfg.batch_size, stride=opts["eval_stride"], max_batches=cfg.eval_iters,
                                      rank=dist.rank, world_size=dist.world_size, device=dist.device)
        derived = {
            "grad_accum": cfg.grad_accum, "world_size": dist.world_size, "block_size": block_size,
            "tokens_per_step": cfg.batch_size * block_size * cfg.grad_accum * dist.world_size,
            "model": model.config.to_dict(), "parameters": model.num_parameters(),
            "tokenizer_fingerprint": meta.tokenizer_fingerprint, "data_tokens": {s: i.tokens for s, i in meta.splits.items()},
            "data_bytes": {s: i.bytes for s, i in meta.splits.items()},
        }
        run_config = {**recorded(opts), "grad_accum": cfg.grad_accum, "derived": derived}
        sampler = make_sampler(tokenizer, opts["sample_prompt"], opts["sample_tokens"], cfg.seed) if opts["sample_tokens"] > 0 else None
        trainer = Trainer(model, cfg, train_batch, eval_batches, out_dir=out, tokenizer=tokenizer, sample_fn=sampler,
                          bytes_per_token=meta.bytes_per_token("val"), run_config=run_config, dist=dist)
        check_memory(PROG, model.config, model.config.vocab_size, cfg, block_size,
                     state_bytes=training_state_bytes(count_trainable(model)[0]))
        check_writable_dir(out, "--out")
        check_disk(PROG, model, cfg, out)
        trainer.prepare(resume)
        if dist.is_main:
            print(f"{PROG}: {model.num_parameters():,} parameters ({model.config.n_layer} layers, {model.config.n_head} heads, "
                  f"{model.config.n_embd} wide, context {model.config.n_ctx}); {derived['tokens_per_step']:,} tokens/step "
                  f"({cfg.batch_size} x {block_size} x {cfg.grad_accum} accum x {dist.world_size} proc); "
                  f"device {dist.device}, {trainer.dtype}; {meta.splits['train'].tokens:,} train tokens", file=sys.stderr)
        return exit_code(run_training(trainer, resume, f"gpt-train --resume {out}"))
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


@command(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts, saved = effective_options(args)
    with removed_after_early_error(opts["out"]):
        return run(opts, resume=bool(args.resume), saved=saved)


if __name__ == "__main__":
    raise SystemExit(main())

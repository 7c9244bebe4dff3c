"""What the two training commands, gpt-train and gpt-finetune, share: the training options (one table,
the same names, types, defaults and help in both), the check that a micro-batch fits in memory, and
running the Trainer under the exit-code table."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

from gpt.config import POS_EMBEDDINGS, PRESETS
from gpt.device import DTYPES
from gpt.memory import check_micro_batch_fits
from gpt.run_state import LOCK_FILE, RUN_STAMP, RunDirectory, TrainResult, holds_run
from gpt.sampling import SAMPLING_DEFAULTS
from gpt.train_config import TrainConfig
from gpt.trainer import Trainer, TrainingDiverged
from gpt2_kernels import BACKENDS
from tokenizers_bpe.errors import NoSpaceError, OutputError, SettingError
from tokenizers_bpe.fileio import MAX_SEED, check_not_a_broken_link, check_replaceable, free_bytes, resolve_path
from tokenizers_bpe.locks import OutputLock
from tools.bpe_train import memory_size
from tools.cli import CLIError, ExitCode, choice, device_name, flag, integer, max_threads, number, output_path, parse_bool, path_argument, pattern_argument, unicode_text
from tools.corpus import BUILTIN_CORPORA

DEFAULT_PRESET = "shakespeare-cpu"


def option_table() -> list[tuple[str, Any, Any, str]]:
    """(name, type, default, help) of every gpt-train option that a config file can set; gpt-finetune
    takes the optimisation rows (TrainConfig's fields) with its own defaults."""
    t = TrainConfig()
    return [
        # the text (FILEs or --builtin: a tokenizer is trained and the text prepared first, as bpe-train
        # and gpt-prepare would) or the data (--data: a gpt-prepare data directory)
        ("files", list, None, "text files to train on (FILE arguments)"),
        ("builtin", choice(*BUILTIN_CORPORA), None, "train on a built-in corpus instead of FILEs (the same three stages)"),
        ("data", path_argument, None, "data directory written by gpt-prepare (instead of FILEs)"),
        ("out", output_path, None, "run directory for the tokenizer and data (with FILEs), metrics, checkpoints, best/ and final/ (required for a new run)"),
        ("tokenizer", path_argument, None, "with FILEs: an existing tokenizer (tokenizer.json, .tiktoken, or a directory holding one) instead of "
                                 "training one; with --data: tokenizer.json to use instead of DATA/tokenizer.json (the same tokenizer)"),
        ("pattern", pattern_argument, None, "with FILEs: the tokenizer's pre-tokenization regex: gpt2 (default), gpt4 or a regex"),
        ("special", list, None, "with FILEs: a special token of the tokenizer (repeatable; default <|endoftext|>)"),
        ("char", parse_bool, None, "with FILEs: a character-level tokenizer instead of BPE"),
        ("min_frequency", integer(1), None, "with FILEs: stop merging when the best pair occurs fewer times (default 1)"),
        ("max_memory", memory_size, None, "with FILEs: bpe-train's --max-memory for the tokenizer (e.g. 256MB): counts spilled to $TMPDIR"),
        ("val_fraction", number(0, 1, low_open=True, high_open=True), None, "with FILEs: the share of the text (its end) held out for validation (default 0.1)"),
        ("append_eot", parse_bool, None, "with FILEs: an <|endoftext|> token after every document"),
        ("preset", choice(*PRESETS), DEFAULT_PRESET, "model size (gpt.config.PRESETS); the shape options below override it"),
        ("init_from", path_argument, None, "start from this checkpoint (or run) directory (fine-tune/continue pre-training) instead of a random model"),
        ("n_layer", integer(1), None, "transformer blocks"),
        ("n_head", integer(1), None, "attention heads"),
        ("n_embd", integer(1), None, "embedding width (divisible by --n-head)"),
        ("n_ctx", integer(1), None, "context window (maximum sequence length) of the model"),
        ("dropout", number(0, 1, high_open=True), None, "dropout probability (0 for short runs and fine-tuning)"),
        ("bias", parse_bool, None, "biases in Linear and LayerNorm (true/false)"),
        ("pos_embedding", choice(*POS_EMBEDDINGS), None, "learned (GPT-2's, default; needed for hf-export) or rope (rotary: lower loss from scratch, see benches/README.md)"),
        ("backend", choice(*BACKENDS), None, "kernels backend: auto, triton or torch"),
        ("vocab_size", integer(1), None, "with FILEs: the tokenizer's vocabulary (default 4096, as bpe-train); with --data: "
                                         "the model's, which must be the tokenizer's n_vocab (the default)"),
        ("block_size", integer(1), None, "training window in tokens (default: the model's n_ctx)"),
        ("eval_stride", integer(1), None, "stride of the validation sliding window (default: --block-size, no overlap)"),
        ("batch_tokens", integer(1), None, "target tokens per optimiser step; sets --grad-accum (rounded up)"),
        # optimisation (gpt.train_config.TrainConfig)
        ("max_steps", integer(1), t.max_steps, "optimiser steps"),
        ("batch_size", integer(1), t.batch_size, "sequences per micro-batch per process"),
        ("grad_accum", integer(1), t.grad_accum, "micro-batches per optimiser step per process"),
        ("lr", number(0, low_open=True), t.lr, "peak learning rate"),
        ("min_lr", number(0), None, "learning-rate floor of the cosine decay (default: --lr / 10)"),
        ("warmup_steps", integer(0), t.warmup_steps, "linear warmup steps"),
        ("lr_decay_steps", integer(1), None, "step where the cosine reaches --min-lr (default: --max-steps)"),
        ("weight_decay", number(0), t.weight_decay, "AdamW weight decay (matrices and embeddings only)"),
        ("beta1", number(0, 1, high_open=True), t.beta1, "AdamW beta1"),
        ("beta2", number(0, 1, high_open=True), t.beta2, "AdamW beta2"),
        ("grad_clip", number(0), t.grad_clip, "clip the global gradient norm to this (0: no clipping)"),
        ("eval_interval", integer(1), t.eval_interval, "validate, sample and plot every N steps"),
        ("eval_iters", integer(1), t.eval_iters, "validation batches per evaluation (spread evenly over val.bin)"),
        ("log_interval", integer(1), t.log_interval, "a training line in metrics.jsonl every N steps"),
        ("checkpoint_interval", integer(1), None, "write RUN_DIR/checkpoints/step-N every N steps (default: --eval-interval)"),
        ("keep_last", integer(1), t.keep_last, "step checkpoints to keep"),
        ("seed", integer(0, MAX_SEED), t.seed, "random seed; the same seed gives the same run on CPU"),
        ("device", device_name, t.device, "auto, cpu, cuda or cuda:N"),
        ("dtype", choice("auto", *DTYPES), t.dtype, "auto, float32, bfloat16 or float16 (CUDA only, with a GradScaler)"),
        ("compile", parse_bool, t.compile, "torch.compile the model (true/false)"),
        ("sample_tokens", integer(0), 100, "tokens of the sample generated at each evaluation (0: none); sampled with "
                                           f"temperature {SAMPLING_DEFAULTS['temperature']}, top-k {SAMPLING_DEFAULTS['top_k']}, "
                                           f"top-p {SAMPLING_DEFAULTS['top_p']}, as gpt-generate"),
        ("sample_prompt", unicode_text, "\n", "prompt of that sample"),
        ("progress", parse_bool, t.progress, "show a progress bar (true/false)"),
        ("threads", integer(1, max_threads()), None, "CPU threads for PyTorch (default: PyTorch's choice, one per core); 1 is much faster on a machine busy with other work"),
    ]


def add_option(parser, name: str, typ, default, help_text: str) -> None:
    """One row of the option table as a flag (a list-valued one as positional FILEs or a repeatable flag);
    a boolean alone (--compile) means true, --compile false works too."""
    if name == "files":
        parser.add_argument("files", nargs="*", default=default, metavar="FILE", help=help_text)
    elif typ is list:
        parser.add_argument(flag(name), dest=name, action="append", default=default, metavar="TOKEN", help=help_text)
    else:
        flag_kwargs = dict(nargs="?", const=True, metavar="BOOL") if typ is parse_bool else {}
        parser.add_argument(flag(name), dest=name, type=typ, default=default, help=help_text, **flag_kwargs)


def add_train_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (), helps: dict[str, str] | None = None,
                      **defaults) -> None:
    """The optimisation options of gpt-train (the same names, types and help), with other defaults."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(skip)
    group = parser.add_argument_group("training (as gpt-train)")
    for name, typ, default, help_text in option_table():
        if name in fields:
            default = defaults.get(name, default)
            help_text = (helps or {}).get(name, help_text + ("" if default is None else f" (default: {default!r})"))
            add_option(group, name, typ, default, help_text)


def train_config(values: Mapping[str, Any]) -> TrainConfig:
    """A validated TrainConfig from the options that are its fields."""
    cfg = TrainConfig(**{f.name: values[f.name] for f in dataclasses.fields(TrainConfig) if f.name in values})
    cfg.validate()
    return cfg


def check_memory(prog: str, model_config, n_outputs: int, cfg: TrainConfig, length: int, flags: Mapping[str, str] | None = None,
                 state_bytes: int = 0) -> None:
    """Refuse training (the parameters' ``state_bytes``, see gpt.memory.training_state_bytes) or a
    micro-batch that cannot fit in memory; warn on stderr when it may not."""
    c = model_config
    memory = check_micro_batch_fits(c.n_layer, c.n_embd, n_outputs, cfg.batch_size, length, cfg.device, cfg.dtype, state_bytes)
    if memory is not None and memory.tight:
        warning = SettingError("batch_size", f"a micro-batch of {{batch_size}} {cfg.batch_size} x {{block_size}} {length} needs "
                                             f"at least {memory.need / 2**30:,.1f} GiB of the {memory.available / 2**30:,.1f} GiB "
                                             "available; if the process is killed, lower {batch_size} (raise {grad_accum} to "
                                             "keep the batch) or {block_size}")
        print(f"{prog}: warning: {warning.render(lambda name: flag(name, flags))}", file=sys.stderr)


def check_run_dir(out: Path, resume: bool, resume_flag: str) -> None:
    """--out must be new, empty, or a run directory of ours: to resume, or to restart one that was
    killed before its first checkpoint. Never the user's files, never a run that can be resumed."""
    try:
        check_not_a_broken_link(out)
        RunDirectory(out).lock.check()
    except OutputError as e:
        raise CLIError(str(e)) from None
    if resume:
        return
    try:
        check_replaceable(out, RUN_STAMP)
    except OutputError as e:
        if not out.is_dir() or any(p.name != LOCK_FILE for p in out.iterdir()):  # a lock alone: killed at once
            raise CLIError(f"--out {e}") from None
    if holds_run(out):
        raise CLIError(f"--out {out} already holds a run; continue it with {resume_flag} or choose another --out")


def check_disk(prog: str, model, cfg: TrainConfig, out: Path) -> None:
    """Warn on stderr, before training, when the checkpoints the run keeps will not fit on the disk:
    --keep-last step checkpoints (weights and AdamW moments) plus one being written, best/ and final/."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    need = (cfg.keep_last + 1) * (weights + moments) + 2 * weights
    free = free_bytes(out)
    if need > free:
        print(f"{prog}: warning: the run's checkpoints need about {need / 1e6:,.0f} MB ({cfg.keep_last + 1} step checkpoints "
              f"of {(weights + moments) / 1e6:,.0f} MB, best/ and final/) but {out} has {free / 1e6:,.0f} MB free; "
              "lower --keep-last or free some space", file=sys.stderr)


def resolved(path_or_paths):
    """A path option's value as run_config.json records it and a resume compares it: resolved (each of
    a list), so that a run resumed from another directory means the same files; anything else as is."""
    if isinstance(path_or_paths, (list, tuple)):
        return [resolved(p) for p in path_or_paths]
    return str(resolve_path(path_or_paths)) if isinstance(path_or_paths, (str, Path)) and path_or_paths else path_or_paths


@contextlib.contextmanager
def removed_after_early_error(out: str | Path | None) -> Iterator[None]:
    """The run directory ``out``, when this command creates it, is removed again if the command stops
    on an error (a bad input found late, a loss that is NaN from the first step) before the directory
    holds a run (a step checkpoint or ``final/``): an error leaves no directory of nothing useful, nor
    its lock files. An interrupt keeps it: the same command or --resume goes on from it. Nor is it
    removed while another process holds one of its locks: a second command started on the same new
    directory at the same moment, refused for the lock, removed the run the first one was writing."""
    out = Path(out) if out else None
    created = out is not None and not out.exists() and not out.is_symlink()
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException:
        if (created and out.is_dir() and not holds_run(out)
                and not any(OutputLock(p, str(p)).held_elsewhere() for p in out.glob(".*lock"))):
            shutil.rmtree(out, ignore_errors=True)
        raise


def run_training(trainer: Trainer, resume: bool, resume_command: str) -> TrainResult:
    """``trainer.fit``; a diverged run is an error with ExitCode.DIVERGED naming the last good
    checkpoint, a full disk a user error saying how to resume. The main process prints the summary,
    and after an interruption how to resume."""
    try:
        result = trainer.fit(resume=resume)
    except NoSpaceError as e:
        raise CLIError(f"{e}; free some space, then: {resume_command}") from None
    except TrainingDiverged as e:
        if not trainer.dist.is_main:  # every rank stops; the main one says why
            raise SystemExit(ExitCode.DIVERGED) from None
        if not resume and trainer.step == 0:  # before any update: the starting model, or its dtype, is at fault
            raise CLIError(f"{e}, before any update: the starting model's loss is not finite; its weights are damaged or "
                           "too large (check them with gpt-inspect), or --dtype float16 overflows (use bfloat16 or float32)") from None
        last = trainer.latest_checkpoint()
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
        raise CLIError(f"{e}; stopped, {where}. Lower --lr, raise --warmup-steps or use --dtype float32",
                       ExitCode.DIVERGED) from None
    if trainer.dist.is_main:
        print(result.summary())
        if result.interrupted:
            print(f"resume with: {resume_command}")
        elif result.tokens == 0:
            print(f"to train further, raise --max-steps: {resume_command} --max-steps {2 * result.step}")
    return result


def exit_code(result: TrainResult) -> ExitCode:
    return ExitCode.INTERRUPTED if result.interrupted else ExitCode.OK

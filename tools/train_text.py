"""The first two stages of ``gpt-train FILE [FILE ...] --out RUN_DIR`` (and ``--builtin``): a tokenizer
trained on the text, as bpe-train would write it (``RUN_DIR/tokenizer.json``), then the text prepared
with it, as gpt-prepare would (``RUN_DIR/data/``); the third stage is the training of gpt-train
--data RUN_DIR/data. Every check of the first two stages (files readable and UTF-8, a train/val split
possible, the tokenizer's options) is made by ``plan_text_stages`` before any stage runs."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tokenizers_bpe
from gpt.data import load_meta
from gpt.run_state import checkpoint_dirs
from tokenizers_bpe import ENDOFTEXT, TOKENIZER_FILE
from tokenizers_bpe.fileio import read_json
from tokenizers_bpe.patterns import resolve_pattern
from tokenizers_bpe.trainer import DEFAULT_MIN_FREQUENCY, DEFAULT_SPECIAL_TOKENS
from tools.bpe_inspect import describe_sizes
from tools.bpe_train import DEFAULT_VOCAB_SIZE, TokenizerRecipe
from tools.cli import CLIError
from tools.prepare import DataPlan, load_tokenizer_to_keep, plan_data, prepare, tokenizer_pattern

DATA_DIR = "data"  # RUN_DIR/data: the prepared text
TOKENIZER_OPTIONS = ("vocab_size", "pattern", "special", "char", "min_frequency", "max_memory")  # what trains the tokenizer
TEXT_OPTIONS = ("files", "builtin", "val_fraction", "append_eot", "pattern", "special", "char", "min_frequency", "max_memory")
DEFAULT_VAL_FRACTION = 0.1


def text_mode(opts: dict) -> bool:
    """Whether gpt-train was given text (FILEs or --builtin) rather than a --data directory."""
    return bool(opts["files"] or opts["builtin"])


@dataclass
class TextStages:
    out: Path
    recipe: TokenizerRecipe | None  # None: an existing tokenizer (--tokenizer) is used
    tokenizer_path: Path
    plan: DataPlan | None  # None: the data is complete (a resumed run), nothing to plan
    append_eot: bool
    progress: bool

    @property
    def data_dir(self) -> Path:
        return self.out / DATA_DIR

    def done(self) -> bool:
        """Whether an earlier run of the same command already made the data (for --resume)."""
        try:
            load_meta(self.data_dir)
        except ValueError:
            return False
        return True

    def run(self, prog: str) -> None:
        start = time.perf_counter()
        if self.recipe is not None:
            kind = "char-level" if self.recipe.char else f"{self.recipe.vocab_size}-token BPE"
            print(f"{prog}: 1/3 tokenizer: training a {kind} tokenizer on {self.recipe.source}", file=sys.stderr)
            tokenizer, caught = self.recipe.train(progress=self.progress, prog=prog)
            for message in caught:
                print(f"{prog}: warning: {message}", file=sys.stderr)
            tokenizer.save(self.tokenizer_path)
            print(f"{prog}: 1/3 tokenizer: {describe_sizes(tokenizer)} -> {self.tokenizer_path} "
                  f"({time.perf_counter() - start:.1f}s)", file=sys.stderr)
        else:
            tokenizer = tokenizers_bpe.load_any(self.tokenizer_path)
            print(f"{prog}: 1/3 tokenizer: {self.tokenizer_path} ({describe_sizes(tokenizer)})", file=sys.stderr)
        start = time.perf_counter()
        print(f"{prog}: 2/3 data: preparing {self.plan.total:,} bytes of text -> {self.data_dir}", file=sys.stderr)
        meta = prepare(self.plan, tokenizer, str(self.tokenizer_path), self.data_dir, append_eot=self.append_eot,
                       workers=min(8, os.cpu_count() or 1), progress=self.progress)
        tokens = ", ".join(f"{s.tokens:,} {name}" for name, s in meta.splits.items())
        print(f"{prog}: 2/3 data: {tokens} tokens ({time.perf_counter() - start:.1f}s)", file=sys.stderr)


def plan_text_stages(opts: dict, out: Path) -> TextStages:
    """Every check of the tokenizer and data stages, before either runs: a one-line error naming the
    file or option at fault."""
    files, builtin = list(opts["files"] or ()), opts["builtin"]
    if files and builtin:
        raise CLIError("give text FILEs or --builtin, not both")
    if opts["data"] and Path(opts["data"]) != out / DATA_DIR:  # (a resumed run records its own data directory)
        raise CLIError("give text FILEs (or --builtin) or --data DATA_DIR, not both")
    if opts["tokenizer"]:
        given = [name for name in TOKENIZER_OPTIONS if opts[name] not in (None, False, ())]
        if given:
            raise CLIError(f"--tokenizer uses an existing tokenizer; drop {', '.join('--' + n.replace('_', '-') for n in given)}")
        recipe, tokenizer_path = None, Path(opts["tokenizer"])
        tokenizer = load_tokenizer_to_keep(tokenizer_path)
        pattern, has_eot = tokenizer_pattern(tokenizer), tokenizer.eot_token is not None
    else:
        if opts["init_from"]:
            raise CLIError("--init-from needs the tokenizer of that checkpoint: give --tokenizer CHECKPOINT/tokenizer.json")
        specials = tuple(opts["special"] or DEFAULT_SPECIAL_TOKENS)
        recipe = TokenizerRecipe(files, builtin, opts["vocab_size"] or DEFAULT_VOCAB_SIZE, opts["pattern"] or "gpt2", specials,
                                 opts["min_frequency"] or DEFAULT_MIN_FREQUENCY, bool(opts["char"]),
                                 max_memory=opts["max_memory"])
        recipe.check()
        tokenizer_path = out / TOKENIZER_FILE
        pattern, has_eot = (None if recipe.char else resolve_pattern(recipe.pattern)), ENDOFTEXT in specials
    if opts["append_eot"] and not has_eot:
        raise CLIError(f"--append-eot: the tokenizer has no {ENDOFTEXT} token; drop --append-eot or add it with --special")
    plan = plan_data(files, builtin, pattern, val_fraction=opts["val_fraction"] or DEFAULT_VAL_FRACTION, chunk_mb=1.0,
                     progress=opts["progress"])
    return TextStages(out, recipe, tokenizer_path, plan, bool(opts["append_eot"]), opts["progress"])


def trained_fingerprint(out: Path, saved: dict | None) -> str | None:
    """The fingerprint of the tokenizer a run's model was trained with: its newest step checkpoint's
    (config.json records it), else what run_config.json recorded; None before any training."""
    for _, directory in reversed(checkpoint_dirs(out)):
        try:
            meta = read_json(directory / "config.json")
            return meta["tokenizer"]["fingerprint"]
        except (ValueError, KeyError, TypeError):
            continue  # a corrupt checkpoint: the trainer sets it aside
    return (saved or {}).get("derived", {}).get("tokenizer_fingerprint")


def plan_resumed_text_stages(opts: dict, out: Path, saved: dict | None) -> TextStages:
    """The text stages of ``--resume``: none when the run's data is complete (its text is not read:
    the FILEs may be gone); else the data prepared again with the run's own tokenizer, never a new one,
    since the checkpoints were trained with it. Nothing is written by this check."""
    expected = trained_fingerprint(out, saved)
    data_dir = out / DATA_DIR
    tokenizer_path = Path(opts["tokenizer"]) if opts["tokenizer"] else out / TOKENIZER_FILE
    try:
        meta = load_meta(data_dir)
    except ValueError:
        meta = None
    if meta is not None:
        if expected is not None and meta.tokenizer_fingerprint != expected:
            raise CLIError(f"--resume {out}: {data_dir} was prepared with another tokenizer than the one the run's checkpoints "
                           "were trained with; remove it to prepare it again with the run's tokenizer")
        return TextStages(out, None, tokenizer_path, None, bool(opts["append_eot"]), opts["progress"])
    if expected is None:  # nothing trained yet: the stages run as the first time
        return plan_text_stages(opts, out)
    try:
        tokenizer = tokenizers_bpe.load_any(tokenizer_path)
    except ValueError:
        tokenizer = None
    if tokenizer is None or tokenizer.fingerprint() != expected:
        raise CLIError(f"--resume {out}: its data must be prepared again, but {tokenizer_path} is "
                       f"{'missing or unreadable' if tokenizer is None else 'another tokenizer'}, not the one the run's "
                       "checkpoints were trained with; restore it (a checkpoint directory holds a copy)")
    plan = plan_data(list(opts["files"] or ()), opts["builtin"], tokenizer_pattern(tokenizer),
                     val_fraction=opts["val_fraction"] or DEFAULT_VAL_FRACTION, chunk_mb=1.0, progress=opts["progress"])
    trained_on = (saved or {}).get("derived", {}).get("data_bytes")
    if trained_on is not None and trained_on != plan.planned:
        raise CLIError(f"--resume {out}: its data must be prepared again, but the text is not the one the run was trained on "
                       f"({sum(plan.planned.values()):,} bytes, the run's had {sum(trained_on.values()):,}); resume with "
                       f"that text, or start a new run from one of its checkpoints (--init-from {out / 'checkpoints'}/step-N)")
    print(f"gpt-train: note: {data_dir} is missing or incomplete; preparing it again from the text with the run's tokenizer "
          f"{tokenizer_path}", file=sys.stderr)
    return TextStages(out, None, tokenizer_path, plan, bool(opts["append_eot"]), opts["progress"])


def check_no_text_options(opts: dict) -> None:
    """In --data mode the options of the text stages make no sense: a one-line error naming them."""
    given = [name for name in TEXT_OPTIONS if opts[name] not in (None, False, (), [])]
    if given:
        raise CLIError(f"{', '.join('--' + n.replace('_', '-') for n in given)} go with text FILEs (or --builtin), "
                       "not with --data (whose text was prepared already)")

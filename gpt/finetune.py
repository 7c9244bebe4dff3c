"""Fine-tuning a pretrained GPT: text classification and instruction following.

    gpt-finetune classify --model ckpt/ --train train.csv --val val.csv --test test.csv --out runs/cls
    gpt-classify --model runs/cls "To be, or not to be" "Now is the winter of our discontent"
    gpt-finetune instruct --model ckpt/ --data instruction-data.json --out runs/sft --mask-prompt
    gpt-generate --model runs/sft/final --instruct "Convert 45 kilometers to meters."

Both subcommands train with ``gpt.trainer.Trainer`` (schedule, clipping, AMP, checkpoints, resume,
metrics, progress) and take its options; ``--out`` is a run directory as gpt-train's, with the model
in ``OUT/final/`` (and ``OUT/best/``, the lowest validation loss). ``--lora-rank R`` trains low-rank
adapters (gpt.lora) instead of the base weights; they are saved apart and ``gpt-convert merge-lora``
folds them in.

Classification data: CSV (``.csv``), TSV (``.tsv``) with a header row, or JSON Lines (``.jsonl``), one
example per row with a text and a label column (``--text-column``/``--label-column``). Labels are
strings; their ids are the sorted training labels, saved with the model (``classifier.json``). The
classifier is the GPT body plus a linear head (``classifier.safetensors``) on the final hidden state
of the last real token: inputs are padded on the right, so with causal attention that state never
sees the padding. ``--trainable`` picks what trains besides the head (default: the last block and
the final LayerNorm).

Instruction data: Alpaca-style JSON, a list of ``{"instruction", "input", "output"}`` records
(``input`` may be empty or absent), or the same records as JSON Lines; the text is the template of
gpt.prompt_template followed by the output and the end-of-text token. Batches are padded to their
longest sequence with the end-of-text id; padded targets are -100 (ignored by the loss), and with
``--mask-prompt`` so are the targets inside the prompt, so only the response is learned.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizers_bpe import UnknownCharacterError
from tools.cli import ArgumentParser, CLIError, command
from tools.fileio import read_json

CLASSIFIER_FORMAT = "gpt-classifier"
CLASSIFIER_VERSION = 1
CLASSIFIER_FILE = "classifier.json"
HEAD_FILE = "classifier.safetensors"
EVALUATION_FILE = "evaluation.json"
TRAINABLE = ("head", "last-block", "all")
RUN_DEFINING = ("model", "train", "val", "test", "data", "val_fraction", "text_column", "label_column", "trainable",
                "mask_prompt", "max_length", "lora_rank", "lora_alpha", "lora_targets", "seed")


# ---------------------------------------------------------------------------------------------- classification data


def _text_field(value: Any, column: str, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: column {column!r} must be a string, got {json.dumps(value)[:40]}")
    text = str(value)
    if not text.strip():
        raise ValueError(f"{where}: column {column!r} is empty")
    return text


def read_jsonl(path: Path) -> list[tuple[str, Any]]:
    """(where, value) for each non-blank line of a JSON Lines file; ``where`` names the line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append((f"{path} line {number}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
    return rows


def read_examples(path: str | Path, text_column: str = "text", label_column: str = "label") -> list[tuple[str, str]]:
    """(text, label) pairs from a .csv/.tsv (header row) or .jsonl file; errors name the line."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl"):
        raise ValueError(f"{path}: unknown data format {suffix or '(no extension)'}; use .csv, .tsv or .jsonl")
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    examples = []
    if suffix == ".jsonl":
        for where, row in read_jsonl(path):
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object with {text_column!r} and {label_column!r}")
            missing = [c for c in (text_column, label_column) if c not in row]
            if missing:
                raise ValueError(f"{where}: missing field {missing[0]!r} (fields: {', '.join(row) or 'none'}); "
                                 "set --text-column/--label-column")
            examples.append((_text_field(row[text_column], text_column, where), _text_field(row[label_column], label_column, where).strip()))
        return examples
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
        header = reader.fieldnames or []
        missing = [c for c in (text_column, label_column) if c not in header]
        if missing:
            raise ValueError(f"{path}: no column {missing[0]!r} in the header (columns: {', '.join(header) or 'none'}); "
                             "set --text-column/--label-column")
        for row in reader:
            where = f"{path} line {reader.line_num}"
            if None in row or any(row[c] is None for c in (text_column, label_column)):
                raise ValueError(f"{where}: expected {len(header)} fields like the header, got another number")
            examples.append((_text_field(row[text_column], text_column, where), _text_field(row[label_column], label_column, where).strip()))
    return examples


def label_names(train: list[tuple[str, str]], what: str) -> list[str]:
    """The sorted distinct training labels (a label's id is its index)."""
    if not train:
        raise ValueError(f"{what} has no examples")
    labels = sorted({label for _, label in train})
    if len(labels) < 2:
        raise ValueError(f"{what} has only one label ({labels[0]!r}); a classifier needs examples of at least two")
    return labels


def check_known_labels(examples: list[tuple[str, str]], labels: list[str], what: str) -> None:
    known = set(labels)
    unseen = sorted({label for _, label in examples if label not in known})
    if unseen:
        raise ValueError(f"{what}: label(s) {', '.join(map(repr, unseen[:5]))} do not occur in the training data "
                         f"(training labels: {', '.join(labels)})")


def encode_examples(tokenizer, examples: list[tuple[str, str]], labels: list[str], max_length: int) -> list[tuple[list[int], int]]:
    """Token ids (the first ``max_length``) and label id of each example."""
    index = {label: i for i, label in enumerate(labels)}
    return [(tokenizer.encode_ordinary(text)[:max_length], index[label]) for text, label in examples]


def collate_classification(batch: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (B, T) right-padded with ``pad_id``, lengths (B,), labels (B,))."""
    T = max(len(ids) for ids, _ in batch)
    idx = torch.full((len(batch), T), pad_id, dtype=torch.long)
    for row, (ids, _) in enumerate(batch):
        idx[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    lengths = torch.tensor([len(ids) for ids, _ in batch], dtype=torch.long)
    return idx, lengths, torch.tensor([label for _, label in batch], dtype=torch.long)


# ---------------------------------------------------------------------------------------------- instruction data


def read_instructions(path: str | Path) -> list[dict[str, str]]:
    """Alpaca-style records from a JSON list (or JSON Lines); errors name the line or the record."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    if path.suffix.lower() == ".jsonl":
        rows = read_jsonl(path)
    else:
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of {{\"instruction\", \"input\", \"output\"}} records")
        rows = [(f"{path} record {i}", r) for i, r in enumerate(records, 1)]
    out = []
    for where, record in rows:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object with \"instruction\", \"input\" and \"output\"")
        for field in ("instruction", "output"):
            if field not in record:
                raise ValueError(f"{where}: missing field {field!r} (the template needs instruction, input and output)")
        for field in ("instruction", "input", "output"):
            if not isinstance(record.get(field, ""), str):
                raise ValueError(f"{where}: field {field!r} must be a string")
        if not record["instruction"].strip():
            raise ValueError(f"{where}: empty \"instruction\"")
        out.append({"instruction": record["instruction"], "input": record.get("input", ""), "output": record["output"]})
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def encode_instruction(tokenizer, record: dict[str, str], max_length: int, mask_prompt: bool) -> tuple[list[int], list[int]] | None:
    """(inputs, targets) of one record: template + output + end-of-text, cut to ``max_length + 1``
    tokens; targets are the inputs shifted by one, -100 where they are prompt tokens (with
    ``mask_prompt``). None when nothing is left to learn (a prompt longer than ``max_length``)."""
    from gpt.prompt_template import format_instruction_prompt

    prompt = tokenizer.encode_ordinary(format_instruction_prompt(record["instruction"], record["input"]))
    ids = (prompt + tokenizer.encode_ordinary(record["output"]) + [tokenizer.eot_token])[: max_length + 1]
    inputs, targets = ids[:-1], ids[1:]
    if mask_prompt:  # targets[i] is token i + 1: tokens 1 .. len(prompt) - 1 belong to the prompt
        targets = [-100] * (len(prompt) - 1) + targets[len(prompt) - 1 :]
        targets = targets[: len(inputs)]
    if all(t == -100 for t in targets):
        return None
    return inputs, targets


def collate_instructions(batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence: inputs with ``pad_id``, targets with -100."""
    T = max(len(x) for x, _ in batch)
    inputs = torch.full((len(batch), T), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), T), -100, dtype=torch.long)
    for row, (x, y) in enumerate(batch):
        inputs[row, : len(x)] = torch.tensor(x, dtype=torch.long)
        targets[row, : len(y)] = torch.tensor(y, dtype=torch.long)
    return inputs, targets


def count_targets(batch) -> int:
    return int((batch[1] != -100).sum())


# ---------------------------------------------------------------------------------------------- batches


class ShuffledBatches:
    """``train_batch(step, micro_step)`` for the Trainer: a fresh seeded permutation of the examples
    every epoch, read in order. A pure function of its arguments, so resuming replays the same data;
    under DDP rank r takes micro-batches r, r + world_size, ..."""

    def __init__(self, examples: list, batch_size: int, collate: Callable[[list], Any], *, seed: int,
                 grad_accum: int = 1, rank: int = 0, world_size: int = 1):
        self.examples, self.batch_size, self.collate = examples, batch_size, collate
        self.seed, self.grad_accum, self.rank, self.world_size = seed, grad_accum, rank, world_size
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # keep memory flat
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        return self._perms[epoch]

    def __call__(self, step: int, micro_step: int):
        start = ((step * self.grad_accum + micro_step) * self.world_size + self.rank) * self.batch_size
        n = len(self.examples)
        picked = [self.examples[self._permutation(p // n)[p % n]] for p in range(start, start + self.batch_size)]
        return self.collate(picked)


def in_batches(examples: list, batch_size: int, collate: Callable[[list], Any]):
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start : start + batch_size])


# ---------------------------------------------------------------------------------------------- the classifier


class GPTClassifier(nn.Module):
    """A GPT body and a linear head on the hidden state of each sequence's last real token."""

    def __init__(self, gpt: nn.Module, labels: Sequence[str]):
        super().__init__()
        self.gpt = gpt
        self.labels = list(labels)
        self.head = nn.Linear(gpt.config.n_embd, len(self.labels))
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded ids and (B,) lengths -> (B, n_labels) fp32 logits."""
        hidden = self.gpt.hidden_states(idx)
        last = hidden[torch.arange(idx.size(0), device=idx.device), lengths - 1]
        return self.head(last).float()


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    idx, lengths, labels = batch
    return F.cross_entropy(model(idx, lengths), labels)


def set_trainable(model: GPTClassifier, trainable: str) -> None:
    """The head always trains; ``last-block`` adds the last block and the final LayerNorm, ``all``
    everything. With LoRA adapters only they and the head train (``trainable`` must be ``head``)."""
    if trainable not in TRAINABLE:
        raise ValueError(f"--trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
    lora = getattr(model.gpt, "lora_config", None) is not None
    if lora and trainable != "head":
        raise ValueError("with --lora-rank only the adapters and the head train; drop --trainable (or use --trainable head)")
    for name, p in model.named_parameters():
        p.requires_grad_(trainable == "all" or name.startswith("head.") or (lora and name.endswith((".lora_A", ".lora_B"))))
    if trainable == "last-block":
        for module in (model.gpt.transformer.h[-1], model.gpt.transformer.ln_f):
            module.requires_grad_(True)


def save_classifier(model: GPTClassifier, directory: Path, tokenizer, *, max_length: int) -> None:
    """The GPT checkpoint files (so GPT.from_pretrained loads the body) plus the head and the labels."""
    from safetensors.torch import save_file

    from gpt.checkpoint import write_checkpoint

    write_checkpoint(directory, model.gpt, tokenizer, model.gpt.generation_config)
    head = {k: v.detach().to(next(model.gpt.parameters()).dtype).contiguous().cpu() for k, v in model.head.state_dict().items()}
    save_file(head, str(Path(directory) / HEAD_FILE), metadata={"format": "pt"})
    meta = {"format": CLASSIFIER_FORMAT, "format_version": CLASSIFIER_VERSION, "labels": model.labels, "max_length": max_length}
    (Path(directory) / CLASSIFIER_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def load_classifier(directory, *, device="cpu") -> tuple[GPTClassifier, int]:
    """(classifier, max_length) from a directory written by save_classifier."""
    from safetensors.torch import load_file

    from gpt.checkpoint import CheckpointError, read_json
    from gpt.model import GPT

    directory = Path(directory)
    if not (directory / CLASSIFIER_FILE).is_file() and (directory / "final" / CLASSIFIER_FILE).is_file():
        directory = directory / "final"  # a gpt-finetune run directory: its final model
    path = directory / CLASSIFIER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; is {directory} a gpt-finetune classify output?")
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != CLASSIFIER_FORMAT:
        raise CheckpointError(f"{path}: not a {CLASSIFIER_FORMAT} file")
    if meta.get("format_version") != CLASSIFIER_VERSION:
        raise CheckpointError(f"{path}: unknown format_version {meta.get('format_version')!r}; this version reads {CLASSIFIER_VERSION}")
    labels, max_length = meta.get("labels"), meta.get("max_length")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels) or len(set(labels)) != len(labels):
        raise CheckpointError(f"{path}: \"labels\" must be a list of at least two distinct strings")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise CheckpointError(f"{path}: \"max_length\" must be a positive integer")
    gpt = GPT.from_pretrained(directory, device=device)
    model = GPTClassifier(gpt, labels).to(device)
    try:
        head = load_file(str(directory / HEAD_FILE), device=str(device))
    except FileNotFoundError:
        raise CheckpointError(f"{directory / HEAD_FILE}: file not found; the classifier head is missing") from None
    except Exception as e:  # safetensors' own error types for a corrupt file
        raise CheckpointError(f"{directory / HEAD_FILE}: not a readable safetensors file ({e})") from None
    expected = {k: tuple(v.shape) for k, v in model.head.state_dict().items()}
    if {k: tuple(v.shape) for k, v in head.items()} != expected:
        raise CheckpointError(f"{directory / HEAD_FILE}: expected tensors {expected} for {len(labels)} labels")
    model.head.load_state_dict({k: v.to(model.head.weight.dtype) for k, v in head.items()})
    return model.to(next(gpt.parameters()).dtype).eval(), max_length


@torch.no_grad()
def evaluate_classifier(model: GPTClassifier, examples: list[tuple[list[int], int]], batch_size: int, pad_id: int) -> dict:
    """Mean loss, accuracy and the confusion matrix (rows: true label, columns: predicted)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = len(model.labels)
    confusion = torch.zeros(n, n, dtype=torch.long)
    loss_sum = 0.0
    for idx, lengths, labels in in_batches(examples, batch_size, lambda b: collate_classification(b, pad_id)):
        logits = model(idx.to(device), lengths.to(device)).cpu()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        confusion += torch.bincount(labels * n + logits.argmax(-1), minlength=n * n).view(n, n)
    model.train(was_training)
    total = int(confusion.sum())
    return {"loss": loss_sum / max(total, 1), "accuracy": int(confusion.trace()) / max(total, 1), "examples": total,
            "confusion": confusion.tolist()}


def format_confusion(labels: list[str], confusion: list[list[int]]) -> str:
    width = max(8, *(len(x) for x in labels)) + 1
    lines = ["true \\ predicted".ljust(width) + "".join(x.rjust(width) for x in labels)]
    for label, row in zip(labels, confusion):
        lines.append(label.ljust(width) + "".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- command line


def add_train_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (), helps: dict[str, str] | None = None, **defaults) -> None:
    """The optimisation options of gpt-train (the same names, types and help), with fine-tuning defaults."""
    from gpt.train import add_option, option_table
    from gpt.trainer import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(skip)
    group = parser.add_argument_group("training (as gpt-train)")
    for name, typ, default, help_text in option_table():
        if name in fields:
            default = defaults.get(name, default)
            help_text = (helps or {}).get(name, help_text + ("" if default is None else f" (default: {default!r})"))
            add_option(group, name, typ, default, help_text)


def add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="pretrained checkpoint directory (gpt-train final/, gpt-convert output)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory: metrics, checkpoints, best/ and final/ (the model)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint (same options)")
    p.add_argument("--max-length", type=int, metavar="N", help="cut examples to N tokens (default: the model's n_ctx)")
    lora = p.add_argument_group("LoRA (train low-rank adapters instead of the base weights)")
    lora.add_argument("--lora-rank", type=int, metavar="R", help="adapter rank; enables LoRA")
    lora.add_argument("--lora-alpha", type=float, metavar="A", help="adapter scale alpha: the update is scaled by A/R (default: 2R)")
    lora.add_argument("--lora-targets", default="attn", metavar="LIST",
                      help="comma-separated layer groups: attn (c_attn, c_proj), mlp (c_fc, c_proj) (default: %(default)s)")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="gpt-finetune", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    commands = p.add_subparsers(dest="command", required=True, metavar="{classify,instruct}")
    raw = argparse.RawDescriptionHelpFormatter  # defaults are written into the help texts
    c = commands.add_parser("classify", help="train a text classifier (a linear head on the GPT)", formatter_class=raw,
                            description="Train a classifier: the GPT body and a linear head over the last token's hidden state.")
    add_common_options(c)
    c.add_argument("--train", required=True, metavar="FILE", help="training examples (.csv, .tsv or .jsonl)")
    c.add_argument("--val", required=True, metavar="FILE", help="validation examples (same format)")
    c.add_argument("--test", metavar="FILE", help="test examples, evaluated at the end")
    c.add_argument("--text-column", default="text", help="column (or JSON field) with the text (default: %(default)s)")
    c.add_argument("--label-column", default="label", help="column (or JSON field) with the label (default: %(default)s)")
    c.add_argument("--trainable", choices=TRAINABLE, default=None,
                   help="what trains besides the head: head (nothing), last-block (the last block and the final LayerNorm), "
                        "all (default: last-block; with --lora-rank: head, i.e. the adapters and the head)")
    add_train_options(c, skip=("eval_iters",), max_steps=300, batch_size=8, lr=1e-4, warmup_steps=20, eval_interval=50, weight_decay=0.1)
    i = commands.add_parser("instruct", help="instruction fine-tuning on Alpaca-style JSON", formatter_class=raw,
                            description="Instruction fine-tuning on Alpaca-style {instruction, input, output} records.")
    add_common_options(i)
    i.add_argument("--data", required=True, metavar="FILE", help="instruction records (.json list or .jsonl)")
    i.add_argument("--val", metavar="FILE", help="validation records (default: the last --val-fraction of --data)")
    i.add_argument("--val-fraction", type=float, default=0.1,
                   help="the last this share of --data is held out for validation when --val is not given (default: %(default)s)")
    i.add_argument("--mask-prompt", action="store_true", help="learn only the response: prompt targets get -100")
    i.add_argument("--show", type=int, default=3, metavar="N",
                   help="print greedy answers to the first N validation instructions at the end (default: %(default)s)")
    add_train_options(i, helps={"eval_iters": "validation batches per evaluation (default: all)"}, max_steps=300, batch_size=8, lr=1e-4, warmup_steps=20, eval_interval=50, eval_iters=None, weight_decay=0.1)
    return p


def lora_config_from_args(args):
    if args.lora_rank is None:
        if args.lora_alpha is not None:
            raise CLIError("--lora-alpha needs --lora-rank")
        return None
    from gpt.lora import LoRAConfig

    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
    return LoRAConfig(rank=args.lora_rank, alpha=alpha, targets=LoRAConfig.parse_targets(args.lora_targets))


def train_config(args):
    from gpt.trainer import TrainConfig

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)})
    cfg.validate()
    return cfg


def load_base(args):
    from gpt.model import GPT

    model = GPT.from_pretrained(args.model)
    if getattr(model, "lora_config", None) is not None:
        raise CLIError(f"--model {args.model} has LoRA adapters; merge them first: gpt-convert merge-lora {args.model} MERGED")
    max_length = args.max_length or model.config.n_ctx
    if not 1 <= max_length <= model.config.n_ctx:
        raise CLIError(f"--max-length must be between 1 and the model's n_ctx ({model.config.n_ctx}), got {max_length}")
    return model, max_length


def check_batch(cfg, train_examples: list, model_config, n_outputs: int) -> None:
    """Refuse, before building any batch, a --batch-size whose micro-batch cannot fit in memory even if
    every example were as short as the shortest one (the message names the shortest length)."""
    from gpt.trainer import check_micro_batch_fits

    shortest = min(len(example[0]) for example in train_examples)
    c = model_config
    warning = check_micro_batch_fits(c.n_layer, c.n_embd, n_outputs, cfg.batch_size, shortest, cfg.device, cfg.dtype, "--max-length")
    if warning:
        print(f"gpt-finetune: warning: {warning}", file=sys.stderr)


def check_out(args) -> None:
    """Fail before any work when --out already holds a run (and --resume is not given)."""
    from tools.fileio import check_writable_dir

    out = check_writable_dir(args.out, "--out", keep=False)  # the Trainer creates it once every check has passed
    if not args.resume and ((out / "checkpoints").exists() or (out / "metrics.jsonl").exists()):
        raise CLIError(f"--out {out} already holds a run; continue it with --resume or choose another --out")


def check_resume(args, run_config: dict) -> None:
    """Refuse to resume a run with options that define it changed (data, model, adapters)."""
    path = Path(args.out) / "run_config.json"
    if not path.is_file():
        raise CLIError(f"--resume: {path} is missing; {args.out} is not a gpt-finetune run directory")
    saved = read_json(path, f"{args.out} is not a usable gpt-finetune run directory")
    if not isinstance(saved, dict):
        raise CLIError(f"--resume: {path} is not a gpt-finetune run configuration")
    for key in RUN_DEFINING:
        if key in run_config and saved.get(key) != run_config[key]:
            raise CLIError(f"--{key.replace('_', '-')} cannot change when resuming (the run used {saved.get(key)!r})")


def describe(model: nn.Module, lora) -> str:
    from gpt.lora import count_trainable

    trainable, total = count_trainable(model)
    extra = f"; LoRA rank {lora.rank}, alpha {lora.alpha:g} on {','.join(lora.targets)}" if lora else ""
    return f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%){extra}"


def fit(trainer, args):
    """Train; on the main process print the summary (and how to resume after an interruption)."""
    from gpt.trainer import TrainingDiverged

    try:
        result = trainer.fit(resume=args.resume)
    except TrainingDiverged as e:
        raise CLIError(f"{e}; lower --lr or raise --warmup-steps (the last good checkpoint is kept)") from None
    if trainer.dist.is_main:
        print(result.summary())
        if result.interrupted:
            print(f"resume with: gpt-finetune {args.command} ... --out {args.out} --resume")
    return result


def write_evaluation(out: Path, record: dict) -> None:
    from tools.fileio import atomic_write

    with atomic_write(out / EVALUATION_FILE) as f:
        json.dump(record, f, indent=2)
        f.write("\n")


def run_classify(args) -> int:
    from gpt.lora import apply_lora
    from gpt.trainer import Trainer, init_distributed

    train_raw = read_examples(args.train, args.text_column, args.label_column)
    labels = label_names(train_raw, f"--train {args.train}")
    splits_raw = {"train": train_raw, "val": read_examples(args.val, args.text_column, args.label_column)}
    if args.test:
        splits_raw["test"] = read_examples(args.test, args.text_column, args.label_column)
    for name in ("val", "test"):
        if name in splits_raw:
            if not splits_raw[name]:
                raise CLIError(f"--{name} {getattr(args, name)} has no examples")
            check_known_labels(splits_raw[name], labels, f"--{name} {getattr(args, name)}")
    lora = lora_config_from_args(args)
    cfg = train_config(args)
    check_out(args)
    gpt, max_length = load_base(args)
    tokenizer = gpt.tokenizer
    pad_id = tokenizer.eot_token if tokenizer.eot_token is not None else 0
    try:
        splits = {name: encode_examples(tokenizer, ex, labels, max_length) for name, ex in splits_raw.items()}
    except UnknownCharacterError as e:
        raise CLIError(f"--model {args.model}: its tokenizer cannot encode the examples ({e}); fine-tune a model whose tokenizer covers them") from None
    empty = next((f"{name} example {i + 1}" for name, ex in splits.items() for i, (ids, _) in enumerate(ex) if not ids), None)
    if empty:
        raise CLIError(f"{empty}: the text encodes to no tokens")

    check_batch(cfg, splits["train"], gpt.config, len(labels))
    torch.manual_seed(cfg.seed)  # the head's initialisation (and the adapters')
    if lora:
        apply_lora(gpt, lora)
    model = GPTClassifier(gpt, labels)
    args.trainable = args.trainable or ("head" if lora else "last-block")
    set_trainable(model, args.trainable)
    run_config = {**{k: v for k, v in vars(args).items() if k != "resume"}, "labels": labels, "max_length": max_length}
    if args.resume:
        check_resume(args, run_config)

    dist = init_distributed(cfg.device)
    collate = lambda b: collate_classification(b, pad_id)  # noqa: E731
    train_batch = ShuffledBatches(splits["train"], cfg.batch_size, collate, seed=cfg.seed, grad_accum=cfg.grad_accum,
                                  rank=dist.rank, world_size=dist.world_size)
    monitor = splits["train"][:512]  # a fixed slice of the training set, for the train accuracy during training

    def extra_eval(m) -> dict:
        # The whole validation set on every rank (classification sets are small): exact per-example means.
        val, train = evaluate_classifier(m, splits["val"], cfg.batch_size, pad_id), evaluate_classifier(m, monitor, cfg.batch_size, pad_id)
        return {"val_loss": val["loss"], "val_acc": val["accuracy"], "train_acc": train["accuracy"]}

    def save_model(m, directory):
        save_classifier(m, directory, tokenizer, max_length=max_length)

    def load_model(m, directory):
        m.load_state_dict(load_classifier(directory, device=str(next(m.parameters()).device))[0].state_dict())

    trainer = Trainer(model, cfg, train_batch, None, out_dir=args.out, loss_fn=classification_loss, tokenizer=tokenizer,
                      save_model=save_model, load_model=load_model, extra_eval=extra_eval,
                      count_tokens=lambda b: int(b[1].sum()), run_config=run_config, dist=dist)
    if dist.is_main:
        counts = ", ".join(f"{len(ex)} {name}" for name, ex in splits.items())
        print(f"gpt-finetune classify: {len(labels)} labels ({', '.join(labels)}); {counts} examples; {describe(model, lora)}", file=sys.stderr)
    result = fit(trainer, args)
    if result.interrupted or not dist.is_main:
        return 130 if result.interrupted else 0
    report = {name: evaluate_classifier(trainer.model, ex, cfg.batch_size, pad_id) for name, ex in splits.items()}
    for name, r in report.items():
        print(f"{name:5s}: loss {r['loss']:.4f}  accuracy {r['accuracy']:.4f}  ({r['examples']} examples)")
    shown = "test" if "test" in report else "val"
    print(f"confusion matrix ({shown}; rows: true label, columns: predicted):\n{format_confusion(labels, report[shown]['confusion'])}")
    write_evaluation(Path(args.out), {"labels": labels, **report})
    print(f"model: {result.final_dir}  (gpt-classify --model {result.final_dir} TEXT...)")
    return 0


def run_instruct(args) -> int:
    from gpt.lora import apply_lora
    from gpt.sampling import generate
    from gpt.trainer import Trainer, init_distributed, lm_loss

    records = read_instructions(args.data)
    if args.val:
        train_records, val_records = records, read_instructions(args.val)
    else:
        if not 0 < args.val_fraction < 1:
            raise CLIError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
        n_val = max(1, round(len(records) * args.val_fraction))
        if n_val >= len(records):
            raise CLIError(f"--data {args.data} has {len(records)} record(s): too few to hold out {n_val} for validation; give --val")
        train_records, val_records = records[:-n_val], records[-n_val:]
    lora = lora_config_from_args(args)
    cfg = train_config(args)
    check_out(args)
    model, max_length = load_base(args)
    tokenizer = model.tokenizer
    if tokenizer.eot_token is None:
        raise CLIError(f"--model {args.model}: its tokenizer has no <|endoftext|> token, which marks the end of a response")
    encoded = {}
    for name, recs in (("train", train_records), ("val", val_records)):
        try:
            encoded[name] = [e for e in (encode_instruction(tokenizer, r, max_length, args.mask_prompt) for r in recs) if e is not None]
        except UnknownCharacterError as e:
            raise CLIError(f"--model {args.model}: its tokenizer cannot encode the {name} records ({e}); fine-tune a model whose tokenizer covers them") from None
        dropped = len(recs) - len(encoded[name])
        if dropped:
            print(f"gpt-finetune instruct: {dropped} {name} record(s) skipped: their prompt alone fills --max-length {max_length}", file=sys.stderr)
        if not encoded[name]:
            raise CLIError(f"no {name} record fits in --max-length {max_length} tokens with room for a response")
    check_batch(cfg, encoded["train"], model.config, model.config.vocab_size)

    torch.manual_seed(cfg.seed)
    if lora:
        apply_lora(model, lora)
    run_config = {**{k: v for k, v in vars(args).items() if k != "resume"}, "max_length": max_length}
    if args.resume:
        check_resume(args, run_config)
    dist = init_distributed(cfg.device)
    pad_id = tokenizer.eot_token
    collate = lambda b: collate_instructions(b, pad_id)  # noqa: E731
    train_batch = ShuffledBatches(encoded["train"], cfg.batch_size, collate, seed=cfg.seed, grad_accum=cfg.grad_accum,
                                  rank=dist.rank, world_size=dist.world_size)

    def eval_batches():
        return in_batches(encoded["val"][dist.rank :: dist.world_size], cfg.batch_size, collate)

    def answer(m, record, max_new_tokens) -> str:
        from gpt.prompt_template import format_instruction_prompt

        prompt = tokenizer.encode_ordinary(format_instruction_prompt(record["instruction"], record["input"]))[-(m.config.n_ctx - 1):]
        out = generate(m, prompt, max_new_tokens, temperature=0.0, stop_tokens=(tokenizer.eot_token,))
        return tokenizer.decode(out[0])

    generation = {**model.generation_config, "temperature": 0.0}  # gpt-generate --instruct: greedy, as evaluated here
    trainer = Trainer(model, cfg, train_batch, eval_batches, out_dir=args.out, loss_fn=lm_loss, tokenizer=tokenizer,
                      generation=generation, sample_fn=lambda m: answer(m, val_records[0], 48),
                      count_tokens=count_targets, run_config=run_config, dist=dist)
    before = None
    if not args.resume:
        before = trainer.evaluate()["val_loss"]
    if dist.is_main:
        print(f"gpt-finetune instruct: {len(encoded['train'])} train / {len(encoded['val'])} val records; "
              f"{'response-only' if args.mask_prompt else 'prompt + response'} targets; {describe(model, lora)}"
              + (f"; val loss before {before:.4f}" if before is not None else ""), file=sys.stderr)
    result = fit(trainer, args)
    if result.interrupted or not dist.is_main:
        return 130 if result.interrupted else 0
    after = result.last_eval["val_loss"]
    print(f"validation loss: {before:.4f} before, {after:.4f} after" if before is not None else f"validation loss: {after:.4f}")
    trainer.model.eval()
    answers = []
    for record in val_records[: max(0, args.show)]:
        answers.append({**record, "model_response": answer(trainer.model, record, 128)})
        print(f"\n### Instruction:\n{record['instruction']}" + (f"\n### Input:\n{record['input']}" if record["input"] else "")
              + f"\n### Expected:\n{record['output']}\n### Model:\n{answers[-1]['model_response']}")
    write_evaluation(Path(args.out), {"val_loss_before": before, "val_loss_after": after, "answers": answers})
    print(f"\nmodel: {result.final_dir}  (gpt-generate --model {result.final_dir} --instruct TEXT)")
    return 0


@command("gpt-finetune")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_classify(args) if args.command == "classify" else run_instruct(args)
    finally:
        import torch.distributed as torch_dist

        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


@command("gpt-classify")
def classify_main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="gpt-classify", description="Classify texts with a gpt-finetune classify model: prints label and probability per text.",
                       epilog="example:  gpt-classify --model runs/cls/final 'O Romeo, Romeo!' 'Once more unto the breach'")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="texts to classify ('-' reads one text per line from stdin)")
    p.add_argument("--model", required=True, metavar="DIR", help="gpt-finetune classify output (RUN_DIR/final, or RUN_DIR itself)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    args = p.parse_args(argv)
    texts = [line.rstrip("\n") for t in args.texts for line in (sys.stdin if t == "-" else [t])]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CLIError("no text to classify")
    from gpt.trainer import resolve_device

    device = resolve_device(args.device)
    model, max_length = load_classifier(args.model, device=device)
    tokenizer = model.gpt.tokenizer
    pad_id = tokenizer.eot_token if tokenizer.eot_token is not None else 0
    try:
        examples = [(tokenizer.encode_ordinary(t)[:max_length], 0) for t in texts]
    except UnknownCharacterError as e:
        raise CLIError(f"TEXT: {e}; use only text the model's tokenizer knows") from None
    with torch.no_grad():
        for start in range(0, len(examples), 32):
            idx, lengths, _ = collate_classification(examples[start : start + 32], pad_id)
            probs = model(idx.to(device), lengths.to(device)).softmax(-1).cpu()
            for text, p_row in zip(texts[start : start + 32], probs):
                best = int(p_row.argmax())
                print(f"{model.labels[best]}\t{p_row[best].item():.4f}\t{text if len(text) <= 60 else text[:57] + '...'}")
    return 0

"""Fine-tuning data: classification examples (CSV, TSV, JSON Lines) and Alpaca-style instruction
records (JSON, JSON Lines), read with errors that name the file and the line; their encodings and
padded batches; and ``ShuffledBatches``, the trainer's ``train_batch`` for a dataset of examples.

Text is strict UTF-8 (a UTF-8 BOM at the start is allowed): an invalid byte is an ``InvalidTextError``
naming the file and its byte offset.

Classification: one example per row with a text and a label column (``text_column``/
``label_column``, the header row of a CSV/TSV). Labels are strings; their ids are the sorted
training labels. Inputs are padded on the right, so with causal attention the last real token's
state never sees the padding.

Instructions: a list of ``{"instruction", "input", "output"}`` records (``input`` may be empty or
absent); the text is the template of gpt.prompt_template followed by the output and the end-of-text
token. Batches are padded to their longest sequence; padded targets are -100 (ignored by the loss),
and with ``mask_prompt`` so are the targets inside the prompt, so only the response is learned.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from gpt import memory
from gpt.prompt_template import format_instruction_prompt
from tokenizers_bpe.errors import InputFileError, SettingError, is_unicode
from tokenizers_bpe.fileio import check_nesting, check_regular_file, decode_utf8

_BOM = "\ufeff"
# A data file is held whole, parsed and tokenized: measured ~11x its size at the peak (a 40 MB Alpaca
# JSON: +455 MB), so a file whose 16x is more than the memory available is refused before it is read.
MEMORY_PER_FILE_BYTE = 16
# A classifier's labels are class names: the head has a row per label and every evaluation a square
# confusion matrix of them (100,000 labels: 80 GB), so both are bounded.
MAX_LABELS = 1024
MAX_LABEL_CHARS = 256

# ---------------------------------------------------------------------------------------------- classification data


def _text_field(value: Any, column: str, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: column {column!r} must be a string, got {json.dumps(value)[:40]}")
    text = str(value)
    if not text.strip():
        raise ValueError(f"{where}: column {column!r} is empty")
    _check_unicode(text, f"column {column!r}", where)
    return text


def _check_unicode(text: str, what: str, where: str) -> None:
    if not is_unicode(text):
        raise ValueError(f"{where}: {what} holds a lone surrogate (a JSON escape such as \\ud800 that is no "
                         "character); fix the file")


def _label_field(value: Any, column: str, where: str) -> str:
    label = _text_field(value, column, where).strip()
    if len(label) > MAX_LABEL_CHARS:
        raise ValueError(f"{where}: a label of {len(label):,} characters in column {column!r}; a label is a class "
                         f"name of at most {MAX_LABEL_CHARS} (is --label-column the text?)")
    return label


def show_labels(labels: list[str], most: int = 10) -> str:
    """Labels for a message: the first ``most``, each cut to 40 characters, and how many there are."""
    shown = ", ".join(x if len(x) <= 40 else x[:39] + "\u2026" for x in labels[:most])
    return shown if len(labels) <= most else f"{shown}, ... ({len(labels):,} labels)"


def read_text(path: Path) -> str:
    """The file's text: strict UTF-8 (InvalidTextError naming the file and the byte offset of the
    first invalid byte), without the BOM some editors put at the start."""
    size = path.stat().st_size
    available = memory.available_memory_bytes()
    if available is not None and size * MEMORY_PER_FILE_BYTE > available:
        raise InputFileError(path, f"{path}: {size / 1e6:,.0f} MB; reading it and its tokens needs about "
                                   f"{size * MEMORY_PER_FILE_BYTE / 1e9:,.1f} GB of memory, more than the "
                                   f"{available / 1e9:,.1f} GB available: fine-tune on a part of it")
    with open(path, "rb") as f:  # (as it was when checked: a file still written to could be read for ever)
        text = decode_utf8(f.read(size), str(path))
    return text[len(_BOM):] if text.startswith(_BOM) else text


def read_jsonl(path: Path) -> list[tuple[str, Any]]:
    """(where, value) for each non-blank line of a JSON Lines file; ``where`` names the line."""
    rows = []
    for number, line in enumerate(io.StringIO(read_text(path), newline=None), 1):  # lines as open() splits them
        if line.strip():
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise ValueError(f"{path} line {number}: nested too deeply to be a record") from None
            except ValueError as e:  # an integer of more than 4300 digits
                raise ValueError(f"{path} line {number}: not valid JSON ({str(e).split(';')[0]})") from None
            rows.append((f"{path} line {number}", check_nesting(value, f"{path} line {number}")))
    return rows


def read_examples(path: str | Path, text_column: str = "text", label_column: str = "label") -> list[tuple[str, str]]:
    """(text, label) pairs from a .csv/.tsv (header row) or .jsonl file; errors name the line."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl"):
        raise ValueError(f"{path}: unknown data format {suffix or '(no extension)'}; use .csv, .tsv or .jsonl")
    check_regular_file(path, "data file")
    examples = []
    if suffix == ".jsonl":
        for where, row in read_jsonl(path):
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object with {text_column!r} and {label_column!r}")
            missing = [c for c in (text_column, label_column) if c not in row]
            if missing:
                raise SettingError("text_column" if missing[0] == text_column else "label_column",
                                   f"{where}: missing field {missing[0]!r} (fields: {', '.join(row) or 'none'}); "
                                   "set {text_column}/{label_column}")
            examples.append((_text_field(row[text_column], text_column, where), _label_field(row[label_column], label_column, where)))
        return examples
    text = read_text(path)
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text)))  # a passage may be as long as the file, held whole already
    try:
        with io.StringIO(text, newline="") as f:
            reader = csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",")
            header = next(reader, [])
            missing = [c for c in (text_column, label_column) if c not in header]
            if missing:
                raise SettingError("text_column" if missing[0] == text_column else "label_column",
                                   f"{path}: no column {missing[0]!r} in the header (columns: "
                                   f"{', '.join(header) or 'none'}); set {{text_column}}/{{label_column}}")
            twice = [c for c in (text_column, label_column) if header.count(c) > 1]
            if twice:
                raise SettingError("text_column" if twice[0] == text_column else "label_column",
                                   f"{path}: the header names column {twice[0]!r} {header.count(twice[0])} times; "
                                   "rename the others, or set {text_column}/{label_column}")
            text_at, label_at, fields = header.index(text_column), header.index(label_column), len(header)
            # (CSV text is strict UTF-8 already: no lone surrogates, which only JSON escapes make)
            for row in reader:
                if len(row) != fields:
                    if not row:
                        continue  # a blank line
                    raise ValueError(f"{path} line {reader.line_num}: {len(row)} fields, not {fields} like the header")
                text, label = row[text_at], row[label_at].strip()
                if not text.strip() or not label or len(label) > MAX_LABEL_CHARS:
                    where = f"{path} line {reader.line_num}"
                    _text_field(text, text_column, where)
                    _label_field(label, label_column, where)
                examples.append((text, label))
    except csv.Error as e:
        raise ValueError(f"{path} line {reader.line_num}: not valid {suffix[1:].upper()} ({e})") from None
    finally:
        csv.field_size_limit(limit)
    return examples


def label_names(train: list[tuple[str, str]], what: str) -> list[str]:
    """The sorted distinct training labels (a label's id is its index)."""
    if not train:
        raise ValueError(f"{what} has no examples")
    labels = sorted({label for _, label in train})
    if len(labels) > MAX_LABELS:
        raise ValueError(f"{what} has {len(labels):,} distinct labels, more than a classifier here takes ({MAX_LABELS:,}); "
                         "is --label-column the right column? Group rare labels into one")
    if len(labels) < 2:
        raise ValueError(f"{what} has only one label ({labels[0]!r}); a classifier needs examples of at least two")
    return labels


def check_known_labels(examples: list[tuple[str, str]], labels: list[str], what: str) -> None:
    known = set(labels)
    unseen = sorted({label for _, label in examples if label not in known})
    if unseen:
        raise ValueError(f"{what}: label(s) {show_labels([repr(x) for x in unseen], 5)} do not occur in the training "
                         f"data (training labels: {show_labels(labels)})")


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
    path = check_regular_file(path, "file of instruction records")
    if path.suffix.lower() == ".jsonl":
        rows = read_jsonl(path)
    else:
        text = read_text(path)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise ValueError(f"{path}: nested too deeply to be a list of records") from None
        except ValueError as e:  # an integer of more than 4300 digits
            raise ValueError(f"{path}: not valid JSON ({str(e).split(';')[0]})") from None
        check_nesting(records, str(path))
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
            _check_unicode(record.get(field, ""), f"field {field!r}", where)
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


def evenly_spaced(examples: list, most: int) -> list:
    """At most ``most`` examples spread evenly over the list (a sorted file's every part is in it)."""
    step = -(-len(examples) // most)
    return examples[::step] if step > 1 else examples


def in_batches(examples: list, batch_size: int, collate: Callable[[list], Any]):
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start : start + batch_size])

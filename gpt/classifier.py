"""A GPT text classifier: the GPT body and a linear head on the final hidden state of each
sequence's last real token, its files, and its evaluation.

A classifier directory is a GPT checkpoint (gpt.checkpoint, so ``GPT.from_pretrained`` loads the
body) plus ``classifier.safetensors`` (the head, in the body's dtype) and ``classifier.json``
(format, version, the labels in id order, the max length examples are cut to).
"""

from __future__ import annotations

import json
import reprlib
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from gpt.checkpoint import CheckpointError, checkpoint_file, read_json, safetensors_name, write_checkpoint
from gpt.finetune_data import MAX_LABEL_CHARS, MAX_LABELS, collate_classification, in_batches
from gpt.model import GPT
from gpt.run_state import FINAL_DIR
from tokenizers_bpe.errors import SettingError, is_unicode
from tokenizers_bpe.fileio import format_stamp, recorded_version

CLASSIFIER_FORMAT = "gpt-classifier"
CLASSIFIER_VERSION = 1
CLASSIFIER_FILE = "classifier.json"
HEAD_FILE = "classifier.safetensors"
TRAINABLE = ("head", "last-block", "all")


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
        raise SettingError("trainable", f"{{trainable}} must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
    lora = getattr(model.gpt, "lora_config", None) is not None
    if lora and trainable != "head":
        raise SettingError("trainable", "with {lora_rank} only the adapters and the head train; drop {trainable} (or use {trainable} head)")
    for name, p in model.named_parameters():
        p.requires_grad_(trainable == "all" or name.startswith("head.") or (lora and name.endswith((".lora_A", ".lora_B"))))
    if trainable == "last-block":
        for module in (model.gpt.transformer.h[-1], model.gpt.transformer.ln_f):
            module.requires_grad_(True)


def save_classifier(model: GPTClassifier, directory: Path, tokenizer, *, max_length: int) -> None:
    """The GPT checkpoint files (so GPT.from_pretrained loads the body) plus the head and the labels."""
    write_checkpoint(directory, model.gpt, tokenizer, model.gpt.generation_config)
    head = {k: v.detach().to(next(model.gpt.parameters()).dtype).contiguous().cpu() for k, v in model.head.state_dict().items()}
    save_file(head, str(Path(directory) / HEAD_FILE), metadata={"format": "pt"})
    meta = {**format_stamp(CLASSIFIER_FORMAT, CLASSIFIER_VERSION), "labels": model.labels, "max_length": max_length}
    (Path(directory) / CLASSIFIER_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def classifier_directory(directory) -> Path:
    """``directory``, or the final model of a gpt-finetune classify run directory."""
    directory = Path(directory)
    if not (directory / CLASSIFIER_FILE).is_file() and (directory / FINAL_DIR / CLASSIFIER_FILE).is_file():
        return directory / FINAL_DIR
    return directory


def read_classifier_meta(directory) -> tuple[list[str], int]:
    """(labels, max_length) from ``directory``'s classifier.json, checked."""
    path = checkpoint_file(directory, CLASSIFIER_FILE, "file", f"is {directory} a gpt-finetune classify output?")
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != CLASSIFIER_FORMAT:
        raise CheckpointError(f"{path}: not a {CLASSIFIER_FORMAT} file")
    if recorded_version(meta) != CLASSIFIER_VERSION:
        raise CheckpointError(f"{path}: unknown format_version {reprlib.repr(recorded_version(meta))}; this version reads "
                              f"{CLASSIFIER_VERSION}")
    labels, max_length = meta.get("labels"), meta.get("max_length")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels) or len(set(labels)) != len(labels):
        raise CheckpointError(f"{path}: \"labels\" must be a list of at least two distinct strings")
    if len(labels) > MAX_LABELS or max(map(len, labels)) > MAX_LABEL_CHARS or not all(map(is_unicode, labels)):
        raise CheckpointError(f"{path}: \"labels\" must be at most {MAX_LABELS:,} names of at most {MAX_LABEL_CHARS} "
                              "characters of text each, as gpt-finetune classify writes them")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise CheckpointError(f"{path}: \"max_length\" must be a positive integer")
    return labels, max_length


def read_head(directory, model: GPTClassifier, device="cpu") -> dict[str, torch.Tensor]:
    """The head's tensors from ``directory``, checked against ``model``'s head (which may be on the meta device)."""
    path = checkpoint_file(directory, HEAD_FILE, "safetensors file", "the classifier head is missing")
    try:
        with safetensors_name(path) as name:
            head = load_file(name, device=str(device))
    except Exception as e:  # safetensors' own error types for a corrupt file
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    expected = {k: tuple(v.shape) for k, v in model.head.state_dict().items()}
    if {k: tuple(v.shape) for k, v in head.items()} != expected:
        raise CheckpointError(f"{path}: expected tensors {expected} for {len(model.labels)} labels")
    return head


def load_classifier(directory, *, device="cpu") -> tuple[GPTClassifier, int]:
    """(classifier, max_length) from a directory written by save_classifier."""
    directory = classifier_directory(directory)
    labels, max_length = read_classifier_meta(directory)
    gpt = GPT.from_pretrained(directory, device=device)
    model = GPTClassifier(gpt, labels).to(device)
    head = read_head(directory, model, device)
    model.head.load_state_dict({k: v.to(model.head.weight.dtype) for k, v in head.items()})
    return model.to(next(gpt.parameters()).dtype).eval(), max_length


@torch.no_grad()
def evaluate_classifier(model: GPTClassifier, examples: list[tuple[list[int], int]], batch_size: int, pad_id: int,
                        progress: str | None = None) -> dict:
    """Mean loss, accuracy and the confusion matrix (rows: true label, columns: predicted); ``progress``
    names a bar on stderr (none if None)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = len(model.labels)
    confusion = torch.zeros(n, n, dtype=torch.long)
    loss_sum = 0.0
    batches = in_batches(examples, batch_size, lambda b: collate_classification(b, pad_id))
    bar = tqdm(batches, total=-(-len(examples) // batch_size), desc=progress, unit="batch", dynamic_ncols=True,
               leave=False, disable=progress is None)
    for idx, lengths, labels in bar:
        logits = model(idx.to(device), lengths.to(device)).cpu()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        confusion += torch.bincount(labels * n + logits.argmax(-1), minlength=n * n).view(n, n)
    model.train(was_training)
    total = int(confusion.sum())
    return {"loss": loss_sum / max(total, 1), "accuracy": int(confusion.trace()) / max(total, 1), "examples": total,
            "confusion": confusion.tolist()}

"""Genre classification of Shakespeare passages: a fine-tuned GPT against a bag-of-words baseline.

    gpt-genre-experiment --work runs/genre

The task: given a passage of dialogue (speaker names removed), say whether its play is a comedy, a
history or a tragedy (the genre folders of the built-in corpus). The split is by play, so no play
is in two splits: per genre, a seeded shuffle puts one play in validation, two in test and the rest
in training. The GPT is pre-trained with gpt-train on "the rest of the corpus": every play that is
not in validation or test (the training plays plus the problem plays, Roman plays and romances), so
it never saw a held-out play. Then ``gpt-finetune classify`` trains the classifier head (and the
options given: ``--trainable``, LoRA), and a multinomial logistic regression on bag-of-words
features, written here in torch, gives the baseline on the same splits.

Every step runs the project's commands in-process (bpe-train, gpt-prepare, gpt-train,
gpt-finetune) and is skipped when its output already exists, so the script can be re-run to add
fine-tuning variants. Results go to ``WORK/results.json`` and are printed as a table.
"""

from __future__ import annotations

import csv
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from gpt.checkpoint import CONFIG_FILE
from gpt.config import MAX_SIZES
from gpt.data import META_FILE
from gpt.run_state import FINAL_DIR, METRICS_FILE, read_metrics
from tokenizers_bpe import TOKENIZER_FILE
from tokenizers_bpe.fileio import Stamp, atomic_write, check_not_a_broken_link, check_replaceable, format_stamp, is_stamped, read_json
from tools.bpe_train import main as bpe_train_main
from tools.cli import ArgumentParser, CLIError, add_seed_argument, command, integer
from tools.corpus import plays
from tools.finetune import main as finetune_main
from tools.prepare import main as prepare_main
from tools.train import main as train_main
from tools.training import removed_after_early_error

GENRES = ("comedies", "histories", "tragedies")
MAX_PASSAGES = 100_000  # per genre: the plays hold a few thousand
MAX_PASSAGE_CHARS = 100_000
N_VAL, N_TEST = 1, 2  # plays per genre
# The work directory's stamp, with the options it was made with: its steps are kept and skipped by later
# runs, so a run with other options (or a directory that is not ours) would mix in work it did not ask for.
WORK_STAMP = Stamp("gpt-genre-work", "a gpt-genre-experiment work directory", "gpt2_toolkit_work.json")
RUN_ONLY_OPTIONS = ("work", "variants", "data_only")  # what a later run may change

WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


# ---------------------------------------------------------------------------------------------- data


def split_plays(seed: int) -> dict[str, list]:
    """{"train", "val", "test"} -> plays of the three genres; "pretrain" -> every play not held out."""
    rng = random.Random(seed)
    splits: dict[str, list] = {"train": [], "val": [], "test": []}
    for genre in GENRES:
        group = [p for p in plays() if p.genre == genre]
        rng.shuffle(group)
        splits["val"] += group[:N_VAL]
        splits["test"] += group[N_VAL : N_VAL + N_TEST]
        splits["train"] += group[N_VAL + N_TEST :]
    held_out = {p.name for p in splits["val"] + splits["test"]}
    splits["pretrain"] = [p for p in plays() if p.name not in held_out]
    return splits


def passages(text: str, min_chars: int, max_chars: int) -> list[str]:
    """Consecutive speeches, speaker lines dropped, joined until a passage has ``min_chars``
    characters; lines beyond ``max_chars`` start the next passage."""
    out, current = [], []
    for speech in text.split("\n\n"):
        lines = speech.strip().split("\n")[1:]  # the first line is "SPEAKER:"
        for line in lines:
            if current and sum(len(x) + 1 for x in current) + len(line) > max_chars:
                out.append("\n".join(current))
                current = []
            current.append(line)
        if sum(len(x) + 1 for x in current) >= min_chars:
            out.append("\n".join(current))
            current = []
    return out


def build_examples(splits: dict[str, list], per_genre_train: int, min_chars: int, max_chars: int, seed: int) -> dict[str, list[tuple[str, str]]]:
    """(text, genre) per split. Training is balanced: ``per_genre_train`` passages per genre drawn
    evenly from that genre's plays; validation and test keep every passage of their plays."""
    rng = random.Random(seed)
    examples = {}
    for name in ("train", "val", "test"):
        by_genre = {g: [(t, p.genre) for p in splits[name] if p.genre == g for t in passages(p.text(), min_chars, max_chars)] for g in GENRES}
        if name == "train":
            by_genre = {g: rng.sample(ex, min(per_genre_train, len(ex))) for g, ex in by_genre.items()}
        examples[name] = [e for g in GENRES for e in by_genre[g]]
        rng.shuffle(examples[name])
    return examples


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with atomic_write(path) as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["text", "label"])
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------- baseline


def bag_of_words(texts: list[str], vocab: dict[str, int]) -> torch.Tensor:
    """log(1 + count) of each vocabulary word, rows scaled to unit length."""
    x = torch.zeros(len(texts), len(vocab), dtype=torch.float64)
    for row, text in enumerate(texts):
        for word, n in Counter(WORD.findall(text.lower())).items():
            if word in vocab:
                x[row, vocab[word]] = np.log1p(n)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def logistic_regression(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float) -> torch.Tensor:
    """Multinomial logistic regression (weights and bias) minimising mean cross-entropy + l2 |W|^2,
    by L-BFGS on the full batch (convex, so the optimum does not depend on a seed)."""
    w = torch.zeros(x.size(1) + 1, n_classes, dtype=torch.float64, requires_grad=True)
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xb @ w, y) + l2 * w[:-1].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def bow_baseline(examples: dict[str, list[tuple[str, str]]]) -> dict:
    """Pick the L2 strength on validation accuracy; report train/val/test accuracy."""
    counts = Counter(w for text, _ in examples["train"] for w in set(WORD.findall(text.lower())))
    vocab = {w: i for i, w in enumerate(sorted(w for w, n in counts.items() if n >= 2))}
    x = {s: bag_of_words([t for t, _ in ex], vocab) for s, ex in examples.items()}
    y = {s: torch.tensor([GENRES.index(g) for _, g in ex]) for s, ex in examples.items()}

    def accuracy(w, split):
        xb = torch.cat([x[split], torch.ones(len(x[split]), 1, dtype=torch.float64)], dim=1)
        return ((xb @ w).argmax(1) == y[split]).double().mean().item()

    runs = []
    for l2 in (1e-5, 1e-4, 1e-3, 1e-2):
        w = logistic_regression(x["train"], y["train"], len(GENRES), l2)
        runs.append({"l2": l2, **{f"{s}_acc": accuracy(w, s) for s in examples}})
    best = max(runs, key=lambda r: r["val_acc"])
    return {"vocabulary": len(vocab), "chosen": best, "all": runs}


# ---------------------------------------------------------------------------------------------- the pipeline


def call(fn, argv: list, what: str) -> None:
    argv = [str(a) for a in argv]
    print(f"\n$ {what} {' '.join(argv)}", flush=True)
    rc = fn(argv)
    if rc != 0:
        raise CLIError(f"{what} failed with exit status {rc}")


def pretrain(work: Path, splits: dict, args) -> Path:
    """bpe-train + gpt-prepare + gpt-train on the pre-training plays; returns the model directory."""

    text_dir = work / "pretrain-text"
    if not text_dir.is_dir():
        text_dir.mkdir(parents=True)
        for p in splits["pretrain"]:
            (text_dir / f"{p.genre}--{p.name}.txt").write_text(p.text(), encoding="utf-8")
    files = sorted(text_dir.glob("*.txt"))
    tokenizer = work / TOKENIZER_FILE
    if not tokenizer.is_file():
        call(bpe_train_main, [*files, "--vocab-size", args.vocab_size, "-o", tokenizer, "--quiet", "--seed", args.seed], "bpe-train")
    data = work / "data"
    if not (data / META_FILE).is_file():
        call(prepare_main, [*files, "--tokenizer", tokenizer, "-o", data, "--append-eot", "--quiet"], "gpt-prepare")
    run = work / "pretrain"
    if not (run / FINAL_DIR / CONFIG_FILE).is_file():
        call(train_main, ["--data", data, "--out", run, "--preset", "shakespeare-cpu", "--n-ctx", args.n_ctx, "--n-layer", args.n_layer,
                          "--n-embd", args.n_embd, "--n-head", args.n_head, "--dropout", 0.0, "--max-steps", args.pretrain_steps,
                          "--batch-size", 16, "--lr", 2e-3, "--warmup-steps", 50, "--eval-interval", max(1, args.pretrain_steps // 4),
                          "--eval-iters", 10, "--sample-tokens", 40, "--seed", args.seed, "--device", "cpu"], "gpt-train")
    return run / FINAL_DIR


def finetune(work: Path, model: Path, variant: str, extra: list, args) -> dict:

    run = work / f"classify-{variant}"
    if not (run / "evaluation.json").is_file():
        call(finetune_main, ["classify", "--model", model, "--train", work / "train.csv", "--val", work / "val.csv", "--test", work / "test.csv",
                             "--out", run, "--max-steps", args.finetune_steps, "--batch-size", 16, "--eval-interval", max(1, args.finetune_steps // 5),
                             "--warmup-steps", 20, "--seed", args.seed, "--device", "cpu", *extra], "gpt-finetune")
    report = read_json(run / "evaluation.json", f"remove {run} to fine-tune it again")
    try:
        accuracy = {f"{s}_acc": float(report[s]["accuracy"]) for s in ("train", "val", "test")}
        confusion = report["test"]["confusion"]
    except (TypeError, KeyError, ValueError):
        raise CLIError(f"{run / 'evaluation.json'}: not a gpt-finetune evaluation; remove {run} to fine-tune it again") from None
    return {"options": " ".join(map(str, extra)), **accuracy, "test_confusion": confusion, "run": str(run)}


def check_work_directory(work: Path, options: dict) -> None:
    """--work may be new, empty, or a work directory of this command made with the same options."""
    try:
        check_replaceable(work, WORK_STAMP)
    except ValueError as e:
        raise CLIError(f"--work {e}") from None
    if not is_stamped(work, WORK_STAMP):
        return
    recorded = read_json(work / WORK_STAMP.file, f"remove {work} to start the experiment again")
    if recorded.get("format_version") != 1:
        raise CLIError(f"--work {work}: {WORK_STAMP.file} has format version {str(recorded.get('format_version'))[:20]}, "
                       "not 1 (another version of this toolkit made it); use a new --work")
    made_with = recorded.get("options")
    if not isinstance(made_with, dict):
        raise CLIError(f"--work {work}: {WORK_STAMP.file} records no options; remove {work} to start the experiment again")
    for name, value in options.items():
        if made_with.get(name) != value:
            flag = "--" + name.replace("_", "-")
            raise CLIError(f"--work {work} was made with {flag} {str(made_with.get(name))[:40]} (not {value}): its steps are kept "
                           f"and reused; give the same {flag}, or a new --work")


VARIANTS = {
    "last-block": ["--trainable", "last-block", "--lr", "1e-3"],
    "all": ["--trainable", "all", "--lr", "3e-4"],
    "lora": ["--lora-rank", "8", "--lora-targets", "attn,mlp", "--lr", "2e-3"],
    "head": ["--trainable", "head", "--lr", "3e-3"],
}


@command("gpt-genre-experiment")
def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="gpt-genre-experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, type=Path, help="working directory: new, empty, or one this command made with the same options (its steps done are skipped)")
    p.add_argument("--variants", default="last-block,all,lora", help=f"fine-tuning variants, comma-separated from {', '.join(VARIANTS)}")
    p.add_argument("--vocab-size", type=integer(257, MAX_SIZES["vocab_size"]), default=2048,
                   help="BPE vocabulary of the tokenizer trained on the pre-training plays")
    p.add_argument("--n-ctx", type=integer(1, MAX_SIZES["n_ctx"]), default=128, help="context of the pre-trained model")
    p.add_argument("--n-layer", type=integer(1, MAX_SIZES["n_layer"]), default=4)
    p.add_argument("--n-head", type=integer(1, MAX_SIZES["n_head"]), default=4)
    p.add_argument("--n-embd", type=integer(1, MAX_SIZES["n_embd"]), default=128)
    p.add_argument("--pretrain-steps", type=integer(1), default=300)
    p.add_argument("--finetune-steps", type=integer(1), default=200)
    p.add_argument("--per-genre-train", type=integer(1, MAX_PASSAGES), default=600, help="training passages per genre (balanced)")
    p.add_argument("--min-chars", type=integer(1, MAX_PASSAGE_CHARS), default=200, help="passages are at least this long ...")
    p.add_argument("--max-chars", type=integer(1, MAX_PASSAGE_CHARS), default=400, help="... and at most this long")
    p.add_argument("--data-only", action="store_true", help="write WORK/{train,val,test}.csv (text,label) and stop")
    add_seed_argument(p)
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise CLIError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.min_chars > args.max_chars:
        raise CLIError(f"--min-chars ({args.min_chars}) must be at most --max-chars ({args.max_chars})")
    if args.n_embd % args.n_head:
        raise CLIError(f"--n-embd ({args.n_embd}) must be divisible by --n-head ({args.n_head})")
    work = args.work
    check_not_a_broken_link(work)
    if work.exists() and not work.is_dir():
        raise CLIError(f"--work {work} exists and is not a directory; choose another path")
    options = {k: v for k, v in sorted(vars(args).items()) if k not in RUN_ONLY_OPTIONS}
    check_work_directory(work, options)

    splits = split_plays(args.seed)
    examples = build_examples(splits, args.per_genre_train, args.min_chars, args.max_chars, args.seed)
    with removed_after_early_error(work):  # a work directory this run made holds nothing until the data is written
        work.mkdir(parents=True, exist_ok=True)
        if not is_stamped(work, WORK_STAMP):
            with atomic_write(work / WORK_STAMP.file) as f:
                json.dump({**format_stamp(WORK_STAMP.format, 1), "options": options}, f, indent=2)
        for name, ex in examples.items():
            if not (work / f"{name}.csv").is_file():
                write_csv(work / f"{name}.csv", ex)
    if args.data_only:
        print(f"wrote {', '.join(str(work / f'{name}.csv') for name in examples)} "
              f"({', '.join(f'{len(ex)} {name}' for name, ex in examples.items())} passages)")
        return 0
    results: dict = {
        "plays": {s: [f"{p.genre}/{p.name}" for p in splits[s]] for s in ("train", "val", "test")},
        "pretrain_plays": len(splits["pretrain"]),
        "examples": {s: dict(Counter(g for _, g in ex)) for s, ex in examples.items()},
        "majority_test_acc": max(Counter(g for _, g in examples["test"]).values()) / len(examples["test"]),
    }
    print("\nsplits:", json.dumps(results["plays"], indent=1), "\nexamples:", results["examples"], flush=True)
    results["bag_of_words"] = bow_baseline(examples)
    print("bag-of-words logistic regression:", results["bag_of_words"]["chosen"], flush=True)

    model = pretrain(work, splits, args)
    val_losses = [m["val_loss"] for _, m in read_metrics(work / "pretrain" / METRICS_FILE) if isinstance(m.get("val_loss"), (int, float))]
    if not val_losses:
        raise CLIError(f"{work / 'pretrain' / METRICS_FILE}: no validation loss logged; remove {work / 'pretrain'} to pre-train again")
    results["pretrain_val_loss"] = val_losses[-1]
    results["finetune"] = {v: finetune(work, model, v, VARIANTS[v], args) for v in variants}

    with atomic_write(work / "results.json") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    bow = results["bag_of_words"]["chosen"]
    print(f"\n{'model':34s} {'train acc':>9s} {'val acc':>9s} {'test acc':>9s}")
    print(f"{'majority class':34s} {'':>9s} {'':>9s} {results['majority_test_acc']:9.3f}")
    print(f"{'bag-of-words logistic regression':34s} {bow['train_acc']:9.3f} {bow['val_acc']:9.3f} {bow['test_acc']:9.3f}")
    for v, r in results["finetune"].items():
        print(f"{'GPT fine-tuned: ' + v:34s} {r['train_acc']:9.3f} {r['val_acc']:9.3f} {r['test_acc']:9.3f}")
    print(f"\nresults: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

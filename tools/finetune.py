"""Fine-tuning a pretrained GPT: text classification and instruction following.

    gpt-finetune classify --model ckpt/ --train train.csv --val val.csv --test test.csv --out runs/cls
    gpt-classify --model runs/cls "To be, or not to be" "Now is the winter of our discontent"
    gpt-finetune instruct --model ckpt/ --data instruction-data.json --out runs/sft --mask-prompt
    gpt-generate --model runs/sft/final --instruct "Convert 45 kilometers to meters."

Both subcommands train with ``gpt.trainer.Trainer`` (schedule, clipping, AMP, checkpoints, resume,
metrics, progress) and take gpt-train's training options; ``--out`` is a run directory as gpt-train's, with the model
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
import hashlib
import json
import os
import reprlib
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as torch_dist
import torch.nn as nn

from gpt.classifier import (
    TRAINABLE,
    GPTClassifier,
    classification_loss,
    evaluate_classifier,
    load_classifier,
    save_classifier,
    set_trainable,
)
from gpt.device import init_distributed
from gpt.finetune_data import (
    ShuffledBatches,
    check_known_labels,
    collate_classification,
    collate_instructions,
    count_targets,
    encode_examples,
    encode_instruction,
    evenly_spaced,
    in_batches,
    label_names,
    read_examples,
    read_instructions,
    show_labels,
)
from gpt.lora import LoRAConfig, apply_lora, count_trainable
from gpt.memory import training_state_bytes
from gpt.model import GPT
from gpt.prompt_template import format_instruction_prompt
from gpt.run_state import RUN_CONFIG_FILE, read_run_config
from gpt.sampling import generate
from gpt.trainer import Trainer, lm_loss
from tokenizers_bpe import UnknownCharacterError
from tokenizers_bpe.fileio import atomic_write
from tools.cli import ArgumentParser, CLIError, command, integer, number, output_path, path_argument
from tools.models import check_finite_weights, model_argument
from tools.outputs import check_writable_dir
from tools.training import (add_train_options, check_memory, check_run_dir, exit_code, removed_after_early_error, resolved,
                            run_training, train_config)

PROG = "gpt-finetune"
FLAGS = {"block_size": "--max-length"}  # a micro-batch's length is set by --max-length here
EVALUATION_FILE = "evaluation.json"
EVAL_EXAMPLES = 2048  # of the validation set, evaluated during training (all of it at the end)
FINAL_TRAIN_EXAMPLES = 2048  # of the training set, evaluated at the end
MAX_PRINTED_CONFUSION = 32  # labels: a larger confusion matrix is only written to evaluation.json
RUN_DEFINING = ("model", "train", "val", "test", "data", "val_fraction", "text_column", "label_column", "trainable",
                "mask_prompt", "max_length", "lora_rank", "lora_alpha", "lora_targets", "seed")
DEFAULT_LORA_TARGETS = "attn"
PATH_OPTIONS = ("model", "train", "val", "test", "data")  # recorded resolved (tools.training.resolved)


def recorded(args) -> dict:
    """The options as run_config.json records them (--resume left out), the paths resolved."""
    return {k: resolved(v) if k in PATH_OPTIONS else v for k, v in vars(args).items() if k != "resume"}


def format_confusion(labels: list[str], confusion: list[list[int]]) -> str:
    """The confusion matrix as a table whose columns line up: rows are true labels, columns predicted."""
    corner = "true \\ predicted"
    first = max(len(corner), *(len(x) for x in labels)) + 2
    width = max(6, *(len(x) for x in labels), *(len(str(v)) for row in confusion for v in row)) + 2
    lines = [corner.ljust(first) + "".join(x.rjust(width) for x in labels)]
    for label, row in zip(labels, confusion):
        lines.append(label.ljust(first) + "".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)


def add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=path_argument, metavar="DIR", help="pretrained checkpoint directory (gpt-train final/, gpt-convert output)")
    p.add_argument("--out", required=True, type=output_path, metavar="RUN_DIR", help="run directory: metrics, checkpoints, best/ and final/ (the model)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint (same options)")
    p.add_argument("--max-length", type=integer(), metavar="N", help="cut examples to N tokens (default: the model's n_ctx)")
    lora = p.add_argument_group("LoRA (train low-rank adapters instead of the base weights)")
    lora.add_argument("--lora-rank", type=integer(), metavar="R", help="adapter rank; enables LoRA")
    lora.add_argument("--lora-alpha", type=number(), metavar="A", help="adapter scale alpha: the update is scaled by A/R (default: 2R)")
    lora.add_argument("--lora-targets", metavar="LIST",
                      help=f"comma-separated layer groups: attn (c_attn, c_proj), mlp (c_fc, c_proj) (default: {DEFAULT_LORA_TARGETS})")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    commands = p.add_subparsers(dest="command", required=True, metavar="{classify,instruct}")
    raw = argparse.RawDescriptionHelpFormatter  # defaults are written into the help texts
    c = commands.add_parser("classify", help="train a text classifier (a linear head on the GPT)", formatter_class=raw,
                            description="Train a classifier: the GPT body and a linear head over the last token's hidden state.")
    add_common_options(c)
    c.add_argument("--train", required=True, type=path_argument, metavar="FILE", help="training examples (.csv, .tsv or .jsonl)")
    c.add_argument("--val", required=True, type=path_argument, metavar="FILE", help="validation examples (same format): all of them evaluated at the end, at most "
                   f"{EVAL_EXAMPLES:,} (spread over the file) at each evaluation during training")
    c.add_argument("--test", type=path_argument, metavar="FILE", help="test examples, evaluated at the end")
    c.add_argument("--text-column", default="text", help="column (or JSON field) with the text (default: %(default)s)")
    c.add_argument("--label-column", default="label", help="column (or JSON field) with the label (default: %(default)s)")
    c.add_argument("--trainable", choices=TRAINABLE, default=None,
                   help="what trains besides the head: head (nothing), last-block (the last block and the final LayerNorm), "
                        "all (default: last-block; with --lora-rank: head, i.e. the adapters and the head)")
    add_train_options(c, skip=("eval_iters",), max_steps=300, batch_size=8, lr=1e-4, warmup_steps=20, eval_interval=50, weight_decay=0.1)
    i = commands.add_parser("instruct", help="instruction fine-tuning on Alpaca-style JSON", formatter_class=raw,
                            description="Instruction fine-tuning on Alpaca-style {instruction, input, output} records.")
    add_common_options(i)
    i.add_argument("--data", required=True, type=path_argument, metavar="FILE", help="instruction records (.json list or .jsonl)")
    i.add_argument("--val", type=path_argument, metavar="FILE", help="validation records (default: the last --val-fraction of --data)")
    i.add_argument("--val-fraction", type=number(), default=0.1,
                   help="the last this share of --data is held out for validation when --val is not given (default: %(default)s)")
    i.add_argument("--mask-prompt", action="store_true", help="learn only the response: prompt targets get -100")
    i.add_argument("--show", type=integer(), default=3, metavar="N",
                   help="print greedy answers to the first N validation instructions at the end (default: %(default)s)")
    add_train_options(i, helps={"eval_iters": "validation batches per evaluation (default: all)"}, max_steps=300, batch_size=8, lr=1e-4, warmup_steps=20, eval_interval=50, eval_iters=None, weight_decay=0.1)
    return p


def check_lora_options(args) -> None:
    """--lora-alpha and --lora-targets only with --lora-rank (without it they were ignored: a full
    fine-tune); the default targets filled in, as run_config.json records them."""
    if args.lora_rank is None:
        given = next((flag for flag, value in (("--lora-alpha", args.lora_alpha), ("--lora-targets", args.lora_targets))
                      if value is not None), None)
        if given:
            raise CLIError(f"{given} needs --lora-rank")
    if args.lora_targets is None:
        args.lora_targets = DEFAULT_LORA_TARGETS


def lora_config_from_args(args):
    if args.lora_rank is None:
        return None
    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
    return LoRAConfig(rank=args.lora_rank, alpha=alpha, targets=LoRAConfig.parse_targets(args.lora_targets))


def load_base(args):
    model = GPT.from_pretrained(model_argument(args.model, PROG))
    check_finite_weights(model, f"--model {args.model}")
    if getattr(model, "lora_config", None) is not None:
        raise CLIError(f"--model {args.model} has LoRA adapters; merge them first: gpt-convert merge-lora {args.model} MERGED")
    max_length = args.max_length or model.config.n_ctx
    if not 1 <= max_length <= model.config.n_ctx:
        raise CLIError(f"--max-length must be between 1 and the model's n_ctx ({model.config.n_ctx}), got {max_length}")
    return model, max_length


def check_batch(cfg, train_examples: list, model: nn.Module, model_config, n_outputs: int) -> None:
    """Refuse, before building any batch, training whose parameters' state (for those ``model`` trains)
    cannot fit in memory, or a --batch-size whose micro-batch cannot beside it even if every example
    were as short as the shortest one (the message names the shortest length)."""
    shortest = min(len(example[0]) for example in train_examples)
    check_memory(PROG, model_config, n_outputs, cfg, shortest, FLAGS, state_bytes=training_state_bytes(count_trainable(model)[0]))


def check_out(args) -> None:
    """Fail before any work when --out already holds a run (and --resume is not given)."""
    check_run_dir(Path(args.out), args.resume, "--resume")
    check_writable_dir(args.out, "--out", keep=False)  # the Trainer creates it once every check has passed


def data_digests(args) -> dict[str, str]:
    """The SHA-256 of each example file, as run_config.json records them: a resume checks that the
    files it is given by the same names still hold the examples the run was trained on."""
    digests = {}
    for name in ("train", "val", "test", "data"):
        if getattr(args, name, None):
            digest = hashlib.sha256()
            with open(getattr(args, name), "rb") as f:
                left = os.fstat(f.fileno()).st_size  # (a file still written to is hashed as it was when opened)
                while left > 0 and (block := f.read(min(left, 1 << 20))):
                    digest.update(block)
                    left -= len(block)
            digests[name] = digest.hexdigest()
    return digests


def check_resume(args, run_config: dict) -> None:
    """Refuse to resume a run with options that define it changed (data, model, adapters)."""
    path = Path(args.out) / RUN_CONFIG_FILE
    if not Path(args.out).is_dir():
        raise CLIError(f"--resume: --out {args.out}: no such run directory; drop --resume to start the run")
    if not path.exists() and not path.is_symlink():
        raise CLIError(f"--resume: {path} is missing; {args.out} is not a gpt-finetune run directory")
    saved = read_run_config(Path(args.out), f"{args.out} is not a usable gpt-finetune run directory")
    if saved.get("command") != run_config["command"]:
        raise CLIError(f"--resume: {args.out} is a run of gpt-finetune {reprlib.repr(saved.get('command'))}, not of "
                       f"gpt-finetune {run_config['command']}; resume it with the subcommand that started it")
    for key in RUN_DEFINING:
        used = resolved(saved.get(key)) if key in PATH_OPTIONS else saved.get(key)  # (a run recorded before paths were)
        # compared as run_config.json records them: a recorded `true` is not the number 1
        if key in run_config and json.dumps(used, sort_keys=True) != json.dumps(run_config[key], sort_keys=True):
            raise CLIError(f"--{key.replace('_', '-')} cannot change when resuming (the run used {reprlib.repr(saved.get(key))})")
    for name, digest in run_config["data_digests"].items():
        if isinstance(saved.get("data_digests"), dict) and saved["data_digests"].get(name, digest) != digest:
            raise CLIError(f"--{name} {getattr(args, name)}: its content changed since the run started (the run was trained "
                           "on other examples, and resumed it would compare losses on different ones); resume with the "
                           "file as it was, or start a new run with another --out")


def describe(model: nn.Module, lora) -> str:
    trainable, total = count_trainable(model)
    extra = f"; LoRA rank {lora.rank}, alpha {lora.alpha:g} on {','.join(lora.targets)}" if lora else ""
    return f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%){extra}"


def fit(trainer, args):
    """Train; on the main process print the summary (and how to resume after an interruption)."""
    return run_training(trainer, args.resume, f"gpt-finetune {args.command} ... --out {args.out} --resume")


def write_evaluation(out: Path, record: dict) -> None:
    with atomic_write(out / EVALUATION_FILE) as f:
        json.dump(record, f, indent=2)
        f.write("\n")


def run_classify(args) -> int:
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
    cfg = train_config(vars(args))
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

    torch.manual_seed(cfg.seed)  # the head's initialisation (and the adapters')
    if lora:
        apply_lora(gpt, lora)
    model = GPTClassifier(gpt, labels)
    args.trainable = args.trainable or ("head" if lora else "last-block")
    set_trainable(model, args.trainable)
    check_batch(cfg, splits["train"], model, gpt.config, len(labels))
    run_config = {**recorded(args), "labels": labels, "max_length": max_length, "data_digests": data_digests(args)}
    if args.resume:
        check_resume(args, run_config)

    dist = init_distributed(cfg.device)
    collate = lambda b: collate_classification(b, pad_id)  # noqa: E731
    train_batch = ShuffledBatches(splits["train"], cfg.batch_size, collate, seed=cfg.seed, grad_accum=cfg.grad_accum,
                                  rank=dist.rank, world_size=dist.world_size)
    monitor = evenly_spaced(splits["train"], 512)  # a fixed sample of the training set, for the train accuracy during training
    val_sample = evenly_spaced(splits["val"], EVAL_EXAMPLES)

    def extra_eval(m) -> dict:
        # The same sample of the validation set on every rank (all of a small one): exact per-example means.
        val, train = evaluate_classifier(m, val_sample, cfg.batch_size, pad_id), evaluate_classifier(m, monitor, cfg.batch_size, pad_id)
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
        print(f"gpt-finetune classify: {len(labels)} labels ({show_labels(labels)}); {counts} examples; {describe(model, lora)}", file=sys.stderr)
    result = fit(trainer, args)
    if result.interrupted or not dist.is_main:
        return exit_code(result)
    # val and test whole; of the training set, a sample as large as a test set needs (all of it took
    # longer than the training itself with a large file)
    evaluated = {**splits, "train": evenly_spaced(splits["train"], FINAL_TRAIN_EXAMPLES)}
    report = {name: evaluate_classifier(trainer.model, ex, cfg.batch_size, pad_id, progress=f"evaluate {name}" if cfg.progress else None)
              for name, ex in evaluated.items()}
    for name, r in report.items():
        of = f" of {len(splits[name]):,}" if r["examples"] != len(splits[name]) else ""
        print(f"{name:5s}: loss {r['loss']:.4f}  accuracy {r['accuracy']:.4f}  ({r['examples']:,}{of} examples)")
    shown = "test" if "test" in report else "val"
    if len(labels) <= MAX_PRINTED_CONFUSION:
        print(f"confusion matrix ({shown}; rows: true label, columns: predicted):\n{format_confusion(labels, report[shown]['confusion'])}")
    else:
        print(f"confusion matrix ({shown}): {len(labels)} x {len(labels)}, in {Path(args.out) / EVALUATION_FILE}")
    write_evaluation(Path(args.out), {"labels": labels, **report})
    print(f"model: {result.final_dir}  (gpt-classify --model {result.final_dir} TEXT...)")
    return 0


def run_instruct(args) -> int:
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
    cfg = train_config(vars(args))
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
    torch.manual_seed(cfg.seed)
    if lora:
        apply_lora(model, lora)
    check_batch(cfg, encoded["train"], model, model.config, model.config.vocab_size)
    run_config = {**recorded(args), "max_length": max_length, "data_digests": data_digests(args)}
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
        return exit_code(result)
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


@command(PROG, flags=FLAGS)
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_lora_options(args)
    try:
        with removed_after_early_error(args.out):
            return run_classify(args) if args.command == "classify" else run_instruct(args)
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())

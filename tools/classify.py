"""gpt-classify: classify texts with a gpt-finetune classify model: prints label and probability per text."""

from __future__ import annotations

from typing import Sequence

import torch

from gpt.classifier import load_classifier
from gpt.device import resolve_device
from gpt.finetune_data import collate_classification
from tokenizers_bpe import UnknownCharacterError
from tools.cli import ArgumentParser, CLIError, command, path_argument, text_argument
from tools.models import check_finite_weights

PROG = "gpt-classify"
MEMORY_PER_TEXT_BYTE = 21  # peak memory per byte of texts on stdin (measured on 20 MB of lines: their ids, held until printed)


@command(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog=PROG, description=__doc__.split(": ", 1)[1].strip(),
                       epilog="example:  gpt-classify --model runs/cls/final 'O Romeo, Romeo!' 'Once more unto the breach'")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="texts to classify ('-' reads one text per line from stdin)")
    p.add_argument("--model", required=True, type=path_argument, metavar="DIR", help="gpt-finetune classify output (RUN_DIR/final, or RUN_DIR itself)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    args = p.parse_args(argv)
    texts = []
    for t in args.texts:
        text = text_argument(t, "TEXT", MEMORY_PER_TEXT_BYTE)
        texts.extend(text.splitlines() if t == "-" else [text])
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CLIError("no text to classify")
    device = resolve_device(args.device)
    model, max_length = load_classifier(args.model, device=device)
    check_finite_weights(model, args.model)
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
            if not torch.isfinite(probs).all():
                raise CLIError("the model's output is not finite (NaN or inf): its weights or its LoRA scaling are damaged")
            for text, p_row in zip(texts[start : start + 32], probs):
                best = int(p_row.argmax())
                print(f"{model.labels[best]}\t{p_row[best].item():.4f}\t{text if len(text) <= 60 else text[:57] + '...'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

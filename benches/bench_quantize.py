"""Quality of weight-only int8 (gpt.quantize) against fp32, the same weights, in the same run.

- **Perplexity of a trained model** on its whole validation split (non-overlapping windows of n_ctx
  tokens, every token scored once): fp32, int8 with the output head left in fp32 (``head=False``) and
  int8 everywhere (``head=True``, the default). The model is the demo's (``make demo`` writes
  demo-out/run/final and demo-out/data), or ``GPT_BENCH_QUANT_RUN=RUN_OR_CHECKPOINT`` with
  ``GPT_BENCH_QUANT_DATA=DATA_DIR``; without one the case skips with a reason. Target (issue 13):
  int8 perplexity within 1% of fp32.
- **Logits** of the int8 model against fp32 on that data and on GPT-2 124M with random weights:
  relative L2 error (|int8 - fp32| / |fp32| over every logit), the largest absolute error, and the
  share of positions whose arg-max is the same.

    pytest benches/bench_quantize.py -s
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import torch

from gpt.data import SlidingWindows, open_split
from gpt.model import GPT, GPTConfig
from gpt.quantize import quantize
from gpt.run_state import resolve_model_dir

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"fp32": None, "int8-blocks": False, "int8": True}  # name: head quantized


def trained_model_and_data() -> tuple[Path, Path]:
    run = Path(os.environ.get("GPT_BENCH_QUANT_RUN", ROOT / "demo-out" / "run"))
    data = Path(os.environ.get("GPT_BENCH_QUANT_DATA", ROOT / "demo-out" / "data"))
    if not run.exists() or not (data / "val.bin").exists():
        pytest.skip(f"no trained model: run `make demo` (or set GPT_BENCH_QUANT_RUN and GPT_BENCH_QUANT_DATA); looked for {run} and {data}")
    return resolve_model_dir(run)[0], data


@torch.no_grad()
def validation_loss(model: GPT, data_dir: Path, batch_size: int = 16) -> tuple[float, int]:
    """Mean next-token cross-entropy (nats) over the whole validation split, and the tokens scored."""
    windows = SlidingWindows(open_split(data_dir, "val"), model.config.n_ctx, batch_size)
    total, count = 0.0, 0
    for x, y in windows():
        _, loss = model(x, targets=y)
        total += float(loss) * y.numel()
        count += y.numel()
    return total / count, count


@torch.no_grad()
def logit_errors(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    return {"relative_l2": float((other - reference).norm() / reference.norm()),
            "max_abs": float((other - reference).abs().max()),
            "logit_std": float(reference.std()),
            "top1_agreement": float((other.argmax(-1) == reference.argmax(-1)).float().mean())}


def quantized(model: GPT, head: bool | None) -> GPT:
    return model if head is None else quantize(copy.deepcopy(model), "int8", head=head)


def test_int8_perplexity_trained_model(benchmark, capsys):
    checkpoint, data = trained_model_and_data()
    model = GPT.from_pretrained(checkpoint, backend="torch")
    models = {name: quantized(model, head) for name, head in VARIANTS.items()}
    results = {}

    def measure():
        for name, m in models.items():
            loss, tokens = validation_loss(m, data)
            results[name] = {"val_loss": loss, "val_ppl": math.exp(loss), "tokens": tokens}

    benchmark.pedantic(measure, rounds=1, iterations=1)
    x, _ = next(SlidingWindows(open_split(data, "val"), model.config.n_ctx, 16)())
    with torch.no_grad():
        logits = {name: m(x)[0] for name, m in models.items()}
    lines = [f"trained model {checkpoint} ({model.num_parameters():,} parameters), {results['fp32']['tokens']:,} validation tokens"]
    for name, r in results.items():
        r["ppl_x_fp32"] = r["val_ppl"] / results["fp32"]["val_ppl"]
        if name != "fp32":
            r.update({f"logits_{k}": v for k, v in logit_errors(logits["fp32"], logits[name]).items()})
        lines.append(f"  {name:12s} val loss {r['val_loss']:.4f}  ppl {r['val_ppl']:.3f}  x fp32 {r['ppl_x_fp32']:.4f}"
                     + (f"  logits: relative L2 {r['logits_relative_l2']:.4f}, max |err| {r['logits_max_abs']:.3f} "
                        f"(logit std {r['logits_logit_std']:.2f}), same arg-max {100 * r['logits_top1_agreement']:.1f}%"
                        if name != "fp32" else ""))
        benchmark.extra_info[name] = r
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    for name in ("int8", "int8-blocks"):
        assert abs(results[name]["ppl_x_fp32"] - 1) < 0.01, (name, results[name])


def test_int8_logits_124m_random(benchmark, capsys):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2", backend="torch")).eval()
    idx = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    errors = {}

    def measure():
        with torch.no_grad():
            reference = model(idx)[0]
            for name, head in VARIANTS.items():
                if head is not None:
                    errors[name] = logit_errors(reference, quantized(model, head)(idx)[0])

    benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(errors)
    with capsys.disabled():
        for name, e in errors.items():
            print(f"\n  124M random, {name}: logits relative L2 {e['relative_l2']:.4f}, max |err| {e['max_abs']:.3f} "
                  f"(logit std {e['logit_std']:.3f}), same arg-max {100 * e['top1_agreement']:.1f}% of 64 positions")

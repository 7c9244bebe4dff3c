"""The whole GPT on CPU (torch backend) next to transformers.GPT2LMHeadModel holding the same weights.

Two sizes: GPT-2 small (124M) and nanoGPT's Shakespeare size (6 x 384, GPT-2's vocabulary), fp32,
batch 1 x 128 tokens for forward latency (eval, no grad) and 2 x 128 for a training step (forward,
cross-entropy, backward, AdamW step, dropout 0 in both). Target: at least as fast as transformers.
Timing is benches.kernel_utils.run (best round of pytest-benchmark's pedantic runs); the table printed
at the end gives ms per call, tokens/s and transformers' time over ours (> 1: we are faster).
"""

from __future__ import annotations

import pytest
import torch

from benches.kernel_utils import run
from gpt.model import GPT, GPTConfig
from tools.convert import to_transformers

SIZES = {"124M": "gpt2", "shakespeare": "shakespeare"}
FORWARD_SHAPE, TRAIN_SHAPE = (1, 128), (2, 128)  # (batch, tokens through the model)


@pytest.fixture(scope="module")
def table(request):
    rows: list[dict] = []
    yield rows
    ours = {r["group"]: r["ms"] for r in rows if r["impl"] == "ours"}
    theirs = {r["group"]: r["ms"] for r in rows if r["impl"] == "transformers"}
    lines = ["", "GPT on CPU vs transformers.GPT2LMHeadModel (same weights, same run)",
             f"{'group':<32} {'impl':<13} {'ms/call':>9} {'tokens/s':>9} {'transformers/ours':>18}"]
    for r in rows:
        ratio = theirs[r["group"]] / ours[r["group"]] if r["group"] in ours and r["group"] in theirs else None
        lines.append(f"{r['group']:<32} {r['impl']:<13} {r['ms']:>9.2f} {r['tokens'] / r['ms'] * 1e3:>9.0f} "
                     f"{'' if r['impl'] != 'ours' or ratio is None else f'{ratio:.2f}x':>18}")
    if rows:  # written past pytest's output capture
        plugins = request.config.pluginmanager
        with plugins.get_plugin("capturemanager").global_and_fixture_disabled():
            for line in lines:
                plugins.get_plugin("terminalreporter").write_line(line)


@pytest.fixture(scope="module", params=list(SIZES))
def models(request):
    torch.manual_seed(0)
    ours = GPT(GPTConfig.from_preset(SIZES[request.param], dropout=0.0, backend="torch"))
    return request.param, {"ours": ours, "transformers": to_transformers(ours)}


def batch(shape):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 50257, shape, generator=g)


def forward_call(impl, model, idx):
    model.eval()
    if impl == "ours":
        return torch.no_grad()(lambda: model(idx)[0])
    return torch.no_grad()(lambda: model(idx).logits)


def train_step_call(impl, model, idx):
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    inputs, targets = idx[:, :-1], idx[:, 1:]

    def step():
        if impl == "ours":
            _, loss = model(inputs, targets)
        else:
            loss = model(inputs, labels=inputs).loss  # transformers shifts the labels itself
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


@pytest.mark.parametrize("impl", ["ours", "transformers"])
@pytest.mark.parametrize("mode", ["forward", "train-step"])
def test_model_cpu(benchmark, table, models, mode, impl):
    size, pair = models
    if mode == "forward":
        shape, call = FORWARD_SHAPE, forward_call(impl, pair[impl], batch(FORWARD_SHAPE))
    else:
        shape, call = TRAIN_SHAPE, train_step_call(impl, pair[impl], batch((TRAIN_SHAPE[0], TRAIN_SHAPE[1] + 1)))
    run(benchmark, table, call, device=torch.device("cpu"), impl=impl, group=f"{size} {mode} {shape[0]}x{shape[1]}")
    if benchmark.stats is not None:  # None under --benchmark-disable
        table[-1]["tokens"] = shape[0] * shape[1]

"""gpt.model: config validation, parameter counts, logit parity with transformers' GPT-2, KV cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gpt.config import PRESETS, GPTConfig
from gpt.model import GPT, KVCache
from gpt2_kernels import memory_plan
from tools.convert import to_transformers


def tiny(**overrides) -> GPTConfig:
    return GPTConfig.from_preset("tiny", **{"vocab_size": 300, "backend": "torch", **overrides})


def random_model(config: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters and biases, so a mix-up shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "preset, total",  # the sizes transformers reports for OpenAI's four GPT-2 checkpoints
    [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)],
)
def test_gpt2_parameter_counts(preset, total):
    with torch.device("meta"):  # no memory, no init time
        model = GPT(GPTConfig.from_preset(preset))
    L, C = model.config.n_layer, model.config.n_embd
    assert model.num_parameters() == total
    # per block: c_attn 3C^2+3C, c_proj C^2+C, c_fc 4C^2+4C, c_proj 4C^2+C, two LayerNorms 4C; plus ln_f
    assert model.num_parameters(non_embedding=True) == L * (12 * C * C + 13 * C) + 2 * C


def test_every_preset_builds():
    for name in PRESETS:
        with torch.device("meta"):
            model = GPT(GPTConfig.from_preset(name))
        assert model.num_parameters() > 0


def test_untied_and_rope_parameter_counts():
    base = GPT(tiny())
    assert base.lm_head.weight is base.transformer.wte.weight
    untied = GPT(tiny(tie_embeddings=False))
    assert untied.num_parameters() == base.num_parameters() + 300 * 64
    assert untied.num_parameters(non_embedding=True) == base.num_parameters(non_embedding=True)
    rope = GPT(tiny(pos_embedding="rope"))
    assert "wpe" not in rope.transformer
    assert rope.num_parameters() == base.num_parameters() - 128 * 64
    no_bias = GPT(tiny(bias=False))
    assert all(not n.endswith("bias") for n, _ in no_bias.named_parameters())


def test_config_dict_round_trip():
    config = tiny(pos_embedding="rope", dropout=0.1)
    assert GPTConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"n_embd": 65}, "divisible by n_head"),
        ({"pos_embedding": "alibi"}, "pos_embedding"),
        ({"backend": "cuda"}, "backend"),
        ({"dropout": 1.0}, "dropout"),
        ({"n_layer": 0}, "n_layer"),
        ({"bias": "yes"}, "bias"),
        ({"n_embd": 24, "n_head": 8, "pos_embedding": "rope"}, "even head size"),
        ({"n_heads": 4}, "unknown key"),
    ],
)
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig.from_dict({**tiny().to_dict(), **bad})


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="gpt2-medium"):
        GPTConfig.from_preset("gpt3")


# --------------------------------------------------------------------------------------------- forward


def test_gpt2_initialisation_scales_residual_projections():
    config = tiny(n_layer=8, n_embd=256, n_head=4)
    model = GPT(config)
    c_proj = torch.cat([b.attn.c_proj.weight.flatten() for b in model.transformer.h] + [b.mlp.c_proj.weight.flatten() for b in model.transformer.h])
    c_fc = torch.cat([b.mlp.c_fc.weight.flatten() for b in model.transformer.h])
    assert c_proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.03)
    assert c_fc.std().item() == pytest.approx(0.02, rel=0.03)
    assert model.transformer.h[0].attn.c_attn.bias.abs().max() == 0


def test_logits_fp32_and_loss_ignores_minus_100():
    model = random_model(tiny()).to(torch.bfloat16)
    idx = torch.randint(0, 300, (2, 10))
    targets = torch.randint(0, 300, (2, 10))
    targets[0, :4] = -100
    logits, loss = model(idx, targets, return_logits=True)
    assert logits.dtype == torch.float32 and logits.shape == (2, 10, 300)
    keep = targets != -100
    assert loss.item() == pytest.approx(F.cross_entropy(logits[keep], targets[keep]).item(), rel=1e-6)
    assert model(idx)[1] is None


@pytest.mark.parametrize("save_memory", ["auto", "always", "never", "thresholds"])
def test_training_loss_is_fused_and_equals_the_unfused_one(monkeypatch, save_memory):
    # With targets and no logits asked for, the output layer and the loss are one op
    # (gpt2_kernels.linear_cross_entropy) that never returns the (B, T, vocab) logits; values and
    # gradients as unfused on every path gpt2_kernels.memory_plan can pick: forced by
    # $GPT2_KERNELS_SAVE_MEMORY, and "auto" with the thresholds shrunk so that this batch of 51 tokens
    # is past both (loss chunks of at most 16 rows: 4 of 13; the GELU recomputed).
    monkeypatch.delenv(memory_plan.SAVE_MEMORY_ENV_VAR, raising=False)
    if save_memory == "thresholds":
        monkeypatch.setitem(memory_plan.LOSS_CHUNK_ROWS, "cpu", 16)
        monkeypatch.setattr(memory_plan, "GELU_RECOMPUTE_MIN_BYTES", 51 * 256 * 4)
    elif save_memory != "auto":
        monkeypatch.setenv(memory_plan.SAVE_MEMORY_ENV_VAR, save_memory)
    model = random_model(tiny())
    idx = torch.randint(0, 300, (3, 17))
    targets = torch.randint(0, 300, (3, 17))
    targets[1, 3:9] = -100
    logits, fused = model(idx, targets)
    assert logits is None
    fused.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.delenv(memory_plan.SAVE_MEMORY_ENV_VAR, raising=False)
    _, unfused = model(idx, targets, return_logits=True)
    unfused.backward()
    assert fused.item() == pytest.approx(unfused.item(), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_hidden_states_feed_the_head():
    model = random_model(tiny())
    idx = torch.randint(0, 300, (2, 7))
    h = model.hidden_states(idx)
    assert h.shape == (2, 7, 64)
    torch.testing.assert_close(model.lm_head(h), model(idx)[0])


def test_too_long_sequence_is_a_clear_error():
    with pytest.raises(ValueError, match="n_ctx=128"):
        random_model(tiny())(torch.zeros(1, 129, dtype=torch.long))


def test_dropout_only_in_training():
    model = random_model(tiny(dropout=0.2))
    idx = torch.randint(0, 300, (1, 16))
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    model = GPT(tiny()).train()
    idx = torch.randint(0, 300, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(300), rel=0.05)  # GPT-2 init starts near uniform
    assert losses[-1] < losses[0] - 1.0


# --------------------------------------------------------------------------------------------- parity


def assert_hf_parity(model: GPT, idx: torch.Tensor) -> None:
    hf = to_transformers(model)
    with torch.no_grad():
        ours = model(idx)[0]
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_logits_match_transformers_tiny():
    assert_hf_parity(random_model(tiny()), torch.randint(0, 300, (2, 64)))


def test_logits_match_transformers_tiny_untied():
    assert_hf_parity(random_model(tiny(tie_embeddings=False)), torch.randint(0, 300, (2, 32)))


def test_logits_match_transformers_124m_shape():
    model = random_model(GPTConfig.from_preset("gpt2", backend="torch"))
    assert_hf_parity(model, torch.randint(0, 50257, (1, 32)))


def test_logits_match_transformers_triton_interpreter():
    model = random_model(tiny(n_ctx=32, backend="triton"))
    assert_hf_parity(model, torch.randint(0, 300, (2, 16)))


# --------------------------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize(
    "pos_embedding, backend, steps",
    [("learned", "torch", 64), ("rope", "torch", 64), ("rope", "triton", 6)],  # few steps: the interpreter is slow
)
def test_kv_cache_decoding_equals_full_forward(pos_embedding, backend, steps):
    model = random_model(tiny(pos_embedding=pos_embedding, backend=backend))
    idx = torch.randint(0, 300, (2, 8 + steps))
    with torch.no_grad():
        full = model(idx)[0]
        cache = model.make_kv_cache(batch_size=2)
        outputs = [model(idx[:, :8], kv_cache=cache)[0]]  # prefill
        for t in range(8, 8 + steps):  # then one token at a time
            outputs.append(model(idx[:, t : t + 1], kv_cache=cache)[0])
    assert cache.length == 8 + steps
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_reset_and_hidden_states():
    model = random_model(tiny(pos_embedding="rope"))
    idx = torch.randint(0, 300, (1, 12))
    cache = model.make_kv_cache(1)
    with torch.no_grad():
        model(torch.randint(0, 300, (1, 5)), kv_cache=cache)
        cache.reset()
        assert cache.length == 0
        h = torch.cat([model.hidden_states(idx[:, :6], kv_cache=cache), model.hidden_states(idx[:, 6:], kv_cache=cache)], dim=1)
        torch.testing.assert_close(h, model.hidden_states(idx), atol=1e-5, rtol=0)


def test_kv_cache_limits_are_clear_errors():
    model = random_model(tiny())
    cache = model.make_kv_cache(1, max_len=10)
    assert isinstance(cache, KVCache)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="max_len=10"):
            model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="batch size 1"):
            model(torch.zeros(2, 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="n_ctx=128"):
        model.make_kv_cache(1, max_len=129)
    full = model.make_kv_cache(1)
    with torch.no_grad():
        model(torch.zeros(1, 128, dtype=torch.long), kv_cache=full)
        with pytest.raises(ValueError, match="KV cache is full"):
            model(torch.zeros(1, 1, dtype=torch.long), kv_cache=full)
